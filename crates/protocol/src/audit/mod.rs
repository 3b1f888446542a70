//! The audit trail's record format and hash chain, sans-IO: sealing a record (its line, with
//! `prev` and `hash`) and checking a sequence of lines, possibly across rotated files, for the
//! first one that does not follow — edited, deleted, reordered, inserted, or a file missing.
//!
//! A record is one JSON object on one line whose last field is `"hash"`:
//! `{"seq":7,"time":"…","code":"PL3001","event":"connection.opened",…,"prev":"<hex>","hash":"<hex>"}`.
//! Its *body* is the line with `,"hash":"…"` taken out — exactly the bytes written, so that the
//! check needs no JSON canonicalisation, only the line as it is on disk. `hash` is SHA-256 of
//! the body (HMAC-SHA256 with the trail's key when it has one); the body holds `prev`, the
//! previous record's hash (64 zeros for the first record of a trail), and `seq`, one more than
//! the previous record's. A rotated file's first record continues the chain of the file before.
//!
//! * [`record`] — the stable event codes and a record's fields as they are written.
//! * [`settings`] — the `[audit]` table both roles share.

pub mod record;
pub mod settings;

use std::fmt;

use aws_lc_rs::{digest, hmac};

use crate::token::hex;

/// What the status API and `/metrics` show of a trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailStatus {
    /// The current file.
    pub path: std::path::PathBuf,
    /// The last record written: its seq and hash.
    pub last_seq: u64,
    /// Its hash, hex.
    pub last_hash: String,
    /// Records written, by code (in [`record::Code::ALL`] order).
    pub written: Vec<(record::Code, u64)>,
    /// Records lost since start (queue full, or the disk failed).
    pub lost: u64,
    /// Whether the last write failed.
    pub failing: bool,
    /// Whether new connections are refused while records cannot be written.
    pub require: bool,
}

/// `prev` of a trail's first record.
pub const GENESIS: Digest = Digest([0; 32]);

/// A record's hash (or `prev`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Digest {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        crate::token::TokenDigest::from_hex(text).map(|d| Self(d.into_bytes()))
    }
}

/// How records are sealed: plain SHA-256, or HMAC-SHA256 with the trail's key (then a record
/// cannot be forged, even recomputing the whole chain, without the key).
pub enum Sealer {
    /// SHA-256 of the body.
    Sha256,
    /// HMAC-SHA256 of the body with this key (boxed: aws-lc-rs keeps the whole HMAC context,
    /// over a kilobyte, in its key).
    Hmac(Box<hmac::Key>),
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sha256 => "Sealer::Sha256",
            Self::Hmac(_) => "Sealer::Hmac(<key>)",
        })
    }
}

impl Sealer {
    /// A sealer keyed with `key`'s bytes.
    pub fn keyed(key: &[u8]) -> Self {
        Self::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, key)))
    }

    fn seal(&self, body: &[u8]) -> Digest {
        let mut out = [0u8; 32];
        match self {
            Self::Sha256 => out.copy_from_slice(digest::digest(&digest::SHA256, body).as_ref()),
            Self::Hmac(key) => out.copy_from_slice(hmac::sign(key, body).as_ref()),
        }
        Digest(out)
    }
}

/// The chain's state on the writing side: the next record's `seq` and `prev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// The next record's sequence number.
    pub seq: u64,
    /// The last record's hash.
    pub prev: Digest,
}

impl Default for ChainHead {
    fn default() -> Self {
        Self { seq: 1, prev: GENESIS }
    }
}

/// The marker that ends a body and begins the hash field.
const HASH_FIELD: &str = ",\"hash\":\"";

impl ChainHead {
    /// The head that continues a trail whose last record is `line` (a restarted process goes
    /// on with the chain it left): the record must check under `sealer`.
    pub fn after(sealer: &Sealer, line: &str) -> Result<Self, Break> {
        let mut check = ChainCheck::new();
        check.next(sealer, line, true)?;
        let (seq, prev) = check.last.unwrap_or((0, GENESIS));
        Ok(Self { seq: seq + 1, prev })
    }

