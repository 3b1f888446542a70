//! Messages carried in frames: the control stream's conversation and the data stream's
//! open header and reply.
//!
//! Control stream (the first stream the relay opens on a tunnel connection): the relay speaks
//! first with [`Control::RelayHello`] — a QUIC stream only becomes visible to the peer once
//! bytes are sent on it — then the agent sends [`Control::Hello`], the relay answers
//! [`Control::Welcome`] or [`Control::Refused`], and the agent answers
//! [`Control::Verdicts`]; a relay with a fleet sends [`Control::Fleet`] just before its welcome.
//! After that either side sends heartbeats and drain notices (and such a relay, fleet changes). A list
//! too long for one frame (a connector may have 10,000 endpoints) travels in pieces: zero or
//! more [`Control::EndpointsPart`] before the `Welcome` that ends it, zero or more
//! [`Control::VerdictsPart`] before the `Verdicts` that ends it ([`in_pieces`] cuts them).
//!
//! Data stream (one per client connection): the relay writes an [`Open`] frame followed at
//! once by the client's bytes; the agent answers one [`OpenReply`] frame followed by the
//! destination's bytes.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::token::Token;

/// Protocol version carried in hellos. The major version is also in the ALPN name.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest open header body the agent accepts, and largest open reply the relay accepts: both
/// carry a destination name and a short message, far below this.
pub const MAX_OPEN_BODY: usize = 4096;

/// Messages on the control stream, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Relay → agent, first frame on the control stream.
    RelayHello {
        /// The relay's [`PROTOCOL_VERSION`].
        protocol_version: u16,
        /// Empty: a relay does not disclose its software version before authentication (the
        /// field stays for compatibility with relays that filled it in).
        software_version: String,
    },
    /// Agent → relay: who the agent is and what it will open.
    Hello(Hello),
    /// Relay → agent: authentication succeeded; these endpoints are assigned to the connector.
    Welcome {
        /// The connector's endpoints, each of which the agent must approve or reject.
        endpoints: Vec<EndpointAssignment>,
    },
    /// Relay → agent: the hello was refused; the relay closes the connection after this.
    Refused {
        /// Human-readable reason (never contains the token).
        reason: String,
    },
    /// Agent → relay: the agent's verdict on each assigned endpoint.
    Verdicts(Vec<EndpointVerdict>),
    /// Relay → agent, before the [`Control::Welcome`]: some of the connector's endpoints, when
    /// they do not fit in one frame; the welcome carries the last piece.
    EndpointsPart(Vec<EndpointAssignment>),
    /// Agent → relay, before a [`Control::Verdicts`]: some of the verdicts, when they do not
    /// fit in one frame; the `Verdicts` message carries the last piece.
    VerdictsPart(Vec<EndpointVerdict>),
    /// Relay → agent, once established: the connector's endpoints changed (a reload). The
    /// agent answers verdicts for the added ones; it opens nothing more for the removed ones.
    /// A long change comes as several of these, each within one frame.
    EndpointsChanged {
        /// Endpoints assigned from now on.
        added: Vec<EndpointAssignment>,
        /// Names of endpoints no longer assigned.
        removed: Vec<String>,
    },
    /// Either way: liveness and load.
    Heartbeat {
        /// Data streams the sender currently carries.
        active_streams: u32,
    },
    /// Either way: the sender is shutting down; no new streams should be started.
    Drain {
        /// Why, for logs.
        reason: String,
    },
    /// Either way: the answer to a [`Control::Heartbeat`], sent at once. A heartbeat left
    /// unanswered past [`Timers::answer`](crate::control::Timers::answer) means the peer is
    /// gone — frozen, partitioned — even while its transport connection looks alive.
    HeartbeatAck,
    /// Relay → agent, from a relay with a `[fleet]`: which relay of the fleet this is, and every
    /// relay of it. Sent after the hello is accepted and before the welcome (so that an agent
    /// that holds a link to this relay already can close this one before it judges anything),
    /// and again whenever the fleet changes. Agents open links through the address they were
    /// given until they hold one to every member.
    Fleet(FleetView),
}

/// A relay fleet as one of its members sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// The sending relay's id: its advertised tunnel address.
    pub relay: String,
    /// Every relay's id, the sender's included, sorted.
    pub members: Vec<String>,
}

/// Most relays a fleet view may list (an agent keeps a link to each).
pub const MAX_FLEET_MEMBERS: usize = 64;
/// Longest relay id in a fleet view.
pub const MAX_RELAY_ID_LEN: usize = 256;

