//! `privlink relay --config relay.toml`: validate the whole configuration, bind, serve until
//! the shutdown token, drain.

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(config: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Parse and validate everything before binding anything.
    let config = privlink_relay::RelayConfig::load(config)?;
    let relay = privlink_relay::Relay::bind(config).await.context("starting the relay")?;
    relay.run(shutdown).await;
    Ok(())
}
