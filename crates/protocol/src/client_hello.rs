//! The server name a TLS ClientHello asks for, read from a connection's first bytes without
//! decrypting or changing anything, and the names endpoints claim on a shared port. Sans-IO:
//! [`ServerNameReader`] is fed bytes as they arrive — records split across segments (one byte
//! at a time, even), a ClientHello spread over several records — and says when it has the
//! whole ClientHello (at most [`MAX_CLIENT_HELLO`] bytes), or why the bytes are not one; the
//! caller keeps the bytes and forwards them untouched. [`ServerNames`] routes a name to what
//! claims it: exact names first, then one-label `*.` wildcards.
//!
//! Written by hand rather than with rustls' `Acceptor`: that one needs the whole ClientHello in
//! its own buffers and parses it into a server-side handshake state; this reads one extension
//! and leaves the bytes with the caller, which forwards them as they came.

use std::collections::HashMap;

use crate::destination::normalize_dns_name;

/// The most bytes read for a ClientHello (its records' headers included): real ones are under
/// 2 KiB (post-quantum key shares push them past 1,500 bytes); 16 KiB is one full TLS record.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// A fatal alert with `description` (RFC 8446 §6) as a TLS 1.2-versioned record: what a server
/// sends a client it turns away before its handshake. Clients print the description
/// (curl: `tlsv1 alert access denied`), which an operator can search for.
pub const fn fatal_alert(description: u8) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}

/// `unrecognized_name` (RFC 6066 §3): no endpoint serves the name the client asked for.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = fatal_alert(112);
/// `access_denied`: the client's address is not allowed, or its endpoint is at its limits.
pub const ACCESS_DENIED_ALERT: [u8; 7] = fatal_alert(49);
/// `internal_error`: nothing on the far side could take the connection (no agent, an endpoint
/// its agents reject, a destination that failed).
pub const INTERNAL_ERROR_ALERT: [u8; 7] = fatal_alert(80);

/// TLS record content type of a handshake.
const HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 0x01;
/// Extension type of `server_name`.
const SERVER_NAME: u16 = 0x0000;
/// `server_name` entry type of a host name.
const HOST_NAME: u8 = 0x00;
/// Record header length.
const RECORD_HEADER: usize = 5;
/// The largest record fragment TLS allows.
const MAX_FRAGMENT: usize = 1 << 14;

/// What the bytes read so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preread {
    /// Not a whole ClientHello yet: read more.
    NeedMore,
    /// A whole ClientHello; the name it asks for, lowercase and without a trailing dot (`None`:
    /// it names none).
    ClientHello {
        /// The `server_name` host name.
        server_name: Option<String>,
    },
    /// Not a ClientHello that can be routed.
    Refused(NotRoutable),
}

/// Why a connection's first bytes cannot be routed by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotRoutable {
    /// The first bytes are not a TLS handshake record (plain HTTP, say).
    #[error("not TLS")]
    NotTls,
    /// A TLS record or ClientHello that does not parse.
    #[error("a malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// More than [`MAX_CLIENT_HELLO`] bytes without a whole ClientHello.
    #[error("a ClientHello over {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    /// The server name is not a DNS name.
    #[error("a server name that is not a DNS name")]
    BadServerName,
}

/// Reads a ClientHello's server name from bytes fed as they arrive (see the [module](self)).
#[derive(Debug, Default)]
pub struct ServerNameReader {
    /// Bytes fed so far.
    fed: usize,
    /// The current record's header, as far as it has come.
    header: [u8; RECORD_HEADER],
    header_len: usize,
    /// Bytes of the current record's fragment still to come.
    fragment_left: usize,
    /// The handshake messages' bytes, reassembled from the records' fragments.
    handshake: Vec<u8>,
    /// The answer, once there is one.
    decided: Option<Preread>,
}

