//! Endpoint listeners: one accept loop per endpoint, and the policy applied on accept, before
//! a byte is read — the source-IP ACL, then the connection limit. An admitted connection gets
//! a task of its own (see [`crate::dispatch`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use privlink_transport::live::LiveTable;
use privlink_transport::tcp;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

use crate::config::EndpointSpec;
use crate::dispatch;
use crate::flow::EndpointCounters;
use crate::metrics::RelayMetrics;
use crate::registry::Registry;

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
    pub(crate) metrics: Arc<RelayMetrics>,
    /// The connections being forwarded now (from the agent's choice to the end).
    pub(crate) live: LiveTable<LiveClient>,
    /// Its accept loop's stop and its connections' force, children of the relay's own; set
    /// when the loop starts, cancelled early when a reload removes the endpoint.
    tokens: std::sync::OnceLock<(CancellationToken, CancellationToken)>,
}

/// What `/api/v1/connections` shows of a client connection besides its times and bytes.
#[derive(Debug)]
pub(crate) struct LiveClient {
    pub(crate) client: SocketAddr,
    /// The agent carrying it (the one being tried, while an open is retried).
    agent: std::sync::Mutex<String>,
}

impl LiveClient {
    pub(crate) fn new(client: SocketAddr, agent: String) -> Self {
        Self { client, agent: std::sync::Mutex::new(agent) }
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

impl Endpoint {
    pub(crate) fn new(spec: EndpointSpec, metrics: Arc<RelayMetrics>) -> Self {
        Self {
            name: spec.name.clone(),
            spec: RwLock::new(Arc::new(spec)),
            active: Arc::default(),
            counters: EndpointCounters::default(),
            metrics,
            live: LiveTable::default(),
            tokens: std::sync::OnceLock::new(),
        }
    }

    /// This endpoint's accept-loop stop and connection force, made children of the relay's
    /// `shutdown` and `force` on first use.
    fn tokens(
        &self,
        shutdown: &CancellationToken,
        force: &CancellationToken,
    ) -> (CancellationToken, CancellationToken) {
        self.tokens.get_or_init(|| (shutdown.child_token(), force.child_token())).clone()
    }

    /// A reload removed the endpoint: it accepts no more clients at once, and the
    /// connections it has get `grace` to finish before they are closed.
    pub(crate) fn retire(&self, grace: std::time::Duration) {
        if let Some((stop, force)) = self.tokens.get() {
            stop.cancel();
            let force = force.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                force.cancel();
            });
        }
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
    fn admit(&self, limit: usize) -> Option<Slot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(Arc::clone(&self.active)))
    }
}

/// One connection counted against its endpoint's `max_connections` until dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts clients on one endpoint until `shutdown` is cancelled or the endpoint is retired;
/// client tasks end early only when `force` is cancelled (or the retired endpoint's grace ends).
pub(crate) async fn accept_clients(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    let (stop, force) = endpoint.tokens(&shutdown, &force);
    let span = tracing::info_span!("endpoint", endpoint = %endpoint.name);
    let accept = tcp::accept_until(&listener, &stop, |socket, client| {
        let spec = endpoint.spec();
        if !spec.acl.permits(client.ip()) {
            endpoint.counters.denied.fetch_add(1, Ordering::Relaxed);
            endpoint.metrics.connection_refused(&endpoint.name, "acl_denied");
            debug!(%client, "connection denied by ACL");
            tcp::abort(socket);
            return;
        }
        let Some(slot) = endpoint.admit(spec.max_connections) else {
            endpoint.counters.over_limit.fetch_add(1, Ordering::Relaxed);
            endpoint.metrics.connection_refused(&endpoint.name, "over_limit");
            warn!(
                %client,
                max_connections = spec.max_connections,
                "connection refused: endpoint at max_connections"
            );
            tcp::abort(socket);
            return;
        };
        endpoint.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("client", endpoint = %endpoint.name, %client);
        let endpoint = Arc::clone(&endpoint);
        let registry = Arc::clone(&registry);
        let force = force.clone();
        tracker.spawn(
            async move {
                dispatch::forward(socket, client, &endpoint, spec, &registry, &force).await;
                drop(slot);
            }
            .instrument(span),
        );
    });
    accept.instrument(span).await;
}
