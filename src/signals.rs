//! Signals: the first SIGINT or SIGTERM starts a graceful shutdown (the one shutdown token
//! every service watches); a second one exits at once.

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGINT or SIGTERM; a second signal exits at once.
pub(crate) fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("signal received: shutting down gracefully (signal again to stop at once)");
        cancel.cancel();
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("privlink: second signal: stopping now");
        std::process::exit(1);
    });
    Ok(token)
}
