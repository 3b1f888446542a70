//! The copy loop: moves bytes both ways between a socket and a tunnel stream in one task,
//! with an inactivity timeout, byte counts, and the side that failed.
//!
//! The loop itself is tokio's `copy_bidirectional_with_sizes` (each direction a small state
//! machine polled from one future: no extra tasks, no locks; EOF on one side becomes a
//! shutdown — FIN — on the other). Around it: a thin [`Metered`] wrapper on each side that
//! counts bytes read, stamps the time of the last byte, and remembers whether that side
//! failed; and a watchdog that ends the copy when no byte has moved in either direction for
//! the timeout (HAProxy's `timeout tunnel` semantics). The caller decides how to close each
//! side (FIN, TCP reset, stream reset) from the [`CopyEnd`] it gets back.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Buffer size per direction. A first measured choice: large enough for full-speed bulk
/// transfers on loopback, allocated by tokio for the life of the copy.
pub const DEFAULT_BUFFER_SIZE: usize = 32 * 1024;

/// Which side of the copy something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The TCP socket (the client on the relay, the destination on the agent).
    Socket,
    /// The tunnel stream.
    Tunnel,
}

/// How a copy ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both directions reached EOF and were shut down.
    Finished,
    /// No byte moved in either direction for the inactivity timeout.
    IdleTimeout,
    /// The caller's cancellation fired (shutdown).
    Cancelled,
    /// One side failed.
    Failed {
        /// The side whose read, write or shutdown failed.
        side: Side,
        /// The error.
        error: io::Error,
    },
}

/// What a copy did.
#[derive(Debug)]
pub struct CopyReport {
    /// Bytes read from the socket (and so sent into the tunnel).
    pub socket_to_tunnel: u64,
    /// Bytes read from the tunnel (and so sent to the socket).
    pub tunnel_to_socket: u64,
    /// How it ended.
    pub end: CopyEnd,
}

/// Copies both ways until both directions finish, one side fails, nothing moves for
/// `inactivity_timeout`, or `cancel` resolves.
pub async fn copy_bidirectional_metered<S, T, C>(
    socket: &mut S,
    tunnel: &mut T,
    inactivity_timeout: Duration,
    buffer_size: usize,
    cancel: C,
) -> CopyReport
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: Future<Output = ()>,
{
    let activity = ActivityClock::new();
    let socket_meter = SideMeter::default();
    let tunnel_meter = SideMeter::default();
    let mut socket_side = Metered { inner: socket, meter: &socket_meter, clock: &activity };
    let mut tunnel_side = Metered { inner: tunnel, meter: &tunnel_meter, clock: &activity };

    let end = tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(
            &mut socket_side, &mut tunnel_side, buffer_size, buffer_size,
        ) => match result {
            Ok(_) => CopyEnd::Finished,
            Err(error) => {
                // The side that saw an error first is the one that failed; if neither recorded
                // one (cannot happen with these wrappers), blame the tunnel.
                let side = if socket_meter.failed.load(Ordering::Relaxed) { Side::Socket } else { Side::Tunnel };
                CopyEnd::Failed { side, error }
            }
        },
        () = activity.expired(inactivity_timeout) => CopyEnd::IdleTimeout,
        () = cancel => CopyEnd::Cancelled,
    };
    CopyReport {
        socket_to_tunnel: socket_meter.bytes.load(Ordering::Relaxed),
        tunnel_to_socket: tunnel_meter.bytes.load(Ordering::Relaxed),
        end,
    }
}

/// Time of the last byte moved, as milliseconds since the copy started.
#[derive(Debug)]
struct ActivityClock {
    start: Instant,
    last_ms: AtomicU64,
}

impl ActivityClock {
    fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(elapsed, Ordering::Relaxed);
    }

    /// Resolves once `timeout` has passed since the last byte moved.
    async fn expired(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Per-side counters shared between a [`Metered`] wrapper and the report.
#[derive(Debug, Default)]
struct SideMeter {
    bytes: AtomicU64,
    failed: AtomicBool,
}

/// Passes reads and writes through, counting bytes read, stamping activity and recording
/// the first failure of its side.
#[derive(Debug)]
struct Metered<'a, S: ?Sized> {
    inner: &'a mut S,
    meter: &'a SideMeter,
    clock: &'a ActivityClock,
}

