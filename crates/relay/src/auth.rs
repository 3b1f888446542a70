//! Agent authentication: a connector token is checked by hashing it with SHA-256 and comparing
//! the digest with each configured one in constant time ([`TokenDigest::any_matches`]: a
//! connector holds two during a rotation); the relay never holds the token.
//!
//! Failed attempts are counted per source address and each refusal from a source that keeps
//! failing is *delayed* a little more ([`FailureLimiter::record_failure`]). A right token is
//! never delayed and never refused: tokens are 256-bit random values, so guessing is hopeless
//! and a lockout would protect nothing while locking out a legitimate agent that shares a
//! source address (NAT, a Kubernetes node) with a misconfigured one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use privlink_protocol::token::TokenDigest;

use crate::config::ConnectorSpec;
use crate::source::SourceKey;

/// Delay added to a refusal for each failure from the same source within the window.
pub const REFUSAL_DELAY_STEP: Duration = Duration::from_millis(50);
/// Longest delay before a refusal.
pub const MAX_REFUSAL_DELAY: Duration = Duration::from_secs(1);
/// Length of the failure-counting window.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Tracked sources beyond which expired entries are swept.
const SWEEP_THRESHOLD: usize = 4096;
/// Most sources tracked at once. A flood from more sources than this (a botnet, or /64s
/// beyond count) empties the table rather than growing it: the delays only slow down
/// guessing, which 256-bit tokens make hopeless anyway, so forgetting them costs nothing.
pub const MAX_TRACKED_SOURCES: usize = 65_536;

/// Why an agent was not admitted. The agent is told only "authentication failed"; the relay
/// logs which it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No connector of that name.
    UnknownConnector,
    /// The token's digest does not match.
    WrongToken,
}

/// Compared against for unknown connectors (no token hashes to it in practice).
const UNKNOWN_CONNECTOR: TokenDigest = TokenDigest::ZERO;

/// Checks a presented token for a connector.
pub fn authenticate(
    connectors: &[ConnectorSpec],
    connector: &str,
    token: &[u8],
) -> Result<(), AuthFailure> {
    let spec = connectors.iter().find(|c| c.name == connector);
    // Hash and compare even for unknown connectors so timing does not tell them apart.
    let expected = spec.map_or(&[UNKNOWN_CONNECTOR][..], |c| &c.token_sha256[..]);
    let matches = TokenDigest::any_matches(expected, token);
    match (spec, matches) {
        (None, _) => Err(AuthFailure::UnknownConnector),
        (Some(_), false) => Err(AuthFailure::WrongToken),
        (Some(_), true) => Ok(()),
    }
}

/// Counts authentication failures per source (an IPv4 address or an IPv6 /64) in fixed
/// windows, to slow down a source that keeps failing; at most [`MAX_TRACKED_SOURCES`] sources.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    windows: HashMap<SourceKey, (Instant, u32)>,
    /// When expired entries may next be swept: a sweep is a scan of the whole table, so under
    /// a flood it runs once per [`SWEEP_INTERVAL`], not at every failure.
    next_sweep: Option<Instant>,
}

/// Least time between two sweeps of expired entries.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl FailureLimiter {
    /// Records a failure from `source`; returns how long to wait before sending the refusal:
    /// [`REFUSAL_DELAY_STEP`] times the failures in the current window, at most
    /// [`MAX_REFUSAL_DELAY`].
    pub fn record_failure(&mut self, source: IpAddr, now: Instant) -> Duration {
        if self.windows.len() >= SWEEP_THRESHOLD && self.next_sweep.is_none_or(|at| now >= at) {
            self.windows.retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
        if self.windows.len() >= MAX_TRACKED_SOURCES {
            self.windows.clear();
        }
        let entry = self.windows.entry(SourceKey::of(source)).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        REFUSAL_DELAY_STEP.saturating_mul(entry.1).min(MAX_REFUSAL_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connectors() -> Vec<ConnectorSpec> {
        vec![ConnectorSpec { name: "east".into(), token_sha256: vec![TokenDigest::of(b"right")] }]
    }

    #[test]
    fn tokens_are_checked_by_digest() {
        assert_eq!(authenticate(&connectors(), "east", b"right"), Ok(()));
        assert_eq!(authenticate(&connectors(), "east", b"wrong"), Err(AuthFailure::WrongToken));
        assert_eq!(
            authenticate(&connectors(), "west", b"right"),
            Err(AuthFailure::UnknownConnector)
        );
    }

    #[test]
    fn during_a_rotation_either_token_is_admitted() {
        let rotating = vec![ConnectorSpec {
            name: "east".into(),
            token_sha256: vec![TokenDigest::of(b"old"), TokenDigest::of(b"new")],
        }];
        assert_eq!(authenticate(&rotating, "east", b"old"), Ok(()));
        assert_eq!(authenticate(&rotating, "east", b"new"), Ok(()));
        assert_eq!(authenticate(&rotating, "east", b"neither"), Err(AuthFailure::WrongToken));
    }

    #[test]
    fn repeated_failures_slow_a_source_down_within_a_window() {
        let mut limiter = FailureLimiter::default();
        let ip: IpAddr = "198.51.100.9".parse().expect("ip");
        let other: IpAddr = "198.51.100.10".parse().expect("ip");
        let t0 = Instant::now();
        assert_eq!(limiter.record_failure(ip, t0), REFUSAL_DELAY_STEP);
        assert_eq!(limiter.record_failure(ip, t0), REFUSAL_DELAY_STEP * 2);
        for _ in 0..100 {
            assert!(limiter.record_failure(ip, t0) <= MAX_REFUSAL_DELAY);
        }
        assert_eq!(limiter.record_failure(ip, t0), MAX_REFUSAL_DELAY);
        assert_eq!(limiter.record_failure(other, t0), REFUSAL_DELAY_STEP, "per source");
        assert_eq!(limiter.record_failure(ip, t0 + FAILURE_WINDOW), REFUSAL_DELAY_STEP);
    }

    #[test]
    fn an_ipv6_host_is_one_source_and_the_table_stays_bounded() {
        let mut limiter = FailureLimiter::default();
        let t0 = Instant::now();
        // Rotating addresses inside one /64 does not reset the count.
        for i in 1..=4u32 {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().expect("ip");
            assert_eq!(limiter.record_failure(ip, t0), REFUSAL_DELAY_STEP * i);
        }
        // A flood of distinct /64s, all within the window, never grows the table past its cap.
        for i in 0..(MAX_TRACKED_SOURCES as u64 + 10_000) {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
            ));
            limiter.record_failure(ip, t0);
            assert!(limiter.windows.len() <= MAX_TRACKED_SOURCES);
        }
    }
}
