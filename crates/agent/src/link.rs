//! Links to relays: for every configured relay, a connection to each address its name
//! resolves to, re-dialled with capped exponential backoff and jitter when it drops, and
//! re-resolved periodically so new relay addresses are picked up and vanished ones dropped.
//!
//! A session on one connection: accept the relay's control stream, answer its hello with
//! ours, receive the welcome (or a refusal), give a verdict for each endpoint, then serve
//! relay-opened streams and heartbeats until the connection ends or the agent shuts down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use privlink_protocol::frame::MAX_BODY_LEN;
use privlink_protocol::io::{
    FrameReader, ReadFrameError, WriteFrameError, read_frame, write_frame,
};
use privlink_protocol::message::{Control, EndpointVerdict, Hello, PROTOCOL_VERSION, Verdict};
use privlink_protocol::transport::{
    CloseCode, StreamError, TransportKind, TunnelConnection, h2, quic,
};
use privlink_protocol::{SOFTWARE_VERSION, destination::Destination};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, warn};

use crate::AgentShared;
use crate::config::{RelayAddress, TransportChoice};
use crate::forward::serve_stream;

/// Deadline for the QUIC handshake and each control-stream handshake step.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// First re-dial delay.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest re-dial delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How often relay names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);

/// Why a session with a relay ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No tunnel connection.
    #[error(transparent)]
    Dial(#[from] quic::DialError),
    /// The relay did not open its control stream.
    #[error("control stream: {0}")]
    ControlStream(#[from] StreamError),
    /// The relay refused this agent (token, connector, version).
    #[error("relay refused this agent: {0}")]
    Refused(String),
    /// The relay broke the protocol.
    #[error("relay protocol error: {0}")]
    Protocol(String),
    /// A control frame could not be read.
    #[error("reading from relay: {0}")]
    Read(#[from] ReadFrameError),
    /// A control frame could not be written.
    #[error("writing to relay: {0}")]
    Write(#[from] WriteFrameError),
    /// The established connection was lost.
    #[error("connection lost: {0}")]
    Lost(String),
}

/// Keeps links to every address of one relay name until `shutdown`.
pub(crate) async fn maintain_relay(
    relay: RelayAddress,
    shared: Arc<AgentShared>,
    tracker: TaskTracker,
) {
    let mut links: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    let mut backoff = Backoff::new();
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
                    let stop = shared.shutdown.child_token();
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
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn resolve(relay: &RelayAddress) -> std::io::Result<Vec<SocketAddr>> {
    let host = match &relay.host {
        privlink_protocol::destination::Host::Ip(ip) => {
            return Ok(vec![SocketAddr::new(*ip, relay.port)]);
        }
        privlink_protocol::destination::Host::Name(name) => name.clone(),
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
    let mut backoff = Backoff::new();
    loop {
        let started = Instant::now();
        let result = session(&relay, addr, &shared, &stop).await;
        if stop.is_cancelled() {
            return;
        }
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match result {
            Ok(()) => info!("relay link ended; reconnecting in {delay:?}"),
            Err(SessionError::Refused(reason)) => {
                error!("relay refused this agent: {reason}; retrying in {delay:?}")
            }
            Err(e) => warn!("relay link down: {e}; reconnecting in {delay:?}"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One session with a relay address on the transport(s) the configuration asks for.
async fn session(
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let only = match shared.config.transport {
        TransportChoice::Auto => return auto_session(relay, addr, shared, stop).await,
        TransportChoice::Quic => TransportKind::Quic,
        TransportChoice::Tcp => TransportKind::Tcp,
    };
    let connection = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(only, relay, addr, shared, HANDSHAKE_TIMEOUT) => dialed?,
    };
    serve_connection(&connection, shared, stop, &CancellationToken::new()).await
}

/// `transport = "auto"`: QUIC if a handshake completes within `quic_fallback_after`, else TLS
/// over TCP. While on TCP, QUIC is probed every `quic_probe_interval`; once it works, a QUIC
/// session starts (the relay prefers the newest agent connection) and the TCP session drains:
/// it tells the relay to send it no new streams and closes when its open streams are done.
async fn auto_session(
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let fallback_after = shared.config.quic_fallback_after;
    let quic_failure = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(TransportKind::Quic, relay, addr, shared, fallback_after) => match dialed {
            Ok(connection) => return serve_connection(&connection, shared, stop, &CancellationToken::new()).await,
            Err(e) => e,
        },
    };
    warn!("QUIC did not get through ({quic_failure}); falling back to TLS over TCP");
    let tcp = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(TransportKind::Tcp, relay, addr, shared, HANDSHAKE_TIMEOUT) => dialed?,
    };
    let tcp_wind_down = stop.child_token();
    let tcp_ready = CancellationToken::new();
    let mut on_tcp = std::pin::pin!(serve_connection(&tcp, shared, &tcp_wind_down, &tcp_ready));
    let quic = tokio::select! {
        result = &mut on_tcp => return result,
        quic = probe_quic(relay, addr, shared) => quic,
    };
    info!(
        "QUIC gets through again: new streams move to QUIC once it is approved; open TCP streams run to completion"
    );
    let quic_ready = CancellationToken::new();
    // Drain TCP only once the QUIC session has given its verdicts, so the relay always has an
    // approving agent; if the QUIC session fails before that, TCP simply carries on.
    let drain_tcp = async {
        tokio::select! {
            () = quic_ready.cancelled() => {
                tcp_wind_down.cancel();
                on_tcp.await
            }
            result = &mut on_tcp => result,
        }
    };
    let (on_quic, tcp_tail) =
        tokio::join!(serve_connection(&quic, shared, stop, &quic_ready), drain_tcp);
    if let Err(e) = tcp_tail {
        debug!("TCP session after the move to QUIC: {e}");
    }
    on_quic
}

/// Dials QUIC every `quic_probe_interval` until a handshake completes.
async fn probe_quic(
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
) -> TunnelConnection {
    let mut ticks = tokio::time::interval(shared.config.quic_probe_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match dial(TransportKind::Quic, relay, addr, shared, shared.config.quic_fallback_after)
            .await
        {
            Ok(connection) => return connection,
            Err(e) => debug!("QUIC probe: {e}"),
        }
    }
}

/// Establishes a tunnel connection on one transport within `deadline`.
async fn dial(
    kind: TransportKind,
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
    deadline: Duration,
) -> Result<TunnelConnection, SessionError> {
    let server_name = relay.host.to_string();
    let server_name = server_name.trim_start_matches('[').trim_end_matches(']');
    match kind {
        TransportKind::Quic => Ok(quic::dial(&shared.quic, addr, server_name, deadline).await?),
        TransportKind::Tcp => {
            let name = ServerName::try_from(server_name.to_owned())
                .map_err(|e| quic::DialError::Handshake(format!("relay name: {e}")))?;
            let steps = async {
                let socket =
                    TcpStream::connect(addr).await.map_err(|e| format!("TCP connect: {e}"))?;
                h2::tune_socket(&socket);
                let tls = TlsConnector::from(Arc::clone(&shared.tls))
                    .connect(name, socket)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                h2::agent_handshake(tls, addr)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake failed: {e}"))
            };
            match tokio::time::timeout(deadline, steps).await {
                Ok(Ok(acceptor)) => Ok(acceptor.into()),
                Ok(Err(e)) => Err(quic::DialError::Handshake(e).into()),
                Err(_) => Err(quic::DialError::Timeout(deadline).into()),
            }
        }
    }
}

/// Runs a session on an established connection until it ends or `wind_down` is cancelled,
/// then lets its streams finish (or be forced) and closes the connection. `ready` is cancelled
/// once the relay has the agent's verdicts (the session can carry streams).
async fn serve_connection(
    connection: &TunnelConnection,
    shared: &AgentShared,
    wind_down: &CancellationToken,
    ready: &CancellationToken,
) -> Result<(), SessionError> {
    let streams = TaskTracker::new();
    let result = run_session(connection, shared, wind_down, ready, &streams).await;
    // Streams already running finish (or are forced) before this link re-dials.
    streams.close();
    tokio::select! {
        () = streams.wait() => {}
        () = shared.force.cancelled() => streams.wait().await,
    }
    let (code, reason) = if shared.shutdown.is_cancelled() {
        (CloseCode::Shutdown, "agent shutting down")
    } else if wind_down.is_cancelled() {
        (CloseCode::Normal, "agent moved to another transport")
    } else {
        (CloseCode::Normal, "session ended")
    };
    connection.close(code, reason);
    result
}

async fn run_session(
    connection: &TunnelConnection,
    shared: &AgentShared,
    stop: &CancellationToken,
    ready: &CancellationToken,
    streams: &TaskTracker,
) -> Result<(), SessionError> {
    let accept_control = tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.accept_stream());
    let mut control = accept_control
        .await
        .map_err(|_| SessionError::Protocol("relay opened no control stream".into()))??;
    match read_frame(&mut control, MAX_BODY_LEN, HANDSHAKE_TIMEOUT).await? {
        Control::RelayHello { protocol_version, software_version } => {
            if protocol_version != PROTOCOL_VERSION {
                return Err(SessionError::Protocol(format!(
                    "relay speaks protocol version {protocol_version}, this agent speaks {PROTOCOL_VERSION}"
                )));
            }
            debug!(relay_version = %software_version, "relay hello");
        }
        other => {
            return Err(SessionError::Protocol(format!("expected RelayHello, got {other:?}")));
        }
    }
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        connector: shared.config.connector.clone(),
        token: shared.config.token.clone(),
        agent_name: shared.config.name.clone(),
        agent_id: shared.agent_id.clone(),
        software_version: SOFTWARE_VERSION.to_owned(),
        allowed: shared.policy.allowlist.describe(),
    };
    write_frame(&mut control, &Control::Hello(hello)).await?;
    let endpoints = match read_frame(&mut control, MAX_BODY_LEN, HANDSHAKE_TIMEOUT).await {
        Ok(Control::Welcome { endpoints }) => endpoints,
        Ok(Control::Refused { reason }) => return Err(SessionError::Refused(reason)),
        Ok(other) => {
            return Err(SessionError::Protocol(format!("expected Welcome, got {other:?}")));
        }
        Err(e) => {
            // A refusal may arrive as the connection's close reason instead of a frame.
            return Err(match connection.close_reason() {
                Some(reason) => SessionError::Refused(reason),
                None => e.into(),
            });
        }
    };
    let verdicts: Vec<EndpointVerdict> = endpoints
        .iter()
        .map(|e| EndpointVerdict {
            endpoint: e.name.clone(),
            verdict: verdict_for(&e.destination, shared),
        })
        .collect();
    for v in &verdicts {
        match &v.verdict {
            Verdict::Approved => info!(endpoint = %v.endpoint, "endpoint approved"),
            Verdict::Rejected { reason } => {
                warn!(endpoint = %v.endpoint, %reason, "endpoint rejected")
            }
        }
    }
    write_frame(&mut control, &Control::Verdicts(verdicts)).await?;
    info!(transport = %connection.kind(), endpoints = endpoints.len(), "connected to relay");
    ready.cancel();

    // Cancel-safe: the select! below may drop a read in the middle of a frame.
    let mut frames = FrameReader::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                let reason = if shared.shutdown.is_cancelled() { "agent shutting down" } else { "agent moving to another transport" };
                let _ = write_frame(&mut control, &Control::Drain { reason: reason.into() }).await;
                // Keep the control stream until the streams already running are done (dropping
                // it would reset it, which the relay takes for a broken agent), then end it
                // with FIN.
                streams.close();
                tokio::select! {
                    () = streams.wait() => {}
                    () = shared.force.cancelled() => {}
                    _ = connection.closed() => {}
                }
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut control).await;
                return Ok(());
            }
            accepted = connection.accept_stream() => match accepted {
                Ok(stream) => {
                    let shared_policy = Arc::clone(&shared.policy);
                    let force = shared.force.clone();
                    streams.spawn(async move { serve_stream(stream, &shared_policy, &force).await });
                }
                Err(e) => return Err(SessionError::Lost(e.to_string())),
            },
            _ = heartbeat.tick() => {
                let active = u32::try_from(streams.len()).unwrap_or(u32::MAX);
                write_frame(&mut control, &Control::Heartbeat { active_streams: active }).await?;
            }
            frame = frames.next::<Control, _>(&mut control, MAX_BODY_LEN) => match frame {
                Ok(Control::Heartbeat { active_streams }) => debug!(active_streams, "relay heartbeat"),
                Ok(Control::Drain { reason }) => info!(%reason, "relay is draining"),
                Ok(other) => {
                    connection.close(CloseCode::ProtocolError, "unexpected control message");
                    return Err(SessionError::Protocol(format!("unexpected control message {other:?}")));
                }
                Err(e) => {
                    let reason = connection.closed().await;
                    debug!("control stream ended: {e}");
                    return Err(SessionError::Lost(reason));
                }
            },
        }
    }
}

fn verdict_for(destination: &str, shared: &AgentShared) -> Verdict {
    match destination.parse::<Destination>() {
        Ok(d) if shared.policy.allowlist.matching(&d).is_some() => Verdict::Approved,
        Ok(d) => Verdict::Rejected { reason: format!("{d} is not in the agent's allowlist") },
        Err(e) => Verdict::Rejected { reason: format!("invalid destination: {e}") },
    }
}

/// Capped exponential backoff with "equal jitter": half the delay fixed, half random, so a
/// fleet of agents cut off together does not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    attempt: u32,
    random: SystemRandom,
}

impl Backoff {
    fn new() -> Self {
        Self { attempt: 0, random: SystemRandom::new() }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let exp = BACKOFF_INITIAL.saturating_mul(1u32 << self.attempt.min(16));
        let ceiling = exp.min(BACKOFF_MAX);
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
        let mut b = Backoff::new();
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
