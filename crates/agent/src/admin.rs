//! The agent as its admin listener reports it (served by `privlink-admin`): ready while at
//! least one relay link is welcomed with its verdicts sent, and not while draining; the status
//! snapshot of `/api/v1/status` — the agent's name and connector and each relay link with its
//! state, transport, verdicts and streams — the open streams of `/api/v1/connections`, the
//! last audit records of `/api/v1/events` and the ten minutes of `/api/v1/history`, which
//! [`AgentAdmin::keep_history`] samples every second (shapes in `docs/admin-api.md`).

use std::sync::Arc;

use privlink_admin::audit::AuditView;
use privlink_admin::history::HistorySnapshot;
use privlink_admin::snapshot::{
    AgentConnectionView, AgentStatus as AgentStatusView, ConnectionList, ConnectionsSnapshot,
    EventsSnapshot, FleetView, StatusSnapshot,
};
use privlink_admin::{AdminView, MAX_LISTED_CONNECTIONS, Readiness, unix_seconds};

use crate::forward::StreamPolicy;
use crate::status::AgentStatus;

/// The agent's [`AdminView`].
#[derive(Debug)]
pub(crate) struct AgentAdmin {
    pub(crate) status: Arc<AgentStatus>,
    /// Its metrics and open streams.
    pub(crate) policy: Arc<StreamPolicy>,
    pub(crate) name: String,
    /// Drawn at start; the relay lists the agent under it.
    pub(crate) id: String,
    pub(crate) connector: String,
}

impl AdminView for AgentAdmin {
    fn readiness(&self) -> Readiness {
        self.status.readiness().current()
    }

    fn metrics(&self) -> Option<String> {
        self.update_metrics();
        if let Some(trail) = self.policy.audit.status() {
            self.policy.metrics.audit.set(&trail);
        }
        Some(self.policy.metrics.render())
    }

    fn events(&self) -> EventsSnapshot {
        EventsSnapshot::from_json_objects(self.policy.audit.recent())
    }

    fn history(&self) -> HistorySnapshot {
        self.update_metrics();
        self.policy.metrics.history.snapshot()
    }

    fn connections(&self) -> ConnectionsSnapshot {
        let mut open = self.policy.live.snapshot();
        let total = open.len();
        open.sort_unstable_by_key(|live| (live.started, live.id));
        let listed = open
            .iter()
            .take(MAX_LISTED_CONNECTIONS)
            .map(|live| {
                let (bytes_from_destination, bytes_to_destination) = live.bytes.get();
                AgentConnectionView {
                    endpoint: live.info.endpoint.clone(),
                    client: live.info.client.to_string(),
                    destination: live.info.destination.clone(),
                    started_unix: unix_seconds(live.started),
                    bytes_to_destination,
                    bytes_from_destination,
                }
            })
            .collect();
        ConnectionsSnapshot { total, connections: ConnectionList::Agent(listed) }
    }

    fn status(&self) -> StatusSnapshot {
        StatusSnapshot::Agent(AgentStatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: matches!(self.readiness(), Readiness::Ready),
            name: self.name.clone(),
            id: self.id.clone(),
            connector: self.connector.clone(),
            links: self.status.link_views(),
            fleets: self
                .status
                .fleets()
                .into_iter()
                .map(|(relay, coverage)| FleetView {
                    relay,
                    members: coverage.members,
                    reached: coverage.reached,
                    missing: coverage.missing,
                })
                .collect(),
            audit: self.policy.audit.status().as_ref().map(AuditView::from),
        })
    }
}

impl AgentAdmin {
    /// Sets the gauges and counts the bytes open streams moved since the last update.
    fn update_metrics(&self) {
        let unreported = self.policy.live.snapshot().iter().fold((0, 0), |sum, live| {
            let (from_destination, to_destination) = live.unreported();
            (sum.0 + from_destination, sum.1 + to_destination)
        });
        let buffer = (self.policy.budget.held(), self.policy.budget.limit());
        self.policy.metrics.update(&self.status, unreported, buffer);
    }

    /// Until `stop`: every second, counts the bytes open streams moved and notes the relay
    /// links connected, for the status page's history (which `/metrics` scrapes also feed).
    pub(crate) async fn keep_history(&self, stop: tokio_util::sync::CancellationToken) {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => self.update_metrics(),
            }
        }
    }
}