impl FleetView {
    /// Why the view cannot be taken as it is, if it cannot: too many members, an id too long,
    /// or the sender missing from its own fleet.
    pub fn problem(&self) -> Option<String> {
        if self.members.len() > MAX_FLEET_MEMBERS {
            return Some(format!(
                "{} relays in the fleet, more than {MAX_FLEET_MEMBERS}",
                self.members.len()
            ));
        }
        if self.members.iter().chain([&self.relay]).any(|id| id.len() > MAX_RELAY_ID_LEN) {
            return Some(format!("a relay id longer than {MAX_RELAY_ID_LEN} bytes"));
        }
        if !self.members.contains(&self.relay) {
            return Some("the relay is not in its own fleet".to_owned());
        }
        None
    }
}

impl Control {
    /// The message's kind, for logs and protocol errors: never the peer's strings, which may
    /// be long or hold anything.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RelayHello { .. } => "RelayHello",
            Self::Hello(_) => "Hello",
            Self::Welcome { .. } => "Welcome",
            Self::Refused { .. } => "Refused",
            Self::Verdicts(_) => "Verdicts",
            Self::EndpointsPart(_) => "EndpointsPart",
            Self::VerdictsPart(_) => "VerdictsPart",
            Self::EndpointsChanged { .. } => "EndpointsChanged",
            Self::Heartbeat { .. } => "Heartbeat",
            Self::Drain { .. } => "Drain",
            Self::HeartbeatAck => "HeartbeatAck",
            Self::Fleet(_) => "Fleet",
        }
    }
}

/// Most endpoints one connector may be assigned (and an agent accepts in a welcome).
pub const MAX_ENDPOINTS_PER_CONNECTOR: usize = 100_000;

/// Encoded bytes a piece of a list may take, leaving room for the frame's own fields.
const PIECE_BUDGET: usize = crate::frame::MAX_BODY_LEN - 1024;

/// Cuts `items` into pieces that each encode within one frame, `size_of` bounding an item's
/// encoded size from above; always at least one piece (empty when `items` is).
pub fn in_pieces<T>(items: Vec<T>, size_of: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut pieces = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let size = size_of(&item);
        let current = pieces.last_mut().expect("at least one piece");
        if used + size > PIECE_BUDGET && !current.is_empty() {
            pieces.push(Vec::new());
            used = 0;
        }
        used += size;
        pieces.last_mut().expect("at least one piece").push(item);
    }
    pieces
}

impl EndpointAssignment {
    /// An upper bound of its encoded size (two length-prefixed strings).
    pub fn encoded_size_bound(&self) -> usize {
        self.name.len() + self.destination.len() + 2 * 10
    }
}

impl EndpointVerdict {
    /// An upper bound of its encoded size (a name, a tag and maybe a reason).
    pub fn encoded_size_bound(&self) -> usize {
        let reason = match &self.verdict {
            Verdict::Approved => 0,
            Verdict::Rejected { reason } => reason.len() + 10,
        };
        self.endpoint.len() + 10 + 1 + reason
    }
}

/// The agent's introduction on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// Connector this agent serves.
    pub connector: String,
    /// The connector's token.
    pub token: Token,
    /// Operator-chosen agent name (defaults to the host name).
    pub agent_name: String,
    /// Random id of this agent process, to tell restarts apart.
    pub agent_id: String,
    /// Agent software version.
    pub software_version: String,
    /// The agent's allowlist patterns, for the relay's status view.
    pub allowed: Vec<String>,
}

/// One endpoint the relay asks the agent to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointAssignment {
    /// Endpoint name.
    pub name: String,
    /// Destination as `host:port`; for an `http-connect` endpoint, [`CONNECT_PREFIX`] and the
    /// destination patterns its clients may ask for, space-separated.
    pub destination: String,
}

/// What an `http-connect` endpoint's assignment begins with. An agent that does not know the
/// mode reads the whole as an invalid destination and rejects the endpoint: nothing is opened
/// by mistake, and the relay shows why.
pub const CONNECT_PREFIX: &str = "CONNECT ";

impl EndpointAssignment {
    /// The destination patterns of an `http-connect` endpoint, as written (unchecked); `None`
    /// for an endpoint with one destination.
    pub fn connect_patterns(&self) -> Option<impl Iterator<Item = &str>> {
        let patterns = self.destination.strip_prefix(CONNECT_PREFIX)?;
        Some(patterns.split(' ').filter(|p| !p.is_empty()))
    }
}

/// The agent's answer for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointVerdict {
    /// Endpoint name.
    pub endpoint: String,
    /// Approved or rejected.
    pub verdict: Verdict,
}

