//! Bounds on the work the relay does for tunnel connections that have not authenticated: from
//! accept until its hello is admitted a connection is *pending*, and pending connections are
//! capped in all and per source ([`PendingCaps`], sized from the open-file limit; IPv6
//! sources counted per /64). An agent that has authenticated holds no pending place, so
//! agents already linked from an address never count against its share. A new connection over a cap is not turned away — that let a flood of
//! silent connections keep a reconnecting agent out for as long as it lasted — but makes room:
//! the oldest pending connection (of its own source, when that source is over its share) is
//! evicted, one that has sent nothing yet before any that has (a real agent's ClientHello
//! comes at once; a silent connection is also cut after the listener's first-byte deadline).
//! So a flood holds neither descriptors nor memory beyond the caps, and an agent that speaks
//! gets in beside it. Once [`RETRY_ABOVE`] connections are pending, a QUIC connection whose
//! source address is not validated yet is sent a Retry first (RFC 9000 §8.1), which a spoofed
//! source cannot answer. Evictions are logged at most once per [`REFUSAL_LOG_INTERVAL`], with
//! how many were left out.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use privlink_transport::listener::FirstBytes;
use privlink_transport::throttle::Throttle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::source::SourceKey;

/// Pending (unauthenticated) tunnel connections the relay holds at most, with the common
/// open-file limit of 8,192 ([`PendingCaps::default`]).
pub const MAX_PENDING: usize = 512;
/// Pending tunnel connections from one source address (one IPv6 /64) at most, likewise. Many
/// agents may share an address (NAT, a Kubernetes node); they each take well under a second
/// to authenticate, so this many at once is far more than they need.
pub const MAX_PENDING_PER_SOURCE: usize = 32;

/// The caps on pending connections: in all and per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCaps {
    /// Pending connections at most.
    pub total: usize,
    /// Pending connections from one source (one IPv6 /64) at most.
    pub per_source: usize,
    /// Pending connections above which QUIC sources must prove their address with a Retry.
    pub retry_above: usize,
}

impl PendingCaps {
    /// The caps of a process allowed `open_files` descriptors: a sixteenth of them (a pending
    /// connection holds one, a client connection two, and the clients must keep the most),
    /// between 64 and 4,096 in all; a sixteenth of that per source, at least 4.
    pub fn for_open_files(open_files: u64) -> Self {
        let total = usize::try_from(open_files / 16).unwrap_or(usize::MAX).clamp(64, 4096);
        Self { total, per_source: (total / 16).max(4), retry_above: total / 8 }
    }
}

impl Default for PendingCaps {
    /// [`MAX_PENDING`] and [`MAX_PENDING_PER_SOURCE`]: the caps for 8,192 open files.
    fn default() -> Self {
        Self { total: MAX_PENDING, per_source: MAX_PENDING_PER_SOURCE, retry_above: RETRY_ABOVE }
    }
}
/// Pending connections above which QUIC sources must prove their address with a Retry, with
/// the default caps (an eighth of the total cap).
pub const RETRY_ABOVE: usize = 64;
/// Longest silence between two "evicted" lines while pending connections keep being evicted.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Which cap a new connection found full (and so evicted an older one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverCap {
    /// The total cap: this many connections are pending.
    #[error("{0} unauthenticated tunnel connections are pending")]
    Total(usize),
    /// The per-source cap: this many connections from this source are pending.
    #[error("{0} unauthenticated tunnel connections from this source are pending")]
    Source(usize),
}

/// The pending-connection counts.
#[derive(Debug)]
pub struct Admission {
    caps: PendingCaps,
    counts: Mutex<Counts>,
    turned_away: AtomicU64,
    refusals: Throttle,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<SourceKey, usize>,
    /// Every pending connection by id, which grows with each admission: oldest first.
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
}

/// One pending connection as the table keeps it.
#[derive(Debug)]
struct Pending {
    source: SourceKey,
    /// Whether the peer has sent its first byte.
    first: Arc<FirstBytes>,
    /// Cancelled to evict it.
    evict: CancellationToken,
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(PendingCaps::default())
    }
}

