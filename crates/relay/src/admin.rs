//! The relay as its admin listener reports it (served by `privlink-admin`): ready once every
//! listener is bound and until it starts draining; the status snapshot of `/api/v1/status` —
//! every endpoint with its status in the Private Link vocabulary, and every connected agent;
//! the open connections of `/api/v1/connections`, read from each endpoint's live table; the
//! last audit records of `/api/v1/events`; and the ten minutes of `/api/v1/history`, which
//! [`keep_history`] samples every second. The JSON shapes are documented in
//! `docs/admin-api.md`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use privlink_admin::audit::AuditView;
use privlink_admin::history::HistorySnapshot;
use privlink_admin::snapshot::RelayFleetView;
use privlink_admin::snapshot::{
    ConnectionList, ConnectionsSnapshot, EndpointView, EventsSnapshot, RelayAgentView,
    RelayConnectionView, RelayStatus, StatusSnapshot, TlsView, VerdictView,
};
use privlink_admin::{AdminView, MAX_LISTED_CONNECTIONS, Readiness, unix_seconds};
use privlink_protocol::message::Verdict;

use crate::metrics::{EndpointState, ScrapedState};
use crate::registry::{AgentView, EndpointStatus};
use crate::status::RelayHandle;

/// The relay's [`AdminView`].
#[derive(Debug)]
pub(crate) struct RelayAdmin {
    pub(crate) handle: RelayHandle,
}

impl AdminView for RelayAdmin {
    fn readiness(&self) -> Readiness {
        self.handle.client_readiness()
    }

    fn metrics(&self) -> Option<String> {
        Some(self.handle.metrics().render(&scrape(&self.handle)))
    }

    fn connections(&self) -> ConnectionsSnapshot {
        let endpoints = self.handle.endpoints();
        let mut open: Vec<(&str, _, String)> = endpoints
            .iter()
            .flat_map(|(endpoint, _)| {
                let name = endpoint.name.as_str();
                let destination = endpoint.spec().destination.to_string();
                endpoint.live.snapshot().into_iter().map(move |live| {
                    let destination = match &live.info.requested {
                        Some(requested) => requested.to_string(),
                        None => destination.clone(),
                    };
                    (name, live, destination)
                })
            })
            .collect();
        let total = open.len();
        open.sort_unstable_by_key(|(_, live, _)| (live.started, live.id));
        let listed = open
            .iter()
            .take(MAX_LISTED_CONNECTIONS)
            .map(|(endpoint, live, destination)| {
                let (bytes_from_client, bytes_to_client) = live.bytes.get();
                RelayConnectionView {
                    endpoint: (*endpoint).to_owned(),
                    client: live.info.client.to_string(),
                    agent: live.info.agent(),
                    destination: destination.clone(),
                    started_unix: unix_seconds(live.started),
                    bytes_from_client,
                    bytes_to_client,
                }
            })
            .collect();
        ConnectionsSnapshot { total, connections: ConnectionList::Relay(listed) }
    }

    fn events(&self) -> EventsSnapshot {
        EventsSnapshot::from_json_objects(self.handle.audit().trail.recent())
    }

    fn history(&self) -> HistorySnapshot {
        let metrics = self.handle.metrics();
        metrics.update(&scrape(&self.handle));
        metrics.history.snapshot()
    }

