//! The agent's configuration: `agent.toml` as written (the contract in DESIGN.md) and the
//! validated [`AgentConfig`] the agent runs from. The token comes from `token_file` or the
//! `PRIVLINK_TOKEN` environment variable and is never logged.

use privlink_protocol::audit::settings::{AuditSettings, AuditTable};
use privlink_protocol::config::SourceDigest;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use privlink_protocol::config::AdminSettings;
use privlink_protocol::config::{
    AdminTable, ConfigError, ConfigSource, Spanned, deserialize_optional_buffer_budget,
    deserialize_optional_duration, deserialize_optional_positive_duration,
    deserialize_optional_stream_window,
};
use privlink_protocol::destination::{Host, parse_port, split_host_port};
use privlink_protocol::token::Token;
use privlink_transport::crypto::{self, PostQuantum, TunnelCrypto};
use privlink_transport::tls;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::allowlist::{Allowlist, DestinationPattern};
use crate::proxy::{NoProxy, ProxyEnvironment, ProxyOrigin, ProxySettings};

/// Environment variable that may carry the token instead of `token_file`.
pub const TOKEN_ENV: &str = "PRIVLINK_TOKEN";
/// Default deadline for connecting to a destination (all its addresses together).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default stall timeout: a destination that takes less than
/// `privlink_transport::copy::STALL_MIN_PROGRESS` of an upload for this long is cut.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for resolving a destination.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Default wait for a QUIC handshake before `auto` falls back to TCP.
pub const DEFAULT_QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// Default interval between QUIC probes while `auto` runs on TCP.
pub const DEFAULT_QUIC_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Default time open streams get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How the agent reaches relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC first; TLS over TCP when no QUIC handshake completes within
    /// `quic_fallback_after`, probing QUIC in the background and moving new streams back to it
    /// once it works again.
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        })
    }
}

/// A relay to dial: a name or address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddress {
    /// Host name (also the TLS server name) or IP literal.
    pub host: Host,
    /// Port.
    pub port: u16,
}

impl RelayAddress {
    /// The relay as a destination (what a proxy is asked to CONNECT to).
    pub fn destination(&self) -> privlink_protocol::destination::Destination {
        privlink_protocol::destination::Destination { host: self.host.clone(), port: self.port }
    }

    /// A destination as a relay address (the proxy's, which is dialled like one).
    pub fn of(destination: &privlink_protocol::destination::Destination) -> Self {
        Self { host: destination.host.clone(), port: destination.port }
    }
}

impl std::fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A validated agent configuration.
#[derive(Debug)]
pub struct AgentConfig {
    /// Name shown on the relay (defaults to the host name).
    pub name: String,
    /// Connector served.
    pub connector: String,
    /// The connector token.
    pub token: Token,
    /// Relays to keep connections to.
    pub relays: Vec<RelayAddress>,
    /// Trust anchors for the relay's certificate.
    pub relay_roots: Vec<CertificateDer<'static>>,
    /// The file the trust anchors came from (`relay_ca`), named in certificate errors; `None`
    /// for a configuration built in memory.
    pub relay_ca: Option<PathBuf>,
    /// Transport selection.
    pub transport: TransportChoice,
    /// `auto`: how long a QUIC handshake may take before falling back to TCP.
    pub quic_fallback_after: Duration,
    /// `auto`: how often QUIC is retried while on TCP.
    pub quic_probe_interval: Duration,
    /// Destinations this agent consents to open.
    pub allowlist: Allowlist,
    /// Deadline for connecting to a destination.
    pub connect_timeout: Duration,
    /// Deadline for resolving a destination.
    pub dns_timeout: Duration,
    /// A stream whose destination (or the relay) took too little of what waited for it for
    /// this long is reset both ways.
    pub stall_timeout: Duration,
    /// Time open streams get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Bytes the agent may hold for destinations that do not read (`buffer_budget`).
    pub buffer_budget: u64,
    /// Each tunnel stream's receive window on the agent, for what relays send
    /// (`stream_window`; default 2 MiB).
    pub stream_window: u32,
    /// The admin listener, when `[admin]` is set.
    pub admin: Option<AdminSettings>,
    /// The HTTP proxy on the way to the relays (`proxy`, or `HTTPS_PROXY`), if there is one.
    pub proxy: Option<ProxySettings>,
    /// The tunnel's key exchange and whether FIPS mode is required (`post_quantum`, `fips`).
    pub crypto: TunnelCrypto,
    /// The files besides the config file whose content this configuration holds (`token_file`,
    /// `relay_ca`): a change to one reloads it, like a change to the config file. Empty for a
    /// configuration built in memory.
    pub source_files: Vec<PathBuf>,
    /// The audit trail (`[audit]`), when one is written.
    pub audit: Option<AuditSettings>,
    /// The file it was read from and the SHA-256 of its text (for the audit trail); `None` for
    /// a configuration built in memory.
    pub source: Option<SourceDigest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    name: Option<String>,
    connector: String,
    #[serde(default)]
    token_file: Option<Spanned<PathBuf>>,
    relays: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    relay_ca: Option<Spanned<PathBuf>>,
    #[serde(default = "default_transport")]
    transport: TransportChoice,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    quic_fallback_after: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    quic_probe_interval: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    dns_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    stall_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_duration")]
    shutdown_grace: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_optional_buffer_budget")]
    buffer_budget: Option<u64>,
    #[serde(default, deserialize_with = "deserialize_optional_stream_window")]
    stream_window: Option<u32>,
    #[serde(default)]
    allow: Vec<RawAllow>,
    #[serde(default)]
    admin: Option<AdminTable>,
    #[serde(default)]
    proxy: Option<Spanned<String>>,
    #[serde(default)]
    proxy_credentials_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    audit: Option<AuditTable>,
    #[serde(default)]
    post_quantum: PostQuantum,
    #[serde(default)]
    fips: Option<Spanned<bool>>,
}

