//! Hot reload of the relay's configuration (SIGHUP, or the file changing — the binary watches
//! for both and calls [`RelayHandle::reload`](crate::RelayHandle::reload)). A new file is
//! validated like one at start; an invalid one changes nothing. A valid one is applied whole
//! or not at all:
//!
//! * applied in place, without dropping a connection: each endpoint's ACL, `max_connections`,
//!   `inactivity_timeout` and open-retry settings (new connections get them; open ones keep
//!   theirs), and the connectors' tokens — an agent whose connector is gone or whose token
//!   is no longer listed is disconnected, and new agents are checked against the new list;
//! * not applied yet (the reload is refused, saying what needs a restart): endpoints added,
//!   removed or renamed, an endpoint's connector, destination or listen address, the tunnel
//!   address, its certificate and key, the admin listener and `shutdown_grace`.
//!
//! `privlink_config_last_reload_successful` and `…_success_timestamp_seconds` say how the last
//! attempt went.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use privlink_transport::tunnel::CloseCode;
use tracing::{info, warn};

use crate::config::{EndpointSpec, RelayConfig};
use crate::registry::Registry;
use crate::status::RelayHandle;

/// The configuration in force, shared by whoever needs the current one (authentication,
/// welcomes) and replaced by a reload.
#[derive(Debug)]
pub(crate) struct CurrentConfig(RwLock<Arc<RelayConfig>>);

impl CurrentConfig {
    pub(crate) fn new(config: RelayConfig) -> Self {
        Self(RwLock::new(Arc::new(config)))
    }

    /// The configuration in force now.
    pub(crate) fn get(&self) -> Arc<RelayConfig> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set(&self, config: RelayConfig) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadSummary {
    /// Endpoints whose policy changed.
    pub endpoints_changed: Vec<String>,
    /// Agents disconnected because their connector or token is no longer configured.
    pub agents_disconnected: Vec<String>,
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
}

/// Checks `new` against what runs and applies it, or says what needs a restart.
pub(crate) fn apply(handle: &RelayHandle, new: RelayConfig) -> Result<ReloadSummary, ReloadError> {
    let current = handle.config().get();
    let restart = needs_restart(&current, &new);
    if !restart.is_empty() {
        return Err(ReloadError::NeedsRestart(restart));
    }
    let mut summary = ReloadSummary::default();
    let specs: HashMap<&str, &EndpointSpec> =
        new.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
    for (endpoint, _) in handle.endpoints() {
        if let Some(spec) = specs.get(endpoint.name.as_str()) {
            if *endpoint.spec() != **spec {
                endpoint.set_spec((*spec).clone());
                summary.endpoints_changed.push(endpoint.name.clone());
            }
        }
    }
    summary.agents_disconnected = disconnect_revoked(handle.registry(), &new);
    summary.endpoints_changed.sort();
    handle.config().set(new);
    Ok(summary)
}

/// Closes the connections of agents the new configuration no longer admits.
fn disconnect_revoked(registry: &Registry, new: &RelayConfig) -> Vec<String> {
    let revoked = registry.revoked(|info| {
        !new.connectors.iter().any(|c| {
            c.name == info.connector && c.token_sha256.contains(&info.token_digest)
        })
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
    if current.identity.chain != new.identity.chain
        || current.identity.key.secret_der() != new.identity.key.secret_der()
    {
        restart.push("tunnel.cert / tunnel.key".to_owned());
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
            None => restart.push(format!("endpoint `{}` added", spec.name)),
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
    for name in old.keys() {
        if !new.endpoints.iter().any(|e| e.name == *name) {
            restart.push(format!("endpoint `{name}` removed"));
        }
    }
    restart
}

/// Logs a reload's result.
pub(crate) fn log(result: &Result<ReloadSummary, ReloadError>) {
    match result {
        Ok(summary) => info!(
            endpoints_changed = %summary.endpoints_changed.join(","),
            agents_disconnected = %summary.agents_disconnected.join(","),
            "configuration reloaded"
        ),
        Err(e) => warn!("configuration not reloaded, the running one stays: {e}"),
    }
}
