//! The agent-facing side of the relay: accepts tunnel connections, runs the control-stream
//! handshake (relay hello → agent hello → welcome or refusal → verdicts), registers the agent,
//! and keeps its control stream (heartbeats, drain notices) until the connection ends.
//!
//! Each incoming connection is handled in a task of its own, spawned before the handshake, so
//! a stalled peer never blocks the accept loop; every handshake step has a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use privlink_protocol::SOFTWARE_VERSION;
use privlink_protocol::frame::MAX_BODY_LEN;
use privlink_protocol::io::{
    FrameReader, ReadFrameError, WriteFrameError, read_frame, write_frame,
};
use privlink_protocol::message::{
    Control, EndpointAssignment, EndpointVerdict, Hello, PROTOCOL_VERSION, Verdict,
};
use privlink_protocol::transport::{
    CloseCode, StreamError, TunnelConnection, TunnelStream, h2, quic,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::auth::{AuthFailure, FailureLimiter, authenticate};
use crate::config::RelayConfig;
use crate::registry::{AgentRegistration, Registry};

/// Deadline for the QUIC handshake and for each control-stream handshake step.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused agent gets to read the refusal before the relay closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Interval between heartbeats on the control stream.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// Why an agent's tunnel connection ended before or during its session.
#[derive(Debug, thiserror::Error)]
pub enum AgentSessionError {
    /// The QUIC handshake did not complete.
    #[error("tunnel handshake: {0}")]
    Handshake(#[from] quic::DialError),
    /// The control stream could not be opened.
    #[error("control stream: {0}")]
    ControlStream(#[from] StreamError),
    /// The agent sent something other than what the protocol expects, or nothing in time.
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// Reading a control frame failed.
    #[error("reading from agent: {0}")]
    Read(#[from] ReadFrameError),
    /// Writing a control frame failed.
    #[error("writing to agent: {0}")]
    Write(#[from] WriteFrameError),
    /// The agent failed to authenticate.
    #[error("authentication failed: {0:?}")]
    Auth(AuthFailure),
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {0}, relay speaks {PROTOCOL_VERSION}")]
    Version(u16),
}

/// Shared state of the agent-facing side.
#[derive(Debug)]
pub(crate) struct TunnelContext {
    pub(crate) config: Arc<RelayConfig>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) failures: Mutex<FailureLimiter>,
    /// Cancelled when the relay starts shutting down: agents are told to drain.
    pub(crate) draining: CancellationToken,
}

impl TunnelContext {
    /// Whether a source has used up its failed authentications; such peers are turned away
    /// before any handshake work.
    fn is_blocked(&self, remote: SocketAddr) -> bool {
        self.failures.lock().map(|f| f.is_blocked(remote.ip(), Instant::now())).unwrap_or(false)
    }
}

/// Accepts QUIC agent connections until `stop` is cancelled.
pub(crate) async fn accept_quic_agents(
    endpoint: quinn::Endpoint,
    ctx: Arc<TunnelContext>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            () = stop.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        if ctx.is_blocked(remote) {
            debug!(%remote, "refusing tunnel connection: too many failed authentications");
            incoming.refuse();
            continue;
        }
        let ctx = Arc::clone(&ctx);
        let handshake = async move { Ok(quic::handshake(incoming, HANDSHAKE_TIMEOUT).await?) };
        tracker.spawn(
            serve_agent(handshake, remote, ctx)
                .instrument(tracing::info_span!("agent", %remote, transport = "quic")),
        );
    }
}

/// Accepts TLS/TCP agent connections until `stop` is cancelled.
pub(crate) async fn accept_tcp_agents(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<TunnelContext>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (socket, remote) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!("tunnel accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if ctx.is_blocked(remote) {
            debug!(%remote, "refusing tunnel connection: too many failed authentications");
            privlink_protocol::tcp::abort(socket);
            continue;
        }
        let ctx = Arc::clone(&ctx);
        let acceptor = acceptor.clone();
        let handshake = async move {
            h2::tune_socket(&socket);
            let steps = async {
                let tls = acceptor.accept(socket).await.map_err(|e| format!("TLS: {e}"))?;
                h2::relay_handshake(tls, remote).await.map_err(|e| format!("HTTP/2: {e}"))
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, steps).await {
                Ok(Ok(opener)) => Ok(TunnelConnection::from(opener)),
                Ok(Err(e)) => Err(AgentSessionError::Handshake(quic::DialError::Handshake(e))),
                Err(_) => {
                    Err(AgentSessionError::Handshake(quic::DialError::Timeout(HANDSHAKE_TIMEOUT)))
                }
            }
        };
        tracker.spawn(
            serve_agent(handshake, remote, ctx)
                .instrument(tracing::info_span!("agent", %remote, transport = "tcp")),
        );
    }
}

/// Runs one agent's session after its transport handshake, logging how it ended.
async fn serve_agent(
    handshake: impl Future<Output = Result<TunnelConnection, AgentSessionError>>,
    remote: SocketAddr,
    ctx: Arc<TunnelContext>,
) {
    let result = async {
        let connection = handshake.await?;
        run_agent(&connection, remote, &ctx).await
    }
    .await;
    match result {
        Ok(()) | Err(AgentSessionError::Auth(_)) => {} // logged where it happened
        Err(e) => warn!("agent session ended: {e}"),
    }
}

async fn run_agent(
    connection: &TunnelConnection,
    remote: SocketAddr,
    ctx: &TunnelContext,
) -> Result<(), AgentSessionError> {
    let mut control = connection.open_stream(HANDSHAKE_TIMEOUT).await?;
    write_frame(
        &mut control,
        &Control::RelayHello {
            protocol_version: PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_owned(),
        },
    )
    .await?;

    let hello = match read_frame(&mut control, MAX_BODY_LEN, HANDSHAKE_TIMEOUT).await? {
        Control::Hello(hello) => hello,
        other => {
            connection.close(CloseCode::ProtocolError, "expected hello");
            return Err(AgentSessionError::Protocol(format!("expected Hello, got {other:?}")));
        }
    };
    let (registration, agent_label) = admit(connection, &mut control, remote, hello, ctx).await?;
    let agent_span = tracing::info_span!("session", agent = %agent_label);
    run_control(connection, &mut control, &registration, ctx).instrument(agent_span).await
}

/// Checks version and token, answers welcome or refusal, reads verdicts, registers.
async fn admit(
    connection: &TunnelConnection,
    control: &mut TunnelStream,
    remote: SocketAddr,
    hello: Hello,
    ctx: &TunnelContext,
) -> Result<(AgentRegistration, String), AgentSessionError> {
    if hello.protocol_version != PROTOCOL_VERSION {
        warn!(version = hello.protocol_version, "refusing agent: unsupported protocol version");
        let reason = format!(
            "protocol version {} is not supported by this relay (it speaks {PROTOCOL_VERSION})",
            hello.protocol_version
        );
        refuse(connection, control, &reason).await;
        return Err(AgentSessionError::Version(hello.protocol_version));
    }
    if let Err(failure) =
        authenticate(&ctx.config.connectors, &hello.connector, hello.token.expose())
    {
        let now_blocked =
            ctx.failures.lock().map(|mut f| f.record_failure(remote.ip(), now())).unwrap_or(false);
        let cause = match failure {
            AuthFailure::UnknownConnector => "unknown connector",
            AuthFailure::WrongToken => "wrong token",
        };
        warn!(
            connector = %hello.connector,
            agent = %hello.agent_name,
            cause,
            "refusing agent: authentication failed{}",
            if now_blocked { "; further attempts from this address are refused for a minute" } else { "" }
        );
        let reason = format!(
            "authentication failed for connector `{}`: unknown connector or wrong token",
            hello.connector
        );
        refuse(connection, control, &reason).await;
        return Err(AgentSessionError::Auth(failure));
    }

    let endpoints: Vec<EndpointAssignment> = ctx
        .config
        .endpoints_of(&hello.connector)
        .map(|e| EndpointAssignment {
            name: e.name.clone(),
            destination: e.destination.to_string(),
        })
        .collect();
    write_frame(&mut *control, &Control::Welcome { endpoints }).await?;
    let label = format!("{}/{}", hello.connector, hello.agent_name);
    let registration =
        ctx.registry.register(&hello.connector, &hello.agent_name, connection.clone());
    info!(
        connector = %hello.connector,
        agent = %hello.agent_name,
        agent_id = %hello.agent_id,
        version = %hello.software_version,
        transport = %connection.kind(),
        "agent connected"
    );

    match read_frame(&mut *control, MAX_BODY_LEN, HANDSHAKE_TIMEOUT).await? {
        Control::Verdicts(verdicts) => record_verdicts(&registration, verdicts),
        other => {
            connection.close(CloseCode::ProtocolError, "expected verdicts");
            return Err(AgentSessionError::Protocol(format!("expected Verdicts, got {other:?}")));
        }
    }
    Ok((registration, label))
}

fn now() -> Instant {
    Instant::now()
}

/// Tells the agent why it was refused, then closes the connection with that reason.
async fn refuse(connection: &TunnelConnection, control: &mut TunnelStream, reason: &str) {
    // Best effort: the close below carries the reason too.
    let _ = write_frame(control, &Control::Refused { reason: reason.to_owned() }).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(control).await;
    // Closing now would discard the frame in flight: give the agent a moment to read it and
    // hang up itself, then close regardless.
    let _ = tokio::time::timeout(REFUSAL_LINGER, connection.closed()).await;
    connection.close(CloseCode::Refused, reason);
}

fn record_verdicts(registration: &AgentRegistration, verdicts: Vec<EndpointVerdict>) {
    // Record before logging: the log line is a readiness signal operators and tests act on.
    registration.set_verdicts(verdicts.iter().map(|v| (v.endpoint.clone(), v.verdict.clone())));
    for v in &verdicts {
        match &v.verdict {
            Verdict::Approved => info!(endpoint = %v.endpoint, "endpoint approved by agent"),
            Verdict::Rejected { reason } => {
                warn!(endpoint = %v.endpoint, %reason, "endpoint rejected by agent");
            }
        }
    }
}

/// Heartbeats and notices until the connection ends.
async fn run_control(
    connection: &TunnelConnection,
    control: &mut TunnelStream,
    registration: &AgentRegistration,
    ctx: &TunnelContext,
) -> Result<(), AgentSessionError> {
    // Cancel-safe: the select! below may drop a read in the middle of a frame.
    let mut frames = FrameReader::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.tick().await;
    let mut drain_sent = false;
    loop {
        tokio::select! {
            reason = connection.closed() => {
                info!(%reason, "agent disconnected");
                return Ok(());
            }
            () = ctx.draining.cancelled(), if !drain_sent => {
                drain_sent = true;
                // Best effort: the agent learns it should stop expecting new streams here.
                let _ = write_frame(&mut *control, &Control::Drain { reason: "relay shutting down".into() }).await;
            }
            _ = heartbeat.tick() => {
                let beat = Control::Heartbeat { active_streams: registration.active_streams() };
                write_frame(&mut *control, &beat).await?;
            }
            frame = frames.next::<Control, _>(&mut *control, MAX_BODY_LEN) => match frame {
                Ok(Control::Heartbeat { active_streams }) => debug!(active_streams, "agent heartbeat"),
                Ok(Control::Verdicts(verdicts)) => record_verdicts(registration, verdicts),
                Ok(Control::Drain { reason }) => {
                    info!(%reason, "agent is draining: no new streams go to it");
                    registration.set_draining();
                }
                Ok(other) => {
                    connection.close(CloseCode::ProtocolError, "unexpected control message");
                    return Err(AgentSessionError::Protocol(format!("unexpected control message {other:?}")));
                }
                Err(ReadFrameError::Closed) => {
                    // The agent finished its control stream: it is leaving. Wait for the close.
                    let reason = connection.closed().await;
                    info!(%reason, "agent disconnected");
                    return Ok(());
                }
                Err(e) => {
                    if let Some(reason) = connection.close_reason() {
                        info!(%reason, "agent disconnected");
                        return Ok(());
                    }
                    connection.close(CloseCode::ProtocolError, "bad control frame");
                    return Err(e.into());
                }
            },
        }
    }
}
