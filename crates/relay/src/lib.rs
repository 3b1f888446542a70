//! The privlink relay: runs where the clients are, accepts agents' outbound tunnel
//! connections, and exposes endpoints whose client connections it forwards, one tunnel
//! stream each, to an agent that approved the endpoint.
//!
//! It is a thin driver over `privlink-protocol` (the control conversation's relay-side state
//! machine) and `privlink-transport` (tunnels, copy, splice): it owns policy — ACL,
//! connection limits, inactivity timeouts, which agent serves a connection — the registry of
//! agents and the shutdown sequence. It never terminates the clients' TLS: bytes pass
//! through unread.
//!
//! # Layout
//!
//! * [`config`] — `relay.toml` and its validation into [`RelayConfig`].
//! * `admin` — what the admin listener (`privlink-admin`) reports: readiness (the latch in
//!   [`RelayHandle::readiness`]), the typed status and connections snapshots, scraped state.
//! * [`admission`] — caps on unauthenticated tunnel connections, in all and per source.
//! * `audit` — the records the relay writes to its audit trail (`[audit]`).
//! * [`auth`] — token checks against stored digests, failed-attempt limiting.
//! * `source` — a source address as per-source limits count it (IPv4, or an IPv6 /64).
//! * `source_limits` — per-source restraint: connections open and new ones per second, in a
//!   bounded table.
//! * [`agents`] — accepting agents on both transports and driving their control streams.
//! * [`registry`] — connected agents, their verdicts, endpoint status, load-based choice.
//! * [`fleet`] — `[fleet]`: this relay's id and every member's, told to agents so they cover
//!   every relay behind one balancer.
//! * `endpoint` — endpoint state at run time (policy, slots, live connections, stop tokens)
//!   and the table of endpoints by name.
//! * `listen` — the one owner of endpoint accept loops, and the policy applied on accept.
//! * `connect` — an `http-connect` endpoint's client: its CONNECT head read and judged, its
//!   answers.
//! * `dispatch` — one client connection: choose an agent, open, retry, splice, flow log.
//! * `open` — the open exchange: the open-reply gate, the replay copy, the retry decision.
//! * `preread` — an endpoint with server names reads the ClientHello first (SNI pinning).
//! * `refuse` — turning a client away before a destination byte reached it: TLS alerts or a
//!   reset, and the flow-log line of a refusal.
//! * `shared_port` — a shared TLS port (`[[listener]]`) at run time: its routes by server name.
//! * [`flow`] — the flow-log line and endpoint counters.
//! * `metrics` — the Prometheus metrics `/metrics` serves, rendered from scraped state.
//! * [`reload`] — hot reload: the plan of a new configuration and applying it.
//! * [`status`] — [`RelayHandle`], the running relay's addresses and status views.
//!
//! [`Relay::bind`] binds every socket first (so a test or the demo can bind port 0 and read
//! the addresses back), then [`Relay::run`] serves until its shutdown token is cancelled.
#![forbid(unsafe_code)]

mod admin;
pub mod admission;
pub mod agents;
mod audit;
pub mod auth;
pub mod config;
mod connect;
mod dispatch;
mod endpoint;
pub mod fleet;
pub mod flow;
mod listen;
mod metrics;
mod open;
mod preread;
mod refuse;
pub mod registry;
pub mod reload;
mod shared_port;
mod source;
mod source_limits;
pub mod status;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use privlink_transport::audit::{AuditTrail, TrailError};
use privlink_transport::budget::BufferBudget;
use privlink_transport::listener::{ListenError, TunnelListener};
use privlink_transport::tcp;
use privlink_transport::tunnel::CloseCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use privlink_admin::AdminServer;

use crate::admin::RelayAdmin;
use crate::admission::{Admission, PendingCaps};
use crate::agents::AgentsContext;
use crate::audit::RelayAudit;
use crate::config::CurrentConfig;
pub use crate::config::RelayConfig;
use crate::endpoint::{Endpoint, EndpointTable};
use crate::fleet::Fleet;
use crate::listen::Listeners;
use crate::metrics::RelayMetrics;
use crate::registry::Registry;
pub use crate::registry::{AgentView, EndpointStatus};
use crate::reload::Reloader;
use crate::shared_port::SharedPort;
pub use crate::status::RelayHandle;

