//! The agent as its admin listener reports it (served by `privlink-admin`): ready while at
//! least one relay link is welcomed with its verdicts sent, and not while draining; the status
//! snapshot of `/api/v1/status` — the agent's name and connector and each relay link with its
//! state, transport, verdicts and streams (shape in `docs/admin-api.md`).

use std::sync::Arc;

use privlink_admin::{AdminView, Readiness};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::metrics::AgentMetrics;
use crate::status::AgentStatus;

/// The agent's [`AdminView`].
#[derive(Debug)]
pub(crate) struct AgentAdmin {
    pub(crate) status: Arc<AgentStatus>,
    pub(crate) metrics: Arc<AgentMetrics>,
    pub(crate) name: String,
    pub(crate) connector: String,
    /// Cancelled when the agent starts shutting down.
    pub(crate) draining: CancellationToken,
}

impl AdminView for AgentAdmin {
    fn readiness(&self) -> Readiness {
        if self.draining.is_cancelled() {
            Readiness::NotReady("draining".to_owned())
        } else if self.status.any_connected() {
            Readiness::Ready
        } else {
            Readiness::NotReady("no relay link is connected".to_owned())
        }
    }

    fn metrics(&self) -> Option<String> {
        Some(self.metrics.render(&self.status))
    }

    fn status(&self) -> Value {
        json!({
            "role": "agent",
            "version": env!("CARGO_PKG_VERSION"),
            "ready": matches!(self.readiness(), Readiness::Ready),
            "name": self.name,
            "connector": self.connector,
            "links": self.status.links_json(),
        })
    }
}
