//! The service manager's readiness protocol (systemd `Type=notify`, `sd_notify(3)`): `READY=1`
//! once the service can do its work, `STOPPING=1` when its drain starts. Nothing is sent when
//! `NOTIFY_SOCKET` is not set (the `sd-notify` crate checks), so this is harmless elsewhere.

use std::future::Future;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Sends `READY=1` when `ready` completes and `STOPPING=1` when `shutdown` is cancelled
/// (whichever comes first; a service stopped before it was ready only says it is stopping).
pub(crate) fn announce(
    ready: impl Future<Output = ()> + Send + 'static,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            () = ready => send(&[NotifyState::Ready, NotifyState::Status("ready")]),
            () = shutdown.cancelled() => {}
        }
        shutdown.cancelled().await;
        send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    })
}

fn send(states: &[NotifyState<'_>]) {
    // `false`: leave NOTIFY_SOCKET in the environment (removing it is not thread-safe).
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("could not notify the service manager: {e}");
    }
}
