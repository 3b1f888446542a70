//! Endpoint state at run time, shared by the files that accept, dispatch, reload and report:
//! one [`Endpoint`] per configured endpoint (its current policy, open-connection count and
//! slots, counters, the live connections it forwards and the tokens that stop it), and the
//! [`EndpointTable`] of every endpoint by name with its bound address. It imports nothing of
//! the relay's own but the config, the counters and the limiters, so every file above can use
//! it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use privlink_transport::budget::BufferBudget;
use privlink_transport::live::LiveTable;
use privlink_transport::throttle::Throttle;
use tokio_util::sync::CancellationToken;

use crate::audit::{Place, RelayAudit};
use crate::auth::FailureLimiter;
use crate::config::EndpointSpec;
use crate::flow::EndpointCounters;
use crate::metrics::RelayMetrics;
use crate::source_limits::{SourceLimits, SourceSlot};

/// Longest silence between two warnings about connections refused over the limit, while
/// they keep coming (each line counts the ones left out).
pub(crate) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One endpoint at run time. Its policy — ACL, limits, timeouts — can be replaced by a
/// reload ([`Endpoint::set_spec`]); each connection keeps the spec it was accepted under.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Never changes (a reload keeps the name, connector, destination and listen address).
    pub(crate) name: String,
    spec: RwLock<Arc<EndpointSpec>>,
    /// Connections open now, counted against `max_connections`.
    active: Arc<AtomicUsize>,
    pub(crate) counters: EndpointCounters,
    /// Writes the "at max_connections" warning at most once per [`REFUSAL_LOG_INTERVAL`]: a
    /// flood of connections over the limit must not become a flood of log lines.
    pub(crate) over_limit_log: Throttle,
    pub(crate) metrics: Arc<RelayMetrics>,
    /// The relay's audit trail: its connections, denied, opened and closed.
    pub(crate) audit: Arc<RelayAudit>,
    /// Its share of the relay-wide budget of bytes held for clients that do not read.
    pub(crate) budget: Arc<BufferBudget>,
    /// The connections being forwarded now (from the agent's choice to the end).
    pub(crate) live: LiveTable<LiveClient>,
    /// What each source holds and may still open (`per_source_*`).
    pub(crate) sources: Arc<SourceLimits>,
    /// Wrong proxy credentials per source (a CONNECT endpoint's): each refusal waits a little
    /// longer, so that guessing a human-chosen password is slow.
    pub(crate) proxy_auth_failures: Mutex<FailureLimiter>,
    /// Ends its accept loop: a child of the relay's stop, cancelled early when a reload
    /// removes the endpoint.
    pub(crate) stop: CancellationToken,
    /// Ends its connections: a child of the relay's force, cancelled `shutdown_grace` after a
    /// reload removed the endpoint.
    pub(crate) force: CancellationToken,
}

/// The outcome (metrics, audit trail) of a client refused because the relay had no file
/// descriptor left: `privlink_transport::tcp::accept_until` reset it at once.
pub(crate) const NO_DESCRIPTORS: &str = "no_descriptors";

impl Endpoint {
    /// Counts a client refused because the buffer budget (the relay's, or this endpoint's
    /// share) is spent, and says so in the log at most once per [`REFUSAL_LOG_INTERVAL`].
    pub(crate) fn refused_over_budget(&self, peer: (SocketAddr, Option<SocketAddr>)) {
        let client = peer.0;
        self.counters.over_budget.fetch_add(1, Ordering::Relaxed);
        self.metrics.connection_refused(&self.name, "over_budget");
        self.audit.denied(peer, Place::Endpoint(&self.name), "over_budget", None);
        if let Some(left_out) = self.over_limit_log.admit(std::time::Instant::now()) {
            tracing::warn!(
                %client,
                held = self.budget.held(),
                buffer_budget = self.budget.limit(),
                left_out,
                "connection refused: clients that do not read hold the relay's buffer_budget \
                 (all of it, or this endpoint's three quarters) (left_out: refusals since the \
                 last such line; all are counted in privlink_relay_connections_total)"
            );
        }
    }

    /// Counts a client refused because the relay had no file descriptor left (its accept
    /// loop took it with the reserve descriptor and reset it), and says so in the log at most
    /// once per [`REFUSAL_LOG_INTERVAL`].
    pub(crate) fn refused_without_descriptors(&self, client: SocketAddr) {
        self.counters.over_limit.fetch_add(1, Ordering::Relaxed);
        self.metrics.connection_refused(&self.name, NO_DESCRIPTORS);
        let place = Place::Endpoint(&self.name);
        self.audit.denied((client, None), place, NO_DESCRIPTORS, None);
        if let Some(left_out) = self.over_limit_log.admit(std::time::Instant::now()) {
            tracing::warn!(
                %client,
                left_out,
                "connection refused: the relay has no file descriptor left (raise its open-file \
                 limit: LimitNOFILE, ulimit -n; connections already open go on) (left_out: \
                 refusals since the last such line; all are counted in \
                 privlink_relay_connections_total)"
            );
        }
    }

