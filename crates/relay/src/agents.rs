//! Sessions with agents: accepting their tunnel connections on both transports, driving the
//! relay's side of the control conversation ([`RelayControl`]) — authentication, the welcome,
//! verdicts, heartbeats, drain notices — and keeping the agent in the [`Registry`] while its
//! connection lives.
//!
//! Each incoming connection is handled in a task of its own, spawned before the handshake, so
//! a stalled peer never blocks the accept loop; every handshake step has a deadline, and until
//! its hello is admitted the connection holds a place among the capped pending ones
//! ([`crate::admission`]).

use privlink_transport::listener::FirstBytes;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use privlink_admin::ReadyLatch;
use privlink_protocol::control::{ControlMachine as _, RelayControl, RelayEvent, Timers};
use privlink_protocol::message::{EndpointAssignment, EndpointVerdict, FleetView, Hello, Verdict};
use privlink_protocol::text;
use privlink_transport::io::ReadFrameError;
use privlink_transport::listener::{self, Handshake, TunnelListener};
use privlink_transport::session::{Peer, Session, SessionError, Step, now};
use privlink_transport::throttle::Throttle;
use privlink_transport::tunnel::{CloseCode, RelayConnection, RelaySide, TransportKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::admission::{Admission, PendingSlot};
use crate::audit::RelayAudit;
use crate::auth::{AuthFailure, FailureLimiter, authenticate};
use crate::config::CurrentConfig;
use crate::fleet::Fleet;
use crate::metrics::{AuthFailureReason, RelayMetrics};
use crate::registry::{AgentInfo, AgentRegistration, Registry};

/// Agents one connector may have connected to this relay at once: several share a
/// connector's load and take over from each other, but a token holder cannot fill the relay
/// with sessions.
pub const MAX_AGENTS_PER_CONNECTOR: usize = 64;
/// Longest silence between two warnings of one kind about unauthenticated connections
/// (handshakes that failed, hellos refused) while they keep coming: each line counts the ones
/// left out, so a flood of them cannot become a flood of log lines.
const PRE_AUTH_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a refused agent gets to read the refusal before the relay closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Shared state of the agent-facing side.
#[derive(Debug)]
pub(crate) struct AgentsContext {
    /// The configuration in force (a reload replaces it).
    pub(crate) config: Arc<CurrentConfig>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) failures: Mutex<FailureLimiter>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) metrics: Arc<RelayMetrics>,
    /// Drains when the relay starts shutting down: agents are told to drain.
    pub(crate) readiness: ReadyLatch,
    /// The fleet this relay belongs to, told to every agent before its welcome and whenever
    /// it changes.
    pub(crate) fleet: Option<Arc<Fleet>>,
    /// Agents authenticated, refused, draining and gone are audited.
    pub(crate) audit: Arc<RelayAudit>,
}

