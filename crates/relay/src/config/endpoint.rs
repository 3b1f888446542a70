//! One `[[endpoint]]` table: as written ([`RawEndpoint`]) and validated ([`EndpointSpec`]),
//! with the value checks its keys need (limits, retries, ACL entries, server names, and what
//! an `http-connect` endpoint's clients may ask for).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use privlink_protocol::acl::{Acl, parse_acl_entry};
use privlink_protocol::client_hello::{self, ServerNames};
use privlink_protocol::config::{
    ConfigError, ConfigSource, Spanned, deserialize_optional_positive_duration,
};
use privlink_protocol::destination::{Destination, DestinationError};
use privlink_protocol::message::CONNECT_PREFIX;
use privlink_protocol::pattern::DestinationPattern;
use privlink_protocol::proxy_header::ProxyVersion;
use privlink_protocol::token::TokenDigest;
use serde::Deserialize;

use super::limits::{Rate, SourcePolicy, deserialize_per_source_max, deserialize_rate};
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
    /// Where the agent connects: one destination, or (an `http-connect` endpoint) the one
    /// each client asks for, within patterns.
    pub destination: EndpointTarget,
    /// Where clients connect: its own port, or its listener's.
    pub listen: SocketAddr,
    /// The shared listener (`[[listener]]`) it is reached through by server name, if it has
    /// no port of its own.
    pub listener: Option<String>,
    /// How long a client has for what is read before its own bytes go to an agent: a PROXY
    /// header, the ClientHello of a pinned endpoint, a CONNECT request head
    /// (`preread_timeout`; a shared listener has its own).
    pub preread_timeout: Duration,
    /// Close after this long with no byte in either direction.
    pub inactivity_timeout: Duration,
    /// Reset both ways when the client (or the tunnel) took too little of what waited for it
    /// for this long: a client that stopped reading, or reads a trickle.
    pub stall_timeout: Duration,
    /// Concurrent connections beyond which new ones are refused.
    pub max_connections: usize,
    /// What one source may open (`per_source_max_connections`, `per_source_rate`).
    pub per_source: SourcePolicy,
    /// A connection is closed after this long, busy or not (`max_duration`).
    pub max_duration: Option<Duration>,
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

/// Where an endpoint's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointTarget {
    /// Always this destination (`destination = "host:port"`).
    Fixed(Destination),
    /// Where each client asks with HTTP CONNECT (`mode = "http-connect"`), within
    /// `destinations`; an agent's allowlist still decides each one.
    Connect(ConnectPolicy),
}

/// What an `http-connect` endpoint lets its clients ask for, and who may ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectPolicy {
    /// The destinations clients may ask for (`destinations`).
    pub destinations: Vec<DestinationPattern>,
    /// SHA-256 digests of the Basic credentials (`user:password`) accepted
    /// (`proxy_auth_sha256`); empty: no credentials asked for.
    pub proxy_auth: Vec<TokenDigest>,
}

impl ConnectPolicy {
    /// The first of `destinations` that admits `target`.
    pub fn admitting(&self, target: &Destination) -> Option<&DestinationPattern> {
        self.destinations.iter().find(|pattern| pattern.matches(target))
    }
}

impl EndpointTarget {
    /// The CONNECT policy, for an `http-connect` endpoint.
    pub fn connect(&self) -> Option<&ConnectPolicy> {
        match self {
            Self::Connect(policy) => Some(policy),
            Self::Fixed(_) => None,
        }
    }
}