    /// An endpoint stopped by `stop` and forced by `force` (children of the relay's own).
    pub(crate) fn new(
        spec: EndpointSpec,
        (metrics, audit): (Arc<RelayMetrics>, Arc<RelayAudit>),
        budget: Arc<BufferBudget>,
        stop: CancellationToken,
        force: CancellationToken,
    ) -> Self {
        Self {
            name: spec.name.clone(),
            spec: RwLock::new(Arc::new(spec)),
            active: Arc::default(),
            counters: EndpointCounters::default(),
            over_limit_log: Throttle::new(REFUSAL_LOG_INTERVAL),
            metrics,
            audit,
            budget,
            live: LiveTable::default(),
            sources: Arc::default(),
            proxy_auth_failures: Mutex::default(),
            stop,
            force,
        }
    }

    /// A reload removed the endpoint: it accepts no more clients at once, and the
    /// connections it has get `grace` to finish before they are closed.
    pub(crate) fn retire(&self, grace: Duration) {
        self.stop.cancel();
        let force = self.force.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            force.cancel();
        });
    }

    /// The current policy.
    pub(crate) fn spec(&self) -> Arc<EndpointSpec> {
        Arc::clone(&self.spec.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the policy for connections accepted from now on.
    pub(crate) fn set_spec(&self, spec: EndpointSpec) {
        *self.spec.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(spec);
    }

    /// Connections open now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts one more connection unless `limit` are open already.
    pub(crate) fn admit(&self, limit: usize) -> Option<Slot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(Arc::clone(&self.active)))
    }
}

/// One connection counted against its endpoint's `max_connections` until dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

/// What an admitted connection holds until it ends: its endpoint slot and its source's.
#[derive(Debug)]
pub(crate) struct Held {
    _slot: Slot,
    _source: SourceSlot,
}

impl Held {
    pub(crate) fn new(slot: Slot, source: SourceSlot) -> Self {
        Self { _slot: slot, _source: source }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What `/api/v1/connections` shows of a client connection besides its times and bytes.
#[derive(Debug)]
pub(crate) struct LiveClient {
    pub(crate) client: SocketAddr,
    /// The agent carrying it (the one being tried, while an open is retried).
    agent: Mutex<String>,
    /// Where a CONNECT client asked to go (other endpoints have one destination).
    pub(crate) requested: Option<Box<str>>,
    /// Its number in the audit trail.
    pub(crate) connection: u64,
}

impl LiveClient {
    pub(crate) fn new(
        (client, connection): (SocketAddr, u64),
        agent: String,
        requested: Option<Box<str>>,
    ) -> Self {
        Self { client, agent: Mutex::new(agent), requested, connection }
    }

    /// The agent carrying it now.
    pub(crate) fn agent(&self) -> String {
        self.agent.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// The connection moved to another agent (a retried open).
    pub(crate) fn set_agent(&self, agent: &str) {
        if let Ok(mut current) = self.agent.lock() {
            if *current != agent {
                agent.clone_into(&mut current);
            }
        }
    }
}

/// Every endpoint by name, with its bound address; a reload adds and removes entries.
#[derive(Debug, Default)]
pub(crate) struct EndpointTable {
    by_name: RwLock<HashMap<String, (Arc<Endpoint>, SocketAddr)>>,
}

impl EndpointTable {
    /// Every endpoint with its bound address, in no particular order.
    pub(crate) fn all(&self) -> Vec<(Arc<Endpoint>, SocketAddr)> {
        self.read().values().map(|(endpoint, addr)| (Arc::clone(endpoint), *addr)).collect()
    }

    /// The endpoint called `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Endpoint>> {
        self.read().get(name).map(|(endpoint, _)| Arc::clone(endpoint))
    }

    /// The bound address of the endpoint called `name`.
    pub(crate) fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.read().get(name).map(|(_, addr)| *addr)
    }

    /// Adds a bound endpoint.
    pub(crate) fn insert(&self, endpoint: Arc<Endpoint>, addr: SocketAddr) {
        let mut all = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        all.insert(endpoint.name.clone(), (endpoint, addr));
    }

    /// Removes an endpoint; its connections finish on their own.
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<Endpoint>> {
        let mut all = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        all.remove(name).map(|(endpoint, _)| endpoint)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, (Arc<Endpoint>, SocketAddr)>> {
        self.by_name.read().unwrap_or_else(PoisonError::into_inner)
    }
}
