//! The typed snapshots the admin listener serves: `/api/v1/status` ([`StatusSnapshot`], a
//! relay's or an agent's) and `/api/v1/connections` ([`ConnectionsSnapshot`]). The roles build
//! them, this crate serializes them, and `privlink status`, the test bed and the tests
//! deserialize the same types, so writer and readers cannot drift apart; the JSON is the one
//! `docs/admin-api.md` describes (a test holds a live answer against the doc's example).

use std::collections::BTreeMap;

use privlink_protocol::message::Verdict;
use serde::{Deserialize, Serialize};

/// `/api/v1/status`: what the role is and how it stands, told apart by its `role` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum StatusSnapshot {
    /// A relay's endpoints and agents.
    Relay(RelayStatus),
    /// An agent's relay links.
    Agent(AgentStatus),
}

impl StatusSnapshot {
    /// The relay's status, when it is one.
    pub fn relay(&self) -> Option<&RelayStatus> {
        match self {
            Self::Relay(status) => Some(status),
            Self::Agent(_) => None,
        }
    }

    /// The agent's status, when it is one.
    pub fn agent(&self) -> Option<&AgentStatus> {
        match self {
            Self::Agent(status) => Some(status),
            Self::Relay(_) => None,
        }
    }

    /// Whether the role said it is ready (`/readyz` would answer 200).
    pub fn ready(&self) -> bool {
        match self {
            Self::Relay(status) => status.ready,
            Self::Agent(status) => status.ready,
        }
    }
}

/// A relay's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay's software version.
    pub version: String,
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Tunnel connections accepted but not authenticated yet.
    pub pending_tunnel_connections: usize,
    /// Every endpoint, in no particular order.
    pub endpoints: Vec<EndpointView>,
    /// Every connected agent, by connector and then oldest connection first.
    pub agents: Vec<RelayAgentView>,
    /// Why `/readyz` does not answer 200, when it does not.
    #[serde(default)]
    pub not_ready_reason: Option<String>,
    /// The fleet this relay belongs to (`[fleet]`), if any.
    #[serde(default)]
    pub fleet: Option<RelayFleetView>,
    /// Shared TLS ports (`[[listener]]`) and which endpoint each server name routes to.
    #[serde(default)]
    pub listeners: Vec<ListenerView>,
    /// The audit trail, when `[audit]` is set.
    #[serde(default)]
    pub audit: Option<crate::audit::AuditView>,
}

/// A shared TLS port as the relay reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerView {
    /// Its name.
    pub name: String,
    /// The address it is bound to.
    pub listen: String,
    /// Server name (exact, or `*.` and a domain) → the endpoint that claims it.
    pub routes: BTreeMap<String, String>,
}

/// A relay's fleet as it knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayFleetView {
    /// This relay's id: the tunnel address it advertises.
    pub id: String,
    /// Every relay of the fleet, this one included: what its agents are told to cover.
    pub members: Vec<String>,
}

impl RelayStatus {
    /// The endpoint called `name`.
    pub fn endpoint(&self, name: &str) -> Option<&EndpointView> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// The connected agent whose id is `id`.
    pub fn agent_by_id(&self, id: &str) -> Option<&RelayAgentView> {
        self.agents.iter().find(|a| a.id == id)
    }
}

/// One endpoint as the relay reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointView {
    /// Its name.
    pub name: String,
    /// The address its listener is bound to.
    pub listen: String,
    /// Where its agents connect.
    pub destination: String,
    /// The connector whose agents serve it.
    pub connector: String,
    /// `Approved`, `Pending`, `Rejected` or `Disconnected` (the Private Link vocabulary).
    pub status: String,
    /// One agent's reason, when `Rejected`.
    pub reason: Option<String>,
    /// Client connections open now.
    pub active_connections: usize,
    /// Client connections accepted since the relay started.
    pub total_connections: u64,
    /// The connected, non-draining agents that approved it.
    pub approving_agents: Vec<String>,
}

