//! What the relay records of each client connection: one flow-log line at its end (target
//! `privlink::flow`, like Satellite's flow logs) with its audit record, and the endpoint's
//! counters.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use privlink_protocol::audit::record::{Code, Record};
use privlink_protocol::destination::Destination;
use privlink_transport::splice::Outcome;
use tracing::info;

use crate::audit::{self, RelayAudit};
use crate::config::EndpointSpec;

/// Counters of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    /// Connections accepted and forwarded.
    pub accepted: AtomicU64,
    /// Connections closed at once by the ACL.
    pub denied: AtomicU64,
    /// Connections closed at once because `max_connections`, a per-source limit or the relay's
    /// open-file limit (`no_descriptors`) was reached.
    pub over_limit: AtomicU64,
    /// Connections closed at once because the relay held its whole buffer budget.
    pub over_budget: AtomicU64,
}

/// One finished client connection.
#[derive(Debug)]
pub(crate) struct Flow<'a> {
    pub(crate) client: SocketAddr,
    /// The load balancer whose PROXY header named the client, if one did.
    pub(crate) via: Option<SocketAddr>,
    pub(crate) endpoint: &'a EndpointSpec,
    /// The agent that carried it (`-` when none was chosen).
    pub(crate) agent: &'a str,
    /// How many agents were tried (more than one when the open was retried).
    pub(crate) attempts: usize,
    /// Their names in order, comma-separated.
    pub(crate) agents_tried: &'a str,
    pub(crate) duration: Duration,
    pub(crate) bytes_from_client: u64,
    pub(crate) bytes_to_client: u64,
    pub(crate) outcome: &'a Outcome,
    /// Where a CONNECT client asked to go, once that was read (the endpoint's destination
    /// otherwise).
    pub(crate) requested: Option<&'a Destination>,
    /// Its number in the audit trail, once it was forwarded (`None`: refused before).
    pub(crate) connection: Option<u64>,
}

impl Flow<'_> {
    /// Writes the flow-log line and the audit record (`connection.closed`, or
    /// `connection.denied` for one never forwarded).
    pub(crate) fn record(&self, audit: &RelayAudit) {
        audit_end(audit, self, self.connection);
        let duration_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX);
        info!(
            target: "privlink::flow",
            client = %self.client,
            via = self.via.map(tracing::field::display),
            endpoint = %self.endpoint.name,
            destination = %self.requested.map_or_else(
                || self.endpoint.destination.to_string(),
                ToString::to_string,
            ),
            agent = %self.agent,
            attempts = self.attempts,
            agents_tried = %self.agents_tried,
            duration_ms,
            bytes_from_client = self.bytes_from_client,
            bytes_to_client = self.bytes_to_client,
            outcome = %self.outcome,
            "flow"
        );
    }
}

/// A forwarded connection ended (`connection` from [`RelayAudit::opened`]), or — without
/// a number — one refused before it was forwarded (SNI, PROXY, CONNECT). Recorded with the
/// trail off too: the status page lists the last ones.
fn audit_end(audit: &RelayAudit, flow: &Flow<'_>, connection: Option<u64>) {
    let destination = flow
        .requested
        .map_or_else(|| flow.endpoint.destination.to_string(), Destination::to_string);
    let Some(connection) = connection else {
        let record = audit::now(Code::ConnectionDenied)
            .display("client", flow.client)
            .maybe("via", flow.via)
            .text("endpoint", &flow.endpoint.name)
            .text("destination", &destination);
        audit.trail.record(outcome_fields(record, flow.outcome));
        return;
    };
    let record = audit::now(Code::ConnectionClosed)
        .number("connection", connection)
        .display("client", flow.client)
        .maybe("via", flow.via)
        .text("endpoint", &flow.endpoint.name)
        .text("destination", &destination)
        .text("agent", flow.agent)
        .number("attempts", flow.attempts as u64)
        .number("duration_ms", audit::millis(flow.duration))
        .number("bytes_from_client", flow.bytes_from_client)
        .number("bytes_to_client", flow.bytes_to_client);
    audit.trail.record(outcome_fields(record, flow.outcome));
}

/// `outcome` as a label, and the detail its label leaves out, if any.
fn outcome_fields(record: Record, outcome: &Outcome) -> Record {
    let label = outcome.label();
    let full = outcome.to_string();
    let record = record.text("outcome", label);
    if full == label { record } else { record.text("reason", &full) }
}
