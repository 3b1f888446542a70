//! What the agent writes to its audit trail (`[audit]`; docs/audit.md lists every code and its
//! fields): the configuration loaded and each reload, links to relays up and down, each
//! destination a relay asked for and the agent refused, and each stream it carried, closed with
//! its bytes, duration and outcome. Never a token, a credential or a payload byte; strings a
//! relay sent are escaped and bounded by the record itself. (A reload's record is built in
//! `reload`, which owns the summary it describes.)

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use privlink_protocol::audit::record::{Code, Record};
use privlink_protocol::config::SourceDigest;
use privlink_transport::audit::AuditTrail;

use crate::config::AgentConfig;

/// A record of `code`, now.
pub(crate) fn now(code: Code) -> Record {
    Record::new(code, SystemTime::now())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The `trail.opened` record an agent starts its trail with.
pub(crate) fn opening(config: &AgentConfig, agent_id: &str) -> Record {
    now(Code::TrailOpened)
        .text("role", "agent")
        .text("version", env!("CARGO_PKG_VERSION"))
        .number("pid", u64::from(std::process::id()))
        .text("agent", &config.name)
        .text("agent_id", agent_id)
        .text("connector", &config.connector)
}

/// The `trail.closed` record of a clean stop.
pub(crate) fn closing() -> Record {
    now(Code::TrailClosed).text("role", "agent")
}

/// `record` with the file a configuration came from and its SHA-256.
pub(crate) fn source(record: Record, source: Option<&SourceDigest>) -> Record {
    match source {
        Some(s) if s.sha256.is_empty() => record.display("path", s.path.display()),
        Some(s) => record.display("path", s.path.display()).text("sha256", &s.sha256),
        None => record,
    }
}

/// The configuration the agent starts with.
pub(crate) fn config_loaded(trail: &AuditTrail, config: &AgentConfig) {
    let record = source(now(Code::ConfigLoaded), config.source.as_ref());
    trail.record(
        record
            .number("relays", config.relays.len() as u64)
            .number("allow_rules", config.allowlist.rules.len() as u64),
    );
}

/// A link to a relay authenticated.
pub(crate) fn link_up(
    trail: &AuditTrail,
    relay: impl std::fmt::Display,
    address: SocketAddr,
    transport: impl std::fmt::Display,
) {
    trail.record(
        now(Code::LinkUp)
            .display("relay", relay)
            .display("address", address)
            .display("transport", transport),
    );
}

/// A link that was up ended.
pub(crate) fn link_down(
    trail: &AuditTrail,
    relay: impl std::fmt::Display,
    address: SocketAddr,
    reason: &str,
) {
    trail.record(
        now(Code::LinkDown)
            .display("relay", relay)
            .display("address", address)
            .text("reason", reason),
    );
}

/// What a relay asked of the agent for one stream: its endpoint, its client, the destination.
pub(crate) type Asked<'a> = (&'a str, SocketAddr, &'a str);

/// A destination refused: outside the allowlist, or for an endpoint this agent did not approve.
pub(crate) fn destination_refused(
    trail: &AuditTrail,
    (endpoint, client, destination): Asked<'_>,
    reason: &str,
) {
    trail.record(
        now(Code::DestinationRefused)
            .text("endpoint", endpoint)
            .display("client", client)
            .text("destination", destination)
            .text("reason", reason),
    );
}

/// A stream whose destination could not be reached (or that the buffer budget refused):
/// `stream.closed` with nothing moved, its outcome label and the failure's message.
pub(crate) fn stream_failed(
    trail: &AuditTrail,
    asked: Asked<'_>,
    duration: Duration,
    outcome: &str,
    reason: &str,
) {
    trail.record(stream_record(asked, duration, (0, 0), outcome, Some(reason)));
}

/// A stream carried to its destination ended.
pub(crate) fn stream_closed(
    trail: &AuditTrail,
    asked: Asked<'_>,
    duration: Duration,
    moved: (u64, u64),
    outcome: &privlink_transport::splice::Outcome,
) {
    let label = outcome.label();
    let full = outcome.to_string();
    let reason = (full != label).then_some(full.as_str());
    trail.record(stream_record(asked, duration, moved, label, reason));
}

/// `stream.closed`: what was asked, how long it ran, what it moved (to the destination, from
/// it), its outcome label and — when the label does not say it all — the reason.
fn stream_record(
    (endpoint, client, destination): Asked<'_>,
    duration: Duration,
    (to_destination, from_destination): (u64, u64),
    outcome: &str,
    reason: Option<&str>,
) -> Record {
    now(Code::StreamClosed)
        .text("endpoint", endpoint)
        .display("client", client)
        .text("destination", destination)
        .number("duration_ms", millis(duration))
        .number("bytes_to_destination", to_destination)
        .number("bytes_from_destination", from_destination)
        .text("outcome", outcome)
        .maybe("reason", reason)
}
