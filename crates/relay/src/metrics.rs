//! The relay's Prometheus metrics (the names in DESIGN.md, "Admin API and metrics"), served as
//! OpenMetrics text on the admin listener's `/metrics`. Counters are counted where things
//! happen (accept, the flow log, authentication); the state gauges — endpoint status, active
//! connections, connected agents — are read from the registry when scraped. No label carries
//! a client address. The same counts feed the status page's ten-minute [`History`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use privlink_admin::history::History;

/// The state gauges at a scrape, read by the caller from the endpoints and the registry
/// just before [`RelayMetrics::render`].
#[derive(Debug, Default)]
pub(crate) struct ScrapedState {
    /// Every endpoint.
    pub(crate) endpoints: Vec<EndpointState>,
    /// Connected agents per connector: (connector, on QUIC, on TLS/TCP).
    pub(crate) agents: Vec<(String, usize, usize)>,
    /// The buffer budget: (held, limit).
    pub(crate) buffer: (u64, u64),
    /// The audit trail, when one is written.
    pub(crate) audit: Option<privlink_transport::audit::TrailStatus>,
    /// Each connected agent's transport and (key exchange, cipher suite).
    pub(crate) tunnel_links: Vec<(&'static str, Option<(String, String)>)>,
}

/// One endpoint's gauges at a scrape.
#[derive(Debug)]
pub(crate) struct EndpointState {
    pub(crate) name: String,
    /// Its status word (`Approved`, …).
    pub(crate) status: &'static str,
    /// Connections open now.
    pub(crate) active: usize,
    /// Bytes its open connections moved that no scrape has counted yet (from the client, to
    /// the client): the byte counters rise during a long transfer.
    pub(crate) unreported: (u64, u64),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    endpoint: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    endpoint: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    endpoint: String,
    status: &'static str,
}

/// A CONNECT endpoint's answer: the `destinations` pattern that admitted the request (`-`
/// when it was refused before one did) — a pattern, not the name asked for, so that the
/// series stay as few as the configuration's lines — and the status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectLabels {
    endpoint: String,
    destination: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    connector: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    endpoint: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why an authentication failed, as the `reason` label says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AuthFailureReason {
    /// No connector of that name.
    UnknownConnector,
    /// The token does not match.
    WrongToken,
    /// A name in the hello broke the syntax.
    InvalidHello,
}

/// Every relay metric.
#[derive(Debug)]
pub(crate) struct RelayMetrics {
    registry: Registry,
    connections: Family<OutcomeLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    open_retries: Family<ReasonLabels, Counter>,
    connect_answers: Family<ConnectLabels, Counter>,
    listener_refused: Family<ListenerLabels, Counter>,
    open_duration: Family<EndpointLabel, Histogram>,
    auth_failures: Family<ReasonLabel, Counter>,
    endpoint_status: Family<StatusLabels, Gauge>,
    connections_active: Family<EndpointLabel, Gauge>,
    agents_connected: Family<AgentLabels, Gauge>,
    /// Connections ended, bytes moved and agents connected over the last ten minutes.
    pub(crate) history: History,
    tunnel_links: privlink_admin::TunnelLinkMetrics,
    reloads: privlink_admin::ReloadMetrics,
    buffer: privlink_admin::BufferMetrics,
    audit: privlink_admin::audit::AuditMetrics,
}

/// The endpoint statuses, in the order the gauge lists them.
const STATUSES: [&str; 4] = ["Approved", "Pending", "Rejected", "Disconnected"];

impl Default for RelayMetrics {
    fn default() -> Self {
        let mut registry = privlink_admin::metrics_registry(
            "relay",
            (privlink_transport::crypto::PROVIDER, privlink_transport::crypto::fips_mode()),
        );
        let connections = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "relay_connections",
            "Client connections by endpoint and how they ended",
            connections.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "relay_bytes",
            "Bytes forwarded, by endpoint and direction (open connections counted up to each scrape)",
            bytes.clone(),
        );
        let open_retries = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "relay_open_retries",
            "Opens tried again on another agent, by endpoint and why the previous agent did not \
             serve it (destination_failed, agent_error, relay_error)",
            open_retries.clone(),
        );
        let connect_answers = Family::<ConnectLabels, Counter>::default();
        registry.register(
            "relay_connect_answers",
            "HTTP CONNECT requests answered, by endpoint, the destinations pattern that admitted \
             the request (- when none did) and status (200, 400, 403, 405, 407, 502, 503, 504)",
            connect_answers.clone(),
        );
        let listener_refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "relay_listener_refused",
            "Connections a shared listener turned away before any endpoint took them, by reason \
             (acl_denied, over_limit, rate_limited, source_over_limit, sni_unmatched, \
             proxy_header_invalid)",
            listener_refused.clone(),
        );
        let open_duration = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
        });
        registry.register(
            "relay_open_duration_seconds",
            "From a client's accept until the agent answered the open request",
            open_duration.clone(),
        );
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "relay_auth_failures",
            "Agent hellos refused, by reason",
            auth_failures.clone(),
        );
        let endpoint_status = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "relay_endpoint_status",
            "1 for each endpoint's current status, 0 for the others",
            endpoint_status.clone(),
        );
        let connections_active = Family::<EndpointLabel, Gauge>::default();
        registry.register(
            "relay_connections_active",
            "Client connections open now, by endpoint",
            connections_active.clone(),
        );
        let agents_connected = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "relay_agents_connected",
            "Agents connected now, by connector and transport",
            agents_connected.clone(),
        );
        let reloads = privlink_admin::ReloadMetrics::register(&mut registry);
        let buffer = privlink_admin::BufferMetrics::register(&mut registry);
        let audit = privlink_admin::audit::AuditMetrics::register(&mut registry);
        let tunnel_links = privlink_admin::TunnelLinkMetrics::register(&mut registry, "relay");
        Self {
            tunnel_links,
            reloads,
            buffer,
            audit,
            registry,
            connections,
            bytes,
            open_retries,
            connect_answers,
            listener_refused,
            open_duration,
            auth_failures,
            endpoint_status,
            connections_active,
            agents_connected,
            history: History::default(),
        }
    }
}

