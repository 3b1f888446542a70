//! Shared configuration plumbing: reading a TOML file into typed values with errors that name
//! the file, the line and the key, and the value syntaxes both configs use (durations with
//! units such as `"60s"`, sizes such as `"512MiB"`).
//!
//! Parsing goes through `serde_path_to_error`, so a bad value anywhere reports its full key
//! path (`endpoint[1].acl.allow[0]`); checks that span several fields (unknown connector,
//! duplicate names) use [`toml::Spanned`] positions and [`ConfigSource::error_at`].

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};

/// A value with its position in the file, for checks that span several fields.
pub use toml::Spanned;

/// A configuration file that could not be used. Display: `file:line: key: message`.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when the problem has a position.
    pub line: Option<usize>,
    /// Dotted key path (`endpoint[0].listen`), empty for file-level problems.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The text of a configuration file, kept so positions can be turned into line numbers.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    path: PathBuf,
    text: String,
}

impl ConfigSource {
    /// Reads a file. A missing or unreadable file is a [`ConfigError`] naming it.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        Ok(Self::from_text(path, text))
    }

    /// Wraps text that came from somewhere other than a file (tests, the demo).
    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self { path: path.into(), text: text.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's path and the SHA-256 of its text, as the audit trail names a configuration.
    pub fn digest(&self) -> SourceDigest {
        SourceDigest {
            path: self.path.clone(),
            sha256: crate::token::TokenDigest::of(self.text.as_bytes()).to_hex(),
        }
    }

    /// Parses the whole file into `T`, reporting the first problem with line and key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let deserializer = toml::de::Deserializer::parse(&self.text)
            .map_err(|e| self.error_at(e.span(), "", e.message().trim_end()))?;
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let key = if key == "." { String::new() } else { key };
            self.error_at(inner.span(), &key, inner.message().trim_end())
        })
    }

    /// An error at a byte range of the file (`None`: no position known).
    pub fn error_at(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: span.map(|s| self.line_of(s.start)),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// An error about a value whose position is known from a [`toml::Spanned`].
    pub fn error_for<T>(
        &self,
        spanned: &toml::Spanned<T>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        self.error_at(Some(spanned.span()), key, message)
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// Resolves a path written in this file relative to the file's directory.
    pub fn resolve_path(&self, written: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if written.is_relative() => dir.join(written),
            _ => written.to_owned(),
        }
    }
}

/// Which file a configuration was read from, and the SHA-256 (hex) of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDigest {
    /// The file.
    pub path: PathBuf,
    /// SHA-256 of its text, hex.
    pub sha256: String,
}

/// Parses a duration written with a unit: `250ms`, `60s`, `5m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let help = || {
        format!(
            "`{text}` is not a duration; write a whole number with a unit: ms, s, m or h (e.g. \"60s\")"
        )
    };
    let value: u64 = number.parse().map_err(|_| help())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(help()),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long a duration"))
}

/// Serde helper: a duration string with a unit (zero allowed). A bare number is refused with
/// what to write instead: `60` could mean seconds or milliseconds, so a unit is required.
pub fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Whole(i64),
        Fraction(f64),
    }
    let number = match Written::deserialize(d).map_err(|_| {
        D::Error::custom("expected a duration with a unit, as a string: \"250ms\", \"60s\", \"5m\"")
    })? {
        Written::Text(text) => return parse_duration(&text).map_err(D::Error::custom),
        Written::Whole(n) => n.to_string(),
        Written::Fraction(x) => x.to_string(),
    };
    Err(D::Error::custom(format!(
        "a duration needs a unit, as a string: \"{number}s\" (or ms, m, h), not {number}"
    )))
}

/// Serde helper: a duration string with a unit that must be greater than zero.
pub fn deserialize_positive_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Duration, D::Error> {
    let duration = deserialize_duration(d)?;
    if duration.is_zero() {
        return Err(D::Error::custom("the duration must be greater than zero"));
    }
    Ok(duration)
}

/// Serde helper for optional durations that may be zero (fields with `#[serde(default)]`).
pub fn deserialize_optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d).map(Some)
}

/// Serde helper for optional durations that must be greater than zero.
pub fn deserialize_optional_positive_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_positive_duration(d).map(Some)
}

/// Parses a size written with a binary unit: `64KiB`, `512MiB`, `2GiB` (whole numbers; a
/// plain number of bytes is written as an integer, not a string). By hand: four units do not
/// warrant a crate.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let help = || {
        format!(
            "`{text}` is not a size; write a whole number with a unit: KiB, MiB or GiB \
             (e.g. \"512MiB\"), or a number of bytes without quotes"
        )
    };
    let value: u64 = number.parse().map_err(|_| help())?;
    let unit_bytes: u64 = match unit.trim_start() {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(help()),
    };
    value.checked_mul(unit_bytes).ok_or_else(|| format!("`{text}` is too large a size"))
}