impl<S: ?Sized> Metered<'_, S> {
    fn record<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &result {
            self.meter.failed.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.meter.bytes.fetch_add(read as u64, Ordering::Relaxed);
            self.clock.touch();
        }
        self.record(result)
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut *self.inner).poll_write(cx, buf);
        self.record(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut *self.inner).poll_flush(cx);
        self.record(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut *self.inner).poll_shutdown(cx);
        self.record(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const LONG: Duration = Duration::from_secs(3600);

    /// Runs `body` with the copy between (socket_far, tunnel_far) in both argument orders, the
    /// way tokio's own tests check that neither side is special.
    async fn run_both_orders<F, Fut>(body: F)
    where
        F: Fn(DuplexStream, DuplexStream, tokio::task::JoinHandle<CopyReport>) -> Fut,
        Fut: Future<Output = ()>,
    {
        for swapped in [false, true] {
            let (mut a_near, a_far) = duplex(1024);
            let (mut b_near, b_far) = duplex(1024);
            let copy = tokio::spawn(async move {
                if swapped {
                    copy_bidirectional_metered(&mut b_near, &mut a_near, LONG, 512, pending()).await
                } else {
                    copy_bidirectional_metered(&mut a_near, &mut b_near, LONG, 512, pending()).await
                }
            });
            body(a_far, b_far, copy).await;
        }
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_and_counts_them() {
        run_both_orders(|mut a, mut b, copy| async move {
            a.write_all(b"hello from a").await.expect("write a");
            b.write_all(b"hi from b!").await.expect("write b");
            let mut buf = [0u8; 12];
            b.read_exact(&mut buf).await.expect("read b");
            assert_eq!(&buf, b"hello from a");
            let mut buf = [0u8; 10];
            a.read_exact(&mut buf).await.expect("read a");
            assert_eq!(&buf, b"hi from b!");
            drop(a);
            drop(b);
            let report = copy.await.expect("join");
            assert!(matches!(report.end, CopyEnd::Finished), "{:?}", report.end);
            let mut counts = [report.socket_to_tunnel, report.tunnel_to_socket];
            counts.sort_unstable();
            assert_eq!(counts, [10, 12]);
        })
        .await;
    }

    #[tokio::test]
    async fn half_close_is_preserved() {
        run_both_orders(|mut a, mut b, copy| async move {
            a.write_all(b"request").await.expect("write");
            a.shutdown().await.expect("shutdown a");
            // b sees the request and then EOF, yet can still answer.
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.expect("read to eof");
            assert_eq!(got, b"request");
            b.write_all(b"response").await.expect("reply after peer FIN");
            b.shutdown().await.expect("shutdown b");
            let mut got = Vec::new();
            a.read_to_end(&mut got).await.expect("read reply");
            assert_eq!(got, b"response");
            assert!(matches!(copy.await.expect("join").end, CopyEnd::Finished));
        })
        .await;
    }

    #[tokio::test]
    async fn one_blocked_direction_does_not_block_the_other() {
        run_both_orders(|mut a, mut b, copy| async move {
            // Fill a→b until it backs up (nobody reads b), then b→a must still flow.
            let filler = vec![7u8; 64 * 1024];
            let stuck =
                tokio::time::timeout(Duration::from_millis(200), a.write_all(&filler)).await;
            assert!(stuck.is_err(), "a→b should be backed up");
            b.write_all(b"still flowing").await.expect("write b");
            let mut buf = [0u8; 13];
            a.read_exact(&mut buf).await.expect("read a");
            assert_eq!(&buf, b"still flowing");
            copy.abort();
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_time_out_and_busy_ones_do_not() {
        let (mut socket, mut socket_far) = duplex(1024);
        let (mut tunnel, mut tunnel_far) = duplex(1024);
        let timeout = Duration::from_secs(10);
        let copy = tokio::spawn(async move {
            copy_bidirectional_metered(&mut socket, &mut tunnel, timeout, 512, pending()).await
        });
        // Busy for three timeouts: a byte every half timeout, alternating directions.
        for round in 0..6 {
            tokio::time::sleep(timeout / 2).await;
            let mut byte = [0u8; 1];
            if round % 2 == 0 {
                socket_far.write_all(b"x").await.expect("write");
                tunnel_far.read_exact(&mut byte).await.expect("read");
            } else {
                tunnel_far.write_all(b"y").await.expect("write");
                socket_far.read_exact(&mut byte).await.expect("read");
            }
            assert!(!copy.is_finished(), "busy connection closed in round {round}");
        }
        let went_quiet = Instant::now();
        let report = copy.await.expect("join");
        assert!(matches!(report.end, CopyEnd::IdleTimeout), "{:?}", report.end);
        assert!(
            went_quiet.elapsed() <= timeout,
            "closed {:?} after going quiet",
            went_quiet.elapsed()
        );
        assert_eq!((report.socket_to_tunnel, report.tunnel_to_socket), (3, 3));
    }

    #[tokio::test]
    async fn cancellation_ends_the_copy() {
        let (mut socket, _socket_far) = duplex(64);
        let (mut tunnel, _tunnel_far) = duplex(64);
        let report = copy_bidirectional_metered(&mut socket, &mut tunnel, LONG, 64, async {}).await;
        assert!(matches!(report.end, CopyEnd::Cancelled));
    }

    /// A stream whose reads fail with a reset.
    struct Resetting;

    impl AsyncRead for Resetting {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Resetting {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn failures_name_their_side() {
        let (mut healthy, _far) = duplex(64);
        let report =
            copy_bidirectional_metered(&mut Resetting, &mut healthy, LONG, 64, pending()).await;
        assert!(
            matches!(report.end, CopyEnd::Failed { side: Side::Socket, .. }),
            "{:?}",
            report.end
        );

        let (mut healthy, _far) = duplex(64);
        let report =
            copy_bidirectional_metered(&mut healthy, &mut Resetting, LONG, 64, pending()).await;
        match report.end {
            CopyEnd::Failed { side: Side::Tunnel, error } => {
                assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
            }
            other => panic!("expected a tunnel failure, got {other:?}"),
        }
    }
}
