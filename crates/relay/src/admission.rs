//! Bounds on the work the relay does for tunnel connections that have not authenticated: from
//! accept until its hello is admitted a connection is *pending*, and pending connections are
//! capped in all ([`MAX_PENDING`]) and per source ([`MAX_PENDING_PER_SOURCE`]; IPv6 sources
//! counted per /64). A connection over a cap is turned away at once — a TCP connection closed,
//! a QUIC one refused — so a flood of idle or slow handshakes holds neither descriptors nor
//! memory beyond the caps, and agents from other sources, agents already connected and every
//! endpoint client keep being served. Once [`RETRY_ABOVE`] connections are pending, a QUIC
//! connection whose source address is not validated yet is sent a Retry first (RFC 9000 §8.1),
//! which a spoofed source cannot answer. Refusals are logged at most once per
//! [`REFUSAL_LOG_INTERVAL`], with how many were left out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use privlink_transport::throttle::Throttle;

use crate::source::SourceKey;

/// Pending (unauthenticated) tunnel connections the relay holds at most.
pub const MAX_PENDING: usize = 512;
/// Pending tunnel connections from one source address (one IPv6 /64) at most. Many agents may
/// share an address (NAT, a Kubernetes node); they each take well under a second to
/// authenticate, so this many at once is far more than they need.
pub const MAX_PENDING_PER_SOURCE: usize = 32;
/// Pending connections above which QUIC sources must prove their address with a Retry.
pub const RETRY_ABOVE: usize = 64;
/// Longest silence between two "turned away" lines while connections keep being turned away.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Which cap turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverCap {
    /// [`MAX_PENDING`] connections are pending.
    #[error("{MAX_PENDING} unauthenticated tunnel connections are pending")]
    Total,
    /// [`MAX_PENDING_PER_SOURCE`] connections from this source are pending.
    #[error(
        "{MAX_PENDING_PER_SOURCE} unauthenticated tunnel connections from this source are pending"
    )]
    Source,
}

/// The pending-connection counts.
#[derive(Debug)]
pub struct Admission {
    counts: Mutex<Counts>,
    turned_away: AtomicU64,
    refusals: Throttle,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<SourceKey, usize>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            counts: Mutex::default(),
            turned_away: AtomicU64::new(0),
            refusals: Throttle::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

/// One pending connection; dropping it (the hello admitted, or the connection gone) frees the
/// place.
#[derive(Debug)]
pub struct PendingSlot {
    admission: Arc<Admission>,
    source: SourceKey,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(count) = counts.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

impl Admission {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Counts only: a poisoned lock still holds usable numbers.
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a pending place for a connection from `source`, or says which cap is full.
    pub fn try_pending(self: &Arc<Self>, source: IpAddr) -> Result<PendingSlot, OverCap> {
        let key = SourceKey::of(source);
        let mut counts = self.lock();
        if counts.total >= MAX_PENDING {
            return Err(OverCap::Total);
        }
        let from_source = counts.by_source.entry(key).or_insert(0);
        if *from_source >= MAX_PENDING_PER_SOURCE {
            return Err(OverCap::Source);
        }
        *from_source += 1;
        counts.total += 1;
        Ok(PendingSlot { admission: Arc::clone(self), source: key })
    }

    /// Connections pending now.
    pub fn pending(&self) -> usize {
        self.lock().total
    }

    /// Whether QUIC sources should prove their address before a connection is accepted.
    pub fn wants_retry(&self) -> bool {
        self.pending() >= RETRY_ABOVE
    }

    /// Tunnel connections turned away over a cap since the relay started.
    pub fn turned_away(&self) -> u64 {
        self.turned_away.load(Ordering::Relaxed)
    }

    /// Counts a connection from `source` turned away, and logs it — at most once per
    /// [`REFUSAL_LOG_INTERVAL`].
    pub fn record_turned_away(&self, source: IpAddr, transport: &'static str, why: OverCap) {
        self.turned_away.fetch_add(1, Ordering::Relaxed);
        if let Some(left_out) = self.refusals.admit(std::time::Instant::now()) {
            tracing::warn!(
                %source,
                transport,
                left_out,
                "tunnel connection turned away: {why} (left_out: others turned away since the \
                 last such line)"
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

    #[test]
    fn each_source_gets_its_share_and_the_total_is_capped() {
        let admission = Arc::new(Admission::default());
        let flood: Vec<_> = (0..MAX_PENDING_PER_SOURCE)
            .map(|_| admission.try_pending(ip("198.51.100.1")).expect("within the source cap"))
            .collect();
        assert_eq!(admission.try_pending(ip("198.51.100.1")).err(), Some(OverCap::Source));
        // The same host written as IPv4-mapped IPv6 is the same source.
        assert_eq!(admission.try_pending(ip("::ffff:198.51.100.1")).err(), Some(OverCap::Source));
        let other = admission.try_pending(ip("198.51.100.2")).expect("another source is served");
        drop(other);

        // Many sources: the total cap holds.
        let mut held = flood;
        for n in 0.. {
            let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000_u32 + n / 8));
            match admission.try_pending(source) {
                Ok(slot) => held.push(slot),
                Err(over) => {
                    assert_eq!(over, OverCap::Total);
                    break;
                }
            }
            assert!(held.len() <= MAX_PENDING, "the total cap did not hold");
        }
        assert_eq!(admission.pending(), MAX_PENDING);
        assert!(admission.wants_retry());

        // Places are given back when dropped.
        drop(held);
        assert_eq!(admission.pending(), 0);
        assert!(!admission.wants_retry());
        assert!(admission.lock().by_source.is_empty(), "no per-source entry is left behind");
    }

    #[test]
    fn an_ipv6_host_is_counted_per_64() {
        let admission = Arc::new(Admission::default());
        let held: Vec<_> = (0..MAX_PENDING_PER_SOURCE)
            .map(|i| {
                let address = ip(&format!("2001:db8:1:2::{:x}", i + 1));
                admission.try_pending(address).expect("within the cap")
            })
            .collect();
        assert_eq!(admission.try_pending(ip("2001:db8:1:2:ffff::1")).err(), Some(OverCap::Source));
        assert!(admission.try_pending(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        drop(held);
    }
}
