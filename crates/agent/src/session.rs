//! A session on one established tunnel connection: accept the relay's control stream and
//! drive the agent's side of the control conversation ([`AgentControl`]) — our hello, the
//! welcome or refusal, a verdict for each endpoint from the allowlist, heartbeats, drain
//! notices — while serving the data streams the relay opens, until the connection ends or the
//! agent winds the session down.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use privlink_protocol::control::{AgentControl, AgentEvent, ControlError, ControlMachine, Timers};
use privlink_protocol::destination::Destination;
use privlink_protocol::message::{
    EndpointAssignment, EndpointVerdict, Hello, PROTOCOL_VERSION, Verdict,
};
use privlink_protocol::{SOFTWARE_VERSION, text};
use privlink_transport::control::{ControlStream, now};
use privlink_transport::io::{ReadFrameError, WriteFrameError};
use privlink_transport::tunnel::{AgentConnection, CloseCode, DialError, StreamError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::AgentShared;
use crate::forward::serve_stream;

/// Why a session with a relay ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No tunnel connection.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The relay did not open its control stream.
    #[error("control stream: {0}")]
    ControlStream(#[from] StreamError),
    /// The relay refused this agent (token, connector, version).
    #[error("relay refused this agent: {0}")]
    Refused(String),
    /// The relay broke the control conversation, or went silent.
    #[error("relay {0}")]
    Protocol(#[from] ControlError),
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

/// Runs a session on an established connection until it ends or `wind_down` is cancelled,
/// then lets its streams finish (or be forced) and closes the connection. `ready` is cancelled
/// once the relay has the agent's verdicts (the session can carry streams). `link` is the relay
/// address dialled, which the agent's status is keyed by.
pub(crate) async fn serve_connection(
    connection: &AgentConnection,
    link: SocketAddr,
    shared: &AgentShared,
    wind_down: &CancellationToken,
    ready: &CancellationToken,
) -> Result<(), SessionError> {
    let streams = TaskTracker::new();
    let result = run_session(connection, link, shared, wind_down, ready, &streams).await;
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

/// Drives the agent's control state machine and accepts data streams.
async fn run_session(
    connection: &AgentConnection,
    link: SocketAddr,
    shared: &AgentShared,
    stop: &CancellationToken,
    ready: &CancellationToken,
    streams: &TaskTracker,
) -> Result<(), SessionError> {
    let mut control = accept_control(connection).await?;
    let hello = hello(
        &shared.config,
        shared.token(),
        shared.agent_id.clone(),
        shared.policy.rules().allowlist.describe(),
    );
    let mut machine = AgentControl::new(hello, now(), Timers::default());
    // Whether our hello went out: a failure after that, on a closed connection, is a refusal
    // that arrived as the close reason instead of a frame.
    let mut hello_sent = false;
    // The endpoints approved on this connection; the relay may open streams for these only.
    let mut approved: Arc<HashSet<String>> = Arc::default();
    // The verdicts sent on this connection, for the status view.
    let mut sent_verdicts = Vec::new();
    // The endpoints assigned on this connection, judged again when a reload changes the rules.
    let mut endpoints: Vec<EndpointAssignment> = Vec::new();
    let mut rules_changes = shared.rules_changed.subscribe();
    loop {
        while let Some(event) = machine.poll_event() {
            match event {
                AgentEvent::RelayHello { software_version } => {
                    hello_sent = true;
                    debug!(relay_version = %text::loggable(&software_version), "relay hello");
                }
                AgentEvent::Welcome(welcomed) => {
                    rules_changes.mark_unchanged(); // judged under the rules in force now
                    endpoints = welcomed;
                    let verdicts = judge(&endpoints, shared);
                    approved = Arc::new(approved_in(&verdicts).collect());
                    // Data streams are admitted from here on; the new limit leaves before
                    // the verdicts, so the relay can open a stream as soon as it reads them.
                    connection.allow_data_streams();
                    sent_verdicts.clone_from(&verdicts);
                    machine.send_verdicts(verdicts, now());
                }
                AgentEvent::EndpointsChanged { added, removed } => {
                    // A relay reload: judge the new endpoints, stop opening the removed ones.
                    let verdicts = judge(&added, shared);
                    let mut now_approved: HashSet<String> = (*approved).clone();
                    for name in &removed {
                        now_approved.remove(name);
                    }
                    now_approved.extend(approved_in(&verdicts));
                    approved = Arc::new(now_approved);
                    sent_verdicts.retain(|v| !removed.contains(&v.endpoint));
                    sent_verdicts.extend(verdicts.iter().cloned());
                    endpoints.retain(|e| !removed.contains(&e.name));
                    endpoints.extend(added);
                    shared.status.set_verdicts(link, &sent_verdicts);
                    machine.send_verdict_update(verdicts);
                }
                AgentEvent::Refused { reason } => return Err(SessionError::Refused(reason)),
                AgentEvent::Heartbeat { active_streams } => {
                    debug!(active_streams, "relay heartbeat")
                }
                AgentEvent::RelayDraining { reason } => {
                    info!(reason = %text::loggable(&reason), "relay is draining");
                }
                AgentEvent::Failed(error) => {
                    connection.close(CloseCode::ProtocolError, &error.to_string());
                    return Err(error.into());
                }
            }
        }
        control.send_queued(&mut machine).await?;
        if machine.is_established() && !ready.is_cancelled() {
            info!(transport = %connection.kind(), endpoints = endpoints.len(), "connected to relay");
            shared.status.connected(link, connection.kind(), &sent_verdicts);
            ready.cancel();
        }
        let active_streams = u32::try_from(streams.len()).unwrap_or(u32::MAX);
        machine.set_active_streams(active_streams);
        shared.status.set_active_streams(link, active_streams);
        let established = machine.is_established();
        tokio::select! {
            () = stop.cancelled(), if established => {
                let reason = if shared.shutdown.is_cancelled() { "agent shutting down" } else { "agent moving to another transport" };
                machine.drain(reason);
                let _ = control.send_queued(&mut machine).await;
                // Keep the control stream until the streams already running are done (dropping
                // it would reset it, which the relay takes for a broken agent), then end it
                // with FIN.
                streams.close();
                // The conversation goes on meanwhile: the relay's heartbeats are answered (and
                // ours sent), or it would take a long drain for a dead agent.
                loop {
                    tokio::select! {
                        () = streams.wait() => break,
                        () = shared.force.cancelled() => break,
                        _ = connection.closed() => break,
                        advanced = control.advance(&mut machine) => {
                            let failed = std::iter::from_fn(|| machine.poll_event())
                                .any(|event| matches!(event, AgentEvent::Failed(_)));
                            if advanced.is_err()
                                || failed
                                || control.send_queued(&mut machine).await.is_err()
                            {
                                break;
                            }
                        }
                    }
                }
                control.finish().await;
                return Ok(());
            }
            () = stop.cancelled(), if !established => return Ok(()),
            _ = rules_changes.changed(), if established => {
                // A reload changed the allowlist: judge every endpoint again, send what changed.
                let verdicts = judge(&endpoints, shared);
                let changed: Vec<EndpointVerdict> =
                    verdicts.iter().filter(|v| !sent_verdicts.contains(v)).cloned().collect();
                approved = Arc::new(approved_in(&verdicts).collect());
                sent_verdicts = verdicts;
                shared.status.set_verdicts(link, &sent_verdicts);
                machine.send_verdict_update(changed);
            }
            accepted = connection.accept_stream(), if established => match accepted {
                Ok(stream) => {
                    let policy = Arc::clone(&shared.policy);
                    let approved = Arc::clone(&approved);
                    let force = shared.force.clone();
                    streams.spawn(async move { serve_stream(stream, &policy, &approved, &force).await });
                }
                Err(e) => return Err(SessionError::Lost(e.to_string())),
            },
            advanced = control.advance(&mut machine) => {
                if let Err(e) = advanced {
                    if established {
                        let reason = connection.closed().await;
                        debug!("control stream ended: {e}");
                        return Err(SessionError::Lost(reason));
                    }
                    return Err(match connection.close_reason() {
                        Some(reason) if hello_sent => SessionError::Refused(reason),
                        _ => e.into(),
                    });
                }
            }
        }
    }
}

/// The relay's control stream, the connection's first, within the handshake deadline.
pub(crate) async fn accept_control(
    connection: &AgentConnection,
) -> Result<ControlStream, SessionError> {
    let accepted = tokio::time::timeout(Timers::HANDSHAKE, connection.accept_stream())
        .await
        .map_err(|_| {
            SessionError::Protocol(ControlError::Timeout {
                awaiting: "control stream",
                after: Timers::HANDSHAKE,
            })
        })??;
    Ok(ControlStream::new(accepted))
}

/// The agent's hello: who it is, the token it presents, and its allowlist (`allowed`, for the
/// relay's status view).
pub(crate) fn hello(
    config: &crate::AgentConfig,
    token: privlink_protocol::token::Token,
    agent_id: String,
    allowed: Vec<String>,
) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        connector: config.connector.clone(),
        token,
        agent_name: config.name.clone(),
        agent_id,
        software_version: SOFTWARE_VERSION.to_owned(),
        allowed,
    }
}

/// The endpoints `verdicts` approve.
fn approved_in(verdicts: &[EndpointVerdict]) -> impl Iterator<Item = String> + '_ {
    verdicts.iter().filter(|v| v.verdict == Verdict::Approved).map(|v| v.endpoint.clone())
}

/// A verdict for each endpoint the relay assigned, from this agent's allowlist.
fn judge(endpoints: &[EndpointAssignment], shared: &AgentShared) -> Vec<EndpointVerdict> {
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
    verdicts
}

fn verdict_for(destination: &str, shared: &AgentShared) -> Verdict {
    match destination.parse::<Destination>() {
        Ok(d) if shared.policy.rules().allowlist.matching(&d).is_some() => Verdict::Approved,
        Ok(d) => Verdict::Rejected { reason: format!("{d} is not in the agent's allowlist") },
        Err(e) => Verdict::Rejected { reason: format!("invalid destination: {e}") },
    }
}
