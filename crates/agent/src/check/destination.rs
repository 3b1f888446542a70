//! Destination checks, for every destination of an endpoint the relays assigned and the
//! allowlist approves, and for every `--destination`: the allowlist's verdict, the DNS answer
//! through the system resolver (as the agent resolves it) and whether each address is private,
//! a TCP connect to each address, and a TLS handshake with the server name a client would send,
//! reporting the certificate. Nothing is sent after the handshake.

use std::net::SocketAddr;
use std::time::Duration;

use privlink_protocol::destination::{Destination, Host};
use tokio::net::TcpStream;

use super::facts::private_link_zone;
use super::tls_probe;
use super::{AddressFact, CheckOptions, EndpointFact, Outcome, Report, Step, timed};
use crate::allowlist::{DestinationPattern, special_address_kind};
use crate::config::AgentConfig;
use crate::forward::admissible_addresses;
use privlink_protocol::message::CONNECT_PREFIX;

/// Most addresses of one destination that are connected to.
const MAX_ADDRESSES: usize = 8;
/// Most assigned endpoints whose destinations are checked (a connector may have thousands).
const MAX_ENDPOINTS: usize = 32;

/// The deadlines the agent itself applies to a destination.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    dns: Duration,
    connect: Duration,
}

/// One destination to check: its allowlist step, and what to probe (nothing for a
/// destination the agent rejects or cannot parse, or one already probed).
struct Job {
    allowlist: Step,
    probe: Option<(Destination, Option<DestinationPattern>)>,
}

/// Checks the approved endpoints' destinations and the options' own, each destination once.
/// The probes run at once (a destination that does not answer costs its deadlines, and
/// 32 of them would otherwise add up); their steps are reported in order.
pub(crate) async fn check_destinations(
    config: &AgentConfig,
    endpoints: &[EndpointFact],
    options: &CheckOptions,
    report: &mut Report,
) {
    if endpoints.len() > MAX_ENDPOINTS {
        let mut step = Step::new(
            "endpoints",
            format!("{} endpoints assigned", endpoints.len()),
            Outcome::Pass,
            Duration::ZERO,
            format!("the first {MAX_ENDPOINTS} are checked"),
        );
        step.warn("check any other one with --destination HOST:PORT");
        report.push(step);
    }
    let mut jobs: Vec<Job> = endpoints
        .iter()
        .take(MAX_ENDPOINTS)
        .map(|endpoint| endpoint_job(config, endpoint))
        .chain(options.destinations.iter().map(|text| destination_job(config, text)))
        .collect();
    let mut probed: Vec<String> = Vec::new();
    for job in &mut jobs {
        if let Some((destination, _)) = &job.probe {
            if probed.contains(&destination.to_string()) {
                job.probe = None;
            } else {
                probed.push(destination.to_string());
            }
        }
    }

    let deadlines = Deadlines { dns: config.dns_timeout, connect: config.connect_timeout };
    let tls = options.tls;
    let mut probes = tokio::task::JoinSet::new();
    let mut index_of = std::collections::HashMap::new();
    let count = jobs.len();
    let mut allowlist_steps = Vec::with_capacity(count);
    let mut probing = vec![false; count];
    let mut subjects = vec![String::new(); count];
    for (index, job) in jobs.into_iter().enumerate() {
        allowlist_steps.push(Some(job.allowlist));
        if let Some((destination, rule)) = job.probe {
            subjects[index] = destination.to_string();
            probing[index] = true;
            let task = probes
                .spawn(async move { probe(deadlines, &destination, rule.as_ref(), tls).await });
            index_of.insert(task.id(), index);
        }
    }
    // Each job's steps are reported once every job before it has been: in order, as soon as
    // they can be.
    let mut results: Vec<Option<Vec<Step>>> = vec![None; count];
    let mut next = 0;
    loop {
        while next < count && !(probing[next] && results[next].is_none()) {
            if let Some(step) = allowlist_steps[next].take() {
                report.push(step);
            }
            for step in results[next].take().unwrap_or_default() {
                report.push(step);
            }
            next += 1;
        }
        if next == count {
            return;
        }
        let (index, steps) = match probes.join_next_with_id().await {
            Some(Ok((id, steps))) => (index_of[&id], steps),
            Some(Err(e)) => {
                let index = index_of[&e.id()];
                let failed = Step::new(
                    "destination-dns",
                    subjects[index].clone(),
                    Outcome::Fail,
                    Duration::ZERO,
                    format!("the check of this destination failed: {e}"),
                );
                (index, vec![failed])
            }
            None => return, // every probe is in; nothing can be missing
        };
        results[index] = Some(steps);
    }
}

