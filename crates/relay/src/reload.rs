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
use std::sync::{Arc, PoisonError, RwLock};

use privlink_transport::tunnel::CloseCode;
use privlink_transport::{quic, tcp, tls};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{EndpointSpec, RelayConfig, TlsIdentity};
use crate::listen::Endpoint;
use crate::registry::Registry;
use crate::status::RelayHandle;

/// The configuration in force, shared by whoever needs the current one (authentication,
/// welcomes) and replaced by a reload.
#[derive(Debug)]
pub(crate) struct CurrentConfig {
    config: RwLock<Arc<RelayConfig>>,
    /// Bumped by every applied reload: agent sessions tell their agents what changed.
    generation: watch::Sender<u64>,
}

impl CurrentConfig {
    pub(crate) fn new(config: RelayConfig) -> Self {
        Self { config: RwLock::new(Arc::new(config)), generation: watch::Sender::new(0) }
    }

    /// The configuration in force now.
    pub(crate) fn get(&self) -> Arc<RelayConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A receiver that sees a new value after each applied reload.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn set(&self, config: RelayConfig) {
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// The tunnel's TLS identity as the listeners use it: QUIC's server settings live in the
/// endpoint, TLS/TCP's are read at each accept. A reload replaces both; connections already
/// up keep the identity they were made with.
#[derive(Debug)]
pub(crate) struct TunnelIdentity {
    quic: quinn::Endpoint,
    tcp: RwLock<Arc<rustls::ServerConfig>>,
}

impl TunnelIdentity {
    pub(crate) fn new(quic: quinn::Endpoint, tcp: Arc<rustls::ServerConfig>) -> Self {
        Self { quic, tcp: RwLock::new(tcp) }
    }

    /// The TLS/TCP settings in force.
    pub(crate) fn tcp_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.tcp.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Builds both transports' settings for `identity` (so a bad certificate or key changes
    /// nothing) and puts them in force.
    fn replace(&self, identity: &TlsIdentity) -> Result<(), String> {
        let tls = tls::tunnel_server_config(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| e.to_string())?;
        let quic = quic::relay_server_config(tls.clone()).map_err(|e| e.to_string())?;
        self.quic.set_server_config(Some(quic));
        *self.tcp.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tls);
        Ok(())
    }
}

/// What a reload needs of the running relay (set by `Relay::run`): to start endpoints' accept
/// loops and to replace the tunnel's identity.
#[derive(Debug)]
pub(crate) struct EndpointSpawner {
    pub(crate) registry: Arc<Registry>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) force: CancellationToken,
    pub(crate) clients: TaskTracker,
    pub(crate) identity: Arc<TunnelIdentity>,
}

impl EndpointSpawner {
    pub(crate) fn spawn(&self, endpoint: Arc<Endpoint>, listener: TcpListener) {
        self.clients.spawn(crate::listen::accept_clients(
            listener,
            endpoint,
            Arc::clone(&self.registry),
            self.shutdown.clone(),
            self.force.clone(),
            self.clients.clone(),
        ));
    }
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
    /// The relay is not running yet.
    #[error("not reloaded — the relay is not running")]
    NotRunning,
}

/// Checks `new` against what runs and applies it, or says what needs a restart.
pub(crate) fn apply(handle: &RelayHandle, new: RelayConfig) -> Result<ReloadSummary, ReloadError> {
    let current = handle.config().get();
    let restart = needs_restart(&current, &new);
    if !restart.is_empty() {
        return Err(ReloadError::NeedsRestart(restart));
    }
    let spawner = handle.spawner().ok_or(ReloadError::NotRunning)?;
    let mut summary = ReloadSummary::default();
    let running: HashMap<String, Arc<Endpoint>> =
        handle.endpoints().into_iter().map(|(e, _)| (e.name.clone(), e)).collect();
    // Prepare everything that can fail before changing anything: the identity is put in
    // force only if it builds; every added endpoint is bound.
    let identity_changed = current.identity.chain != new.identity.chain
        || current.identity.key.secret_der() != new.identity.key.secret_der();
    if identity_changed {
        tls::tunnel_server_config(new.identity.chain.clone(), new.identity.key.clone_key())
            .map_err(|e| ReloadError::Identity(e.to_string()))?;
    }
    let mut bound = Vec::new();
    for spec in new.endpoints.iter().filter(|e| !running.contains_key(&e.name)) {
        let bind_error =
            |source| ReloadError::Bind { endpoint: spec.name.clone(), addr: spec.listen, source };
        let listener = tcp::listen(spec.listen).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        bound.push((spec.clone(), listener, addr));
    }
    if identity_changed {
        spawner.identity.replace(&new.identity).map_err(ReloadError::Identity)?;
        summary.identity_replaced = true;
    }
    for spec in &new.endpoints {
        if let Some(endpoint) = running.get(&spec.name) {
            if *endpoint.spec() != *spec {
                endpoint.set_spec(spec.clone());
                summary.endpoints_changed.push(spec.name.clone());
            }
        }
    }
    for (spec, listener, addr) in bound {
        let endpoint = Arc::new(Endpoint::new(spec, Arc::clone(handle.metrics())));
        info!(endpoint = %endpoint.name, listen = %addr, "endpoint listening (reload)");
        summary.endpoints_added.push(endpoint.name.clone());
        handle.add_endpoint(Arc::clone(&endpoint), addr);
        spawner.spawn(endpoint, listener);
    }
    for name in running.keys().filter(|name| !new.endpoints.iter().any(|e| e.name == **name)) {
        if let Some(endpoint) = handle.remove_endpoint(name) {
            endpoint.retire(new.shutdown_grace);
            summary.endpoints_removed.push(name.clone());
        }
    }
    summary.agents_disconnected = disconnect_revoked(handle.registry(), &new);
    summary.endpoints_changed.sort();
    summary.endpoints_removed.sort();
    summary.source_files.clone_from(&new.source_files);
    handle.config().set(new);
    Ok(summary)
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
    let old: HashMap<&str, &EndpointSpec> =
        current.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
    for spec in &new.endpoints {
        match old.get(spec.name.as_str()) {
            None => {} // added: applied
            Some(was) => {
                for (field, changed) in [
                    ("connector", was.connector != spec.connector),
                    ("destination", was.destination != spec.destination),
                    ("listen", was.listen != spec.listen),
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

/// Logs a reload's result.
pub(crate) fn log(result: &Result<ReloadSummary, ReloadError>) {
    match result {
        Ok(summary) => info!(
            endpoints_changed = %summary.endpoints_changed.join(","),
            endpoints_added = %summary.endpoints_added.join(","),
            endpoints_removed = %summary.endpoints_removed.join(","),
            identity_replaced = summary.identity_replaced,
            agents_disconnected = %summary.agents_disconnected.join(","),
            "configuration reloaded"
        ),
        Err(e) => warn!("configuration not reloaded, the running one stays: {e}"),
    }
}
