//! A session on one established tunnel connection: accept the relay's control stream and
//! drive the agent's side of the control conversation ([`AgentControl`], through transport's
//! session driver) — our hello, the welcome or refusal, a verdict for each endpoint from the
//! allowlist, heartbeats, drain notices — while serving the data streams the relay opens,
//! until the connection ends or the agent winds the session down.

use std::collections::HashSet;
use std::sync::Arc;

use privlink_admin::{Readiness, ReadyLatch};
use privlink_protocol::control::{AgentControl, AgentEvent, ControlMachine as _, Timers};
use privlink_protocol::destination::Destination;
use privlink_protocol::message::{
    EndpointAssignment, EndpointVerdict, Hello, PROTOCOL_VERSION, Verdict,
};
use privlink_protocol::pattern::DestinationPattern;
use privlink_protocol::{SOFTWARE_VERSION, text};
pub use privlink_transport::session::SessionError;
use privlink_transport::session::{Peer, Session, Step, now};
use privlink_transport::tunnel::{AgentConnection, AgentSide, CloseCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::fleet::{Link, Reached};
use crate::forward::serve_stream;
use crate::shared::AgentShared;

/// The agent's session driver.
pub(crate) type AgentSession = Session<AgentControl, AgentSide>;

/// Runs a session on an established connection until it ends or `wind_down` is cancelled,
/// then lets its streams finish (or be forced) and closes the connection. `ready` turns ready
/// once the relay has the agent's verdicts (the session can carry streams). `link` says which
/// link this is (the agent's status is keyed by it) and which relays of a fleet its siblings
/// hold: a session that reaches one of those ends before it judges anything.
pub(crate) async fn serve_connection(
    connection: &AgentConnection,
    link: &Link,
    shared: &AgentShared,
    wind_down: &CancellationToken,
    ready: &ReadyLatch,
) -> Result<(), SessionError> {
    let streams = TaskTracker::new();
    let result = run_session(connection, link, shared, wind_down, ready, &streams).await;
    // Streams already running finish (or are forced) before this link re-dials.
    streams.close();
    tokio::select! {
        () = streams.wait() => {}
        () = shared.force.cancelled() => streams.wait().await,
    }
    if ready.current() == Readiness::Ready {
        let reason = match (&result, connection.close_reason()) {
            (Err(e), _) => e.to_string(),
            (Ok(_), Some(reason)) => reason.to_string(),
            (Ok(_), None) => "session ended".to_owned(),
        };
        crate::audit::link_down(&shared.policy.audit, &link.relay, link.key.address, &reason);
    }
    let (code, reason) = if shared.shutdown.is_cancelled() {
        (CloseCode::Shutdown, "agent shutting down")
    } else if result.as_ref().is_ok_and(|end| *end == SessionEnd::Duplicate) {
        (CloseCode::Normal, "another link of this agent holds this relay")
    } else if wind_down.is_cancelled() {
        (CloseCode::Normal, "agent moved to another transport")
    } else {
        (CloseCode::Normal, "session ended")
    };
    connection.close(code, reason);
    result.map(drop)
}

/// How a session that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The agent or the relay ended it.
    Ended,
    /// It reached a relay of a fleet that another link of the agent holds.
    Duplicate,
}

