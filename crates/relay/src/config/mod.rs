//! The relay's configuration: `relay.toml` as written (the contract in DESIGN.md) and the
//! validated, typed [`RelayConfig`] the relay runs from. Everything is checked here, before
//! any port is bound: unknown keys, bad CIDRs and durations, unknown connectors, duplicate
//! names and listen addresses, unreadable or mismatched certificates.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use privlink_protocol::audit::settings::AuditSettings;
use privlink_protocol::audit::settings::AuditTable;
use privlink_protocol::client_hello::ServerNames;
pub use privlink_protocol::config::AdminSettings;
pub use privlink_protocol::config::SourceDigest;
use privlink_protocol::config::{
    AdminTable, ConfigError, ConfigSource, Spanned, deserialize_optional_buffer_budget,
    deserialize_optional_duration, deserialize_optional_stream_window,
};
use privlink_protocol::message::MAX_ENDPOINTS_PER_CONNECTOR;
use privlink_protocol::token::TokenDigest;
use privlink_transport::crypto::{self, PostQuantum, TunnelCrypto};
use privlink_transport::tls::pki_types::{CertificateDer, PrivateKeyDer};
use privlink_transport::{budget, tls};
use serde::Deserialize;

use crate::fleet::{FleetSpec, RawFleet};

mod endpoint;
mod limits;
mod listener;

use endpoint::RawEndpoint;
pub use endpoint::{
    ConnectPolicy, EndpointSpec, EndpointTarget, MAX_PROXY_CREDENTIALS, OpenRetry, ProxyTrust,
};
pub use limits::{MAX_RATE, Rate, SourcePolicy};
use listener::RawListener;
pub use listener::{DEFAULT_PREREAD_TIMEOUT, ListenerSpec};

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
    /// Each tunnel stream's receive window on the relay, for what agents send (`[tunnel]
    /// stream_window`; default 2 MiB).
    pub stream_window: u32,
    /// The tunnel's key exchange and whether FIPS mode is required (`[tunnel] post_quantum`,
    /// `fips`).
    pub crypto: TunnelCrypto,
    /// Connectors and their token hashes.
    pub connectors: Vec<ConnectorSpec>,
    /// Endpoints clients connect to.
    pub endpoints: Vec<EndpointSpec>,
    /// Shared TLS ports routed to endpoints by server name (`[[listener]]`).
    pub listeners: Vec<ListenerSpec>,
    /// The relay fleet this relay belongs to (`[fleet]`).
    pub fleet: Option<FleetSpec>,
    /// The files besides the config file whose content this configuration holds (the tunnel
    /// certificate and key): a change to one reloads it, like a change to the config file.
    /// Empty for a configuration built in memory.
    pub source_files: Vec<PathBuf>,
    /// The audit trail (`[audit]`), when one is written.
    pub audit: Option<AuditSettings>,
    /// The file it was read from and the SHA-256 of its text (for the audit trail); `None` for
    /// a configuration built in memory.
    pub source: Option<SourceDigest>,
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
    listener: Vec<RawListener>,
    #[serde(default)]
    endpoint: Vec<RawEndpoint>,
    #[serde(default)]
    fleet: Option<RawFleet>,
    #[serde(default)]
    audit: Option<AuditTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: SocketAddr,
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    #[serde(default, deserialize_with = "deserialize_optional_buffer_budget")]
    buffer_budget: Option<u64>,
    #[serde(default, deserialize_with = "deserialize_optional_stream_window")]
    stream_window: Option<u32>,
    #[serde(default)]
    post_quantum: PostQuantum,
    #[serde(default)]
    fips: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnector {
    name: Spanned<String>,
    #[serde(deserialize_with = "deserialize_sha256_list")]
    token_sha256: Vec<TokenDigest>,
}

/// A key that takes one string or a list of them (`token_sha256`, `proxy_auth_sha256`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(text) => vec![text],
        OneOrMany::Many(texts) => texts,
    })
}

