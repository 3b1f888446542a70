//! One module per command: each turns its arguments into a running service or a printed
//! result, on top of the library crates.

pub(crate) mod agent;
pub(crate) mod audit;
pub(crate) mod certs;
pub(crate) mod check;
pub(crate) mod demo;
pub(crate) mod relay;
pub(crate) mod status;
pub(crate) mod token;

/// Something the command needs could not be reached (exit code 69).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unavailable(pub(crate) String);

/// An invalid configuration the command has shown already (as a failed `check` step): exit 64
/// without printing it a second time.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration (shown above)")]
pub(crate) struct ConfigShown;

/// How often a config file is read to see whether it changed.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Calls `reload` on SIGHUP, and when the content of the config file or of one of the files it
/// names (`source_files`: a certificate renewed in place, a rotated token file) differs from
/// what was last read, until `stop`. Files are read every [`WATCH_INTERVAL`]; comparing content,
/// not timestamps, also sees a Kubernetes ConfigMap or Secret swapped in through a symlink.
/// `reload` returns the applied configuration's source files, or `None` when it changed
/// nothing (the files watched stay those of the configuration in force).
pub(crate) fn watch_config(
    path: &std::path::Path,
    source_files: Vec<std::path::PathBuf>,
    stop: tokio_util::sync::CancellationToken,
    reload: impl Fn(&std::path::Path) -> Option<Vec<std::path::PathBuf>> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context as _;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let path = path.to_owned();
    Ok(tokio::spawn(async move {
        let mut watched = WatchedFiles::read(&path, source_files);
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signalled = tokio::select! {
                () = stop.cancelled() => return,
                _ = hangup.recv() => true,
                _ = tick.tick() => false,
            };
            let now = watched.read_again();
            if signalled {
                tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
            } else if let Some(changed) = watched.first_change(&now) {
                tracing::info!(config = %path.display(), changed = %changed.display(),
                    "file changed: reloading the configuration");
            } else {
                continue;
            }
            // Read before the reload: a file changed while it ran differs at the next tick, and
            // is reloaded again rather than missed.
            watched.contents = now;
            match reload(&path) {
                Some(files) if watched.paths[1..] != files[..] => {
                    watched = WatchedFiles::read(&path, files);
                }
                _ => {}
            }
        }
    }))
}

/// The config file and the files it names, with a digest of the content each had when last
/// read (`None`: unreadable). Digests, so that no second copy of a private key stays in memory.
struct WatchedFiles {
    /// The config file first.
    paths: Vec<std::path::PathBuf>,
    contents: Vec<Option<[u8; 32]>>,
}

impl WatchedFiles {
    fn read(config: &std::path::Path, source_files: Vec<std::path::PathBuf>) -> Self {
        let paths: Vec<_> = std::iter::once(config.to_owned()).chain(source_files).collect();
        let mut watched = Self { paths, contents: Vec::new() };
        watched.contents = watched.read_again();
        watched
    }

    fn read_again(&self) -> Vec<Option<[u8; 32]>> {
        let digest_of = |path: &std::path::PathBuf| {
            let bytes = std::fs::read(path).ok()?;
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
            digest.as_ref().try_into().ok()
        };
        self.paths.iter().map(digest_of).collect()
    }

    /// The first file whose content differs in `now`. A config file that cannot be read (being
    /// replaced by a tool that truncates first) is no change: the next read sees the new one.
    fn first_change(&self, now: &[Option<[u8; 32]>]) -> Option<&std::path::Path> {
        if now.first().is_some_and(Option::is_none) {
            return None;
        }
        self.paths
            .iter()
            .zip(self.contents.iter().zip(now))
            .find(|(_, (before, now))| before != now)
            .map(|(path, _)| path.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::WatchedFiles;

    #[test]
    fn a_change_to_the_config_or_a_named_file_is_seen_and_an_unreadable_config_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("relay.toml");
        let cert = dir.path().join("relay.crt");
        std::fs::write(&config, "a").expect("write");
        std::fs::write(&cert, "cert 1").expect("write");
        let watched = WatchedFiles::read(&config, vec![cert.clone()]);
        assert_eq!(watched.first_change(&watched.read_again()), None);

        std::fs::write(&cert, "cert 2").expect("write");
        assert_eq!(watched.first_change(&watched.read_again()), Some(cert.as_path()));
        std::fs::write(&config, "b").expect("write");
        assert_eq!(watched.first_change(&watched.read_again()), Some(config.as_path()));
        // A named file gone is a change (the reload then says it cannot read it)…
        std::fs::remove_file(&cert).expect("remove");
        std::fs::write(&config, "a").expect("write");
        assert_eq!(watched.first_change(&watched.read_again()), Some(cert.as_path()));
        // …the config file gone is not.
        std::fs::remove_file(&config).expect("remove");
        assert_eq!(watched.first_change(&watched.read_again()), None);
    }
}
