//! Relay checks: each relay name's DNS answer, then at each address a QUIC handshake and a
//! TLS-over-TCP handshake, each followed by the agent's hello and the relay's welcome — the
//! token and connector are judged by the relay exactly as for the running agent. The session
//! ends at the welcome: no verdicts are sent, so the relay routes nothing to it.

use std::net::SocketAddr;
use std::time::Duration;

use privlink_protocol::control::{AgentEvent, Timers};
use privlink_protocol::destination::Host;
use privlink_protocol::message::EndpointAssignment;
use privlink_transport::dialer::QuicSource;
use privlink_transport::session::{self, Peer};
use privlink_transport::tunnel::{AgentConnection, CloseCode, DialError, TransportKind};

use super::{AddressFact, EndpointFact, Outcome, Report, Step, timed};
use crate::config::{AgentConfig, RelayAddress, TransportChoice};
use crate::dialer::RelayDialer;
use crate::session::{SessionError, accept_control, hello, refusal_in_close};

/// Most addresses of one relay name that are dialled.
const MAX_ADDRESSES: usize = 8;
/// Most endpoints named in a step's line (the JSON has them all).
const LISTED_ENDPOINTS: usize = 5;

/// Checks every relay of `config`; returns the endpoints the relays assigned (each once).
pub(crate) async fn check_relays(config: &AgentConfig, report: &mut Report) -> Vec<EndpointFact> {
    let dialer = match RelayDialer::new(config) {
        Ok(dialer) => dialer,
        Err(e) => {
            report.push(Step::new(
                "relay-quic",
                "-",
                Outcome::Fail,
                Duration::ZERO,
                format!("cannot set up the agent's tunnel client: {e}"),
            ));
            return Vec::new();
        }
    };
    let mut endpoints: Vec<EndpointFact> = Vec::new();
    for relay in &config.relays {
        let addrs = match config.proxy_for(relay) {
            Some(proxy) => super::proxy::check_proxy(proxy, relay, config, report).await,
            None => resolve(relay, config, report).await,
        };
        let Some(addrs) = addrs else { continue };
        for addr in addrs.into_iter().take(MAX_ADDRESSES) {
            for assigned in check_address(&dialer, relay, addr, config, report).await {
                if !endpoints.contains(&assigned) {
                    endpoints.push(assigned);
                }
            }
        }
    }
    dialer.close("check finished", Duration::from_secs(1)).await;
    endpoints
}

/// The relay's addresses (a `relay-dns` step for a name); `None` when it does not resolve.
pub(super) async fn resolve(
    relay: &RelayAddress,
    config: &AgentConfig,
    report: &mut Report,
) -> Option<Vec<SocketAddr>> {
    if let Host::Ip(ip) = relay.host {
        return Some(vec![SocketAddr::new(ip, relay.port)]);
    }
    let (resolved, took) =
        timed(tokio::time::timeout(config.dns_timeout, crate::links::resolve(relay))).await;
    let subject = relay.to_string();
    match resolved {
        Ok(Ok(addrs)) if !addrs.is_empty() => {
            let listed: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            let mut step = Step::new(
                "relay-dns",
                subject,
                Outcome::Pass,
                took,
                format!("resolves to {}", listed.join(", ")),
            );
            step.addresses = Some(addrs.iter().map(|a| AddressFact::of(a.ip())).collect());
            if addrs.len() > MAX_ADDRESSES {
                step.warn(format!(
                    "{} addresses; only the first {MAX_ADDRESSES} are checked",
                    addrs.len()
                ));
            }
            report.push(step);
            Some(addrs)
        }
        Ok(Ok(_)) => {
            report.push(Step::new("relay-dns", subject, Outcome::Fail, took, "no address"));
            None
        }
        Ok(Err(e)) => {
            report.push(Step::new(
                "relay-dns",
                subject,
                Outcome::Fail,
                took,
                format!("does not resolve: {e}"),
            ));
            None
        }
        Err(_) => {
            report.push(Step::new(
                "relay-dns",
                subject,
                Outcome::Fail,
                took,
                format!("no DNS answer within {:?} (dns_timeout)", config.dns_timeout),
            ));
            None
        }
    }
}

/// What one transport's attempt found.
struct Attempt {
    kind: TransportKind,
    took: Duration,
    result: Result<Welcomed, String>,
}

/// A handshake and a welcome.
struct Welcomed {
    handshake: Duration,
    endpoints: Vec<EndpointAssignment>,
}

