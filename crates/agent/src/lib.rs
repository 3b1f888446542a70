//! The privlink agent: runs inside the private network, dials *out* to relays (no inbound
//! port), authenticates with its connector token, and opens TCP connections to destinations
//! on the relay's behalf — only those its own allowlist admits, and never loopback,
//! link-local or metadata addresses unless a rule names them.
//!
//! It is a thin driver over `privlink-protocol` (the control conversation's agent-side state
//! machine) and `privlink-transport` (tunnels, copy, splice); the policy — which destinations
//! to open — is its own. It does not listen for anything and it never decrypts the traffic it
//! carries.
//!
//! # Layout
//!
//! * [`config`] — `agent.toml` and its validation into [`AgentConfig`].
//! * [`allowlist`] — rules, matching and the special-address refusal.
//! * `audit` — the records the agent writes to its audit trail (`[audit]`).
//! * [`proxy`] — the HTTP proxy on the way to the relays (`proxy`, `HTTPS_PROXY`, `NO_PROXY`).
//! * [`links`] — per relay name: resolve, keep a link to every address (and, for an address in
//!   front of a relay fleet, one per relay of the fleet), back off, re-dial.
//! * [`fleet`] — which relays of a fleet the links of one relay name reach; duplicates.
//! * [`dial`] — one connection attempt: the transport choice, `auto` fallback and promotion.
//! * `dialer` — dialling one relay address as the configuration says (transport's dialler,
//!   the relay's name, a rejected certificate explained).
//! * `shared` — what every link, session and stream shares.
//! * [`session`] — one connection: the control conversation, accepting data streams.
//! * [`forward`] — one data stream: check, resolve, connect, reply, splice.
//! * [`metrics`] — the Prometheus metrics `/metrics` serves.
//! * [`check`] — `privlink check`: the relay and destination diagnostics.
//! * [`status`] — each relay link's state, verdicts and streams, and the agent's readiness
//!   latch, for the admin listener and tests.
//! * [`reload`] — hot reload: the token, the relays and the allowlist re-read in place.
//! * `admin` — what the admin listener (`privlink-admin`) reports: readiness, the typed
//!   status and connections snapshots, metrics.
#![forbid(unsafe_code)]

mod admin;
pub mod allowlist;
mod audit;
pub mod check;
pub mod config;
pub mod dial;
mod dialer;
pub mod fleet;
pub mod forward;
pub mod links;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod session;
mod shared;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use privlink_transport::audit::AuditTrail;
use privlink_transport::dialer::DialerError;
use privlink_transport::drain;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use privlink_admin::AdminServer;

use crate::admin::AgentAdmin;
pub use crate::config::AgentConfig;
use crate::dialer::RelayDialer;
use crate::forward::StreamPolicy;
use crate::metrics::AgentMetrics;
use crate::shared::{AgentShared, random_id};
use crate::status::AgentStatus;

/// How long closing tunnel connections may take at the very end of a shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The relay CA or the QUIC endpoint could not be set up.
    #[error(transparent)]
    Dialer(#[from] DialerError),
    /// The audit trail could not be opened or continued.
    #[error(transparent)]
    Audit(#[from] privlink_transport::audit::TrailError),
    /// The admin listener could not be bound.
    #[error("admin listener: cannot listen on {addr}")]
    AdminBind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// A configured agent, ready to [`run`](Agent::run).
#[derive(Debug)]
pub struct Agent {
    shared: Arc<AgentShared>,
    admin: Option<AdminServer>,
}

impl Agent {
    /// Prepares the agent: TLS trust, QUIC endpoint, the admin listener (bound here, so a
    /// taken port fails the start). Call it within a tokio runtime.
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        let admin = match &config.admin {
            Some(settings) => Some(
                AdminServer::bind(settings)
                    .map_err(|source| AgentError::AdminBind { addr: settings.listen, source })?,
            ),
            None => None,
        };
        let dialer = RelayDialer::new(&config)?;
        let metrics = Arc::new(AgentMetrics::default());
        let agent_id = random_id();
        let mut policy = StreamPolicy::new(
            reload::rules_of(&config),
            Arc::clone(&metrics),
            config.buffer_budget,
            config.stream_window,
        );
        if let Some(settings) = &config.audit {
            policy.audit = AuditTrail::open(settings, audit::opening(&config, &agent_id))?;
            audit::config_loaded(&policy.audit, &config);
        }
        let policy = Arc::new(policy);
        let shutdown = CancellationToken::new();
        let token = config.token.clone();
        Ok(Self {
            shared: Arc::new(AgentShared {
                config,
                policy,
                agent_id,
                dialer,
                force: CancellationToken::new(),
                shutdown,
                status: Arc::default(),
                metrics,
                token: std::sync::RwLock::new(token),
                rules_changed: tokio::sync::watch::Sender::new(0),
                relays: std::sync::Mutex::default(),
                links: tokio_util::task::TaskTracker::new(),
            }),
            admin,
        })
    }

    /// The admin listener's bound address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Each relay link's state.
    pub fn status(&self) -> Arc<AgentStatus> {
        Arc::clone(&self.shared.status)
    }

    /// What reloads this agent's configuration while it runs.
    pub fn reloader(&self) -> reload::AgentReloader {
        reload::AgentReloader::new(Arc::clone(&self.shared))
    }

    /// Runs until `shutdown` is cancelled, then tells relays it is draining, lets open streams
    /// finish for the grace period, and closes its connections.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { shared, admin } = self;
        let config = &shared.config;
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|server| {
            if let Ok(addr) = server.local_addr() {
                info!(admin = %addr, "admin listener: /healthz /readyz /api/v1/status");
            }
            let view = Arc::new(AgentAdmin {
                status: Arc::clone(&shared.status),
                policy: Arc::clone(&shared.policy),
                name: config.name.clone(),
                id: shared.agent_id.clone(),
                connector: config.connector.clone(),
            });
            let (sampled, stop) = (Arc::clone(&view), admin_stop.clone());
            let history = tokio::spawn(async move { sampled.keep_history(stop).await });
            let served = tokio::spawn(server.run(view, admin_stop.clone()));
            [served, history]
        });
        if config.allowlist.rules.is_empty() {
            warn!("the allowlist is empty: every endpoint will be rejected");
        }
        info!(
            agent = %config.name,
            connector = %config.connector,
            relays = config.relays.len(),
            transport = %config.transport,
            rules = config.allowlist.rules.len(),
            crypto = privlink_transport::crypto::PROVIDER,
            fips = privlink_transport::crypto::fips_mode(),
            post_quantum = %config.crypto.post_quantum,
            "agent starting"
        );
        for relay in &config.relays {
            links::start_relay(&shared, relay);
        }
        let tracker = shared.links.clone();
        shutdown.cancelled().await;
        info!(grace = ?config.shutdown_grace, "shutting down: draining relay links");
        // Whether a relay may be waiting to hear the close of a link: only then is the QUIC
        // endpoint kept open for its close to be repeated. An attempt to a relay that never
        // answered would keep it for three probe timeouts (3 s) for nobody.
        let relay_listening = shared.status.any_connected();
        shared.status.readiness().drain();
        shared.shutdown.cancel();
        drain::drain(&tracker, config.shutdown_grace, &shared.force, "streams").await;
        if relay_listening {
            shared.dialer.wait_idle(CLOSE_TIMEOUT).await;
        }
        admin_stop.cancel();
        for task in admin_task.into_iter().flatten() {
            let _ = task.await;
        }
        shared.policy.audit.close(audit::closing()).await;
        info!("agent stopped");
    }
}