fn default_transport() -> TransportChoice {
    TransportChoice::Auto
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    destination: RuleText,
}

#[derive(Debug)]
struct RuleText(DestinationPattern);

impl<'de> Deserialize<'de> for RuleText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(RuleText).map_err(serde::de::Error::custom)
    }
}

/// Warns when a secret's file (the token, the proxy credentials) can be read by users other
/// than its owner (`privlink token new --out` writes the token with mode 0600).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{} is readable by group or others (mode {mode:o}); `chmod 600` it",
                path.display()
            );
        }
    }
}

impl AgentConfig {
    /// Reads and validates an agent configuration file; `env_token` is the value of
    /// `PRIVLINK_TOKEN`, which the caller has taken out of the environment (see the binary's
    /// `take_token_from_env`).
    pub fn load(path: &Path, env_token: Option<String>) -> Result<Self, ConfigError> {
        Self::from_source(&ConfigSource::read(path)?, env_token)
    }

    /// Validates a configuration already in memory; `env_token` stands for `PRIVLINK_TOKEN`.
    /// The proxy variables are read from the process's environment.
    pub fn from_source(
        source: &ConfigSource,
        env_token: Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::from_source_in(source, env_token, &ProxyEnvironment::from_process())
    }

    /// [`from_source`](Self::from_source) with the proxy variables given.
    pub fn from_source_in(
        source: &ConfigSource,
        env_token: Option<String>,
        env: &ProxyEnvironment,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = source.parse()?;

        if raw.connector.is_empty() {
            return Err(source.error_at(None, "connector", "must not be empty"));
        }
        let env_token = env_token.filter(|t| !t.trim().is_empty());
        let mut source_files = Vec::new();
        let token = match (&raw.token_file, env_token) {
            (Some(file), Some(_)) => {
                return Err(source.error_for(
                    file,
                    "token_file",
                    format!(
                        "both token_file and the {TOKEN_ENV} environment variable are set; \
                         use one of them, so that it is clear which token the agent presents"
                    ),
                ));
            }
            (Some(file), None) => {
                let path = source.resolve_path(file.get_ref());
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    source.error_for(
                        file,
                        "token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let token = privlink_protocol::token::token_in_file(&text).map_err(|problem| {
                    source.error_for(file, "token_file", format!("{}: {problem}", path.display()))
                })?;
                warn_if_readable_by_others(&path);
                source_files.push(path);
                Token::new(token)
            }
            (None, Some(env)) => Token::new(env.trim()),
            (None, None) => {
                return Err(source.error_at(
                    None,
                    "token_file",
                    format!("no token: set token_file or the {TOKEN_ENV} environment variable"),
                ));
            }
        };

        if raw.relays.get_ref().is_empty() {
            return Err(source.error_for(
                &raw.relays,
                "relays",
                "list at least one relay (host:port)",
            ));
        }
        let mut relays = Vec::new();
        for (i, text) in raw.relays.get_ref().iter().enumerate() {
            let parsed = split_host_port(text.get_ref()).and_then(|(host, port)| {
                Ok(RelayAddress { host: host.parse()?, port: parse_port(port)? })
            });
            relays.push(
                parsed
                    .map_err(|e| source.error_for(text, &format!("relays[{i}]"), e.to_string()))?,
            );
        }

        let relay_ca = raw.relay_ca.as_ref().map(|file| source.resolve_path(file.get_ref()));
        let relay_roots = match (&raw.relay_ca, &relay_ca) {
            (Some(file), Some(path)) => tls::load_certs(path)
                .map_err(|e| source.error_for(file, "relay_ca", e.to_string()))?,
            _ => {
                return Err(source.error_at(
                    None,
                    "relay_ca",
                    "missing: name the CA certificate that signed the relay's certificate \
                     (`privlink certs init` writes one)",
                ));
            }
        };

