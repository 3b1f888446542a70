//! The agent as others see it: the state of each relay link (dialling, connected on a
//! transport, down with its last error), the verdicts it gave on that link, and the streams it
//! carries — for the admin listener (readiness: at least one link welcomed and its verdicts
//! sent; the status JSON of `docs/admin-api.md`) and for tests. Links are keyed by the relay
//! address they dial and their slot on it ([`LinkKey`]); the link tasks and sessions update
//! them. Each configured relay's [`FleetCover`] is registered here too, so status and metrics
//! can say which relays of a fleet the agent reaches.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use privlink_admin::snapshot::{self, VerdictView};
use privlink_admin::{Readiness, ReadyLatch};
use privlink_protocol::message::EndpointVerdict;
use privlink_transport::tunnel::TransportKind;
use tokio::sync::watch;

use crate::fleet::{Coverage, FleetCover, LinkKey};

/// Where one relay link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Dialling, or in the control handshake.
    Connecting,
    /// Welcomed by the relay; its verdicts are sent and it takes streams.
    Connected,
    /// Down; it re-dials after a backoff.
    Down,
}

impl LinkState {
    fn word(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Down => "down",
        }
    }
}

/// One relay link, for status views.
#[derive(Debug, Clone)]
pub struct LinkView {
    /// The relay as configured (`name:port`).
    pub relay: String,
    /// The address this link dials.
    pub address: SocketAddr,
    /// The relay of a fleet it reached (its id), when the relay belongs to one.
    pub relay_id: Option<String>,
    /// Where it stands.
    pub state: LinkState,
    /// The transport of its connection, once connected.
    pub transport: Option<TransportKind>,
    /// What its connection's TLS negotiated, where the agent can tell (TLS/TCP).
    pub tls: Option<privlink_transport::crypto::TlsSummary>,
    /// When the relay's certificate on its connection expires (Unix seconds).
    pub relay_certificate_expires: Option<i64>,
    /// When it entered its state.
    pub since: SystemTime,
    /// Why it last went down.
    pub last_error: Option<String>,
    /// The verdicts it gave the relay.
    pub verdicts: Vec<EndpointVerdict>,
    /// Streams it carries now.
    pub active_streams: u32,
}

/// Every relay link of the agent.
#[derive(Debug)]
pub struct AgentStatus {
    links: Mutex<BTreeMap<LinkKey, LinkView>>,
    /// Each configured relay's fleet coverage, by the relay as written.
    fleets: Mutex<BTreeMap<String, Arc<FleetCover>>>,
    changed: watch::Sender<u64>,
    /// Ready while at least one link is connected, until the drain.
    readiness: ReadyLatch,
}

/// Why an agent with no connected link is not ready.
const NO_LINK: &str = "no relay link is connected";

impl Default for AgentStatus {
    fn default() -> Self {
        Self {
            links: Mutex::default(),
            fleets: Mutex::default(),
            changed: watch::Sender::new(0),
            readiness: ReadyLatch::new(Readiness::NotReady(NO_LINK.to_owned())),
        }
    }
}

