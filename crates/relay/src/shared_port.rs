//! A shared TLS port (`[[listener]]`) at run time: its current spec and the table that routes a
//! server name to the endpoint that claims it (both replaced whole by a reload), how many
//! connections are waiting for their ClientHello (capped: a flood of silent connections holds
//! tasks until `preread_timeout`), and the throttle on its refusal log lines. The accept loop in
//! `listen` reads it; `reload` and `status` replace and show it. It imports nothing of the
//! relay's own but the config, metrics and audit records.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use privlink_protocol::client_hello::ServerNames;
use privlink_transport::throttle::Throttle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::audit::{Place, RelayAudit};
use crate::config::ListenerSpec;
use crate::metrics::RelayMetrics;
use crate::source_limits::{SourceLimits, SourceSlot};

/// Most connections of one shared port waiting for their ClientHello at once.
pub(crate) const MAX_PREREADS: usize = 4096;
/// At most one refusal line per this long per port (the rest are counted in it).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a shared port routes by, replaced whole.
#[derive(Debug)]
pub(crate) struct Routing {
    pub(crate) spec: ListenerSpec,
    /// Server name → endpoint name.
    pub(crate) names: ServerNames<String>,
}

impl Routing {
    fn of(spec: ListenerSpec) -> Self {
        let mut names = ServerNames::default();
        for (name, endpoint) in &spec.routes {
            // Validated unique when the configuration was loaded.
            let _ = names.claim(name, endpoint.clone());
        }
        Self { spec, names }
    }
}

/// A shared port while the relay runs.
#[derive(Debug)]
pub(crate) struct SharedPort {
    pub(crate) name: String,
    /// The bound address.
    pub(crate) addr: SocketAddr,
    routing: RwLock<Arc<Routing>>,
    /// Connections waiting for their ClientHello now.
    prereads: AtomicUsize,
    refusal_log: Throttle,
    pub(crate) metrics: Arc<RelayMetrics>,
    /// Refusals here are audited (`connection.denied` naming the listener).
    pub(crate) audit: Arc<RelayAudit>,
    /// What each source holds and may still open through this port (`per_source_*`).
    pub(crate) sources: Arc<SourceLimits>,
    /// Ends its accept loop.
    pub(crate) stop: CancellationToken,
}

/// A connection counted as waiting for its ClientHello until it drops.
#[derive(Debug)]
pub(crate) struct Prereading<'a>(&'a AtomicUsize);

impl Drop for Prereading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SharedPort {
    pub(crate) fn new(
        spec: ListenerSpec,
        addr: SocketAddr,
        (metrics, audit): (Arc<RelayMetrics>, Arc<RelayAudit>),
        stop: CancellationToken,
    ) -> Self {
        Self {
            name: spec.name.clone(),
            addr,
            routing: RwLock::new(Arc::new(Routing::of(spec))),
            prereads: AtomicUsize::new(0),
            refusal_log: Throttle::new(REFUSAL_LOG_INTERVAL),
            metrics,
            audit,
            sources: Arc::default(),
            stop,
        }
    }

    /// What it routes by now.
    pub(crate) fn routing(&self) -> Arc<Routing> {
        Arc::clone(&self.routing.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A reload's spec: new connections are judged and routed by it.
    pub(crate) fn set_spec(&self, spec: ListenerSpec) {
        *self.routing.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Routing::of(spec));
    }

    /// A connection may wait for its ClientHello, unless [`MAX_PREREADS`] already do.
    pub(crate) fn start_preread(&self) -> Option<Prereading<'_>> {
        self.prereads
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_PREREADS).then_some(n + 1)
            })
            .ok()?;
        Some(Prereading(&self.prereads))
    }

    /// Admits a connection from `client` under the port's per-source limits now in force, or
    /// counts and logs its refusal.
    pub(crate) fn admit_source(&self, client: SocketAddr) -> Option<SourceSlot> {
        let policy = self.routing().spec.per_source;
        match self.sources.admit(client.ip(), &policy, std::time::Instant::now()) {
            Ok(slot) => Some(slot),
            Err(refusal) => {
                self.refused(client, refusal.label(), "its source is over the per-source limit");
                None
            }
        }
    }

    /// Counts a connection turned away before any endpoint took it, and says so in the log at
    /// most once per interval (`detail`: why, for the line).
    pub(crate) fn refused(&self, client: SocketAddr, reason: &'static str, detail: &str) {
        self.metrics.listener_refused(&self.name, reason);
        self.audit.denied((client, None), Place::Listener(&self.name), reason, Some(detail));
        if let Some(left_out) = self.refusal_log.admit(std::time::Instant::now()) {
            info!(
                listener = %self.name,
                %client,
                reason,
                left_out,
                "connection refused: {detail} (left_out: refusals since the last such line; all \
                 are counted in privlink_relay_listener_refused_total)"
            );
        }
    }
}
