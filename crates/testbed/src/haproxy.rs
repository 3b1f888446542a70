//! HAProxy (the Debian package) as the load balancer in front of a relay fleet: TCP frontends
//! that spread new connections round-robin over their servers, each server health-checked —
//! by a TCP connect, or by an HTTP `GET /readyz` on another port (a relay's admin listener) —
//! and the runtime API on a Unix socket, through which tests wait until HAProxy itself sees a
//! server up or down (`show stat`) instead of sleeping.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::Running;

/// How a backend judges its servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not at all.
    None,
    /// A TCP connect to the server.
    Connect,
    /// `GET /readyz` answered 200 on the server's admin listener.
    Readyz,
}

/// One server of a backend: where connections go, and its admin listener for [`Check::Readyz`].
#[derive(Debug, Clone, Copy)]
pub struct Server {
    /// Where connections go.
    pub addr: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
}

/// A TCP frontend and the servers it balances round-robin.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// Its name (also the backend's).
    pub name: String,
    /// Where it listens.
    pub bind: SocketAddr,
    /// Its servers, named `s0`, `s1`, … in this order.
    pub servers: Vec<Server>,
    /// How their health is judged.
    pub check: Check,
    /// Added to each `server` line (`send-proxy`, `send-proxy-v2`).
    pub server_options: String,
    /// Added to the `bind` line (`accept-proxy`).
    pub bind_options: String,
    /// Whether each connection is logged to standard output when it ends (`option tcplog`):
    /// the client address HAProxy saw, after any PROXY header it accepted.
    pub log: bool,
}

impl Frontend {
    /// A frontend balancing round-robin over `servers`, checked as `check`, nothing more.
    pub fn new(name: &str, bind: SocketAddr, servers: Vec<Server>, check: Check) -> Self {
        Self {
            name: name.to_owned(),
            bind,
            servers,
            check,
            server_options: String::new(),
            bind_options: String::new(),
            log: false,
        }
    }
}

/// A running HAProxy.
#[derive(Debug)]
pub struct Haproxy {
    process: Running,
    socket: PathBuf,
}

/// How often HAProxy checks each server; one failed check takes a server out, one passed
/// check brings it back.
const CHECK_INTERVAL: &str = "200ms";
/// How long [`Haproxy::wait_servers`] waits.
const WAIT: Duration = Duration::from_secs(20);

impl Haproxy {
    /// Starts HAProxy with `frontends`, its files in `dir`; returns once every frontend listens.
    ///
    /// # Panics
    ///
    /// When `haproxy` is not installed (`.ci/run` installs the Debian package) or does not start.
    pub fn start(dir: &Path, frontends: &[Frontend]) -> Self {
        let installed =
            Command::new("haproxy").arg("-v").output().is_ok_and(|o| o.status.success());
        assert!(installed, "haproxy is not installed: apt-get install haproxy (.ci/run does)");
        let socket = dir.join("haproxy.sock");
        let mut config = format!(
            "global\n  maxconn 4000\n  stats socket {} mode 600 level admin\n  \
             log stdout format raw local0\n\n\
             defaults\n  mode tcp\n  balance roundrobin\n  timeout connect 2s\n  \
             timeout client 1h\n  timeout server 1h\n  timeout tunnel 1h\n  timeout check 1s\n",
            socket.display()
        );
        for frontend in frontends {
            let name = &frontend.name;
            let log = if frontend.log { "  log global\n  option tcplog\n" } else { "" };
            config.push_str(&format!(
                "\nfrontend {name}\n  bind {} {}\n{log}  default_backend {name}\n\nbackend {name}\n",
                frontend.bind, frontend.bind_options
            ));
            if frontend.check == Check::Readyz {
                // The admin listener answers only a Host it knows: an IP literal is one.
                config.push_str(
                    "  option httpchk\n  http-check send meth GET uri /readyz ver HTTP/1.1 \
                     hdr Host 127.0.0.1\n  http-check expect status 200\n",
                );
            }
            for (i, server) in frontend.servers.iter().enumerate() {
                let check = match frontend.check {
                    Check::None => String::new(),
                    Check::Connect => format!(" check inter {CHECK_INTERVAL} fall 1 rise 1"),
                    Check::Readyz => format!(
                        " check inter {CHECK_INTERVAL} fall 1 rise 1 port {}",
                        server.admin.port()
                    ),
                };
                config.push_str(&format!(
                    "  server s{i} {}{check} {}\n",
                    server.addr, frontend.server_options
                ));
            }
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).expect("haproxy.cfg");
        let mut command = Command::new("haproxy");
        command.args(["-db", "-f", path.to_str().expect("utf-8")]);
        let process = Running::spawn(command);
        let haproxy = Self { process, socket };
        let deadline = Instant::now() + WAIT;
        for frontend in frontends {
            while std::net::TcpStream::connect(frontend.bind).is_err() {
                assert!(Instant::now() < deadline, "haproxy did not listen on {}", frontend.bind);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        haproxy
    }

    /// Each server of `backend` with its status as HAProxy sees it (`UP`, `DOWN`, …), by name.
    pub fn servers(&self, backend: &str) -> Vec<(String, String)> {
        let csv = self.command("show stat");
        let mut header = None;
        let mut servers = Vec::new();
        for line in csv.lines() {
            if let Some(names) = line.strip_prefix("# ") {
                header = Some(names.split(',').map(str::to_owned).collect::<Vec<_>>());
                continue;
            }
            let Some(names) = &header else { continue };
            let fields: Vec<&str> = line.split(',').collect();
            let field = |name: &str| {
                names.iter().position(|n| n == name).and_then(|i| fields.get(i)).copied()
            };
            let (Some(pxname), Some(svname), Some(status)) =
                (field("pxname"), field("svname"), field("status"))
            else {
                continue;
            };
            if pxname == backend && svname != "BACKEND" && svname != "FRONTEND" {
                servers.push((svname.to_owned(), status.to_owned()));
            }
        }
        servers
    }

    /// Waits until HAProxy sees the servers of `backend` as `want` says (a status per server,
    /// in order); fails the test after a while with what it saw.
    pub fn wait_servers(&self, backend: &str, want: impl Fn(&[(String, String)]) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let servers = self.servers(backend);
            if want(&servers) {
                return;
            }
            assert!(Instant::now() < deadline, "haproxy backend {backend}: {servers:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a line of HAProxy's output (its connection log) containing `needle`.
    pub fn wait_for_log(&mut self, needle: &str) {
        self.process.wait_for(needle);
    }

    /// Sends a command to the runtime API and returns its answer.
    fn command(&self, command: &str) -> String {
        let mut stream = UnixStream::connect(&self.socket).expect("haproxy runtime socket");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        stream.write_all(format!("{command}\n").as_bytes()).expect("haproxy command");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("haproxy answer");
        answer
    }
}

/// Whether every server's status starts with `UP`.
pub fn all_up(servers: &[(String, String)]) -> bool {
    !servers.is_empty() && servers.iter().all(|(_, status)| status.starts_with("UP"))
}
