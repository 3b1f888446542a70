//! The relay's configuration: `relay.toml` as written (the contract in DESIGN.md) and the
//! validated, typed [`RelayConfig`] the relay runs from. Everything is checked here, before
//! any port is bound: unknown keys, bad CIDRs and durations, unknown connectors, duplicate
//! names and listen addresses, unreadable or mismatched certificates.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use privlink_protocol::acl::{Acl, parse_acl_entry};
pub use privlink_protocol::config::AdminSettings;
use privlink_protocol::config::{
    AdminTable, ConfigError, ConfigSource, Spanned, deserialize_optional_buffer_budget,
    deserialize_optional_duration, deserialize_optional_positive_duration,
};
use privlink_protocol::destination::Destination;
use privlink_protocol::message::MAX_ENDPOINTS_PER_CONNECTOR;
use privlink_protocol::token::TokenDigest;
use privlink_transport::tls::pki_types::{CertificateDer, PrivateKeyDer};
use privlink_transport::{budget, tls};
use serde::Deserialize;

use crate::fleet::{FleetSpec, RawFleet};

/// Default inactivity timeout of an endpoint.
pub const DEFAULT_INACTIVITY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default stall timeout of an endpoint: a client that takes less than
/// `privlink_transport::copy::STALL_MIN_PROGRESS` of a download for this long is cut.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connection limit of an endpoint.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Most `token_sha256` hashes a connector may hold (the old and the new token during a
/// rotation, and some room).
pub const MAX_TOKENS_PER_CONNECTOR: usize = 4;
/// Default `open_timeout`: an agent's answer normally takes one round trip plus the
/// destination's connect.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(3);
/// Default `open_attempts`.
pub const DEFAULT_OPEN_ATTEMPTS: u32 = 3;
/// Most `open_attempts` accepted.
pub const MAX_OPEN_ATTEMPTS: u32 = 8;
/// Default `open_retry_buffer`, in bytes: a TLS ClientHello and then some.
pub const DEFAULT_OPEN_RETRY_BUFFER: usize = 64 * 1024;
/// Largest `open_retry_buffer` accepted (per connection, until the agent answers).
pub const MAX_OPEN_RETRY_BUFFER: usize = 1024 * 1024;
/// Default time in-flight connections get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A validated relay configuration.
#[derive(Debug)]
pub struct RelayConfig {
    /// Where agents connect (QUIC on UDP).
    pub tunnel_listen: SocketAddr,
    /// The relay's certificate chain and key.
    pub identity: TlsIdentity,
    /// The admin listener, when `[admin]` is set.
    pub admin: Option<AdminSettings>,
    /// How long in-flight connections may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Bytes the relay may hold for clients that do not read (`[tunnel] buffer_budget`).
    pub buffer_budget: u64,
    /// Connectors and their token hashes.
    pub connectors: Vec<ConnectorSpec>,
    /// Endpoints clients connect to.
    pub endpoints: Vec<EndpointSpec>,
    /// The relay fleet this relay belongs to (`[fleet]`).
    pub fleet: Option<FleetSpec>,
    /// The files besides the config file whose content this configuration holds (the tunnel
    /// certificate and key): a change to one reloads it, like a change to the config file.
    /// Empty for a configuration built in memory.
    pub source_files: Vec<PathBuf>,
}

/// A certificate chain and its private key. `Debug` never shows the key.
pub struct TlsIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A connector: a name agents authenticate as, and the SHA-256 of its token.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectorSpec {
    /// Connector name.
    pub name: String,
    /// SHA-256 of the token's bytes: one, or several while a token is rotated (an agent
    /// presenting any of them is admitted).
    pub token_sha256: Vec<TokenDigest>,
}

impl fmt::Debug for ConnectorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectorSpec").field("name", &self.name).finish_non_exhaustive()
    }
}

