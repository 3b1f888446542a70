//! `privlink token new` and `privlink certs init`: the secrets a first deployment needs.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use privlink_protocol::pki::CertificateAuthority;
use ring::rand::{SecureRandom as _, SystemRandom};

/// Bytes of randomness in a connector token (256 bits).
const TOKEN_BYTES: usize = 32;

/// Lowercase hex of `bytes`. Hand-written: a few lines do not justify a dependency.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A new random connector token.
pub(crate) fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(format!("plk_{}", hex(&bytes)))
}

/// The relay.toml value for a token.
pub(crate) fn token_sha256(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

pub(crate) fn token_new() -> anyhow::Result<()> {
    let token = new_token()?;
    println!(
        "# Connector token: give it to the agent (token_file or PRIVLINK_TOKEN). It is shown once."
    );
    println!("{token}");
    println!("# For the [[connector]] table in relay.toml (the relay stores only this hash):");
    println!("token_sha256 = \"{}\"", token_sha256(&token));
    Ok(())
}

pub(crate) fn certs_init(dir: &Path, extra_names: &[String], force: bool) -> anyhow::Result<()> {
    let files = ["ca.crt", "ca.key", "relay.crt", "relay.key"];
    if !force {
        if let Some(existing) = files.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
            bail!("{} already exists; pass --force to overwrite", existing.display());
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = CertificateAuthority::new("privlink private CA").context("creating the CA")?;
    let mut names: Vec<&str> = vec!["localhost", "127.0.0.1", "::1"];
    names.extend(extra_names.iter().map(String::as_str));
    let relay = ca.issue_server(&names).context("issuing the relay certificate")?;
    write_file(&dir.join("ca.crt"), &ca.identity.cert_pem, 0o644)?;
    write_file(&dir.join("ca.key"), &ca.identity.key_pem, 0o600)?;
    write_file(&dir.join("relay.crt"), &relay.cert_pem, 0o644)?;
    write_file(&dir.join("relay.key"), &relay.key_pem, 0o600)?;
    println!("Wrote {}/{{ca.crt,ca.key,relay.crt,relay.key}}.", dir.display());
    println!("Relay certificate names: {}", names.join(", "));
    println!(
        "relay.toml: [tunnel] cert = \"relay.crt\", key = \"relay.key\"; agent.toml: relay_ca = \"ca.crt\"."
    );
    println!("Keep ca.key offline; the agent needs only ca.crt.");
    Ok(())
}

/// Writes a file with the given mode (keys are created 0600 and never world-readable).
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
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
        let digest = token_sha256(&a);
        assert_eq!(
            privlink_relay::config::parse_sha256_hex(&digest),
            Some(privlink_relay::auth::token_digest(a.as_bytes()))
        );
    }
}
