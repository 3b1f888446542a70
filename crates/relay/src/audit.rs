//! What the relay writes to its audit trail (`[audit]`; docs/audit.md lists every code and its
//! fields): the configuration loaded and each reload, agents authenticated, refused, draining
//! and gone, endpoint status changes, and each client connection — denied before anything was
//! forwarded, or opened, in progress every `periodic`, and closed with its bytes, duration and
//! outcome. Records carry names, addresses, counts and reasons; never a token, a credential or
//! a payload byte. The records are built here — those of a connection's end in `flow`, of a
//! reload in `reload`, of progress in `status`, which own what they describe — and
//! `privlink_transport::audit` writes them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use privlink_protocol::audit::record::{Code, Record};
use privlink_transport::audit::AuditTrail;

use crate::config::{EndpointSpec, RelayConfig};
use crate::registry::{EndpointStatus, Registry};

/// The relay's audit trail and what it remembers to record changes.
#[derive(Debug, Default)]
pub(crate) struct RelayAudit {
    pub(crate) trail: AuditTrail,
    /// The status (and reason) last recorded of each endpoint.
    statuses: Mutex<HashMap<String, (&'static str, Option<String>)>>,
    /// Numbers connections, so that a connection's opened, progress and closed records can be
    /// told apart from another's (unique within one `trail.opened`).
    next_connection: AtomicU64,
}

/// Where a client was refused: at an endpoint, or at a shared listener before an endpoint was
/// chosen.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Place<'a> {
    Endpoint(&'a str),
    Listener(&'a str),
}

/// A record of `code`, now.
pub(crate) fn now(code: Code) -> Record {
    Record::new(code, SystemTime::now())
}

/// A duration as the records write it.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The `trail.opened` record a relay starts its trail with.
pub(crate) fn opening() -> Record {
    now(Code::TrailOpened)
        .text("role", "relay")
        .text("version", env!("CARGO_PKG_VERSION"))
        .number("pid", u64::from(std::process::id()))
}

/// The `trail.closed` record of a clean stop.
pub(crate) fn closing() -> Record {
    now(Code::TrailClosed).text("role", "relay")
}

impl RelayAudit {
    pub(crate) fn new(trail: AuditTrail) -> Self {
        Self { trail, ..Self::default() }
    }

    /// The configuration the relay starts with.
    pub(crate) fn config_loaded(&self, config: &RelayConfig) {
        let record = now(Code::ConfigLoaded);
        let record = match &config.source {
            Some(source) => {
                record.display("path", source.path.display()).text("sha256", &source.sha256)
            }
            None => record,
        };
        self.trail.record(
            record
                .number("connectors", config.connectors.len() as u64)
                .number("endpoints", config.endpoints.len() as u64)
                .number("listeners", config.listeners.len() as u64),
        );
    }

    /// An agent authenticated and registered.
    pub(crate) fn agent_authenticated(
        &self,
        (connector, agent, agent_id): (&str, &str, &str),
        remote: SocketAddr,
        transport: impl std::fmt::Display,
        version: &str,
    ) {
        self.trail.record(
            now(Code::AgentAuthenticated)
                .text("connector", connector)
                .text("agent", agent)
                .text("agent_id", agent_id)
                .display("remote", remote)
                .display("transport", transport)
                .text("version", version),
        );
    }

    /// A tunnel connection refused at its hello: `connector` and `agent` as the peer claimed
    /// them (escaped), `reason` a stable label.
    pub(crate) fn auth_failed(
        &self,
        remote: SocketAddr,
        (connector, agent): (&str, &str),
        reason: &str,
    ) {
        self.trail.record(
            now(Code::AgentAuthFailed)
                .display("remote", remote)
                .text("connector", connector)
                .text("agent", agent)
                .text("reason", reason),
        );
    }

    /// A registered agent's session ended.
    pub(crate) fn agent_disconnected(
        &self,
        (connector, agent): (&str, &str),
        remote: SocketAddr,
        reason: &str,
        connected_for: Duration,
    ) {
        self.trail.record(
            now(Code::AgentDisconnected)
                .text("connector", connector)
                .text("agent", agent)
                .display("remote", remote)
                .text("reason", reason)
                .number("duration_ms", millis(connected_for)),
        );
    }

    /// An agent said it is draining.
    pub(crate) fn agent_draining(&self, (connector, agent): (&str, &str), reason: &str) {
        self.trail.record(
            now(Code::AgentDraining)
                .text("connector", connector)
                .text("agent", agent)
                .text("reason", reason),
        );
    }

    /// Records the status of each of `endpoints` that changed (or, rejected, changed its
    /// reason) since it was last recorded.
    pub(crate) fn endpoint_statuses<'a>(
        &self,
        registry: &Registry,
        endpoints: impl Iterator<Item = &'a EndpointSpec>,
    ) {
        let mut last = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        for spec in endpoints {
            let status = registry.status(&spec.connector, &spec.name);
            let (label, reason) = match &status {
                EndpointStatus::Disconnected => ("disconnected", None),
                EndpointStatus::Pending => ("pending", None),
                EndpointStatus::Approved => ("approved", None),
                EndpointStatus::Rejected { reason } => ("rejected", Some(reason.as_str())),
            };
            let seen = last.get(&spec.name);
            if seen.is_some_and(|(l, r)| *l == label && r.as_deref() == reason) {
                continue;
            }
            let record = now(Code::EndpointStatus)
                .text("endpoint", &spec.name)
                .text("connector", &spec.connector)
                .text("status", label);
            self.trail.record(match reason {
                Some(reason) => record.text("reason", reason),
                None => record,
            });
            last.insert(spec.name.clone(), (label, reason.map(str::to_owned)));
        }
    }

    /// A client refused before anything was forwarded.
    pub(crate) fn denied(
        &self,
        (client, via): (SocketAddr, Option<SocketAddr>),
        place: Place<'_>,
        outcome: &str,
        reason: Option<&str>,
    ) {
        let record = now(Code::ConnectionDenied).display("client", client).maybe("via", via);
        let record = match place {
            Place::Endpoint(name) => record.text("endpoint", name),
            Place::Listener(name) => record.text("listener", name),
        };
        let record = record.text("outcome", outcome);
        self.trail.record(match reason {
            Some(reason) => record.text("reason", reason),
            None => record,
        });
    }

    /// A client connection that passed the policy, about to be forwarded: its number for the
    /// records that follow, or `None` when the trail must be written (`require`) and cannot
    /// take the record — the connection is then refused.
    pub(crate) fn opened(
        &self,
        (client, via): (SocketAddr, Option<SocketAddr>),
        endpoint: &str,
        destination: &str,
    ) -> Option<u64> {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.trail.is_on() {
            return Some(connection);
        }
        if self.trail.required() && !self.trail.is_writing() {
            return None;
        }
        let written = self.trail.record(
            now(Code::ConnectionOpened)
                .number("connection", connection)
                .display("client", client)
                .maybe("via", via)
                .text("endpoint", endpoint)
                .text("destination", destination),
        );
        (written || !self.trail.required()).then_some(connection)
    }
}
