//! Hot reload of the relay's configuration (SIGHUP, or the file or the certificate and key it
//! names changing — the binary watches for both and calls
//! [`RelayHandle::reload`](crate::RelayHandle::reload)). A new file is validated like one at
//! start; an invalid one changes nothing. A valid one is applied whole or not at all:
//!
//! * applied in place, without dropping a connection: each endpoint's ACL, `max_connections`,
//!   `inactivity_timeout` and open-retry settings (new connections get them; open ones keep
//!   theirs); endpoints added (bound first — a port that cannot be bound refuses the reload —
//!   then announced to their connector's agents, whose verdicts follow) and removed (no new
//!   clients at once, their connections finish within `shutdown_grace`, agents told); and the
//!   connectors' tokens — an agent whose connector is gone or whose token is no longer listed
//!   is disconnected, and new agents are checked against the new list;
//!   The tunnel's certificate and key are read again too: new handshakes use the new ones,
//!   links already up keep theirs.
//! * not applied yet (the reload is refused, saying what needs a restart): an endpoint's
//!   connector, destination or listen address (remove it and add it under another name), the
//!   tunnel address, the admin listener and `shutdown_grace`.
//!
//! `privlink_config_last_reload_successful` and `…_success_timestamp_seconds` say how the last
//! attempt went.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use privlink_transport::listener::TunnelEndpoint;
use privlink_transport::tunnel::CloseCode;
use privlink_transport::{tcp, tls};
use tracing::{info, warn};

use privlink_protocol::audit::record::Code;

use crate::audit::{self, RelayAudit};
use crate::config::{CurrentConfig, EndpointSpec, RelayConfig, SourceDigest};
use crate::endpoint::EndpointTable;
use crate::fleet::{Fleet, Members};
use crate::listen::Listeners;
use crate::metrics::RelayMetrics;
use crate::registry::Registry;
use crate::shared_port::SharedPort;

/// What a reload touches of the running relay, and the one way to reload it.
#[derive(Debug)]
pub(crate) struct Reloader {
    /// The configuration in force, replaced by an applied reload.
    pub(crate) config: Arc<CurrentConfig>,
    /// Endpoints by name: added and removed here.
    pub(crate) endpoints: Arc<EndpointTable>,
    /// Starts the accept loops of added endpoints.
    pub(crate) listeners: Arc<Listeners>,
    /// The tunnel's certificate and key, replaced in place.
    pub(crate) tunnel: TunnelEndpoint,
    /// Agents whose token is no longer listed are disconnected.
    pub(crate) registry: Arc<Registry>,
    /// `privlink_config_last_reload_*`.
    pub(crate) metrics: Arc<RelayMetrics>,
    /// Each reload is audited, applied or refused.
    pub(crate) audit: Arc<RelayAudit>,
    /// The fleet this relay belongs to, when `[fleet]` is set: a reload may change its listed
    /// peers.
    pub(crate) fleet: Option<Arc<Fleet>>,
    /// The shared listeners by name: a reload adds, removes and moves them, and changes their
    /// routes, ACL, PROXY trust and preread timeout.
    pub(crate) ports: RwLock<HashMap<String, Arc<SharedPort>>>,
}