/// `token_sha256 = "…"`, or `token_sha256 = ["…", "…"]` during a rotation (at most
/// [`MAX_TOKENS_PER_CONNECTOR`]).
fn deserialize_sha256_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<TokenDigest>, D::Error> {
    let texts = one_or_many(d)?;
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

        // Every bound address, and what binds it (for messages).
        let mut listens: HashMap<SocketAddr, String> = HashMap::new();
        let mut bind = |addr: SocketAddr, owner: String| match listens.get(&addr) {
            Some(first) => Err(format!("listen address {addr} is already used by {first}")),
            None if addr == raw.tunnel.listen && addr.port() != 0 => {
                Err(format!("listen address {addr} is the tunnel's address"))
            }
            None => {
                listens.insert(addr, owner);
                Ok(())
            }
        };
        // Shared listeners first: endpoints name them.
        let mut listeners: Vec<ListenerSpec> = Vec::with_capacity(raw.listener.len());
        let mut listener_index = HashMap::new();
        for (i, l) in raw.listener.into_iter().enumerate() {
            let key = format!("listener[{i}].name");
            check_name(source, &l.name, &key)?;
            if let Some(first) = listener_index.insert(l.name.get_ref().clone(), i) {
                let message = format!(
                    "duplicate listener name `{}` (also listener[{first}])",
                    l.name.get_ref()
                );
                return Err(source.error_for(&l.name, &key, message));
            }
            bind(*l.listen.get_ref(), format!("listener[{i}]"))
                .map_err(|m| source.error_for(&l.listen, &format!("listener[{i}].listen"), m))?;
            listeners.push(l.into_spec());
        }
        let mut claims: Vec<ServerNames<usize>> = vec![ServerNames::default(); listeners.len()];

        let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(raw.endpoint.len());
        let mut names = HashMap::new();
        let mut per_connector: HashMap<String, usize> = HashMap::new();
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
            let server_names = e.server_names(source, i)?;
            let destination = e.target(source, i)?;
            let (listen, listener) = match (&e.listen, &e.listener) {
                (Some(listen), None) => {
                    bind(*listen.get_ref(), format!("endpoint[{i}]")).map_err(|m| {
                        source.error_for(listen, &format!("endpoint[{i}].listen"), m)
                    })?;
                    (*listen.get_ref(), None)
                }
                (None, Some(name)) => {
                    let key = format!("endpoint[{i}].listener");
                    let Some(&l) = listener_index.get(name.get_ref()) else {
                        let message = format!(
                            "unknown listener `{}`; declare it in a [[listener]] table",
                            name.get_ref()
                        );
                        return Err(source.error_for(name, &key, message));
                    };
                    if server_names.is_empty() {
                        let message = "an endpoint on a shared listener needs server_names: \
                                       the names clients reach it by";
                        return Err(source.error_for(name, &key, message));
                    }
                    for (j, claimed) in server_names.iter().enumerate() {
                        if claims[l].claim(claimed, i).is_err() {
                            let holder = claims[l].claimant(claimed).copied().unwrap_or(i);
                            let message = format!(
                                "`{claimed}` is claimed on listener `{}` by endpoint[{holder}] \
                                 (`{}`) and endpoint[{i}] (`{}`)",
                                name.get_ref(),
                                endpoints.get(holder).map_or("", |h| h.name.as_str()),
                                e.name.get_ref()
                            );
                            let at = e.server_names.as_ref().map_or(name.span(), |s| s.span());
                            let key = format!("endpoint[{i}].server_names[{j}]");
                            return Err(source.error_at(Some(at), &key, message));
                        }
                        listeners[l].routes.push((claimed.clone(), e.name.get_ref().clone()));
                    }
                    (listeners[l].listen, Some(listeners[l].name.clone()))
                }
                (Some(listen), Some(_)) => {
                    let message = "give either listen (a port of its own) or listener (a shared \
                                   port routed by server name), not both";
                    return Err(source.error_for(
                        listen,
                        &format!("endpoint[{i}].listener"),
                        message,
                    ));
                }
                (None, None) => {
                    let message = "needs listen (a port of its own) or listener (a shared port \
                                   routed by server name)";
                    return Err(source.error_for(
                        &e.name,
                        &format!("endpoint[{i}].listen"),
                        message,
                    ));
                }
            };
            endpoints.push(EndpointSpec {
                server_names,
                listener,
                proxy_protocol: e.proxy_protocol.map(|p| p.into_trust()),
                send_proxy_protocol: e.send_proxy_protocol,
                name: e.name.into_inner(),
                connector: e.connector.into_inner(),
                destination,
                listen,
                preread_timeout: e.preread_timeout.unwrap_or(DEFAULT_PREREAD_TIMEOUT),
                inactivity_timeout: e.inactivity_timeout.unwrap_or(DEFAULT_INACTIVITY_TIMEOUT),
                stall_timeout: e.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT),
                max_connections: e.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                per_source: SourcePolicy {
                    max_connections: e.per_source_max_connections,
                    rate: e.per_source_rate,
                },
                max_duration: e.max_duration,
                acl: e.acl.into_acl(),
                open: OpenRetry {
                    timeout: e.open_timeout.unwrap_or(DEFAULT_OPEN_TIMEOUT),
                    attempts: e.open_attempts.unwrap_or(DEFAULT_OPEN_ATTEMPTS),
                    buffer: e.open_retry_buffer.unwrap_or(DEFAULT_OPEN_RETRY_BUFFER),
                },
            });
        }

        for listener in &mut listeners {
            listener.routes.sort();
        }

        let cert_path = source.resolve_path(raw.tunnel.cert.get_ref());
        let chain = tls::load_certs(&cert_path)
            .map_err(|e| source.error_for(&raw.tunnel.cert, "tunnel.cert", e.to_string()))?;
        let key_path = source.resolve_path(raw.tunnel.key.get_ref());
        let key = tls::load_key(&key_path)
            .map_err(|e| source.error_for(&raw.tunnel.key, "tunnel.key", e.to_string()))?;
        // Build the TLS configuration once now so a key that does not match the certificate
        // is a configuration error, not a failure at the first agent's handshake.
        let post_quantum = raw.tunnel.post_quantum;
        let fips = raw.tunnel.fips.as_ref().is_some_and(|fips| *fips.get_ref());
        if let (true, Some(refusal)) = (fips, crypto::fips_refusal(post_quantum)) {
            let at = raw.tunnel.fips.as_ref().expect("fips is set");
            return Err(source.error_for(at, "tunnel.fips", refusal));
        }
        tls::tunnel_server_config(chain.clone(), key.clone_key(), post_quantum).map_err(|e| {
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
            stream_window: raw
                .tunnel
                .stream_window
                .unwrap_or(privlink_transport::limits::STREAM_RECEIVE_WINDOW),
            crypto: TunnelCrypto { post_quantum, fips },
            connectors,
            endpoints,
            listeners,
            fleet,
            source_files: vec![cert_path, key_path],
            audit: raw.audit.map(|a| a.validate(source)).transpose()?,
            source: Some(source.digest()),
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
