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
    let admin = AdminSettings { listen: "127.0.0.1:0".parse().expect("addr"), token: None };
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
    // The newest agent is chosen first among equals: the failing one, every time.
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::FailRefused, true).await;
    every_client_is_served(&harness).await;
    assert_eq!(open_retries(&harness), CLIENTS as u64, "each connection was tried twice");
    harness.shutdown(&[agent]).await;
}

async fn a_stream_reset_before_the_answer_is_retried_on_another_agent(transport: TransportChoice) {
    let (harness, agent) = relay_with_a_real_agent(transport).await;
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::Reset, true).await;
    every_client_is_served(&harness).await;
    assert_eq!(open_retries(&harness), CLIENTS as u64);
    harness.shutdown(&[agent]).await;
}

async fn a_policy_refusal_is_not_retried(transport: TransportChoice) {
    let (harness, agent) = relay_with_a_real_agent(transport).await;
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::FailNotAllowed, true).await;
    // Every agent would refuse alike: the client is refused, not sent elsewhere.
    let refused = echo_once(&harness, 0).await;
    assert!(refused.is_err(), "a not-allowed answer was retried elsewhere");
    assert_eq!(open_retries(&harness), 0);
    harness.shutdown(&[agent]).await;
}

async fn an_agent_that_never_answers_costs_one_open_timeout_per_try_and_no_failure(
    transport: TransportChoice,
) {
    let (harness, agent) = relay_with_a_real_agent(transport).await;
    // Its control stream answers heartbeats, so it is heard from again at once and chosen
    // again: each connection given to it waits out `open_timeout`, then moves on.
    let _fake = FakeAgent::start(&harness, kind(transport), OnOpen::Ignore, true).await;
    for round in 0..3 {
        echo_once(&harness, round).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(open_retries(&harness) >= 1, "the silent agent was tried");
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
    an_agent_that_never_answers_costs_one_open_timeout_per_try_and_no_failure,
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

/// Real processes: a relay and two agents on `transport` in front of the load tool's backend,
/// under continuous load (four workers opening connections, each with an echo round trip);
/// one agent is lost to `fault`. No connection opened after the fault may fail, and the
/// connections that were open on the lost agent end — none hangs.
async fn losing_one_of_two_agent_processes_under_load(transport: &str, fault: Fault) {
    use privlink_testbed::load;
    use privlink_testbed::process::{approved_by, free_fixed_port, write_tunnel_files};

    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let destination = backend.local_addr().expect("addr").to_string();
    let stop_backend = tokio_util::sync::CancellationToken::new();
    tokio::spawn(load::serve_backend(backend, stop_backend.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let endpoint_listen = loopback(free_fixed_port());
    let configs = write_tunnel_files(
        common::BIN,
        dir.path(),
        &TunnelFiles {
            tunnel_listen: &loopback(free_fixed_port()).to_string(),
            endpoint: "e",
            endpoint_listen: &endpoint_listen.to_string(),
            destination: &destination,
            endpoint_extra: "",
            agent_extra: &format!("transport = \"{transport}\"\nname = \"agent-a\""),
            allow: &destination,
            admin: (loopback(free_fixed_port()), loopback(free_fixed_port())),
        },
    );
    // The second agent: the same, under another name and admin port.
    let second_admin = loopback(free_fixed_port());
    let second = std::fs::read_to_string(&configs.agent)
        .expect("agent.toml")
        .replace("name = \"agent-a\"", "name = \"agent-b\"")
        .replace(&configs.agent_admin.to_string(), &second_admin.to_string());
    let second_path = dir.path().join("agent-b.toml");
    std::fs::write(&second_path, second).expect("agent-b.toml");

    let relay = common::privlink(&["relay", "--config", &configs.relay]);
    let relay_admin = AdminProbe::new(None, configs.relay_admin);
    relay_admin.wait_ready();
    let agent_a = common::privlink(&["agent", "--config", &configs.agent]);
    let mut agent_b =
        common::privlink(&["agent", "--config", second_path.to_str().expect("utf-8")]);
    let mut ids = Vec::new();
    for admin in [configs.agent_admin, second_admin] {
        let probe = AdminProbe::new(None, admin);
        probe.wait_ready();
        ids.push(probe.status()["id"].as_str().expect("id").to_owned());
    }
    tokio::task::block_in_place(|| {
        relay_admin.wait_status(|s| ids.iter().all(|id| approved_by(s, id, "e")))
    });

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
    let load = tokio::spawn(load::churn(endpoint_listen, 4, WAIT, stop_load.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    match fault {
        Fault::Kill => agent_b.kill_hard(),
        Fault::Freeze => signal(agent_b.pid(), "-STOP"),
    }
    // Taken once the signal is delivered (`kill` has returned; a killed agent is reaped):
    // connections begun before could be answered by the agent before it went.
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
        signal(agent_b.pid(), "-CONT");
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
    assert!(failed.is_empty(), "connections opened after the fault failed: {failed:?}");
    // The least-loaded choice put some on each agent: those on the lost one ended, the others
    // still echo.
    assert!((1..4).contains(&ended), "{ended} of 4 held connections ended");
    drop((agent_a, agent_b, relay));
    stop_backend.cancel();
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
