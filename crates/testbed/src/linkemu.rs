//! A userspace WAN link emulator. This kernel has neither netem nor dummy interfaces, so a
//! slow, lossy path is made in userspace: two TUN interfaces (one per end, each later moved
//! into its own network namespace) and a forwarder that reads every IP packet from one and
//! writes it, unchanged, to the other — after a one-way delay with optional jitter, through a
//! bandwidth cap with a bounded queue (tail drop), or not at all with the configured loss
//! probability. QUIC and TCP both see a real path: nothing is parsed or rewritten.
//!
//! Packets keep their order (jitter never reorders, like a single path). Each direction is
//! scheduled independently; the profile can be changed while traffic flows.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_tun::Tun;
use tokio_util::sync::CancellationToken;

/// How the link treats packets in each direction.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkProfile {
    /// Added to every packet, each way.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ± this (never below zero, never reordering).
    pub jitter: Duration,
    /// Probability in [0, 1] that a packet is dropped (independently per packet).
    pub loss: f64,
    /// Bandwidth cap in bits per second, each way; `None` forwards as fast as the machine can.
    pub rate_bps: Option<u64>,
    /// With a cap: bytes that may wait for the link before new packets are tail-dropped.
    pub queue_bytes: usize,
}

impl Default for LinkProfile {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_bytes: 1 << 20,
        }
    }
}

impl LinkProfile {
    /// A link that delays each packet by `delay` one way and drops `loss` of them.
    pub fn wan(delay: Duration, loss: f64) -> Self {
        Self { delay, loss, ..Self::default() }
    }
}

/// Packet counters of one direction.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Packets written to the far end.
    pub forwarded: AtomicU64,
    /// Packets dropped by the loss model.
    pub lost: AtomicU64,
    /// Packets tail-dropped because the bandwidth cap's queue was full.
    pub queue_dropped: AtomicU64,
    /// Packets the far end refused (interface down, namespace gone).
    pub write_failed: AtomicU64,
}

