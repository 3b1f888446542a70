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
//! * `admin` — what the admin listener (`privlink-admin`) reports: readiness and status.
//! * [`admission`] — caps on unauthenticated tunnel connections, in all and per source.
//! * [`auth`] — token checks against stored digests, failed-attempt limiting.
//! * [`agents`] — accepting agents on both transports and driving their control streams.
//! * [`registry`] — connected agents, their verdicts, endpoint status, load-based choice.
//! * [`listen`] — endpoint accept loops and the policy applied on accept.
//! * [`dispatch`] — one client connection: choose an agent, open, splice, the open-reply gate.
//! * [`flow`] — the flow-log line and endpoint counters.
//! * `metrics` — the Prometheus metrics `/metrics` serves.
//! * [`status`] — [`RelayHandle`], the running relay's addresses and status views.
//!
//! [`Relay::bind`] binds every socket first (so a test or the demo can bind port 0 and read
//! the addresses back), then [`Relay::run`] serves until its shutdown token is cancelled.
#![forbid(unsafe_code)]

mod admin;
pub mod admission;
pub mod agents;
pub mod auth;
pub mod config;
pub mod dispatch;
pub mod flow;
pub mod listen;
mod metrics;
pub mod registry;
pub mod reload;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use privlink_transport::tunnel::CloseCode;
use privlink_transport::{drain, quic, tcp, tls};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use privlink_admin::AdminServer;

use crate::admin::RelayAdmin;
use crate::agents::AgentsContext;
pub use crate::config::RelayConfig;
use crate::listen::Endpoint;
use crate::metrics::RelayMetrics;
use crate::registry::Registry;
pub use crate::registry::{AgentView, EndpointStatus};
use crate::reload::CurrentConfig;
pub use crate::status::RelayHandle;