/// Drives the agent's control state machine and accepts data streams.
async fn run_session(
    connection: &AgentConnection,
    link: &Link,
    shared: &AgentShared,
    stop: &CancellationToken,
    ready: &ReadyLatch,
    streams: &TaskTracker,
) -> Result<SessionEnd, SessionError> {
    let key = link.key;
    let hello = hello(
        &shared.config,
        shared.token(),
        shared.agent_id.clone(),
        shared.policy.rules().allowlist.describe(),
    );
    let mut session = accept_control(connection, hello).await?;
    // The endpoints approved on this connection (the machine's, shared with stream tasks):
    // the relay may open streams for these only.
    let mut approved: Arc<HashSet<String>> = Arc::default();
    let mut rules_changes = shared.rules_changed.subscribe();
    loop {
        session.flush().await?;
        if session.machine().is_established() && ready.current() != Readiness::Ready {
            let endpoints = session.machine().endpoints().len();
            info!(transport = %connection.kind(), endpoints, "connected to relay");
            crate::audit::link_up(
                &shared.policy.audit,
                &link.relay,
                key.address,
                connection.kind(),
            );
            shared.status.connected(key, connection, session.machine().verdicts());
            ready.set(Readiness::Ready);
        }
        let active_streams = u32::try_from(streams.len()).unwrap_or(u32::MAX);
        session.machine_mut().set_active_streams(active_streams);
        shared.status.set_active_streams(key, active_streams);
        let established = session.machine().is_established();
        tokio::select! {
            () = stop.cancelled(), if established => {
                let reason = if shared.shutdown.is_cancelled() { "agent shutting down" } else { "agent moving to another transport" };
                session.machine_mut().drain(reason);
                // Keep the control stream until the streams already running are done (dropping
                // it would reset it, which the relay takes for a broken agent), then end it
                // with FIN. The conversation goes on meanwhile: the relay's heartbeats are
                // answered (and ours sent), or it would take a long drain for a dead agent.
                streams.close();
                session.linger(async {
                    tokio::select! {
                        () = streams.wait() => {}
                        () = shared.force.cancelled() => {}
                    }
                }).await;
                session.finish().await;
                return Ok(SessionEnd::Ended);
            }
            () = stop.cancelled(), if !established => return Ok(SessionEnd::Ended),
            _ = rules_changes.changed(), if established => {
                // A reload changed the allowlist: judge every endpoint again, send what changed.
                let machine = session.machine_mut();
                let changed: Vec<EndpointVerdict> = judge(machine.endpoints(), shared)
                    .into_iter()
                    .filter(|v| !machine.verdicts().contains(v))
                    .collect();
                machine.send_verdict_update(changed);
                approved = Arc::new(machine.approved());
                shared.status.set_verdicts(key, machine.verdicts());
            }
            accepted = connection.accept_stream(), if established => match accepted {
                Ok(mut stream) => {
                    let policy = Arc::clone(&shared.policy);
                    let approved = Arc::clone(&approved);
                    let force = shared.force.clone();
                    // The task owns the stream (once); `serve_stream` borrows it.
                    streams.spawn(async move {
                        serve_stream(&mut stream, &policy, &approved, &force).await;
                    });
                }
                Err(e) => return Err(SessionError::Lost(e.to_string())),
            },
            step = session.next() => match step {
                Ok(Step::Event(event)) => {
                    match on_event(&mut session, event, connection, link, shared, &mut rules_changes)? {
                        Handled::VerdictsChanged => approved = Arc::new(session.machine().approved()),
                        Handled::Duplicate => return Ok(SessionEnd::Duplicate),
                        Handled::Done => {}
                    }
                }
                Ok(Step::Heard | Step::Timer) => {}
                Err(e) if established => {
                    let reason = connection.closed().await;
                    debug!("control stream ended: {e}");
                    return Err(SessionError::Lost(reason));
                }
                Err(e) => return Err(refusal_in_close(&session, connection, e)),
            },
        }
    }
}

/// What acting on an event calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Nothing more.
    Done,
    /// The verdicts sent changed: the approved set is read again.
    VerdictsChanged,
    /// The relay is one of a fleet that another link holds: end the session.
    Duplicate,
}

