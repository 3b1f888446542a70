//! The agents connected to this relay, what each said about each endpoint, and how load is
//! spread over them.
//!
//! An agent is registered once it has authenticated (its endpoints are then `Pending`) and
//! stays until its connection ends (the [`AgentRegistration`] guard removes it). A new client
//! connection goes to the approving agent with the fewest active streams. Every change bumps
//! a watch channel so callers (the status view, tests, the demo) can wait for a state.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use privlink_protocol::message::Verdict;
use privlink_transport::tunnel::{RelayConnection, TransportKind};
use tokio::sync::{Notify, watch};

/// An endpoint's status, in the vocabulary of Azure private-endpoint connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointStatus {
    /// No agent of its connector is connected.
    Disconnected,
    /// An agent is connected but has not given its verdict yet.
    Pending,
    /// At least one connected agent approved it.
    Approved,
    /// Every connected agent rejected it.
    Rejected {
        /// One rejecting agent's reason.
        reason: String,
    },
}

impl EndpointStatus {
    /// The status an endpoint has among the connected agents of its connector, given each
    /// one's drain flag and verdict on it (`None`: not given yet). A draining agent takes no
    /// new connections, so its verdict no longer counts.
    pub fn among<'a>(agents: impl IntoIterator<Item = (bool, Option<&'a Verdict>)>) -> Self {
        let mut connected = false;
        let mut pending = false;
        let mut rejection = None;
        for (_, verdict) in agents.into_iter().filter(|(draining, _)| !draining) {
            connected = true;
            match verdict {
                Some(Verdict::Approved) => return Self::Approved,
                Some(Verdict::Rejected { reason }) => rejection = Some(reason.clone()),
                None => pending = true,
            }
        }
        match (connected, pending, rejection) {
            (false, _, _) => Self::Disconnected,
            (true, true, _) | (true, false, None) => Self::Pending,
            (true, false, Some(reason)) => Self::Rejected { reason },
        }
    }

    /// The status as one word (`Approved`, `Pending`, `Rejected`, `Disconnected`), as the
    /// status API and the metrics name it.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Disconnected => "Disconnected",
            Self::Pending => "Pending",
            Self::Approved => "Approved",
            Self::Rejected { .. } => "Rejected",
        }
    }
}

impl fmt::Display for EndpointStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected { reason } => write!(f, "Rejected ({reason})"),
            other => f.write_str(other.word()),
        }
    }
}

/// Who a connecting agent says it is, and where it connects from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Its connector.
    pub connector: String,
    /// Its name.
    pub name: String,
    /// The random id it draws at each start (tells two agents of one name apart).
    pub agent_id: String,
    /// Its software version.
    pub version: String,
    /// The address its tunnel connection comes from.
    pub remote: std::net::SocketAddr,
    /// The digest of the token it presented (a reload that drops it from the connector's
    /// `token_sha256` disconnects the agent).
    pub token_digest: privlink_protocol::token::TokenDigest,
}

/// What the relay knows of one connected agent, for status views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    /// The agent's name.
    pub name: String,
    /// Its connector, id, version and remote address.
    pub info: AgentInfo,
    /// When it was registered.
    pub connected_since: std::time::SystemTime,
    /// Its verdict per endpoint, sorted by endpoint (an endpoint not listed is pending).
    pub verdicts: Vec<(String, Verdict)>,
    /// The transport its connection uses.
    pub transport: TransportKind,
    /// What its connection's TLS negotiated (key exchange, cipher suite).
    pub tls: Option<privlink_transport::crypto::TlsSummary>,
    /// Whether it announced a drain (it gets no new streams).
    pub draining: bool,
    /// Streams the relay has open on it.
    pub active_streams: u32,
}

impl AgentView {
    /// Its verdict on `endpoint`, if it gave one.
    pub fn verdict(&self, endpoint: &str) -> Option<&Verdict> {
        let found = self.verdicts.binary_search_by(|(name, _)| name.as_str().cmp(endpoint));
        found.ok().map(|at| &self.verdicts[at].1)
    }
}

/// One connected agent.
#[derive(Debug)]
struct AgentEntry {
    connector: String,
    name: String,
    info: AgentInfo,
    connected_since: std::time::SystemTime,
    connection: RelayConnection,
    /// Endpoint name → verdict; an absent endpoint is still pending.
    verdicts: HashMap<String, Verdict>,
    /// Set once the agent announced a drain: it gets no new streams.
    draining: bool,
    active_streams: Arc<AtomicU32>,
    suspicion: Arc<Suspicion>,
    /// Endpoint → when an open for it last failed on this agent before its answer.
    failed_opens: HashMap<String, Instant>,
}

