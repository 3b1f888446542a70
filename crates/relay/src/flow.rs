//! What the relay records of each client connection: one flow-log line at its end (target
//! `privlink::flow`, like Satellite's flow logs) and the endpoint's counters.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use privlink_protocol::destination::Destination;
use privlink_transport::splice::Outcome;
use tracing::info;

use crate::config::EndpointSpec;

/// Counters of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    /// Connections accepted and forwarded.
    pub accepted: AtomicU64,
    /// Connections closed at once by the ACL.
    pub denied: AtomicU64,
    /// Connections closed at once because `max_connections` or a per-source limit was reached.
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
}

impl Flow<'_> {
    /// Writes the flow-log line.
    pub(crate) fn log(&self) {
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
