//! The copy loop: moves bytes both ways between a socket and a tunnel stream in one task,
//! with an inactivity timeout, byte counts, and the side that failed.
//!
//! The loop follows tokio's `copy_bidirectional_with_sizes` (each direction a small state
//! machine — running, shutting down, done — both polled from one future: no extra tasks, no
//! locks; EOF on one side becomes a shutdown — FIN — on the other; tokio's cooperative budget
//! is honoured) with one change, made for memory: tokio allocates two buffers per connection
//! for its whole life, 128 KiB per tunnelled connection across relay and agent, which the
//! benchmark harness measured as most of an idle connection's cost. Here each read lands in a
//! buffer on the stack and is written on at once; only when the writer cannot take it all does
//! the rest move to a heap buffer, and from then on the loop is tokio's until that buffer has
//! drained and the reader has nothing more, when it is freed. An idle connection holds no
//! buffer.
//! Around the loop: a thin `Metered` wrapper on each side that counts bytes read, stamps the
//! time of the last byte, and remembers whether that side failed; and a watchdog that ends the
//! copy when no byte has moved in either direction for the timeout (HAProxy's `timeout
//! tunnel` semantics), or — with a stall timeout — when a writer has taken less than
//! [`STALL_MIN_PROGRESS`] for that long while bytes waited for it: a receiver that stopped
//! reading, or reads a trickle, would otherwise hold its buffers (and its stream's window)
//! forever, since the bytes it does take keep the inactivity timer from firing. The caller decides how to close each side (FIN, TCP reset, stream
//! reset) from the [`CopyEnd`] it gets back.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

mod watch;

use watch::{ActivityClock, MeterCharge, Metered, SideMeter, StallMeter, watchdog};

use crate::budget::BudgetCharge;
#[cfg(doc)]
use crate::budget::BufferBudget;
#[cfg(doc)]
use crate::limits::STALLED_STREAM_COST;

pub use crate::limits::DEFAULT_BUFFER_SIZE;

/// The stack buffer each read lands in; reads are capped at this size.
const MAX_READ: usize = 64 * 1024;

/// Which side of the copy something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The TCP socket (the client on the relay, the destination on the agent).
    Socket,
    /// The tunnel stream.
    Tunnel,
}

/// Bytes a blocked writer must take per stall timeout not to be stalled: a receiver slower than
/// this (16 KiB in 30 s is about 4 kbit/s) holds buffers for nothing.
pub const STALL_MIN_PROGRESS: u64 = 16 * 1024;

/// The deadlines of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTimeouts {
    /// No byte moved either way for this long: the copy ends ([`CopyEnd::IdleTimeout`]).
    pub inactivity: Duration,
    /// A writer that took less than [`STALL_MIN_PROGRESS`] for this long while bytes waited
    /// for it ends the copy ([`CopyEnd::Stalled`]); seen within half as long again.
    pub stall: Option<Duration>,
    /// However busy, the copy ends at this instant as if cancelled ([`CopyEnd::Cancelled`]):
    /// a connection's `max_duration`. Watched by the same timer as the other two, so a
    /// connection's task carries one timer, not two.
    pub ends_at: Option<Instant>,
}

impl From<Duration> for CopyTimeouts {
    /// An inactivity timeout alone.
    fn from(inactivity: Duration) -> Self {
        Self { inactivity, stall: None, ends_at: None }
    }
}

/// How a copy ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both directions reached EOF and were shut down.
    Finished,
    /// No byte moved in either direction for the inactivity timeout.
    IdleTimeout,
    /// The caller's cancellation fired (shutdown), or [`CopyTimeouts::ends_at`] came.
    Cancelled,
    /// The writer towards `side` took too little for the stall timeout while bytes waited, or
    /// it blocked when the buffer budget's ceiling left no room for its stream's charge.
    Stalled {
        /// The side that stopped taking bytes.
        side: Side,
    },
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
    timeouts: impl Into<CopyTimeouts>,
    buffer_size: usize,
    cancel: C,
) -> CopyReport
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: Future<Output = ()>,
{
    let counts = ByteCounts::default();
    copy_bidirectional_counted(socket, tunnel, timeouts, buffer_size, cancel, &counts, None).await
}