/// Both transports at one relay address: a `relay-quic` and a `relay-tcp` step.
async fn check_address(
    dialer: &RelayDialer,
    relay: &RelayAddress,
    addr: SocketAddr,
    config: &AgentConfig,
    report: &mut Report,
) -> Vec<EndpointFact> {
    // As long as the agent would wait: `auto` falls back after quic_fallback_after (and an
    // unused QUIC gets no longer either).
    let quic_deadline = match config.transport {
        TransportChoice::Auto | TransportChoice::Tcp => config.quic_fallback_after,
        TransportChoice::Quic => Timers::HANDSHAKE,
    };
    let tcp = attempt(dialer, TransportKind::Tcp, relay, addr, config, Timers::HANDSHAKE).await;
    if config.proxy_for(relay).is_some() {
        // Through the proxy (at `addr`): TLS over TCP only, as the agent links.
        let subject = format!("{relay} via the proxy at {addr}");
        return tcp_only_through_proxy(tcp, subject, config, report);
    }
    let quic = attempt(dialer, TransportKind::Quic, relay, addr, config, quic_deadline).await;
    let tcp_works = tcp.result.is_ok();
    let quic_works = quic.result.is_ok();
    let mut quic = quic;
    if let (Err(quic_reason), Err(tcp_reason)) = (&mut quic.result, &tcp.result) {
        if tcp_reason.starts_with("connection refused") {
            quic_reason.push_str(
                " — TCP to the same port is refused too: the relay is probably not running at \
                 this address",
            );
        }
    }
    let mut endpoints = Vec::new();
    for attempt in [quic, tcp] {
        let used = match (config.transport, attempt.kind) {
            (TransportChoice::Auto, _)
            | (TransportChoice::Quic, TransportKind::Quic)
            | (TransportChoice::Tcp, TransportKind::Tcp) => true,
            (TransportChoice::Quic, TransportKind::Tcp)
            | (TransportChoice::Tcp, TransportKind::Quic) => false,
        };
        let check = match attempt.kind {
            TransportKind::Quic => "relay-quic",
            TransportKind::Tcp => "relay-tcp",
        };
        let subject = if relay.host.to_string() == addr.ip().to_string() {
            addr.to_string()
        } else {
            format!("{addr} ({relay})")
        };
        let step = match attempt.result {
            Ok(welcomed) => {
                let facts = endpoint_facts(&welcomed.endpoints);
                let mut listed: Vec<String> = facts
                    .iter()
                    .take(LISTED_ENDPOINTS)
                    .map(|e| format!("{} → {}", e.name, e.destination))
                    .collect();
                if facts.len() > LISTED_ENDPOINTS {
                    listed.push(format!("… ({} more)", facts.len() - LISTED_ENDPOINTS));
                }
                let mut step = Step::new(
                    check,
                    subject,
                    Outcome::Pass,
                    attempt.took,
                    format!(
                        "handshake {:.1} ms, welcomed: {} endpoint{}{}{}",
                        welcomed.handshake.as_secs_f64() * 1000.0,
                        facts.len(),
                        if facts.len() == 1 { "" } else { "s" },
                        if facts.is_empty() { "" } else { ": " },
                        listed.join(", "),
                    ),
                );
                if facts.is_empty() {
                    step.warn(format!(
                        "the relay assigns no endpoint to connector `{}`",
                        config.connector
                    ));
                }
                if !used {
                    step.detail.push_str(&format!(" (not used: transport = {})", config.transport));
                }
                endpoints.extend(facts.iter().cloned());
                step.endpoints = Some(facts);
                step
            }
            Err(reason) => {
                let fallback = attempt.kind == TransportKind::Quic
                    && config.transport == TransportChoice::Auto
                    && tcp_works;
                let other_only = !used && (quic_works || tcp_works);
                if fallback {
                    let mut step = Step::new(check, subject, Outcome::Pass, attempt.took, "failed");
                    step.warn(format!(
                        "{reason}; the agent falls back to TLS over TCP after \
                         quic_fallback_after ({:?}) and keeps probing QUIC",
                        config.quic_fallback_after
                    ));
                    step
                } else if other_only {
                    let mut step = Step::new(check, subject, Outcome::Pass, attempt.took, "failed");
                    step.warn(format!("{reason} (not used: transport = {})", config.transport));
                    step
                } else {
                    Step::new(check, subject, Outcome::Fail, attempt.took, reason)
                }
            }
        };
        report.push(step);
    }
    endpoints
}

