//! The PROXY protocol on both sides, against HAProxy (the Debian package). In: HAProxy in front
//! of an endpoint with `send-proxy` (v1) and `send-proxy-v2`; the endpoint trusts it, so the
//! client HAProxy names is the one its ACL judges and its connection list shows; a source it
//! does not trust that begins with a PROXY header is refused (`proxy_header_invalid`); a
//! `LOCAL` header (a balancer's own check) is closed. Out: an endpoint with
//! `send_proxy_protocol` makes the destination — HAProxy with `accept-proxy`, logging each
//! connection — see the original client's address.

#[macro_use]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::config::AdminSettings;
use privlink_protocol::proxy_header::{ProxyVersion, V2_SIGNATURE, encode};
use privlink_relay::config::ProxyTrust;
use privlink_testbed::haproxy::{Check, Frontend, Haproxy, Server};
use privlink_testbed::process::free_fixed_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Every flow-log line the relays of this test binary wrote (installed before any harness,
/// whose own subscriber then stands aside).
static FLOW_LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct FlowLogWriter;

impl std::io::Write for FlowLogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        FLOW_LOG.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capture; every test of this binary calls it first, so it is in place before
/// any harness starts, whichever test runs first.
fn capture_flow_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("privlink::flow=info")
        .with_ansi(false)
        .with_writer(|| FlowLogWriter)
        .try_init();
}

fn flow_log() -> String {
    String::from_utf8_lossy(&FLOW_LOG.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
        .into_owned()
}

/// A client connection from `source` (a loopback address of its own) to `to`.
async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(to).await
}

/// Whether an echo through `stream` comes back (a refused connection is closed or reset).
async fn echoes(stream: &mut TcpStream) -> bool {
    if stream.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(
        tokio::time::timeout(WAIT, stream.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == b"ping"
    )
}

fn loopback_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// The value of `series` in a scrape (0 when absent).
fn count(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

fn scrape(admin: SocketAddr) -> String {
    let (code, body) = admin_get(admin, "/metrics");
    assert_eq!(code, 200);
    body
}

async fn a_balancers_proxy_header_names_the_client_the_acl_judges(transport: TransportChoice) {
    capture_flow_log();
    let destination = echo_server().await;
    let trust = ProxyTrust { trusted: vec!["127.0.0.1/32".parse().expect("net")] };
    // `e`: only 127.0.0.2 may use it, and only through the balancer (its ACL sees the client the
    // header names). `f`: anyone, directly or through the balancer.
    let mut e = endpoint("e", destination);
    e.proxy_protocol = Some(trust.clone());
    e.acl.allow = vec!["127.0.0.2/32".parse().expect("net")];
    let mut f = endpoint("f", destination);
    f.proxy_protocol = Some(trust);
    let admin = loopback(free_fixed_port());
    let harness =
        Harness::start_with_admin(vec![e, f], Some(AdminSettings::new(admin, None))).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(destination)]));
    harness.wait_approved("e").await;
    harness.wait_approved("f").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let (v1, v2) = (loopback(free_fixed_port()), loopback(free_fixed_port()));
    let relay_e = Server { addr: harness.addr("e"), admin };
    let in_front = |name: &str, bind, option: &str| {
        let mut frontend = Frontend::new(name, bind, vec![relay_e], Check::None);
        frontend.server_options = option.to_owned();
        frontend
    };
    let frontends = [in_front("v1", v1, "send-proxy"), in_front("v2", v2, "send-proxy-v2")];
    let _haproxy = tokio::task::block_in_place(|| Haproxy::start(dir.path(), &frontends));

    for balancer in [v1, v2] {
        let mut allowed = connect_from(loopback_ip(2), balancer).await.expect("connect");
        assert!(echoes(&mut allowed).await, "127.0.0.2 through {balancer} is allowed");
        // The relay lists the client the header named, not the balancer.
        let listed = tokio::task::block_in_place(|| admin_get(admin, "/api/v1/connections").1);
        let local = allowed.local_addr().expect("local").to_string();
        assert!(listed.contains(&local), "{local} listed in {listed}");
        drop(allowed);
        // Its flow-log line names it, and the balancer beside it.
        let deadline = tokio::time::Instant::now() + WAIT;
        while !flow_log().contains(&format!("client={local} via=127.0.0.1:")) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no flow line for {local}:\n{}",
                flow_log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut denied = connect_from(loopback_ip(3), balancer).await.expect("connect");
        assert!(!echoes(&mut denied).await, "127.0.0.3 through {balancer} is denied by the ACL");
    }
    // Each denied client counted (HAProxy may try a refused connection more than once).
    let body = tokio::task::block_in_place(|| scrape(admin));
    let denied =
        count(&body, "privlink_relay_connections_total{endpoint=\"e\",outcome=\"acl_denied\"}");
    assert!(denied >= 2, "{denied} denials counted:\n{body}");

    // Not trusted: direct to `f` from 127.0.0.4 is served, unless it forges a header.
    let mut direct = connect_from(loopback_ip(4), harness.addr("f")).await.expect("connect");
    assert!(echoes(&mut direct).await, "a direct client without a header is served");
    let forged =
        encode(ProxyVersion::V1, "198.51.100.7:1000".parse().expect("addr"), harness.addr("f"));
    for header in [
        forged,
        encode(ProxyVersion::V2, "198.51.100.7:1000".parse().expect("a"), harness.addr("f")),
    ] {
        let mut forger = connect_from(loopback_ip(4), harness.addr("f")).await.expect("connect");
        forger.write_all(&header).await.expect("write");
        assert!(!echoes(&mut forger).await, "a forged header is refused");
    }
    let body = tokio::task::block_in_place(|| scrape(admin));
    let refused =
        "privlink_relay_connections_total{endpoint=\"f\",outcome=\"proxy_header_invalid\"} 2";
    assert!(body.contains(refused), "{refused} in:\n{body}");

    // A LOCAL header from the trusted balancer's address: closed after the header.
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut check = connect_from(loopback_ip(1), harness.addr("f")).await.expect("connect");
    check.write_all(&local).await.expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, check.read_to_end(&mut rest)).await.expect("closed");
    assert!(closed.is_ok_and(|n| n == 0) || rest.is_empty(), "nothing but the close: {rest:?}");
    harness.shutdown(&[agent]).await;
}

