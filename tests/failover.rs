//! Opens retried on another agent: a real agent beside an agent played by hand that fails,
//! resets or ignores its open requests, or freezes. Every client connection must be served,
//! with the client never seeing the failed try; a policy refusal is not retried; a frozen
//! agent is suspected after one unanswered open and dropped at its heartbeat's deadline.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_relay::config::AdminSettings;
use privlink_transport::tunnel::TransportKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections each scenario makes through the endpoint.
const CLIENTS: usize = 12;

fn kind(transport: TransportChoice) -> TransportKind {
    match transport {
        TransportChoice::Tcp => TransportKind::Tcp,
        _ => TransportKind::Quic,
    }
}

/// A relay with endpoint `e` (a short `open_timeout`, so the scenarios stay quick) in front of
/// an echo server, its admin listener, and a real agent on `transport` that serves it.
async fn relay_with_a_real_agent(
    transport: TransportChoice,
) -> (Harness, tokio_util::sync::CancellationToken) {
    let destination = echo_server().await;
    let mut spec = endpoint("e", destination);
    spec.open.timeout = Duration::from_millis(500);
    let admin = AdminSettings::new("127.0.0.1:0".parse().expect("addr"), None);
    let harness = Harness::start_with_admin(vec![spec], Some(admin)).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(destination)]));
    harness.wait_approved("e").await;
    (harness, agent)
}

/// One client connection's echo of a few KiB (sent in two pieces, the first before any answer
/// can have come): `Ok` when every byte came back.
async fn echo_once(harness: &Harness, round: usize) -> Result<(), String> {
    let mut socket = TcpStream::connect(harness.addr("e")).await.map_err(|e| e.to_string())?;
    let payload: Vec<u8> =
        (0..6000).map(|i| u8::try_from((i * 7 + round) % 256).expect("a byte")).collect();
    let (first, rest) = payload.split_at(1500);
    let exchange = async {
        socket.write_all(first).await?;
        socket.write_all(rest).await?;
        socket.shutdown().await?;
        let mut echoed = Vec::new();
        socket.read_to_end(&mut echoed).await?;
        Ok::<_, std::io::Error>(echoed)
    };
    match tokio::time::timeout(WAIT, exchange).await {
        Ok(Ok(echoed)) if echoed == payload => Ok(()),
        Ok(Ok(echoed)) => {
            Err(format!("round {round}: {} bytes came back of {}", echoed.len(), payload.len()))
        }
        Ok(Err(e)) => Err(format!("round {round}: {e}")),
        Err(_) => Err(format!("round {round}: no end within {WAIT:?}")),
    }
}

