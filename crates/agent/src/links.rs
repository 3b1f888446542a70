//! Links to relays: for every configured relay, a connection to each address its name
//! resolves to — as many to each as the relay fleet behind it has relays, when it has one
//! ([`crate::fleet`]) — re-dialled with capped exponential backoff and jitter when it drops,
//! and re-resolved periodically so new relay addresses are picked up and vanished ones dropped.
//! What one connection attempt does is [`crate::dial`]'s business.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use privlink_protocol::text::MAX_SHOWN_CHARS;
use privlink_transport::http_proxy::ProxyError;
use privlink_transport::tunnel::DialError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, warn};

use crate::config::RelayAddress;
use crate::dial;
use crate::fleet::{FleetCover, Link, LinkKey};
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

/// First re-dial delay of a link that landed on a relay another link holds.
pub const FLEET_RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest such delay: a balancer that keeps sending a link to relays already held (a hashing
/// one) is asked again this often.
pub const FLEET_RETRY_MAX: Duration = Duration::from_secs(5);

/// Keeps links to every address of one relay name until `stop` (a child of the agent's
/// shutdown, cancelled early when a reload removes the relay): one per address, or, when the
/// relays behind it belong to a fleet, as many per address as the fleet has relays, so that
/// through a balancer every relay of the fleet gets a link.
pub(crate) async fn maintain_relay(
    relay: RelayAddress,
    shared: Arc<AgentShared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let relay_name = relay.to_string();
    let cover = Arc::new(FleetCover::default());
    shared.status.add_fleet(&relay_name, Arc::clone(&cover));
    let mut fleet_changes = cover.subscribe();
    // Links per address, shared with the link tasks: a slot past it retires when its link ends.
    let per_address = Arc::new(AtomicUsize::new(1));
    let mut links: HashMap<LinkKey, CancellationToken> = HashMap::new();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    let mut resolve_at = Instant::now();
    loop {
        if Instant::now() >= resolve_at {
            match resolve_first_hop(&relay, &shared.config).await {
                Ok(resolved) => {
                    backoff.reset();
                    for gone in addrs.iter().filter(|a| !resolved.contains(a)) {
                        info!(relay = %relay, addr = %gone, "relay address no longer resolves; dropping its links");
                    }
                    addrs = resolved;
                    resolve_at = Instant::now() + RESOLVE_INTERVAL;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(relay = %relay, "cannot resolve relay: {e}; retrying in {delay:?}");
                    resolve_at = Instant::now() + delay;
                }
            }
        }
        let wanted = cover.links_wanted().div_ceil(addrs.len().max(1));
        per_address.store(wanted, Ordering::Relaxed);
        links.retain(|key, link_stop| {
            let resolves = addrs.contains(&key.address);
            // A slot past what the fleet needs goes unless it holds a relay (then it goes
            // when its link ends).
            let surplus = usize::from(key.slot) >= wanted && !cover.holds(*key);
            if !resolves || surplus {
                link_stop.cancel();
            }
            !link_stop.is_cancelled()
        });
        for &address in &addrs {
            for slot in 0..u16::try_from(wanted).unwrap_or(u16::MAX) {
                let key = LinkKey { address, slot };
                if links.contains_key(&key) {
                    continue;
                }
                let link_stop = stop.child_token();
                links.insert(key, link_stop.clone());
                let link = Link {
                    relay: relay.clone(),
                    key,
                    cover: Arc::clone(&cover),
                    per_address: Arc::clone(&per_address),
                };
                let span = tracing::info_span!("relay", relay = %relay, addr = %key);
                tracker.spawn(maintain_link(link, Arc::clone(&shared), link_stop).instrument(span));
            }
        }
        tokio::select! {
            () = stop.cancelled() => {
                shared.status.remove_fleet(&relay_name);
                return;
            }
            () = tokio::time::sleep_until(resolve_at) => {}
            _ = fleet_changes.changed() => {}
        }
    }
}

/// Where links to `relay` connect: the addresses of the HTTP proxy on the way, when one
/// applies (it resolves the relay's name itself), else the relay's own.
pub(crate) async fn resolve_first_hop(
    relay: &RelayAddress,
    config: &crate::config::AgentConfig,
) -> std::io::Result<Vec<SocketAddr>> {
    match config.proxy_for(relay) {
        Some(proxy) => resolve(&RelayAddress::of(&proxy.address)).await,
        None => resolve(relay).await,
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

/// Dials one link again and again until `stop`, or until the fleet no longer needs its slot.
async fn maintain_link(link: Link, shared: Arc<AgentShared>, stop: CancellationToken) {
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    let mut operator_backoff = Backoff::new(OPERATOR_BACKOFF_INITIAL, OPERATOR_BACKOFF_MAX);
    let mut fleet_backoff = Backoff::new(FLEET_RETRY_INITIAL, FLEET_RETRY_MAX);
    let relay_name = link.relay.to_string();
    let key = link.key;
    loop {
        let started = Instant::now();
        shared.status.connecting(&relay_name, key);
        let result = dial::session(&link, &shared, &stop).await;
        let duplicate_of = link.cover.released(key);
        if stop.is_cancelled() {
            shared.status.remove(key);
            return;
        }
        if usize::from(key.slot) >= link.per_address.load(Ordering::Relaxed) {
            // The fleet shrank: this slot is no longer needed.
            debug!("relay link ended; the fleet needs no link in its place");
            shared.status.remove(key);
            stop.cancel();
            return;
        }
        let error = result.as_ref().err().map(|e| {
            let text = e.to_string();
            privlink_protocol::text::loggable_within(&text, MAX_SHOWN_CHARS).into_owned()
        });
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
            operator_backoff.reset();
            fleet_backoff.reset();
        }
        let delay = match (duplicate_of, result) {
            (Some(relay_id), _) => {
                let delay = fleet_backoff.next_delay();
                let relay_id = privlink_protocol::text::loggable(&relay_id).into_owned();
                debug!(%relay_id, "landed on a relay another link holds; dialling again in {delay:?}");
                shared.status.down(
                    key,
                    Some(format!(
                        "landed on relay {relay_id}, which another link holds; dialling again to \
                         reach another relay of the fleet"
                    )),
                );
                delay
            }
            (None, result) => {
                shared.status.down(key, error);
                link_down_delay(result, &shared, &mut backoff, &mut operator_backoff)
            }
        };
        backoff_sleep(&stop, delay).await;
        if stop.is_cancelled() {
            shared.status.remove(key);
            return;
        }
    }
}

/// How long a link that ended with `result` waits before it dials again, said in the log.
fn link_down_delay(
    result: Result<(), SessionError>,
    shared: &AgentShared,
    backoff: &mut Backoff,
    operator_backoff: &mut Backoff,
) -> Duration {
    match result {
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
        Err(SessionError::Dial(
            DialError::Certificate(explained) | DialError::KeyExchange(explained),
        )) => {
            let delay = operator_backoff.next_delay();
            error!("{explained} Retrying in {delay:?}.");
            delay
        }
        // The proxy turned the agent away for its credentials or its policy: an operator has to
        // act, so the retries slow down as for a refused token.
        Err(SessionError::Dial(DialError::Proxy(
            refused @ ProxyError::Refused { code: 401 | 403 | 407, .. },
        ))) => {
            let delay = operator_backoff.next_delay();
            error!("{refused}. Retrying in {delay:?}.");
            delay
        }
        Err(e) => {
            let delay = backoff.next_delay();
            warn!("relay link down: {e}; reconnecting in {delay:?}");
            delay
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
        let delay = ceiling / 2 + ceiling.mul_f64(fraction / 2.0);
        // Whole milliseconds: the delay is logged ("in 3.101s", not "in 3.101219914s").
        Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut b = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        let first = b.next_delay();
        assert_eq!(first.subsec_nanos() % 1_000_000, 0, "whole milliseconds: {first:?}");
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
