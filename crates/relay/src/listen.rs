//! Endpoint listeners: one accept loop per endpoint, and the policy applied on accept, before
//! a byte is read — the source-IP ACL, then the connection limit. An admitted connection gets
//! a task of its own (see [`crate::dispatch`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use privlink_transport::live::LiveTable;
use privlink_transport::tcp;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

use crate::config::EndpointSpec;
use crate::dispatch;
use crate::flow::EndpointCounters;
use crate::metrics::RelayMetrics;
use crate::registry::Registry;

/// One endpoint at run time.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) spec: EndpointSpec,
    /// One permit per connection below `max_connections`.
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) counters: EndpointCounters,
    pub(crate) metrics: Arc<RelayMetrics>,
    /// The connections being forwarded now (from the agent's choice to the end).
    pub(crate) live: LiveTable<LiveClient>,
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
        let slots = Arc::new(Semaphore::new(spec.max_connections));
        Self {
            spec,
            slots,
            counters: EndpointCounters::default(),
            metrics,
            live: LiveTable::default(),
        }
    }
}

/// Accepts clients on one endpoint until `stop` is cancelled; client tasks end early only when
/// `force` is cancelled.
pub(crate) async fn accept_clients(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    registry: Arc<Registry>,
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    let span = tracing::info_span!("endpoint", endpoint = %endpoint.spec.name);
    let accept = tcp::accept_until(&listener, &stop, |socket, client| {
        if !endpoint.spec.acl.permits(client.ip()) {
            endpoint.counters.denied.fetch_add(1, Ordering::Relaxed);
            endpoint.metrics.connection_refused(&endpoint.spec.name, "acl_denied");
            debug!(%client, "connection denied by ACL");
            tcp::abort(socket);
            return;
        }
        let Ok(slot) = Arc::clone(&endpoint.slots).try_acquire_owned() else {
            endpoint.counters.over_limit.fetch_add(1, Ordering::Relaxed);
            endpoint.metrics.connection_refused(&endpoint.spec.name, "over_limit");
            warn!(
                %client,
                max_connections = endpoint.spec.max_connections,
                "connection refused: endpoint at max_connections"
            );
            tcp::abort(socket);
            return;
        };
        endpoint.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("client", endpoint = %endpoint.spec.name, %client);
        let endpoint = Arc::clone(&endpoint);
        let registry = Arc::clone(&registry);
        let force = force.clone();
        tracker.spawn(
            async move {
                dispatch::forward(socket, client, &endpoint, &registry, &force).await;
                drop(slot);
            }
            .instrument(span),
        );
    });
    accept.instrument(span).await;
}
