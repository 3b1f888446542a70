//! Agent authentication: a connector token is checked by hashing it with SHA-256 and comparing
//! the digest with the configured one in constant time ([`TokenDigest::matches`]); the relay
//! never holds the token.
//! Failed attempts are counted per source address, and a source that keeps failing is
//! refused without further checks until its window passes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use privlink_protocol::token::TokenDigest;

use crate::config::ConnectorSpec;

/// Failures from one address tolerated per window before it is refused outright.
pub const MAX_FAILURES_PER_WINDOW: u32 = 5;
/// Length of the failure-counting window.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Tracked addresses beyond which expired entries are swept.
const SWEEP_THRESHOLD: usize = 4096;

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
    let expected = spec.map_or(UNKNOWN_CONNECTOR, |c| c.token_sha256);
    let matches = expected.matches(token);
    match (spec, matches) {
        (None, _) => Err(AuthFailure::UnknownConnector),
        (Some(_), false) => Err(AuthFailure::WrongToken),
        (Some(_), true) => Ok(()),
    }
}

/// Counts authentication failures per source address in fixed windows.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    windows: HashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    /// Whether `source` has used up its failures for the current window.
    pub fn is_blocked(&self, source: IpAddr, now: Instant) -> bool {
        self.windows.get(&source).is_some_and(|&(start, count)| {
            now.duration_since(start) < FAILURE_WINDOW && count >= MAX_FAILURES_PER_WINDOW
        })
    }

    /// Records a failure; returns true when this failure used up the window's allowance.
    pub fn record_failure(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.windows.len() >= SWEEP_THRESHOLD {
            self.windows.retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
        }
        let entry = self.windows.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 == MAX_FAILURES_PER_WINDOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connectors() -> Vec<ConnectorSpec> {
        vec![ConnectorSpec { name: "east".into(), token_sha256: TokenDigest::of(b"right") }]
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
    fn repeated_failures_block_a_source_for_a_window() {
        let mut limiter = FailureLimiter::default();
        let ip: IpAddr = "198.51.100.9".parse().expect("ip");
        let other: IpAddr = "198.51.100.10".parse().expect("ip");
        let t0 = Instant::now();
        for n in 1..MAX_FAILURES_PER_WINDOW {
            assert!(!limiter.record_failure(ip, t0));
            assert!(!limiter.is_blocked(ip, t0), "blocked after {n}");
        }
        assert!(limiter.record_failure(ip, t0));
        assert!(limiter.is_blocked(ip, t0));
        assert!(!limiter.is_blocked(other, t0));
        assert!(!limiter.is_blocked(ip, t0 + FAILURE_WINDOW));
    }
}
