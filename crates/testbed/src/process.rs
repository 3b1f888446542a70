//! Real processes for tests and benchmarks: [`Running`] (a child whose output lines are
//! collected, with waits for a line, signals and reaping), the config files of a
//! one-endpoint tunnel ([`write_tunnel_files`]) and the bring-up of a relay and an agent from
//! them ([`Tunnel`]), on loopback or in network namespaces.
//!
//! Readiness is read from log lines for now; once the admin API exists, `/readyz` replaces
//! them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use privlink_protocol::token::TokenDigest;

/// Generous bound for process start-up and reconnection (the relay notices a killed peer
/// through the QUIC idle timeout, 8 s).
pub const PROCESS_WAIT: Duration = Duration::from_secs(30);

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
    /// The endpoint's destination, `host:port`.
    pub destination: &'a str,
    /// Lines appended to the `[[endpoint]]` table (timeouts, limits, `[endpoint.acl]`).
    pub endpoint_extra: &'a str,
    /// Agent settings beyond connector, token, relay and CA (`transport = …`, …).
    pub agent_extra: &'a str,
    /// The destination of the agent's one `[[allow]]` rule.
    pub allow: &'a str,
}

/// Runs `privlink certs init` (the binary at `bin`) into `dir/certs` (relay certificate for
/// the tunnel's IP), writes a token there, and `relay.toml` / `agent.toml` into `dir` (paths
/// relative to it); returns the two config paths.
pub fn write_tunnel_files(bin: &str, dir: &Path, files: &TunnelFiles<'_>) -> (String, String) {
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
#[derive(Debug)]
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
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

    /// The lines read so far (by [`Running::wait_for`]).
    pub fn seen(&self) -> &[String] {
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

/// A relay and an agent, each a real `privlink` process, started from configs written by
/// [`write_tunnel_files`] and ready (the endpoint listens and is approved).
#[derive(Debug)]
pub struct Tunnel {
    /// The relay process.
    pub relay: Running,
    /// The agent process.
    pub agent: Running,
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
    /// Starts the relay and waits until its endpoint listens, then the agent, and waits until
    /// it is connected and the relay has its approval.
    pub fn start(
        bin: &str,
        relay_config: &str,
        agent_config: &str,
        placement: Placement<'_>,
    ) -> Self {
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
        let relay_argv = argv(relay_ns, "relay", relay_config);
        let agent_argv = argv(agent_ns, "agent", agent_config);
        let mut relay = Running::spawn(command(&relay_argv));
        relay.wait_for("endpoint listening");
        let agent = Running::spawn(command(&agent_argv));
        let mut tunnel = Self { relay, agent, relay_argv, agent_argv };
        tunnel.wait_served();
        tunnel
    }

    /// Starts the relay again (after a kill) and waits until its endpoint listens.
    pub fn restart_relay(&mut self) {
        self.relay = Running::spawn(command(&self.relay_argv));
        self.relay.wait_for("endpoint listening");
    }

    /// Starts the agent again (after a kill); [`wait_served`](Self::wait_served) waits for it.
    pub fn restart_agent(&mut self) {
        self.agent = Running::spawn(command(&self.agent_argv));
    }

    /// Waits until the agent is connected and the relay has its approval.
    pub fn wait_served(&mut self) {
        self.agent.wait_for("connected to relay");
        self.relay.wait_for("endpoint approved by agent");
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
