//! `privlink relay --config relay.toml`: validate the whole configuration, bind, serve until
//! the shutdown token, drain — and reload the configuration on SIGHUP or when the file's
//! content changes (checked every [`WATCH_INTERVAL`]; comparing content, not timestamps, also
//! sees a Kubernetes ConfigMap swapped in through a symlink).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use privlink_relay::RelayHandle;
use tokio_util::sync::CancellationToken;

/// How often the config file is read to see whether it changed.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

pub(crate) async fn run(config: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Parse and validate everything before binding anything.
    let loaded = privlink_relay::RelayConfig::load(config)?;
    let relay = privlink_relay::Relay::bind(loaded).await.context("starting the relay")?;
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let watcher = tokio::spawn(watch(config.to_owned(), relay.handle(), hangup, shutdown.clone()));
    relay.run(shutdown).await;
    watcher.abort();
    Ok(())
}

/// Reloads on SIGHUP, and when the file's content differs from what was last loaded.
async fn watch(
    path: PathBuf,
    relay: RelayHandle,
    mut hangup: tokio::signal::unix::Signal,
    stop: CancellationToken,
) {
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
        // The outcome is logged and in the reload metrics.
        let _ = relay.reload_from(&path);
    }
}