/// The `relay-tcp` step of a relay reached through the HTTP proxy.
fn tcp_only_through_proxy(
    tcp: Attempt,
    subject: String,
    config: &AgentConfig,
    report: &mut Report,
) -> Vec<EndpointFact> {
    let step = match tcp.result {
        Ok(welcomed) => {
            let facts = endpoint_facts(&welcomed.endpoints);
            let mut step = Step::new(
                "relay-tcp",
                subject,
                Outcome::Pass,
                tcp.took,
                format!(
                    "handshake through the proxy {:.1} ms, welcomed: {} endpoint(s)",
                    welcomed.handshake.as_secs_f64() * 1000.0,
                    facts.len()
                ),
            );
            if facts.is_empty() {
                step.warn(format!(
                    "the relay assigns no endpoint to connector `{}`",
                    config.connector
                ));
            }
            step.endpoints = Some(facts);
            step
        }
        Err(reason) => Step::new("relay-tcp", subject, Outcome::Fail, tcp.took, reason),
    };
    let endpoints = step.endpoints.clone().unwrap_or_default();
    report.push(step);
    endpoints
}

/// What a relay's welcome assigned, as the report lists it.
fn endpoint_facts(endpoints: &[EndpointAssignment]) -> Vec<EndpointFact> {
    endpoints
        .iter()
        .map(|e| EndpointFact { name: e.name.clone(), destination: e.destination.clone() })
        .collect()
}

/// Dials on one transport, says hello and waits for the welcome.
async fn attempt(
    dialer: &RelayDialer,
    kind: TransportKind,
    relay: &RelayAddress,
    addr: SocketAddr,
    config: &AgentConfig,
    deadline: Duration,
) -> Attempt {
    let ((result, handshake), took) = timed(async {
        let (dialed, handshake) =
            timed(dialer.dial(kind, (relay, addr), config, deadline, QuicSource::Shared)).await;
        let connection = match dialed {
            Ok(connection) => connection,
            Err(e) => return (Err(explain_dial(kind, addr, &e)), handshake),
        };
        let welcomed = authenticate(&connection, config).await;
        connection.close(CloseCode::Normal, "privlink check finished");
        (welcomed.map_err(|e| explain_session(&e)), handshake)
    })
    .await;
    Attempt { kind, took, result: result.map(|endpoints| Welcomed { handshake, endpoints }) }
}

/// The agent's side of the conversation up to the welcome.
async fn authenticate(
    connection: &AgentConnection,
    config: &AgentConfig,
) -> Result<Vec<EndpointAssignment>, SessionError> {
    let agent_id = format!("check-{}", crate::shared::random_id());
    let hello = hello(config, config.token.clone(), agent_id, config.allowlist.describe());
    // The machine's own handshake deadline bounds the wait for the relay's hello and welcome.
    let mut session = accept_control(connection, hello).await?;
    loop {
        session.flush().await?;
        match session.next().await {
            Ok(session::Step::Event(AgentEvent::Welcome(endpoints))) => return Ok(endpoints),
            Ok(session::Step::Event(AgentEvent::Refused { reason })) => {
                return Err(SessionError::Refused { peer: Peer::Relay, reason });
            }
            Ok(session::Step::Event(AgentEvent::Failed(error))) => return Err(session.fail(error)),
            Ok(_) => {}
            Err(e) => return Err(refusal_in_close(&session, connection, e)),
        }
    }
}

/// A dial failure as an operator reads it, with the likely cause.
fn explain_dial(kind: TransportKind, addr: SocketAddr, error: &DialError) -> String {
    match (kind, error) {
        (_, DialError::Certificate(explained) | DialError::KeyExchange(explained)) => {
            explained.clone()
        }
        (TransportKind::Quic, DialError::Timeout(after)) => format!(
            "no QUIC handshake within {after:?}: UDP to {addr} is blocked on the way (a \
             firewall or proxy that passes only TCP), or nothing answers there on UDP"
        ),
        (TransportKind::Tcp, DialError::Timeout(after)) => format!(
            "no TLS handshake within {after:?}: TCP to {addr} is dropped on the way, or the \
             relay does not answer"
        ),
        (TransportKind::Tcp, DialError::Handshake(reason)) if reason.contains("refused") => {
            format!("connection refused: nothing listens on TCP {addr} ({reason})")
        }
        (_, DialError::Handshake(reason)) => format!("handshake failed: {reason}"),
        (_, DialError::Proxy(refused)) => refused.to_string(),
    }
}

/// A failure after the handshake.
fn explain_session(error: &SessionError) -> String {
    match error {
        SessionError::Refused { reason, .. } => format!("the relay refused this agent: {reason}"),
        e => format!("handshake done, but no welcome: {e}"),
    }
}
