//! Shared pieces of the end-to-end tests: a private CA, a relay and agents running in this
//! process on loopback (real sockets, real QUIC, real TLS), and small destination servers.
#![allow(dead_code, unreachable_pub, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use privlink_agent::Agent;
use privlink_agent::allowlist::Allowlist;
use privlink_agent::config::{AgentConfig, RelayAddress, TransportChoice};
use privlink_protocol::acl::Acl;
use privlink_protocol::destination::Host;
use privlink_protocol::token::Token;
use privlink_relay::config::{ConnectorSpec, EndpointSpec, RelayConfig, TlsIdentity};
use privlink_relay::{EndpointStatus, Relay, RelayHandle};
use privlink_transport::pki::{CertificateAuthority, Issued};
use ring::rand::SecureRandom as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
        max_connections: 1024,
        acl: Acl::default(),
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
        init_tracing();
        let pki = pki();
        let token = format!("test-token-{}", hex(&random_bytes(8)));
        let config = RelayConfig {
            tunnel_listen: "127.0.0.1:0".parse().expect("addr"),
            identity: TlsIdentity {
                chain: vec![pki.relay.cert_der.clone()],
                key: pki.relay.key_der.clone_key(),
            },
            admin_listen: None,
            shutdown_grace: Duration::from_secs(5),
            connectors: vec![ConnectorSpec {
                name: CONNECTOR.to_owned(),
                token_sha256: privlink_protocol::token::TokenDigest::of(token.as_bytes()),
            }],
            endpoints,
        };
        let relay = Relay::bind(config).await.expect("relay binds");
        let handle = relay.handle();
        let relay_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(relay.run(relay_stop.clone()));
        Self { relay: handle, pki, token, relay_stop, tasks }
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
            transport,
            quic_fallback_after: Duration::from_secs(2),
            quic_probe_interval: Duration::from_millis(200),
            allowlist: Allowlist {
                rules: allow.iter().map(|r| r.parse().expect("rule")).collect(),
            },
            connect_timeout: Duration::from_secs(5),
            dns_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
        }
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

/// The allow rule that admits exactly `addr`.
pub fn rule_for(addr: SocketAddr) -> String {
    addr.to_string()
}

/// A TCP echo server; each connection echoes until EOF, then closes its write side.
pub async fn echo_server() -> SocketAddr {
    let listener =
        privlink_transport::tcp::listen("127.0.0.1:0".parse().expect("addr")).expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A server that reads until EOF and only then answers with the SHA-256 of what it read.
pub async fn reply_after_eof_server() -> SocketAddr {
    let listener =
        privlink_transport::tcp::listen("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if socket.read_to_end(&mut got).await.is_ok() {
                    let _ = socket.write_all(&sha256(&got)).await;
                    let _ = socket.shutdown().await;
                }
            });
        }
    });
    addr
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("random");
    bytes
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

pub use privlink_protocol::token::hex;

/// Sends `payload` through `socket` while reading everything back; returns what came back.
pub async fn echo_round_trip(socket: TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = socket.into_split();
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.expect("write payload");
        w.shutdown().await.expect("shutdown write");
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.expect("read echo");
    writer.await.expect("writer");
    back
}

/// Connects from a chosen loopback source address.
pub async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source"))?;
    socket.connect(to).await
}

/// True when the relay closed the connection without forwarding: the connect itself is reset,
/// or the first read sees EOF or a reset before any echo.
pub async fn is_refused(connected: std::io::Result<TcpStream>) -> bool {
    let Ok(mut socket) = connected else {
        return true;
    };
    let _ = socket.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(WAIT, socket.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("connection neither served nor refused within {WAIT:?}"),
    }
}

/// A gate in front of the relay's tunnel port, standing in for a network that may drop UDP:
/// one port number that forwards TCP always and UDP only while opened.
pub struct TunnelGate {
    /// The port agents dial (TCP and UDP).
    pub port: u16,
    relay: SocketAddr,
    udp: Option<tokio::task::JoinHandle<()>>,
}

impl TunnelGate {
    /// Starts forwarding TCP on a fresh port to `relay`; UDP is dropped (nothing listens).
    pub async fn tcp_only(relay: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(relay).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port, relay, udp: None }
    }

    /// Starts forwarding UDP too (one agent's datagrams to the relay and back).
    pub async fn open_udp(&mut self) {
        let front =
            tokio::net::UdpSocket::bind(("127.0.0.1", self.port)).await.expect("bind UDP gate");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        back.connect(self.relay).await.expect("connect");
        self.udp = Some(tokio::spawn(async move {
            let mut peer = None;
            let (mut from_agent, mut from_relay) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            loop {
                tokio::select! {
                    received = front.recv_from(&mut from_agent) => {
                        let Ok((n, agent)) = received else { break };
                        peer = Some(agent);
                        let _ = back.send(&from_agent[..n]).await;
                    }
                    received = back.recv(&mut from_relay) => {
                        let Ok(n) = received else { break };
                        if let Some(agent) = peer {
                            let _ = front.send_to(&from_relay[..n], agent).await;
                        }
                    }
                }
            }
        }));
    }
}

