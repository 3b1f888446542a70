//! The process's readiness as one value that every reader shares ([`ReadyLatch`]): what
//! `/readyz` answers, what systemd's `READY=1` waits for, and the drain that ends it for good
//! (the relay's agent sessions wait on it to tell their agents). The role sets it where the
//! fact changes — the relay once its listeners are bound, the agent as its links come and go —
//! instead of each reader working it out again. linkerd2-proxy's admin readiness latch is the
//! model.

use std::sync::Arc;

use tokio::sync::watch;

use crate::Readiness;

/// Why a draining process is not ready.
const DRAINING: &str = "draining";

/// Shared readiness; clones see the same value.
#[derive(Debug, Clone)]
pub struct ReadyLatch {
    state: Arc<watch::Sender<Readiness>>,
}

impl ReadyLatch {
    /// A latch that starts at `readiness`.
    pub fn new(readiness: Readiness) -> Self {
        Self { state: Arc::new(watch::Sender::new(readiness)) }
    }

    /// Sets the readiness, unless the process is draining (a drain is final).
    pub fn set(&self, readiness: Readiness) {
        self.state.send_if_modified(|current| {
            if is_draining(current) || *current == readiness {
                return false;
            }
            *current = readiness;
            true
        });
    }

    /// The process is shutting down: not ready from now on, whatever is set later.
    pub fn drain(&self) {
        self.state.send_if_modified(|current| {
            if is_draining(current) {
                return false;
            }
            *current = Readiness::NotReady(DRAINING.to_owned());
            true
        });
    }

    /// The readiness now.
    pub fn current(&self) -> Readiness {
        self.state.borrow().clone()
    }

    /// Whether the process is draining.
    pub fn is_draining(&self) -> bool {
        is_draining(&self.state.borrow())
    }

    /// Resolves once the process is ready (at once if it is now); never, if it drains first.
    pub async fn ready(&self) {
        let mut changes = self.state.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail while this runs.
        if changes.wait_for(|r| *r == Readiness::Ready).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once the process drains (at once if it has).
    pub async fn draining(&self) {
        let mut changes = self.state.subscribe();
        if changes.wait_for(is_draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn is_draining(readiness: &Readiness) -> bool {
    matches!(readiness, Readiness::NotReady(why) if why == DRAINING)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn readers_see_what_the_role_sets_and_a_drain_is_final() {
        let latch = ReadyLatch::new(Readiness::NotReady("no relay link is connected".into()));
        let reader = latch.clone();
        let waiting = tokio::spawn(async move { reader.ready().await });
        assert!(!waiting.is_finished());
        latch.set(Readiness::Ready);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("ready() resolves once set")
            .expect("join");
        assert_eq!(latch.current(), Readiness::Ready);

        latch.drain();
        assert!(latch.is_draining());
        latch.set(Readiness::Ready);
        assert_eq!(latch.current(), Readiness::NotReady("draining".into()), "drain is final");
        tokio::time::timeout(Duration::from_secs(5), latch.draining())
            .await
            .expect("draining() resolves at once after the drain");
    }
}
