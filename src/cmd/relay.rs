//! `privlink relay --config relay.toml`: validate the whole configuration, bind, serve until
//! the shutdown token, drain — and reload the configuration on SIGHUP or when the file
//! changes ([`super::watch_config`]).

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(config: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Parse and validate everything before binding anything.
    let loaded = privlink_relay::RelayConfig::load(config)?;
    let relay = privlink_relay::Relay::bind(loaded).await.context("starting the relay")?;
    let handle = relay.handle();
    let watcher = super::watch_config(config, shutdown.clone(), move |path| {
        // The outcome is logged and in the reload metrics.
        let _ = handle.reload_from(path);
    })?;
    relay.run(shutdown).await;
    watcher.abort();
    Ok(())
}