impl TunnelGate {
    /// Stops forwarding UDP: datagrams to the port go nowhere from now on.
    pub fn close_udp(&mut self) {
        if let Some(udp) = self.udp.take() {
            udp.abort();
        }
    }
}

impl Drop for TunnelGate {
    fn drop(&mut self) {
        if let Some(udp) = self.udp.take() {
            udp.abort();
        }
    }
}

pub const BIN: &str = env!("CARGO_BIN_EXE_privlink");
/// Generous bound for process start-up and reconnection (the relay notices a killed peer
/// through the QUIC idle timeout, 8 s).
pub const PROCESS_WAIT: Duration = Duration::from_secs(30);

/// The files a one-endpoint tunnel of real `privlink` processes needs; see
/// [`write_tunnel_files`].
pub struct TunnelFiles<'a> {
    /// Where the relay's tunnel listens (`ip:port`); the IP is also the relay certificate's name.
    pub tunnel_listen: &'a str,
    /// The endpoint's name.
    pub endpoint: &'a str,
    /// Where the endpoint listens.
    pub endpoint_listen: &'a str,
    /// The endpoint's destination, `host:port`.
    pub destination: &'a str,
    /// Lines appended to the `[[endpoint]]` table (timeouts, limits, `[endpoint.acl]`).
    pub endpoint_extra: &'a str,
    /// Agent settings beyond connector, token, relay and CA (`transport = …`, …).
    pub agent_extra: &'a str,
    /// The destination of the agent's one `[[allow]]` rule.
    pub allow: &'a str,
}

/// Runs `privlink certs init` into `dir/certs` (relay certificate for the tunnel's IP), writes
/// a token there, and `relay.toml` / `agent.toml` into `dir` (paths relative to it); returns
/// the two config paths.
pub fn write_tunnel_files(dir: &std::path::Path, files: &TunnelFiles<'_>) -> (String, String) {
    let certs = dir.join("certs");
    let relay_name = files.tunnel_listen.rsplit_once(':').map_or(files.tunnel_listen, |(ip, _)| ip);
    let status = Command::new(BIN)
        .args(["certs", "init", "--dir", certs.to_str().expect("utf-8"), "--name", relay_name])
        .output()
        .expect("run certs init");
    assert!(status.status.success(), "certs init: {}", String::from_utf8_lossy(&status.stderr));
    let token = format!("plk_test_{}", hex(&random_bytes(12)));
    std::fs::write(certs.join("token"), &token).expect("token");
    let digest = hex(&sha256(token.as_bytes()));
    let TunnelFiles { tunnel_listen, endpoint, endpoint_listen, destination, .. } = files;
    let relay = format!(
        "[tunnel]\nlisten = \"{tunnel_listen}\"\ncert = \"certs/relay.crt\"\nkey = \"certs/relay.key\"\n\n\
         [[connector]]\nname = \"tunnel\"\ntoken_sha256 = \"{digest}\"\n\n\
         [[endpoint]]\nname = \"{endpoint}\"\nconnector = \"tunnel\"\ndestination = \"{destination}\"\n\
         listen = \"{endpoint_listen}\"\n{}\n",
        files.endpoint_extra
    );
    let agent = format!(
        "connector = \"tunnel\"\ntoken_file = \"certs/token\"\nrelays = [\"{tunnel_listen}\"]\n\
         relay_ca = \"certs/ca.crt\"\n{}\n\n[[allow]]\ndestination = \"{}\"\n",
        files.agent_extra, files.allow
    );
    let relay_path = dir.join("relay.toml");
    let agent_path = dir.join("agent.toml");
    std::fs::write(&relay_path, relay).expect("relay.toml");
    std::fs::write(&agent_path, agent).expect("agent.toml");
    (relay_path.to_str().expect("utf-8").to_owned(), agent_path.to_str().expect("utf-8").to_owned())
}

/// A child process whose stderr lines are collected by a thread.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// Runs `privlink ARGS`.
    pub fn privlink(args: &[&str]) -> Self {
        let mut command = Command::new(BIN);
        command.args(args);
        Self::spawn(command)
    }

    /// Runs a prepared command, collecting its stderr (and stdout, for helper scripts).
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start process");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        let tx_out = tx.clone();
        std::thread::spawn(move || forward_lines(stderr, &tx));
        std::thread::spawn(move || forward_lines(stdout, &tx_out));
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits for a log line containing `needle` (a readiness signal), failing after a bound.
    pub fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {PROCESS_WAIT:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The process id (for reading its memory use).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last line seen.
    pub fn last_seen(&self) -> &str {
        self.seen.last().map_or("", String::as_str)
    }

    /// Whether a line seen so far contains `needle`.
    pub fn seen_contains(&self, needle: &str) -> bool {
        self.seen.iter().any(|l| l.contains(needle))
    }

    /// SIGKILL and reap (the value can then be replaced by a restarted process).
    pub fn kill_hard(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal_terminate();
        self.child.wait().expect("wait")
    }

    /// Sends SIGTERM without waiting for the process to exit.
    pub fn signal_terminate(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    }

    /// Waits for the exit of a process that has announced it is stopping.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(from: impl std::io::Read, to: &mpsc::Sender<String>) {
    for line in BufReader::new(from).lines().map_while(Result::ok) {
        if to.send(line).is_err() {
            break;
        }
    }
}
