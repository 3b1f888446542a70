//! Hot reload of the agent's configuration (SIGHUP, or the content of the file, its token file
//! or `relay_ca` changing — the binary watches for both and calls
//! [`AgentReloader::reload_from`]). A new file is validated like one at start; an invalid one
//! changes nothing. A valid one is applied whole or not at all:
//!
//! * applied in place: the allowlist and the DNS and connect deadlines (every link judges its
//!   endpoints again and sends the relay the verdicts that changed; streams already open go
//!   on), the token (read again from `token_file`, presented at the next hello — links up now
//!   stay), and `relays` (links started to added relays, drained from removed ones);
//! * not applied yet (refused, saying what needs a restart): `name`, `connector`, `relay_ca`,
//!   the transport settings, the proxy (and its credentials), `[admin]` and `shutdown_grace`.

use privlink_protocol::audit::record::Code;
use privlink_protocol::config::SourceDigest;
use privlink_transport::audit::AuditTrail;
use std::sync::{Arc, PoisonError};

use tracing::{info, warn};

use crate::audit;
use crate::config::AgentConfig;
use crate::forward::StreamRules;
use crate::shared::AgentShared;

/// The part of `config` streams are judged and connected by.
pub(crate) fn rules_of(config: &AgentConfig) -> StreamRules {
    StreamRules {
        allowlist: config.allowlist.clone(),
        dns_timeout: config.dns_timeout,
        connect_timeout: config.connect_timeout,
        stall_timeout: config.stall_timeout,
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentReloadSummary {
    /// The allowlist or the deadlines changed (verdicts judged again).
    pub rules_changed: bool,
    /// The token changed (presented from the next hello on).
    pub token_changed: bool,
    /// Relays linked to now.
    pub relays_added: Vec<String>,
    /// Relays whose links were drained.
    pub relays_removed: Vec<String>,
    /// The applied configuration's [`AgentConfig::source_files`], to watch from now on.
    pub source_files: Vec<std::path::PathBuf>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum AgentReloadError {
    /// The new file is invalid.
    #[error(transparent)]
    Invalid(#[from] privlink_protocol::config::ConfigError),
    /// It changes something that is not reloaded yet.
    #[error("not reloaded — these changes need a restart: {}", .0.join("; "))]
    NeedsRestart(Vec<String>),
}

/// Reloads a running agent's configuration (from [`crate::Agent::reloader`]).
#[derive(Debug, Clone)]
pub struct AgentReloader {
    shared: Arc<AgentShared>,
}

impl AgentReloader {
    pub(crate) fn new(shared: Arc<AgentShared>) -> Self {
        Self { shared }
    }

    /// Reads `path` (with `env_token` as at start, for a token that came from the
    /// environment) and applies it; the result is logged and in the reload metrics.
    pub fn reload_from(
        &self,
        path: &std::path::Path,
        env_token: Option<String>,
    ) -> Result<AgentReloadSummary, AgentReloadError> {
        let mut digest = SourceDigest { path: path.to_owned(), sha256: String::new() };
        let result =
            AgentConfig::load(path, env_token).map_err(AgentReloadError::from).and_then(|new| {
                digest = new.source.clone().unwrap_or(digest.clone());
                self.apply(new)
            });
        audit_reload(&self.shared.policy.audit, &digest, &result);
        match &result {
            Ok(summary) => info!(
                rules_changed = summary.rules_changed,
                token_changed = summary.token_changed,
                relays_added = %summary.relays_added.join(","),
                relays_removed = %summary.relays_removed.join(","),
                "configuration reloaded"
            ),
            Err(e) => warn!("configuration not reloaded, the running one stays: {e}"),
        }
        self.shared.metrics.reloaded(result.is_ok());
        result
    }

    fn apply(&self, new: AgentConfig) -> Result<AgentReloadSummary, AgentReloadError> {
        let shared = &self.shared;
        let current = &shared.config;
        let mut restart = Vec::new();
        for (key, changed) in [
            ("name", current.name != new.name),
            ("connector", current.connector != new.connector),
            ("relay_ca", current.relay_roots != new.relay_roots),
            ("transport", current.transport != new.transport),
            ("quic_fallback_after", current.quic_fallback_after != new.quic_fallback_after),
            ("quic_probe_interval", current.quic_probe_interval != new.quic_probe_interval),
            ("shutdown_grace", current.shutdown_grace != new.shutdown_grace),
            ("[admin]", current.admin != new.admin),
            ("proxy", current.proxy != new.proxy),
            ("[audit]", current.audit != new.audit),
            ("post_quantum", current.crypto.post_quantum != new.crypto.post_quantum),
            ("fips", current.crypto.fips != new.crypto.fips),
            // Links keep the window they were set up with, and the budget charges by it.
            ("stream_window", current.stream_window != new.stream_window),
        ] {
            if changed {
                restart.push(key.to_owned());
            }
        }
        if !restart.is_empty() {
            return Err(AgentReloadError::NeedsRestart(restart));
        }
        let mut summary = AgentReloadSummary::default();
        shared.policy.budget.set_limit(new.buffer_budget);
        let rules = rules_of(&new);
        if *shared.policy.rules() != rules {
            shared.policy.set_rules(rules);
            shared.rules_changed.send_modify(|generation| *generation += 1);
            summary.rules_changed = true;
        }
        {
            let mut token = shared.token.write().unwrap_or_else(PoisonError::into_inner);
            // Our own two configured tokens, not a peer's guess: no constant-time need.
            if token.expose() != new.token.expose() {
                *token = new.token.clone();
                summary.token_changed = true;
            }
        }
        let wanted: Vec<String> = new.relays.iter().map(ToString::to_string).collect();
        let removed: Vec<String> = {
            let mut relays = shared.relays.lock().unwrap_or_else(PoisonError::into_inner);
            let gone: Vec<String> =
                relays.keys().filter(|r| !wanted.contains(r)).cloned().collect();
            for relay in &gone {
                if let Some(stop) = relays.remove(relay) {
                    info!(%relay, "relay removed from the configuration: draining its links");
                    stop.cancel();
                }
            }
            gone
        };
        summary.relays_removed = removed;
        for relay in &new.relays {
            let known = shared
                .relays
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&relay.to_string());
            if !known {
                summary.relays_added.push(relay.to_string());
                crate::links::start_relay(shared, relay);
            }
        }
        summary.source_files = new.source_files;
        Ok(summary)
    }
}

/// A reload of the file at `path`, applied or refused.
fn audit_reload(
    trail: &AuditTrail,
    source_digest: &SourceDigest,
    result: &Result<AgentReloadSummary, AgentReloadError>,
) {
    let record = match result {
        Ok(summary) => audit::source(audit::now(Code::ConfigReloaded), Some(source_digest))
            .flag("rules_changed", summary.rules_changed)
            .flag("token_changed", summary.token_changed)
            .text("relays_added", &summary.relays_added.join(","))
            .text("relays_removed", &summary.relays_removed.join(",")),
        Err(e) => audit::source(audit::now(Code::ConfigReloadRefused), Some(source_digest))
            .display("reason", e),
    };
    trail.record(record);
}