/// Whether an agent consents to open an endpoint's destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The destination matches the agent's allowlist.
    Approved,
    /// The agent will not open this destination.
    Rejected {
        /// Why, shown in the relay's status.
        reason: String,
    },
}

/// Relay → agent, first frame of every data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// Endpoint the client connected to.
    pub endpoint: String,
    /// Destination as `host:port`; the agent re-checks it against its allowlist.
    pub destination: String,
    /// The client's address as the relay saw it, for the agent's logs.
    pub client_addr: SocketAddr,
    /// The endpoint's inactivity timeout in milliseconds; the agent applies it too.
    pub inactivity_timeout_ms: u64,
}

/// Agent → relay, first frame the agent writes on a data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenReply {
    /// Connected to the destination; raw bytes follow.
    Opened,
    /// The destination was not opened; the agent closes the stream after this.
    Failed(OpenFailure),
}

/// Why an agent did not open a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("agent could not open the destination ({code}): {message}")]
pub struct OpenFailure {
    /// Machine-readable cause.
    pub code: OpenFailCode,
    /// Human-readable detail.
    pub message: String,
}

/// Machine-readable causes of an open failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenFailCode {
    /// The destination is outside the agent's allowlist, or resolves only to addresses the
    /// agent refuses (loopback, link-local, metadata) without a rule naming them.
    NotAllowed,
    /// The name did not resolve.
    DnsFailure,
    /// Every address refused the connection.
    Refused,
    /// The connect deadline passed.
    Timeout,
    /// Another network error (unreachable network or host, …).
    Unreachable,
    /// The open header itself was invalid.
    BadRequest,
    /// The agent holds its whole buffer budget for destinations that do not read; it opens
    /// nothing new until some of it is returned. (Last: postcard encodes the variant's index,
    /// and an older relay reading a code it does not know treats the answer as malformed —
    /// which it retries elsewhere too.)
    OverBudget,
}

impl OpenFailCode {
    /// Whether another agent might succeed where this one failed: true for causes that lie in
    /// this agent's network view (DNS, reachability) or its load (its buffer budget), false for policy and malformed requests,
    /// which every agent would refuse alike.
    pub fn retry_elsewhere(self) -> bool {
        matches!(
            self,
            Self::DnsFailure | Self::Refused | Self::Timeout | Self::Unreachable | Self::OverBudget
        )
    }
}

impl fmt::Display for OpenFailCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAllowed => "not-allowed",
            Self::DnsFailure => "dns-failure",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::BadRequest => "bad-request",
            Self::OverBudget => "over-budget",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{MAX_BODY_LEN, decode, encode};

    fn round_trip<T>(message: T)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let bytes = encode(&message).expect("encode");
        let (back, used) = decode::<T>(&bytes, MAX_BODY_LEN).expect("decode").expect("whole frame");
        assert_eq!(used, bytes.len());
        assert_eq!(back, message);
    }

    #[test]
    fn every_control_message_round_trips() {
        round_trip(Control::RelayHello { protocol_version: 1, software_version: "0.1.0".into() });
        round_trip(Control::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            connector: "onprem-east".into(),
            token: Token::new("s3cret"),
            agent_name: "agent-1".into(),
            agent_id: "a1b2".into(),
            software_version: "0.1.0".into(),
            allowed: vec!["*.privatelink.vaultcore.azure.net:443".into()],
        }));
        round_trip(Control::Welcome {
            endpoints: vec![EndpointAssignment {
                name: "kv".into(),
                destination: "kv.privatelink.vaultcore.azure.net:443".into(),
            }],
        });
        round_trip(Control::Refused { reason: "bad token".into() });
        round_trip(Control::Verdicts(vec![
            EndpointVerdict { endpoint: "a".into(), verdict: Verdict::Approved },
            EndpointVerdict {
                endpoint: "b".into(),
                verdict: Verdict::Rejected { reason: "outside allowlist".into() },
            },
        ]));
        round_trip(Control::Heartbeat { active_streams: u32::MAX });
        round_trip(Control::Drain { reason: "shutdown".into() });
    }

    #[test]
    fn data_stream_headers_round_trip() {
        round_trip(Open {
            endpoint: "kv".into(),
            destination: "kv.vault.azure.net:443".into(),
            client_addr: "[2001:db8::1]:50000".parse().expect("addr"),
            inactivity_timeout_ms: 60_000,
        });
        round_trip(OpenReply::Opened);
        round_trip(OpenReply::Failed(OpenFailure {
            code: OpenFailCode::DnsFailure,
            message: "no such host".into(),
        }));
    }
}