    fn status(&self) -> StatusSnapshot {
        let handle = &self.handle;
        // Each connector's agents, read once: an endpoint's approving agents come from them.
        let mut agents_of: BTreeMap<String, Vec<AgentView>> = BTreeMap::new();
        let endpoints = handle
            .endpoints()
            .into_iter()
            .map(|(endpoint, addr)| {
                let spec = endpoint.spec();
                let agents = agents_of
                    .entry(spec.connector.clone())
                    .or_insert_with(|| handle.agents(&spec.connector));
                // From the same snapshot as the approving agents below, so that the two
                // agree while verdicts arrive.
                let status = EndpointStatus::among(
                    agents.iter().map(|a| (a.draining, a.verdict(&spec.name))),
                );
                let reason = match &status {
                    EndpointStatus::Rejected { reason } => Some(reason.clone()),
                    _ => None,
                };
                let approving_agents = agents
                    .iter()
                    .filter(|a| {
                        !a.draining && matches!(a.verdict(&spec.name), Some(Verdict::Approved))
                    })
                    .map(|a| a.name.clone())
                    .collect();
                EndpointView {
                    name: spec.name.clone(),
                    listen: addr.to_string(),
                    destination: spec.destination.to_string(),
                    connector: spec.connector.clone(),
                    status: status.word().to_owned(),
                    reason,
                    active_connections: endpoint.active(),
                    total_connections: endpoint.counters.accepted.load(Ordering::Relaxed),
                    approving_agents,
                }
            })
            .collect();
        let agents = agents_of
            .values()
            .flatten()
            .map(|a| RelayAgentView {
                name: a.name.clone(),
                id: a.info.agent_id.clone(),
                connector: a.info.connector.clone(),
                version: a.info.version.clone(),
                transport: a.transport.to_string(),
                remote: a.info.remote.to_string(),
                connected_since_unix: unix_seconds(a.connected_since),
                active_streams: a.active_streams,
                draining: a.draining,
                tls: a.tls.as_ref().map(|tls| TlsView {
                    version: tls.version.clone(),
                    cipher: tls.cipher.clone(),
                    key_exchange: tls.key_exchange.clone(),
                    post_quantum: tls.post_quantum,
                }),
                verdicts: a
                    .verdicts
                    .iter()
                    .map(|(endpoint, verdict)| (endpoint.clone(), VerdictView::from(verdict)))
                    .collect(),
            })
            .collect();
        let readiness = self.readiness();
        StatusSnapshot::Relay(RelayStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: matches!(readiness, Readiness::Ready),
            pending_tunnel_connections: handle.pending_tunnel_connections(),
            endpoints,
            agents,
            not_ready_reason: match readiness {
                Readiness::Ready => None,
                Readiness::NotReady(reason) => Some(reason),
            },
            fleet: handle.fleet().map(|fleet| {
                let view = fleet.view();
                RelayFleetView { id: view.relay, members: view.members }
            }),
            listeners: handle.listener_views(),
            audit: handle.audit_status().as_ref().map(AuditView::from),
        })
    }
}

/// Until `stop`: every second, counts the bytes open connections moved and notes the agents
/// connected, for the status page's history (which `/metrics` scrapes also feed).
pub(crate) async fn keep_history(handle: &RelayHandle, stop: tokio_util::sync::CancellationToken) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => handle.metrics().update(&scrape(handle)),
        }
    }
}

/// The state gauges `/metrics` shows, read now: each endpoint's status, open connections and
/// the bytes its open connections moved since the last scrape; each connector's agents by
/// transport.
fn scrape(handle: &RelayHandle) -> ScrapedState {
    let mut state = ScrapedState::default();
    let budget = handle.buffer_budget();
    state.buffer = (budget.held(), budget.limit());
    state.audit = handle.audit_status();
    let mut connectors: Vec<String> = Vec::new();
    for (endpoint, _) in handle.endpoints() {
        let spec = endpoint.spec();
        if !connectors.contains(&spec.connector) {
            connectors.push(spec.connector.clone());
        }
        let unreported = endpoint.live.snapshot().iter().fold((0, 0), |sum, live| {
            let (from_client, to_client) = live.unreported();
            (sum.0 + from_client, sum.1 + to_client)
        });
        state.endpoints.push(EndpointState {
            name: spec.name.clone(),
            status: handle.registry().status(&spec.connector, &spec.name).word(),
            active: endpoint.active(),
            unreported,
        });
    }
    for connector in connectors {
        let agents = handle.agents(&connector);
        let on = |transport: &str| {
            agents.iter().filter(|a| a.transport.to_string() == transport).count()
        };
        let (quic, tcp) = (on("quic"), on("tcp"));
        state.agents.push((connector, quic, tcp));
        state.tunnel_links.extend(agents.iter().map(|a| {
            let transport = match a.transport {
                privlink_transport::tunnel::TransportKind::Quic => "quic",
                privlink_transport::tunnel::TransportKind::Tcp => "tcp",
            };
            (transport, a.tls.as_ref().map(|t| (t.key_exchange.clone(), t.cipher.clone())))
        }));
    }
    state
}
