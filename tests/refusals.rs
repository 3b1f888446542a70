//! What a refused client reads, and what the relay records. A client turned away before any
//! byte reached a destination used to see a bare TCP reset; one that speaks TLS now gets a
//! fatal TLS alert that curl, `openssl s_client` and the SDKs print — `access_denied` for the
//! ACL and the limits, `internal_error` when nothing on the far side can take the connection
//! (no agent, an endpoint its agents reject, a destination that fails) — while a client that
//! does not speak TLS is still reset. And an endpoint every agent rejects is recorded as
//! `rejected: <the agent's reason>`, not as "no agent", in the flow log and the metrics.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::acl::Acl;
use privlink_protocol::config::AdminSettings;
use privlink_relay::registry::EndpointStatus;
use privlink_testbed::process::free_fixed_port;
use tokio::net::TcpStream;

/// curl to `https://localhost:PORT/` through the relay: its exit code and stderr.
fn curl(port: u16) -> (i32, String) {
    let out = tokio::task::block_in_place(|| {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--insecure"])
            .arg(format!("https://localhost:{port}/"))
            .output()
            .expect("curl (Debian package curl)")
    });
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `openssl s_client` to the relay's port: everything it printed.
fn openssl(port: u16) -> String {
    let out = tokio::task::block_in_place(|| {
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "localhost",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl (Debian package openssl)")
    });
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The relay's `/metrics` text.
fn metrics(admin: SocketAddr) -> String {
    let (status, body) = admin_get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

async fn a_denied_tls_client_reads_access_denied_and_a_plain_one_is_reset(
    transport: TransportChoice,
) {
    let echo = echo_server().await;
    let mut spec = endpoint("e", echo);
    spec.acl = Acl { allow: Vec::new(), deny: vec!["127.0.0.0/8".parse().expect("net")] };
    let harness = Harness::start(vec![spec]).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(echo)]));
    harness.wait_approved("e").await;
    let port = harness.addr("e").port();

    let (code, stderr) = curl(port);
    assert_eq!(code, 35, "a TLS failure: {stderr}");
    assert!(stderr.contains("alert access denied"), "curl names the alert: {stderr}");
    let said = openssl(port);
    assert!(said.contains("alert access denied"), "openssl names the alert: {said}");
    // A client that does not speak TLS is reset, as before.
    assert!(is_refused(TcpStream::connect(harness.addr("e")).await).await);
    harness.shutdown(&[agent]).await;
}

async fn no_agent_and_a_failed_destination_read_internal_error(transport: TransportChoice) {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let harness = Harness::start(vec![endpoint("e", closed)]).await;
    let port = harness.addr("e").port();
    // No agent yet.
    let (code, stderr) = curl(port);
    assert!(code == 35 && stderr.contains("alert internal error"), "no agent: {code} {stderr}");
    // An agent whose destination refuses.
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(closed)]));
    harness.wait_approved("e").await;
    let (code, stderr) = curl(port);
    assert!(code == 35 && stderr.contains("alert internal error"), "refused: {code} {stderr}");
    harness.shutdown(&[agent]).await;
}

async fn a_rejected_endpoint_is_recorded_as_rejected_with_the_agents_reason(
    transport: TransportChoice,
) {
    let admin = loopback(free_fixed_port());
    let echo = echo_server().await;
    let harness =
        Harness::start_with_admin(vec![endpoint("e", echo)], Some(AdminSettings::new(admin, None)))
            .await;
    // The agent allows something else: it rejects the endpoint.
    let agent = harness.spawn_agent(harness.agent_config(transport, &["127.0.0.1:1".to_owned()]));
    let status = harness.wait_status("e", |s| matches!(s, EndpointStatus::Rejected { .. })).await;
    let (code, stderr) = curl(harness.addr("e").port());
    assert!(code == 35 && stderr.contains("alert internal error"), "{status:?}: {stderr}");
    let text = metrics(admin);
    assert!(
        text.contains("privlink_relay_connections_total{endpoint=\"e\",outcome=\"rejected\"} 1"),
        "{text}"
    );
    assert!(!text.contains("outcome=\"no_agent\""), "{text}");
    harness.shutdown(&[agent]).await;
}

on_both_transports!(
    a_denied_tls_client_reads_access_denied_and_a_plain_one_is_reset,
    no_agent_and_a_failed_destination_read_internal_error,
    a_rejected_endpoint_is_recorded_as_rejected_with_the_agents_reason,
);

/// The flow-log line of a rejected endpoint's client, from the real binary.
#[test]
fn the_flow_log_names_the_rejection_and_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay_admin, agent_admin) = (loopback(free_fixed_port()), loopback(free_fixed_port()));
    let endpoint_port = free_fixed_port();
    let configs = write_tunnel_files(
        dir.path(),
        &TunnelFiles {
            tunnel_listen: &format!("127.0.0.1:{}", free_fixed_port()),
            endpoint: "kv",
            endpoint_listen: &format!("127.0.0.1:{endpoint_port}"),
            destination: "127.0.0.1:9",
            endpoint_extra: "\n[audit]\npath = \"audit.jsonl\"",
            agent_extra: "transport = \"tcp\"",
            allow: "127.0.0.1:1",
            admin: (relay_admin, agent_admin),
        },
    );
    let mut relay = privlink(&["relay", "--config", &configs.relay]);
    let relay_probe = AdminProbe::new(None, relay_admin);
    relay_probe.wait_ready();
    let agent = privlink(&["agent", "--config", &configs.agent]);
    relay_probe.wait_relay_status(|s| s.endpoints.iter().any(|e| e.status == "Rejected"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--insecure"])
        .arg(format!("https://localhost:{endpoint_port}/"))
        .output()
        .expect("curl");
    assert_eq!(out.status.code(), Some(35), "{}", String::from_utf8_lossy(&out.stderr));
    relay.wait_for("outcome=rejected: every connected agent rejects this endpoint");
    let line = relay.last_seen().to_owned();
    assert!(line.contains("is not in the agent's allowlist"), "the agent's reason: {line}");
    agent.terminate();
    relay.terminate();
    // The audit record names the real cause too.
    let trail = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("trail");
    let closed = trail
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a record"))
        .find(|r| r["event"] == "connection.closed")
        .unwrap_or_else(|| panic!("no connection.closed in {trail}"));
    assert_eq!(closed["outcome"], "rejected", "{closed}");
    let reason = closed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("rejected: ") && reason.contains("is not in the agent's allowlist"),
        "{closed}"
    );
}