/// The relay's `privlink_relay_open_retries_total` for endpoint `e`, all reasons together.
fn open_retries(harness: &Harness) -> u64 {
    let admin = harness.relay.admin_addr().expect("admin");
    let (_, text) = tokio::task::block_in_place(|| admin_get(admin, "/metrics"));
    text.lines()
        .filter(|l| {
            l.starts_with("privlink_relay_open_retries_total{") && l.contains("endpoint=\"e\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Runs [`CLIENTS`] connections one after another; every one must be served.
async fn every_client_is_served(harness: &Harness) {
    for round in 0..CLIENTS {
        if let Err(e) = echo_once(harness, round).await {
            panic!("a client saw the failed try: {e}");
        }
    }
}

async fn an_agent_that_cannot_reach_the_destination_costs_no_client_anything(
    transport: TransportChoice,
) {
    let (harness, agent) = relay_with_a_real_agent(transport).await;
    // The newest agent is chosen first among equals: the failing one, for the first
    // connection; after its failure it is tried last for that endpoint.
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::FailRefused, true).await;
    every_client_is_served(&harness).await;
    assert_eq!(open_retries(&harness), 1, "only the first connection tried the failing agent");
    harness.shutdown(&[agent]).await;
}

async fn a_stream_reset_before_the_answer_is_retried_on_another_agent(transport: TransportChoice) {
    let (harness, agent) = relay_with_a_real_agent(transport).await;
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::Reset, true).await;
    every_client_is_served(&harness).await;
    assert_eq!(open_retries(&harness), 1, "only the first connection tried the resetting agent");
    harness.shutdown(&[agent]).await;
}

async fn a_policy_refusal_is_not_retried(transport: TransportChoice) {
    // Only the refusing agent, so the client's fate does not depend on which agent the relay
    // picks first: a retry would show in the counter even with no other agent to go to.
    let destination = echo_server().await;
    let admin = AdminSettings::new("127.0.0.1:0".parse().expect("addr"), None);
    let harness = Harness::start_with_admin(vec![endpoint("e", destination)], Some(admin)).await;
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::FailNotAllowed, true).await;
    // Every agent would refuse alike: the client is refused, and no other agent is tried.
    for round in 0..3 {
        assert!(echo_once(&harness, round).await.is_err(), "a not-allowed answer was served");
    }
    assert_eq!(open_retries(&harness), 0, "a not-allowed answer was retried");
    harness.shutdown(&[]).await;
}

async fn an_agent_that_never_answers_costs_one_open_timeout_and_no_failure(
    transport: TransportChoice,
) {
    let (harness, agent) = relay_with_a_real_agent(transport).await;
    // Its control stream answers heartbeats, so its suspicion clears at once; but after the
    // open it let time out it is tried last for the endpoint, so only the first connection
    // waits out `open_timeout`.
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::Ignore, true).await;
    for round in 0..4 {
        echo_once(&harness, round).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(open_retries(&harness), 1, "only the first connection waited on the silent agent");
    harness.shutdown(&[agent]).await;
}

async fn a_frozen_agent_is_suspected_after_one_unanswered_open_and_dropped_at_its_heartbeat_deadline(
    transport: TransportChoice,
) {
    let (harness, agent) = relay_with_a_real_agent(transport).await;
    // Frozen: it neither answers opens nor reads its control stream, though its transport
    // connection lives on (the QUIC endpoint and the kernel still acknowledge).
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::Ignore, false).await;
    every_client_is_served(&harness).await;
    // One connection found it silent; from then on it was suspected and chosen no more.
    assert_eq!(open_retries(&harness), 1, "only the first connection waited on the frozen agent");
    // Its heartbeat, sent at once on suspicion, goes unanswered: the relay drops it.
    let agents = harness
        .relay
        .wait_for_agents(CONNECTOR, WAIT, |agents| agents.iter().all(|a| a.name != "fake"))
        .await;
    assert!(agents.iter().all(|a| a.name != "fake"), "the frozen agent is still listed");
    every_client_is_served(&harness).await;
    harness.shutdown(&[agent]).await;
}

on_both_transports!(
    an_agent_that_cannot_reach_the_destination_costs_no_client_anything,
    a_stream_reset_before_the_answer_is_retried_on_another_agent,
    a_policy_refusal_is_not_retried,
    an_agent_that_never_answers_costs_one_open_timeout_and_no_failure,
    a_frozen_agent_is_suspected_after_one_unanswered_open_and_dropped_at_its_heartbeat_deadline,
);

/// How the second agent is lost in [`losing_one_of_two_agent_processes_under_load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `kill -9`: its connections die with the process (TCP: the kernel resets them; QUIC:
    /// nothing more is heard).
    Kill,
    /// `kill -STOP`: frozen — no reset, no ICMP, and on TLS/TCP the kernel still acknowledges:
    /// what a hung host or a partition looks like.
    Freeze,
}

/// Real processes on loopback in front of the load tool's backend: relays and agents of one
/// connector with endpoint `e`, every process with its admin listener.
struct Deployment {
    _dir: tempfile::TempDir,
    relays: Vec<RelayProcess>,
    /// Each agent's config file and admin listener.
    agent_files: Vec<(String, std::net::SocketAddr)>,
    agents: Vec<Running>,
    stop_backend: tokio_util::sync::CancellationToken,
    /// What the load's TLS clients use to reach the backend through the tunnel.
    tls: privlink_testbed::load::LoadTls,
}