/// How long an agent whose open for an endpoint failed before the answer (a destination it
/// cannot reach, a reset, no answer in time) is chosen for that endpoint only when no other
/// approving agent is left: without it the least-loaded choice kept giving it half the new
/// connections, each paying a failed try (or a whole `open_timeout`) before its replay.
pub const FAILED_OPEN_MEMORY: Duration = Duration::from_secs(10);

/// Above this many remembered failures, an agent's expired ones are pruned at the next one.
const FAILED_OPENS_PRUNE_AT: usize = 64;

/// Set while an agent has left an open unanswered and has not been heard from since: it is
/// chosen for no new connection, and its session sends a heartbeat at once, which clears the
/// suspicion when anything comes back — or ends the session when nothing does. So one
/// silent agent costs one open timeout, not one per connection.
#[derive(Debug, Default)]
pub struct Suspicion {
    suspect: AtomicBool,
    probe: Notify,
}

impl Suspicion {
    /// Whether the agent is suspected now.
    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct State {
    agents: HashMap<u64, AgentEntry>,
    next_id: u64,
}

/// The registry of connected agents.
#[derive(Debug)]
pub struct Registry {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { state: Mutex::default(), changed: watch::Sender::new(0) }
    }
}

/// An agent chosen to carry one client connection. Holding it counts one active stream.
#[derive(Debug)]
pub struct ChosenAgent {
    /// The registry's id of the agent (to try another one after it).
    pub id: u64,
    /// The agent's name, for logs.
    pub name: String,
    /// Its tunnel connection.
    pub connection: RelayConnection,
    active_streams: Arc<AtomicU32>,
    suspicion: Arc<Suspicion>,
}

impl ChosenAgent {
    /// The agent left an open unanswered: choose it for nothing new until it is heard from,
    /// and have its session check on it now.
    pub fn suspect(&self) {
        self.suspicion.suspect.store(true, Ordering::Relaxed);
        self.suspicion.probe.notify_one();
    }
}

