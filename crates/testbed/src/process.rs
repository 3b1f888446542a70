//! Real processes for tests and benchmarks: [`Running`] (a child whose output lines are
//! collected, with waits for a line, signals and reaping), the config files of a
//! one-endpoint tunnel ([`write_tunnel_files`]) and the bring-up of a relay and an agent from
//! them ([`Tunnel`]), on loopback or in network namespaces. Readiness comes from each
//! process's admin listener ([`AdminProbe`]: `/readyz` and the status API), not from log
//! lines.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use privlink_protocol::token::TokenDigest;

pub use crate::admin_probe::{AdminProbe, PROCESS_WAIT, approved_by};

/// Bound for a process told to stop to exit: the example configs' 30 s `shutdown_grace` and a
/// margin.
pub const EXIT_WAIT: Duration = Duration::from_secs(60);

/// The files a one-endpoint tunnel of real `privlink` processes needs; see
/// [`write_tunnel_files`].
#[derive(Debug)]
pub struct TunnelFiles<'a> {
    /// Where the relay's tunnel listens (`ip:port`); the IP is also the relay certificate's name.
    pub tunnel_listen: &'a str,
    /// The endpoint's name.
    pub endpoint: &'a str,
    /// Where the endpoint listens.
    pub endpoint_listen: &'a str,
    /// The endpoint's destination, `host:port` (empty: none, as for a CONNECT endpoint, whose
    /// keys `endpoint_extra` holds).
    pub destination: &'a str,
    /// Lines appended to the `[[endpoint]]` table (timeouts, limits, `[endpoint.acl]`).
    pub endpoint_extra: &'a str,
    /// Agent settings beyond connector, token, relay and CA (`transport = …`, …).
    pub agent_extra: &'a str,
    /// The destination of the agent's one `[[allow]]` rule.
    pub allow: &'a str,
    /// Where the relay's and the agent's admin listeners listen (loopback of their network
    /// namespace: in separate namespaces the same address serves for both).
    pub admin: (SocketAddr, SocketAddr),
}

/// What [`write_tunnel_files`] wrote.
#[derive(Debug, Clone)]
pub struct TunnelConfigs {
    /// `relay.toml`.
    pub relay: String,
    /// `agent.toml`.
    pub agent: String,
    /// The relay's admin listener.
    pub relay_admin: SocketAddr,
    /// The agent's admin listener.
    pub agent_admin: SocketAddr,
    /// The endpoint's name.
    pub endpoint: String,
}

/// Runs `privlink certs init` (the binary at `bin`) into `dir/certs` (relay certificate for
/// the tunnel's IP), writes a token there, and `relay.toml` / `agent.toml` into `dir` (paths
/// relative to it), both with an admin listener.
pub fn write_tunnel_files(bin: &str, dir: &Path, files: &TunnelFiles<'_>) -> TunnelConfigs {
    let certs = dir.join("certs");
    let relay_name = files.tunnel_listen.rsplit_once(':').map_or(files.tunnel_listen, |(ip, _)| ip);
    let status = Command::new(bin)
        .args(["certs", "init", "--dir", certs.to_str().expect("utf-8"), "--name", relay_name])
        .output()
        .expect("run certs init");
    assert!(status.status.success(), "certs init: {}", String::from_utf8_lossy(&status.stderr));
    let token = format!("plk_test_{:032x}", fastrand::u128(..));
    std::fs::write(certs.join("token"), &token).expect("token");
    let digest = TokenDigest::of(token.as_bytes()).to_hex();
    let TunnelFiles { tunnel_listen, endpoint, endpoint_listen, .. } = files;
    // An endpoint without one destination (`mode = "http-connect"`) has its keys in `extra`.
    let destination = match files.destination {
        "" => String::new(),
        destination => format!("destination = \"{destination}\"\n"),
    };
    let (relay_admin, agent_admin) = files.admin;
    let relay = format!(
        "[tunnel]\nlisten = \"{tunnel_listen}\"\ncert = \"certs/relay.crt\"\nkey = \"certs/relay.key\"\n\n\
         [admin]\nlisten = \"{relay_admin}\"\n\n\
         [[connector]]\nname = \"tunnel\"\ntoken_sha256 = \"{digest}\"\n\n\
         [[endpoint]]\nname = \"{endpoint}\"\nconnector = \"tunnel\"\n{destination}\
         listen = \"{endpoint_listen}\"\n{}\n",
        files.endpoint_extra
    );
    let agent = format!(
        "connector = \"tunnel\"\ntoken_file = \"certs/token\"\nrelays = [\"{tunnel_listen}\"]\n\
         relay_ca = \"certs/ca.crt\"\n{}\n\n[admin]\nlisten = \"{agent_admin}\"\n\n\
         [[allow]]\ndestination = \"{}\"\n",
        files.agent_extra, files.allow
    );
    let relay_path = dir.join("relay.toml");
    let agent_path = dir.join("agent.toml");
    std::fs::write(&relay_path, relay).expect("relay.toml");
    std::fs::write(&agent_path, agent).expect("agent.toml");
    TunnelConfigs {
        relay: relay_path.to_str().expect("utf-8").to_owned(),
        agent: agent_path.to_str().expect("utf-8").to_owned(),
        relay_admin,
        agent_admin,
        endpoint: (*endpoint).to_owned(),
    }
}