/// One relay of a [`Deployment`].
struct RelayProcess {
    running: Running,
    admin: AdminProbe,
    /// Where its endpoint `e` listens.
    endpoint: std::net::SocketAddr,
    config: String,
}

impl Deployment {
    /// `relays` relays (the same certificate, token and endpoint, each on its own ports) and
    /// `agents` agents (agent-0, agent-1, …) on `transport` linked to every relay, every agent
    /// approved on every relay; `agent_extra` goes into each agent's config.
    async fn start(transport: &str, relays: usize, agents: usize, agent_extra: &str) -> Self {
        use privlink_testbed::process::{free_fixed_port, write_tunnel_files};

        let (destination, stop_backend, tls) = load_backend().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let tunnel = loopback(free_fixed_port());
        let endpoint = loopback(free_fixed_port());
        let configs = write_tunnel_files(
            common::BIN,
            dir.path(),
            &TunnelFiles {
                tunnel_listen: &tunnel.to_string(),
                endpoint: "e",
                endpoint_listen: &endpoint.to_string(),
                destination: &destination,
                endpoint_extra: "",
                agent_extra: &format!(
                    "transport = \"{transport}\"\nname = \"agent-0\"\n{agent_extra}"
                ),
                allow: &destination,
                admin: (loopback(free_fixed_port()), loopback(free_fixed_port())),
            },
        );
        // More relays: the same file on other ports.
        let relay_template = std::fs::read_to_string(&configs.relay).expect("relay.toml");
        let mut relay_files = vec![(configs.relay.clone(), tunnel, endpoint, configs.relay_admin)];
        for i in 1..relays {
            let (t, e, a) = (
                loopback(free_fixed_port()),
                loopback(free_fixed_port()),
                loopback(free_fixed_port()),
            );
            let text = relay_template
                .replace(&tunnel.to_string(), &t.to_string())
                .replace(&endpoint.to_string(), &e.to_string())
                .replace(&configs.relay_admin.to_string(), &a.to_string());
            let path = dir.path().join(format!("relay-{i}.toml"));
            std::fs::write(&path, text).expect("relay config");
            relay_files.push((path.to_str().expect("utf-8").to_owned(), t, e, a));
        }
        let relay_list: Vec<String> =
            relay_files.iter().map(|(_, t, _, _)| format!("\"{t}\"")).collect();
        let template = std::fs::read_to_string(&configs.agent).expect("agent.toml").replace(
            &format!("relays = [\"{tunnel}\"]"),
            &format!("relays = [{}]", relay_list.join(", ")),
        );
        let mut agent_files = Vec::new();
        for i in 0..agents {
            let admin = loopback(free_fixed_port());
            let text = template
                .replace("name = \"agent-0\"", &format!("name = \"agent-{i}\""))
                .replace(&configs.agent_admin.to_string(), &admin.to_string());
            let path = dir.path().join(format!("agent-{i}.toml"));
            std::fs::write(&path, text).expect("agent config");
            agent_files.push((path.to_str().expect("utf-8").to_owned(), admin));
        }
        let relays = relay_files
            .into_iter()
            .map(|(config, _, endpoint, admin)| {
                let mut running = common::privlink(&["relay", "--config", &config]);
                let admin = AdminProbe::new(None, admin);
                tokio::task::block_in_place(|| running.wait_ready(&admin));
                RelayProcess { running, admin, endpoint, config }
            })
            .collect();
        let mut deployment =
            Self { _dir: dir, relays, agent_files, agents: Vec::new(), stop_backend, tls };
        for i in 0..agents {
            let agent = deployment.start_agent(i);
            deployment.agents.push(agent);
        }
        deployment
    }

    /// The first relay's endpoint.
    fn endpoint(&self) -> std::net::SocketAddr {
        self.relays[0].endpoint
    }