impl LinkStats {
    /// (forwarded, lost, queue-dropped, write-failed) now.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.forwarded.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.queue_dropped.load(Ordering::Relaxed),
            self.write_failed.load(Ordering::Relaxed),
        )
    }

    /// The forwarded count once it reaches `expected`, or whatever it is after `within`.
    ///
    /// A packet is counted just after the emulator's write returns, and by then the far end may
    /// already have read it: a test that has seen its last reply waits here for the count to
    /// catch up instead of reading it a moment too early.
    pub fn forwarded_once(&self, expected: u64, within: Duration) -> u64 {
        let deadline = std::time::Instant::now() + within;
        loop {
            let forwarded = self.forwarded.load(Ordering::Relaxed);
            if forwarded >= expected || std::time::Instant::now() >= deadline {
                return forwarded;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A running emulated link between two TUN interfaces; stops (and removes both interfaces)
/// when dropped.
#[derive(Debug)]
pub struct LinkEmulator {
    names: [String; 2],
    profile: watch::Sender<LinkProfile>,
    stats: [Arc<LinkStats>; 2],
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Largest packet a TUN interface hands over (its MTU is 1500; this leaves room for any).
const MAX_PACKET: usize = 65_535;

impl LinkEmulator {
    /// Creates TUN interfaces `a` and `b` in the calling thread's network namespace and starts
    /// forwarding between them on a thread of its own. The interfaces are down and unaddressed:
    /// move them into namespaces and configure them there (see [`crate::Topology`]).
    /// `seed` makes the loss and jitter sequence repeatable.
    pub fn start(a: &str, b: &str, profile: LinkProfile, seed: u64) -> io::Result<Self> {
        let (profile_tx, profile_rx) = watch::channel(profile);
        let stats = [Arc::new(LinkStats::default()), Arc::new(LinkStats::default())];
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel::<io::Result<()>>();
        let names = [a.to_owned(), b.to_owned()];
        let thread = {
            let (names, stats, stop) = (names.clone(), stats.clone(), stop.clone());
            std::thread::Builder::new().name(format!("linkemu-{a}")).spawn(move || {
                let runtime =
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                runtime.block_on(async move {
                    let open = |name: &str| -> io::Result<Arc<Tun>> {
                        let tun =
                            Tun::builder().name(name).mtu(1500).build().map_err(|e| {
                                io::Error::other(format!("TUN interface {name}: {e}"))
                            })?;
                        tun.into_iter()
                            .next()
                            .map(Arc::new)
                            .ok_or_else(|| io::Error::other("no TUN queue"))
                    };
                    let (tun_a, tun_b) = match (open(&names[0]), open(&names[1])) {
                        (Ok(a), Ok(b)) => (a, b),
                        (Err(e), _) | (_, Err(e)) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let a_to_b = carry(
                        tun_a.clone(),
                        tun_b.clone(),
                        profile_rx.clone(),
                        stats[0].clone(),
                        fastrand::Rng::with_seed(seed),
                    );
                    let b_to_a = carry(
                        tun_b,
                        tun_a,
                        profile_rx,
                        stats[1].clone(),
                        fastrand::Rng::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15),
                    );
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = a_to_b => {}
                        () = b_to_a => {}
                    }
                });
            })?
        };
        match ready_rx.blocking_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("link emulator thread ended during start")),
        }
        Ok(Self { names, profile: profile_tx, stats, stop, thread: Some(thread) })
    }

    /// The two interface names, `a` then `b`.
    pub fn interfaces(&self) -> (&str, &str) {
        (&self.names[0], &self.names[1])
    }

    /// Applies a new profile to packets arriving from now on.
    pub fn set_profile(&self, profile: LinkProfile) {
        self.profile.send_replace(profile);
    }

    /// Counters of the a → b direction.
    pub fn a_to_b(&self) -> &LinkStats {
        &self.stats[0]
    }

    /// Counters of the b → a direction.
    pub fn b_to_a(&self) -> &LinkStats {
        &self.stats[1]
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A packet on its way: when it leaves the link, and its bytes.
struct InFlight {
    due: Instant,
    packet: Vec<u8>,
}

/// One direction: reads packets from `from`, applies the profile, writes them to `to` when due.
async fn carry(
    from: Arc<Tun>,
    to: Arc<Tun>,
    profile: watch::Receiver<LinkProfile>,
    stats: Arc<LinkStats>,
    mut rng: fastrand::Rng,
) {
    let mut line: VecDeque<InFlight> = VecDeque::new();
    let mut buf = vec![0u8; MAX_PACKET];
    // When the capped link has finished serialising what it accepted so far.
    let mut link_free_at = Instant::now();
    let mut last_due = Instant::now();
    loop {
        let next_due = line.front().map(|p| p.due);
        tokio::select! {
            biased;
            () = sleep_until_opt(next_due) => {
                let now = Instant::now();
                while line.front().is_some_and(|p| p.due <= now) {
                    let Some(p) = line.pop_front() else { break };
                    match to.send(&p.packet).await {
                        Ok(_) => stats.forwarded.fetch_add(1, Ordering::Relaxed),
                        Err(_) => stats.write_failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
            read = from.recv(&mut buf) => {
                let Ok(n) = read else {
                    // The interface went away (namespace deleted): this direction is over.
                    return;
                };
                let now = Instant::now();
                let p = profile.borrow().clone();
                if p.loss > 0.0 && rng.f64() < p.loss {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut leaves = now;
                if let Some(rate) = p.rate_bps.filter(|r| *r > 0) {
                    let start = link_free_at.max(now);
                    let waiting = start.saturating_duration_since(now);
                    let queued_bytes = waiting.as_secs_f64() * rate as f64 / 8.0;
                    if queued_bytes > p.queue_bytes as f64 {
                        stats.queue_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    link_free_at = start + Duration::from_secs_f64(n as f64 * 8.0 / rate as f64);
                    leaves = link_free_at;
                }
                let mut delay = p.delay;
                if !p.jitter.is_zero() {
                    let spread = p.jitter.as_secs_f64() * (rng.f64() * 2.0 - 1.0);
                    delay = Duration::from_secs_f64((delay.as_secs_f64() + spread).max(0.0));
                }
                // Never reorder: a packet leaves no earlier than the one before it.
                let due = (leaves + delay).max(last_due);
                last_due = due;
                if due <= now && line.is_empty() {
                    match to.send(&buf[..n]).await {
                        Ok(_) => stats.forwarded.fetch_add(1, Ordering::Relaxed),
                        Err(_) => stats.write_failed.fetch_add(1, Ordering::Relaxed),
                    };
                } else {
                    line.push_back(InFlight { due, packet: buf[..n].to_vec() });
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_profile_sets_delay_and_loss_only() {
        let p = LinkProfile::wan(Duration::from_millis(25), 0.005);
        assert_eq!(p.delay, Duration::from_millis(25));
        assert!((p.loss - 0.005).abs() < f64::EPSILON);
        assert_eq!(p.rate_bps, None);
        assert!(p.jitter.is_zero());
    }
}