    /// Seals one record: `fields` is the JSON text of its other fields (`"code":"PL3001",…`,
    /// without braces, already escaped by the caller's JSON writer), `time` its RFC 3339 time.
    /// Returns the whole line (without the newline) and advances the head.
    pub fn seal(&mut self, sealer: &Sealer, time: &str, fields: &str) -> String {
        use fmt::Write as _;
        // seq, time, two digests and the punctuation: under 240 bytes besides the fields.
        let mut line = String::with_capacity(fields.len() + 240);
        // Writing into a String cannot fail.
        let _ = write!(line, "{{\"seq\":{},\"time\":\"{time}\"", self.seq);
        if !fields.is_empty() {
            line.push(',');
            line.push_str(fields);
        }
        let _ = write!(line, ",\"prev\":\"{}\"", self.prev);
        let body_end = line.len();
        line.push('}');
        let hash = sealer.seal(line.as_bytes());
        line.truncate(body_end);
        let _ = write!(line, "{HASH_FIELD}{hash}\"}}");
        self.seq += 1;
        self.prev = hash;
        line
    }
}

/// Why a line does not follow the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    /// Not a sealed record (no hash at its end, no seq or prev, not one line of JSON).
    #[error("not a sealed record: {0}")]
    Malformed(String),
    /// Its hash is not the hash of its bytes: edited.
    #[error("its hash does not match its content: the record was changed")]
    Edited,
    /// Its `prev` is not the previous record's hash, or its `seq` does not follow: a record
    /// before it was deleted, or records were reordered, inserted or a file is missing.
    #[error(
        "does not follow the record before it (seq {seq} after {after}, prev {prev}): a record or file before it is missing, or records were reordered or inserted"
    )]
    Unlinked {
        /// Its seq.
        seq: u64,
        /// The previous record's seq.
        after: u64,
        /// Its prev, shortened.
        prev: String,
    },
}

/// The chain's state on the checking side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainCheck {
    /// The last record checked (`None` before the first).
    pub last: Option<(u64, Digest)>,
}

impl Default for ChainCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainCheck {
    /// A check from the start of a trail (the first record's `prev` must be [`GENESIS`]).
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Checks the next line (without its newline); on success it is the new last record.
    /// `from_anywhere`: the first line may continue a chain this check did not see (the files
    /// before it were not given); it is then taken as it is.
    pub fn next(&mut self, sealer: &Sealer, line: &str, from_anywhere: bool) -> Result<u64, Break> {
        let (body, hash) = split(line)?;
        let (seq, prev) = seq_and_prev(&body)?;
        if sealer.seal(body.as_bytes()) != hash {
            return Err(Break::Edited);
        }
        let follows = match self.last {
            Some((last_seq, last_hash)) => seq == last_seq + 1 && prev == last_hash,
            None => from_anywhere || (seq == 1 && prev == GENESIS),
        };
        if !follows {
            return Err(Break::Unlinked {
                seq,
                after: self.last.map_or(0, |(s, _)| s),
                prev: prev.to_string()[..12].to_owned(),
            });
        }
        self.last = Some((seq, hash));
        Ok(seq)
    }
}

/// A line's body (its bytes with the hash field taken out) and its hash.
fn split(line: &str) -> Result<(String, Digest), Break> {
    let at = line
        .rfind(HASH_FIELD)
        .ok_or_else(|| Break::Malformed("no hash field at its end".into()))?;
    let rest = &line[at + HASH_FIELD.len()..];
    let hex = rest
        .strip_suffix("\"}")
        .ok_or_else(|| Break::Malformed("the hash is not its last field".into()))?;
    let hash = Digest::from_hex(hex)
        .ok_or_else(|| Break::Malformed("the hash is not 64 hex digits".into()))?;
    Ok((format!("{}}}", &line[..at]), hash))
}

