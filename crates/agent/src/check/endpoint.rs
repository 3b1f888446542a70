//! `privlink check --endpoint NAME:PORT`: the client's side, run where a key orchestrator runs —
//! does NAME resolve (to the relay, when `--relay` says which addresses that is), does TCP
//! connect, does a handshake asking for NAME get routed (or does the relay answer
//! `unrecognized_name`: no endpoint claims the name), and which certificate comes back: its
//! names, issuer and expiry, whether it is valid for NAME, and whether it chains to the CA given
//! (`--ca`) or the system's roots. It sends nothing after the handshake.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use privlink_protocol::destination::{Destination, Host};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use super::{AddressFact, Outcome, Report, Step, timed, tls_probe};

/// How long each step may take.
const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// Where a system keeps its trusted roots, by distribution (what OpenSSL's probe looks at):
/// no crate in the tree reads them, and the list is short.
const SYSTEM_ROOTS: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// What to check for one endpoint a client reaches.
#[derive(Debug, Clone)]
pub struct EndpointCheck {
    /// The name and port the client connects to.
    pub endpoint: String,
    /// The CA the certificate should chain to (none: the system's roots).
    pub ca: Option<PathBuf>,
    /// The relay's address or name: NAME should resolve to it.
    pub relay: Option<String>,
}

/// Runs the steps for `check`.
pub async fn run(check: &EndpointCheck, report: &mut Report) {
    let subject = check.endpoint.clone();
    let destination = match check.endpoint.parse::<Destination>() {
        Ok(destination) => destination,
        Err(e) => {
            report.push(Step::new(
                "endpoint",
                subject,
                Outcome::Fail,
                Duration::ZERO,
                e.to_string(),
            ));
            return;
        }
    };
    let Some(addresses) = resolve(&destination, check.relay.as_deref(), report).await else {
        return;
    };
    // Each address in turn, as a client does (`localhost` answers ::1 before 127.0.0.1).
    let targets: Vec<SocketAddr> =
        addresses.iter().map(|ip| SocketAddr::new(*ip, destination.port)).collect();
    let (connected, took) =
        timed(tokio::time::timeout(STEP_DEADLINE, TcpStream::connect(&targets[..]))).await;
    let stream = match connected {
        Ok(Ok(stream)) => {
            let peer = stream.peer_addr().map_or_else(|_| "-".to_owned(), |a| a.to_string());
            let detail = format!("connected to {peer}");
            report.push(Step::new("endpoint-tcp", subject.clone(), Outcome::Pass, took, detail));
            stream
        }
        Ok(Err(e)) => {
            report.push(Step::new("endpoint-tcp", subject, Outcome::Fail, took, e.to_string()));
            return;
        }
        Err(_) => {
            let detail = format!("no connection within {STEP_DEADLINE:?}");
            report.push(Step::new("endpoint-tcp", subject, Outcome::Fail, took, detail));
            return;
        }
    };
    let (mut step, chain) =
        tls_probe::handshake_keeping_chain(STEP_DEADLINE, &destination, stream).await;
    step.check = "endpoint-tls";
    if let Some(chain) = chain {
        judge_chain(&mut step, &chain, &destination, check.ca.as_deref());
    }
    report.push(step);
}

/// The `endpoint-dns` step: NAME's addresses, and whether they are the relay's.
async fn resolve(
    destination: &Destination,
    relay: Option<&str>,
    report: &mut Report,
) -> Option<Vec<IpAddr>> {
    let subject = destination.to_string();
    let (answer, took) = timed(lookup(&destination.host, destination.port)).await;
    let addresses = match answer {
        Ok(addresses) if !addresses.is_empty() => addresses,
        Ok(_) | Err(_) => {
            let detail = format!(
                "`{}` does not resolve here: the client's DNS needs a record (a private zone, or \
                 a hosts entry) pointing it at the relay",
                destination.host
            );
            report.push(Step::new("endpoint-dns", subject, Outcome::Fail, took, detail));
            return None;
        }
    };
    let shown: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    let mut step = Step::new(
        "endpoint-dns",
        subject,
        Outcome::Pass,
        took,
        format!("{} resolves to {}", destination.host, shown.join(", ")),
    );
    step.addresses = Some(addresses.iter().copied().map(AddressFact::of).collect());
    if let Some(relay) = relay {
        let relay_addresses = match relay.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => lookup(&relay.parse().unwrap_or(Host::Ip([0, 0, 0, 0].into())), 0)
                .await
                .unwrap_or_default(),
        };
        if !addresses.iter().any(|a| relay_addresses.contains(a)) {
            step.outcome = Outcome::Fail;
            step.detail = format!(
                "{} resolves to {}, not to the relay ({relay}): the client would reach something \
                 else — point the name at the relay in the client's DNS",
                destination.host,
                shown.join(", ")
            );
        } else {
            step.detail.push_str(&format!(" (the relay, {relay})"));
        }
    }
    report.push(step);
    Some(addresses)
}

async fn lookup(host: &Host, port: u16) -> std::io::Result<Vec<IpAddr>> {
    match host {
        Host::Ip(ip) => Ok(vec![*ip]),
        Host::Name(name) => {
            let lookup_form = name.lookup_form();
            let found = tokio::net::lookup_host((lookup_form.as_str(), port)).await?;
            let mut ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
            ips.dedup();
            Ok(ips)
        }
    }
}

/// Whether the chain the endpoint presented leads to the CA given, or to the system's roots.
fn judge_chain(
    step: &mut Step,
    chain: &[CertificateDer<'static>],
    destination: &Destination,
    ca: Option<&Path>,
) {
    let roots = match ca {
        Some(path) => privlink_transport::tls::load_certs(path).map_err(|e| e.to_string()),
        None => SYSTEM_ROOTS
            .iter()
            .find_map(|path| privlink_transport::tls::load_certs(Path::new(path)).ok())
            .ok_or_else(|| "no system trust store found".to_owned()),
    };
    let trusted = match &ca {
        Some(path) => format!("the CA in {}", path.display()),
        None => "the system's trusted roots".to_owned(),
    };
    let roots = match roots {
        Ok(roots) => roots,
        Err(e) => {
            step.warn(format!("the chain was not checked: {e}"));
            return;
        }
    };
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots);
    if added == 0 {
        step.warn(format!("the chain was not checked: {trusted} holds no certificate"));
        return;
    }
    let provider = privlink_transport::crypto::default_provider();
    let verifier = match rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(store),
        provider,
    )
    .build()
    {
        Ok(verifier) => verifier,
        Err(e) => {
            step.warn(format!("the chain was not checked: {e}"));
            return;
        }
    };
    let server_name = match &destination.host {
        Host::Name(name) => ServerName::try_from(name.as_str().to_owned()),
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
    };
    let Ok(server_name) = server_name else { return };
    let now = UnixTime::since_unix_epoch(
        std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
    );
    let (leaf, intermediates) = chain.split_first().expect("a chain has a leaf");
    use rustls::client::danger::ServerCertVerifier as _;
    match verifier.verify_server_cert(leaf, intermediates, &server_name, &[], now) {
        Ok(_) => step.detail.push_str(&format!("; the chain leads to {trusted}")),
        Err(e) => {
            step.outcome = Outcome::Fail;
            step.detail.push_str(&format!(
                "; the client would refuse it: {e} (checked against {trusted})"
            ));
        }
    }
}
