//! Per-source restraint on an endpoint or a shared listener: at most `per_source_max_connections`
//! open at once from one source and new ones at `per_source_rate` (a token bucket whose burst
//! is the rate's number), a source being an IPv4 address or an IPv6 /64 ([`SourceKey`]) — after
//! a trusted PROXY header, the client it names. A connection over a limit is refused before
//! anything is opened toward an agent; other sources are untouched.
//!
//! The table that remembers sources is bounded ([`MAX_TRACKED_SOURCES`]): when it is full, the
//! sources with nothing open and a full bucket are forgotten first (they would be admitted the
//! same way as a stranger), then the least recently seen of those with nothing open. A source
//! with connections open is never forgotten (its count must come back down), and those are at
//! most the endpoint's `max_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::config::SourcePolicy;
use crate::source::SourceKey;

/// Most sources one endpoint or listener remembers at once.
pub(crate) const MAX_TRACKED_SOURCES: usize = 65_536;

/// Why a source's connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceRefusal {
    /// Its bucket is empty: too many new connections too fast (`rate_limited`).
    RateLimited,
    /// It holds `per_source_max_connections` already (`source_over_limit`).
    OverLimit,
}

impl SourceRefusal {
    /// The outcome label it is counted under.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::OverLimit => "source_over_limit",
        }
    }
}

/// One source as remembered.
#[derive(Debug)]
struct Entry {
    /// Its connections open now.
    open: u32,
    /// Tokens in its bucket (new connections it may open now).
    tokens: f64,
    /// When the bucket was last filled up to `tokens`.
    filled: Instant,
    /// When it last connected.
    seen: Instant,
}

/// The sources of one endpoint or listener.
#[derive(Debug, Default)]
pub(crate) struct SourceLimits {
    table: Mutex<HashMap<SourceKey, Entry>>,
}

/// One connection counted against its source until dropped.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    held: Option<(Arc<SourceLimits>, SourceKey)>,
}

impl SourceSlot {
    /// A slot that counts nothing (no per-source limit applies).
    pub(crate) fn none() -> Self {
        Self { held: None }
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some((limits, key)) = self.held.take() {
            let mut table = limits.table.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = table.get_mut(&key) {
                entry.open = entry.open.saturating_sub(1);
            }
        }
    }
}