/// `seq` (the first field) and `prev` (the last field) of a body, read from the bytes as
/// [`ChainHead::seal`] writes them.
fn seq_and_prev(body: &str) -> Result<(u64, Digest), Break> {
    let seq = body
        .strip_prefix("{\"seq\":")
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Break::Malformed("no seq as its first field".into()))?;
    let prev = body
        .strip_suffix("\"}")
        .and_then(|rest| rest.rsplit_once(",\"prev\":\""))
        .and_then(|(_, hex)| Digest::from_hex(hex))
        .ok_or_else(|| Break::Malformed("no prev before its hash".into()))?;
    Ok((seq, prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(sealer: &Sealer, n: usize) -> Vec<String> {
        let mut head = ChainHead::default();
        (0..n)
            .map(|i| {
                let fields =
                    format!("\"code\":\"PL3001\",\"event\":\"connection.opened\",\"n\":{i}");
                head.seal(sealer, "2026-12-07T11:00:00Z", &fields)
            })
            .collect()
    }

    fn check(sealer: &Sealer, lines: &[String]) -> Result<u64, (usize, Break)> {
        let mut chain = ChainCheck::new();
        let mut last = 0;
        for (i, line) in lines.iter().enumerate() {
            last = chain.next(sealer, line, false).map_err(|e| (i, e))?;
        }
        Ok(last)
    }

    #[test]
    fn a_sealed_trail_checks_and_each_tampering_is_found_at_its_record() {
        let sealer = Sealer::Sha256;
        let lines = trail(&sealer, 6);
        assert!(lines[0].starts_with("{\"seq\":1,\"time\":\"2026-12-07T11:00:00Z\",\"code\""));
        assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_ok(), "{}", lines[0]);
        assert_eq!(check(&sealer, &lines), Ok(6));

        let mut edited = lines.clone();
        edited[3] = edited[3].replace("\"n\":3", "\"n\":4");
        assert_eq!(check(&sealer, &edited), Err((3, Break::Edited)));

        let mut deleted = lines.clone();
        deleted.remove(2);
        assert!(matches!(check(&sealer, &deleted), Err((2, Break::Unlinked { seq: 4, .. }))));

        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert!(matches!(check(&sealer, &swapped), Err((1, Break::Unlinked { .. }))));

        let mut inserted = lines.clone();
        inserted.insert(4, trail(&sealer, 1).remove(0));
        assert!(matches!(check(&sealer, &inserted), Err((4, Break::Unlinked { .. }))));

        let mut garbage = lines.clone();
        garbage.insert(1, "not a record".to_owned());
        assert!(matches!(check(&sealer, &garbage), Err((1, Break::Malformed(_)))));
    }

    #[test]
    fn rotation_continues_the_chain_and_a_missing_file_breaks_it() {
        let sealer = Sealer::Sha256;
        let lines = trail(&sealer, 9);
        let files = [&lines[..3], &lines[3..6], &lines[6..]];
        let mut chain = ChainCheck::new();
        for file in files {
            for line in file {
                chain.next(&sealer, line, false).expect("follows");
            }
        }
        let mut chain = ChainCheck::new();
        for line in files[0].iter().chain(files[2]) {
            if let Err(e) = chain.next(&sealer, line, false) {
                assert!(matches!(e, Break::Unlinked { seq: 7, after: 3, .. }), "{e}");
                return;
            }
        }
        panic!("a missing file went unnoticed");
    }

    #[test]
    fn a_restarted_writer_continues_the_chain() {
        let sealer = Sealer::Sha256;
        let mut lines = trail(&sealer, 3);
        let mut head = ChainHead::after(&sealer, &lines[2]).expect("resumes");
        assert_eq!(head.seq, 4);
        lines.push(head.seal(&sealer, "t", "\"code\":\"PL0001\""));
        assert_eq!(check(&sealer, &lines), Ok(4));
        let keyed = Sealer::keyed(b"0123456789abcdef0123456789abcdef");
        assert_eq!(ChainHead::after(&keyed, &lines[3]), Err(Break::Edited));
    }

    #[test]
    fn a_keyed_trail_cannot_be_recomputed_without_the_key() {
        let keyed = Sealer::keyed(b"0123456789abcdef0123456789abcdef");
        let lines = trail(&keyed, 3);
        assert_eq!(check(&keyed, &lines), Ok(3));
        // Recomputed with plain SHA-256 (what a forger without the key can do), it fails.
        assert_eq!(check(&keyed, &trail(&Sealer::Sha256, 3)), Err((0, Break::Edited)));
    }
}