impl Reloader {
    /// The shared listeners now, by name.
    pub(crate) fn ports(&self) -> HashMap<String, Arc<SharedPort>> {
        self.ports.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Applies `new` whole or not at all; the result is logged and shown by the metrics.
    pub(crate) fn reload(&self, new: RelayConfig) -> Result<ReloadSummary, ReloadError> {
        let source = new.source.clone();
        let result = self.apply(new);
        self.report(source.as_ref(), &result);
        result
    }

    /// Reads `path` and [`reload`](Self::reload)s it; an invalid file changes nothing.
    pub(crate) fn reload_from(&self, path: &Path) -> Result<ReloadSummary, ReloadError> {
        match RelayConfig::load(path) {
            Ok(new) => self.reload(new),
            Err(e) => {
                let result = Err(ReloadError::Invalid(e));
                let source = SourceDigest { path: path.to_owned(), sha256: String::new() };
                self.report(Some(&source), &result);
                result
            }
        }
    }

    fn report(&self, source: Option<&SourceDigest>, result: &Result<ReloadSummary, ReloadError>) {
        log(result);
        self.metrics.reloaded(result.is_ok());
        audit_reload(&self.audit, source, result);
    }

    /// Works out what `new` changes, prepares everything that can fail (the identity is
    /// built, every added endpoint bound), then puts it all in force.
    fn apply(&self, new: RelayConfig) -> Result<ReloadSummary, ReloadError> {
        let plan = plan(&self.config.get(), &new)?;
        if plan.identity_changed {
            let identity = (new.identity.chain.clone(), new.identity.key.clone_key());
            tls::tunnel_server_config(identity.0, identity.1, new.crypto.post_quantum)
                .map_err(|e| ReloadError::Identity(e.to_string()))?;
        }
        // Shared listeners added or moved are bound first, like added endpoints: a bind that
        // fails changes nothing.
        let ports_now = self.ports();
        let mut new_ports = Vec::new();
        for spec in &new.listeners {
            if ports_now
                .get(&spec.name)
                .is_some_and(|port| port.routing().spec.listen == spec.listen)
            {
                continue;
            }
            let bind_error = |source| ReloadError::ListenerBind {
                listener: spec.name.clone(),
                addr: spec.listen,
                source,
            };
            let socket = tcp::listen(spec.listen).map_err(bind_error)?;
            let addr = socket.local_addr().map_err(bind_error)?;
            let port = SharedPort::new(
                spec.clone(),
                addr,
                (Arc::clone(&self.metrics), Arc::clone(&self.audit)),
                self.listeners.child_stop(),
            );
            new_ports.push((Arc::new(port), socket));
        }
        let mut bound = Vec::new();
        let mut routed = Vec::new();
        for spec in plan.added {
            if let Some(name) = &spec.listener {
                // Reached through its shared listener, whose new routes name it.
                let addr = new_ports
                    .iter()
                    .map(|(port, _)| port)
                    .chain(ports_now.get(name))
                    .find(|port| port.name == *name)
                    .map_or(spec.listen, |port| port.addr);
                routed.push((spec, addr));
                continue;
            }
            let bind_error = |source| ReloadError::Bind {
                endpoint: spec.name.clone(),
                addr: spec.listen,
                source,
            };
            let listener = tcp::listen(spec.listen).map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            bound.push((spec, listener, addr));
        }
        let mut summary = ReloadSummary::default();
        if plan.identity_changed {
            self.tunnel
                .replace_identity(new.identity.chain.clone(), new.identity.key.clone_key())
                .map_err(|e| ReloadError::Identity(error_chain(&e)))?;
            summary.identity_replaced = true;
        }
        if let (Some(fleet), Some(spec)) = (&self.fleet, &new.fleet) {
            fleet.set_spec(spec);
        }
        for spec in plan.changed {
            if let Some(endpoint) = self.endpoints.get(&spec.name) {
                summary.endpoints_changed.push(spec.name.clone());
                endpoint.set_spec(spec);
            }
        }
        {
            let mut ports = self.ports.write().unwrap_or_else(PoisonError::into_inner);
            // Listeners gone, or moved to another address: their accept loops end (connections
            // already routed carry on).
            ports.retain(|name, port| {
                let kept = new
                    .listeners
                    .iter()
                    .any(|l| l.name == *name && l.listen == port.routing().spec.listen);
                if !kept {
                    info!(listener = %name, "shared listener stopped (reload)");
                    port.stop.cancel();
                    summary.listeners_removed.push(name.clone());
                }
                kept
            });
            for spec in &new.listeners {
                if let Some(port) = ports.get(&spec.name) {
                    port.set_spec(spec.clone());
                }
            }
            for (port, socket) in new_ports {
                info!(listener = %port.name, listen = %port.addr, "shared listener listening (reload)");
                summary.listeners_added.push(port.name.clone());
                ports.insert(port.name.clone(), Arc::clone(&port));
                self.listeners.start_shared(port, socket, Arc::clone(&self.endpoints));
            }
            // Endpoints that stay on a listener that moved are listed at its new address.
            for spec in new.endpoints.iter().filter(|e| e.listener.is_some()) {
                let port = spec.listener.as_ref().and_then(|name| ports.get(name));
                if let (Some(endpoint), Some(port)) = (self.endpoints.get(&spec.name), port) {
                    self.endpoints.insert(endpoint, port.addr);
                }
            }
        }
        for (spec, addr) in routed {
            let endpoint = self.listeners.endpoint(spec);
            info!(endpoint = %endpoint.name, listen = %addr, "endpoint routed by server name (reload)");
            summary.endpoints_added.push(endpoint.name.clone());
            self.endpoints.insert(endpoint, addr);
        }
        for (spec, listener, addr) in bound {
            let endpoint = self.listeners.endpoint(spec);
            info!(endpoint = %endpoint.name, listen = %addr, "endpoint listening (reload)");
            summary.endpoints_added.push(endpoint.name.clone());
            self.endpoints.insert(Arc::clone(&endpoint), addr);
            self.listeners.start(endpoint, listener);
        }
        for name in plan.removed {
            if let Some(endpoint) = self.endpoints.remove(&name) {
                endpoint.retire(new.shutdown_grace);
                summary.endpoints_removed.push(name);
            }
        }
        self.listeners.budget.set_limit(new.buffer_budget);
        summary.agents_disconnected = disconnect_revoked(&self.registry, &new);
        summary.source_files.clone_from(&new.source_files);
        self.config.set(new);
        Ok(summary)
    }
}

/// What a reload would change, worked out before anything is touched.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ReloadPlan {
    /// Endpoints that stay, with their new policy, by name.
    pub(crate) changed: Vec<EndpointSpec>,
    /// Endpoints to bind and start, in the file's order.
    pub(crate) added: Vec<EndpointSpec>,
    /// Endpoints to retire, by name.
    pub(crate) removed: Vec<String>,
    /// Whether the tunnel's certificate or key differ.
    pub(crate) identity_changed: bool,
}

