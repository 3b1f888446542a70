//! `privlink token new`: a new connector token, and the digest the relay stores instead;
//! `privlink token hash`: that digest again, for a token file that exists.

use std::path::Path;

use anyhow::Context as _;

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use privlink_protocol::token::{TokenDigest, hex};

use crate::cmd::certs::write_private_file;

/// Bytes of randomness in a connector token (256 bits).
const TOKEN_BYTES: usize = 32;

/// A new random connector token.
pub(crate) fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(format!("plk_{}", hex(&bytes)))
}

/// The `token_sha256 = "…"` line relay.toml needs for `token`.
fn hash_line(token: &str) -> String {
    format!("token_sha256 = \"{}\"", TokenDigest::of(token.as_bytes()).to_hex())
}

/// `privlink token hash FILE`: the hash line of the token in an existing token file (read as
/// the agent reads its `token_file`), so that a relay.toml can be written again without a new
/// token.
pub(crate) fn hash(file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the token file {}", file.display()))?;
    let token = privlink_protocol::token::token_in_file(&text)
        .map_err(|problem| anyhow::anyhow!("{}: {problem}", file.display()))?;
    println!("{}", hash_line(token));
    Ok(())
}

/// `privlink token new [--out FILE [--force]]`.
pub(crate) fn new(out: Option<&Path>, force: bool) -> anyhow::Result<()> {
    let token = new_token()?;
    let hash_line = hash_line(&token);
    if let Some(path) = out {
        write_private_file(path, &format!("{token}\n"), force)?;
        eprintln!(
            "Wrote the token to {} (mode 0600): point the agent's token_file at it. For the \
             [[connector]] table in relay.toml (the relay stores only this hash):",
            path.display()
        );
        println!("{hash_line}");
        return Ok(());
    }
    println!(
        "# Connector token: give it to the agent (token_file or PRIVLINK_TOKEN). It is shown once."
    );
    println!("{token}");
    println!("# For the [[connector]] table in relay.toml (the relay stores only this hash):");
    println!("{hash_line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_like_the_relay() {
        let a = new_token().expect("token");
        let b = new_token().expect("token");
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 2 * TOKEN_BYTES);
        let digest = TokenDigest::of(a.as_bytes()).to_hex();
        assert_eq!(TokenDigest::from_hex(&digest), Some(TokenDigest::of(a.as_bytes())));
    }
}