    /// Starts agent `i` and waits until every relay lists it approving `e`.
    fn start_agent(&self, i: usize) -> Running {
        let (config, admin) = &self.agent_files[i];
        let mut agent = common::privlink(&["agent", "--config", config]);
        let probe = AdminProbe::new(None, *admin);
        tokio::task::block_in_place(|| {
            agent.wait_ready(&probe);
            let id = probe.agent_status().id;
            for relay in &self.relays {
                relay
                    .admin
                    .wait_relay_status(|s| privlink_testbed::process::approved_by(s, &id, "e"));
            }
        });
        agent
    }

    /// Agent `i`'s admin listener.
    fn agent_admin(&self, i: usize) -> AdminProbe {
        AdminProbe::new(None, self.agent_files[i].1)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop_backend.cancel();
    }
}

/// A relay and two agents on `transport` under continuous load (four workers opening
/// connections, each with an echo round trip); one agent is lost to `fault`. No connection
/// opened after the fault may fail, and the connections that were open on the lost agent end
/// — none hangs.
async fn losing_one_of_two_agent_processes_under_load(transport: &str, fault: Fault) {
    use privlink_testbed::load;
    let mut deployment = Deployment::start(transport, 1, 2, "").await;
    let endpoint_listen = deployment.endpoint();

    // Connections held open across the fault, spread over both agents by the least-loaded
    // choice; each echoes a byte before it.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = TcpStream::connect(endpoint_listen).await.expect("connect");
        conn.write_all(&[load::ECHO, 1]).await.expect("write");
        conn.read_exact(&mut [0u8; 1]).await.expect("echo");
        held.push(conn);
    }

    let stop_load = tokio_util::sync::CancellationToken::new();
    let tls = Some(deployment.tls.clone());
    let load = tokio::spawn(load::churn_tls(endpoint_listen, 4, WAIT, stop_load.clone(), tls));
    tokio::time::sleep(Duration::from_secs(1)).await;
    match fault {
        Fault::Kill => deployment.agents[1].kill_hard(),
        Fault::Freeze => {
            signal(deployment.agents[1].pid(), "-STOP");
            wait_stopped(deployment.agents[1].pid());
        }
    }
    // Taken once the agent is gone (a killed agent is reaped; every thread of a frozen one
    // shows as stopped, which on a loaded machine was seen to take tens of milliseconds after
    // `kill -STOP` returned — time in which the agent still answered an open): connections
    // begun before could be answered by the agent before it went.
    let fault_at = std::time::Instant::now();
    // Load through and past the heartbeat deadline (two 3 s periods).
    tokio::time::sleep(Duration::from_secs(7)).await;

    // Every held connection either still echoes (on the agent that is left) or has ended.
    let mut ended = 0;
    for conn in &mut held {
        let answer = async {
            conn.write_all(&[2]).await?;
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).await.map(|_| ())
        };
        match tokio::time::timeout(WAIT, answer).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => ended += 1,
            Err(_) => panic!("a connection open on the lost agent hangs {WAIT:?} after the fault"),
        }
    }
    stop_load.cancel();
    let samples = load.await.expect("load");
    if fault == Fault::Freeze {
        signal(deployment.agents[1].pid(), "-CONT");
    }
    let after: Vec<_> = samples.iter().filter(|s| s.started >= fault_at).collect();
    let failed: Vec<_> = after
        .iter()
        .filter_map(|s| Some(format!("{} after {:?}", s.failure.as_deref()?, s.took)))
        .collect();
    let worst = after.iter().map(|s| s.took).max().unwrap_or_default();
    let before_failed =
        samples.iter().filter(|s| s.started < fault_at && s.failure.is_some()).count();
    eprintln!(
        "{fault:?} one of two agents ({transport}): {} connections after the fault, {} failed; \
         {before_failed} of {} opened before it failed; worst open {worst:?}; {ended} of 4 held \
         connections ended",
        after.len(),
        failed.len(),
        samples.len() - after.len(),
    );
    assert!(after.len() > 20, "too little load to judge: {} connections", after.len());
    if !failed.is_empty() {
        // What the relay saw: its log lines other than completed flows.
        let relay = deployment.relays[0].running.output_so_far();
        for line in relay.iter().filter(|l| !l.contains("outcome=completed")) {
            eprintln!("relay: {line}");
        }
        for line in deployment.agents[1].output_so_far() {
            eprintln!("agent-1: {line}");
        }
    }
    assert!(failed.is_empty(), "connections opened after the fault failed: {failed:?}");
    // The least-loaded choice put some on each agent: those on the lost one ended, the others
    // still echo.
    assert!((1..4).contains(&ended), "{ended} of 4 held connections ended");
}

