//! `privlink agent --config agent.toml`: validate the configuration, dial the relays, serve
//! until the shutdown token, drain.

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(config: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = privlink_agent::AgentConfig::load(config)?;
    let agent = privlink_agent::Agent::new(config).context("starting the agent")?;
    agent.run(shutdown).await;
    Ok(())
}
