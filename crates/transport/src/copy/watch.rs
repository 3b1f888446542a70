//! What watches a copy from outside its loop: the clock of the last byte moved
//! ([`ActivityClock`]), each direction's [`StallMeter`], the [`watchdog`] that ends the copy on
//! the inactivity or the stall timeout or at the copy's end time, and the [`Metered`] wrapper that counts each side's
//! bytes, stamps the clock and remembers which side failed first.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::{CopyEnd, CopyTimeouts, STALL_MIN_PROGRESS, Side};
use crate::budget::BudgetCharge;

/// Ends the copy when no byte has moved for the inactivity timeout, when its end time
/// ([`CopyTimeouts::ends_at`]) comes, or when a direction's
/// writer is stalled (see [`CopyTimeouts::stall`]); ends a new stream's probation once it has
/// delivered nothing for [`PROBATION_IDLE`]. `to_tunnel` meters the socket→tunnel direction,
/// `to_socket` the other, whose bytes read so far are `delivered`.
///
/// Not an `async fn`, which would keep its arguments twice (see
/// [`super::copy_bidirectional_counted`]).
#[expect(clippy::manual_async_fn, reason = "an `async fn` keeps each argument twice in its future")]
pub(super) fn watchdog<'a>(
    clock: &'a ActivityClock,
    timeouts: &'a CopyTimeouts,
    [to_tunnel, to_socket]: [&'a StallMeter<'a>; 2],
    delivered: &'a AtomicU64,
) -> impl Future<Output = CopyEnd> + 'a {
    async move {
        loop {
            let now = Instant::now();
            let idle_at = clock.last() + timeouts.inactivity;
            if now >= idle_at {
                return CopyEnd::IdleTimeout;
            }
            let mut wake = idle_at;
            if let Some(ends_at) = timeouts.ends_at {
                if now >= ends_at {
                    return CopyEnd::Cancelled;
                }
                wake = wake.min(ends_at);
            }
            if let Some(ends) = to_socket.probation_ends(clock, delivered.load(Ordering::Relaxed)) {
                if now >= ends {
                    to_socket.end_probation();
                } else {
                    wake = wake.min(ends);
                }
            }
            if let Some(stall) = timeouts.stall {
                // Over the budget, a stream that holds a window without taking from it gets
                // less patience: streams admitted while idle that back up later are charged
                // past the limit (up to the ceiling), and should not hold that for the whole
                // timeout.
                let stall = if to_socket.charge.budget().is_some_and(|b| !b.has_room()) {
                    stall.min(PRESSURE_STALL)
                } else {
                    stall
                };
                for (meter, side) in [(to_tunnel, Side::Tunnel), (to_socket, Side::Socket)] {
                    if let Some(since) = meter.blocked_since(clock) {
                        let stalled_at = since + stall;
                        if now >= stalled_at {
                            return CopyEnd::Stalled { side };
                        }
                        wake = wake.min(stalled_at);
                    }
                }
                // A writer that blocks while this sleeps is seen within half the timeout.
                wake = wake.min(now + stall / 2);
            }
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Whether one direction's writer is keeping up: since when bytes have been waiting for it
/// without it taking [`STALL_MIN_PROGRESS`] of them. While it is blocked, its direction is
/// charged on the process's buffer budget.
#[derive(Debug)]
pub(super) struct StallMeter<'a> {
    /// Milliseconds on the copy's clock since which it has been blocked, or [`NOT_BLOCKED`].
    blocked_since_ms: AtomicU64,
    /// Bytes it took since then.
    progress: AtomicU64,
    /// What its direction holds while blocked.
    charge: MeterCharge<'a>,
    /// Charged from the start, until the direction has drained after blocking or been idle
    /// for [`PROBATION_IDLE`]: see [`StallMeter::on_probation`].
    probation: AtomicBool,
    /// The direction's bytes when the probation's idle period began, and when that was (ms
    /// on the copy's clock).
    probation_mark: (AtomicU64, AtomicU64),
    /// Whether blocking when the charge would pass the budget's ceiling ends the copy (a
    /// stream's window: see [`BudgetCharge::try_take`]); else it is charged regardless (the
    /// copy's own buffer alone).
    bounded_by_ceiling: bool,
    /// It blocked when its charge would have passed the ceiling: the copy is to be cut.
    over_ceiling: AtomicBool,
}

/// The error that ends a copy whose writer blocked when the budget's ceiling left no room for
/// its charge.
#[derive(Debug, thiserror::Error)]
#[error("the receiver stopped keeping up with the buffer budget at its ceiling")]
pub(super) struct OverCeiling;

/// A meter's charge: its own, or the stream's, which its owner took when it admitted the
/// stream.
#[derive(Debug)]
pub(super) enum MeterCharge<'a> {
    Own(BudgetCharge<'a>),
    Stream(&'a BudgetCharge<'a>),
}

impl<'a> std::ops::Deref for MeterCharge<'a> {
    type Target = BudgetCharge<'a>;

    fn deref(&self) -> &Self::Target {
        match self {
            Self::Own(charge) => charge,
            Self::Stream(charge) => charge,
        }
    }
}

/// The stall timeout while the budget is spent (when the configured one is longer).
pub(super) const PRESSURE_STALL: Duration = Duration::from_secs(5);

/// How long a new stream's direction must be idle before its probation charge is given back.
/// Short, because every stream on probation holds a whole charge: at 250 ms the benchmark's
/// 5,000 connections opened one after another (each one 64-byte round trip, then idle; about
/// 2,500 a second) had more than 600 on probation at once and were refused past a 4 GiB
/// budget's endpoint share. Safe, because a stream released early that backs up later is
/// charged again, and never past the budget's ceiling.
pub(super) const PROBATION_IDLE: Duration = Duration::from_millis(100);

/// [`StallMeter::blocked_since_ms`] of a writer that has nothing waiting.
const NOT_BLOCKED: u64 = u64::MAX;

impl<'a> StallMeter<'a> {
    /// A writer that is keeping up, charged `charge` while it is not.
    pub(super) fn new(charge: MeterCharge<'a>) -> Self {
        Self {
            blocked_since_ms: AtomicU64::new(NOT_BLOCKED),
            progress: AtomicU64::new(0),
            charge,
            probation: AtomicBool::new(false),
            probation_mark: (AtomicU64::new(0), AtomicU64::new(0)),
            bounded_by_ceiling: false,
            over_ceiling: AtomicBool::new(false),
        }
    }

    /// A new stream's direction, charged from the start as if blocked (its owner took
    /// `charge` when it admitted the stream): until it has shown that it drains (it blocked
    /// and caught up again) or idles, nothing says its receiver keeps up, and a burst of new
    /// streams whose receivers never read would otherwise all be admitted before the first of
    /// them backed up far enough to be charged.
    ///
    /// Once off probation, a charge that would pass the budget's ceiling when the writer blocks
    /// again ends the copy instead ([`StallMeter::blocked`]).
    pub(super) fn on_probation(charge: &'a BudgetCharge<'a>) -> Self {
        let mut meter = Self::new(MeterCharge::Stream(charge));
        meter.bounded_by_ceiling = true;
        meter.charge.take();
        meter.probation.store(true, Ordering::Relaxed);
        meter
    }

    /// When the probation charge goes back if the direction delivers nothing before:
    /// [`PROBATION_IDLE`] after its count was last seen to change from `delivered` (`None`:
    /// not on probation, or blocked — then the charge stays). Judged on this direction alone:
    /// an upload keeps the other one busy, and holds nothing here.
    fn probation_ends(&self, clock: &ActivityClock, delivered: u64) -> Option<Instant> {
        let blocked = self.blocked_since_ms.load(Ordering::Relaxed) != NOT_BLOCKED;
        if !self.probation.load(Ordering::Relaxed) || blocked {
            return None;
        }
        let (mark, since_ms) = &self.probation_mark;
        if mark.swap(delivered, Ordering::Relaxed) != delivered {
            since_ms.store(clock.now_ms(), Ordering::Relaxed);
        }
        Some(clock.start + Duration::from_millis(since_ms.load(Ordering::Relaxed)) + PROBATION_IDLE)
    }

    fn end_probation(&self) {
        if self.probation.swap(false, Ordering::Relaxed) {
            self.charge.give_back();
        }
    }

    /// The writer could not take bytes that wait for it (the window starts unless running).
    /// An error: its charge would pass the budget's ceiling, and the copy must end.
    pub(super) fn blocked(&self, clock: &ActivityClock) -> io::Result<()> {
        if self.blocked_since_ms.load(Ordering::Relaxed) == NOT_BLOCKED {
            self.progress.store(0, Ordering::Relaxed);
            self.blocked_since_ms.store(clock.now_ms(), Ordering::Relaxed);
            if !self.bounded_by_ceiling {
                self.charge.take();
            } else if !self.charge.try_take() {
                self.over_ceiling.store(true, Ordering::Relaxed);
                return Err(io::Error::other(OverCeiling));
            }
        }
        Ok(())
    }

    /// Whether it blocked when its charge would have passed the budget's ceiling.
    pub(super) fn over_ceiling(&self) -> bool {
        self.over_ceiling.load(Ordering::Relaxed)
    }

    /// The writer took `n` bytes while blocked: enough of them start a new window.
    pub(super) fn wrote(&self, n: usize, clock: &ActivityClock) {
        if self.blocked_since_ms.load(Ordering::Relaxed) == NOT_BLOCKED {
            return;
        }
        let progress = self.progress.load(Ordering::Relaxed) + n as u64;
        if progress >= STALL_MIN_PROGRESS {
            self.progress.store(0, Ordering::Relaxed);
            self.blocked_since_ms.store(clock.now_ms(), Ordering::Relaxed);
        } else {
            self.progress.store(progress, Ordering::Relaxed);
        }
    }

    /// Nothing waits for the writer any more.
    pub(super) fn drained(&self) {
        self.blocked_since_ms.store(NOT_BLOCKED, Ordering::Relaxed);
        self.probation.store(false, Ordering::Relaxed);
        self.charge.give_back();
    }

    fn blocked_since(&self, clock: &ActivityClock) -> Option<Instant> {
        match self.blocked_since_ms.load(Ordering::Relaxed) {
            NOT_BLOCKED => None,
            ms => Some(clock.start + Duration::from_millis(ms)),
        }
    }
}

/// Time of the last byte moved, as milliseconds since the copy started.
#[derive(Debug)]
pub(super) struct ActivityClock {
    start: Instant,
    last_ms: AtomicU64,
}

impl ActivityClock {
    pub(super) fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    /// Milliseconds on this clock now.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// When the last byte moved.
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Per-side counters shared between a [`Metered`] wrapper and the report.
#[derive(Debug)]
pub(super) struct SideMeter<'a> {
    pub(super) bytes: &'a AtomicU64,
    pub(super) failed: AtomicBool,
}

/// Passes reads and writes through, counting bytes read, stamping activity and recording
/// the first failure of its side.
#[derive(Debug)]
pub(super) struct Metered<'a, S: ?Sized> {
    pub(super) inner: &'a mut S,
    pub(super) meter: &'a SideMeter<'a>,
    pub(super) clock: &'a ActivityClock,
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