/// How long closing tunnel connections may take at the very end of a shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The tunnel listener (QUIC and TLS/TCP, its identity) could not be set up.
    #[error(transparent)]
    Tunnel(#[from] ListenError),
    /// The admin listener could not be bound.
    #[error("admin listener: cannot listen on {addr}")]
    AdminBind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// An endpoint's listener could not be bound.
    #[error("endpoint `{endpoint}`: cannot listen on {addr}")]
    EndpointBind {
        /// Endpoint name.
        endpoint: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The audit trail could not be opened or continued.
    #[error(transparent)]
    Audit(#[from] TrailError),
    /// A shared listener could not be bound.
    #[error("listener `{listener}`: cannot listen on {addr}")]
    ListenerBind {
        /// Listener name.
        listener: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// A relay whose sockets are bound, ready to [`run`](Relay::run).
#[derive(Debug)]
pub struct Relay {
    config: Arc<CurrentConfig>,
    tunnel: TunnelListener,
    /// The endpoints bound at start, started by `run`.
    bound: Vec<(Arc<Endpoint>, TcpListener)>,
    /// The shared listeners bound at start, started by `run`.
    ports: Vec<(Arc<SharedPort>, TcpListener)>,
    listeners: Arc<Listeners>,
    admin: Option<AdminServer>,
    handle: RelayHandle,
}

impl Relay {
    /// Binds the tunnel endpoint and every endpoint listener.
    pub async fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        let identity = (config.identity.chain.clone(), config.identity.key.clone_key());
        let (post_quantum, window) = (config.crypto.post_quantum, config.stream_window);
        let tunnel = TunnelListener::bind(config.tunnel_listen, identity, post_quantum, window)?;

        let trail = match &config.audit {
            Some(settings) => AuditTrail::open(settings, audit::opening())?,
            None => AuditTrail::off(),
        };
        let audit = Arc::new(RelayAudit::new(trail));
        audit.config_loaded(&config);
        let metrics = Arc::new(RelayMetrics::default());
        let registry = Arc::new(Registry::default());
        let budget = Arc::new(
            BufferBudget::new(config.buffer_budget).for_stream_window(config.stream_window),
        );
        let listeners = Arc::new(Listeners::new(
            Arc::clone(&registry),
            (Arc::clone(&metrics), Arc::clone(&audit)),
            budget,
        ));
        let endpoints = Arc::new(EndpointTable::default());
        let mut ports = Vec::new();
        for spec in &config.listeners {
            let bind_error = |source| RelayError::ListenerBind {
                listener: spec.name.clone(),
                addr: spec.listen,
                source,
            };
            let listener = tcp::listen(spec.listen).map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            let port = SharedPort::new(
                spec.clone(),
                addr,
                (Arc::clone(&metrics), Arc::clone(&audit)),
                listeners.child_stop(),
            );
            ports.push((Arc::new(port), listener));
        }
        let mut bound = Vec::new();
        for spec in &config.endpoints {
            if let Some(name) = &spec.listener {
                // Reached through its shared listener: no socket of its own.
                let addr = ports.iter().find(|(p, _)| p.name == *name).map(|(p, _)| p.addr);
                let endpoint = listeners.endpoint(spec.clone());
                endpoints.insert(endpoint, addr.unwrap_or(spec.listen));
                continue;
            }
            let bind_error = |source| RelayError::EndpointBind {
                endpoint: spec.name.clone(),
                addr: spec.listen,
                source,
            };
            let listener = tcp::listen(spec.listen).map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            let endpoint = listeners.endpoint(spec.clone());
            endpoints.insert(Arc::clone(&endpoint), addr);
            bound.push((endpoint, listener));
        }
        let admin = match &config.admin {
            Some(settings) => Some(
                AdminServer::bind(settings)
                    .map_err(|source| RelayError::AdminBind { addr: settings.listen, source })?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let fleet = config.fleet.as_ref().map(|spec| Arc::new(Fleet::new(spec)));
        let config = Arc::new(CurrentConfig::new(config));
        let reloader = Arc::new(Reloader {
            config: Arc::clone(&config),
            endpoints,
            listeners: Arc::clone(&listeners),
            tunnel: tunnel.endpoint(),
            registry,
            metrics,
            audit,
            fleet,
            ports: std::sync::RwLock::new(
                ports.iter().map(|(port, _)| (port.name.clone(), Arc::clone(port))).collect(),
            ),
        });
        // Read after the binary raised the soft limit to the hard one.
        let caps = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
            Ok((soft, _)) => PendingCaps::for_open_files(soft),
            Err(_) => PendingCaps::default(),
        };
        tracing::debug!(total = caps.total, per_source = caps.per_source, "pending tunnel caps");
        let admission = Arc::new(Admission::new(caps));
        let handle = RelayHandle::new(reloader, admission, tunnel.local_addr(), admin_addr);
        Ok(Self { config, tunnel, bound, ports, listeners, admin, handle })
    }

    /// A handle for status queries.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets connections finish for
    /// the configured grace period, and closes everything that is left.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { config, tunnel, bound, ports, listeners, admin, handle } = self;
        let tunnel_endpoint = tunnel.endpoint();
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|server| {
            if let Ok(addr) = server.local_addr() {
                info!(admin = %addr, "admin listener: /healthz /readyz /api/v1/status");
            }
            let view = Arc::new(RelayAdmin { handle: handle.clone() });
            tokio::spawn(server.run(view, admin_stop.clone()))
        });
        let agents = TaskTracker::new();
        let ctx = Arc::new(AgentsContext {
            config: Arc::clone(&config),
            registry: Arc::clone(handle.registry()),
            failures: Mutex::default(),
            admission: Arc::clone(handle.admission()),
            metrics: Arc::clone(handle.metrics()),
            readiness: handle.readiness().clone(),
            fleet: handle.fleet().cloned(),
            audit: Arc::clone(handle.audit()),
        });
        let fleet_stop = CancellationToken::new();
        let fleet_task = match (handle.fleet(), config.get().fleet.clone()) {
            (Some(fleet), Some(spec)) => {
                let fleet = Arc::clone(fleet);
                let stop = fleet_stop.clone();
                Some(tokio::spawn(async move { fleet.refresh(spec, stop).await }))
            }
            _ => None,
        };

        let posture = privlink_transport::crypto::Posture::of(config.get().crypto.post_quantum);
        info!(
            tunnel = %handle.tunnel_addr(),
            crypto = posture.provider,
            fips = posture.fips,
            post_quantum = %posture.post_quantum,
            "relay listening for agents (QUIC on UDP, TLS on TCP)"
        );
        for (endpoint, listener) in bound {
            let addr = handle.endpoint_addr(&endpoint.name);
            let spec = endpoint.spec();
            info!(
                endpoint = %endpoint.name,
                listen = %addr.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                destination = %spec.destination,
                connector = %spec.connector,
                "endpoint listening"
            );
            listeners.start(endpoint, listener);
        }
        for (port, listener) in ports {
            let routing = port.routing();
            info!(
                listener = %port.name,
                listen = %port.addr,
                routes = routing.spec.routes.len(),
                "shared listener listening (routed by server name)"
            );
            listeners.start_shared(port, listener, Arc::clone(handle.endpoint_table()));
        }
        // Endpoint status changes, and a progress record of every open connection every
        // `periodic`; the status page's history, sampled every second.
        let every = config.get().audit.as_ref().map(|settings| settings.periodic);
        let (watched, stop) = (handle.clone(), fleet_stop.clone());
        let progress_task = tokio::spawn(async move { watched.watch_for_audit(every, stop).await });
        let (sampled, stop) = (handle.clone(), fleet_stop.clone());
        let history_task = tokio::spawn(async move { admin::keep_history(&sampled, stop).await });
        let acceptors = TaskTracker::new();
        let tunnel_stop = CancellationToken::new();
        acceptors.spawn(agents::accept_agents(
            tunnel,
            Arc::clone(&ctx),
            tunnel_stop.clone(),
            agents.clone(),
        ));
        acceptors.close();

        shutdown.cancelled().await;
        let grace = config.get().shutdown_grace;
        info!(?grace, "shutting down: no new connections; waiting for open ones");
        // `/readyz` answers 503 from here on, and every agent session tells its agent.
        handle.readiness().drain();
        // Endpoint accept loops end now, dropping their listeners: new clients are refused
        // from here on. Agents stay connected so in-flight streams can finish.
        listeners.stop_accepting();
        listeners.drain(grace).await;
        tunnel_stop.cancel();
        acceptors.wait().await;
        for connection in handle.registry().connections() {
            connection.close(CloseCode::Shutdown, "relay shutting down");
        }
        tunnel_endpoint.close(CloseCode::Shutdown, "relay shutting down");
        agents.close();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            agents.wait().await;
            tunnel_endpoint.wait_idle().await;
        })
        .await;
        admin_stop.cancel();
        fleet_stop.cancel();
        for task in admin_task.into_iter().chain(fleet_task).chain([progress_task, history_task]) {
            let _ = task.await;
        }
        handle.audit().trail.close(audit::closing()).await;
        info!("relay stopped");
    }
}
