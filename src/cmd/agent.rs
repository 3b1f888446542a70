//! `privlink agent --config agent.toml`: validate the configuration, dial the relays, serve
//! until the shutdown token, drain — and reload the configuration on SIGHUP or when the file
//! changes ([`super::watch_config`]).

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// `env_token` is `PRIVLINK_TOKEN`, already taken out of the environment.
pub(crate) async fn run(
    config: &Path,
    env_token: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let loaded = privlink_agent::AgentConfig::load(config, env_token.clone())?;
    let agent = privlink_agent::Agent::new(loaded).context("starting the agent")?;
    let reloader = agent.reloader();
    let watcher = super::watch_config(config, shutdown.clone(), move |path| {
        // The outcome is logged and in the reload metrics.
        let _ = reloader.reload_from(path, env_token.clone());
    })?;
    agent.run(shutdown).await;
    watcher.abort();
    Ok(())
}
