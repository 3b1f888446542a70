//! The audit trail's events: each has a stable code (`PL3003`) and name (`connection.closed`)
//! that docs/audit.md lists with its fields, and a [`Record`] is one event's fields as JSON
//! text, ready for [`ChainHead::seal`](super::ChainHead::seal). Peer-controlled strings are
//! JSON-escaped and cut to [`MAX_FIELD_CHARS`]; callers never pass a token, a credential or a
//! payload byte.

use std::fmt;
use std::time::SystemTime;

/// Most characters of one text field (a rejection reason, a name a client asked for).
pub const MAX_FIELD_CHARS: usize = 512;

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal $name:literal,)*) => {
        /// An audit event. Codes and names are stable: a code is never reused for another event.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($(#[$doc])* $variant,)*
        }

        impl Code {
            /// Every code, in order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The stable code, `PL3003`.
            pub fn code(self) -> &'static str {
                match self { $(Code::$variant => $code,)* }
            }

            /// The event's name, `connection.closed`.
            pub fn event(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            /// Its position in [`Code::ALL`] (for counters kept in an array).
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

codes! {
    /// The trail was opened by a starting process (its first record, or one continuing the
    /// chain of an earlier run).
    TrailOpened = "PL0001" "trail.opened",
    /// The process stopped cleanly; nothing follows until the next `trail.opened`.
    TrailClosed = "PL0002" "trail.closed",
    /// Records that could not be written (the writer's queue was full or the disk failed).
    TrailLost = "PL0003" "trail.lost",
    /// The configuration the process started with.
    ConfigLoaded = "PL1001" "config.loaded",
    /// A reload was applied.
    ConfigReloaded = "PL1002" "config.reloaded",
    /// A reload was refused; nothing changed.
    ConfigReloadRefused = "PL1003" "config.reload_refused",
    /// An agent authenticated and was registered (relay).
    AgentAuthenticated = "PL2001" "agent.authenticated",
    /// A tunnel connection failed authentication (relay).
    AgentAuthFailed = "PL2002" "agent.auth_failed",
    /// A registered agent's session ended (relay).
    AgentDisconnected = "PL2003" "agent.disconnected",
    /// An agent said it is draining: no new connections go to it (relay).
    AgentDraining = "PL2004" "agent.draining",
    /// An endpoint's status changed (relay).
    EndpointStatus = "PL2101" "endpoint.status",
    /// A client connection passed the policy and is forwarded (relay).
    ConnectionOpened = "PL3001" "connection.opened",
    /// A connection still open, every `periodic` (relay).
    ConnectionProgress = "PL3002" "connection.progress",
    /// A forwarded connection ended (relay).
    ConnectionClosed = "PL3003" "connection.closed",
    /// A client connection refused before anything was forwarded (relay).
    ConnectionDenied = "PL3004" "connection.denied",
    /// A link to a relay authenticated (agent).
    LinkUp = "PL4001" "link.up",
    /// A link to a relay ended (agent).
    LinkDown = "PL4002" "link.down",
    /// A relay asked for a destination outside the allowlist, or one it could not reach
    /// (agent).
    DestinationRefused = "PL4003" "destination.refused",
    /// A stream the agent carried to its destination ended (agent).
    StreamClosed = "PL4004" "stream.closed",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.event())
    }
}

/// One event's fields, as JSON text without braces: `"code":"…","event":"…",` and then each
/// field in the order given. Its time is taken when it is made, and written by the trail.
#[derive(Debug, Clone)]
pub struct Record {
    /// The event.
    pub code: Code,
    /// When it happened.
    pub time: SystemTime,
    fields: String,
}

impl Record {
    /// A record of `code` at `time`, with no fields yet.
    pub fn new(code: Code, time: SystemTime) -> Self {
        // Room for a connection's record without growing (they run to 300–450 bytes).
        let mut fields = String::with_capacity(512);
        fields.push_str("\"code\":\"");
        fields.push_str(code.code());
        fields.push_str("\",\"event\":\"");
        fields.push_str(code.event());
        fields.push('"');
        Self { code, time, fields }
    }

