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
    let ca =
        CertificateAuthority::new_distinct("privlink private CA").context("creating the CA")?;
    let mut names: Vec<&str> = vec!["localhost", "127.0.0.1", "::1"];
    names.extend(extra_names.iter().map(String::as_str));
    let relay = ca.issue_server(&names).context("issuing the relay certificate")?;
    write_file(&dir.join("ca.crt"), &ca.identity.cert_pem, 0o644)?;
    write_private_file(&dir.join("ca.key"), &ca.identity.key_pem, force)?;
    write_file(&dir.join("relay.crt"), &relay.cert_pem, 0o644)?;
    write_private_file(&dir.join("relay.key"), &relay.key_pem, force)?;
    println!("Wrote {}/{{ca.crt,ca.key,relay.crt,relay.key}}.", dir.display());
    println!("Relay certificate names: {}", names.join(", "));
    // Absolute paths: a config file resolves relative paths against its own directory, which
    // is rarely the directory this command ran in.
    let shown = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let shown = shown.display();
    println!("relay.toml [tunnel]: cert = \"{shown}/relay.crt\"  key = \"{shown}/relay.key\"");
    println!("agent.toml: relay_ca = \"{shown}/ca.crt\"");
    println!("Keep ca.key offline; the agent needs only ca.crt.");
    Ok(())
}

/// Writes a private file (a key, a token) with mode 0600: the contents go to a new file next
/// to `path`, created exclusively (a planted file or symbolic link there makes it fail, it is
/// never followed), which then takes `path`'s place — by a rename with `overwrite`, otherwise
/// by a hard link, which fails if `path` exists (no window between a check and the write). An
/// existing file's permissions are therefore never inherited.
pub(crate) fn write_private_file(
    path: &Path,
    contents: &str,
    overwrite: bool,
) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name =
        path.file_name().with_context(|| format!("{} is not a file name", path.display()))?;
    let temp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut file =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        if overwrite { fs::rename(&temp, path) } else { fs::hard_link(&temp, path) }
    })();
    let _ = fs::remove_file(&temp);
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} already exists; pass --force to overwrite", path.display())
        }
        other => other.with_context(|| format!("writing {}", path.display())),
    }
}

/// Writes a public file with the given mode.
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
