//! The `[audit]` table relay and agent share: where the trail is written, when it rotates, how
//! often open connections get a progress record, the optional HMAC key, and whether the relay
//! must refuse connections it cannot audit.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{
    ConfigError, ConfigSource, Spanned, deserialize_optional_positive_duration,
    deserialize_optional_size,
};

/// `rotate_size` when none is written.
pub const DEFAULT_ROTATE_SIZE: u64 = 100 << 20;
/// The smallest `rotate_size` (a few records a file is no use to anyone, but tests rotate).
pub const MIN_ROTATE_SIZE: u64 = 1 << 10;
/// `periodic` when none is written.
pub const DEFAULT_PERIODIC: Duration = Duration::from_secs(300);
/// The shortest `periodic`.
pub const MIN_PERIODIC: Duration = Duration::from_secs(1);
/// The shortest HMAC key accepted (256 bits).
pub const MIN_KEY_LEN: usize = 32;

/// `[audit]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditTable {
    path: Spanned<PathBuf>,
    #[serde(default, deserialize_with = "deserialize_optional_size")]
    rotate_size: Option<u64>,
    #[serde(default, deserialize_with = "deserialize_optional_positive_duration")]
    periodic: Option<Duration>,
    #[serde(default)]
    key_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    require: bool,
}

/// The HMAC key of a trail (never shown).
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKey(Vec<u8>);

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

impl AuditKey {
    /// The key in a key file's bytes (a trailing newline or spaces are not part of it).
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        let key = bytes.trim_ascii_end();
        if key.len() < MIN_KEY_LEN {
            return Err(format!("an audit key is at least {MIN_KEY_LEN} bytes"));
        }
        Ok(Self(key.to_vec()))
    }

    /// The sealer that signs with this key.
    pub fn sealer(&self) -> super::Sealer {
        super::Sealer::keyed(&self.0)
    }
}

/// `[audit]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// The trail's current file; rotated files are `<path>.000001`, `<path>.000002`, …
    pub path: PathBuf,
    /// The size past which the file is rotated.
    pub rotate_size: u64,
    /// How often each open connection gets a progress record.
    pub periodic: Duration,
    /// The HMAC key, when `key_file` is set.
    pub key: Option<AuditKey>,
    /// Whether new connections are refused while records cannot be written (relay).
    pub require: bool,
}

impl AuditSettings {
    /// Settings with the defaults, writing to `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            rotate_size: DEFAULT_ROTATE_SIZE,
            periodic: DEFAULT_PERIODIC,
            key: None,
            require: false,
        }
    }

    /// The sealer records are written with.
    pub fn sealer(&self) -> super::Sealer {
        self.key.as_ref().map_or(super::Sealer::Sha256, AuditKey::sealer)
    }
}

impl AuditTable {
    /// Validates the table: the file's directory exists, the key file is readable and long
    /// enough, the sizes and periods are within their bounds.
    pub fn validate(self, source: &ConfigSource) -> Result<AuditSettings, ConfigError> {
        let path = source.resolve_path(self.path.get_ref());
        let directory = match path.parent() {
            Some(dir) if dir.as_os_str().is_empty() => std::path::Path::new("."),
            Some(dir) => dir,
            None => std::path::Path::new("/"),
        };
        if path.file_name().is_none() || !directory.is_dir() {
            return Err(source.error_for(
                &self.path,
                "audit.path",
                format!("{}: not a file in an existing directory", path.display()),
            ));
        }
        let rotate_size = self.rotate_size.unwrap_or(DEFAULT_ROTATE_SIZE);
        if rotate_size < MIN_ROTATE_SIZE {
            return Err(source.error_for(
                &self.path,
                "audit.rotate_size",
                format!("at least {MIN_ROTATE_SIZE} bytes (\"1KiB\")"),
            ));
        }
        let periodic = self.periodic.unwrap_or(DEFAULT_PERIODIC);
        if periodic < MIN_PERIODIC {
            return Err(source.error_for(&self.path, "audit.periodic", "at least \"1s\""));
        }
        let key = match &self.key_file {
            Some(file) => {
                let key_path = source.resolve_path(file.get_ref());
                let bytes = std::fs::read(&key_path).map_err(|e| {
                    source.error_for(file, "audit.key_file", format!("{}: {e}", key_path.display()))
                })?;
                let key = AuditKey::from_file_bytes(&bytes).map_err(|problem| {
                    source.error_for(
                        file,
                        "audit.key_file",
                        format!("{}: {problem}", key_path.display()),
                    )
                })?;
                Some(key)
            }
            None => None,
        };
        Ok(AuditSettings { path, rotate_size, periodic, key, require: self.require })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        audit: AuditTable,
    }

    fn settings(text: &str) -> Result<AuditSettings, ConfigError> {
        let dir = std::env::temp_dir();
        let source = ConfigSource::from_text(dir.join("relay.toml"), text);
        source.parse::<File>()?.audit.validate(&source)
    }

    #[test]
    fn defaults_and_bounds() {
        let ok = settings("[audit]\npath = \"audit.jsonl\"\n").expect("valid");
        assert_eq!(ok.path, std::env::temp_dir().join("audit.jsonl"));
        assert_eq!((ok.rotate_size, ok.periodic, ok.require), (100 << 20, DEFAULT_PERIODIC, false));
        assert!(ok.key.is_none());

        let small = settings("[audit]\npath = \"a\"\nrotate_size = 10\n").expect_err("too small");
        assert_eq!((small.line, small.key.as_str()), (Some(2), "audit.rotate_size"));
        let nowhere = settings("[audit]\npath = \"/nonexistent/dir/a.jsonl\"\n").expect_err("dir");
        assert_eq!((nowhere.line, nowhere.key.as_str()), (Some(2), "audit.path"));
        let unknown = settings("[audit]\npath = \"a\"\nrotate = 1\n").expect_err("unknown");
        assert_eq!(unknown.line, Some(3));
    }

    #[test]
    fn the_key_file_is_checked_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("privlink-audit-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("short.key"), "too short\n").expect("write");
        std::fs::write(dir.join("good.key"), format!("{}\n", "k".repeat(40))).expect("write");
        let source = |text: &str| ConfigSource::from_text(dir.join("relay.toml"), text.to_owned());
        let parse = |text: &str| {
            let source = source(text);
            source.parse::<File>().and_then(|f| f.audit.validate(&source))
        };
        let short = parse("[audit]\npath = \"a\"\nkey_file = \"short.key\"\n").expect_err("short");
        assert_eq!(short.key, "audit.key_file");
        assert!(short.message.contains("at least 32 bytes"), "{short}");
        let good = parse("[audit]\npath = \"a\"\nkey_file = \"good.key\"\n").expect("good");
        assert_eq!(good.key, Some(AuditKey(b"k".repeat(40))));
        assert!(!format!("{good:?}").contains("kkkk"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
