//! `privlink agent --config agent.toml`: validate the configuration, dial the relays, serve
//! until the shutdown token, drain.

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// `env_token` is `PRIVLINK_TOKEN`, already taken out of the environment.
pub(crate) async fn run(
    config: &Path,
    env_token: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = privlink_agent::AgentConfig::load(config, env_token)?;
    let agent = privlink_agent::Agent::new(config).context("starting the agent")?;
    agent.run(shutdown).await;
    Ok(())
}