/// [`copy_bidirectional_metered`], adding every byte read to `counts` as it moves, so others
/// (the admin API, metrics) can watch a connection grow. The report's byte counts are the
/// totals in `counts` when the copy ended, including whatever they held before it began.
///
/// `charge` is the stream's charge on its buffer budget, taken when the stream was admitted
/// ([`BufferBudget::admit_stream`]): it stays taken while the socket does not take what the
/// tunnel delivers (the tunnel stream then holds up to a window, [`STALLED_STREAM_COST`]),
/// and until the new stream has shown that it keeps up (it drained after blocking, or was
/// idle for a moment); then it is given back, until the socket blocks again — and if the
/// budget's ceiling has no room for it then, the copy ends at once ([`CopyEnd::Stalled`]
/// towards the socket). While the tunnel
/// does not take what the socket delivers, the budget is charged the copy's buffer alone (the
/// socket's kernel buffer holds the rest).
///
/// Not an `async fn`: an `async fn` keeps each argument twice in its future (the argument, and
/// the local it is moved into), and this future is part of every connection's task for its
/// whole life. For the same reason `cancel` is best passed pinned (`pin!(…)` in the caller, an
/// 8-byte `Pin<&mut _>` here) when it is more than a few bytes.
pub fn copy_bidirectional_counted<'a, S, T, C>(
    socket: &'a mut S,
    tunnel: &'a mut T,
    timeouts: impl Into<CopyTimeouts>,
    buffer_size: usize,
    cancel: C,
    counts: &'a ByteCounts,
    charge: Option<&'a BudgetCharge<'a>>,
) -> impl Future<Output = CopyReport> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: Future<Output = ()> + 'a,
{
    let timeouts = timeouts.into();
    async move {
        let activity = ActivityClock::new();
        let own_buffer = buffer_size.clamp(1, MAX_READ) as u64;
        let budget = charge.and_then(BudgetCharge::budget);
        let to_tunnel = StallMeter::new(MeterCharge::Own(BudgetCharge::new(budget, own_buffer)));
        let to_socket = match charge {
            Some(charge) => StallMeter::on_probation(charge),
            None => StallMeter::new(MeterCharge::Own(BudgetCharge::new(None, 0))),
        };
        let socket_meter =
            SideMeter { bytes: &counts.socket_to_tunnel, failed: AtomicBool::new(false) };
        let tunnel_meter =
            SideMeter { bytes: &counts.tunnel_to_socket, failed: AtomicBool::new(false) };
        let mut socket_side = Metered { inner: socket, meter: &socket_meter, clock: &activity };
        let mut tunnel_side = Metered { inner: tunnel, meter: &tunnel_meter, clock: &activity };

        let end = tokio::select! {
            result = copy_both_ways(&mut socket_side, &mut tunnel_side, buffer_size, [&to_tunnel, &to_socket], &activity) => match result {
                Ok(()) => CopyEnd::Finished,
                // Blocked when the budget's ceiling had no room for its charge: cut as stalled.
                Err(_) if to_socket.over_ceiling() => CopyEnd::Stalled { side: Side::Socket },
                Err(error) => {
                    // The side that saw an error first is the one that failed; if neither recorded
                    // one (cannot happen with these wrappers), blame the tunnel.
                    let side = if socket_meter.failed.load(Ordering::Relaxed) { Side::Socket } else { Side::Tunnel };
                    CopyEnd::Failed { side, error }
                }
            },
            end = watchdog(&activity, &timeouts, [&to_tunnel, &to_socket], &counts.tunnel_to_socket) => end,
            () = cancel => CopyEnd::Cancelled,
        };
        let (socket_to_tunnel, tunnel_to_socket) = counts.get();
        CopyReport { socket_to_tunnel, tunnel_to_socket, end }
    }
}

/// Bytes moved each way by one connection, readable while it runs.
#[derive(Debug, Default)]
pub struct ByteCounts {
    socket_to_tunnel: AtomicU64,
    tunnel_to_socket: AtomicU64,
}

