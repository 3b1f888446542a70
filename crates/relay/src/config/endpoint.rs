//! One `[[endpoint]]` table: as written ([`RawEndpoint`]) and validated ([`EndpointSpec`]),
//! with the value checks its keys need (limits, retries, ACL entries, server names).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use privlink_protocol::acl::{Acl, parse_acl_entry};
use privlink_protocol::client_hello::{self, ServerNames};
use privlink_protocol::config::{
    ConfigError, ConfigSource, Spanned, deserialize_optional_positive_duration,
};
use privlink_protocol::destination::Destination;
use privlink_protocol::proxy_header::ProxyVersion;
use serde::Deserialize;

use super::{
    DEFAULT_OPEN_ATTEMPTS, DEFAULT_OPEN_RETRY_BUFFER, DEFAULT_OPEN_TIMEOUT, MAX_OPEN_ATTEMPTS,
    MAX_OPEN_RETRY_BUFFER,
};

/// An endpoint: a listening port mapped to a destination reached through a connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Endpoint name (unique).
    pub name: String,
    /// Connector whose agents serve it.
    pub connector: String,
    /// Where the agent connects.
    pub destination: Destination,
    /// Where clients connect: its own port, or its listener's.
    pub listen: SocketAddr,
    /// The shared listener (`[[listener]]`) it is reached through by server name, if it has
    /// no port of its own.
    pub listener: Option<String>,
    /// Close after this long with no byte in either direction.
    pub inactivity_timeout: Duration,
    /// Reset both ways when the client (or the tunnel) took too little of what waited for it
    /// for this long: a client that stopped reading, or reads a trickle.
    pub stall_timeout: Duration,
    /// Concurrent connections beyond which new ones are refused.
    pub max_connections: usize,
    /// Source-IP rules.
    pub acl: Acl,
    /// How an open the agent did not answer is tried again on another agent.
    pub open: OpenRetry,
    /// Sources whose connections begin with a PROXY header naming the real client
    /// (`proxy_protocol = { trusted = [...] }`): a load balancer in front of the relay.
    pub proxy_protocol: Option<ProxyTrust>,
    /// The PROXY header the destination gets before the client's first byte, naming the
    /// original client (`send_proxy_protocol = "v1" | "v2"`).
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// The names a client's TLS ClientHello may ask for (exact, or one-label `*.` wildcards,
    /// normalised); empty: any. On a port of its own this is SNI pinning: a ClientHello naming
    /// anything else is refused before an agent is asked.
    pub server_names: Vec<String>,
}

/// Who may put a PROXY header before a connection: from these sources it is required, from
/// any other a connection that begins with one is refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyTrust {
    /// The load balancers' addresses.
    pub trusted: Vec<IpNet>,
}

impl ProxyTrust {
    /// Whether connections from `ip` carry a header.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// `proxy_protocol = { trusted = [...] }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxyProtocol {
    trusted: Vec<AclEntry>,
}

impl RawProxyProtocol {
    pub(super) fn into_trust(self) -> ProxyTrust {
        ProxyTrust { trusted: self.trusted.into_iter().map(|entry| entry.0).collect() }
    }
}

/// `send_proxy_protocol = "v1" | "v2"`.
fn deserialize_send_proxy<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ProxyVersion>, D::Error> {
    match String::deserialize(d)?.as_str() {
        "v1" => Ok(Some(ProxyVersion::V1)),
        "v2" => Ok(Some(ProxyVersion::V2)),
        other => Err(serde::de::Error::custom(format!(
            "`{}` is not a PROXY protocol version: \"v1\" or \"v2\"",
            privlink_protocol::text::loggable(other)
        ))),
    }
}

impl EndpointSpec {
    /// Whether a client whose ClientHello asks for `server_name` may use this endpoint.
    pub fn admits_server_name(&self, server_name: Option<&str>) -> bool {
        self.server_names.is_empty()
            || server_name.is_some_and(|name| {
                self.server_names.iter().any(|pattern| client_hello::matches(pattern, name))
            })
    }
}

