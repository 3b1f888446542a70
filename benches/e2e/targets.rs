//! The targets measured besides the direct connection: HAProxy in TCP mode (one, or two
//! chained) and privlink's relay and agent as real processes.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use privlink_testbed::netns::sh;
use privlink_testbed::process::{Placement, Running, Tunnel, TunnelFiles, write_tunnel_files};

/// The `privlink` binary of this build.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_privlink");

/// A free loopback port (bound, then released for a child process to take).
pub(crate) fn free_port(ip: &str) -> u16 {
    StdListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("free port").port()
}

/// Waits until something accepts TCP connections on `addr` (bounded).
pub(crate) fn wait_listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// HAProxy in TCP mode in front of the backend; installed from Debian packages if missing.
pub(crate) fn start_haproxy(dir: &Path, backend: SocketAddr) -> Option<(Running, SocketAddr)> {
    if !sh("sh", &["-c", "command -v haproxy"]).0 {
        eprintln!("installing haproxy (Debian package) …");
        let (ok, out) = sh(
            "sh",
            &[
                "-c",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy || \
                    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy)",
            ],
        );
        if !ok {
            eprintln!("HAProxy column skipped: could not install haproxy: {out}");
            return None;
        }
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    // maxconn stays under this machine's open-file limit (HAProxy needs two per connection).
    let config = format!(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  \
         timeout server 300s\n\nfrontend bench\n  bind {addr}\n  default_backend backend\n\n\
         backend backend\n  server b1 {backend}\n"
    );
    let path = dir.join(format!("haproxy-{}.cfg", addr.port()));
    std::fs::write(&path, config).expect("haproxy config");
    let mut command = Command::new("haproxy");
    command.args(["-db", "-f", path.to_str().expect("utf-8")]);
    let running = Running::spawn(command);
    if !wait_listening(addr) {
        eprintln!("HAProxy column skipped: haproxy did not listen on {addr}");
        return None;
    }
    Some((running, addr))
}

/// privlink as a benchmark target: a relay and an agent, real processes brought up by the test
/// bed from generated configs, and the endpoint they serve.
pub(crate) struct PrivlinkTarget {
    pub(crate) tunnel: Tunnel,
    pub(crate) endpoint: SocketAddr,
    _files: tempfile::TempDir,
}

impl PrivlinkTarget {
    /// Starts a relay whose tunnel listens on `relay_ip` and an agent that dials it over
    /// `transport`; the endpoint forwards to `destination`. With `namespaces` = (cloud, vnet)
    /// the relay runs in the first and the agent in the second. With `audit`, both write an
    /// audit trail (`[audit]`, defaults) into the target's directory.
    pub(crate) fn start(
        dir: &Path,
        relay_ip: &str,
        (transport, audit): (&str, bool),
        destination: SocketAddr,
        namespaces: Option<(&str, &str)>,
    ) -> Self {
        let tunnel_port = if namespaces.is_some() { 7443 } else { free_port(relay_ip) };
        let endpoint_port = if namespaces.is_some() { 8443 } else { free_port("127.0.0.1") };
        let files = tempfile::tempdir_in(dir).expect("tunnel files");
        let destination = destination.to_string();
        // Each namespace has its own loopback; on this host both listeners need free ports.
        let admin = match namespaces {
            Some(_) => (9090, 9091),
            None => (free_port("127.0.0.1"), free_port("127.0.0.1")),
        };
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let configs = write_tunnel_files(
            BIN,
            files.path(),
            &TunnelFiles {
                tunnel_listen: &format!("{relay_ip}:{tunnel_port}"),
                endpoint: "backend",
                endpoint_listen: &format!("127.0.0.1:{endpoint_port}"),
                destination: &destination,
                endpoint_extra: &format!(
                    "inactivity_timeout = \"300s\"\nmax_connections = 20000\n{}",
                    if audit { "[audit]\npath = \"relay-audit.jsonl\"" } else { "" }
                ),
                agent_extra: &format!(
                    "transport = \"{transport}\"\n{}",
                    if audit { "[audit]\npath = \"agent-audit.jsonl\"" } else { "" }
                ),
                allow: &destination,
                admin: (loopback(admin.0), loopback(admin.1)),
            },
        );
        let placement = match namespaces {
            Some((relay, agent)) => Placement::Namespaces { relay, agent },
            None => Placement::Here,
        };
        // `E2E_STREAM_WINDOW=8MiB` (say): both sides' `stream_window`, for comparing windows.
        if let Ok(window) = std::env::var("E2E_STREAM_WINDOW") {
            let relay = std::fs::read_to_string(&configs.relay).expect("relay.toml");
            let line = format!("[tunnel]\nstream_window = \"{window}\"\n");
            std::fs::write(&configs.relay, relay.replacen("[tunnel]\n", &line, 1)).expect("relay");
            let agent = std::fs::read_to_string(&configs.agent).expect("agent.toml");
            let agent = format!("stream_window = \"{window}\"\n{agent}");
            std::fs::write(&configs.agent, agent).expect("agent.toml");
        }
        let tunnel = Tunnel::start(BIN, &configs, placement);
        let endpoint = format!("127.0.0.1:{endpoint_port}").parse().expect("endpoint");
        Self { tunnel, endpoint, _files: files }
    }

