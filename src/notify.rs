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

/// Waits until the announcer has said `STOPPING=1`, so that the process does not exit before
/// it: the announcer is a task of its own, and a drain with nothing to wait for can end before
/// that task runs (the runtime then drops it unpolled — a test saw it once).
pub(crate) async fn stopped(announcer: tokio::task::JoinHandle<()>, shutdown: &CancellationToken) {
    // Already cancelled when the drain ran; cancelling again only covers a run that ended
    // by itself, which is a stop too.
    shutdown.cancel();
    let _ = announcer.await;
}

fn send(states: &[NotifyState<'_>]) {
    // `false`: leave NOTIFY_SOCKET in the environment (removing it is not thread-safe).
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("could not notify the service manager: {e}");
    }
}