/// An endpoint: a listening port mapped to a destination reached through a connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Endpoint name (unique).
    pub name: String,
    /// Connector whose agents serve it.
    pub connector: String,
    /// Where the agent connects.
    pub destination: Destination,
    /// Where clients connect.
    pub listen: SocketAddr,
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
struct RawConfig {
    #[serde(default, deserialize_with = "deserialize_optional_duration")]
    shutdown_grace: Option<Duration>,
    tunnel: RawTunnel,
    #[serde(default)]
    admin: Option<AdminTable>,
    #[serde(default)]
    connector: Vec<RawConnector>,
    #[serde(default)]
    endpoint: Vec<RawEndpoint>,
    #[serde(default)]
    fleet: Option<RawFleet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: SocketAddr,
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    #[serde(default, deserialize_with = "deserialize_optional_buffer_budget")]
    buffer_budget: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnector {
    name: Spanned<String>,
    #[serde(deserialize_with = "deserialize_sha256_list")]
    token_sha256: Vec<TokenDigest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: Spanned<String>,
    connector: Spanned<String>,
    destination: Destination,
    listen: Spanned<SocketAddr>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    inactivity_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    stall_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_limit")]
    max_connections: Option<usize>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    open_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_open_attempts")]
    open_attempts: Option<u32>,
    #[serde(default, deserialize_with = "deserialize_retry_buffer")]
    open_retry_buffer: Option<usize>,
    #[serde(default)]
    acl: RawAcl,
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
struct RawAcl {
    #[serde(default)]
    allow: Vec<AclEntry>,
    #[serde(default)]
    deny: Vec<AclEntry>,
}

#[derive(Debug)]
struct AclEntry(IpNet);

impl<'de> Deserialize<'de> for AclEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_acl_entry(&text).map(AclEntry).map_err(serde::de::Error::custom)
    }
}

/// `token_sha256 = "…"`, or `token_sha256 = ["…", "…"]` during a rotation (at most
/// [`MAX_TOKENS_PER_CONNECTOR`]).
fn deserialize_sha256_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<TokenDigest>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let texts = match OneOrMany::deserialize(d)? {
        OneOrMany::One(text) => vec![text],
        OneOrMany::Many(texts) => texts,
    };
    if texts.is_empty() || texts.len() > MAX_TOKENS_PER_CONNECTOR {
        return Err(serde::de::Error::custom(format!(
            "expected 1 to {MAX_TOKENS_PER_CONNECTOR} hashes (more than one only while a token \
             is rotated)"
        )));
    }
    texts
        .iter()
        .map(|text| {
            TokenDigest::from_hex(text).ok_or_else(|| {
                serde::de::Error::custom(
                    "expected 64 lowercase hex digits (the SHA-256 that `privlink token new` \
                     prints), or a list of them",
                )
            })
        })
        .collect()
}

