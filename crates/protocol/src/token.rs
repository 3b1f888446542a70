//! Connector tokens and their SHA-256 digests. A token's bytes never appear in `Debug` output
//! or logs; the relay stores only the digest and compares digests in constant time.

use std::fmt;

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// A connector token. Its bytes never appear in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps a token string.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token's bytes, for hashing. Never log them.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The SHA-256 of a token's bytes: what `relay.toml` holds as `token_sha256`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// All zeros: a digest no token is known to have, for comparing against when there is
    /// nothing to compare with (so that timing does not tell the cases apart).
    pub const ZERO: Self = Self([0; 32]);

    /// The digest of `token`.
    pub fn of(token: &[u8]) -> Self {
        let hash = digest::digest(&digest::SHA256, token);
        let mut out = [0u8; 32];
        out.copy_from_slice(hash.as_ref());
        Self(out)
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        Some(Self(out))
    }

    /// The digest's 32 bytes.
    pub fn into_bytes(self) -> [u8; 32] {
        self.0
    }

    /// Lowercase hex, as `relay.toml` writes it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Whether `presented` hashes to this digest, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        Self::of(presented).0.ct_eq(&self.0).into()
    }

    /// Whether `presented` hashes to any of `digests` (a connector mid-rotation holds the old
    /// token's and the new one's): hashed once, compared with every digest in constant time,
    /// all of them whatever matched, so timing tells neither which nor whether.
    pub fn any_matches(digests: &[Self], presented: &[u8]) -> bool {
        let presented = Self::of(presented);
        let mut matched = subtle::Choice::from(0);
        for digest in digests {
            matched |= presented.0.ct_eq(&digest.0);
        }
        matched.into()
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({})", self.to_hex())
    }
}

/// Lowercase hex of `bytes`. Hand-written: a few lines do not justify a hex crate.
pub fn hex(bytes: &[u8]) -> String {
    // A table, not `write!("{b:02x}")` per byte: every audit record writes two digests, and
    // the formatter's padding machinery made that a third of sealing one.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// The token in a token file: the file holds the token and nothing else (a trailing newline is
/// fine).
pub fn token_in_file(text: &str) -> Result<&str, String> {
    let token = text.trim();
    if token.is_empty() {
        return Err("the file is empty".to_owned());
    }
    if token.contains(char::is_whitespace) {
        return Err(
            "the file must hold only the token, on one line; `privlink token new --out FILE` \
             writes such a file (its other output, the comments and the token_sha256 line, is \
             not part of the token)"
                .to_owned(),
        );
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_vector() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = TokenDigest::of(b"abc");
        assert!(abc.to_hex().starts_with("ba7816bf"));
        assert_eq!(TokenDigest::from_hex(&abc.to_hex()), Some(abc));
    }

    #[test]
    fn hex_digests_are_strict() {
        let good = "a".repeat(64);
        assert!(TokenDigest::from_hex(&good).is_some());
        for bad in ["A".repeat(64), "a".repeat(63), "a".repeat(65), format!("{}g", "a".repeat(63))]
        {
            assert!(TokenDigest::from_hex(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn digests_match_only_their_token() {
        let digest = TokenDigest::of(b"right");
        assert!(digest.matches(b"right"));
        assert!(!digest.matches(b"wrong"));
        assert!(!format!("{:?}", Token::new("topsecretvalue")).contains("topsecretvalue"));
    }
}