/// The differences between the configuration in force and `new`, or what in them needs a
/// restart.
pub(crate) fn plan(current: &RelayConfig, new: &RelayConfig) -> Result<ReloadPlan, ReloadError> {
    let restart = needs_restart(current, new);
    if !restart.is_empty() {
        return Err(ReloadError::NeedsRestart(restart));
    }
    let running: HashMap<&str, &EndpointSpec> =
        current.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut plan = ReloadPlan {
        identity_changed: current.identity.chain != new.identity.chain
            || current.identity.key.secret_der() != new.identity.key.secret_der(),
        ..ReloadPlan::default()
    };
    for spec in &new.endpoints {
        match running.get(spec.name.as_str()) {
            None => plan.added.push(spec.clone()),
            Some(was) if **was != *spec => plan.changed.push(spec.clone()),
            Some(_) => {}
        }
    }
    plan.changed.sort_by(|a, b| a.name.cmp(&b.name));
    plan.removed = current
        .endpoints
        .iter()
        .filter(|was| !new.endpoints.iter().any(|e| e.name == was.name))
        .map(|was| was.name.clone())
        .collect();
    plan.removed.sort();
    Ok(plan)
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadSummary {
    /// Endpoints whose policy changed.
    pub endpoints_changed: Vec<String>,
    /// Endpoints added (listening now).
    pub endpoints_added: Vec<String>,
    /// Endpoints removed (no new clients; their connections finish within the grace).
    pub endpoints_removed: Vec<String>,
    /// Shared listeners added (listening now), or moved to a new address.
    pub listeners_added: Vec<String>,
    /// Shared listeners stopped (removed, or moved away from their old address).
    pub listeners_removed: Vec<String>,
    /// Whether the tunnel's certificate and key were replaced (new handshakes use them).
    pub identity_replaced: bool,
    /// Agents disconnected because their connector or token is no longer configured.
    pub agents_disconnected: Vec<String>,
    /// The applied configuration's [`RelayConfig::source_files`], to watch from now on.
    pub source_files: Vec<std::path::PathBuf>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid.
    #[error(transparent)]
    Invalid(#[from] privlink_protocol::config::ConfigError),
    /// It changes something that is not reloaded yet.
    #[error("not reloaded — these changes need a restart: {}", .0.join("; "))]
    NeedsRestart(Vec<String>),
    /// An added shared listener's address could not be bound.
    #[error("not reloaded — listener `{listener}` cannot listen on {addr}: {source}")]
    ListenerBind {
        /// The listener.
        listener: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// An added endpoint's address could not be bound.
    #[error("not reloaded — endpoint `{endpoint}` cannot listen on {addr}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The new certificate or key cannot be used.
    #[error("not reloaded — tunnel certificate: {0}")]
    Identity(String),
}

/// Closes the connections of agents the new configuration no longer admits.
fn disconnect_revoked(registry: &Registry, new: &RelayConfig) -> Vec<String> {
    let revoked = registry.revoked(|info| {
        !new.connectors
            .iter()
            .any(|c| c.name == info.connector && c.token_sha256.contains(&info.token_digest))
    });
    revoked
        .into_iter()
        .map(|(name, connection)| {
            warn!(agent = %name, "disconnecting agent: its token is no longer configured");
            connection.close(CloseCode::Refused, "the relay no longer accepts this agent's token");
            name
        })
        .collect()
}

/// The differences between `current` and `new` that a reload cannot apply yet.
fn needs_restart(current: &RelayConfig, new: &RelayConfig) -> Vec<String> {
    let mut restart = Vec::new();
    if current.tunnel_listen != new.tunnel_listen {
        restart.push("tunnel.listen".to_owned());
    }
    if current.admin != new.admin {
        restart.push("[admin]".to_owned());
    }
    if current.shutdown_grace != new.shutdown_grace {
        restart.push("shutdown_grace".to_owned());
    }
    if current.crypto.post_quantum != new.crypto.post_quantum {
        restart.push("tunnel.post_quantum".to_owned());
    }
    if current.crypto.fips != new.crypto.fips {
        restart.push("tunnel.fips".to_owned());
    }
    if current.stream_window != new.stream_window {
        // Links keep the window they were set up with, and the budget charges by it.
        restart.push("tunnel.stream_window".to_owned());
    }
    if current.audit != new.audit {
        restart.push("[audit]".to_owned());
    }
    // A listed fleet's peers are reloaded; anything else about the fleet needs a restart.
    let fleet_kept = match (&current.fleet, &new.fleet) {
        (None, None) => true,
        (Some(was), Some(now)) => {
            was.advertise == now.advertise
                && (was.members == now.members
                    || matches!(
                        (&was.members, &now.members),
                        (Members::Listed(_), Members::Listed(_))
                    ))
        }
        _ => false,
    };
    if !fleet_kept {
        restart.push("[fleet] (other than its listed peers)".to_owned());
    }

    let old: HashMap<&str, &EndpointSpec> =
        current.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
    for spec in &new.endpoints {
        match old.get(spec.name.as_str()) {
            None => {} // added: applied
            Some(was) => {
                for (field, changed) in [
                    ("connector", was.connector != spec.connector),
                    ("destination", was.destination != spec.destination),
                    // An endpoint on a shared listener moves with it.
                    ("listen", was.listen != spec.listen && spec.listener.is_none()),
                    ("listener", was.listener != spec.listener),
                ] {
                    if changed {
                        restart.push(format!("endpoint `{}` {field}", spec.name));
                    }
                }
            }
        }
    }
    restart
}

/// An error with its causes, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Logs a reload's result.
/// A reload, applied or refused.
fn audit_reload(
    audit: &RelayAudit,
    source: Option<&SourceDigest>,
    result: &Result<ReloadSummary, ReloadError>,
) {
    let record = match result {
        Ok(_) => audit::now(Code::ConfigReloaded),
        Err(_) => audit::now(Code::ConfigReloadRefused),
    };
    let record = match source {
        Some(source) if source.sha256.is_empty() => record.display("path", source.path.display()),
        Some(source) => {
            record.display("path", source.path.display()).text("sha256", &source.sha256)
        }
        None => record,
    };
    audit.trail.record(match result {
        Ok(summary) => record
            .text("endpoints_changed", &summary.endpoints_changed.join(","))
            .text("endpoints_added", &summary.endpoints_added.join(","))
            .text("endpoints_removed", &summary.endpoints_removed.join(","))
            .text("listeners_added", &summary.listeners_added.join(","))
            .text("listeners_removed", &summary.listeners_removed.join(","))
            .flag("identity_replaced", summary.identity_replaced)
            .text("agents_disconnected", &summary.agents_disconnected.join(",")),
        Err(e) => record.display("reason", e),
    });
}

fn log(result: &Result<ReloadSummary, ReloadError>) {
    match result {
        Ok(summary) => info!(
            endpoints_changed = %summary.endpoints_changed.join(","),
            endpoints_added = %summary.endpoints_added.join(","),
            endpoints_removed = %summary.endpoints_removed.join(","),
            listeners_added = %summary.listeners_added.join(","),
            listeners_removed = %summary.listeners_removed.join(","),
            identity_replaced = summary.identity_replaced,
            agents_disconnected = %summary.agents_disconnected.join(","),
            "configuration reloaded"
        ),
        Err(e) => warn!("configuration not reloaded, the running one stays: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use privlink_protocol::acl::Acl;
    use privlink_transport::tls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;
    use crate::config::{OpenRetry, TlsIdentity};

    fn endpoint(name: &str, port: u16) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            connector: "azure".into(),
            destination: format!("{name}.privatelink.vaultcore.azure.net:443")
                .parse()
                .expect("destination"),
            listen: format!("127.0.0.1:{port}").parse().expect("addr"),
            inactivity_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(30),
            max_connections: 1024,
            per_source: Default::default(),
            max_duration: None,
            acl: Acl::default(),
            open: OpenRetry::default(),
            server_names: Vec::new(),
            listener: None,
            proxy_protocol: None,
            send_proxy_protocol: None,
            preread_timeout: crate::config::DEFAULT_PREREAD_TIMEOUT,
        }
    }

    fn config(key: u8, endpoints: Vec<EndpointSpec>) -> RelayConfig {
        RelayConfig {
            tunnel_listen: "127.0.0.1:7443".parse().expect("addr"),
            identity: TlsIdentity {
                chain: vec![CertificateDer::from(vec![1, 2, 3])],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![key])),
            },
            admin: None,
            shutdown_grace: Duration::from_secs(30),
            buffer_budget: privlink_transport::budget::default_limit(),
            stream_window: privlink_transport::limits::STREAM_RECEIVE_WINDOW,
            crypto: Default::default(),
            connectors: Vec::new(),
            endpoints,
            fleet: None,
            listeners: Vec::new(),
            source_files: Vec::new(),
            audit: None,
            source: None,
        }
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let current = config(1, vec![endpoint("a", 8443), endpoint("b", 8444)]);
        let again = config(1, vec![endpoint("b", 8444), endpoint("a", 8443)]);
        assert_eq!(plan(&current, &again).expect("plan"), ReloadPlan::default());
    }

    #[test]
    fn endpoints_added_removed_and_changed_are_told_apart() {
        let current =
            config(1, vec![endpoint("a", 8443), endpoint("b", 8444), endpoint("c", 8445)]);
        let mut b = endpoint("b", 8444);
        b.max_connections = 10;
        b.acl.allow = vec!["10.0.0.0/8".parse().expect("net")];
        let new = config(1, vec![endpoint("d", 8446), b.clone(), endpoint("a", 8443)]);
        let plan = plan(&current, &new).expect("plan");
        assert_eq!(plan.added, vec![endpoint("d", 8446)]);
        assert_eq!(plan.changed, vec![b]);
        assert_eq!(plan.removed, vec!["c".to_owned()]);
        assert!(!plan.identity_changed);
    }

    #[test]
    fn a_new_key_replaces_the_identity() {
        let plan = plan(&config(1, vec![]), &config(2, vec![])).expect("plan");
        assert!(plan.identity_changed);
    }

    #[test]
    fn what_needs_a_restart_refuses_the_whole_reload_and_says_what() {
        let current = config(1, vec![endpoint("a", 8443), endpoint("b", 8444)]);
        let mut moved = endpoint("a", 9443);
        moved.destination = "elsewhere.example:443".parse().expect("destination");
        let mut new = config(1, vec![moved, endpoint("b", 8444), endpoint("c", 8445)]);
        new.shutdown_grace = Duration::from_secs(5);
        new.tunnel_listen = "127.0.0.1:7444".parse().expect("addr");
        new.stream_window *= 4;
        let Err(ReloadError::NeedsRestart(what)) = plan(&current, &new) else { panic!("refused") };
        assert_eq!(
            what,
            [
                "tunnel.listen",
                "shutdown_grace",
                "tunnel.stream_window",
                "endpoint `a` destination",
                "endpoint `a` listen"
            ]
        );
        let message = ReloadError::NeedsRestart(what).to_string();
        assert!(message.contains("need a restart"), "{message}");
    }
}
