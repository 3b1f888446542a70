//! One `[[listener]]` table: a shared TLS port whose connections are routed to endpoints by the
//! server name their ClientHello asks for. As written ([`RawListener`]) and validated
//! ([`ListenerSpec`], with its routes: which endpoint claims which name).

use std::net::SocketAddr;
use std::time::Duration;

use privlink_protocol::acl::Acl;
use privlink_protocol::config::{Spanned, deserialize_optional_positive_duration};
use serde::Deserialize;

use super::endpoint::{ProxyTrust, RawAcl, RawProxyProtocol};
use super::limits::{Rate, SourcePolicy, deserialize_per_source_max, deserialize_rate};

/// How long a shared listener waits for a whole ClientHello by default.
pub const DEFAULT_PREREAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A shared TLS port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Its name (unique among listeners).
    pub name: String,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// How long a client has to send its whole ClientHello.
    pub preread_timeout: Duration,
    /// Source-IP rules, judged on accept before any byte is read (each endpoint's own rules
    /// are judged once the name has chosen it).
    pub acl: Acl,
    /// Sources whose connections begin with a PROXY header (a load balancer in front).
    pub proxy_protocol: Option<ProxyTrust>,
    /// What one source may open through this port, whichever endpoint it reaches.
    pub per_source: SourcePolicy,
    /// Its connections are closed after this long, busy or not (an endpoint's own
    /// `max_duration`, if shorter, wins).
    pub max_duration: Option<Duration>,
    /// Each claimed name (exact, or `*.` and a domain) and the endpoint that claims it, sorted.
    pub routes: Vec<(String, String)>,
}

/// `[[listener]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Spanned<String>,
    pub(super) listen: Spanned<SocketAddr>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) preread_timeout: Option<Duration>,
    #[serde(default)]
    pub(super) acl: RawAcl,
    #[serde(default)]
    pub(super) proxy_protocol: Option<RawProxyProtocol>,
    #[serde(default, deserialize_with = "deserialize_per_source_max")]
    pub(super) per_source_max_connections: Option<u32>,
    #[serde(default, deserialize_with = "deserialize_rate")]
    pub(super) per_source_rate: Option<Rate>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) max_duration: Option<Duration>,
}

impl RawListener {
    /// The listener, its routes still empty.
    pub(super) fn into_spec(self) -> ListenerSpec {
        ListenerSpec {
            name: self.name.into_inner(),
            listen: self.listen.into_inner(),
            preread_timeout: self.preread_timeout.unwrap_or(DEFAULT_PREREAD_TIMEOUT),
            acl: self.acl.into_acl(),
            proxy_protocol: self.proxy_protocol.map(RawProxyProtocol::into_trust),
            per_source: SourcePolicy {
                max_connections: self.per_source_max_connections,
                rate: self.per_source_rate,
            },
            max_duration: self.max_duration,
            routes: Vec::new(),
        }
    }
}