        source_files.extend(relay_ca.clone());
        let proxy = proxy_settings(&raw, source, env, &mut source_files)?;
        let fips = raw.fips.as_ref().is_some_and(|fips| *fips.get_ref());
        if let (true, Some(refusal)) = (fips, crypto::fips_refusal(raw.post_quantum)) {
            let at = raw.fips.as_ref().expect("fips is set");
            return Err(source.error_for(at, "fips", refusal));
        }
        let name = raw.name.filter(|n| !n.is_empty()).unwrap_or_else(default_agent_name);
        Ok(Self {
            name,
            connector: raw.connector,
            token,
            relays,
            relay_roots,
            relay_ca,
            transport: raw.transport,
            quic_fallback_after: raw.quic_fallback_after.unwrap_or(DEFAULT_QUIC_FALLBACK_AFTER),
            quic_probe_interval: raw.quic_probe_interval.unwrap_or(DEFAULT_QUIC_PROBE_INTERVAL),
            allowlist: Allowlist {
                rules: raw.allow.into_iter().map(|a| a.destination.0).collect(),
            },
            connect_timeout: raw.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            stall_timeout: raw.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT),
            dns_timeout: raw.dns_timeout.unwrap_or(DEFAULT_DNS_TIMEOUT),
            shutdown_grace: raw.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            // Unset: a quarter of memory (see `budget::default_limit`).
            buffer_budget: raw
                .buffer_budget
                .unwrap_or_else(privlink_transport::budget::default_limit),
            stream_window: raw
                .stream_window
                .unwrap_or(privlink_transport::limits::STREAM_RECEIVE_WINDOW),
            admin: raw.admin.map(|a| a.validate(source)).transpose()?,
            proxy,
            crypto: TunnelCrypto { post_quantum: raw.post_quantum, fips },
            source_files,
            audit: raw.audit.map(|a| a.validate(source)).transpose()?,
            source: Some(source.digest()),
        })
    }

    /// The proxy on the way to `relay`, if one applies (QUIC never crosses one).
    pub fn proxy_for(&self, relay: &RelayAddress) -> Option<&ProxySettings> {
        self.proxy.as_ref().filter(|proxy| proxy.applies_to(&relay.host))
    }
}

/// The proxy: `proxy` (credentials in its URL or in `proxy_credentials_file`), or the
/// environment's `HTTPS_PROXY` unless `transport = "quic"` (which no proxy carries); either
/// with the environment's `NO_PROXY`.
fn proxy_settings(
    raw: &RawConfig,
    source: &ConfigSource,
    env: &ProxyEnvironment,
    source_files: &mut Vec<PathBuf>,
) -> Result<Option<ProxySettings>, ConfigError> {
    let (address, mut credentials, origin) = match (&raw.proxy, &env.proxy) {
        (Some(written), _) => {
            if raw.transport == TransportChoice::Quic {
                let message = "QUIC cannot cross an HTTP proxy: set transport = \"tcp\" (or \
                               \"auto\", which then uses TLS over TCP), or remove proxy";
                return Err(source.error_for(written, "proxy", message));
            }
            let (address, credentials) = crate::proxy::parse_proxy_url(written.get_ref())
                .map_err(|e| source.error_for(written, "proxy", e))?;
            (address, credentials, ProxyOrigin::Config)
        }
        (None, Some(_)) if raw.transport == TransportChoice::Quic => {
            tracing::warn!(
                "HTTPS_PROXY is set but transport = \"quic\": QUIC cannot cross an HTTP proxy, so it is not used"
            );
            return Ok(None);
        }
        (None, Some((name, value))) => {
            let (address, credentials) = crate::proxy::parse_proxy_url(value).map_err(|e| {
                source.error_at(None, "proxy", format!("the environment's {name}: {e}"))
            })?;
            (address, credentials, ProxyOrigin::Environment(name))
        }
        (None, None) => {
            if let Some(file) = &raw.proxy_credentials_file {
                let message = "proxy_credentials_file without a proxy (set proxy, or HTTPS_PROXY)";
                return Err(source.error_for(file, "proxy_credentials_file", message));
            }
            return Ok(None);
        }
    };
    if let Some(file) = &raw.proxy_credentials_file {
        if credentials.is_some() {
            let message = "the proxy URL has credentials already: keep them in one place \
                           (proxy_credentials_file is the better one)";
            return Err(source.error_for(file, "proxy_credentials_file", message));
        }
        let path = source.resolve_path(file.get_ref());
        let read = crate::proxy::credentials_in_file(&path)
            .map_err(|e| source.error_for(file, "proxy_credentials_file", e))?;
        warn_if_readable_by_others(&path);
        source_files.push(path);
        credentials = Some(read);
    }
    let no_proxy = NoProxy::parse(env.no_proxy.as_deref().unwrap_or_default());
    Ok(Some(ProxySettings { address, credentials, origin, no_proxy }))
}

/// The host name, or "agent" when it cannot be read.
fn default_agent_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "agent".to_owned())
}
