//! Links to relays: for every configured relay, a connection to each address its name
//! resolves to, re-dialled with capped exponential backoff and jitter when it drops, and
//! re-resolved periodically so new relay addresses are picked up and vanished ones dropped.
//! What one connection attempt does is [`crate::dial`]'s business.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use privlink_transport::tunnel::DialError;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, warn};

use crate::config::RelayAddress;
use crate::dial;
use crate::session::SessionError;
use crate::shared::AgentShared;

/// Starts keeping links to `relay` (at start, or when a reload adds it).
pub(crate) fn start_relay(shared: &Arc<AgentShared>, relay: &RelayAddress) {
    let stop = shared.shutdown.child_token();
    let mut relays = shared.relays.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if relays.contains_key(&relay.to_string()) {
        return;
    }
    relays.insert(relay.to_string(), stop.clone());
    shared.links.spawn(maintain_relay(
        relay.clone(),
        Arc::clone(shared),
        shared.links.clone(),
        stop,
    ));
}

/// First re-dial delay.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest re-dial delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// First re-dial delay after a failure only an operator can fix (token refused, relay
/// certificate not trusted): retrying at full speed would only flood both logs.
pub const OPERATOR_BACKOFF_INITIAL: Duration = Duration::from_secs(5);
/// Longest re-dial delay after such a failure.
pub const OPERATOR_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How often relay names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps links to every address of one relay name until `stop` (a child of the agent's
/// shutdown, cancelled early when a reload removes the relay).
pub(crate) async fn maintain_relay(
    relay: RelayAddress,
    shared: Arc<AgentShared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut links: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    loop {
        let resolved = resolve(&relay).await;
        let wait = match resolved {
            Ok(addrs) => {
                backoff.reset();
                links.retain(|addr, stop| {
                    let keep = addrs.contains(addr);
                    if !keep {
                        info!(relay = %relay, %addr, "relay address no longer resolves; dropping its link");
                        stop.cancel();
                    }
                    keep
                });
                for addr in addrs {
                    if links.contains_key(&addr) {
                        continue;
                    }
                    let stop = stop.child_token();
                    links.insert(addr, stop.clone());
                    let span = tracing::info_span!("relay", relay = %relay, %addr);
                    tracker.spawn(
                        maintain_link(relay.clone(), addr, Arc::clone(&shared), stop)
                            .instrument(span),
                    );
                }
                RESOLVE_INTERVAL
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(relay = %relay, "cannot resolve relay: {e}; retrying in {delay:?}");
                delay
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The addresses of `relay`, sorted, each once.
pub(crate) async fn resolve(relay: &RelayAddress) -> std::io::Result<Vec<SocketAddr>> {
    let host = match &relay.host {
        privlink_protocol::destination::Host::Ip(ip) => {
            return Ok(vec![SocketAddr::new(*ip, relay.port)]);
        }
        privlink_protocol::destination::Host::Name(name) => name.lookup_form(),
    };
    let mut addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((host.as_str(), relay.port)).await?.collect();
    addrs.sort_unstable();
    addrs.dedup();
    Ok(addrs)
}

/// Dials one relay address again and again until `stop`.
async fn maintain_link(
    relay: RelayAddress,
    addr: SocketAddr,
    shared: Arc<AgentShared>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    let mut operator_backoff = Backoff::new(OPERATOR_BACKOFF_INITIAL, OPERATOR_BACKOFF_MAX);
    let relay_name = relay.to_string();
    loop {
        let started = Instant::now();
        shared.status.connecting(&relay_name, addr);
        let result = dial::session(&relay, addr, &shared, &stop).await;
        if stop.is_cancelled() {
            shared.status.remove(addr);
            return;
        }
        let error = result
            .as_ref()
            .err()
            .map(|e| privlink_protocol::text::loggable(&e.to_string()).into_owned());
        shared.status.down(addr, error);
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
            operator_backoff.reset();
        }
        let delay = match result {
            Ok(()) => {
                let delay = backoff.next_delay();
                info!("relay link ended; reconnecting in {delay:?}");
                delay
            }
            Err(SessionError::Refused { reason, .. }) => {
                let delay = operator_backoff.next_delay();
                let reason = privlink_protocol::text::loggable(&reason);
                let hint = if reason.contains("authentication failed") {
                    format!(
                        " Check that the token this agent presents (token_file or \
                         PRIVLINK_TOKEN) is the one whose token_sha256 the relay's \
                         [[connector]] `{}` holds.",
                        shared.config.connector
                    )
                } else {
                    String::new()
                };
                error!("relay refused this agent: {reason}.{hint} Retrying in {delay:?}.");
                delay
            }
            Err(SessionError::Dial(DialError::Certificate(explained))) => {
                let delay = operator_backoff.next_delay();
                error!("{explained} Retrying in {delay:?}.");
                delay
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!("relay link down: {e}; reconnecting in {delay:?}");
                delay
            }
        };
        backoff_sleep(&stop, delay).await;
        if stop.is_cancelled() {
            shared.status.remove(addr);
            return;
        }
    }
}

/// Sleeps `delay` unless `stop` comes first.
async fn backoff_sleep(stop: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}

/// Capped exponential backoff with "equal jitter": half the delay fixed, half random, so a
/// fleet of agents cut off together does not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    random: SystemRandom,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, attempt: 0, random: SystemRandom::new() }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(16));
        let ceiling = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let mut bytes = [0u8; 4];
        let fraction = match self.random.fill(&mut bytes) {
            Ok(()) => f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX),
            Err(_) => 0.5,
        };
        ceiling / 2 + ceiling.mul_f64(fraction / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut b = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        let first = b.next_delay();
        assert!(first >= BACKOFF_INITIAL / 2 && first <= BACKOFF_INITIAL, "{first:?}");
        let mut last = first;
        for _ in 0..40 {
            last = b.next_delay();
            assert!(last <= BACKOFF_MAX);
        }
        assert!(last >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_INITIAL);
    }
}
