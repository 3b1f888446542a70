//! A connector with 10,000 endpoints, with real processes: the relay binds them all, the
//! agent receives them in pieces (no single frame may hold the list), answers 10,000 verdicts
//! in pieces, and the relay lists every endpoint approved; the last one serves. The time from
//! the relay's start to all approved is printed (no timing is asserted).

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::*;
use privlink_testbed::process::{free_fixed_port, write_tunnel_files};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENDPOINTS: usize = 10_000;

/// Endpoint `i`'s listen address: a loopback address of its own (all of 127.0.0.0/8 is
/// loopback), one port for all.
fn listen_of(i: usize, port: u16) -> SocketAddr {
    let [hi, lo] = u16::try_from(i).expect("fits").to_be_bytes();
    SocketAddr::from(([127, 1, hi, lo], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_with_10000_endpoints_is_welcomed_approved_and_served() {
    let destination = echo_server().await.to_string();
    let port = free_fixed_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let extra: String = (1..ENDPOINTS)
        .map(|i| {
            format!(
                "\n[[endpoint]]\nname = \"e{i}\"\nconnector = \"tunnel\"\n\
                 destination = \"{destination}\"\nlisten = \"{}\"\n",
                listen_of(i, port)
            )
        })
        .collect();
    let configs = write_tunnel_files(
        common::BIN,
        dir.path(),
        &TunnelFiles {
            tunnel_listen: &loopback(free_fixed_port()).to_string(),
            endpoint: "e0",
            endpoint_listen: &listen_of(0, port).to_string(),
            destination: &destination,
            endpoint_extra: &extra,
            agent_extra: "transport = \"quic\"",
            allow: &destination,
            admin: (loopback(free_fixed_port()), loopback(free_fixed_port())),
        },
    );

    let started = Instant::now();
    let relay = common::privlink(&["relay", "--config", &configs.relay]);
    let relay_admin = AdminProbe::new(None, configs.relay_admin);
    tokio::task::block_in_place(|| relay_admin.wait_ready());
    let listening = started.elapsed();
    let agent = common::privlink(&["agent", "--config", &configs.agent]);
    let agent_admin = AdminProbe::new(None, configs.agent_admin);
    let status = tokio::task::block_in_place(|| {
        agent_admin.wait_ready();
        relay_admin.wait_relay_status(|status| {
            status.endpoints.len() == ENDPOINTS
                && status.endpoints.iter().all(|e| e.status == "Approved")
        })
    });
    let approved = started.elapsed();
    let agents = &status.agents;
    assert_eq!(agents.len(), 1);
    let verdicts = &agents[0].verdicts;
    assert_eq!(verdicts.len(), ENDPOINTS, "a verdict for every endpoint reached the relay");

    let last = listen_of(ENDPOINTS - 1, port);
    let mut socket = tokio::net::TcpStream::connect(last).await.expect("connect");
    socket.write_all(b"the last endpoint").await.expect("write");
    let mut echoed = [0u8; 17];
    socket.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"the last endpoint");

    // `privlink check` gets the whole list too (in pieces), and checks the one destination.
    let checked = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::BIN)
            .args(["check", "--config", &configs.agent, "--json", "--no-tls"])
            .output()
            .expect("run check")
    })
    .await
    .expect("join");
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout).expect("JSON report");
    assert_eq!(checked.status.code(), Some(0), "{report:#}");
    let steps = report["steps"].as_array().expect("steps");
    let quic = steps.iter().find(|s| s["check"] == "relay-quic").expect("relay-quic step");
    assert_eq!(quic["endpoints"].as_array().map(Vec::len), Some(ENDPOINTS), "{}", quic["detail"]);
    assert!(
        quic["detail"].as_str().is_some_and(|d| d.contains("(9995 more)")),
        "{}",
        quic["detail"]
    );
    let capped = steps.iter().find(|s| s["check"] == "endpoints").expect("the cap is said");
    assert_eq!(capped["outcome"], "warn");
    let tcp: Vec<_> = steps.iter().filter(|s| s["check"] == "destination-tcp").collect();
    assert_eq!(tcp.len(), 1, "one destination, checked once");
    assert_eq!(tcp[0]["outcome"], "pass", "{:#}", tcp[0]);
    eprintln!(
        "{ENDPOINTS} endpoints: relay ready (all listening) {listening:?} after start, all \
         approved {approved:?} after start"
    );
    drop((agent, relay));
}