/// One connected agent as the relay reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayAgentView {
    /// The agent's name.
    pub name: String,
    /// The id it drew at start.
    pub id: String,
    /// Its connector.
    pub connector: String,
    /// Its software version.
    pub version: String,
    /// `quic` or `tcp`.
    pub transport: String,
    /// Its address as the relay sees it.
    pub remote: String,
    /// When it connected.
    pub connected_since_unix: u64,
    /// Streams the relay has open on it.
    pub active_streams: u32,
    /// Whether it announced a drain.
    pub draining: bool,
    /// Its verdict per endpoint; an endpoint not listed is pending.
    pub verdicts: BTreeMap<String, VerdictView>,
    /// What its tunnel connection's TLS negotiated (absent from older relays).
    #[serde(default)]
    pub tls: Option<TlsView>,
}

/// What a tunnel connection's TLS negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsView {
    /// `TLS 1.3`.
    pub version: String,
    /// The cipher suite, as IANA names it (`TLS13_AES_256_GCM_SHA384`).
    pub cipher: String,
    /// The key exchange group (`X25519MLKEM768`, `X25519`, …).
    pub key_exchange: String,
    /// Whether the key exchange is post-quantum.
    pub post_quantum: bool,
}

/// An agent's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's software version.
    pub version: String,
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// The agent's name.
    pub name: String,
    /// The id it drew at start (the relay lists it under this).
    pub id: String,
    /// Its connector.
    pub connector: String,
    /// One link per address its relays resolve to (per relay of the fleet, for an address
    /// in front of a relay fleet).
    pub links: Vec<LinkView>,
    /// Each configured relay that belongs to a fleet: which of the fleet's relays the agent
    /// reaches and which not (empty without fleets; absent from older agents).
    #[serde(default)]
    pub fleets: Vec<FleetView>,
    /// The audit trail, when `[audit]` is set.
    #[serde(default)]
    pub audit: Option<crate::audit::AuditView>,
}

/// A relay fleet as an agent covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// The relay as configured (the balancer's `host:port`).
    pub relay: String,
    /// Every relay of the fleet (their ids: advertised tunnel addresses).
    pub members: Vec<String>,
    /// The relays a link of this agent holds.
    pub reached: Vec<String>,
    /// The relays none does (yet).
    pub missing: Vec<String>,
}

/// One relay link as the agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    /// The relay as configured (`host:port`).
    pub relay: String,
    /// The address this link dials.
    pub address: String,
    /// The relay of a fleet this link reached (its id), when the relay belongs to one.
    #[serde(default)]
    pub relay_id: Option<String>,
    /// `connecting`, `connected` or `down`.
    pub state: String,
    /// The transport of its current connection (`quic` or `tcp`), if any.
    pub transport: Option<String>,
    /// When it entered its state.
    pub since_unix: u64,
    /// Why it last went down.
    pub last_error: Option<String>,
    /// The verdicts this agent sent on it.
    pub verdicts: BTreeMap<String, VerdictView>,
    /// Streams open on it.
    pub active_streams: u32,
    /// What its connection's TLS negotiated, while connected (absent from older agents; `null`
    /// over QUIC from agents that could not tell it yet).
    #[serde(default)]
    pub tls: Option<TlsView>,
    /// When the certificate the relay presented on this link expires, while connected.
    #[serde(default)]
    pub relay_certificate_expires_unix: Option<i64>,
}

/// A verdict on an endpoint: `{"verdict": "Approved"}` or `{"verdict": "Rejected", "reason": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict")]
pub enum VerdictView {
    /// The agent serves the endpoint.
    Approved,
    /// The agent refused it.
    Rejected {
        /// Why.
        reason: String,
    },
}

impl From<&Verdict> for VerdictView {
    fn from(verdict: &Verdict) -> Self {
        match verdict {
            Verdict::Approved => Self::Approved,
            Verdict::Rejected { reason } => Self::Rejected { reason: reason.clone() },
        }
    }
}

/// `/api/v1/connections`: the connections open now, oldest first, at most
/// [`crate::MAX_LISTED_CONNECTIONS`] of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsSnapshot {
    /// How many are open in all.
    pub total: usize,
    /// Those listed.
    pub connections: ConnectionList,
}