/// The fleet's next view, once it changes (never, without a fleet). An agent is told the view
/// of its welcome and every change after; a change it was welcomed with is told again, which
/// it takes as it is.
async fn fleet_changed(
    changes: &mut Option<tokio::sync::watch::Receiver<FleetView>>,
) -> Option<FleetView> {
    match changes {
        Some(changes) => match changes.changed().await {
            Ok(()) => Some(changes.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn agent_span(remote: SocketAddr, transport: TransportKind) -> tracing::Span {
    tracing::info_span!("agent", %remote, %transport, agent = tracing::field::Empty)
}

/// Accepts agents on both transports until `stop` is cancelled, each connection's handshake
/// and session in a task of its own.
pub(crate) async fn accept_agents(
    listener: TunnelListener,
    ctx: Arc<AgentsContext>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let admission = PendingCap(&ctx.admission);
    listener
        .serve(&admission, Timers::HANDSHAKE, &stop, |handshake, remote, kind, slot| {
            tracker.spawn(
                serve_agent(handshake, remote, slot, Arc::clone(&ctx))
                    .instrument(agent_span(remote, kind)),
            );
        })
        .await;
}

/// The cap on unauthenticated connections, as the tunnel listener asks it.
struct PendingCap<'a>(&'a Arc<Admission>);

impl listener::Admission for PendingCap<'_> {
    type Ticket = PendingSlot;

    fn wants_address_validation(&self) -> bool {
        self.0.wants_retry()
    }

    fn admit(&self, remote: SocketAddr, first: Arc<FirstBytes>) -> Option<PendingSlot> {
        // Never turned away: over a cap, an older pending connection makes room.
        Some(self.0.admit(remote.ip(), first))
    }
}

/// Runs one agent's session after its transport handshake, logging how it ended.
async fn serve_agent(
    handshake: Handshake,
    remote: SocketAddr,
    pending: PendingSlot,
    ctx: Arc<AgentsContext>,
) {
    let evicted = pending.evicted();
    let result = async {
        let connection = tokio::select! {
            connection = handshake => connection?,
            // A newer connection needed the place (the relay is flooded): give it up.
            () = evicted => return Ok(()),
        };
        AgentSession::new(&connection, remote, pending, &ctx).run().await
    }
    .await;
    match result {
        Ok(()) | Err(SessionError::Refused { .. }) => {} // logged where it happened
        Err(SessionError::Dial(e)) => {
            // Before any authentication: anyone can cause these, as fast as they connect.
            static HANDSHAKE_FAILURES: Throttle = Throttle::new(PRE_AUTH_LOG_INTERVAL);
            if let Some(left_out) = HANDSHAKE_FAILURES.admit(Instant::now()) {
                if matches!(e, privlink_transport::tunnel::DialError::KeyExchange(_)) {
                    let own = ctx.config.get().crypto.post_quantum;
                    let why = privlink_transport::crypto::no_common_key_exchange(own);
                    warn!(left_out, "agent session ended: tunnel handshake: {why} ({e})");
                } else {
                    warn!(left_out, "agent session ended: tunnel handshake: {e}");
                }
            }
        }
        Err(e) => warn!("agent session ended: {e}"),
    }
}

/// The relay's side of one agent's session, besides the control machine: what it decided
/// about the agent, and the agent's place in the registry once admitted.
struct AgentSession<'a> {
    connection: &'a RelayConnection,
    remote: SocketAddr,
    ctx: &'a AgentsContext,
    /// Held until the hello is admitted.
    pending: Option<PendingSlot>,
    registration: Option<AgentRegistration>,
    /// The connector this agent serves, once admitted (reloads are announced for it).
    connector: Option<String>,
    /// Refusals decided here are logged by `admit`; the machine's own (version) are not.
    refused_here: bool,
    /// When it was registered, and its name.
    registered: Option<(Instant, String)>,
}

type RelaySession = Session<RelayControl, RelaySide>;

impl<'a> AgentSession<'a> {
    fn new(
        connection: &'a RelayConnection,
        remote: SocketAddr,
        pending: PendingSlot,
        ctx: &'a AgentsContext,
    ) -> Self {
        Self {
            connection,
            remote,
            ctx,
            pending: Some(pending),
            registration: None,
            connector: None,
            refused_here: false,
            registered: None,
        }
    }

    /// Drives the session ([`converse`](Self::converse)) and audits the end of a registered
    /// agent's.
    async fn run(mut self) -> Result<(), SessionError> {
        let result = self.converse().await;
        if let (Some(connector), Some((since, agent))) = (&self.connector, &self.registered) {
            let reason = match (&result, self.connection.close_reason()) {
                (_, Some(reason)) => reason.to_string(),
                (Err(e), None) => e.to_string(),
                (Ok(()), None) => "closed".to_owned(),
            };
            let who = (connector.as_str(), agent.as_str());
            self.ctx.audit.agent_disconnected(who, self.remote, &reason, since.elapsed());
        }
        result
    }

    /// Drives the relay's control state machine on the connection's control stream until the
    /// connection ends.
    async fn converse(&mut self) -> Result<(), SessionError> {
        let machine = RelayControl::new(now(), Timers::default());
        let mut session = Session::open(self.connection, machine, Timers::HANDSHAKE).await?;
        let mut config_changes = self.ctx.config.subscribe();
        let mut fleet_changes = self.ctx.fleet.as_ref().map(|fleet| fleet.subscribe());
        let mut drain_sent = false;
        loop {
            session.flush().await?;
            if let Some(registration) = &self.registration {
                session.machine_mut().set_active_streams(registration.active_streams());
            }
            let established = session.machine().is_established();
            tokio::select! {
                reason = self.connection.closed() => {
                    info!(%reason, "agent disconnected");
                    return Ok(());
                }
                () = self.ctx.readiness.draining(), if !drain_sent => {
                    drain_sent = true;
                    session.machine_mut().drain("relay shutting down");
                }
                () = probe_requested(self.registration.as_ref()) => session.machine_mut().probe(now()),
                () = evicted(self.pending.as_ref()) => {
                    debug!("unauthenticated connection evicted: the relay is flooded");
                    self.connection.close(CloseCode::Refused, "too many unauthenticated connections");
                    return Ok(());
                }
                _ = config_changes.changed(), if established => self.announce_changes(&mut session),
                Some(view) = fleet_changed(&mut fleet_changes), if established => {
                    session.machine_mut().announce_fleet(view);
                }
                step = session.next() => match step {
                    Ok(Step::Event(event)) => {
                        if let Some(end) = self.on_event(&mut session, event, &mut config_changes).await {
                            return end;
                        }
                    }
                    Ok(Step::Heard) => {
                        if let Some(registration) = &self.registration {
                            registration.heard();
                        }
                    }
                    Ok(Step::Timer) => {}
                    Err(SessionError::Read { error: ReadFrameError::Closed, .. })
                        if self.registration.is_some() =>
                    {
                        // The agent finished its control stream: it is leaving. Wait for the close.
                        let reason = self.connection.closed().await;
                        info!(%reason, "agent disconnected");
                        return Ok(());
                    }
                    Err(e) => {
                        if let Some(reason) = self.connection.close_reason() {
                            info!(%reason, "agent disconnected");
                            return Ok(());
                        }
                        self.connection.close(CloseCode::ProtocolError, "bad control frame");
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Acts on one event of the machine; `Some` ends the session with that result.
    async fn on_event(
        &mut self,
        session: &mut RelaySession,
        event: RelayEvent,
        config_changes: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Option<Result<(), SessionError>> {
        match event {
            RelayEvent::Hello(hello) => match admit(&hello, self.remote, self.ctx)
                .and_then(|endpoints| Ok((register(self.connection, &hello, self.ctx)?, endpoints)))
            {
                Ok((registered, endpoints)) => {
                    self.connector = Some(hello.connector.clone());
                    config_changes.mark_unchanged(); // the welcome has the current list
                    let fleet = self.ctx.fleet.as_ref().map(|fleet| fleet.view());
                    session.machine_mut().accept(endpoints, fleet, now());
                    self.registration = Some(registered);
                    self.registered = Some((Instant::now(), hello.agent_name.clone()));
                    drop(self.pending.take()); // admitted: no longer pending
                    self.connection.admitted();
                }
                Err((reason, delay)) => {
                    self.refused_here = true;
                    // Slows down a source that keeps failing; a right token never waits.
                    tokio::time::sleep(delay).await;
                    session.machine_mut().refuse(reason);
                }
            },
            RelayEvent::Verdicts(verdicts) => {
                if let Some(registration) = &self.registration {
                    record_verdicts(registration, verdicts);
                }
            }
            RelayEvent::VerdictsIgnored(dropped) => {
                warn!(dropped, "verdicts for endpoints not assigned to this agent ignored");
            }
            RelayEvent::Heartbeat { active_streams } => debug!(active_streams, "agent heartbeat"),
            RelayEvent::AgentDraining { reason } => {
                let reason = text::loggable(&reason);
                info!(%reason, "agent is draining: no new streams go to it");
                if let Some(registration) = &self.registration {
                    registration.set_draining();
                    if let (Some(connector), Some((_, agent))) = (&self.connector, &self.registered)
                    {
                        self.ctx.audit.agent_draining((connector, agent), &reason);
                    }
                }
            }
            RelayEvent::Refused { reason } => {
                if !self.refused_here {
                    warn!(%reason, "refusing agent");
                }
                session.refuse(&reason, REFUSAL_LINGER).await;
                return Some(Err(SessionError::Refused { peer: Peer::Agent, reason }));
            }
            RelayEvent::Failed(error) => return Some(Err(session.fail(error))),
        }
        None
    }

    /// A reload changed the configuration: tells the agent which of its connector's endpoints
    /// were added and removed, and forgets its verdicts on the removed ones.
    fn announce_changes(&self, session: &mut RelaySession) {
        let Some(connector) = &self.connector else { return };
        let config = self.ctx.config.get();
        let endpoints: Vec<EndpointAssignment> = config
            .endpoints_of(connector)
            .map(|e| EndpointAssignment {
                name: e.name.clone(),
                destination: e.destination.to_string(),
            })
            .collect();
        let kept = endpoints.iter().filter(|e| session.machine().is_assigned(&e.name)).count();
        let added = endpoints.len() - kept;
        let removed = session.machine_mut().reassign(endpoints);
        if added == 0 && removed.is_empty() {
            return;
        }
        info!(added, removed = removed.len(), "telling the agent about changed endpoints");
        if let Some(registration) = &self.registration {
            registration.forget_verdicts(&removed);
        }
    }
}

/// Resolves when a newer connection evicted this still unauthenticated one (never once it is
/// admitted).
async fn evicted(pending: Option<&PendingSlot>) {
    match pending {
        Some(pending) => pending.evicted().await,
        None => std::future::pending().await,
    }
}

/// Resolves when a client connection suspects the registered agent (never before it is
/// registered).
async fn probe_requested(registration: Option<&AgentRegistration>) {
    match registration {
        Some(registration) => registration.probe_requested().await,
        None => std::future::pending().await,
    }
}

/// Checks the agent's token; returns its connector's endpoints, or the reason it is told and
/// how long to wait before telling it.
fn admit(
    hello: &Hello,
    remote: SocketAddr,
    ctx: &AgentsContext,
) -> Result<Vec<EndpointAssignment>, (String, Duration)> {
    let fields = [
        ("connector", &hello.connector),
        ("agent_name", &hello.agent_name),
        ("agent_id", &hello.agent_id),
        ("software_version", &hello.software_version),
    ];
    if let Some((field, value)) = fields.iter().find(|(_, value)| !text::is_valid_name(value)) {
        let delay = record_failure(ctx, remote);
        ctx.metrics.auth_failed(AuthFailureReason::InvalidHello);
        let claimed = (text::loggable(&hello.connector), text::loggable(&hello.agent_name));
        ctx.audit.auth_failed(remote, (&claimed.0, &claimed.1), "invalid_hello");
        static INVALID_HELLOS: Throttle = Throttle::new(PRE_AUTH_LOG_INTERVAL);
        if let Some(left_out) = INVALID_HELLOS.admit(Instant::now()) {
            warn!(field, value = %text::loggable(value), left_out, "refusing agent: invalid hello");
        }
        let reason = format!(
            "invalid hello: {field} must be 1 to {} letters, digits, '.', '-', '_' or '+'",
            text::MAX_NAME_LEN
        );
        return Err((reason, delay));
    }
    let config = ctx.config.get();
    if let Err(failure) = authenticate(&config.connectors, &hello.connector, hello.token.expose()) {
        let delay = record_failure(ctx, remote);
        let cause = match failure {
            AuthFailure::UnknownConnector => "unknown connector",
            AuthFailure::WrongToken => "wrong token",
        };
        let label = match failure {
            AuthFailure::UnknownConnector => "unknown_connector",
            AuthFailure::WrongToken => "wrong_token",
        };
        ctx.audit.auth_failed(remote, (&hello.connector, &hello.agent_name), label);
        ctx.metrics.auth_failed(match failure {
            AuthFailure::UnknownConnector => AuthFailureReason::UnknownConnector,
            AuthFailure::WrongToken => AuthFailureReason::WrongToken,
        });
        static AUTH_FAILURES: Throttle = Throttle::new(PRE_AUTH_LOG_INTERVAL);
        if let Some(left_out) = AUTH_FAILURES.admit(Instant::now()) {
            warn!(
                connector = %hello.connector,
                agent = %hello.agent_name,
                cause,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                left_out,
                "refusing agent: authentication failed (left_out: failures since the last such \
                 line; all are counted in privlink_relay_auth_failures_total)"
            );
        }
        let reason = format!(
            "authentication failed for connector `{}`: unknown connector or wrong token",
            hello.connector
        );
        return Err((reason, delay));
    }
    Ok(config
        .endpoints_of(&hello.connector)
        .map(|e| EndpointAssignment {
            name: e.name.clone(),
            destination: e.destination.to_string(),
        })
        .collect())
}

/// Counts a failed hello from `remote`; returns how long to wait before refusing it.
fn record_failure(ctx: &AgentsContext, remote: SocketAddr) -> Duration {
    ctx.failures
        .lock()
        .map(|mut f| f.record_failure(remote.ip(), Instant::now()))
        .unwrap_or(crate::auth::MAX_REFUSAL_DELAY)
}

/// Registers an admitted agent (its endpoints are pending until its verdicts arrive), unless
/// its connector already has [`MAX_AGENTS_PER_CONNECTOR`] agents here: then the reason it is
/// refused.
fn register(
    connection: &RelayConnection,
    hello: &Hello,
    ctx: &AgentsContext,
) -> Result<AgentRegistration, (String, Duration)> {
    let info = AgentInfo {
        connector: hello.connector.clone(),
        name: hello.agent_name.clone(),
        agent_id: hello.agent_id.clone(),
        version: hello.software_version.clone(),
        remote: connection.remote_address(),
        token_digest: privlink_protocol::token::TokenDigest::of(hello.token.expose()),
    };
    let Some(registration) =
        ctx.registry.register(info, connection.clone(), MAX_AGENTS_PER_CONNECTOR)
    else {
        let who = (hello.connector.as_str(), hello.agent_name.as_str());
        ctx.audit.auth_failed(connection.remote_address(), who, "too_many_agents");
        warn!(
            connector = %hello.connector,
            agent = %hello.agent_name,
            max = MAX_AGENTS_PER_CONNECTOR,
            "refusing agent: its connector has the most agents this relay takes"
        );
        let reason = format!(
            "connector `{}` already has {MAX_AGENTS_PER_CONNECTOR} agents connected to this \
             relay, the most it takes",
            hello.connector
        );
        return Err((reason, Duration::ZERO));
    };
    let label = format!("{}/{}", hello.connector, hello.agent_name);
    tracing::Span::current().record("agent", tracing::field::display(&label));
    ctx.audit.agent_authenticated(
        (&hello.connector, &hello.agent_name, &hello.agent_id),
        connection.remote_address(),
        connection.kind(),
        &hello.software_version,
    );
    info!(
        connector = %hello.connector,
        agent = %hello.agent_name,
        agent_id = %hello.agent_id,
        version = %hello.software_version,
        transport = %connection.kind(),
        "agent connected"
    );
    Ok(registration)
}

/// Records the agent's verdicts (the machine keeps only those for endpoints assigned to it),
/// each rejection reason made safe to log.
fn record_verdicts(registration: &AgentRegistration, mut verdicts: Vec<EndpointVerdict>) {
    for v in &mut verdicts {
        if let Verdict::Rejected { reason } = &mut v.verdict {
            *reason = text::loggable(reason).into_owned();
        }
    }
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
