//! `transport = "auto"`: with UDP to the relay dropped the agent falls back to TLS over TCP and
//! carries traffic; when UDP comes back, new streams move to QUIC while a transfer started on
//! TCP completes intact.

mod common;

use std::time::Duration;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_relay::AgentView;
use privlink_transport::tunnel::TransportKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn on(transport: TransportKind) -> impl Fn(&AgentView) -> bool {
    move |a| a.transport == transport
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_and_moves_new_streams_back_to_quic() {
    let destination = echo_server().await;
    let harness = Harness::start(vec![endpoint("e", destination)]).await;
    let mut gate = TunnelGate::tcp_only(harness.relay.tunnel_addr()).await;
    let mut config = harness.agent_config(TransportChoice::Auto, &[rule_for(destination)]);
    config.relays[0].port = gate.port;
    config.quic_fallback_after = Duration::from_millis(500);
    config.quic_probe_interval = Duration::from_millis(200);
    let started = tokio::time::Instant::now();
    let agent = harness.spawn_agent(config);

    // UDP is dropped: the agent lands on TCP within the fallback deadline (plus the handshake).
    harness.wait_approved("e").await;
    let agents = harness.relay.agents(CONNECTOR);
    assert!(agents.len() == 1 && on(TransportKind::Tcp)(&agents[0]), "{agents:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "fallback took {:?}", started.elapsed());

    // A long transfer starts on TCP.
    let mut long = TcpStream::connect(harness.addr("e")).await.expect("connect");
    let mut sent = Vec::new();
    let mut received = Vec::new();
    let chunk = random_bytes(1 << 20);
    long.write_all(&chunk).await.expect("write");
    let mut echo = vec![0u8; chunk.len()];
    long.read_exact(&mut echo).await.expect("echo");
    sent.extend_from_slice(&chunk);
    received.extend_from_slice(&echo);
    assert_eq!(harness.relay.agents(CONNECTOR)[0].active_streams, 1, "the transfer runs on TCP");

    // UDP comes back: the agent's probe gets a QUIC connection, the TCP one drains.
    gate.open_udp().await;
    let agents = harness
        .relay
        .wait_for_agents(CONNECTOR, WAIT, |agents| {
            agents.iter().any(|a| on(TransportKind::Quic)(a) && !a.draining)
                && agents.iter().all(|a| on(TransportKind::Quic)(a) || a.draining)
        })
        .await;
    assert!(agents.iter().any(|a| a.transport == TransportKind::Quic && !a.draining), "{agents:?}");
    harness.wait_approved("e").await;

    // A new connection goes over QUIC.
    let mut fresh = TcpStream::connect(harness.addr("e")).await.expect("connect");
    fresh.write_all(b"over quic?").await.expect("write");
    let mut buf = [0u8; 10];
    fresh.read_exact(&mut buf).await.expect("echo");
    let agents = harness.relay.agents(CONNECTOR);
    let quic_streams: u32 = agents
        .iter()
        .filter(|a| a.transport == TransportKind::Quic)
        .map(|a| a.active_streams)
        .sum();
    let tcp_streams: u32 =
        agents.iter().filter(|a| a.transport == TransportKind::Tcp).map(|a| a.active_streams).sum();
    assert_eq!(
        (quic_streams, tcp_streams),
        (1, 1),
        "new stream on QUIC, old one still on TCP: {agents:?}"
    );
    drop(fresh);

    // The transfer that started on TCP completes intact.
    let rest = random_bytes(8 << 20);
    sent.extend_from_slice(&rest);
    received.extend(echo_round_trip(long, &rest).await);
    assert_eq!(sha256(&received), sha256(&sent), "the TCP transfer was damaged by the move");

    // With its last stream done, the drained TCP connection goes away.
    let agents = harness
        .relay
        .wait_for_agents(CONNECTOR, WAIT, |agents| agents.iter().all(on(TransportKind::Quic)))
        .await;
    assert!(agents.iter().all(on(TransportKind::Quic)), "{agents:?}");
    harness.shutdown(&[agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_only_agents_do_not_fall_back() {
    let destination = echo_server().await;
    let harness = Harness::start(vec![endpoint("e", destination)]).await;
    let gate = TunnelGate::tcp_only(harness.relay.tunnel_addr()).await;
    let mut config = harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]);
    config.relays[0].port = gate.port;
    let agent = harness.spawn_agent(config);
    // Bounded negative check: with UDP dropped a QUIC-only agent never shows up.
    let status = harness
        .relay
        .wait_for_status("e", Duration::from_secs(2), |s| {
            *s != privlink_relay::EndpointStatus::Disconnected
        })
        .await;
    assert_eq!(status, Some(privlink_relay::EndpointStatus::Disconnected));
    harness.shutdown(&[agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_when_udp_is_blocked_mid_way() {
    let destination = echo_server().await;
    let harness = Harness::start(vec![endpoint("e", destination)]).await;
    let mut gate = TunnelGate::tcp_only(harness.relay.tunnel_addr()).await;
    gate.open_udp().await;
    let mut config = harness.agent_config(TransportChoice::Auto, &[rule_for(destination)]);
    config.relays[0].port = gate.port;
    config.quic_fallback_after = Duration::from_millis(500);
    let agent = harness.spawn_agent(config);
    harness.wait_approved("e").await;
    assert!(harness.relay.agents(CONNECTOR).iter().all(on(TransportKind::Quic)));

    // UDP stops getting through: QUIC's idle timeout notices, and the agent lands on TCP.
    gate.close_udp();
    let agents = harness
        .relay
        .wait_for_agents(CONNECTOR, Duration::from_secs(30), |agents| {
            agents.len() == 1 && on(TransportKind::Tcp)(&agents[0])
        })
        .await;
    assert!(agents.len() == 1 && on(TransportKind::Tcp)(&agents[0]), "{agents:?}");
    harness.wait_approved("e").await;
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    assert_eq!(echo_round_trip(socket, b"after the fallback").await, b"after the fallback");
    harness.shutdown(&[agent]).await;
}