impl Drop for ChosenAgent {
    fn drop(&mut self) {
        self.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps an agent registered; dropping it removes the agent.
#[derive(Debug)]
pub struct AgentRegistration {
    registry: Arc<Registry>,
    id: u64,
    active_streams: Arc<AtomicU32>,
    suspicion: Arc<Suspicion>,
}

impl AgentRegistration {
    /// The agent was heard from: whatever it was suspected of, it is alive.
    pub fn heard(&self) {
        self.suspicion.suspect.store(false, Ordering::Relaxed);
    }

    /// Resolves when a connection suspects the agent (see [`Suspicion`]). Cancel-safe.
    pub async fn probe_requested(&self) {
        self.suspicion.probe.notified().await;
    }

    /// Records the agent's verdicts (replacing earlier ones for the same endpoints).
    pub fn set_verdicts(&self, verdicts: impl IntoIterator<Item = (String, Verdict)>) {
        self.registry.update(|state| {
            if let Some(agent) = state.agents.get_mut(&self.id) {
                agent.verdicts.extend(verdicts);
            }
        });
    }

    /// Drops the agent's verdicts on endpoints that no longer exist (a reload removed them).
    pub fn forget_verdicts(&self, endpoints: &[String]) {
        if endpoints.is_empty() {
            return;
        }
        self.registry.update(|state| {
            if let Some(agent) = state.agents.get_mut(&self.id) {
                for endpoint in endpoints {
                    agent.verdicts.remove(endpoint);
                }
            }
        });
    }

    /// Stops giving this agent new streams.
    pub fn set_draining(&self) {
        self.registry.update(|state| {
            if let Some(agent) = state.agents.get_mut(&self.id) {
                agent.draining = true;
            }
        });
    }

    /// Streams the relay currently has open on this agent.
    pub fn active_streams(&self) -> u32 {
        self.active_streams.load(Ordering::Relaxed)
    }
}

impl Drop for AgentRegistration {
    fn drop(&mut self) {
        let id = self.id;
        self.registry.update(|state| {
            state.agents.remove(&id);
        });
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated in a way that
        // matters more than losing the relay, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Adds an authenticated agent (its endpoints are pending until it sends verdicts), unless
    /// its connector has `max_per_connector` agents already.
    pub fn register(
        self: &Arc<Self>,
        info: AgentInfo,
        connection: RelayConnection,
        max_per_connector: usize,
    ) -> Option<AgentRegistration> {
        let connector = info.connector.as_str();
        let active_streams = Arc::new(AtomicU32::new(0));
        let suspicion = Arc::new(Suspicion::default());
        let mut id = None;
        self.update(|state| {
            let siblings = state.agents.values().filter(|a| a.connector == connector).count();
            if siblings >= max_per_connector {
                return;
            }
            let new_id = state.next_id;
            id = Some(new_id);
            let id = new_id;
            state.next_id += 1;
            state.agents.insert(
                id,
                AgentEntry {
                    connector: connector.to_owned(),
                    name: info.name.clone(),
                    info: info.clone(),
                    connected_since: std::time::SystemTime::now(),
                    connection,
                    verdicts: HashMap::new(),
                    draining: false,
                    active_streams: Arc::clone(&active_streams),
                    suspicion: Arc::clone(&suspicion),
                    failed_opens: HashMap::new(),
                },
            );
        });
        Some(AgentRegistration { registry: Arc::clone(self), id: id?, active_streams, suspicion })
    }

    /// Records that an open for `endpoint` failed on agent `id` before its answer: for
    /// [`FAILED_OPEN_MEMORY`] the agent is chosen for that endpoint after every other one.
    pub fn open_failed(&self, id: u64, endpoint: &str) {
        let mut state = self.lock();
        let Some(agent) = state.agents.get_mut(&id) else { return };
        let now = Instant::now();
        if agent.failed_opens.len() >= FAILED_OPENS_PRUNE_AT {
            agent.failed_opens.retain(|_, at| now.duration_since(*at) < FAILED_OPEN_MEMORY);
        }
        match agent.failed_opens.get_mut(endpoint) {
            Some(at) => *at = now,
            None => {
                agent.failed_opens.insert(endpoint.to_owned(), now);
            }
        }
    }

    /// Chooses the approving agent with the fewest active streams, leaving out those in
    /// `tried` and those under [`Suspicion`], and trying those with a recent failed open for
    /// `endpoint` ([`Registry::open_failed`]) last; counts the new stream.
    pub fn choose(&self, connector: &str, endpoint: &str, tried: &[u64]) -> Option<ChosenAgent> {
        let state = self.lock();
        let now = Instant::now();
        let (id, agent) = state
            .agents
            .iter()
            .filter(|(id, a)| {
                a.connector == connector
                    && !a.draining
                    && matches!(a.verdicts.get(endpoint), Some(Verdict::Approved))
                    && a.connection.close_reason().is_none()
                    && !a.suspicion.is_suspect()
                    && !tried.contains(id)
            })
            // No recent failed open first; then the fewest active streams; among equals the
            // most recently connected agent, which is the likeliest to be alive when an older
            // one died without a word.
            .min_by_key(|(id, a)| {
                let failed_recently = a
                    .failed_opens
                    .get(endpoint)
                    .is_some_and(|at| now.duration_since(*at) < FAILED_OPEN_MEMORY);
                (failed_recently, a.active_streams.load(Ordering::Relaxed), std::cmp::Reverse(**id))
            })?;
        agent.active_streams.fetch_add(1, Ordering::Relaxed);
        Some(ChosenAgent {
            id: *id,
            name: agent.name.clone(),
            connection: agent.connection.clone(),
            active_streams: Arc::clone(&agent.active_streams),
            suspicion: Arc::clone(&agent.suspicion),
        })
    }

    /// The status of `endpoint`, served by `connector`.
    pub fn status(&self, connector: &str, endpoint: &str) -> EndpointStatus {
        let state = self.lock();
        // Oldest connection first, as `agents` lists them: of several rejections, the reason
        // given is the same one the status API shows.
        let mut agents: Vec<_> =
            state.agents.iter().filter(|(_, a)| a.connector == connector).collect();
        agents.sort_unstable_by_key(|(id, _)| **id);
        EndpointStatus::among(
            agents.into_iter().map(|(_, a)| (a.draining, a.verdicts.get(endpoint))),
        )
    }

    /// The agents connected for `connector`, oldest connection first.
    pub fn agents(&self, connector: &str) -> Vec<AgentView> {
        let state = self.lock();
        let mut agents: Vec<(u64, AgentView)> = state
            .agents
            .iter()
            .filter(|(_, a)| a.connector == connector)
            .map(|(id, a)| {
                let mut verdicts: Vec<(String, Verdict)> =
                    a.verdicts.iter().map(|(e, v)| (e.clone(), v.clone())).collect();
                verdicts.sort_unstable_by(|x, y| x.0.cmp(&y.0));
                let view = AgentView {
                    name: a.name.clone(),
                    info: a.info.clone(),
                    connected_since: a.connected_since,
                    verdicts,
                    transport: a.connection.kind(),
                    tls: a.connection.tls().cloned(),
                    draining: a.draining,
                    active_streams: a.active_streams.load(Ordering::Relaxed),
                };
                (*id, view)
            })
            .collect();
        agents.sort_unstable_by_key(|(id, _)| *id);
        agents.into_iter().map(|(_, view)| view).collect()
    }

    /// Connections of the agents `revoked` says no longer belong (a reload removed their
    /// connector or their token), with their names, for closing.
    pub fn revoked(&self, revoked: impl Fn(&AgentInfo) -> bool) -> Vec<(String, RelayConnection)> {
        self.lock()
            .agents
            .values()
            .filter(|a| revoked(&a.info))
            .map(|a| (a.name.clone(), a.connection.clone()))
            .collect()
    }

    /// Tunnel connections of every registered agent (for closing them on shutdown).
    pub fn connections(&self) -> Vec<RelayConnection> {
        self.lock().agents.values().map(|a| a.connection.clone()).collect()
    }

    /// A receiver that sees a new value after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(reason: &str) -> Verdict {
        Verdict::Rejected { reason: reason.to_owned() }
    }

    #[test]
    fn one_approving_agent_approves_and_a_draining_one_does_not_count() {
        let approved = Verdict::Approved;
        let refused = rejected("not in the allowlist");
        assert_eq!(EndpointStatus::among([]), EndpointStatus::Disconnected);
        assert_eq!(EndpointStatus::among([(false, None)]), EndpointStatus::Pending);
        assert_eq!(
            EndpointStatus::among([(false, Some(&refused)), (false, Some(&approved))]),
            EndpointStatus::Approved
        );
        assert_eq!(
            EndpointStatus::among([(false, Some(&refused))]),
            EndpointStatus::Rejected { reason: "not in the allowlist".to_owned() }
        );
        // Rejected by one, not yet answered by another: it may still be approved.
        assert_eq!(
            EndpointStatus::among([(false, Some(&refused)), (false, None)]),
            EndpointStatus::Pending
        );
        // Only a draining agent approved it: nobody takes its connections.
        assert_eq!(EndpointStatus::among([(true, Some(&approved))]), EndpointStatus::Disconnected);
        assert_eq!(
            EndpointStatus::among([(true, Some(&approved)), (false, Some(&refused))]),
            EndpointStatus::Rejected { reason: "not in the allowlist".to_owned() }
        );
    }

    #[test]
    fn a_view_finds_each_verdict_in_its_sorted_list() {
        let mut verdicts: Vec<(String, Verdict)> = (0..1000)
            .map(|i| {
                let verdict = if i % 3 == 0 { rejected("no") } else { Verdict::Approved };
                (format!("e{i}"), verdict)
            })
            .collect();
        verdicts.sort_unstable_by(|x, y| x.0.cmp(&y.0));
        let view = AgentView {
            name: "vm".to_owned(),
            info: AgentInfo {
                connector: "tunnel".to_owned(),
                name: "vm".to_owned(),
                agent_id: "id".to_owned(),
                version: "0".to_owned(),
                remote: "127.0.0.1:1".parse().expect("addr"),
                token_digest: privlink_protocol::token::TokenDigest::of(b"token"),
            },
            connected_since: std::time::SystemTime::UNIX_EPOCH,
            verdicts,
            transport: TransportKind::Quic,
            tls: None,
            draining: false,
            active_streams: 0,
        };
        for i in 0..1000 {
            let expected = if i % 3 == 0 { rejected("no") } else { Verdict::Approved };
            assert_eq!(view.verdict(&format!("e{i}")), Some(&expected), "e{i}");
        }
        assert_eq!(view.verdict("e1000"), None);
        assert_eq!(view.verdict(""), None);
    }
}