impl ServerNameReader {
    /// A reader at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next bytes of the connection; the answer so far. Once decided, the answer
    /// stays and further bytes are not looked at.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Preread {
        while self.decided.is_none() && !bytes.is_empty() {
            if self.fed >= MAX_CLIENT_HELLO {
                self.decided = Some(Preread::Refused(NotRoutable::TooLarge));
                break;
            }
            let room = MAX_CLIENT_HELLO - self.fed;
            if self.fragment_left == 0 {
                // A record header, byte by byte.
                let take = (RECORD_HEADER - self.header_len).min(bytes.len()).min(room);
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                self.fed += take;
                bytes = &bytes[take..];
                if let Some(refused) = self.check_header() {
                    self.decided = Some(Preread::Refused(refused));
                }
                continue;
            }
            let take = self.fragment_left.min(bytes.len()).min(room);
            self.handshake.extend_from_slice(&bytes[..take]);
            self.fragment_left -= take;
            self.fed += take;
            bytes = &bytes[take..];
            self.decided = self.check_handshake();
        }
        self.decided.clone().unwrap_or(Preread::NeedMore)
    }

    /// Looks at the record header read so far; starts its fragment once it is whole.
    fn check_header(&mut self) -> Option<NotRoutable> {
        let header = &self.header[..self.header_len];
        if header.first().is_some_and(|&t| t != HANDSHAKE) {
            return Some(NotRoutable::NotTls);
        }
        if header.get(1).is_some_and(|&major| major != 0x03) {
            return Some(NotRoutable::NotTls);
        }
        if self.header_len < RECORD_HEADER {
            return None;
        }
        let length = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        if length == 0 || length > MAX_FRAGMENT {
            return Some(NotRoutable::Malformed("a record length out of range"));
        }
        self.header_len = 0;
        self.fragment_left = length;
        None
    }

    /// Whether the reassembled handshake bytes hold a whole ClientHello yet, and what it says.
    fn check_handshake(&self) -> Option<Preread> {
        let hs = &self.handshake;
        if hs.first().is_some_and(|&t| t != CLIENT_HELLO) {
            return Some(Preread::Refused(NotRoutable::Malformed("not a ClientHello")));
        }
        if hs.len() < 4 {
            return None;
        }
        let length = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
        if length > MAX_CLIENT_HELLO {
            return Some(Preread::Refused(NotRoutable::TooLarge));
        }
        if hs.len() < 4 + length {
            return None;
        }
        Some(match server_name(&hs[4..4 + length]) {
            Ok(server_name) => Preread::ClientHello { server_name },
            Err(refused) => Preread::Refused(refused),
        })
    }
}

/// Reads a ClientHello body (after its four-byte handshake header) as far as its server name.
fn server_name(body: &[u8]) -> Result<Option<String>, NotRoutable> {
    let mut body = Cursor(body);
    body.skip(2, "no version")?;
    body.skip(32, "no random")?;
    let session_id = body.vector(1, "no session id")?;
    if session_id.len() > 32 {
        return Err(NotRoutable::Malformed("a session id over 32 bytes"));
    }
    body.vector(2, "no cipher suites")?;
    body.vector(1, "no compression methods")?;
    if body.0.is_empty() {
        return Ok(None); // no extensions at all
    }
    let mut extensions = Cursor(body.vector(2, "extensions cut short")?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16("an extension cut short")?;
        let data = extensions.vector(2, "an extension cut short")?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut list = Cursor(Cursor(data).vector(2, "a server name list cut short")?);
        while !list.0.is_empty() {
            let name_type = list.u8("a server name cut short")?;
            let name = list.vector(2, "a server name cut short")?;
            if name_type != HOST_NAME {
                continue;
            }
            let name = std::str::from_utf8(name).map_err(|_| NotRoutable::BadServerName)?;
            return normalize_dns_name(name).map(Some).map_err(|_| NotRoutable::BadServerName);
        }
        return Ok(None);
    }
    Ok(None)
}

