//! The running relay as others see it: [`RelayHandle`], a cheap, cloneable view of its bound
//! addresses, each endpoint's status and refusal counters, the connected agents, the pending
//! (unauthenticated) tunnel connections, and waits for a state (for the demo, tests and — next — the admin API).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::admission::Admission;
use crate::config::RelayConfig;
use crate::listen::Endpoint;
use crate::metrics::RelayMetrics;
use crate::registry::{AgentView, EndpointStatus, Registry};
use crate::reload::{CurrentConfig, EndpointSpawner, ReloadError, ReloadSummary};

/// Every endpoint by name, with its bound address.
type EndpointMap = HashMap<String, (Arc<Endpoint>, SocketAddr)>;

/// A cheap, cloneable view of a running relay: addresses and endpoint status.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    registry: Arc<Registry>,
    admission: Arc<Admission>,
    /// Every endpoint with its bound address; a reload adds and removes entries.
    endpoints: Arc<RwLock<EndpointMap>>,
    tunnel_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    metrics: Arc<RelayMetrics>,
    config: Arc<CurrentConfig>,
    /// Starts accept loops for endpoints a reload adds; set once the relay runs.
    spawner: Arc<std::sync::OnceLock<EndpointSpawner>>,
}

impl RelayHandle {
    pub(crate) fn new(
        registry: Arc<Registry>,
        admission: Arc<Admission>,
        endpoints: HashMap<String, (Arc<Endpoint>, SocketAddr)>,
        tunnel_addr: SocketAddr,
        admin_addr: Option<SocketAddr>,
        metrics: Arc<RelayMetrics>,
        config: Arc<CurrentConfig>,
    ) -> Self {
        Self {
            registry,
            admission,
            endpoints: Arc::new(RwLock::new(endpoints)),
            tunnel_addr,
            admin_addr,
            metrics,
            config,
            spawner: Arc::default(),
        }
    }

    pub(crate) fn spawner(&self) -> Option<&EndpointSpawner> {
        self.spawner.get()
    }

    pub(crate) fn set_spawner(&self, spawner: EndpointSpawner) {
        let _ = self.spawner.set(spawner);
    }

    pub(crate) fn config(&self) -> &Arc<CurrentConfig> {
        &self.config
    }

    /// Applies a new configuration to the running relay (see [`crate::reload`]): whole or
    /// not at all; the result is logged and shown by the reload metrics.
    pub fn reload(&self, new: RelayConfig) -> Result<ReloadSummary, ReloadError> {
        let result = crate::reload::apply(self, new);
        crate::reload::log(&result);
        self.metrics.reloaded(result.is_ok());
        result
    }

    /// Reads `path` and [`reload`](Self::reload)s it; an invalid file changes nothing.
    pub fn reload_from(&self, path: &std::path::Path) -> Result<ReloadSummary, ReloadError> {
        match RelayConfig::load(path) {
            Ok(new) => self.reload(new),
            Err(e) => {
                let result = Err(ReloadError::Invalid(e));
                crate::reload::log(&result);
                self.metrics.reloaded(false);
                result
            }
        }
    }

    pub(crate) fn metrics(&self) -> &Arc<RelayMetrics> {
        &self.metrics
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Tunnel connections accepted but not authenticated yet.
    pub fn pending_tunnel_connections(&self) -> usize {
        self.admission.pending()
    }

    /// Tunnel connections turned away because too many were pending (in all or from their
    /// source), since the relay started.
    pub fn turned_away_tunnel_connections(&self) -> u64 {
        self.admission.turned_away()
    }

    /// The address agents connect to.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// Every endpoint with its bound address, in no particular order.
    pub(crate) fn endpoints(&self) -> Vec<(Arc<Endpoint>, SocketAddr)> {
        self.read_endpoints()
            .values()
            .map(|(endpoint, addr)| (Arc::clone(endpoint), *addr))
            .collect()
    }

    fn read_endpoints(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<String, (Arc<Endpoint>, SocketAddr)>> {
        self.endpoints.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a bound endpoint (a reload).
    pub(crate) fn add_endpoint(&self, endpoint: Arc<Endpoint>, addr: SocketAddr) {
        let mut all = self.endpoints.write().unwrap_or_else(PoisonError::into_inner);
        all.insert(endpoint.name.clone(), (endpoint, addr));
    }

    /// Removes an endpoint (a reload); its connections finish on their own.
    pub(crate) fn remove_endpoint(&self, name: &str) -> Option<Arc<Endpoint>> {
        let mut all = self.endpoints.write().unwrap_or_else(PoisonError::into_inner);
        all.remove(name).map(|(endpoint, _)| endpoint)
    }

    /// The admin listener's bound address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound address of an endpoint.
    pub fn endpoint_addr(&self, name: &str) -> Option<SocketAddr> {
        self.read_endpoints().get(name).map(|(_, addr)| *addr)
    }

    /// The status of an endpoint (`None` for an unknown name).
    pub fn endpoint_status(&self, name: &str) -> Option<EndpointStatus> {
        let endpoint = Arc::clone(&self.read_endpoints().get(name)?.0);
        Some(self.registry.status(&endpoint.spec().connector, name))
    }

    /// Connections denied by the ACL and refused over the limit, for an endpoint.
    pub fn endpoint_refusals(&self, name: &str) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let endpoint = Arc::clone(&self.read_endpoints().get(name)?.0);
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