/// Waits until every thread of process `pid` is stopped (state `T` in `/proc`), for at most
/// [`WAIT`].
fn wait_stopped(pid: u32) {
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
            })
        })
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !stopped() {
        assert!(std::time::Instant::now() < deadline, "process {pid} did not stop within {WAIT:?}");
        std::thread::yield_now();
    }
}

fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill").args([which, &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill {which} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_agents_under_load_fails_no_new_connection_over_quic() {
    losing_one_of_two_agent_processes_under_load("quic", Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_agents_under_load_fails_no_new_connection_over_tcp() {
    losing_one_of_two_agent_processes_under_load("tcp", Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_one_of_two_agents_under_load_fails_no_new_connection_over_quic() {
    losing_one_of_two_agent_processes_under_load("quic", Fault::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_one_of_two_agents_under_load_fails_no_new_connection_over_tcp() {
    losing_one_of_two_agent_processes_under_load("tcp", Fault::Freeze).await;
}

/// Two agents, each stopped with SIGTERM and started again in turn — a rolling update —
/// while long transfers run on both and new connections keep coming: not one connection of
/// any kind fails or is cut short, and each draining agent shows as draining (its `/readyz`
/// 503, the relay's status) while it finishes.
async fn rolling_sigterm_restarts_of_two_agents_lose_nothing(transport: &str) {
    use privlink_testbed::load;
    const TRANSFER: u64 = 48 << 20;
    const PACE: Duration = Duration::from_millis(40);
    let mut deployment = Deployment::start(transport, 1, 2, "shutdown_grace = \"20s\"").await;
    let endpoint = deployment.endpoint();
    let stop_load = tokio_util::sync::CancellationToken::new();
    let tls = Some(deployment.tls.clone());
    let churn = tokio::spawn(load::churn_tls(endpoint, 2, WAIT, stop_load.clone(), tls));
    for i in 0..2 {
        // Four long transfers: the least-loaded choice puts some on each agent.
        let transfers: Vec<_> =
            (0..4).map(|_| tokio::spawn(paced_upload(endpoint, TRANSFER, 1 << 20, PACE))).collect();
        let agent_admin = deployment.agent_admin(i);
        // One of them under way on this agent (the short connections of the load do not count).
        tokio::task::block_in_place(|| {
            agent_admin.wait("/api/v1/connections", |code, body| {
                code == 200
                    && serde_json::from_str::<serde_json::Value>(body).is_ok_and(|c| {
                        c["connections"].as_array().is_some_and(|all| {
                            all.iter().any(|c| {
                                c["bytes_to_destination"].as_u64().is_some_and(|n| n > 1 << 20)
                            })
                        })
                    })
            })
        });
        deployment.agents[i].signal_terminate();
        // Draining, and saying so, while its transfers finish.
        let name = format!("agent-{i}");
        tokio::task::block_in_place(|| {
            let body = agent_admin.wait("/readyz", |code, _| code == 503);
            assert!(body.contains("draining"), "{body}");
            deployment.relays[0]
                .admin
                .wait_relay_status(|s| s.agents.iter().any(|a| a.name == name && a.draining));
        });
        for transfer in transfers {
            if let Err(e) = transfer.await.expect("join") {
                let relay = deployment.relays[0].running.output_so_far().join("\n");
                let agents: Vec<String> =
                    deployment.agents.iter_mut().map(|a| a.output_so_far().join("\n")).collect();
                panic!(
                    "a long transfer failed while agent-{i} drained: {e}\n--- relay:\n{relay}\n\
                     --- agents:\n{}",
                    agents.join("\n---\n")
                );
            }
        }
        let stopped = deployment.agents.remove(i);
        let status = tokio::task::block_in_place(|| stopped.wait_exit());
        assert!(status.success(), "agent-{i} exit after SIGTERM: {status}");
        let restarted = deployment.start_agent(i);
        deployment.agents.insert(i, restarted);
    }
    stop_load.cancel();
    let samples = churn.await.expect("churn");
    let failed: Vec<_> = samples.iter().filter_map(|s| s.failure.as_deref()).collect();
    let worst = samples.iter().map(|s| s.took).max().unwrap_or_default();
    eprintln!(
        "rolling restart ({transport}): {} connections, {} failed, worst open {worst:?}; 8 long \
         transfers intact",
        samples.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "connections failed during the rolling restart: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_sigterm_restarts_of_two_agents_lose_nothing_over_quic() {
    rolling_sigterm_restarts_of_two_agents_lose_nothing("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_sigterm_restarts_of_two_agents_lose_nothing_over_tcp() {
    rolling_sigterm_restarts_of_two_agents_lose_nothing("tcp").await;
}

/// An agent linked to two relays: each relay serves the endpoint; one killed, the other
/// keeps serving without a failed connection; started again, the agent links to it by itself.
async fn with_two_relays_one_killed_the_other_serves_and_the_agent_relinks(transport: &str) {
    use privlink_testbed::load;
    let mut deployment = Deployment::start(transport, 2, 1, "").await;
    let survivor = deployment.relays[1].endpoint;
    for relay in &deployment.relays {
        let tls = Some(deployment.tls.clone());
        let samples = load::churn_for(relay.endpoint, 1, Duration::from_millis(300), tls).await;
        assert!(samples.iter().all(|s| s.failure.is_none()), "each relay serves the endpoint");
    }
    let stop_load = tokio_util::sync::CancellationToken::new();
    let tls = Some(deployment.tls.clone());
    let churn = tokio::spawn(load::churn_tls(survivor, 2, WAIT, stop_load.clone(), tls));
    tokio::time::sleep(Duration::from_millis(300)).await;
    deployment.relays[0].running.kill_hard();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Back on the same ports: the agent re-links by itself.
    let config = deployment.relays[0].config.clone();
    deployment.relays[0].running = common::privlink(&["relay", "--config", &config]);
    let agent_id = deployment.agent_admin(0).agent_status().id;
    tokio::task::block_in_place(|| {
        let relay = &mut deployment.relays[0];
        relay.running.wait_ready(&relay.admin);
        relay
            .admin
            .wait_relay_status(|s| privlink_testbed::process::approved_by(s, &agent_id, "e"));
    });
    stop_load.cancel();
    let samples = churn.await.expect("churn");
    let failed: Vec<_> = samples.iter().filter_map(|s| s.failure.as_deref()).collect();
    assert!(samples.len() > 20, "too little load: {}", samples.len());
    assert!(failed.is_empty(), "the surviving relay failed connections: {failed:?}");
    let tls = Some(deployment.tls.clone());
    let back =
        load::churn_for(deployment.relays[0].endpoint, 1, Duration::from_millis(300), tls).await;
    assert!(back.iter().all(|s| s.failure.is_none()), "the restarted relay serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_relays_one_killed_the_other_serves_and_the_agent_relinks_over_quic() {
    with_two_relays_one_killed_the_other_serves_and_the_agent_relinks("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_relays_one_killed_the_other_serves_and_the_agent_relinks_over_tcp() {
    with_two_relays_one_killed_the_other_serves_and_the_agent_relinks("tcp").await;
}
