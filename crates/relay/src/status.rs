//! The running relay as others see it: [`RelayHandle`], a cheap, cloneable view of its bound
//! addresses, each endpoint's status and refusal counters, the connected agents, the pending
//! (unauthenticated) tunnel connections, and waits for a state (for the demo, tests and — next — the admin API).

use std::net::SocketAddr;

use privlink_admin::{Readiness, ReadyLatch};
use privlink_transport::audit::TrailStatus;
use privlink_transport::budget::BufferBudget;
use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use privlink_protocol::audit::record::Code;

use crate::audit::{self, RelayAudit};
use crate::config::RelayConfig;
use crate::endpoint::{Endpoint, EndpointTable};
use crate::fleet::Fleet;
use crate::metrics::RelayMetrics;
use crate::registry::{AgentView, EndpointStatus, Registry};
use crate::reload::{ReloadError, ReloadSummary, Reloader};

/// A cheap, cloneable view of a running relay: addresses and endpoint status.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    registry: Arc<Registry>,
    admission: Arc<Admission>,
    /// Every endpoint with its bound address; a reload adds and removes entries.
    endpoints: Arc<EndpointTable>,
    tunnel_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    metrics: Arc<RelayMetrics>,
    /// Applies new configurations.
    reloader: Arc<Reloader>,
    /// Ready from the moment every listener is bound until the drain.
    readiness: ReadyLatch,
}

impl RelayHandle {
    pub(crate) fn new(
        reloader: Arc<Reloader>,
        admission: Arc<Admission>,
        tunnel_addr: SocketAddr,
        admin_addr: Option<SocketAddr>,
    ) -> Self {
        Self {
            registry: Arc::clone(&reloader.registry),
            admission,
            endpoints: Arc::clone(&reloader.endpoints),
            tunnel_addr,
            admin_addr,
            metrics: Arc::clone(&reloader.metrics),
            reloader,
            readiness: ReadyLatch::new(Readiness::Ready),
        }
    }

    /// Applies a new configuration to the running relay (see [`crate::reload`]): whole or
    /// not at all; the result is logged and shown by the reload metrics.
    pub fn reload(&self, new: RelayConfig) -> Result<ReloadSummary, ReloadError> {
        self.reloader.reload(new)
    }

    /// Reads `path` and [`reload`](Self::reload)s it; an invalid file changes nothing.
    pub fn reload_from(&self, path: &std::path::Path) -> Result<ReloadSummary, ReloadError> {
        self.reloader.reload_from(path)
    }

    /// The relay's readiness: `READY=1`, the drain agents are told about, and — for a relay
    /// without a fleet — `/readyz` (see [`client_readiness`](Self::client_readiness)).
    pub fn readiness(&self) -> &ReadyLatch {
        &self.readiness
    }

    /// What `/readyz` answers: the process's readiness, and for a relay in a fleet also
    /// whether it can serve clients — at least one endpoint has an approving agent here. A
    /// balancer then sends a new relay no client before an agent has reached it, while agents
    /// (through the tunnel Service, which publishes relays that are not ready) still can. A
    /// relay alone stays ready without agents: there is no other relay to send clients to, and
    /// an unready sole relay only turns "no agent" answers into refused connections.
    pub fn client_readiness(&self) -> Readiness {
        let process = self.readiness.current();
        if process != Readiness::Ready || self.reloader.fleet.is_none() {
            return process;
        }
        let serves_one = self.endpoints().iter().any(|(endpoint, _)| {
            let spec = endpoint.spec();
            self.registry.status(&spec.connector, &spec.name) == EndpointStatus::Approved
        });
        if serves_one {
            Readiness::Ready
        } else {
            Readiness::NotReady(
                "no agent approves an endpoint on this relay yet (agents can still connect)"
                    .to_owned(),
            )
        }
    }