impl RelayConfig {
    /// Reads and validates a relay configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&ConfigSource::read(path)?)
    }

    /// Validates a configuration whose text is already in memory. Relative certificate paths
    /// are resolved against the source's directory.
    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        let raw: RawConfig = source.parse()?;

        let mut connectors = Vec::with_capacity(raw.connector.len());
        let mut seen = HashMap::new();
        for (i, c) in raw.connector.iter().enumerate() {
            let key = format!("connector[{i}].name");
            check_name(source, &c.name, &key)?;
            if let Some(first) = seen.insert(c.name.get_ref().clone(), i) {
                return Err(source.error_for(
                    &c.name,
                    &key,
                    format!(
                        "duplicate connector name `{}` (also connector[{first}])",
                        c.name.get_ref()
                    ),
                ));
            }
            connectors.push(ConnectorSpec {
                name: c.name.get_ref().clone(),
                token_sha256: c.token_sha256.clone(),
            });
        }

        let mut endpoints = Vec::with_capacity(raw.endpoint.len());
        let mut names = HashMap::new();
        let mut per_connector: HashMap<String, usize> = HashMap::new();
        let mut listens = HashMap::new();
        for (i, e) in raw.endpoint.into_iter().enumerate() {
            let name_key = format!("endpoint[{i}].name");
            check_name(source, &e.name, &name_key)?;
            if let Some(first) = names.insert(e.name.get_ref().clone(), i) {
                return Err(source.error_for(
                    &e.name,
                    &name_key,
                    format!(
                        "duplicate endpoint name `{}` (also endpoint[{first}])",
                        e.name.get_ref()
                    ),
                ));
            }
            if !seen.contains_key(e.connector.get_ref()) {
                return Err(source.error_for(
                    &e.connector,
                    &format!("endpoint[{i}].connector"),
                    format!(
                        "unknown connector `{}`; declare it in a [[connector]] table",
                        e.connector.get_ref()
                    ),
                ));
            }
            let assigned = per_connector.entry(e.connector.get_ref().clone()).or_insert(0usize);
            *assigned += 1;
            if *assigned > MAX_ENDPOINTS_PER_CONNECTOR {
                return Err(source.error_for(
                    &e.connector,
                    &format!("endpoint[{i}].connector"),
                    format!(
                        "connector `{}` has more than {MAX_ENDPOINTS_PER_CONNECTOR} endpoints",
                        e.connector.get_ref()
                    ),
                ));
            }
            let listen = *e.listen.get_ref();
            let listen_key = format!("endpoint[{i}].listen");
            if let Some(first) = listens.insert(listen, i) {
                return Err(source.error_for(
                    &e.listen,
                    &listen_key,
                    format!("listen address {listen} is already used by endpoint[{first}]"),
                ));
            }
            if listen == raw.tunnel.listen && listen.port() != 0 {
                return Err(source.error_for(
                    &e.listen,
                    &listen_key,
                    format!("listen address {listen} is the tunnel's address"),
                ));
            }
            endpoints.push(EndpointSpec {
                name: e.name.into_inner(),
                connector: e.connector.into_inner(),
                destination: e.destination,
                listen,
                inactivity_timeout: e.inactivity_timeout.unwrap_or(DEFAULT_INACTIVITY_TIMEOUT),
                stall_timeout: e.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT),
                max_connections: e.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                acl: Acl {
                    allow: e.acl.allow.into_iter().map(|a| a.0).collect(),
                    deny: e.acl.deny.into_iter().map(|a| a.0).collect(),
                },
                open: OpenRetry {
                    timeout: e.open_timeout.unwrap_or(DEFAULT_OPEN_TIMEOUT),
                    attempts: e.open_attempts.unwrap_or(DEFAULT_OPEN_ATTEMPTS),
                    buffer: e.open_retry_buffer.unwrap_or(DEFAULT_OPEN_RETRY_BUFFER),
                },
            });
        }

        let cert_path = source.resolve_path(raw.tunnel.cert.get_ref());
        let chain = tls::load_certs(&cert_path)
            .map_err(|e| source.error_for(&raw.tunnel.cert, "tunnel.cert", e.to_string()))?;
        let key_path = source.resolve_path(raw.tunnel.key.get_ref());
        let key = tls::load_key(&key_path)
            .map_err(|e| source.error_for(&raw.tunnel.key, "tunnel.key", e.to_string()))?;
        // Build the TLS configuration once now so a key that does not match the certificate
        // is a configuration error, not a failure at the first agent's handshake.
        tls::tunnel_server_config(chain.clone(), key.clone_key()).map_err(|e| {
            source.error_for(
                &raw.tunnel.key,
                "tunnel.key",
                format!("does not fit tunnel.cert: {e}"),
            )
        })?;

        let admin = raw.admin.map(|a| a.validate(source)).transpose()?;
        let fleet = raw.fleet.map(|f| f.validate(source, raw.tunnel.listen)).transpose()?;
        Ok(Self {
            tunnel_listen: raw.tunnel.listen,
            identity: TlsIdentity { chain, key },
            admin,
            shutdown_grace: raw.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            // Unset: a quarter of memory (see `budget::default_limit`).
            buffer_budget: raw.tunnel.buffer_budget.unwrap_or_else(budget::default_limit),
            connectors,
            endpoints,
            fleet,
            source_files: vec![cert_path, key_path],
        })
    }

    /// The endpoints served by `connector`.
    pub fn endpoints_of<'a>(
        &'a self,
        connector: &'a str,
    ) -> impl Iterator<Item = &'a EndpointSpec> {
        self.endpoints.iter().filter(move |e| e.connector == connector)
    }
}

/// Names are used in logs, metrics and URLs: keep them to a safe alphabet.
fn check_name(source: &ConfigSource, name: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let n = name.get_ref();
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(source.error_for(
            name,
            key,
            format!("`{n}` is not a valid name (1–64 of A–Z a–z 0–9 . _ -)"),
        ))
    }
}

/// The configuration in force, shared by whoever needs the current one (authentication,
/// welcomes, drains) and replaced by a reload.
#[derive(Debug)]
pub(crate) struct CurrentConfig {
    config: std::sync::RwLock<std::sync::Arc<RelayConfig>>,
    /// Bumped by every applied reload: agent sessions tell their agents what changed.
    generation: tokio::sync::watch::Sender<u64>,
}

impl CurrentConfig {
    pub(crate) fn new(config: RelayConfig) -> Self {
        Self {
            config: std::sync::RwLock::new(std::sync::Arc::new(config)),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The configuration in force now.
    pub(crate) fn get(&self) -> std::sync::Arc<RelayConfig> {
        let current = self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::sync::Arc::clone(&current)
    }

    /// A receiver that sees a new value after each applied reload.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Puts `config` in force (a reload that was applied).
    pub(crate) fn set(&self, config: RelayConfig) {
        *self.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            std::sync::Arc::new(config);
        self.generation.send_modify(|generation| *generation += 1);
    }
}