/// The allowlist step for an endpoint, and the probe when the agent would open it.
fn endpoint_job(config: &AgentConfig, endpoint: &EndpointFact) -> Job {
    let subject = format!("endpoint {} → {}", endpoint.name, endpoint.destination);
    if let Some(patterns) = endpoint.destination.strip_prefix(CONNECT_PREFIX) {
        // A CONNECT endpoint has no one destination to probe: say which of its patterns this
        // agent would open; a destination is probed with --destination HOST:PORT.
        let (allowed, refused): (Vec<&str>, Vec<&str>) =
            patterns.split(' ').filter(|p| !p.is_empty()).partition(|text| {
                text.parse::<DestinationPattern>()
                    .is_ok_and(|pattern| config.allowlist.overlapping(&pattern))
            });
        let mut step = Step::new(
            "allowlist",
            subject,
            Outcome::Pass,
            Duration::ZERO,
            format!(
                "CONNECT endpoint; this agent opens what its allowlist admits of: {}",
                allowed.join(", ")
            ),
        );
        if allowed.is_empty() {
            step.warn(
                "none of its destinations is in this agent's allowlist: it rejects the endpoint",
            );
        } else if !refused.is_empty() {
            step.detail.push_str(&format!("; not of: {}", refused.join(", ")));
        }
        return Job { allowlist: step, probe: None };
    }
    let destination = match endpoint.destination.parse::<Destination>() {
        Ok(d) => d,
        Err(e) => {
            let mut step = Step::new("allowlist", subject, Outcome::Pass, Duration::ZERO, "");
            step.warn(format!("invalid destination ({e}): every agent rejects it"));
            return Job { allowlist: step, probe: None };
        }
    };
    let Some(rule) = config.allowlist.matching(&destination) else {
        let mut step =
            Step::new("allowlist", subject, Outcome::Pass, Duration::ZERO, "not allowed");
        step.warn(format!(
            "{destination} is not in this agent's allowlist: this agent rejects the endpoint \
             (another agent of connector `{}` may serve it)",
            config.connector
        ));
        return Job { allowlist: step, probe: None };
    };
    let step = Step::new(
        "allowlist",
        subject,
        Outcome::Pass,
        Duration::ZERO,
        format!("allowed by `{rule}`"),
    );
    Job { allowlist: step, probe: Some((destination, Some(rule.clone()))) }
}

/// The allowlist step for a `--destination`, and its probe (allowed or not: the operator
/// asked).
fn destination_job(config: &AgentConfig, text: &str) -> Job {
    let destination = match text.parse::<Destination>() {
        Ok(d) => d,
        Err(e) => {
            let step = Step::new(
                "allowlist",
                text,
                Outcome::Fail,
                Duration::ZERO,
                format!("invalid destination: {e}"),
            );
            return Job { allowlist: step, probe: None };
        }
    };
    let rule = config.allowlist.matching(&destination);
    let mut step =
        Step::new("allowlist", destination.to_string(), Outcome::Pass, Duration::ZERO, "");
    match rule {
        Some(rule) => step.detail = format!("allowed by `{rule}`"),
        None => {
            step.detail = "not allowed".to_owned();
            step.warn("not in this agent's allowlist: the agent refuses to open it");
        }
    }
    Job { allowlist: step, probe: Some((destination, rule.cloned())) }
}

/// DNS, TCP and TLS for one destination: its steps.
async fn probe(
    deadlines: Deadlines,
    destination: &Destination,
    rule: Option<&DestinationPattern>,
    tls: bool,
) -> Vec<Step> {
    let mut steps = Report::default();
    let Some(addresses) = resolve(deadlines, destination, rule, &mut steps).await else {
        return steps.steps;
    };
    let Some(connected) = connect(deadlines, destination, &addresses, &mut steps).await else {
        return steps.steps;
    };
    if tls {
        steps.push(tls_probe::handshake(deadlines.connect, destination, connected).await);
    }
    steps.steps
}