    /// Each shared listener with its bound address and routes, by name.
    pub fn listener_views(&self) -> Vec<privlink_admin::snapshot::ListenerView> {
        let mut views: Vec<_> = self
            .reloader
            .ports()
            .values()
            .map(|port| privlink_admin::snapshot::ListenerView {
                name: port.name.clone(),
                listen: port.addr.to_string(),
                routes: port.routing().spec.routes.iter().cloned().collect(),
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// The fleet this relay belongs to, when `[fleet]` is set.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.reloader.fleet.as_ref()
    }

    pub(crate) fn metrics(&self) -> &Arc<RelayMetrics> {
        &self.metrics
    }

    pub(crate) fn audit(&self) -> &Arc<RelayAudit> {
        &self.reloader.audit
    }

    /// The audit trail's last seq and hash and its counters, when `[audit]` is set.
    pub fn audit_status(&self) -> Option<TrailStatus> {
        self.reloader.audit.trail.status()
    }

    /// Until `stop`: records each endpoint status change (kept for the status page even
    /// without a trail), and — with a trail — a progress record of every open connection every
    /// `periodic`.
    pub(crate) async fn watch_for_audit(
        &self,
        periodic: Option<Duration>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let audit = &self.reloader.audit;
        let mut changes = self.registry.subscribe();
        let mut ticks = periodic.map(|periodic| {
            let mut ticks = tokio::time::interval(periodic);
            ticks.reset(); // the first tick one period from now
            ticks
        });
        let tick = async |ticks: &mut Option<tokio::time::Interval>| match ticks {
            Some(ticks) => ticks.tick().await,
            None => std::future::pending().await,
        };
        loop {
            audit.endpoint_statuses(&self.registry, self.reloader.config.get().endpoints.iter());
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                _ = tick(&mut ticks) => {
                    for (endpoint, _) in self.endpoints.all() {
                        audit_progress(audit, &endpoint);
                    }
                }
            }
        }
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The relay-wide budget of bytes held for clients that do not read.
    pub fn buffer_budget(&self) -> &BufferBudget {
        &self.reloader.listeners.budget
    }

    /// The caps on unauthenticated tunnel connections (sized from the open-file limit).
    pub fn pending_caps(&self) -> crate::admission::PendingCaps {
        self.admission.caps()
    }

    /// Tunnel connections accepted but not authenticated yet.
    pub fn pending_tunnel_connections(&self) -> usize {
        self.admission.pending()
    }

    /// Unauthenticated tunnel connections evicted to make room for newer ones (too many were
    /// pending, in all or from one source), since the relay started.
    pub fn turned_away_tunnel_connections(&self) -> u64 {
        self.admission.turned_away()
    }

    /// The address agents connect to.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// The table of endpoints by name.
    pub(crate) fn endpoint_table(&self) -> &Arc<EndpointTable> {
        &self.endpoints
    }

    /// Every endpoint with its bound address, in no particular order.
    pub(crate) fn endpoints(&self) -> Vec<(Arc<Endpoint>, SocketAddr)> {
        self.endpoints.all()
    }

    /// The admin listener's bound address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound address of an endpoint.
    pub fn endpoint_addr(&self, name: &str) -> Option<SocketAddr> {
        self.endpoints.addr(name)
    }

    /// The status of an endpoint (`None` for an unknown name).
    pub fn endpoint_status(&self, name: &str) -> Option<EndpointStatus> {
        let endpoint = self.endpoints.get(name)?;
        Some(self.registry.status(&endpoint.spec().connector, name))
    }

    /// Connections denied by the ACL and refused over the limit, for an endpoint.
    pub fn endpoint_refusals(&self, name: &str) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let endpoint = self.endpoints.get(name)?;
        Some((endpoint.counters.denied.load(Relaxed), endpoint.counters.over_limit.load(Relaxed)))
    }

    /// Agents connected for a connector, oldest connection first.
    pub fn agents(&self, connector: &str) -> Vec<AgentView> {
        self.registry.agents(connector)
    }

    /// Waits until `predicate` holds for the endpoint's status, or `timeout` passes. Returns
    /// the last status seen.
    pub async fn wait_for_status(
        &self,
        name: &str,
        timeout: Duration,
        predicate: impl Fn(&EndpointStatus) -> bool,
    ) -> Option<EndpointStatus> {
        let mut changes = self.registry.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.endpoint_status(name)?;
            if predicate(&status) {
                return Some(status);
            }
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                return Some(status);
            }
        }
    }

    /// Waits until the connector's agents satisfy `predicate`, or `timeout` passes; returns
    /// the last view seen.
    pub async fn wait_for_agents(
        &self,
        connector: &str,
        timeout: Duration,
        predicate: impl Fn(&[AgentView]) -> bool,
    ) -> Vec<AgentView> {
        let mut changes = self.registry.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let agents = self.agents(connector);
            if predicate(&agents)
                || tokio::time::timeout_at(deadline, changes.changed()).await.is_err()
            {
                return agents;
            }
        }
    }
}

/// A progress record of each connection `endpoint` forwards now.
fn audit_progress(audit: &RelayAudit, endpoint: &Endpoint) {
    let destination = endpoint.spec().destination.to_string();
    for live in endpoint.live.snapshot() {
        let (from_client, to_client) = live.bytes.get();
        let age = live.started.elapsed().unwrap_or_default();
        audit.trail.record(
            audit::now(Code::ConnectionProgress)
                .number("connection", live.info.connection)
                .display("client", live.info.client)
                .text("endpoint", &endpoint.name)
                .text("destination", live.info.requested.as_deref().unwrap_or(&destination))
                .text("agent", &live.info.agent())
                .number("duration_ms", audit::millis(age))
                .number("bytes_from_client", from_client)
                .number("bytes_to_client", to_client),
        );
    }
}
