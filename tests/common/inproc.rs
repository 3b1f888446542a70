//! The in-process harness: a relay and agents running in the test's own runtime on loopback
//! (real sockets, real QUIC, real TLS), configured directly from typed values, with waits on
//! the relay's status.

use std::net::SocketAddr;
use std::time::Duration;

use privlink_agent::Agent;
use privlink_agent::allowlist::Allowlist;
use privlink_agent::config::{AgentConfig, RelayAddress, TransportChoice};
use privlink_protocol::acl::Acl;
use privlink_protocol::destination::Host;
use privlink_protocol::token::{Token, TokenDigest};
use privlink_relay::config::{ConnectorSpec, EndpointSpec, RelayConfig, TlsIdentity};
use privlink_relay::{EndpointStatus, Relay, RelayHandle};
use privlink_transport::pki::{CertificateAuthority, Issued};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::servers::{hex, random_bytes};

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(15);
pub const CONNECTOR: &str = "test-connector";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A CA and a relay certificate for localhost / 127.0.0.1.
pub struct Pki {
    pub ca: CertificateAuthority,
    pub relay: Issued,
}

pub fn pki() -> Pki {
    let ca = CertificateAuthority::new("privlink test CA").expect("CA");
    let relay = ca.issue_server(&["localhost", "127.0.0.1"]).expect("relay cert");
    Pki { ca, relay }
}