/// The connections listed, as the role sees them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConnectionList {
    /// A relay's client connections.
    Relay(Vec<RelayConnectionView>),
    /// An agent's streams.
    Agent(Vec<AgentConnectionView>),
}

/// A client connection the relay forwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayConnectionView {
    /// Its endpoint.
    pub endpoint: String,
    /// The client's address.
    pub client: String,
    /// The agent carrying it.
    pub agent: String,
    /// Where it goes: the endpoint's destination, or the one a CONNECT client asked for.
    #[serde(default)]
    pub destination: String,
    /// When it was accepted.
    pub started_unix: u64,
    /// Bytes read from the client so far.
    pub bytes_from_client: u64,
    /// Bytes written to the client so far.
    pub bytes_to_client: u64,
}

/// `/api/v1/events`: the role's last audit records (kept in memory whether or not a trail is
/// written; without the per-connection `connection.opened` and `connection.progress`), oldest
/// first, each the JSON object of its trail line without `seq`, `prev` and `hash`: `time`,
/// `code`, `event` and the event's fields (docs/audit.md lists them), in the trail's order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsSnapshot {
    /// The records, oldest first, as their JSON text (so that their fields keep their order).
    pub events: Vec<Box<serde_json::value::RawValue>>,
}

impl EventsSnapshot {
    /// Takes the JSON objects a trail keeps; one that is not JSON (none should be) is left
    /// out.
    pub fn from_json_objects(objects: Vec<String>) -> Self {
        let events = objects
            .into_iter()
            .filter_map(|text| serde_json::value::RawValue::from_string(text).ok())
            .collect();
        Self { events }
    }
}

/// A stream the agent forwards to its destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentConnectionView {
    /// Its endpoint.
    pub endpoint: String,
    /// The client's address, as the relay reported it.
    pub client: String,
    /// Where it goes.
    pub destination: String,
    /// When it was connected.
    pub started_unix: u64,
    /// Bytes sent to the destination so far.
    pub bytes_to_destination: u64,
    /// Bytes read from the destination so far.
    pub bytes_from_destination: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_snapshot_is_tagged_with_its_role_and_round_trips() {
        let snapshot = StatusSnapshot::Relay(RelayStatus {
            version: "0.1.0".into(),
            ready: true,
            pending_tunnel_connections: 0,
            endpoints: vec![],
            agents: vec![RelayAgentView {
                name: "a".into(),
                id: "1".into(),
                connector: "c".into(),
                version: "0.1.0".into(),
                transport: "quic".into(),
                remote: "127.0.0.1:1".into(),
                connected_since_unix: 1,
                active_streams: 0,
                draining: false,
                tls: None,
                verdicts: BTreeMap::from([
                    ("e".to_owned(), VerdictView::Approved),
                    ("f".to_owned(), VerdictView::Rejected { reason: "no rule".into() }),
                ]),
            }],
            not_ready_reason: None,
            fleet: Some(RelayFleetView { id: "10.0.0.1:7443".into(), members: vec![] }),
            listeners: vec![],
            audit: None,
        });
        let json = serde_json::to_value(&snapshot).expect("serialize");
        assert_eq!(json["role"], "relay");
        assert_eq!(json["agents"][0]["verdicts"]["e"], serde_json::json!({"verdict": "Approved"}));
        assert_eq!(
            json["agents"][0]["verdicts"]["f"],
            serde_json::json!({"verdict": "Rejected", "reason": "no rule"})
        );
        let back: StatusSnapshot = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, snapshot);
    }

    #[test]
    fn connection_lists_are_read_back_by_their_shape() {
        let agent = r#"{"total":1,"connections":[{"endpoint":"e","client":"1.2.3.4:5",
            "destination":"kv:443","started_unix":1,"bytes_to_destination":2,
            "bytes_from_destination":3}]}"#;
        let parsed: ConnectionsSnapshot = serde_json::from_str(agent).expect("agent list");
        assert!(matches!(parsed.connections, ConnectionList::Agent(ref list) if list.len() == 1));
        let relay = r#"{"total":0,"connections":[]}"#;
        let parsed: ConnectionsSnapshot = serde_json::from_str(relay).expect("empty list");
        assert_eq!(parsed.total, 0);
    }
}