/// How the relay retries a client connection's open on another agent when the first could
/// not serve it before answering (a destination it could not reach, a lost stream, no answer
/// in time). Nothing was answered, so the client never sees the difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenRetry {
    /// How long an agent may take to answer an open (`open_timeout`).
    pub timeout: Duration,
    /// Agents tried at most, the first included (`open_attempts`; 1: no retry).
    pub attempts: u32,
    /// Most client bytes kept for a replay (`open_retry_buffer`); a client that sends more
    /// before the answer is no longer retried.
    pub buffer: usize,
}

impl Default for OpenRetry {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_OPEN_TIMEOUT,
            attempts: DEFAULT_OPEN_ATTEMPTS,
            buffer: DEFAULT_OPEN_RETRY_BUFFER,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub(super) name: Spanned<String>,
    pub(super) connector: Spanned<String>,
    pub(super) destination: Destination,
    #[serde(default)]
    pub(super) listen: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    pub(super) listener: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) inactivity_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) stall_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_limit")]
    pub(super) max_connections: Option<usize>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) open_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_open_attempts")]
    pub(super) open_attempts: Option<u32>,
    #[serde(default, deserialize_with = "deserialize_retry_buffer")]
    pub(super) open_retry_buffer: Option<usize>,
    #[serde(default)]
    pub(super) acl: RawAcl,
    #[serde(default)]
    pub(super) server_names: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) proxy_protocol: Option<RawProxyProtocol>,
    #[serde(default, deserialize_with = "deserialize_send_proxy")]
    pub(super) send_proxy_protocol: Option<ProxyVersion>,
}

impl RawEndpoint {
    /// `server_names`, each checked and normalised (endpoint `i`, for the error's key).
    pub(super) fn server_names(
        &self,
        source: &ConfigSource,
        i: usize,
    ) -> Result<Vec<String>, ConfigError> {
        let Some(written) = &self.server_names else { return Ok(Vec::new()) };
        let mut claimed = ServerNames::default();
        let mut names = Vec::new();
        for (j, name) in written.get_ref().iter().enumerate() {
            let key = format!("endpoint[{i}].server_names[{j}]");
            names.push(
                claimed
                    .claim(name, ())
                    .map_err(|e| source.error_for(written, &key, e.to_string()))?,
            );
        }
        if names.is_empty() {
            return Err(source.error_for(
                written,
                &format!("endpoint[{i}].server_names"),
                "list at least one name, or leave server_names out",
            ));
        }
        Ok(names)
    }
}

fn deserialize_open_attempts<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if !(1..=MAX_OPEN_ATTEMPTS).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "open_attempts must be 1 to {MAX_OPEN_ATTEMPTS} (1: no retry)"
        )));
    }
    Ok(Some(n))
}

fn deserialize_retry_buffer<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<usize>, D::Error> {
    let n = u32::deserialize(d)? as usize;
    if n > MAX_OPEN_RETRY_BUFFER {
        return Err(serde::de::Error::custom(format!(
            "open_retry_buffer is at most {MAX_OPEN_RETRY_BUFFER} bytes (0: no replay)"
        )));
    }
    Ok(Some(n))
}

fn deserialize_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom("max_connections must be at least 1"));
    }
    Ok(Some(n as usize))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcl {
    #[serde(default)]
    pub(super) allow: Vec<AclEntry>,
    #[serde(default)]
    pub(super) deny: Vec<AclEntry>,
}

impl RawAcl {
    /// The rules as the relay applies them.
    pub(super) fn into_acl(self) -> Acl {
        Acl {
            allow: self.allow.into_iter().map(|a| a.0).collect(),
            deny: self.deny.into_iter().map(|a| a.0).collect(),
        }
    }
}

#[derive(Debug)]
pub(super) struct AclEntry(pub(super) IpNet);

impl<'de> Deserialize<'de> for AclEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_acl_entry(&text).map(AclEntry).map_err(serde::de::Error::custom)
    }
}
