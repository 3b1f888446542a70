//! `privlink check`: diagnoses, from where the agent runs, everything it depends on — each
//! relay (DNS, a QUIC handshake and authentication, the same over TLS/TCP) and each
//! destination (DNS answer and whether it is private, TCP connect, the TLS certificate a client
//! would be shown) — as a list of timed [`Step`]s. It authenticates to relays as the agent
//! does but judges nothing there (the relay routes nothing to a session without verdicts), and
//! it sends destinations no request and no credential: a TLS handshake, then close.
//!
//! [`facts`] holds the conclusions drawn without I/O; [`relay`] and [`destination`] the probes
//! (`proxy` the HTTP proxy on the way to a relay, when there is one);
//! [`endpoint`] is the client's side (`--endpoint`), which needs no agent configuration.

pub mod destination;
pub mod endpoint;
pub mod facts;
mod proxy;
pub mod relay;
mod tls_probe;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::AgentConfig;

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Works.
    Pass,
    /// Works, with something an operator should look at.
    Warn,
    /// Does not work.
    Fail,
}

impl Outcome {
    /// `PASS`, `WARN`, `FAIL`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        }
    }
}

/// One resolved address and what kind it is.
#[derive(Debug, Clone, Serialize)]
pub struct AddressFact {
    /// The address.
    pub address: std::net::IpAddr,
    /// Its class.
    pub class: facts::AddressClass,
    /// Whether it belongs to a private network.
    pub private: bool,
}

impl AddressFact {
    /// Classifies `address`.
    pub fn of(address: std::net::IpAddr) -> Self {
        let class = facts::AddressClass::of(address);
        Self { address, class, private: class.is_private() }
    }
}

/// The certificate a destination presented, as a client would see it.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateFact {
    /// The server name sent (SNI) and matched; `None` for an IP-literal destination.
    pub server_name: Option<String>,
    /// Negotiated TLS version.
    pub tls_version: String,
    /// Subject distinguished name.
    pub subject: String,
    /// DNS names and addresses it is valid for.
    pub names: Vec<String>,
    /// Issuer distinguished name.
    pub issuer: String,
    /// End of validity (RFC 2822).
    pub not_after: String,
    /// Whole days until it expires (negative once expired).
    pub days_left: i64,
    /// Whether it is valid for `server_name` (wildcards as a client matches them).
    pub name_matches: bool,
}

/// An endpoint a relay assigned to this connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointFact {
    /// The endpoint's name.
    pub name: String,
    /// Its destination.
    pub destination: String,
}

/// One check and what it found.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What kind of check: `config`, `proxy`, `proxy-connect`, `relay-dns`, `relay-quic`,
    /// `relay-tcp`, `endpoints`,
    /// `allowlist`, `destination-dns`, `destination-tcp`, `destination-tls`.
    pub check: &'static str,
    /// What was checked: a file, a relay address, a destination.
    pub subject: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took, in milliseconds.
    pub millis: f64,
    /// What was seen, or why it failed.
    pub detail: String,
    /// What an operator should look at (the step still worked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// DNS steps: the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<AddressFact>>,
    /// TLS step: the destination's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateFact>,
    /// Relay steps: the endpoints the relay assigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointFact>>,
}

impl Step {
    /// A step that took `elapsed` and ended `outcome`.
    pub fn new(
        check: &'static str,
        subject: impl Into<String>,
        outcome: Outcome,
        elapsed: Duration,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            check,
            subject: subject.into(),
            outcome,
            millis: (elapsed.as_secs_f64() * 10_000.0).round() / 10.0,
            detail: detail.into(),
            warnings: Vec::new(),
            addresses: None,
            certificate: None,
            endpoints: None,
        }
    }

    /// Adds a warning; a passing step becomes a warning.
    pub(crate) fn warn(&mut self, warning: impl Into<String>) {
        self.warnings.push(warning.into());
        self.outcome = self.outcome.max(Outcome::Warn);
    }
}

/// Told of each step as it completes.
type StepObserver = Box<dyn FnMut(&Step) + Send>;

/// Every step `privlink check` ran, in order, and who is told of each as it completes.
#[derive(Default, Serialize)]
pub struct Report {
    /// The steps.
    pub steps: Vec<Step>,
    #[serde(skip)]
    observer: Option<StepObserver>,
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report").field("steps", &self.steps).finish_non_exhaustive()
    }
}

impl Report {
    /// A report that hands each step to `observer` as it is added (to print progress).
    pub fn observed(observer: impl FnMut(&Step) + Send + 'static) -> Self {
        Self { steps: Vec::new(), observer: Some(Box::new(observer)) }
    }

    /// Adds a step.
    pub fn push(&mut self, step: Step) {
        if let Some(observer) = &mut self.observer {
            observer(&step);
        }
        self.steps.push(step);
    }

    /// The worst outcome of any step (`Pass` for none).
    pub fn outcome(&self) -> Outcome {
        self.steps.iter().map(|s| s.outcome).max().unwrap_or(Outcome::Pass)
    }

    /// How many steps ended `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.steps.iter().filter(|s| s.outcome == outcome).count()
    }
}

/// What to check besides the configuration.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Destinations to check whether or not an endpoint names them (`host:port`).
    pub destinations: Vec<String>,
    /// Whether destinations get a TLS handshake (off for plain TCP services).
    pub tls: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self { destinations: Vec::new(), tls: true }
    }
}

/// The config step for a configuration that loaded (an invalid one is an error, exit 64).
pub fn config_step(path: &std::path::Path, config: &AgentConfig, took: Duration) -> Step {
    Step::new("config", path.display().to_string(), Outcome::Pass, took, summary(config))
}

/// One line about a valid agent configuration, for `--check-config` and `check`.
pub fn summary(config: &AgentConfig) -> String {
    let relays: Vec<String> = config.relays.iter().map(ToString::to_string).collect();
    let via = match &config.proxy {
        Some(proxy) => format!(" via the HTTP proxy {}", proxy.address),
        None => String::new(),
    };
    format!(
        "agent `{}` for connector `{}`; relays {}{via} over {}; {} allow rule{}; admin {}",
        config.name,
        config.connector,
        relays.join(", "),
        config.transport,
        config.allowlist.rules.len(),
        if config.allowlist.rules.len() == 1 { "" } else { "s" },
        config.admin.as_ref().map_or_else(|| "off".to_owned(), |a| a.listen.to_string()),
    )
}

/// Runs every relay and destination check for a loaded configuration, appending to `report`.
/// Call it within a tokio runtime.
pub async fn run(config: &AgentConfig, options: &CheckOptions, report: &mut Report) {
    let endpoints = relay::check_relays(config, report).await;
    destination::check_destinations(config, &endpoints, options, report).await;
}

/// Times `work`.
pub(crate) async fn timed<T>(work: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let value = work.await;
    (value, started.elapsed())
}
