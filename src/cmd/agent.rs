//! `privlink agent --config agent.toml`: validate the configuration, dial the relays, serve
//! until the shutdown token, drain — and reload the configuration on SIGHUP or when the file
//! changes ([`super::watch_config`]). `--check-config` only validates.

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// `--check-config`: validates the file as [`run`] would (token, relay CA, allowlist),
/// dialling nothing; prints a summary.
pub(crate) fn check_config(config: &Path, env_token: Option<String>) -> anyhow::Result<()> {
    let loaded = privlink_agent::AgentConfig::load(config, env_token)?;
    println!("{}: valid: {}", config.display(), privlink_agent::check::summary(&loaded));
    Ok(())
}

/// `env_token` is `PRIVLINK_TOKEN`, already taken out of the environment.
pub(crate) async fn run(
    config: &Path,
    env_token: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let loaded = privlink_agent::AgentConfig::load(config, env_token.clone())?;
    let source_files = loaded.source_files.clone();
    let agent = privlink_agent::Agent::new(loaded).context("starting the agent")?;
    // Ready at the first welcomed link with its verdicts sent (`/readyz`'s latch).
    let readiness = agent.status().readiness().clone();
    let announcer =
        crate::notify::announce(async move { readiness.ready().await }, shutdown.clone());
    let reloader = agent.reloader();
    let watcher = super::watch_config(config, source_files, shutdown.clone(), move |path| {
        // The outcome is logged and in the reload metrics.
        reloader.reload_from(path, env_token.clone()).ok().map(|applied| applied.source_files)
    })?;
    agent.run(shutdown.clone()).await;
    watcher.abort();
    crate::notify::stopped(announcer, &shutdown).await;
    Ok(())
}
