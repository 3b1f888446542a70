//! Restraint against one noisy or hostile source, and the longest connection: an endpoint's
//! `per_source_rate` (a token bucket) and `per_source_max_connections`, a shared listener's
//! per-source limit, and `max_duration` closing a busy transfer. Refused connections are closed
//! before anything is opened toward an agent and counted by reason; other sources are untouched.
//! (The bounded source table's flood of 100,000 IPv6 sources is a unit test of
//! `privlink_relay`'s `source_limits`.)

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::client_hello::ACCESS_DENIED_ALERT;
use privlink_protocol::config::AdminSettings;
use privlink_relay::config::{EndpointSpec, SourcePolicy};
use privlink_testbed::process::free_fixed_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A relay with `spec` (an endpoint `e` in front of an echo server, shaped by `shape`), an
/// agent that approved it, and the relay's admin listener.
async fn start(
    transport: TransportChoice,
    shape: impl FnOnce(&mut EndpointSpec),
) -> (Harness, tokio_util::sync::CancellationToken, SocketAddr) {
    let echo = echo_server().await;
    let mut spec = endpoint("e", echo);
    shape(&mut spec);
    let admin = loopback(free_fixed_port());
    let harness =
        Harness::start_with_admin(vec![spec], Some(AdminSettings::new(admin, None))).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(echo)]));
    harness.wait_approved("e").await;
    (harness, agent, admin)
}

/// How many connections of `endpoint` ended with `outcome`, from `/metrics`.
fn counted(admin: SocketAddr, endpoint: &str, outcome: &str) -> u64 {
    let (_, text) = admin_get(admin, "/metrics");
    let series = format!(
        "privlink_relay_connections_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\"}} "
    );
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// Whether a connection from `source` is served (its bytes echoed).
async fn served_from(source: &str, to: SocketAddr) -> bool {
    !is_refused(connect_from(source, to).await).await
}

async fn a_burst_from_one_source_is_cut_to_its_rate_and_others_are_untouched(
    transport: TransportChoice,
) {
    let (harness, agent, admin) = start(transport, |spec| {
        spec.per_source =
            SourcePolicy { max_connections: None, rate: Some("5/s".parse().expect("rate")) };
    })
    .await;
    let to = harness.addr("e");
    let started = Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..50 {
        burst.spawn(served_from("127.0.0.2", to));
    }
    let burst = burst.join_all().await;
    let elapsed = started.elapsed();
    let served = burst.iter().filter(|s| **s).count();
    // The bucket holds 5, and gains 5 a second while the burst lasts.
    let gained = usize::try_from((elapsed.as_millis() * 5).div_ceil(1000)).expect("small");
    let most = 5 + gained;
    assert!((5..=most).contains(&served), "{served} served of 50 in {elapsed:?} (at most {most})");
    for _ in 0..5 {
        assert!(served_from("127.0.0.3", to).await, "another source is served throughout");
    }
    let refused = u64::try_from(50 - served).expect("count");
    assert_eq!(counted(admin, "e", "rate_limited"), refused, "every refusal counted");
    harness.shutdown(&[agent]).await;
}

async fn one_source_holds_at_most_its_share_of_open_connections(transport: TransportChoice) {
    let (harness, agent, admin) = start(transport, |spec| {
        spec.per_source = SourcePolicy { max_connections: Some(3), rate: None };
    })
    .await;
    let to = harness.addr("e");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut socket = connect_from("127.0.0.2", to).await.expect("connect");
        socket.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        socket.read_exact(&mut back).await.expect("echoed: admitted");
        held.push(socket);
    }
    assert!(!served_from("127.0.0.2", to).await, "a fourth from the same source is refused");
    assert!(served_from("127.0.0.3", to).await, "another source is served");
    assert_eq!(counted(admin, "e", "source_over_limit"), 1);
    // One ends; its slot comes back once the relay has seen it end.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    while !served_from("127.0.0.2", to).await {
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    harness.shutdown(&[agent]).await;
}

async fn max_duration_closes_a_busy_transfer(transport: TransportChoice) {
    let (harness, agent, admin) = start(transport, |spec| {
        spec.max_duration = Some(Duration::from_secs(2));
    })
    .await;
    let mut socket = connect_from("127.0.0.2", harness.addr("e")).await.expect("connect");
    let started = Instant::now();
    // Busy the whole time: a round trip every 10 ms until the relay closes it.
    let mut buf = [0u8; 64];
    let closed_after = loop {
        let echoed = async {
            socket.write_all(b"keep busy").await?;
            socket.read(&mut buf).await
        };
        match tokio::time::timeout(WAIT, echoed).await.expect("an answer or a close") {
            Ok(n) if n > 0 => tokio::time::sleep(Duration::from_millis(10)).await,
            _ => break started.elapsed(),
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never closed");
    };
    assert!(closed_after >= Duration::from_secs(2), "closed after {closed_after:?}, before 2 s");
    harness.wait_status("e", |_| counted(admin, "e", "max_duration") == 1).await;
    harness.shutdown(&[agent]).await;
}

on_both_transports!(
    a_burst_from_one_source_is_cut_to_its_rate_and_others_are_untouched,
    one_source_holds_at_most_its_share_of_open_connections,
    max_duration_closes_a_busy_transfer,
);

/// A shared listener's own per-source limit, judged on accept: a TLS client over it reads the
/// `access_denied` alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_listener_limits_each_source_before_routing() {
    const NAME: &str = "kv.limits.test";
    let echo = echo_server().await;
    let mut spec = endpoint("kv", echo);
    spec.listener = Some("vaults".to_owned());
    spec.server_names = vec![NAME.to_owned()];
    let mut listener = listener("vaults", &[(NAME, "kv")]);
    listener.per_source = SourcePolicy { max_connections: Some(1), rate: None };
    let harness = Harness::start_with(vec![spec], vec![listener], None).await;
    let agent = harness.spawn_agent(harness.agent_config(TransportChoice::Tcp, &[rule_for(echo)]));
    harness.wait_approved("kv").await;
    let to = harness.addr("kv");
    let hello = vault::client_hello_for(NAME);
    // The first is routed and its ClientHello echoed back by the destination.
    let mut first = connect_from("127.0.0.2", to).await.expect("connect");
    first.write_all(&hello).await.expect("write");
    let mut back = vec![0u8; hello.len()];
    first.read_exact(&mut back).await.expect("routed and echoed");
    // A second from the same source is over the listener's limit: the alert, then the close.
    let mut second = connect_from("127.0.0.2", to).await.expect("connect");
    second.write_all(&hello).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, second.read_to_end(&mut answer)).await.expect("closed").ok();
    assert_eq!(answer, ACCESS_DENIED_ALERT, "the access_denied alert");
    // Another source is routed.
    let mut other = connect_from("127.0.0.3", to).await.expect("connect");
    other.write_all(&hello).await.expect("write");
    other.read_exact(&mut back).await.expect("another source is routed");
    drop((first, other));
    harness.shutdown(&[agent]).await;
}