/// How long closing tunnel connections may take at the very end of a shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The tunnel's QUIC endpoint could not be set up.
    #[error("tunnel listener")]
    Tunnel(#[from] quic::QuicSetupError),
    /// The tunnel's TCP listener could not be bound.
    #[error("tunnel listener: cannot listen on TCP {addr}")]
    TunnelTcp {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The TLS identity is unusable.
    #[error("tunnel TLS")]
    Tls(#[from] tls::TlsError),
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
}

/// A relay whose sockets are bound, ready to [`run`](Relay::run).
#[derive(Debug)]
pub struct Relay {
    config: Arc<CurrentConfig>,
    quic: quinn::Endpoint,
    tunnel_tcp: TcpListener,
    tunnel_tls: Arc<rustls::ServerConfig>,
    listeners: Vec<(Arc<Endpoint>, TcpListener)>,
    admin: Option<AdminServer>,
    handle: RelayHandle,
}

impl Relay {
    /// Binds the tunnel endpoint and every endpoint listener.
    pub async fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        let tls = tls::tunnel_server_config(
            config.identity.chain.clone(),
            config.identity.key.clone_key(),
        )?;
        let tunnel_tls = Arc::new(tls);
        let reset_secret = config.identity.key.secret_der();
        let (quic, tunnel_tcp) =
            bind_tunnel(config.tunnel_listen, &tunnel_tls, reset_secret).await?;
        let tunnel_addr = tunnel_tcp
            .local_addr()
            .map_err(|source| RelayError::TunnelTcp { addr: config.tunnel_listen, source })?;

        let metrics = Arc::new(RelayMetrics::default());
        let mut listeners = Vec::new();
        let mut by_name = HashMap::new();
        for spec in &config.endpoints {
            let listener = tcp::listen(spec.listen).map_err(|source| RelayError::EndpointBind {
                endpoint: spec.name.clone(),
                addr: spec.listen,
                source,
            })?;
            let addr = listener.local_addr().map_err(|source| RelayError::EndpointBind {
                endpoint: spec.name.clone(),
                addr: spec.listen,
                source,
            })?;
            let endpoint = Arc::new(Endpoint::new(spec.clone(), Arc::clone(&metrics)));
            by_name.insert(spec.name.clone(), (Arc::clone(&endpoint), addr));
            listeners.push((endpoint, listener));
        }
        let admin = match &config.admin {
            Some(settings) => Some(
                AdminServer::bind(settings.listen, settings.token)
                    .map_err(|source| RelayError::AdminBind { addr: settings.listen, source })?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let config = Arc::new(CurrentConfig::new(config));
        let handle = RelayHandle::new(
            Arc::new(Registry::default()),
            Arc::default(),
            by_name,
            tunnel_addr,
            admin_addr,
            Arc::clone(&metrics),
            Arc::clone(&config),
        );
        Ok(Self { config, quic, tunnel_tcp, tunnel_tls, listeners, admin, handle })
    }

    /// A handle for status queries.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets connections finish for
    /// the configured grace period, and closes everything that is left.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { config, quic, tunnel_tcp, tunnel_tls, listeners, admin, handle } = self;
        let force = CancellationToken::new();
        let draining = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|server| {
            if let Ok(addr) = server.local_addr() {
                info!(admin = %addr, "admin listener: /healthz /readyz /api/v1/status");
            }
            let view = Arc::new(RelayAdmin { handle: handle.clone(), draining: draining.clone() });
            tokio::spawn(server.run(view, admin_stop.clone()))
        });
        let clients = TaskTracker::new();
        let agents = TaskTracker::new();
        let ctx = Arc::new(AgentsContext {
            config: Arc::clone(&config),
            registry: Arc::clone(handle.registry()),
            failures: Mutex::default(),
            admission: Arc::clone(handle.admission()),
            metrics: Arc::clone(handle.metrics()),
            draining: CancellationToken::new(),
        });

        let identity = Arc::new(reload::TunnelIdentity::new(quic.clone(), tunnel_tls));
        handle.set_spawner(reload::EndpointSpawner {
            registry: Arc::clone(handle.registry()),
            shutdown: shutdown.clone(),
            force: force.clone(),
            clients: clients.clone(),
            identity: Arc::clone(&identity),
        });
        info!(tunnel = %handle.tunnel_addr(), "relay listening for agents (QUIC on UDP, TLS on TCP)");
        let acceptors = TaskTracker::new();
        for (endpoint, listener) in listeners {
            let addr = handle.endpoint_addr(&endpoint.name);
            let spec = endpoint.spec();
            info!(
                endpoint = %endpoint.name,
                listen = %addr.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                destination = %spec.destination,
                connector = %spec.connector,
                "endpoint listening"
            );
            acceptors.spawn(listen::accept_clients(
                listener,
                endpoint,
                Arc::clone(handle.registry()),
                shutdown.clone(),
                force.clone(),
                clients.clone(),
            ));
        }
        let tunnel_stop = CancellationToken::new();
        acceptors.spawn(agents::accept_quic_agents(
            quic.clone(),
            Arc::clone(&ctx),
            tunnel_stop.clone(),
            agents.clone(),
        ));
        acceptors.spawn(agents::accept_tcp_agents(
            tunnel_tcp,
            identity,
            Arc::clone(&ctx),
            tunnel_stop.clone(),
            agents.clone(),
        ));
        acceptors.close();

        shutdown.cancelled().await;
        let grace = config.get().shutdown_grace;
        info!(?grace, "shutting down: no new connections; waiting for open ones");
        ctx.draining.cancel();
        draining.cancel(); // `/readyz` answers 503 from here on
        // Endpoint accept loops end on `shutdown`, dropping their listeners: new clients are
        // refused from here on. Agents stay connected so in-flight streams can finish.
        drain::drain(&clients, grace, &force, "connections").await;
        tunnel_stop.cancel();
        acceptors.wait().await;
        for connection in handle.registry().connections() {
            connection.close(CloseCode::Shutdown, "relay shutting down");
        }
        quic.close(quinn::VarInt::from_u32(CloseCode::Shutdown as u32), b"relay shutting down");
        agents.close();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            agents.wait().await;
            quic.wait_idle().await;
        })
        .await;
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        info!("relay stopped");
    }
}

/// Binds the tunnel's TCP (TLS) and UDP (QUIC) sockets on the same port number. With port 0
/// the kernel picks the TCP port — the crowded space, where every outgoing connection holds an
/// ephemeral port — and UDP follows it; if that UDP port is taken, a new pair is tried.
async fn bind_tunnel(
    listen: SocketAddr,
    tls: &Arc<rustls::ServerConfig>,
    reset_secret: &[u8],
) -> Result<(quinn::Endpoint, TcpListener), RelayError> {
    const ATTEMPTS: usize = 32;
    let mut attempt = 1;
    loop {
        let tcp =
            tcp::listen(listen).map_err(|source| RelayError::TunnelTcp { addr: listen, source })?;
        let port = tcp
            .local_addr()
            .map_err(|source| RelayError::TunnelTcp { addr: listen, source })?
            .port();
        let udp_addr = SocketAddr::new(listen.ip(), port);
        match quic::relay_endpoint(udp_addr, (**tls).clone(), reset_secret) {
            Ok(quic) => return Ok((quic, tcp)),
            Err(quic::QuicSetupError::Bind(_, e))
                if listen.port() == 0
                    && attempt < ATTEMPTS
                    && e.kind() == std::io::ErrorKind::AddrInUse =>
            {
                tracing::debug!(%udp_addr, "UDP side of the tunnel port is taken ({e}); trying another");
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