impl ByteCounts {
    /// Bytes read from the socket and from the tunnel, so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.socket_to_tunnel.load(Ordering::Relaxed),
            self.tunnel_to_socket.load(Ordering::Relaxed),
        )
    }

    /// Counts bytes that went from the socket into the tunnel outside the copy loop (the
    /// relay's early data, sent with the open header).
    pub fn add_socket_to_tunnel(&self, bytes: u64) {
        self.socket_to_tunnel.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts bytes that went from the tunnel to the socket outside the copy loop.
    pub fn add_tunnel_to_socket(&self, bytes: u64) {
        self.tunnel_to_socket.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Copies a→b and b→a until both have reached EOF and shut their writer down, or one fails;
/// `stalls` are the meters of a→b and b→a.
fn copy_both_ways<'a, A, B>(
    a: &'a mut A,
    b: &'a mut B,
    max_read: usize,
    stalls: [&'a StallMeter<'a>; 2],
    clock: &'a ActivityClock,
) -> impl Future<Output = io::Result<()>> + 'a
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // A `poll_fn` rather than an `async fn`: it holds the two directions and the two sides
    // once, with nothing else (see `copy_bidirectional_counted` on sizes).
    let max_read = max_read.clamp(1, MAX_READ);
    let mut a_to_b = OneWay::new(max_read, stalls[0], clock);
    let mut b_to_a = OneWay::new(max_read, stalls[1], clock);
    poll_fn(move |cx| {
        let a_to_b_done = a_to_b.poll(cx, &mut *a, &mut *b)?.is_ready();
        let b_to_a_done = b_to_a.poll(cx, &mut *b, &mut *a)?.is_ready();
        if a_to_b_done && b_to_a_done { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
}

/// One direction of the copy.
#[derive(Debug)]
struct OneWay<'a> {
    /// Largest single read.
    max_read: usize,
    /// A heap buffer, taken when the writer first could not keep up and kept while bytes keep
    /// arriving (from then on the loop is tokio's); freed once it is drained and the reader
    /// has nothing more.
    buf: Option<Box<[u8]>>,
    /// Start of the bytes in `buf` not yet written.
    pos: usize,
    /// End of the bytes in `buf`.
    cap: usize,
    /// The reader reached EOF.
    read_done: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    /// The writer has been shut down after EOF.
    done: bool,
    /// Whether the writer keeps up with what waits for it.
    stall: &'a StallMeter<'a>,
    clock: &'a ActivityClock,
}

impl<'a> OneWay<'a> {
    fn new(max_read: usize, stall: &'a StallMeter<'a>, clock: &'a ActivityClock) -> Self {
        Self {
            max_read,
            buf: None,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
            stall,
            clock,
        }
    }

    /// Moves bytes until the reader or the writer is not ready (Pending) or this direction
    /// is finished (EOF passed on as shutdown).
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Each round consumes tokio's cooperative budget, so a connection that is always
            // ready yields to the scheduler instead of starving the others on its worker.
            let coop = ready!(tokio::task::coop::poll_proceed(cx));
            if self.buf.is_some() {
                ready!(self.poll_buffered(cx, reader, writer))?;
                coop.made_progress();
                continue;
            }
            if self.read_done {
                ready!(self.poll_flush_written(cx, writer))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // No buffer: read onto the stack and hand the bytes straight to the writer.
            let mut stack = [MaybeUninit::<u8>::uninit(); MAX_READ];
            let mut read = ReadBuf::uninit(&mut stack[..self.max_read]);
            match read_some(cx, reader, &mut read) {
                Poll::Ready(Ok(())) => coop.made_progress(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read for now: push out what was written (as tokio does).
                    ready!(self.poll_flush_written(cx, writer))?;
                    return Poll::Pending;
                }
            }
            let read = read.filled();
            if read.is_empty() {
                self.read_done = true;
                continue;
            }
            let mut sent = 0;
            while sent < read.len() {
                match poll_write_some(cx, writer, &read[sent..]) {
                    Poll::Ready(Ok(n)) => {
                        sent += n;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The writer is full (and will wake us): keep the rest on the heap.
                        let rest = &read[sent..];
                        let mut buf = vec![0u8; self.max_read].into_boxed_slice();
                        buf[..rest.len()].copy_from_slice(rest);
                        (self.buf, self.pos, self.cap) = (Some(buf), 0, rest.len());
                        self.stall.blocked(self.clock)?;
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// One round of tokio's buffered copy: top the buffer up while the reader has bytes, write
    /// what it holds. Ready once the buffer is free again (drained, reader idle or at EOF).
    fn poll_buffered<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let Some(buf) = self.buf.as_mut() else { return Poll::Ready(Ok(())) };
        let mut reader_idle = self.read_done;
        if !self.read_done && self.cap < buf.len() {
            let mut read = ReadBuf::new(&mut buf[self.cap..]);
            match read_some(cx, reader, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => self.read_done = true,
                Poll::Ready(Ok(())) => self.cap += read.filled().len(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => reader_idle = true,
            }
        }
        while self.pos < self.cap {
            let Poll::Ready(written) = poll_write_some(cx, writer, &buf[self.pos..self.cap]) else {
                self.stall.blocked(self.clock)?;
                return Poll::Pending;
            };
            let n = written?;
            self.pos += n;
            self.need_flush = true;
            self.stall.wrote(n, self.clock);
        }
        (self.pos, self.cap) = (0, 0);
        self.stall.drained();
        if reader_idle || self.read_done {
            // Drained and nothing more to read right now: an idle direction holds no buffer.
            self.buf = None;
            if !self.read_done {
                ready!(self.poll_flush_written(cx, writer))?;
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Flushes the writer if bytes were written since the last flush.
    fn poll_flush_written<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.need_flush {
            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Ready(Ok(()))
    }
}

fn read_some<R: AsyncRead + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    reader: &mut R,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        match Pin::new(&mut *reader).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn poll_write_some<W: AsyncWrite + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    writer: &mut W,
    bytes: &[u8],
) -> Poll<io::Result<usize>> {
    loop {
        match Pin::new(&mut *writer).poll_write(cx, bytes) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the writer accepted no bytes",
                )));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio::time::Instant;

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

    #[tokio::test]
    async fn bytes_held_back_by_a_slow_writer_arrive_intact_and_in_order() {
        // 1 KiB pipes and 512-byte reads: nearly every write is partial and the rest waits in
        // the backlog; both directions at once, checked byte for byte.
        run_both_orders(|a, b, copy| async move {
            let payload =
                |seed: u8| (0..200_000u32).map(|i| i.to_le_bytes()[0] ^ seed).collect::<Vec<u8>>();
            let (from_a, from_b) = (payload(0x5a), payload(0xa5));
            let pump = |mut end: DuplexStream, out: Vec<u8>| async move {
                let (mut rd, mut wr) = tokio::io::split(&mut end);
                let send = async {
                    wr.write_all(&out).await.expect("write");
                    wr.shutdown().await.expect("shutdown");
                };
                let mut got = Vec::new();
                let receive = rd.read_to_end(&mut got);
                let ((), received) = tokio::join!(send, receive);
                received.expect("read");
                got
            };
            let (at_b, at_a) = tokio::join!(pump(a, from_a.clone()), pump(b, from_b.clone()));
            assert!(at_b == from_b && at_a == from_a, "bytes changed on the way");
            let report = copy.await.expect("join");
            assert!(matches!(report.end, CopyEnd::Finished), "{:?}", report.end);
            assert_eq!(report.socket_to_tunnel + report.tunnel_to_socket, 400_000);
        })
        .await;
    }

    /// A stream whose writes always succeed at once and whose reads either never end (an
    /// always-ready connection) or fail with a reset.
    enum Scripted {
        AlwaysReady,
        Resetting,
    }
    use Scripted::{AlwaysReady, Resetting};

    impl AsyncRead for Scripted {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match *self {
                AlwaysReady => {
                    let n = buf.remaining();
                    buf.initialize_unfilled();
                    buf.advance(n);
                    Poll::Ready(Ok(()))
                }
                Resetting => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    impl AsyncWrite for Scripted {
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

    #[test]
    fn an_always_ready_connection_yields_to_the_scheduler() {
        // If the copy never returned Pending, the other branch of this biased select would
        // never be polled and its thread would spin forever; the receive timeout catches that.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let yielded = runtime.block_on(async {
                let (mut a, mut b) = (AlwaysReady, AlwaysReady);
                tokio::select! {
                    biased;
                    _ = copy_bidirectional_metered(&mut a, &mut b, LONG, 512, pending()) => false,
                    () = tokio::task::yield_now() => true,
                }
            });
            let _ = tx.send(yielded);
        });
        let yielded = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(yielded, Ok(true), "the copy loop never yielded");
    }

    #[tokio::test]
    async fn a_direction_takes_a_buffer_only_while_its_writer_lags_and_frees_it_when_idle() {
        let (mut reader, mut reader_far) = duplex(4096);
        let (mut writer, mut writer_far) = duplex(64);
        let charge = MeterCharge::Own(BudgetCharge::new(None, 0));
        let (stall, clock) = (StallMeter::new(charge), ActivityClock::new());
        let mut one_way = OneWay::new(DEFAULT_BUFFER_SIZE, &stall, &clock);
        let poll_once =
            |one_way: &mut OneWay<'_>, reader: &mut DuplexStream, writer: &mut DuplexStream| {
                let waker = std::task::Waker::noop();
                one_way.poll(&mut Context::from_waker(waker), reader, writer)
            };
        // Idle from the start: no buffer.
        assert!(poll_once(&mut one_way, &mut reader, &mut writer).is_pending());
        assert!(one_way.buf.is_none(), "an idle direction holds a buffer");

        // 1,000 bytes into a writer that takes 64 at a time: the rest waits on the heap.
        let payload = vec![7u8; 1000];
        reader_far.write_all(&payload).await.expect("write");
        assert!(poll_once(&mut one_way, &mut reader, &mut writer).is_pending());
        assert!(one_way.buf.is_some(), "bytes the writer could not take were dropped");

        // Drain the far end until everything has arrived (bounded: 1,000 bytes, ≥ 1 per round).
        let mut arrived = Vec::new();
        for _ in 0..1000 {
            let mut chunk = [0u8; 64];
            let n = writer_far.read(&mut chunk).await.expect("read");
            arrived.extend_from_slice(&chunk[..n]);
            if arrived.len() == payload.len() {
                break;
            }
            let _ = poll_once(&mut one_way, &mut reader, &mut writer);
        }
        assert_eq!(arrived, payload);
        // Drained and the reader has nothing more: the buffer is gone again.
        assert!(poll_once(&mut one_way, &mut reader, &mut writer).is_pending());
        assert!(one_way.buf.is_none(), "a drained, idle direction kept its buffer");
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

    #[tokio::test]
    async fn counts_can_be_read_while_the_copy_runs() {
        let (mut socket, mut socket_far) = duplex(1024);
        let (mut tunnel, mut tunnel_far) = duplex(1024);
        let counts = std::sync::Arc::new(ByteCounts::default());
        counts.add_socket_to_tunnel(5); // bytes sent before the copy (the relay's early data)
        let copy = tokio::spawn({
            let counts = std::sync::Arc::clone(&counts);
            async move {
                let (socket, tunnel) = (&mut socket, &mut tunnel);
                copy_bidirectional_counted(socket, tunnel, LONG, 512, pending(), &counts, None)
                    .await
            }
        });
        socket_far.write_all(b"abc").await.expect("write");
        let mut buf = [0u8; 3];
        tunnel_far.read_exact(&mut buf).await.expect("read");
        assert_eq!(counts.get(), (8, 0), "bytes counted before the copy ends");
        tunnel_far.write_all(b"xy").await.expect("write");
        let mut buf = [0u8; 2];
        socket_far.read_exact(&mut buf).await.expect("read");
        assert_eq!(counts.get(), (8, 2));
        drop((socket_far, tunnel_far));
        let report = copy.await.expect("join");
        assert_eq!((report.socket_to_tunnel, report.tunnel_to_socket), (8, 2));
    }

    #[tokio::test]
    async fn a_socket_that_does_not_read_charges_the_budget_until_the_copy_ends() {
        let budget = std::sync::Arc::new(crate::budget::BufferBudget::new(u64::MAX));
        let (mut socket, mut socket_far) = duplex(1024);
        let (mut tunnel, mut tunnel_far) = duplex(64 * 1024);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let copy = tokio::spawn({
            let budget = std::sync::Arc::clone(&budget);
            async move {
                let counts = ByteCounts::default();
                let cancel = async {
                    let _ = stopped.await;
                };
                let charge = budget.charge_stream();
                copy_bidirectional_counted(
                    &mut socket,
                    &mut tunnel,
                    LONG,
                    512,
                    cancel,
                    &counts,
                    Some(&charge),
                )
                .await
            }
        });
        // More than the socket's pipe takes: the copy's writer to the socket blocks.
        tunnel_far.write_all(&[7u8; 8 * 1024]).await.expect("write");
        let charged = crate::budget::STREAM_CHARGE;
        for _ in 0..1_000 {
            if budget.held() == charged {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.held(), charged, "a blocked socket writer is charged a stream window");
        let mut read = vec![0u8; 8 * 1024];
        socket_far.read_exact(&mut read).await.expect("the socket reads again");
        for _ in 0..1_000 {
            if budget.held() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.held(), 0, "the charge goes back once the writer has caught up");
        tunnel_far.write_all(&[7u8; 8 * 1024]).await.expect("write");
        for _ in 0..1_000 {
            if budget.held() == charged {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.held(), charged, "blocked again");
        let _ = stop.send(());
        let report = copy.await.expect("join");
        assert!(matches!(report.end, CopyEnd::Cancelled), "{:?}", report.end);
        assert_eq!(budget.held(), 0, "the charge goes back when the copy ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_stream_is_charged_until_it_idles() {
        let budget = std::sync::Arc::new(crate::budget::BufferBudget::new(u64::MAX));
        let (mut socket, mut socket_far) = duplex(64 * 1024);
        let (mut tunnel, mut tunnel_far) = duplex(64 * 1024);
        let copy = tokio::spawn({
            let budget = std::sync::Arc::clone(&budget);
            async move {
                let counts = ByteCounts::default();
                let charge = budget.charge_stream();
                copy_bidirectional_counted(
                    &mut socket,
                    &mut tunnel,
                    LONG,
                    512,
                    pending(),
                    &counts,
                    Some(&charge),
                )
                .await
            }
        });
        tokio::task::yield_now().await;
        let charged = crate::budget::STREAM_CHARGE;
        assert_eq!(budget.held(), charged, "charged from the start");
        // A request and its answer; then nothing moves.
        tunnel_far.write_all(b"answer").await.expect("write");
        let mut read = [0u8; 6];
        socket_far.read_exact(&mut read).await.expect("read");
        tokio::time::sleep(watch::PROBATION_IDLE / 2).await;
        assert_eq!(budget.held(), charged, "still on probation while it may be busy");
        // Seen by the watchdog within as long again.
        tokio::time::sleep(watch::PROBATION_IDLE * 2).await;
        assert_eq!(budget.held(), 0, "an idle stream holds nothing");
        drop((socket_far, tunnel_far));
        let _ = copy.await.expect("join");
        assert_eq!(budget.held(), 0);
    }

    /// A copy between two duplex pairs with a 30 s stall timeout and no inactivity timeout to
    /// speak of; returns the far ends (the socket's peer, the tunnel's peer) and the copy.
    fn stall_copy() -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<CopyReport>) {
        let (mut socket, socket_far) = duplex(16 * 1024);
        let (mut tunnel, tunnel_far) = duplex(16 * 1024);
        let timeouts =
            CopyTimeouts { inactivity: LONG, stall: Some(Duration::from_secs(30)), ends_at: None };
        let copy = tokio::spawn(async move {
            copy_bidirectional_metered(&mut socket, &mut tunnel, timeouts, 4096, pending()).await
        });
        (socket_far, tunnel_far, copy)
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_that_stops_reading_is_cut_at_the_stall_timeout() {
        let (mut socket_far, mut tunnel_far, copy) = stall_copy();
        let started = Instant::now();
        // The tunnel's peer sends a download the socket's peer never reads, while the socket's
        // peer keeps the other direction busy (so the inactivity timer alone would never fire).
        let pushing = tokio::spawn(async move {
            let chunk = vec![1u8; 1024];
            while tunnel_far.write_all(&chunk).await.is_ok() {}
        });
        let pinging = tokio::spawn(async move {
            while socket_far.write_all(b"ping").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let report = copy.await.expect("copy");
        assert!(matches!(report.end, CopyEnd::Stalled { side: Side::Socket }), "{:?}", report.end);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(30) && took <= Duration::from_secs(46), "{took:?}");
        pushing.abort();
        pinging.abort();
    }

    /// A copy whose stream was admitted on `budget` (charged on probation), with a 30 s stall
    /// timeout: the socket's and the tunnel's far ends, and the copy.
    fn budgeted_copy(
        budget: &std::sync::Arc<crate::budget::BufferBudget>,
    ) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<CopyReport>) {
        let (mut socket, socket_far) = duplex(16 * 1024);
        let (mut tunnel, tunnel_far) = duplex(16 * 1024);
        let timeouts =
            CopyTimeouts { inactivity: LONG, stall: Some(Duration::from_secs(30)), ends_at: None };
        let budget = std::sync::Arc::clone(budget);
        let copy = tokio::spawn(async move {
            let charge = budget.charge_stream();
            let counts = ByteCounts::default();
            let (socket, tunnel) = (&mut socket, &mut tunnel);
            let copy = copy_bidirectional_counted(
                socket,
                tunnel,
                timeouts,
                4096,
                pending(),
                &counts,
                Some(&charge),
            );
            copy.await
        });
        (socket_far, tunnel_far, copy)
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_budget_a_receiver_that_stops_reading_is_cut_sooner() {
        // Spent: the stream was let in before (while it idled, say) and stalls only now.
        let budget = std::sync::Arc::new(crate::budget::BufferBudget::new(0));
        let (_socket_far, mut tunnel_far, copy) = budgeted_copy(&budget);
        let started = Instant::now();
        let pushing = tokio::spawn(async move {
            let chunk = vec![1u8; 1024];
            while tunnel_far.write_all(&chunk).await.is_ok() {}
        });
        let report = copy.await.expect("copy");
        assert!(matches!(report.end, CopyEnd::Stalled { side: Side::Socket }), "{:?}", report.end);
        let took = started.elapsed();
        let pressure = watch::PRESSURE_STALL;
        assert!(took >= pressure && took <= pressure * 2, "{took:?}: not the 30 s configured");
        pushing.abort();
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_let_in_while_idle_is_cut_when_it_backs_up_at_the_ceiling() {
        use crate::budget::{BudgetCharge, BufferBudget, STREAM_CHARGE};
        // Others hold the budget past its limit: at the ceiling (no room for one more stream's
        // window), and a stream's charge short of it.
        for (others_hold, cut_at_once) in [(80 << 20, true), (64 << 20, false)] {
            let budget = std::sync::Arc::new(BufferBudget::new(64 << 20));
            assert_eq!(budget.ceiling(), 80 << 20);
            let others = BudgetCharge::new(Some(&*budget), others_hold);
            others.take();
            // Admitted while there was room; its probation charge goes back as it idles.
            let (_socket_far, mut tunnel_far, copy) = budgeted_copy(&budget);
            tokio::time::sleep(watch::PROBATION_IDLE * 2).await;
            assert_eq!(budget.held(), others_hold, "its probation charge went back as it idled");
            // Now the download comes, and the socket's peer reads none of it.
            let started = Instant::now();
            let pushing = tokio::spawn(async move {
                let chunk = vec![1u8; 1024];
                while tunnel_far.write_all(&chunk).await.is_ok() {}
            });
            let report = copy.await.expect("copy");
            assert!(
                matches!(report.end, CopyEnd::Stalled { side: Side::Socket }),
                "{:?}",
                report.end
            );
            let took = started.elapsed();
            if cut_at_once {
                assert!(took < Duration::from_millis(100), "{took:?}: cut the moment it blocked");
            } else {
                // Charged past the limit (nothing open is disturbed), then cut at the shorter
                // stall timeout of a spent budget.
                let pressure = watch::PRESSURE_STALL;
                assert!(took >= pressure && took <= pressure * 2, "{took:?}");
            }
            assert!(budget.held() <= budget.ceiling());
            pushing.abort();
            assert_eq!(budget.held(), others_hold, "its charge, if taken, is back");
            assert!(others_hold + STREAM_CHARGE > budget.ceiling() || !cut_at_once);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_reader_is_cut_and_a_slow_steady_one_is_not() {
        // A byte a second: far below STALL_MIN_PROGRESS per timeout.
        for (every, take, stalls) in
            [(Duration::from_secs(1), 1, true), (Duration::from_secs(5), 8192, false)]
        {
            let (mut socket_far, mut tunnel_far, copy) = stall_copy();
            let total = 512 * 1024;
            let pushing = tokio::spawn(async move {
                let chunk = vec![2u8; 1024];
                for _ in 0..total / 1024 {
                    if tunnel_far.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = tunnel_far.shutdown().await;
                // Keep the tunnel's peer open until the copy ends.
                let mut rest = Vec::new();
                let _ = tunnel_far.read_to_end(&mut rest).await;
            });
            let reading = tokio::spawn(async move {
                let mut got = 0;
                let mut buf = vec![0u8; take];
                while got < total {
                    tokio::time::sleep(every).await;
                    match socket_far.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                drop(socket_far);
                got
            });
            let report = copy.await.expect("copy");
            if stalls {
                assert!(
                    matches!(report.end, CopyEnd::Stalled { side: Side::Socket }),
                    "{:?}",
                    report.end
                );
            } else {
                assert!(!matches!(report.end, CopyEnd::Stalled { .. }), "{:?}", report.end);
                assert_eq!(reading.await.expect("reader"), total, "a slow reader gets it all");
            }
            pushing.abort();
        }
    }
}