impl RelayMetrics {
    /// A connection of `endpoint` ended with `outcome`; `unreported` is what it moved (from
    /// the client, to the client) that no scrape has counted yet.
    pub(crate) fn connection_ended(&self, endpoint: &str, outcome: &str, unreported: (u64, u64)) {
        let labels = OutcomeLabels { endpoint: endpoint.to_owned(), outcome: outcome.to_owned() };
        self.connections.get_or_create(&labels).inc();
        self.history.ended(outcome);
        self.count_bytes(endpoint, unreported);
    }

    fn count_bytes(&self, endpoint: &str, (from_client, to_client): (u64, u64)) {
        if from_client == 0 && to_client == 0 {
            return;
        }
        let bytes = |direction| DirectionLabels { endpoint: endpoint.to_owned(), direction };
        self.bytes.get_or_create(&bytes("from_client")).inc_by(from_client);
        self.bytes.get_or_create(&bytes("to_client")).inc_by(to_client);
        self.history.moved(from_client, to_client);
    }

    /// An open of `endpoint` is tried on another agent after one ended with `reason` (an
    /// outcome label) before answering.
    pub(crate) fn open_retried(&self, endpoint: &str, reason: &'static str) {
        let labels = ReasonLabels { endpoint: endpoint.to_owned(), reason };
        self.open_retries.get_or_create(&labels).inc();
    }

    /// A CONNECT request to `endpoint` was answered with `status`; `destination` is the
    /// pattern that admitted it, if one did.
    pub(crate) fn connect_answered(&self, endpoint: &str, destination: Option<&str>, status: u16) {
        let destination = destination.unwrap_or("-").to_owned();
        let labels = ConnectLabels { endpoint: endpoint.to_owned(), destination, status };
        self.connect_answers.get_or_create(&labels).inc();
    }

    /// A connection to the shared listener `listener` was turned away before any endpoint
    /// took it.
    pub(crate) fn listener_refused(&self, listener: &str, reason: &'static str) {
        let labels = ListenerLabels { listener: listener.to_owned(), reason };
        self.listener_refused.get_or_create(&labels).inc();
        self.history.ended(reason);
    }

    /// A connection of `endpoint` was turned away on accept (`acl_denied`, `over_limit`).
    pub(crate) fn connection_refused(&self, endpoint: &str, outcome: &str) {
        let labels = OutcomeLabels { endpoint: endpoint.to_owned(), outcome: outcome.to_owned() };
        self.connections.get_or_create(&labels).inc();
        self.history.ended(outcome);
    }

    /// The agent answered an open request for `endpoint` after `seconds`.
    pub(crate) fn opened(&self, endpoint: &str, seconds: f64) {
        let labels = EndpointLabel { endpoint: endpoint.to_owned() };
        self.open_duration.get_or_create(&labels).observe(seconds);
    }

    /// A configuration reload was applied (`true`) or refused.
    pub(crate) fn reloaded(&self, applied: bool) {
        self.reloads.reloaded(applied);
    }

    /// An agent's hello was refused.
    pub(crate) fn auth_failed(&self, reason: AuthFailureReason) {
        let reason = match reason {
            AuthFailureReason::UnknownConnector => "unknown_connector",
            AuthFailureReason::WrongToken => "wrong_token",
            AuthFailureReason::InvalidHello => "invalid_hello",
        };
        self.auth_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The OpenMetrics text, with the state gauges set from `state`.
    pub(crate) fn render(&self, state: &ScrapedState) -> String {
        self.update(state);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Sets the state gauges from `state`, counts the bytes open connections moved since the
    /// last update, and notes the agents connected in the history: at each scrape, and every
    /// second for the history.
    pub(crate) fn update(&self, state: &ScrapedState) {
        for endpoint in &state.endpoints {
            for status in STATUSES {
                let labels = StatusLabels { endpoint: endpoint.name.clone(), status };
                self.endpoint_status
                    .get_or_create(&labels)
                    .set(i64::from(status == endpoint.status));
            }
            self.count_bytes(&endpoint.name, endpoint.unreported);
            let labels = EndpointLabel { endpoint: endpoint.name.clone() };
            self.connections_active
                .get_or_create(&labels)
                .set(i64::try_from(endpoint.active).unwrap_or(i64::MAX));
        }
        for (connector, quic, tcp) in &state.agents {
            for (transport, count) in [("quic", quic), ("tcp", tcp)] {
                let labels = AgentLabels { connector: connector.clone(), transport };
                self.agents_connected
                    .get_or_create(&labels)
                    .set(i64::try_from(*count).unwrap_or(i64::MAX));
            }
        }
        self.buffer.set(state.buffer.0, state.buffer.1);
        if let Some(trail) = &state.audit {
            self.audit.set(trail);
        }
        self.history.peers(state.agents.iter().map(|(_, quic, tcp)| quic + tcp).sum());
        self.tunnel_links.set(state.tunnel_links.iter().map(|(transport, tls)| {
            (*transport, tls.as_ref().map(|(kx, cipher)| (kx.as_str(), cipher.as_str())))
        }));
    }
}