/// An endpoint on an ephemeral loopback port with generous defaults.
pub fn endpoint(name: &str, destination: SocketAddr) -> EndpointSpec {
    EndpointSpec {
        name: name.to_owned(),
        connector: CONNECTOR.to_owned(),
        destination: destination.to_string().parse().expect("destination"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        inactivity_timeout: Duration::from_secs(60),
        stall_timeout: Duration::from_secs(30),
        max_connections: 1024,
        per_source: Default::default(),
        max_duration: None,
        acl: Acl::default(),
        open: privlink_relay::config::OpenRetry::default(),
        server_names: Vec::new(),
        listener: None,
        proxy_protocol: None,
        send_proxy_protocol: None,
        preread_timeout: privlink_relay::config::DEFAULT_PREREAD_TIMEOUT,
    }
}

/// A shared listener `name` on an ephemeral loopback port routing `routes` (server name,
/// endpoint), with defaults; a test sets what it is about on the result.
pub fn listener(name: &str, routes: &[(&str, &str)]) -> privlink_relay::config::ListenerSpec {
    privlink_relay::config::ListenerSpec {
        name: name.to_owned(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        preread_timeout: privlink_relay::config::DEFAULT_PREREAD_TIMEOUT,
        per_source: Default::default(),
        max_duration: None,
        acl: Acl::default(),
        proxy_protocol: None,
        routes: routes.iter().map(|(n, e)| ((*n).to_owned(), (*e).to_owned())).collect(),
    }
}

/// A relay configuration on loopback for `pki`'s certificate and `token`'s connector.
pub fn relay_config(
    pki: &Pki,
    token: &str,
    endpoints: Vec<EndpointSpec>,
    listeners: Vec<privlink_relay::config::ListenerSpec>,
) -> RelayConfig {
    RelayConfig {
        tunnel_listen: "127.0.0.1:0".parse().expect("addr"),
        identity: TlsIdentity {
            chain: vec![pki.relay.cert_der.clone()],
            key: pki.relay.key_der.clone_key(),
        },
        admin: None,
        shutdown_grace: Duration::from_secs(5),
        // Not what these tests are about (tests/budget.rs is): large enough that no burst
        // of theirs meets it, whatever this machine's memory.
        buffer_budget: 16 << 30,
        stream_window: privlink_transport::limits::STREAM_RECEIVE_WINDOW,
        crypto: Default::default(),
        connectors: vec![ConnectorSpec {
            name: CONNECTOR.to_owned(),
            token_sha256: vec![TokenDigest::of(token.as_bytes())],
        }],
        endpoints,
        fleet: None,
        listeners,
        source_files: Vec::new(),
        audit: None,
        source: None,
    }
}

/// A relay on loopback, plus any agents the test starts.
pub struct Harness {
    pub relay: RelayHandle,
    pub pki: Pki,
    pub token: String,
    relay_stop: CancellationToken,
    tasks: TaskTracker,
}

impl Harness {
    pub async fn start(endpoints: Vec<EndpointSpec>) -> Self {
        Self::start_with_admin(endpoints, None).await
    }

    /// [`Harness::start`] with an admin listener.
    pub async fn start_with_admin(
        endpoints: Vec<EndpointSpec>,
        admin: Option<privlink_relay::config::AdminSettings>,
    ) -> Self {
        Self::start_with(endpoints, Vec::new(), admin).await
    }

    /// [`Harness::start`] with shared listeners and an admin listener.
    pub async fn start_with(
        endpoints: Vec<EndpointSpec>,
        listeners: Vec<privlink_relay::config::ListenerSpec>,
        admin: Option<privlink_relay::config::AdminSettings>,
    ) -> Self {
        Self::start_tuned(endpoints, listeners, |config| config.admin = admin).await
    }

    /// [`Harness::start_with`], the relay's configuration changed by `tune` first.
    pub async fn start_tuned(
        endpoints: Vec<EndpointSpec>,
        listeners: Vec<privlink_relay::config::ListenerSpec>,
        tune: impl FnOnce(&mut RelayConfig),
    ) -> Self {
        init_tracing();
        let pki = pki();
        let token = format!("test-token-{}", hex(&random_bytes(8)));
        let mut config = relay_config(&pki, &token, endpoints, listeners);
        tune(&mut config);
        let relay = Relay::bind(config).await.expect("relay binds");
        let handle = relay.handle();
        let relay_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(relay.run(relay_stop.clone()));
        Self { relay: handle, pki, token, relay_stop, tasks }
    }

    /// A configuration for this relay (its certificate and connector) with `endpoints` and
    /// `listeners`, to reload it with.
    pub fn config_with(
        &self,
        endpoints: Vec<EndpointSpec>,
        listeners: Vec<privlink_relay::config::ListenerSpec>,
    ) -> RelayConfig {
        relay_config(&self.pki, &self.token, endpoints, listeners)
    }

    /// An agent configuration for this relay admitting `allow`, on `transport`.
    pub fn agent_config(&self, transport: TransportChoice, allow: &[String]) -> AgentConfig {
        AgentConfig {
            name: "test-agent".to_owned(),
            connector: CONNECTOR.to_owned(),
            token: Token::new(self.token.clone()),
            relays: vec![RelayAddress {
                host: Host::Ip([127, 0, 0, 1].into()),
                port: self.relay.tunnel_addr().port(),
            }],
            relay_roots: vec![self.pki.ca.identity.cert_der.clone()],
            relay_ca: None,
            transport,
            quic_fallback_after: Duration::from_secs(2),
            quic_probe_interval: Duration::from_millis(200),
            allowlist: Allowlist {
                rules: allow.iter().map(|r| r.parse().expect("rule")).collect(),
            },
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            dns_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
            // Not what these tests are about (tests/budget.rs is): large enough that no burst
            // of theirs meets it, whatever this machine's memory.
            buffer_budget: 16 << 30,
            stream_window: privlink_transport::limits::STREAM_RECEIVE_WINDOW,
            crypto: Default::default(),
            admin: None,
            proxy: None,
            source_files: Vec::new(),
            audit: None,
            source: None,
        }
    }

    /// Starts an agent whose status and admin listener the test reads; [`WatchedAgent::stop`]
    /// stops it and waits until it has.
    pub fn watch_agent(&self, config: AgentConfig) -> WatchedAgent {
        let agent = Agent::new(config).expect("agent starts");
        let (status, admin) = (agent.status(), agent.admin_addr());
        let stop = CancellationToken::new();
        let running = tokio::spawn(agent.run(stop.clone()));
        WatchedAgent { status, admin, stop, running }
    }

    /// Starts an agent; cancel the returned token to stop it.
    pub fn spawn_agent(&self, config: AgentConfig) -> CancellationToken {
        let stop = CancellationToken::new();
        let agent = Agent::new(config).expect("agent starts");
        self.tasks.spawn(agent.run(stop.clone()));
        stop
    }

    /// Waits until `endpoint` has `want`, failing the test with the last status otherwise.
    pub async fn wait_status(
        &self,
        endpoint: &str,
        want: impl Fn(&EndpointStatus) -> bool,
    ) -> EndpointStatus {
        let status =
            self.relay.wait_for_status(endpoint, WAIT, &want).await.expect("known endpoint");
        assert!(want(&status), "endpoint {endpoint} stayed {status:?}");
        status
    }

    /// A relay with one endpoint `e` in front of `destination`, and an agent on `transport`
    /// that allows it and has had it approved.
    pub async fn single(
        transport: TransportChoice,
        destination: SocketAddr,
    ) -> (Self, CancellationToken) {
        let harness = Self::start(vec![endpoint("e", destination)]).await;
        let agent =
            harness.spawn_agent(harness.agent_config(transport, &[destination.to_string()]));
        harness.wait_approved("e").await;
        (harness, agent)
    }

    pub async fn wait_approved(&self, endpoint: &str) {
        self.wait_status(endpoint, |s| *s == EndpointStatus::Approved).await;
    }

    pub fn addr(&self, endpoint: &str) -> SocketAddr {
        self.relay.endpoint_addr(endpoint).expect("endpoint exists")
    }

    /// Starts the relay's graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.relay_stop.cancel();
    }

    /// Stops the relay and every agent and waits for them.
    pub async fn shutdown(self, agents: &[CancellationToken]) {
        for agent in agents {
            agent.cancel();
        }
        self.relay_stop.cancel();
        self.tasks.close();
        tokio::time::timeout(WAIT, self.tasks.wait()).await.expect("relay and agents stop in time");
    }
}

/// An agent started by [`Harness::watch_agent`].
pub struct WatchedAgent {
    /// Its links as it sees them.
    pub status: std::sync::Arc<privlink_agent::status::AgentStatus>,
    /// Its admin listener, when its configuration has one.
    pub admin: Option<SocketAddr>,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

impl WatchedAgent {
    /// Stops it (a drain) and waits until it has stopped.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.running).await.expect("the agent stops").expect("join");
    }
}
