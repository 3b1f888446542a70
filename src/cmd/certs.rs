//! `privlink certs init`: a private CA and a relay certificate for first deployments.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use privlink_transport::pki::CertificateAuthority;

pub(crate) fn init(dir: &Path, extra_names: &[String], force: bool) -> anyhow::Result<()> {
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