/// An `http-connect` endpoint is shown (to agents, in status and in logs) as
/// [`CONNECT_PREFIX`] and its patterns.
impl std::fmt::Display for EndpointTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(destination) => write!(f, "{destination}"),
            Self::Connect(policy) => {
                f.write_str(CONNECT_PREFIX.trim_end())?;
                for pattern in &policy.destinations {
                    write!(f, " {pattern}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::str::FromStr for EndpointTarget {
    type Err = DestinationError;

    /// A fixed destination.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self::Fixed)
    }
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
    #[serde(default)]
    pub(super) destination: Option<Destination>,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) destinations: Option<Spanned<Vec<String>>>,
    #[serde(default, deserialize_with = "deserialize_proxy_auth")]
    pub(super) proxy_auth_sha256: Option<Vec<TokenDigest>>,
    #[serde(default)]
    pub(super) listen: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    pub(super) listener: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) preread_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) inactivity_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) stall_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_limit")]
    pub(super) max_connections: Option<usize>,
    #[serde(default, deserialize_with = "deserialize_per_source_max")]
    pub(super) per_source_max_connections: Option<u32>,
    #[serde(default, deserialize_with = "deserialize_rate")]
    pub(super) per_source_rate: Option<Rate>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    pub(super) max_duration: Option<Duration>,
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
    /// Where its connections go: `destination`, or with `mode = "http-connect"`,
    /// `destinations` and `proxy_auth_sha256` (endpoint `i`, for the error's key). A CONNECT
    /// endpoint needs a port of its own: a shared listener routes TLS by server name, and a
    /// CONNECT request is not TLS.
    pub(super) fn target(
        &self,
        source: &ConfigSource,
        i: usize,
    ) -> Result<EndpointTarget, ConfigError> {
        let key = |k: &str| format!("endpoint[{i}].{k}");
        let connect = match &self.mode {
            None => false,
            Some(mode) => match mode.get_ref().as_str() {
                "tcp" => false,
                "http-connect" => true,
                other => {
                    let message = format!(
                        "`{}` is not a mode: \"tcp\" (the default) or \"http-connect\"",
                        privlink_protocol::text::loggable(other)
                    );
                    return Err(source.error_for(mode, &key("mode"), message));
                }
            },
        };
        if !connect {
            if let Some(destinations) = &self.destinations {
                let message = "destinations are for mode = \"http-connect\"; this endpoint has \
                               one destination";
                return Err(source.error_for(destinations, &key("destinations"), message));
            }
            if self.proxy_auth_sha256.is_some() {
                let message = "proxy_auth_sha256 is for mode = \"http-connect\"";
                return Err(source.error_for(&self.name, &key("proxy_auth_sha256"), message));
            }
            let Some(destination) = &self.destination else {
                let message = "needs destination (host:port), or mode = \"http-connect\" with \
                               destinations";
                return Err(source.error_for(&self.name, &key("destination"), message));
            };
            return Ok(EndpointTarget::Fixed(destination.clone()));
        }
        let mode = self.mode.as_ref().expect("connect mode is written");
        if self.destination.is_some() {
            let message = "an http-connect endpoint goes where each client asks, within \
                           destinations: leave destination out";
            return Err(source.error_for(mode, &key("destination"), message));
        }
        if let Some(listener) = &self.listener {
            let message = "an http-connect endpoint needs a port of its own (listen): a shared \
                           listener routes TLS by server name";
            return Err(source.error_for(listener, &key("listener"), message));
        }
        if let Some(names) = &self.server_names {
            let message = "server_names are for TLS endpoints, not http-connect";
            return Err(source.error_for(names, &key("server_names"), message));
        }
        let Some(written) = &self.destinations else {
            let message = "an http-connect endpoint needs destinations: the host:port patterns \
                           clients may ask for (\"*.vault.azure.net:443\")";
            return Err(source.error_for(mode, &key("destinations"), message));
        };
        let mut destinations = Vec::new();
        for (j, text) in written.get_ref().iter().enumerate() {
            let pattern = text.parse::<DestinationPattern>().map_err(|e| {
                source.error_for(written, &key(&format!("destinations[{j}]")), e.to_string())
            })?;
            destinations.push(pattern);
        }
        if destinations.is_empty() {
            let message = "list at least one host:port pattern";
            return Err(source.error_for(written, &key("destinations"), message));
        }
        let proxy_auth = self.proxy_auth_sha256.clone().unwrap_or_default();
        Ok(EndpointTarget::Connect(ConnectPolicy { destinations, proxy_auth }))
    }

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

/// Most `proxy_auth_sha256` digests an endpoint may hold (credentials of a few clients, or
/// old and new during a rotation).
pub const MAX_PROXY_CREDENTIALS: usize = 16;

/// `proxy_auth_sha256 = "…"` or a list: SHA-256 of `user:password`, lowercase hex.
fn deserialize_proxy_auth<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<TokenDigest>>, D::Error> {
    let texts = super::one_or_many(d)?;
    if texts.is_empty() || texts.len() > MAX_PROXY_CREDENTIALS {
        return Err(serde::de::Error::custom(format!(
            "expected 1 to {MAX_PROXY_CREDENTIALS} hashes"
        )));
    }
    let digests = texts.iter().map(|text| {
        TokenDigest::from_hex(text).ok_or_else(|| {
            serde::de::Error::custom(
                "expected 64 lowercase hex digits: the SHA-256 of `user:password` \
                 (printf '%s' 'user:password' | sha256sum)",
            )
        })
    });
    digests.collect::<Result<Vec<_>, _>>().map(Some)
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