/// Big-endian reads off the front of a slice, each failing with what was missing.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, missing: &'static str) -> Result<&'a [u8], NotRoutable> {
        if self.0.len() < n {
            return Err(NotRoutable::Malformed(missing));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn skip(&mut self, n: usize, missing: &'static str) -> Result<(), NotRoutable> {
        self.take(n, missing).map(drop)
    }

    fn u8(&mut self, missing: &'static str) -> Result<u8, NotRoutable> {
        Ok(self.take(1, missing)?[0])
    }

    fn u16(&mut self, missing: &'static str) -> Result<u16, NotRoutable> {
        let bytes = self.take(2, missing)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A vector whose length prefix is `prefix` (1 or 2) bytes.
    fn vector(&mut self, prefix: usize, missing: &'static str) -> Result<&'a [u8], NotRoutable> {
        let length = match prefix {
            1 => usize::from(self.u8(missing)?),
            _ => usize::from(self.u16(missing)?),
        };
        self.take(length, missing)
    }
}

/// Server names and what claims each: exact names, and one-label wildcards (`*.example.com`
/// matches `a.example.com`, not `example.com` nor `a.b.example.com`). An exact name beats a
/// wildcard.
#[derive(Debug, Clone)]
pub struct ServerNames<T> {
    exact: HashMap<String, T>,
    /// By the domain under the `*.`.
    wildcard: HashMap<String, T>,
}

impl<T> Default for ServerNames<T> {
    fn default() -> Self {
        Self { exact: HashMap::new(), wildcard: HashMap::new() }
    }
}

/// Why a server name cannot be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Not a DNS name, or a wildcard other than one leading `*.` label.
    #[error("`{0}` is not a server name (a DNS name, or `*.` and a DNS name)")]
    Invalid(String),
    /// Claimed already.
    #[error("`{0}` is claimed twice")]
    Taken(String),
}

impl<T> ServerNames<T> {
    /// Names `name` (as written in a configuration) for `claimant`; the name as stored.
    pub fn claim(&mut self, name: &str, claimant: T) -> Result<String, ClaimError> {
        let invalid = || ClaimError::Invalid(name.to_owned());
        let (table, key, shown) = match name.strip_prefix("*.") {
            Some(domain) => {
                let domain = normalize_dns_name(domain).map_err(|_| invalid())?;
                let shown = format!("*.{domain}");
                (&mut self.wildcard, domain, shown)
            }
            None if name.contains('*') => return Err(invalid()),
            None => {
                let exact = normalize_dns_name(name).map_err(|_| invalid())?;
                (&mut self.exact, exact.clone(), exact)
            }
        };
        if table.contains_key(&key) {
            return Err(ClaimError::Taken(shown));
        }
        table.insert(key, claimant);
        Ok(shown)
    }

    /// What claims `name` (a name as [`ServerNameReader`] returns it: lowercase, no trailing
    /// dot).
    pub fn route(&self, name: &str) -> Option<&T> {
        self.exact.get(name).or_else(|| {
            let (_, domain) = name.split_once('.')?;
            self.wildcard.get(domain)
        })
    }

    /// What claimed `name` as [`claim`](Self::claim) stored it (`*.` and a domain for a
    /// wildcard).
    pub fn claimant(&self, name: &str) -> Option<&T> {
        match name.strip_prefix("*.") {
            Some(domain) => self.wildcard.get(domain),
            None => self.exact.get(name),
        }
    }

    /// Whether no name is claimed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

/// Whether `name` (lowercase, no trailing dot) is `pattern` (a name as [`ServerNames::claim`]
/// stores it: exact, or `*.` and a domain, matching one label under it).
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => name.split_once('.').is_some_and(|(_, rest)| rest == domain),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` as a big-endian u16 (test inputs are small).
    fn be16(n: usize) -> [u8; 2] {
        u16::try_from(n).expect("a small length").to_be_bytes()
    }
    use proptest::prelude::*;

    /// A ClientHello naming `name` (none: no server_name extension), as one record, with an
    /// extension before and after the server name like real clients send.
    pub(crate) fn client_hello(name: Option<&str>) -> Vec<u8> {
        let mut extensions = Vec::new();
        // supported_versions (TLS 1.3, 1.2).
        extensions.extend_from_slice(&[0x00, 0x2b, 0x00, 0x05, 0x04, 0x03, 0x04, 0x03, 0x03]);
        if let Some(name) = name {
            let name = name.as_bytes();
            let entry_len = 3 + name.len();
            extensions.extend_from_slice(&[0x00, 0x00]);
            extensions.extend_from_slice(&be16(entry_len + 2));
            extensions.extend_from_slice(&be16(entry_len));
            extensions.push(HOST_NAME);
            extensions.extend_from_slice(&be16(name.len()));
            extensions.extend_from_slice(name);
        }
        // ALPN h2.
        extensions.extend_from_slice(&[0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2']);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(32);
        body.extend_from_slice(&[9u8; 32]);
        body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(&be16(extensions.len()));
        body.extend_from_slice(&extensions);
        let mut handshake = vec![CLIENT_HELLO];
        handshake.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        records(&handshake, MAX_FRAGMENT)
    }

    /// `handshake` cut into records of at most `fragment` bytes.
    fn records(handshake: &[u8], fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in handshake.chunks(fragment) {
            out.extend_from_slice(&[HANDSHAKE, 0x03, 0x01]);
            out.extend_from_slice(&be16(piece.len()));
            out.extend_from_slice(piece);
        }
        out
    }

    fn named(name: &str) -> Preread {
        Preread::ClientHello { server_name: Some(name.to_owned()) }
    }

    #[test]
    fn the_name_is_read_whole_or_byte_by_byte() {
        let hello = client_hello(Some("Contoso-KV.vault.azure.net."));
        assert_eq!(ServerNameReader::new().feed(&hello), named("contoso-kv.vault.azure.net"));
        let mut reader = ServerNameReader::new();
        for (i, byte) in hello.iter().enumerate() {
            let answer = reader.feed(std::slice::from_ref(byte));
            if i + 1 < hello.len() {
                assert_eq!(answer, Preread::NeedMore, "after {} of {} bytes", i + 1, hello.len());
            } else {
                assert_eq!(answer, named("contoso-kv.vault.azure.net"));
            }
        }
    }

    #[test]
    fn a_client_hello_over_several_records_is_reassembled() {
        let one = client_hello(Some("a.example.com"));
        let handshake = &one[RECORD_HEADER..];
        for fragment in [1, 7, 64] {
            let split = records(handshake, fragment);
            assert_eq!(ServerNameReader::new().feed(&split), named("a.example.com"), "{fragment}");
        }
    }

    #[test]
    fn what_cannot_be_routed_says_why() {
        let refused = |bytes: &[u8]| ServerNameReader::new().feed(bytes);
        assert_eq!(refused(b"GET / HTTP/1.1\r\n"), Preread::Refused(NotRoutable::NotTls));
        assert_eq!(refused(&[0x16, 0x02]), Preread::Refused(NotRoutable::NotTls));
        assert_eq!(refused(&[0x16, 0x03, 0x01]), Preread::NeedMore);
        assert_eq!(
            ServerNameReader::new().feed(&client_hello(None)),
            Preread::ClientHello { server_name: None }
        );
        // A server hello (type 2) where a ClientHello belongs.
        assert!(matches!(
            refused(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]),
            Preread::Refused(NotRoutable::Malformed(_))
        ));
        // A handshake that claims more than the bound.
        assert_eq!(
            refused(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x01, 0x01, 0x00, 0x00]),
            Preread::Refused(NotRoutable::TooLarge)
        );
        // Endless small records that never finish a ClientHello of 16 KiB − 1.
        let mut reader = ServerNameReader::new();
        let start = [0x16, 0x03, 0x03, 0x00, 0x04, 0x01, 0x00, 0x3f, 0xff];
        assert_eq!(reader.feed(&start), Preread::NeedMore);
        let mut answer = Preread::NeedMore;
        for _ in 0..MAX_CLIENT_HELLO {
            answer = reader.feed(&[0x16, 0x03, 0x03, 0x00, 0x01, 0x00]);
            if answer != Preread::NeedMore {
                break;
            }
        }
        assert_eq!(answer, Preread::Refused(NotRoutable::TooLarge));
        // A name that is not a DNS name.
        assert_eq!(
            refused(&client_hello(Some("bad name"))),
            Preread::Refused(NotRoutable::BadServerName)
        );
        // A ClientHello cut inside its extensions (its declared length is whole); the reader
        // stops at the server name, so the damage is in an extension it has to read past.
        let mut cut = client_hello(None);
        let len = cut.len();
        cut[len - 6] = 0xff; // the last extension (ALPN, 5 bytes) claims 255
        assert!(matches!(refused(&cut), Preread::Refused(NotRoutable::Malformed(_))));
    }

    #[test]
    fn exact_names_beat_one_label_wildcards() {
        let mut names = ServerNames::default();
        assert_eq!(names.claim("*.vault.azure.net", "any").as_deref(), Ok("*.vault.azure.net"));
        assert_eq!(
            names.claim("Contoso-KV.vault.azure.net", "contoso").as_deref(),
            Ok("contoso-kv.vault.azure.net")
        );
        assert_eq!(names.route("contoso-kv.vault.azure.net"), Some(&"contoso"));
        assert_eq!(names.route("fabrikam.vault.azure.net"), Some(&"any"));
        assert_eq!(names.route("a.b.vault.azure.net"), None, "one label only");
        assert_eq!(names.route("vault.azure.net"), None);
        assert_eq!(names.claimant("*.vault.azure.net"), Some(&"any"));
        assert_eq!(names.claimant("contoso-kv.vault.azure.net"), Some(&"contoso"));
        assert_eq!(
            names.claim("contoso-kv.vault.azure.net", "again"),
            Err(ClaimError::Taken("contoso-kv.vault.azure.net".into()))
        );
        assert_eq!(
            names.claim("*.Vault.azure.net", "again"),
            Err(ClaimError::Taken("*.vault.azure.net".into()))
        );
        assert!(matches("*.vault.azure.net", "x.vault.azure.net"));
        assert!(!matches("*.vault.azure.net", "vault.azure.net"));
        assert!(!matches("*.vault.azure.net", "a.b.vault.azure.net"));
        assert!(
            matches("a.example.com", "a.example.com") && !matches("a.example.com", "b.example.com")
        );
        for bad in ["a.*.example.com", "*", "*.", "**.example.com", "bad name"] {
            assert!(matches!(names.claim(bad, "x"), Err(ClaimError::Invalid(_))), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_in_any_pieces_never_panic_or_pass_the_bound(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            cut in 1usize..64,
        ) {
            let mut reader = ServerNameReader::new();
            for piece in bytes.chunks(cut) {
                if reader.feed(piece) != Preread::NeedMore {
                    break;
                }
            }
            prop_assert!(reader.handshake.len() <= MAX_CLIENT_HELLO);
        }

        #[test]
        fn a_real_shape_is_read_however_it_is_cut(
            name in "[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\\.[a-z][a-z0-9]{0,10}){1,3}",
            fragment in 1usize..300,
            cut in 1usize..100,
        ) {
            let one = client_hello(Some(&name));
            let split = records(&one[RECORD_HEADER..], fragment);
            let mut reader = ServerNameReader::new();
            let mut answer = Preread::NeedMore;
            for piece in split.chunks(cut) {
                answer = reader.feed(piece);
            }
            prop_assert_eq!(answer, named(&name));
        }
    }
}