/// The `destination-dns` step; the addresses the agent would connect to.
async fn resolve(
    deadlines: Deadlines,
    destination: &Destination,
    rule: Option<&DestinationPattern>,
    report: &mut Report,
) -> Option<Vec<SocketAddr>> {
    let subject = destination.to_string();
    let (resolved, took) = match &destination.host {
        Host::Ip(ip) => (Ok(vec![SocketAddr::new(*ip, destination.port)]), Duration::ZERO),
        Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.lookup_form(), destination.port));
            let (answer, took) = timed(tokio::time::timeout(deadlines.dns, lookup)).await;
            let answer = match answer {
                Ok(Ok(addrs)) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.dedup();
                    if addrs.is_empty() { Err("no address".to_owned()) } else { Ok(addrs) }
                }
                Ok(Err(e)) => Err(format!("does not resolve: {e}")),
                Err(_) => Err(format!("no answer within {:?} (dns_timeout)", deadlines.dns)),
            };
            (answer, took)
        }
    };
    let addresses = match resolved {
        Ok(addresses) => addresses,
        Err(reason) => {
            let mut step = Step::new("destination-dns", subject, Outcome::Fail, took, reason);
            if let Some(zone) = private_link_zone(destination.host.to_string().as_str()) {
                step.detail.push_str(&format!(
                    "; the private DNS zone `{zone}` is not linked to this network, or has no \
                     record for this name"
                ));
            }
            report.push(step);
            return None;
        }
    };
    let facts: Vec<AddressFact> = addresses.iter().map(|a| AddressFact::of(a.ip())).collect();
    let listed: Vec<String> =
        facts.iter().map(|f| format!("{} ({})", f.address, f.class.describe(f.address))).collect();
    let detail = match &destination.host {
        Host::Ip(_) => format!("an address: {}", listed.join(", ")),
        Host::Name(_) => format!("resolves to {}", listed.join(", ")),
    };
    let mut step = Step::new("destination-dns", subject, Outcome::Pass, took, detail);
    let host = destination.host.to_string();
    if let (Some(zone), Some(public)) =
        (private_link_zone(&host), facts.iter().find(|f| !f.private))
    {
        step.warn(format!(
            "`{host}` resolves to {}, which is not a private address: this network does not \
             see the private DNS zone `{zone}`. Link the zone to this virtual network (or, with \
             your own DNS servers, forward `{zone}` to Azure DNS, 168.63.129.16); until then \
             connections go to the service's public endpoint, which refuses them when public \
             access is off",
            public.address
        ));
    }
    step.addresses = Some(facts);
    let admissible = match rule {
        Some(rule) => match admissible_addresses(destination, rule, addresses) {
            Ok(admissible) => admissible,
            Err(refused) => {
                step.outcome = Outcome::Fail;
                step.detail.push_str(&format!(": {}", refused.message));
                report.push(step);
                return None;
            }
        },
        None => {
            if let Some((ip, kind)) =
                addresses.iter().find_map(|a| special_address_kind(a.ip()).map(|k| (a.ip(), k)))
            {
                step.warn(format!(
                    "{ip} is a {kind} address, which the agent refuses unless an [[allow]] \
                     rule names it explicitly"
                ));
            }
            addresses
        }
    };
    report.push(step);
    Some(admissible)
}

/// The `destination-tcp` step: connects to each address; returns the first connection.
async fn connect(
    deadlines: Deadlines,
    destination: &Destination,
    addresses: &[SocketAddr],
    report: &mut Report,
) -> Option<TcpStream> {
    // All addresses at once, so that a destination whose addresses are all filtered costs
    // one connect_timeout, not one per address.
    let deadline = deadlines.connect;
    let (mut results, took) = timed(async {
        let mut attempts = tokio::task::JoinSet::new();
        for (index, addr) in addresses.iter().copied().take(MAX_ADDRESSES).enumerate() {
            attempts.spawn(async move {
                let (result, took) =
                    timed(tokio::time::timeout(deadline, TcpStream::connect(addr))).await;
                (index, addr, result, took)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = attempts.join_next().await {
            if let Ok(result) = joined {
                results.push(result);
            }
        }
        results
    })
    .await;
    results.sort_by_key(|(index, ..)| *index);
    let mut first: Option<TcpStream> = None;
    let mut connected = Vec::new();
    let mut failed = Vec::new();
    for (_, addr, result, took) in results {
        match result {
            Ok(Ok(stream)) => {
                connected.push(format!("{addr} in {:.1} ms", took.as_secs_f64() * 1000.0));
                first.get_or_insert(stream);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                failed.push(format!("{addr}: connection refused (nothing listens there)"));
            }
            Ok(Err(e)) => failed.push(format!("{addr}: {e}")),
            Err(_) => failed.push(format!(
                "{addr}: no answer within {deadline:?} (connect_timeout): a firewall or network \
                 security group drops it, or no host has that address"
            )),
        }
    }
    let subject = destination.to_string();
    let mut step = if connected.is_empty() {
        Step::new("destination-tcp", subject, Outcome::Fail, took, failed.join("; "))
    } else {
        let mut step = Step::new(
            "destination-tcp",
            subject,
            Outcome::Pass,
            took,
            format!("connected to {}", connected.join(", ")),
        );
        for failure in &failed {
            step.warn(format!("{failure} (the agent tries the next address)"));
        }
        step
    };
    if addresses.len() > MAX_ADDRESSES {
        step.warn(format!(
            "{} addresses; only the first {MAX_ADDRESSES} were tried",
            addresses.len()
        ));
    }
    report.push(step);
    first
}