/// Serde helper for optional sizes (fields with `#[serde(default)]`): a string with a unit
/// ([`parse_size`]) or an integer number of bytes; it must be greater than zero.
pub fn deserialize_optional_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Bytes(u64),
        Text(String),
    }
    let bytes = match Written::deserialize(d)? {
        Written::Bytes(bytes) => bytes,
        Written::Text(text) => parse_size(&text).map_err(D::Error::custom)?,
    };
    if bytes == 0 {
        return Err(D::Error::custom("the size must be greater than zero"));
    }
    Ok(Some(bytes))
}

/// The largest `buffer_budget` either role accepts. Past it, more streams could be charged at
/// once (up to the budget's ceiling, a quarter above it) than one TLS/TCP tunnel connection's
/// HTTP/2 window holds beside its control stream: 5 GiB of charges at about 5 MiB a stream is
/// 1,017 stalled streams × 2 MiB of window, within the 2 GiB − 1 that HTTP/2 can express.
pub const MAX_BUFFER_BUDGET: u64 = 4 << 30;

/// Serde helper for `buffer_budget`: a size ([`deserialize_optional_size`]) of at most
/// [`MAX_BUFFER_BUDGET`].
pub fn deserialize_optional_buffer_budget<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    let bytes = deserialize_optional_size(d)?;
    if bytes.is_some_and(|bytes| bytes > MAX_BUFFER_BUDGET) {
        return Err(D::Error::custom(
            "at most 4GiB: past that, more streams could stall at once than one TLS/TCP tunnel \
             connection's flow-control window holds beside its control messages",
        ));
    }
    Ok(bytes)
}

/// The smallest `stream_window` either role accepts: a few dozen packets in flight.
pub const MIN_STREAM_WINDOW: u32 = 64 * 1024;
/// The largest `stream_window` either role accepts: a stalled stream is charged 2.5 windows on
/// the buffer budget, so one at 64 MiB already takes 160 MiB of it.
pub const MAX_STREAM_WINDOW: u32 = 64 * 1024 * 1024;

/// Serde helper for `stream_window`: a size ([`deserialize_optional_size`]) from
/// [`MIN_STREAM_WINDOW`] to [`MAX_STREAM_WINDOW`].
pub fn deserialize_optional_stream_window<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    let Some(bytes) = deserialize_optional_size(d)? else { return Ok(None) };
    match u32::try_from(bytes) {
        Ok(window) if (MIN_STREAM_WINDOW..=MAX_STREAM_WINDOW).contains(&window) => Ok(Some(window)),
        _ => Err(D::Error::custom("from 64KiB to 64MiB")),
    }
}

/// The `[admin]` table both configs share, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTable {
    listen: Spanned<std::net::SocketAddr>,
    #[serde(default)]
    token_file: Option<Spanned<PathBuf>>,
    /// Names besides IP literals and `localhost` that requests may carry in `Host`.
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    metrics_require_token: Option<Spanned<bool>>,
}

/// The admin listener's settings (`[admin]`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where it listens.
    pub listen: std::net::SocketAddr,
    /// The digest of the token `/api/*` requires (from `token_file`); required off loopback.
    pub token: Option<crate::token::TokenDigest>,
    /// Names a request's `Host` may carry besides an IP literal and `localhost` (`hosts`, in
    /// lower case): anything else is answered 421, so a page on another origin that rebinds
    /// its name to this listener's address reads nothing.
    pub hosts: Vec<String>,
    /// Whether `/metrics` needs the token too (`metrics_require_token`; endpoints and
    /// connectors are named in its labels).
    pub metrics_require_token: bool,
}

impl AdminSettings {
    /// Settings with no extra host names and open metrics.
    pub fn new(listen: std::net::SocketAddr, token: Option<crate::token::TokenDigest>) -> Self {
        Self { listen, token, hosts: Vec::new(), metrics_require_token: false }
    }
}

impl AdminTable {
    /// Validates the table: off loopback a token file is required (the status API names
    /// agents, endpoints and addresses); only the token's digest is kept.
    pub fn validate(self, source: &ConfigSource) -> Result<AdminSettings, ConfigError> {
        let listen = *self.listen.get_ref();
        let token = match &self.token_file {
            Some(file) => {
                let path = source.resolve_path(file.get_ref());
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    source.error_for(file, "admin.token_file", format!("{}: {e}", path.display()))
                })?;
                let token = crate::token::token_in_file(&text)
                    .map_err(|problem| source.error_for(file, "admin.token_file", problem))?;
                Some(crate::token::TokenDigest::of(token.as_bytes()))
            }
            None if !listen.ip().is_loopback() => {
                return Err(source.error_for(
                    &self.listen,
                    "admin.listen",
                    format!(
                        "{listen} is not a loopback address: set admin.token_file too, so the \
                         status API needs a bearer token"
                    ),
                ));
            }
            None => None,
        };
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for (i, host) in self.hosts.iter().enumerate() {
            let name = crate::destination::normalize_dns_name(host.get_ref())
                .map_err(|e| source.error_for(host, &format!("admin.hosts[{i}]"), e.to_string()))?;
            hosts.push(name);
        }
        let metrics_require_token = match &self.metrics_require_token {
            Some(setting) if *setting.get_ref() && token.is_none() => {
                return Err(source.error_for(
                    setting,
                    "admin.metrics_require_token",
                    "set admin.token_file too: it is the token /metrics would require",
                ));
            }
            Some(setting) => *setting.get_ref(),
            None => false,
        };
        Ok(AdminSettings { listen, token, hosts, metrics_require_token })
    }
}

