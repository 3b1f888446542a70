//! A relay's or an agent's admin listener as tests and benchmarks ask it ([`AdminProbe`]):
//! with curl, inside the process's network namespace when it runs in one, polling until
//! `/readyz` or the typed status snapshot says what a test waits for.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use privlink_admin::snapshot::{AgentStatus, RelayStatus, StatusSnapshot, VerdictView};

/// Generous bound for process start-up and reconnection (the relay notices a killed peer
/// through the QUIC idle timeout, 8 s).
pub const PROCESS_WAIT: Duration = Duration::from_secs(30);

/// A relay's or an agent's admin listener, asked with curl — inside the process's network
/// namespace when it runs in one (its loopback is not this one's).
#[derive(Debug, Clone)]
pub struct AdminProbe {
    namespace: Option<String>,
    pub(crate) addr: SocketAddr,
}

impl AdminProbe {
    /// The admin listener at `addr`, in `namespace` (or this one).
    pub fn new(namespace: Option<&str>, addr: SocketAddr) -> Self {
        Self { namespace: namespace.map(str::to_owned), addr }
    }

    /// `GET path`: the status code and the body (code 0 when nothing answered).
    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.addr);
        let curl = ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", &url];
        let mut command = match &self.namespace {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).args(curl);
                command
            }
            None => {
                let mut command = Command::new("curl");
                command.args(&curl[1..]);
                command
            }
        };
        let out = command.output().expect("curl runs (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Asks `path` until the answer satisfies `want`, failing after [`PROCESS_WAIT`] with the
    /// last answer; returns the body that satisfied it.
    pub fn wait(&self, path: &str, want: impl Fn(u16, &str) -> bool) -> String {
        self.poll(path, want, || false)
            .unwrap_or_else(|(code, body)| panic!("{path} on {} stayed {code}: {body}", self.addr))
    }

    /// Asks `path` until the answer satisfies `want` (its body), or until [`PROCESS_WAIT`]
    /// passes or `give_up` says so (the last code and body).
    pub(crate) fn poll(
        &self,
        path: &str,
        want: impl Fn(u16, &str) -> bool,
        mut give_up: impl FnMut() -> bool,
    ) -> Result<String, (u16, String)> {
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            let (code, body) = self.get(path);
            if want(code, &body) {
                return Ok(body);
            }
            if give_up() || Instant::now() >= deadline {
                return Err((code, body));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        self.wait("/readyz", |code, _| code == 200);
    }

    /// Waits until the status snapshot satisfies `want`; returns it.
    pub fn wait_status(&self, want: impl Fn(&StatusSnapshot) -> bool) -> StatusSnapshot {
        let body = self.wait("/api/v1/status", |code, body| {
            code == 200 && serde_json::from_str(body).is_ok_and(|status| want(&status))
        });
        serde_json::from_str(&body).expect("a status snapshot")
    }

    /// Waits until a relay's status snapshot satisfies `want`; returns it.
    pub fn wait_relay_status(&self, want: impl Fn(&RelayStatus) -> bool) -> RelayStatus {
        let status = self.wait_status(|s| s.relay().is_some_and(&want));
        status.relay().cloned().expect("a relay's status")
    }

    /// Waits until an agent's status snapshot satisfies `want`; returns it.
    pub fn wait_agent_status(&self, want: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let status = self.wait_status(|s| s.agent().is_some_and(&want));
        status.agent().cloned().expect("an agent's status")
    }

    /// A relay's status snapshot now.
    pub fn relay_status(&self) -> RelayStatus {
        self.wait_relay_status(|_| true)
    }

    /// An agent's status snapshot now.
    pub fn agent_status(&self) -> AgentStatus {
        self.wait_agent_status(|_| true)
    }
}

/// Whether a relay's status snapshot shows the agent `agent_id` approving `endpoint`.
pub fn approved_by(status: &RelayStatus, agent_id: &str, endpoint: &str) -> bool {
    status
        .agent_by_id(agent_id)
        .is_some_and(|a| a.verdicts.get(endpoint) == Some(&VerdictView::Approved))
}