impl Admission {
    /// Admission under `caps`.
    pub fn new(caps: PendingCaps) -> Self {
        Self {
            caps,
            counts: Mutex::default(),
            turned_away: AtomicU64::new(0),
            refusals: Throttle::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

/// One pending connection; dropping it (the hello admitted, or the connection gone) frees the
/// place. When a newer connection evicts it, [`evicted`](Self::evicted) resolves: its session
/// ends.
#[derive(Debug)]
pub struct PendingSlot {
    admission: Arc<Admission>,
    id: u64,
    evict: CancellationToken,
}

impl PendingSlot {
    /// Resolves when a newer connection evicted this one.
    pub fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.evict.clone().cancelled_owned()
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        // An evicted slot has left the table already.
        self.admission.lock().remove(self.id);
    }
}

impl Counts {
    /// Takes a pending connection out of the table and the counts; `None` if it left already.
    fn remove(&mut self, id: u64) -> Option<Pending> {
        let removed = self.pending.remove(&id)?;
        self.total = self.total.saturating_sub(1);
        if let Some(count) = self.by_source.get_mut(&removed.source) {
            *count -= 1;
            if *count == 0 {
                self.by_source.remove(&removed.source);
            }
        }
        Some(removed)
    }

    /// The connection to evict for a newcomer from `source` over `cap`: the oldest silent one
    /// (of that source, for the per-source cap), else the oldest.
    fn victim(&self, source: SourceKey, cap: OverCap) -> Option<u64> {
        let candidates = || {
            self.pending
                .iter()
                .filter(move |(_, p)| matches!(cap, OverCap::Total(_)) || p.source == source)
        };
        candidates()
            .find(|(_, p)| !p.first.arrived())
            .or_else(|| candidates().next())
            .map(|(id, _)| *id)
    }
}

impl Admission {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Counts only: a poisoned lock still holds usable numbers.
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a pending place for a connection from `source`, evicting an older one when a cap
    /// is full (see the module notes). `first` says whether the peer has sent a byte.
    pub fn admit(self: &Arc<Self>, source: IpAddr, first: Arc<FirstBytes>) -> PendingSlot {
        let key = SourceKey::of(source);
        let mut counts = self.lock();
        let full = if counts.by_source.get(&key).copied().unwrap_or(0) >= self.caps.per_source {
            Some(OverCap::Source(self.caps.per_source))
        } else if counts.total >= self.caps.total {
            Some(OverCap::Total(self.caps.total))
        } else {
            None
        };
        if let Some(cap) = full {
            if let Some(evicted) = counts.victim(key, cap).and_then(|id| counts.remove(id)) {
                evicted.evict.cancel();
                self.record_eviction(source, cap);
            }
        }
        *counts.by_source.entry(key).or_insert(0) += 1;
        counts.total += 1;
        let id = counts.next_id;
        counts.next_id += 1;
        let evict = CancellationToken::new();
        counts.pending.insert(id, Pending { source: key, first, evict: evict.clone() });
        PendingSlot { admission: Arc::clone(self), id, evict }
    }

    /// The caps in force.
    pub fn caps(&self) -> PendingCaps {
        self.caps
    }

    /// Connections pending now.
    pub fn pending(&self) -> usize {
        self.lock().total
    }

    /// Whether QUIC sources should prove their address before a connection is accepted.
    pub fn wants_retry(&self) -> bool {
        self.pending() >= self.caps.retry_above
    }

    /// Pending tunnel connections evicted to make room since the relay started.
    pub fn turned_away(&self) -> u64 {
        self.turned_away.load(Ordering::Relaxed)
    }

    /// Counts a pending connection evicted for a newcomer from `source`, and logs it — at most
    /// once per [`REFUSAL_LOG_INTERVAL`].
    fn record_eviction(&self, source: IpAddr, why: OverCap) {
        self.turned_away.fetch_add(1, Ordering::Relaxed);
        if let Some(left_out) = self.refusals.admit(std::time::Instant::now()) {
            tracing::warn!(
                %source,
                left_out,
                "unauthenticated tunnel connection evicted: {why} (left_out: others evicted \
                 since the last such line)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn admit(admission: &Arc<Admission>, source: &str) -> PendingSlot {
        admission.admit(ip(source), Arc::default())
    }

    #[test]
    fn a_source_over_its_share_makes_room_from_its_own_oldest() {
        let admission = Arc::new(Admission::default());
        let flood: Vec<_> =
            (0..MAX_PENDING_PER_SOURCE).map(|_| admit(&admission, "198.51.100.1")).collect();
        let other = admit(&admission, "198.51.100.2");
        // One more from the flooding source, even written as IPv4-mapped IPv6: its own oldest
        // goes, nobody else's.
        let newest = admit(&admission, "::ffff:198.51.100.1");
        assert!(flood[0].evict.is_cancelled() && !other.evict.is_cancelled());
        assert_eq!(admission.pending(), MAX_PENDING_PER_SOURCE + 1);
        assert_eq!(admission.turned_away(), 1);
        drop((flood, other, newest));
        assert_eq!(admission.pending(), 0);
        assert!(admission.lock().by_source.is_empty(), "no per-source entry is left behind");
    }

    #[test]
    fn when_full_a_silent_connection_goes_before_one_that_spoke() {
        let admission = Arc::new(Admission::default());
        let spoke = Arc::new(FirstBytes::spoken());
        // The oldest has sent its ClientHello; every later one is silent.
        let speaker = admission.admit(ip("203.0.113.1"), Arc::clone(&spoke));
        let mut held = Vec::new();
        for n in 0..MAX_PENDING - 1 {
            let n = u32::try_from(n).expect("small");
            let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n / 8));
            held.push(admission.admit(source, Arc::default()));
        }
        assert_eq!(admission.pending(), MAX_PENDING);
        assert!(admission.wants_retry());
        let newcomer = admit(&admission, "192.0.2.7");
        assert_eq!(admission.pending(), MAX_PENDING, "the total cap holds");
        assert!(!speaker.evict.is_cancelled(), "the one that spoke stays");
        assert!(held[0].evict.is_cancelled(), "the oldest silent one goes");
        drop((speaker, held, newcomer));
        assert_eq!(admission.pending(), 0);
        assert!(!admission.wants_retry());
    }

    #[test]
    fn the_caps_follow_the_open_file_limit() {
        assert_eq!(PendingCaps::for_open_files(8192), PendingCaps::default());
        let small = PendingCaps { total: 64, per_source: 4, retry_above: 8 };
        assert_eq!(PendingCaps::for_open_files(1024), small);
        let plenty = PendingCaps::for_open_files(1 << 20);
        assert_eq!(plenty, PendingCaps { total: 4096, per_source: 256, retry_above: 512 });
        let small = Arc::new(Admission::new(PendingCaps::for_open_files(1024)));
        let held: Vec<_> = (0..4).map(|_| admit(&small, "198.51.100.1")).collect();
        let _fifth = admit(&small, "198.51.100.1");
        assert!(held[0].evict.is_cancelled(), "a source's share of a small relay is 4");
    }

    #[test]
    fn an_ipv6_host_is_counted_per_64() {
        let admission = Arc::new(Admission::default());
        let held: Vec<_> = (0..MAX_PENDING_PER_SOURCE)
            .map(|i| admit(&admission, &format!("2001:db8:1:2::{:x}", i + 1)))
            .collect();
        let _same_64 = admit(&admission, "2001:db8:1:2:ffff::1");
        assert!(held[0].evict.is_cancelled(), "the same /64 made room from itself");
        let _other_64 = admit(&admission, "2001:db8:1:3::1");
        assert!(!held[1].evict.is_cancelled(), "another /64 evicts nothing");
    }
}
