//! One module per command: each turns its arguments into a running service or a printed
//! result, on top of the library crates.

pub(crate) mod agent;
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

/// How often a config file is read to see whether it changed.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Calls `reload` on SIGHUP, and when the file's content differs from what was last loaded
/// (read every [`WATCH_INTERVAL`]; comparing content, not timestamps, also sees a Kubernetes
/// ConfigMap swapped in through a symlink), until `stop`.
pub(crate) fn watch_config(
    path: &std::path::Path,
    stop: tokio_util::sync::CancellationToken,
    reload: impl Fn(&std::path::Path) + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context as _;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let path = path.to_owned();
    Ok(tokio::spawn(async move {
        let mut last = std::fs::read(&path).ok();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signalled = tokio::select! {
                () = stop.cancelled() => return,
                _ = hangup.recv() => true,
                _ = tick.tick() => false,
            };
            let now = std::fs::read(&path).ok();
            if signalled {
                tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
            } else if now == last || now.is_none() {
                continue;
            } else {
                tracing::info!(config = %path.display(), "configuration file changed: reloading");
            }
            last = now;
            reload(&path);
        }
    }))
}
