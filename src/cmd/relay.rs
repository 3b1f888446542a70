//! `privlink relay --config relay.toml`: validate the whole configuration, bind, serve until
//! the shutdown token, drain — and reload the configuration on SIGHUP or when the file
//! changes ([`super::watch_config`]). `--check-config` only validates.

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// `--check-config`: validates the file as [`run`] would, binding nothing; prints a summary.
pub(crate) fn check_config(config: &Path) -> anyhow::Result<()> {
    let loaded = privlink_relay::RelayConfig::load(config)?;
    let admin = loaded.admin.as_ref().map_or_else(|| "off".to_owned(), |a| a.listen.to_string());
    println!(
        "{}: valid: tunnel {} (QUIC on UDP, TLS on TCP), {} endpoint{}, {} connector{}, admin {}",
        config.display(),
        loaded.tunnel_listen,
        loaded.endpoints.len(),
        if loaded.endpoints.len() == 1 { "" } else { "s" },
        loaded.connectors.len(),
        if loaded.connectors.len() == 1 { "" } else { "s" },
        admin,
    );
    Ok(())
}

pub(crate) async fn run(config: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Parse and validate everything before binding anything.
    let loaded = privlink_relay::RelayConfig::load(config)?;
    let source_files = loaded.source_files.clone();
    let relay = privlink_relay::Relay::bind(loaded).await.context("starting the relay")?;
    // Every listener is bound: the relay is ready (its `/readyz` latch says so from here on).
    let handle = relay.handle();
    let readiness = handle.readiness().clone();
    let announcer =
        crate::notify::announce(async move { readiness.ready().await }, shutdown.clone());
    let watcher = super::watch_config(config, source_files, shutdown.clone(), move |path| {
        // The outcome is logged and in the reload metrics.
        handle.reload_from(path).ok().map(|applied| applied.source_files)
    })?;
    relay.run(shutdown.clone()).await;
    watcher.abort();
    crate::notify::stopped(announcer, &shutdown).await;
    Ok(())
}