/// A port free for both TCP and UDP, chosen below the kernel's ephemeral range (as a real
/// deployment's fixed ports are): a port from that range, freed by a killed relay, can be taken
/// by any outgoing connection before the restarted relay binds it again.
///
/// A port is never handed out twice by this process, even once it is free again: tests run
/// side by side in one test binary, and a port is free both between being chosen and being
/// bound by a process started later, and while a test has killed the process that held it and
/// not yet restarted it on the same port. Another test handed it then would take it. (Test
/// binaries run one after another.)
pub fn free_fixed_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral_start: u16 =
        range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_start / 2);
    let span = ephemeral_start - low;
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..200 {
        let port = low + fastrand::u16(..span);
        if handed_out.contains(&port) {
            continue;
        }
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// A child process whose stderr lines are collected by a thread.
#[derive(Debug)]
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// Runs a prepared command, collecting its stderr (and stdout, for helper scripts). It
    /// logs at `info`, or as `PRIVLINK_TEST_LOG` says (a `RUST_LOG` filter, for diagnosing a
    /// failing test). The machine's proxy variables are not passed on: a test's processes
    /// talk to each other, never through whatever proxy the machine running the tests uses
    /// (a test that wants a proxy names it in its configuration).
    pub fn spawn(mut command: Command) -> Self {
        let filter = std::env::var("PRIVLINK_TEST_LOG").unwrap_or_else(|_| "info".to_owned());
        for variable in ["https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"] {
            command.env_remove(variable);
        }
        let mut child = command
            .env("RUST_LOG", filter)
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

    /// The lines read so far (by [`Running::wait_for`]).
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Every line the process has written so far, for a failing test to show.
    pub fn output_so_far(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
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

    /// Waits until this process's admin listener (`probe`) answers `/readyz` with 200. When the
    /// process exits first, or the bound passes, fails saying how it ended and what it printed
    /// (a port taken by someone else, say), not only the last answer.
    pub fn wait_ready(&mut self, probe: &AdminProbe) {
        let child = &mut self.child;
        let ready = probe.poll(
            "/readyz",
            |code, _| code == 200,
            || child.try_wait().is_ok_and(|exited| exited.is_some()),
        );
        if let Err((code, _)) = ready {
            let (state, output) = match self.child.try_wait() {
                Ok(Some(exit)) => (exit.to_string(), self.output_to_the_end()),
                _ => ("still running".to_owned(), self.output_so_far()),
            };
            panic!(
                "/readyz on {} stayed {code} (process {state}); it printed:\n{}",
                probe.addr,
                output.join("\n")
            );
        }
    }

    /// Everything an exited process wrote: its last lines may still be on their way from the
    /// reader threads, which end when its pipes close (bounded, in case a child inherited them).
    fn output_to_the_end(&mut self) -> &[String] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return &self.seen,
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

    /// SIGTERM, then [`Running::wait_exit`].
    pub fn terminate(self) -> std::process::ExitStatus {
        self.signal_terminate();
        self.wait_exit()
    }

    /// Sends SIGTERM without waiting for the process to exit.
    pub fn signal_terminate(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    }

    /// Waits for the exit of a process that has been told to stop, failing with what it
    /// printed after [`EXIT_WAIT`] (the drop then kills it).
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                return exit;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the process did not exit within {EXIT_WAIT:?}; it printed:\n{}",
                    self.output_so_far().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// A relay and an agent, each a real `privlink` process, started from configs written by
/// [`write_tunnel_files`] and ready (the endpoint listens and is approved).
#[derive(Debug)]
pub struct Tunnel {
    /// The relay process.
    pub relay: Running,
    /// The agent process.
    pub agent: Running,
    /// The relay's admin listener.
    pub relay_admin: AdminProbe,
    /// The agent's admin listener.
    pub agent_admin: AdminProbe,
    endpoint: String,
    /// The relay's command line (with its namespace prefix), for restarts.
    relay_argv: Vec<String>,
    /// The agent's command line (with its namespace prefix), for restarts.
    agent_argv: Vec<String>,
}

/// Where a [`Tunnel`]'s processes run: both on this host, or each in a network namespace.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// Both in the caller's network namespace.
    Here,
    /// The relay in namespace `relay`, the agent in namespace `agent`.
    Namespaces {
        /// The relay's namespace.
        relay: &'a str,
        /// The agent's namespace.
        agent: &'a str,
    },
}

impl Tunnel {
    /// Starts the relay and waits until it is ready (every listener bound), then the agent,
    /// and waits until it is ready and the relay has its approval.
    pub fn start(bin: &str, configs: &TunnelConfigs, placement: Placement<'_>) -> Self {
        let argv = |ns: Option<&str>, role: &str, config: &str| -> Vec<String> {
            let mut argv: Vec<String> = match ns {
                Some(ns) => ["ip", "netns", "exec", ns].map(str::to_owned).to_vec(),
                None => Vec::new(),
            };
            argv.extend([bin, role, "--config", config].map(str::to_owned));
            argv
        };
        let (relay_ns, agent_ns) = match placement {
            Placement::Here => (None, None),
            Placement::Namespaces { relay, agent } => (Some(relay), Some(agent)),
        };
        let relay_argv = argv(relay_ns, "relay", &configs.relay);
        let agent_argv = argv(agent_ns, "agent", &configs.agent);
        let relay_admin = AdminProbe::new(relay_ns, configs.relay_admin);
        let agent_admin = AdminProbe::new(agent_ns, configs.agent_admin);
        let relay = Running::spawn(command(&relay_argv));
        relay_admin.wait_ready();
        let agent = Running::spawn(command(&agent_argv));
        let tunnel = Self {
            relay,
            agent,
            relay_admin,
            agent_admin,
            endpoint: configs.endpoint.clone(),
            relay_argv,
            agent_argv,
        };
        tunnel.wait_served();
        tunnel
    }

    /// Starts the relay again (after a kill) and waits until it is ready.
    pub fn restart_relay(&mut self) {
        self.relay = Running::spawn(command(&self.relay_argv));
        self.relay_admin.wait_ready();
    }

    /// Starts the agent again (after a kill); [`wait_served`](Self::wait_served) waits for it.
    pub fn restart_agent(&mut self) {
        self.agent = Running::spawn(command(&self.agent_argv));
    }

    /// Waits until the agent is ready (a relay link welcomed, its verdicts sent) and the relay
    /// lists this agent — by the id it drew at start, so a dead predecessor still listed does
    /// not count — as approving the endpoint.
    pub fn wait_served(&self) {
        self.agent_admin.wait_ready();
        let id = self.agent_id();
        self.relay_admin.wait_relay_status(|status| approved_by(status, &id, &self.endpoint));
    }

    /// The running agent's id, from its status snapshot.
    pub fn agent_id(&self) -> String {
        self.agent_admin.agent_status().id
    }

    /// SIGTERM to the agent, then the relay, waiting for each to exit; returns their exit
    /// statuses (agent, relay).
    pub fn stop(self) -> (std::process::ExitStatus, std::process::ExitStatus) {
        (self.agent.terminate(), self.relay.terminate())
    }
}

fn command(argv: &[String]) -> Command {
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_dies_before_it_is_ready_fails_the_wait_at_once_with_its_output() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'cannot listen: Address already in use' >&2; exit 3"]);
        let mut running = Running::spawn(command);
        // Nothing listens there: the wait can only end by the process's exit or the bound.
        let probe = AdminProbe::new(None, ([127, 0, 0, 1], free_fixed_port()).into());
        let started = Instant::now();
        let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            running.wait_ready(&probe);
        }))
        .expect_err("an exited process is never ready");
        let message = failure.downcast_ref::<String>().expect("a formatted panic message");
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.contains("Address already in use"), "{message}");
        assert!(started.elapsed() < PROCESS_WAIT, "it gave up at the exit, not at the bound");
    }

    #[test]
    fn wait_exit_returns_the_exit_status() {
        let mut command = Command::new("sh");
        command.args(["-c", "exit 5"]);
        assert_eq!(Running::spawn(command).wait_exit().code(), Some(5));
    }
}
