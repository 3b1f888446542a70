//! The agent's Prometheus metrics (the names in DESIGN.md, "Admin API and metrics"), served as
//! OpenMetrics text on the admin listener's `/metrics`: streams by how they ended, bytes each
//! way, destination connect times and transport fallbacks are counted where they happen; link
//! states, active streams and fleet coverage are read from the link status when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::status::{AgentStatus, LinkState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabels {
    relay: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    relay: String,
    transport: &'static str,
    state: &'static str,
}

/// Every agent metric.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    streams: Family<OutcomeLabel, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    connect_duration: Histogram,
    fallbacks: Counter,
    links: Family<LinkLabels, Gauge>,
    fleet_relays: Family<FleetLabels, Gauge>,
    streams_active: Gauge,
    reloads: privlink_admin::ReloadMetrics,
    buffer: privlink_admin::BufferMetrics,
    /// `privlink_audit_*`, set from the trail at each scrape.
    pub(crate) audit: privlink_admin::audit::AuditMetrics,
    /// Streams ended, bytes moved and relay links connected over the last ten minutes.
    pub(crate) history: privlink_admin::history::History,
    tunnel_links: privlink_admin::TunnelLinkMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = privlink_admin::metrics_registry(
            "agent",
            (privlink_transport::crypto::PROVIDER, privlink_transport::crypto::fips_mode()),
        );
        let streams = Family::<OutcomeLabel, Counter>::default();
        registry.register("agent_streams", "Streams by how they ended", streams.clone());
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "agent_bytes",
            "Bytes forwarded, by direction (open streams counted up to each scrape)",
            bytes.clone(),
        );
        let connect_duration = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "agent_connect_duration_seconds",
            "Resolving and connecting to a destination, when it succeeded",
            connect_duration.clone(),
        );
        let fallbacks = Counter::default();
        registry.register(
            "agent_transport_fallbacks",
            "Times `auto` fell back from QUIC to TLS over TCP",
            fallbacks.clone(),
        );
        let links = Family::<LinkLabels, Gauge>::default();
        registry.register(
            "agent_relay_links",
            "Relay links by relay, transport and state",
            links.clone(),
        );
        let fleet_relays = Family::<FleetLabels, Gauge>::default();
        registry.register(
            "agent_fleet_relays",
            "Relays of the fleet behind each configured relay address, reached by a link or missing",
            fleet_relays.clone(),
        );
        let streams_active = Gauge::default();
        registry.register("agent_streams_active", "Streams open now", streams_active.clone());
        let reloads = privlink_admin::ReloadMetrics::register(&mut registry);
        let buffer = privlink_admin::BufferMetrics::register(&mut registry);
        let audit = privlink_admin::audit::AuditMetrics::register(&mut registry);
        let tunnel_links = privlink_admin::TunnelLinkMetrics::register(&mut registry, "agent");
        Self {
            registry,
            streams,
            bytes,
            connect_duration,
            fallbacks,
            links,
            fleet_relays,
            streams_active,
            reloads,
            buffer,
            audit,
            history: Default::default(),
            tunnel_links,
        }
    }
}

impl AgentMetrics {
    /// A stream ended with `outcome`; the bytes are what it moved that no scrape counted yet.
    pub(crate) fn stream_ended(&self, outcome: &'static str, to_destination: u64, from: u64) {
        self.streams.get_or_create(&OutcomeLabel { outcome }).inc();
        self.history.ended(outcome);
        self.count_bytes(to_destination, from);
    }

    fn count_bytes(&self, to_destination: u64, from_destination: u64) {
        let bytes = |direction| DirectionLabel { direction };
        self.bytes.get_or_create(&bytes("to_destination")).inc_by(to_destination);
        self.bytes.get_or_create(&bytes("from_destination")).inc_by(from_destination);
        self.history.moved(to_destination, from_destination);
    }

    /// A destination was resolved and connected in `seconds`.
    pub(crate) fn connected(&self, seconds: f64) {
        self.connect_duration.observe(seconds);
    }

    /// A configuration reload was applied (`true`) or refused.
    pub(crate) fn reloaded(&self, applied: bool) {
        self.reloads.reloaded(applied);
    }

    /// `auto` fell back to TLS over TCP.
    pub(crate) fn fell_back(&self) {
        self.fallbacks.inc();
    }

    /// The OpenMetrics text, as of the last [`update`](Self::update).
    pub(crate) fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Sets the link gauges from `status` now and counts `unreported`, the bytes open streams
    /// moved since the last update (from the destination, to it): the counters rise during a
    /// long transfer; `buffer` is the buffer budget (held, limit). At each scrape, and every
    /// second for the history.
    pub(crate) fn update(&self, status: &AgentStatus, unreported: (u64, u64), buffer: (u64, u64)) {
        self.buffer.set(buffer.0, buffer.1);
        let (from_destination, to_destination) = unreported;
        self.count_bytes(to_destination, from_destination);
        // Links that changed state since the last scrape would otherwise keep their old series.
        self.links.clear();
        let mut active = 0i64;
        let mut connected = 0;
        let links = status.links();
        for link in &links {
            let transport = match link.transport {
                Some(privlink_transport::tunnel::TransportKind::Quic) => "quic",
                Some(privlink_transport::tunnel::TransportKind::Tcp) => "tcp",
                None => "none",
            };
            let state = match link.state {
                LinkState::Connecting => "connecting",
                LinkState::Connected => "connected",
                LinkState::Down => "down",
            };
            let labels = LinkLabels { relay: link.relay.clone(), transport, state };
            self.links.get_or_create(&labels).inc();
            active += i64::from(link.active_streams);
            connected += usize::from(link.state == LinkState::Connected);
        }
        self.streams_active.set(active);
        for (relay, coverage) in status.fleets() {
            let gauge = |state| {
                self.fleet_relays.get_or_create(&FleetLabels { relay: relay.clone(), state })
            };
            gauge("reached").set(i64::try_from(coverage.reached.len()).unwrap_or(i64::MAX));
            gauge("missing").set(i64::try_from(coverage.missing.len()).unwrap_or(i64::MAX));
        }
        self.history.peers(connected);
        let up = links.iter().filter(|link| link.state == LinkState::Connected);
        self.tunnel_links.set(up.map(|link| {
            let transport = match link.transport {
                Some(privlink_transport::tunnel::TransportKind::Tcp) => "tcp",
                _ => "quic",
            };
            (transport, link.tls.as_ref().map(|t| (t.key_exchange.as_str(), t.cipher.as_str())))
        }));
    }
}