    /// A text field: JSON-escaped, cut after [`MAX_FIELD_CHARS`] characters (with `…`).
    pub fn text(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        let cut = match value.char_indices().nth(MAX_FIELD_CHARS) {
            Some((at, _)) => std::borrow::Cow::Owned(format!("{}…", &value[..at])),
            None => std::borrow::Cow::Borrowed(value),
        };
        if cut.chars().all(|c| c != '"' && c != '\\' && !c.is_control()) {
            // Nothing to escape (names, addresses, outcomes: nearly every field): as it is.
            self.fields.push('"');
            self.fields.push_str(&cut);
            self.fields.push('"');
        } else {
            // serde_json escapes quotes, backslashes and every control character; writing a
            // `&str` cannot fail.
            self.fields.push_str(&serde_json::to_string(cut.as_ref()).unwrap_or_default());
        }
        self
    }

    /// A text field from anything that displays.
    pub fn display(self, key: &str, value: impl fmt::Display) -> Self {
        self.text(key, &value.to_string())
    }

    /// A text field when there is a value; nothing otherwise.
    pub fn maybe(self, key: &str, value: Option<impl fmt::Display>) -> Self {
        match value {
            Some(value) => self.display(key, value),
            None => self,
        }
    }

    /// A number field.
    pub fn number(mut self, key: &str, value: u64) -> Self {
        use fmt::Write as _;
        self.key(key);
        // Writing into a String cannot fail.
        let _ = write!(self.fields, "{value}");
        self
    }

    /// A boolean field.
    pub fn flag(mut self, key: &str, value: bool) -> Self {
        self.key(key);
        self.fields.push_str(if value { "true" } else { "false" });
        self
    }

    /// The fields as JSON text, for [`ChainHead::seal`](super::ChainHead::seal).
    pub fn fields(&self) -> &str {
        &self.fields
    }

    fn key(&mut self, key: &str) {
        debug_assert!(
            key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{key}"
        );
        self.fields.push_str(",\"");
        self.fields.push_str(key);
        self.fields.push_str("\":");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{ChainCheck, ChainHead, Sealer};

    #[test]
    fn codes_are_unique_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for (i, code) in Code::ALL.iter().enumerate() {
            assert!(seen.insert(code.code()), "{code} twice");
            assert!(seen.insert(code.event()), "{code} twice");
            assert_eq!(code.index(), i);
        }
        assert_eq!(Code::ConnectionClosed.code(), "PL3003");
        assert_eq!(Code::ConnectionDenied.event(), "connection.denied");
    }

    #[test]
    fn peer_text_is_escaped_and_cut_and_the_sealed_line_is_json() {
        let hostile = format!("<b>\"x\"\n\u{1b}[31m{}", "a".repeat(2000));
        let record = Record::new(Code::ConnectionDenied, SystemTime::UNIX_EPOCH)
            .text("reason", &hostile)
            .number("bytes", 7)
            .flag("ok", false)
            .maybe("via", None::<&str>);
        let line = ChainHead::default().seal(&Sealer::Sha256, "t", record.fields());
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).expect(&line);
        let reason = value["reason"].as_str().expect("reason");
        assert!(reason.starts_with("<b>\"x\"\n\u{1b}[31m"), "{reason}");
        assert_eq!(reason.chars().count(), MAX_FIELD_CHARS + 1);
        assert_eq!(value["code"], "PL3004");
        assert_eq!(value["bytes"], 7);
        assert_eq!(value["ok"], false);
        assert!(value.get("via").is_none());
        assert!(ChainCheck::new().next(&Sealer::Sha256, &line, false).is_ok());
    }

    #[test]
    fn text_is_written_as_serde_json_writes_it() {
        for text in [
            "",
            "onprem-east",
            "198.51.100.7:53122",
            "contoso-kv.privatelink.vaultcore.azure.net:443",
            "ünïcödé ✓ \u{2028}",
            "quote \" inside",
            "back\\slash",
            "tab\there",
            "nul\u{0}",
            "del\u{7f}",
            "<script>alert(1)</script>",
        ] {
            let record = Record::new(Code::ConfigLoaded, SystemTime::UNIX_EPOCH).text("v", text);
            let written = record.fields().rsplit_once(",\"v\":").expect("the field").1;
            assert_eq!(written, serde_json::to_string(text).expect("json"), "{text:?}");
        }
    }
}