impl AgentStatus {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<LinkKey, LinkView>> {
        // Plain views: a poisoned lock still holds usable data.
        self.links.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tells watchers that a link changed, and sets the readiness it implies.
    fn changed_now(&self) {
        self.readiness.set(if self.any_connected() {
            Readiness::Ready
        } else {
            Readiness::NotReady(NO_LINK.to_owned())
        });
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// The agent's readiness: `/readyz`, `READY=1`, and the drain.
    pub fn readiness(&self) -> &ReadyLatch {
        &self.readiness
    }

    fn update(&self, key: LinkKey, change: impl FnOnce(&mut LinkView)) {
        if let Some(link) = self.lock().get_mut(&key) {
            change(link);
        }
        self.changed_now();
    }

    /// The link `key` (of `relay`) is dialling.
    pub(crate) fn connecting(&self, relay: &str, key: LinkKey) {
        let mut links = self.lock();
        let link = links.entry(key).or_insert_with(|| LinkView {
            relay: relay.to_owned(),
            address: key.address,
            relay_id: None,
            state: LinkState::Connecting,
            transport: None,
            tls: None,
            relay_certificate_expires: None,
            since: SystemTime::now(),
            last_error: None,
            verdicts: Vec::new(),
            active_streams: 0,
        });
        if link.state != LinkState::Connecting {
            link.state = LinkState::Connecting;
            link.since = SystemTime::now();
            link.relay_id = None;
        }
        drop(links);
        self.changed_now();
    }

    /// The link `key` was welcomed over `connection` (its transport and TLS) and sent
    /// `verdicts`.
    pub(crate) fn connected(
        &self,
        key: LinkKey,
        connection: &privlink_transport::tunnel::AgentConnection,
        verdicts: &[EndpointVerdict],
    ) {
        self.update(key, |link| {
            link.state = LinkState::Connected;
            link.transport = Some(connection.kind());
            link.tls = connection.tls().cloned();
            link.relay_certificate_expires = connection.peer_certificate_expires();
            link.since = SystemTime::now();
            link.verdicts = verdicts.to_vec();
        });
    }

    /// The link `key` now has `verdicts` (a relay reload changed its endpoints).
    pub(crate) fn set_verdicts(&self, key: LinkKey, verdicts: &[EndpointVerdict]) {
        self.update(key, |link| link.verdicts = verdicts.to_vec());
    }

    /// The link `key` reached the relay `relay_id` of a fleet.
    pub(crate) fn set_relay_id(&self, key: LinkKey, relay_id: &str) {
        self.update(key, |link| link.relay_id = Some(relay_id.to_owned()));
    }

    /// The link `key` carries `active_streams` streams.
    pub(crate) fn set_active_streams(&self, key: LinkKey, active_streams: u32) {
        let mut links = self.lock();
        if let Some(link) = links.get_mut(&key) {
            link.active_streams = active_streams;
        }
    }

    /// The link `key` went down (`error`: why, when it failed).
    pub(crate) fn down(&self, key: LinkKey, error: Option<String>) {
        self.update(key, |link| {
            link.state = LinkState::Down;
            link.since = SystemTime::now();
            link.active_streams = 0;
            if error.is_some() {
                link.last_error = error;
            }
        });
    }

    /// The link `key` is gone for good (its relay address no longer resolves, the fleet
    /// shrank, or the agent stops).
    pub(crate) fn remove(&self, key: LinkKey) {
        self.lock().remove(&key);
        self.changed_now();
    }

    /// `relay`'s fleet coverage is `cover` (its links started).
    pub(crate) fn add_fleet(&self, relay: &str, cover: Arc<FleetCover>) {
        self.fleets.lock().unwrap_or_else(|p| p.into_inner()).insert(relay.to_owned(), cover);
    }

    /// `relay` is no longer configured.
    pub(crate) fn remove_fleet(&self, relay: &str) {
        self.fleets.lock().unwrap_or_else(|p| p.into_inner()).remove(relay);
    }

    /// Each configured relay that belongs to a fleet, with which of its relays the agent
    /// reaches.
    pub fn fleets(&self) -> Vec<(String, Coverage)> {
        let fleets = self.fleets.lock().unwrap_or_else(|p| p.into_inner());
        fleets
            .iter()
            .filter_map(|(relay, cover)| Some((relay.clone(), cover.coverage()?)))
            .collect()
    }

    /// Every link, by address and slot.
    pub fn links(&self) -> Vec<LinkView> {
        self.lock().values().cloned().collect()
    }

    /// Whether at least one link is connected.
    pub fn any_connected(&self) -> bool {
        self.lock().values().any(|link| link.state == LinkState::Connected)
    }

    /// A receiver that sees a new value after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The links as the status snapshot lists them.
    pub(crate) fn link_views(&self) -> Vec<snapshot::LinkView> {
        self.links()
            .into_iter()
            .map(|link| snapshot::LinkView {
                relay: link.relay,
                address: link.address.to_string(),
                relay_id: link.relay_id,
                state: link.state.word().to_owned(),
                transport: link.transport.map(|t| t.to_string()),
                since_unix: privlink_admin::unix_seconds(link.since),
                last_error: link.last_error,
                verdicts: link
                    .verdicts
                    .iter()
                    .map(|v| (v.endpoint.clone(), VerdictView::from(&v.verdict)))
                    .collect(),
                active_streams: link.active_streams,
                relay_certificate_expires_unix: (link.state == LinkState::Connected)
                    .then_some(link.relay_certificate_expires)
                    .flatten(),
                tls: link.tls.as_ref().filter(|_| link.state == LinkState::Connected).map(|tls| {
                    snapshot::TlsView {
                        version: tls.version.clone(),
                        cipher: tls.cipher.clone(),
                        key_exchange: tls.key_exchange.clone(),
                        post_quantum: tls.post_quantum,
                    }
                }),
            })
            .collect()
    }
}