/// `post_quantum` (relay `[tunnel]`, agent top level): how the tunnel's TLS (TLS/TCP and QUIC
/// alike) exchanges keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostQuantum {
    /// The hybrid X25519MLKEM768 first, X25519 (then P-256, P-384) for peers without it.
    #[default]
    Prefer,
    /// X25519MLKEM768 only: a peer without it cannot connect, and the error says why.
    Require,
    /// Classical key exchange only (X25519, P-256, P-384).
    Off,
}

impl fmt::Display for PostQuantum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::Off => "off",
        })
    }
}

/// The tunnel's crypto settings, as both roles configure them (DESIGN "Crypto").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunnelCrypto {
    /// The key exchange.
    pub post_quantum: PostQuantum,
    /// `fips = true`: start only as a FIPS build in FIPS mode (checked when the configuration
    /// is read).
    pub fips: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "fields exist to be parsed")]
    struct Sample {
        #[serde(deserialize_with = "deserialize_positive_duration")]
        timeout: Duration,
        #[serde(default)]
        item: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "fields exist to be parsed")]
    struct Item {
        name: toml::Spanned<String>,
        #[serde(default)]
        port: u16,
    }

    fn parse(text: &str) -> Result<Sample, ConfigError> {
        ConfigSource::from_text("sample.toml", text).parse()
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["5", "s", "1.5s", "-1s", "10 sec", "", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bare_number_for_a_duration_says_to_add_a_unit() {
        let err = parse("timeout = 60\n").expect_err("no unit");
        assert!(err.message.contains("a duration needs a unit, as a string: \"60s\""), "{err}");
        let err = parse("timeout = 1.5\n").expect_err("no unit");
        assert!(err.message.contains("\"1.5s\""), "{err}");
        let err = parse("timeout = true\n").expect_err("not a duration");
        assert!(err.message.contains("expected a duration with a unit"), "{err}");
    }

    #[test]
    fn sizes_need_binary_units() {
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100 B"), Ok(100));
        for bad in ["5", "MiB", "1.5GiB", "-1MiB", "10MB", "1 gb", "", "99999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = parse("timeout = \"5s\"\n\n[[item]]\nname = \"a\"\nport = \"x\"\n")
            .expect_err("bad port");
        assert_eq!(err.line, Some(5));
        assert_eq!(err.key, "item[0].port");
        let shown = err.to_string();
        assert!(shown.starts_with("sample.toml:5: key `item[0].port`"), "{shown}");

        let err = parse("timeout = \"0s\"\n").expect_err("zero");
        assert_eq!((err.line, err.key.as_str()), (Some(1), "timeout"));
        assert!(err.message.contains("greater than zero"));

        let err =
            parse("timeout = \"1s\"\n[[item]]\nname = \"a\"\nnmae = \"b\"\n").expect_err("unknown");
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.message.contains("unknown field `nmae`"), "{err}");

        let err = parse("timeout = \n").expect_err("syntax");
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn spans_survive_path_tracking() {
        let source =
            ConfigSource::from_text("s.toml", "timeout = \"1s\"\n\n[[item]]\nname = \"dup\"\n");
        let sample: Sample = source.parse().expect("valid");
        let err = source.error_for(&sample.item[0].name, "item[0].name", "duplicate");
        assert_eq!(err.line, Some(4));
    }

    fn admin(text: &str) -> Result<AdminSettings, ConfigError> {
        let source = ConfigSource::from_text("relay.toml", text);
        source.parse::<AdminTable>()?.validate(&source)
    }

    #[test]
    fn admin_host_names_are_validated_and_metrics_need_a_token_to_require() {
        let settings =
            admin("listen = \"127.0.0.1:9090\"\nhosts = [\"Admin.Example.\"]\n").expect("valid");
        assert_eq!(settings.hosts, ["admin.example"], "lower case, no trailing dot");
        assert!(!settings.metrics_require_token, "metrics are open unless asked");

        let bad = admin("listen = \"127.0.0.1:9090\"\nhosts = [\"not a name\"]\n")
            .expect_err("a bad name");
        assert_eq!((bad.key.as_str(), bad.line), ("admin.hosts[0]", Some(2)));

        let tokenless = admin("listen = \"127.0.0.1:9090\"\nmetrics_require_token = true\n")
            .expect_err("no token to require");
        assert_eq!(tokenless.key, "admin.metrics_require_token");
        assert!(tokenless.message.contains("token_file"), "{tokenless}");
    }
}