    /// The relay's and the agent's process ids.
    pub(crate) fn pids(&self) -> [u32; 2] {
        [self.tunnel.relay.pid(), self.tunnel.agent.pid()]
    }

    pub(crate) fn stop(self) {
        let _ = self.tunnel.stop();
    }
}

/// rathole's version the harness builds: the encrypted-tunnel peer of the comparison (its
/// Noise transport: Noise_NK_25519_ChaChaPoly_BLAKE2s, a server and a client like relay and
/// agent).
const RATHOLE_VERSION: &str = "0.5.0";

/// rathole (server and client, Noise transport) in front of the backend: built once from
/// crates.io into `target/rathole/`, or `None` with a visible reason when it cannot be.
pub(crate) fn start_rathole(
    dir: &Path,
    backend: SocketAddr,
) -> Option<(Running, Running, SocketAddr)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/rathole");
    let binary = root.join("bin/rathole");
    if !binary.exists() {
        eprintln!("building rathole {RATHOLE_VERSION} from crates.io into {} …", root.display());
        let root_arg = root.to_str().expect("utf-8");
        let (ok, out) = sh(
            "cargo",
            &[
                "install",
                "--quiet",
                &format!("rathole@{RATHOLE_VERSION}"),
                "--no-default-features",
                "--features",
                "server,client,noise",
                "--root",
                root_arg,
            ],
        );
        if !ok {
            let last = out.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
            eprintln!("!! rathole column skipped: it could not be built here: {last}");
            return None;
        }
    }
    let keys = Command::new(&binary).arg("--genkey").output().ok()?;
    let keys = String::from_utf8_lossy(&keys.stdout).into_owned();
    // "Private Key:\n<base64>\n\nPublic Key:\n<base64>"
    let after = |label: &str| -> Option<String> {
        let rest = keys.split_once(label)?.1;
        rest.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned)
    };
    let (Some(private), Some(public)) = (after("Private Key:"), after("Public Key:")) else {
        eprintln!("!! rathole column skipped: `rathole --genkey` printed no key pair: {keys}");
        return None;
    };
    let control = free_port("127.0.0.1");
    let service: SocketAddr =
        format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    // Loopback only, for one run: any unguessed string will do.
    let token =
        format!("bench{:x}", Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"noise\"\n\
         [server.transport.noise]\nlocal_private_key = \"{private}\"\n\
         [server.services.bench]\ntoken = \"{token}\"\nbind_addr = \"{service}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"noise\"\n\
         [client.transport.noise]\nremote_public_key = \"{public}\"\n\
         [client.services.bench]\ntoken = \"{token}\"\nlocal_addr = \"{backend}\"\n"
    );
    let server_path = dir.join("rathole-server.toml");
    let client_path = dir.join("rathole-client.toml");
    std::fs::write(&server_path, server).expect("rathole server config");
    std::fs::write(&client_path, client).expect("rathole client config");
    let spawn = |flag: &str, path: &Path| {
        let mut command = Command::new(&binary);
        command.env("RUST_LOG", "error").args([flag, path.to_str().expect("utf-8")]);
        Running::spawn(command)
    };
    let server = spawn("--server", &server_path);
    let client = spawn("--client", &client_path);
    // The server binds the service's port once the client's control channel is up.
    if !wait_listening(service) {
        eprintln!("!! rathole column skipped: rathole did not listen on {service}");
        return None;
    }
    Some((server, client, service))
}
