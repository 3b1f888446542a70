//! Graceful drain: the one shutdown sequence relay and agent share. Tasks run in a
//! [`TaskTracker`]; on shutdown the tracker is closed, the tasks get a grace period to finish
//! on their own, and whatever is left is told to stop through a force token.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Closes `tracker`, waits up to `grace` for its tasks, then cancels `force` and waits for the
/// rest (which end promptly once forced). Returns whether every task finished within `grace`.
/// `what` names the tasks in the log line ("connections", "streams").
pub async fn drain(
    tracker: &TaskTracker,
    grace: Duration,
    force: &CancellationToken,
    what: &str,
) -> bool {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        return true;
    }
    tracing::warn!(remaining = tracker.len(), "grace period over; closing the remaining {what}");
    force.cancel();
    tracker.wait().await;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finished_tasks_need_no_force_and_stragglers_are_forced() {
        let tracker = TaskTracker::new();
        let force = CancellationToken::new();
        tracker.spawn(tokio::time::sleep(Duration::from_secs(1)));
        assert!(drain(&tracker, Duration::from_secs(5), &force, "tasks").await);
        assert!(!force.is_cancelled());

        let tracker = TaskTracker::new();
        let stuck = force.clone();
        tracker.spawn(async move { stuck.cancelled().await });
        assert!(!drain(&tracker, Duration::from_secs(5), &force, "tasks").await);
        assert!(force.is_cancelled());
        assert!(tracker.is_empty());
    }
}