impl SourceLimits {
    /// Admits a connection from `ip` under `policy` at `now`, or says which limit it is over.
    /// Without a limit in `policy`, nothing is looked at or remembered.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        policy: &SourcePolicy,
        now: Instant,
    ) -> Result<SourceSlot, SourceRefusal> {
        if policy.max_connections.is_none() && policy.rate.is_none() {
            return Ok(SourceSlot::none());
        }
        let key = SourceKey::of(ip);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if !table.contains_key(&key) && table.len() >= MAX_TRACKED_SOURCES {
            forget_some(&mut table, policy, now);
            if table.len() >= MAX_TRACKED_SOURCES {
                // Every remembered source has a connection open: at most the endpoint's
                // `max_connections` can, which bounds this case; admitted uncounted.
                return Ok(SourceSlot::none());
            }
        }
        let burst = policy.rate.map_or(0.0, |rate| f64::from(rate.burst));
        let entry =
            table.entry(key).or_insert(Entry { open: 0, tokens: burst, filled: now, seen: now });
        entry.seen = now;
        if let Some(max) = policy.max_connections {
            if entry.open >= max {
                return Err(SourceRefusal::OverLimit);
            }
        }
        if let Some(rate) = policy.rate {
            let elapsed = now.saturating_duration_since(entry.filled).as_secs_f64();
            entry.tokens = (entry.tokens + elapsed * rate.per_second).min(burst);
            entry.filled = now;
            if entry.tokens < 1.0 {
                return Err(SourceRefusal::RateLimited);
            }
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        Ok(SourceSlot { held: Some((Arc::clone(self), key)) })
    }

    /// Sources remembered now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Makes room in a full table: forgets every source that has nothing open and whose bucket
/// would be full again by now (a stranger would be treated the same), and if that frees less
/// than an eighth of the table, the least recently seen eighth of those with nothing open —
/// so a flood of sources costs one sort per eighth of the table, not a scan per connection.
fn forget_some(table: &mut HashMap<SourceKey, Entry>, policy: &SourcePolicy, now: Instant) {
    let full_again = |entry: &Entry| match policy.rate {
        None => true,
        Some(rate) => {
            let elapsed = now.saturating_duration_since(entry.filled).as_secs_f64();
            entry.tokens + elapsed * rate.per_second >= f64::from(rate.burst)
        }
    };
    table.retain(|_, entry| entry.open > 0 || !full_again(entry));
    let wanted = MAX_TRACKED_SOURCES / 8;
    if MAX_TRACKED_SOURCES - table.len() >= wanted {
        return;
    }
    let mut idle: Vec<(Instant, SourceKey)> =
        table.iter().filter(|(_, e)| e.open == 0).map(|(key, e)| (e.seen, *key)).collect();
    idle.sort_unstable_by_key(|(seen, _)| *seen);
    for (_, key) in idle.into_iter().take(wanted) {
        table.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Rate;

    fn policy(max: Option<u32>, rate: Option<&str>) -> SourcePolicy {
        SourcePolicy { max_connections: max, rate: rate.map(|r| r.parse::<Rate>().expect("rate")) }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let limits = Arc::new(SourceLimits::default());
        let policy = policy(None, Some("5/s"));
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(limits.admit(ip("127.0.0.2"), &policy, t0).expect("within the burst"));
        }
        let refused = limits.admit(ip("127.0.0.2"), &policy, t0).expect_err("burst spent");
        assert_eq!(refused, SourceRefusal::RateLimited);
        assert!(limits.admit(ip("127.0.0.3"), &policy, t0).is_ok(), "another source is untouched");
        // A fifth of a second later, one more token.
        let later = t0 + Duration::from_millis(200);
        assert!(limits.admit(ip("127.0.0.2"), &policy, later).is_ok());
        assert!(limits.admit(ip("127.0.0.2"), &policy, later).is_err());
    }

    #[test]
    fn open_connections_are_counted_until_they_end() {
        let limits = Arc::new(SourceLimits::default());
        let policy = policy(Some(2), None);
        let now = Instant::now();
        let a = limits.admit(ip("10.0.0.1"), &policy, now).expect("first");
        let _b = limits.admit(ip("10.0.0.1"), &policy, now).expect("second");
        let refused = limits.admit(ip("10.0.0.1"), &policy, now).expect_err("a third");
        assert_eq!(refused, SourceRefusal::OverLimit);
        drop(a);
        assert!(limits.admit(ip("10.0.0.1"), &policy, now).is_ok(), "a slot came back");
        // One IPv6 host is one source, whichever address of its /64 it uses.
        let _c = limits.admit(ip("2001:db8:1:2::1"), &policy, now).expect("v6");
        let _d = limits.admit(ip("2001:db8:1:2::2"), &policy, now).expect("v6");
        assert!(limits.admit(ip("2001:db8:1:2::3"), &policy, now).is_err(), "same /64");
    }

    #[test]
    fn without_a_limit_nothing_is_remembered() {
        let limits = Arc::new(SourceLimits::default());
        let _slot = limits.admit(ip("10.0.0.1"), &policy(None, None), Instant::now()).expect("ok");
        assert_eq!(limits.tracked(), 0);
    }

    #[test]
    fn a_flood_of_sources_keeps_the_table_within_its_bound() {
        let limits = Arc::new(SourceLimits::default());
        let policy = policy(Some(4), Some("10/s"));
        let now = Instant::now();
        // 100,000 distinct IPv6 /64s, each connecting once and closing: the table never
        // outgrows its bound, and a source with a connection open is never forgotten.
        let keeper = limits.admit(ip("192.0.2.1"), &policy, now).expect("keeper");
        for i in 0..100_000u64 {
            let prefix = (0x2001_0db8_u128 << 96) | (u128::from(i) << 64);
            let source = IpAddr::from(std::net::Ipv6Addr::from(prefix));
            drop(limits.admit(source, &policy, now + Duration::from_micros(i)));
            assert!(limits.tracked() <= MAX_TRACKED_SOURCES);
        }
        let table = limits.table.lock().expect("lock");
        assert_eq!(table.get(&SourceKey::of(ip("192.0.2.1"))).map(|e| e.open), Some(1));
        drop(table);
        drop(keeper);
    }
}