/// Acts on one event of the machine; an error ends the session.
fn on_event(
    session: &mut AgentSession,
    event: AgentEvent,
    connection: &AgentConnection,
    link: &Link,
    shared: &AgentShared,
    rules_changes: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<Handled, SessionError> {
    match event {
        AgentEvent::RelayHello { software_version } => {
            debug!(relay_version = %text::loggable(&software_version), "relay hello");
        }
        AgentEvent::Welcome(endpoints) => {
            rules_changes.mark_unchanged(); // judged under the rules in force now
            let verdicts = judge(&endpoints, shared);
            // Data streams are admitted from here on; the new limit leaves before the
            // verdicts, so the relay can open a stream as soon as it reads them.
            connection.allow_data_streams();
            session.machine_mut().send_verdicts(verdicts, now());
            return Ok(Handled::VerdictsChanged);
        }
        AgentEvent::EndpointsChanged { added, .. } => {
            // A relay reload: the machine forgot the removed endpoints; judge the added ones.
            let verdicts = judge(&added, shared);
            session.machine_mut().send_verdict_update(verdicts);
            shared.status.set_verdicts(link.key, session.machine().verdicts());
            return Ok(Handled::VerdictsChanged);
        }
        AgentEvent::Fleet(view) if !session.machine().is_established() => {
            // Before the welcome: a relay another link holds gets no second one.
            let relay_id = text::loggable(&view.relay).into_owned();
            match link.cover.reached(link.key, &view) {
                Reached::Held => {
                    debug!(%relay_id, members = view.members.len(), "reached a relay of a fleet");
                    shared.status.set_relay_id(link.key, &view.relay);
                }
                Reached::Duplicate { holder } => {
                    debug!(%relay_id, %holder, "another link holds this relay of the fleet");
                    return Ok(Handled::Duplicate);
                }
            }
        }
        AgentEvent::Fleet(view) => {
            info!(members = view.members.len(), "the relay fleet changed");
            link.cover.updated(&view);
        }
        AgentEvent::Refused { reason } => {
            return Err(SessionError::Refused { peer: Peer::Relay, reason });
        }
        AgentEvent::Heartbeat { active_streams } => debug!(active_streams, "relay heartbeat"),
        AgentEvent::RelayDraining { reason } => {
            info!(reason = %text::loggable(&reason), "relay is draining");
        }
        AgentEvent::Failed(error) => return Err(session.fail(error)),
    }
    Ok(Handled::Done)
}

/// A failure before the conversation was established. Once our hello is out, a connection
/// the relay closed with a reason is a refusal that arrived as the close instead of a frame.
pub(crate) fn refusal_in_close(
    session: &AgentSession,
    connection: &AgentConnection,
    error: SessionError,
) -> SessionError {
    match connection.close_reason() {
        Some(reason) if session.machine().hello_sent() => {
            SessionError::Refused { peer: Peer::Relay, reason }
        }
        _ => error,
    }
}

/// Accepts the relay's control stream, the connection's first, within the handshake deadline;
/// the conversation starts with `hello` once the relay has introduced itself.
pub(crate) async fn accept_control(
    connection: &AgentConnection,
    hello: Hello,
) -> Result<AgentSession, SessionError> {
    let machine = AgentControl::new(hello, now(), Timers::default());
    Session::accept(connection, machine, Timers::HANDSHAKE).await
}

/// The agent's hello: who it is, the token it presents, and its allowlist (`allowed`, for the
/// relay's status view).
pub(crate) fn hello(
    config: &crate::config::AgentConfig,
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

/// A verdict for each endpoint the relay assigned, from this agent's allowlist.
fn judge(endpoints: &[EndpointAssignment], shared: &AgentShared) -> Vec<EndpointVerdict> {
    let verdicts: Vec<EndpointVerdict> = endpoints
        .iter()
        .map(|e| EndpointVerdict { endpoint: e.name.clone(), verdict: verdict_for(e, shared) })
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

fn verdict_for(assignment: &EndpointAssignment, shared: &AgentShared) -> Verdict {
    let allowlist = &shared.policy.rules().allowlist;
    if let Some(patterns) = assignment.connect_patterns() {
        // A CONNECT endpoint: approved when some destination its clients may ask for is one
        // this agent allows; each stream is judged on its own when it comes.
        let mut written = Vec::new();
        for text in patterns {
            match text.parse::<DestinationPattern>() {
                Ok(pattern) if allowlist.overlapping(&pattern) => return Verdict::Approved,
                Ok(_) => written.push(text),
                Err(e) => {
                    return Verdict::Rejected {
                        reason: format!("invalid destination pattern: {e}"),
                    };
                }
            }
        }
        return Verdict::Rejected {
            reason: format!(
                "none of the CONNECT destinations ({}) is in the agent's allowlist",
                written.join(", ")
            ),
        };
    }
    let destination = &assignment.destination;
    match destination.parse::<Destination>() {
        Ok(d) if shared.policy.rules().allowlist.matching(&d).is_some() => Verdict::Approved,
        Ok(d) => Verdict::Rejected { reason: format!("{d} is not in the agent's allowlist") },
        Err(e) => Verdict::Rejected { reason: format!("invalid destination: {e}") },
    }
}