/// `send_proxy_protocol`: HAProxy with `accept-proxy` in front of the destination logs the
/// address of the client that connected to the relay.
async fn the_destination_is_told_the_original_client(transport: TransportChoice) {
    capture_flow_log();
    let backend = echo_server().await;
    for version in ["v1", "v2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let receiver = loopback(free_fixed_port());
        let mut frontend = Frontend::new(
            "receiver",
            receiver,
            vec![Server { addr: backend, admin: backend }],
            Check::None,
        );
        frontend.bind_options = "accept-proxy".to_owned();
        frontend.log = true;
        let mut haproxy = tokio::task::block_in_place(|| Haproxy::start(dir.path(), &[frontend]));
        let mut g = endpoint("g", receiver);
        g.send_proxy_protocol =
            Some(if version == "v1" { ProxyVersion::V1 } else { ProxyVersion::V2 });
        let harness = Harness::start(vec![g]).await;
        let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(receiver)]));
        harness.wait_approved("g").await;
        let mut client = connect_from(loopback_ip(5), harness.addr("g")).await.expect("connect");
        assert!(echoes(&mut client).await, "{version}: served through the receiver");
        let local = client.local_addr().expect("local");
        drop(client);
        // HAProxy logs each connection as it ends, from the address the header gave it.
        tokio::task::block_in_place(|| haproxy.wait_for_log(&local.to_string()));
        harness.shutdown(&[agent]).await;
    }
}

/// A shared listener behind HAProxy (`send-proxy-v2`): the listener's ACL judges the client the
/// header names, and the ClientHello after the header is routed by its name.
async fn a_shared_listener_reads_the_header_then_routes_by_name(transport: TransportChoice) {
    capture_flow_log();
    const VAULT: &str = "contoso-kv.vault.test";
    let ca = privlink_transport::pki::CertificateAuthority::new("Test Vault CA").expect("CA");
    let vault = vault::https_vault(&ca, VAULT).await;
    let mut spec = endpoint("kv", vault);
    spec.listener = Some("vaults".to_owned());
    spec.server_names = vec![VAULT.to_owned()];
    let mut listener = listener("vaults", &[(VAULT, "kv")]);
    listener.acl = privlink_protocol::acl::Acl {
        allow: vec!["127.0.0.2/32".parse().expect("net")],
        deny: vec![],
    };
    listener.proxy_protocol =
        Some(ProxyTrust { trusted: vec!["127.0.0.1/32".parse().expect("net")] });
    let harness = Harness::start_with(vec![spec], vec![listener], None).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(vault)]));
    harness.wait_approved("kv").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let balancer = loopback(free_fixed_port());
    let shared = Server { addr: harness.addr("kv"), admin: harness.addr("kv") };
    let mut frontend = Frontend::new("shared", balancer, vec![shared], Check::None);
    frontend.server_options = "send-proxy-v2".to_owned();
    let _haproxy = tokio::task::block_in_place(|| Haproxy::start(dir.path(), &[frontend]));
    for (source, routed) in [(2, true), (3, false)] {
        let mut client = connect_from(loopback_ip(source), balancer).await.expect("connect");
        client.write_all(&vault::client_hello_for(VAULT)).await.expect("ClientHello");
        let mut first = [0u8; 1];
        let answer = tokio::time::timeout(WAIT, client.read(&mut first)).await.expect("in time");
        let handshake = matches!(answer, Ok(1)) && first[0] == 0x16;
        assert_eq!(handshake, routed, "127.0.0.{source}: {answer:?} {first:?}");
    }
    harness.shutdown(&[agent]).await;
}

on_both_transports!(
    a_balancers_proxy_header_names_the_client_the_acl_judges,
    the_destination_is_told_the_original_client,
    a_shared_listener_reads_the_header_then_routes_by_name,
);
