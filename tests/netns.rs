//! Network-namespace tests: separate networks joined by veth pairs or by the test bed's TUN
//! link emulator, real processes, real clients. The relay runs in `cloud`, the agent and its
//! destination in `vnet`, clients in `client` (which can reach only the relay). Covered: the
//! private-link Key Vault case with curl, openssl s_client and Python's ssl (isolation proven
//! first); UDP dropped by nftables → TLS over TCP, and back to QUIC; and the faults — a cut
//! link, the agent killed during 50 live transfers, the relay killed and restarted, SIGTERM to
//! the relay during transfers, and 128 MiB over a 50 ms / 2 % loss WAN, each on both
//! transports (QUIC and TLS over TCP); an absolute destination name resolved without the
//! search domains of the agent's resolver; and a destination only one of two agents (in two
//! private networks) can reach, every client served by the other. Each prints the recovery times it measured; none
//! asserts on timing beyond "within the bound".
//!
//! Needs root, `/dev/net/tun`, iproute2, nftables, curl, openssl and python3 (`.ci/run`
//! installs the packages). Where namespaces cannot be made, each test says so loudly and skips.

mod common;

use std::path::Path;
use std::process::Command;

use common::{AdminProbe, Placement, Running, Tunnel, TunnelConfigs};
use privlink_admin::snapshot::{AgentStatus, RelayStatus};
use privlink_testbed::netns::{allow_outbound_udp, drop_outbound_udp, must, sh, skip_notice};
use privlink_testbed::{Link, Topology};

/// Addresses inside the namespaces this test creates (nothing outside them is ever contacted).
const CLOUD_ADDR: &str = "10.231.0.1";
const VNET_ADDR: &str = "10.231.0.2";

const ECHO_SERVER: &str = include_str!("scripts/echo_server.py");

const ECHO_CLIENT: &str = include_str!("scripts/echo_client.py");

/// Makes a topology or prints the loud skip notice.
fn topology_or_skip(tag: &str, names: &[&str], links: &[Link]) -> Option<Topology> {
    for client in ["curl", "openssl", "python3"] {
        if !sh("sh", &["-c", &format!("command -v {client}")]).0 {
            skip_notice(&format!("`{client}` is not installed"));
            return None;
        }
    }
    Topology::create(tag, names, links).map_err(|reason| skip_notice(&reason)).ok()
}

/// The admin listeners of relay and agent: each on its own namespace's loopback.
const ADMIN: (std::net::SocketAddr, std::net::SocketAddr) = (
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090),
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9091),
);

/// Writes certificates, a relay config (tunnel on the cloud address, endpoint `vault` on
/// cloud's loopback port 8443 to the vnet's port 9000) and an agent config with `transport`.
fn write_configs(dir: &Path, transport: &str) -> TunnelConfigs {
    let agent_extra = format!(
        "transport = \"{transport}\"\nquic_fallback_after = \"1s\"\nquic_probe_interval = \"500ms\""
    );
    let destination = format!("{VNET_ADDR}:9000");
    common::write_tunnel_files(
        dir,
        &common::TunnelFiles {
            tunnel_listen: &format!("{CLOUD_ADDR}:7443"),
            endpoint: "vault",
            endpoint_listen: "127.0.0.1:8443",
            destination: &destination,
            endpoint_extra: "",
            agent_extra: &agent_extra,
            allow: &destination,
            admin: ADMIN,
        },
    )
}

/// The starting point of the fault tests: an echo server and the agent in vnet, the relay in
/// cloud (endpoint on cloud's 127.0.0.1:8443), connected, the endpoint approved.
struct EchoTunnel {
    tunnel: Tunnel,
    _echo: Running,
    _dir: tempfile::TempDir,
}

impl EchoTunnel {
    fn start(topology: &Topology, transport: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let configs = write_configs(dir.path(), transport);
        let (cloud, vnet) = (topology.ns(0), topology.ns(1));
        let mut echo =
            Running::spawn(topology.exec(vnet, "python3", &["-c", ECHO_SERVER, VNET_ADDR, "9000"]));
        echo.wait_for("echo ready");
        let placement = Placement::Namespaces { relay: cloud, agent: vnet };
        let tunnel = Tunnel::start(common::BIN, &configs, placement);
        Self { tunnel, _echo: echo, _dir: dir }
    }

    /// SIGTERM to both; each must exit cleanly.
    fn stop(self) {
        let (agent, relay) = self.tunnel.stop();
        assert!(agent.success(), "agent exit: {agent}");
        assert!(relay.success(), "relay exit: {relay}");
    }
}

impl std::ops::Deref for EchoTunnel {
    type Target = Tunnel;
    fn deref(&self) -> &Tunnel {
        &self.tunnel
    }
}

impl std::ops::DerefMut for EchoTunnel {
    fn deref_mut(&mut self) -> &mut Tunnel {
        &mut self.tunnel
    }
}

/// Sends 256 KiB through the endpoint from cloud and checks the echo.
fn echo_through_the_tunnel(topology: &Topology, label: &str) {
    let status = topology
        .exec(topology.ns(0), "python3", &["-c", ECHO_CLIENT, "8443"])
        .status()
        .expect("run client");
    assert!(status.success(), "client through the tunnel ({label}) failed");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn across_namespaces_auto_falls_back_to_tcp_when_udp_is_dropped_and_returns_to_quic() {
    let links = [Link::veth(0, 1, CLOUD_ADDR, VNET_ADDR)];
    let Some(topology) = topology_or_skip("fb", &["cloud", "vnet"], &links) else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = write_configs(dir.path(), "auto");
    let (cloud, vnet) = (topology.ns(0), topology.ns(1));

    // The private network drops every outbound UDP datagram.
    drop_outbound_udp(vnet);

    let mut echo =
        Running::spawn(topology.exec(vnet, "python3", &["-c", ECHO_SERVER, VNET_ADDR, "9000"]));
    echo.wait_for("echo ready");
    let relay =
        Running::spawn(topology.exec(cloud, common::BIN, &["relay", "--config", &configs.relay]));
    let relay_admin = AdminProbe::new(Some(cloud), configs.relay_admin);
    relay_admin.wait_ready();
    let agent =
        Running::spawn(topology.exec(vnet, common::BIN, &["agent", "--config", &configs.agent]));
    let agent_admin = AdminProbe::new(Some(vnet), configs.agent_admin);
    // The agent's one link is up over TCP, after a fallback it counted, and the relay has its
    // approval over TCP.
    let link_on = |transport: &'static str| {
        // The agent answers before its first link exists: no link is not yet.
        move |status: &AgentStatus| {
            status.links.first().is_some_and(|link| {
                link.state == "connected" && link.transport.as_deref() == Some(transport)
            })
        }
    };
    let agent_status = agent_admin.wait_agent_status(link_on("tcp"));
    let metrics = agent_admin.get("/metrics").1;
    assert!(metrics.contains("privlink_agent_transport_fallbacks_total 1"), "{metrics}");
    let agent_id = agent_status.id;
    let only_agent_on = |transport: &'static str| {
        let agent_id = agent_id.clone();
        move |status: &RelayStatus| {
            privlink_testbed::process::approved_by(status, &agent_id, "vault")
                && status.agents.len() == 1
                && status.agents[0].transport == transport
        }
    };
    relay_admin.wait_relay_status(only_agent_on("tcp"));

    let client = |label: &str| {
        let status = topology
            .exec(cloud, "python3", &["-c", ECHO_CLIENT, "8443"])
            .status()
            .expect("run client");
        assert!(status.success(), "client through the tunnel ({label}) failed");
    };
    client("over TCP, UDP dropped");

    // UDP is allowed again: the agent's probe gets through and new streams move to QUIC.
    allow_outbound_udp(vnet);
    agent_admin.wait_agent_status(link_on("quic"));
    // The idle TCP link closes once the agent is on QUIC: from then on the relay lists only
    // the QUIC connection, the only way to the agent.
    relay_admin.wait_relay_status(only_agent_on("quic"));
    client("over QUIC again");

    assert!(agent.terminate().success());
    assert!(relay.terminate().success());
    drop(echo);
}

/// The vault's names: the public one on its certificate and in the client's SNI, and the
/// private-link name that only the private network can resolve.
const VAULT_NAME: &str = "contoso-kv.vault.azure.net";
const VAULT_PRIVATE_NAME: &str = "contoso-kv.privatelink.vaultcore.azure.net";
/// Addresses: client ⇄ cloud on one link, cloud ⇄ vnet on another; no routing across cloud.
const KV_CLIENT_ADDR: &str = "10.231.1.2";
const KV_CLOUD_FRONT: &str = "10.231.1.1";
const KV_CLOUD_BACK: &str = "10.231.2.1";
const KV_VNET_ADDR: &str = "10.231.2.2";
/// A Key Vault "get secret" answer, returned byte for byte.
const SECRET_JSON: &str = r#"{"value":"s3cr3t-from-the-vnet","id":"https://contoso-kv.vault.azure.net/secrets/db-password/6b2c","attributes":{"enabled":true,"created":1763800000,"updated":1763800000,"recoveryLevel":"Recoverable+Purgeable"}}"#;

/// An HTTPS server shaped like Key Vault's REST API: GET /secrets/NAME?api-version=7.4.
const VAULT_SERVER: &str = include_str!("scripts/vault_server.py");

/// A client using only Python's standard library `ssl`: verifies the vault's certificate for
/// its public name against the given CA, prints the response body.
const PYTHON_CLIENT: &str = include_str!("scripts/python_client.py");

const CONNECT_PROBE: &str = include_str!("scripts/connect_probe.py");

const RESOLVE_PROBE: &str = include_str!("scripts/resolve_probe.py");

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn key_vault_behind_private_link_is_reached_from_another_network_by_real_clients() {
    // client ⇄ cloud ⇄ vnet; cloud does not route, so client and vnet cannot reach each other.
    let links = [
        Link::veth(0, 1, KV_CLIENT_ADDR, KV_CLOUD_FRONT),
        Link::veth(1, 2, KV_CLOUD_BACK, KV_VNET_ADDR),
    ];
    let Some(mut topology) = topology_or_skip("kv", &["client", "cloud", "vnet"], &links) else {
        return;
    };
    // The private-link name resolves only inside the private network.
    topology.set_hosts(2, &format!("{KV_VNET_ADDR} {VAULT_PRIVATE_NAME}"));
    let (client, cloud, vnet) =
        (topology.ns(0).to_owned(), topology.ns(1).to_owned(), topology.ns(2).to_owned());

    // Isolation first: from the client network the vault can be neither reached nor resolved.
    let (ok, out, err) =
        topology.run(&client, "python3", &["-c", CONNECT_PROBE, KV_VNET_ADDR, "443"]);
    assert!(ok, "the client network reaches the vnet directly: {out}{err}");
    let (ok, out, err) =
        topology.run(&client, "python3", &["-c", RESOLVE_PROBE, VAULT_PRIVATE_NAME]);
    assert!(ok, "the client network resolves the private name: {out}{err}");

    // Certificates: the vault's from its own CA; the relay's from another.
    let dir = tempfile::tempdir().expect("tempdir");
    let vault_dir = dir.path().join("vault");
    let vault_dir_s = vault_dir.to_str().expect("utf-8");
    let (ok, stderr) = sh(
        common::BIN,
        &[
            "certs",
            "init",
            "--dir",
            vault_dir_s,
            "--name",
            VAULT_NAME,
            "--name",
            VAULT_PRIVATE_NAME,
        ],
    );
    assert!(ok, "certs init: {stderr}");
    let vault_ca = vault_dir.join("ca.crt");
    let vault_ca = vault_ca.to_str().expect("utf-8");
    let configs = common::write_tunnel_files(
        dir.path(),
        &common::TunnelFiles {
            tunnel_listen: &format!("{KV_CLOUD_BACK}:7443"),
            endpoint: "contoso-kv",
            endpoint_listen: &format!("{KV_CLOUD_FRONT}:8443"),
            destination: &format!("{VAULT_PRIVATE_NAME}:443"),
            endpoint_extra: &format!("[endpoint.acl]\nallow = [\"{KV_CLIENT_ADDR}/32\"]"),
            agent_extra: "",
            allow: "*.privatelink.vaultcore.azure.net:443",
            admin: ADMIN,
        },
    );

    let (vault_cert, vault_key) = (vault_dir.join("relay.crt"), vault_dir.join("relay.key"));
    let mut vault = Running::spawn(topology.exec(
        &vnet,
        "python3",
        &[
            "-c",
            VAULT_SERVER,
            KV_VNET_ADDR,
            vault_cert.to_str().expect("utf-8"),
            vault_key.to_str().expect("utf-8"),
            SECRET_JSON,
        ],
    ));
    vault.wait_for("vault ready");
    let placement = Placement::Namespaces { relay: &cloud, agent: &vnet };
    let mut tunnel = Tunnel::start(common::BIN, &configs, placement);

    // curl, verifying the vault's certificate for its public name through the endpoint.
    let url = format!("https://{VAULT_NAME}:8443/secrets/db-password?api-version=7.4");
    let resolve = format!("{VAULT_NAME}:8443:{KV_CLOUD_FRONT}");
    let (ok, body, err) = topology.run(
        &client,
        "curl",
        &[
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "15",
            "--cacert",
            vault_ca,
            "--resolve",
            &resolve,
            &url,
        ],
    );
    assert!(ok, "curl failed: {err}");
    assert_eq!(body, SECRET_JSON, "curl got a different body");

    // openssl s_client: certificate verification and hostname check must pass.
    let connect = format!("{KV_CLOUD_FRONT}:8443");
    let request = format!(
        "GET /secrets/db-password?api-version=7.4 HTTP/1.1\r\nHost: {VAULT_NAME}\r\nConnection: close\r\n\r\n"
    );
    let mut s_client = topology.exec(
        &client,
        "openssl",
        &[
            "s_client",
            "-connect",
            &connect,
            "-servername",
            VAULT_NAME,
            "-CAfile",
            vault_ca,
            "-verify_return_error",
            "-verify_hostname",
            VAULT_NAME,
            "-quiet",
        ],
    );
    let out = run_with_stdin(&mut s_client, &request);
    assert!(out.contains(SECRET_JSON), "openssl s_client did not get the secret: {out}");

    // Python's ssl module.
    let (ok, body, err) = topology.run(
        &client,
        "python3",
        &["-c", PYTHON_CLIENT, KV_CLOUD_FRONT, "8443", VAULT_NAME, vault_ca],
    );
    assert!(ok, "python client failed: {err}");
    assert_eq!(body, SECRET_JSON);

    // The relay saw three connections from the client network, each completed (flow log).
    for _ in 0..3 {
        tunnel.relay.wait_for(&format!("client={KV_CLIENT_ADDR}"));
        let line = tunnel.relay.last_seen();
        assert!(line.contains("outcome=completed"), "{line}");
    }

    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "exits: agent {agent}, relay {relay}");
    drop(vault);
}

/// Runs a command with `input` on stdin and returns its stdout (bounded by the command's own
/// timeouts and the test's).
fn run_with_stdin(command: &mut Command, input: &str) -> String {
    use std::io::Write as _;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn a_cut_link_longer_than_the_keepalive_is_noticed_and_recovered_from(transport: &str, tag: &str) {
    let links = [Link::veth(0, 1, CLOUD_ADDR, VNET_ADDR)];
    let Some(topology) = topology_or_skip(tag, &["cloud", "vnet"], &links) else { return };
    let tunnel = EchoTunnel::start(&topology, transport);
    echo_through_the_tunnel(&topology, "before the cut");

    // Cut the cloud–vnet link for longer than the keep-alive/idle timeout.
    let cut = std::time::Instant::now();
    topology.set_link_up(0, false);
    tunnel
        .agent_admin
        .wait_agent_status(|s| s.links.first().is_some_and(|l| l.state != "connected"));
    let noticed = cut.elapsed();
    tunnel.relay_admin.wait_relay_status(|s| s.agents.is_empty());
    topology.set_link_up(0, true);
    let restored = std::time::Instant::now();
    tunnel.wait_served();
    let recovered = restored.elapsed();
    echo_through_the_tunnel(&topology, "after the link came back");
    eprintln!(
        "link cut ({transport}): agent noticed after {noticed:?}; reconnected {recovered:?} after the link came back"
    );

    tunnel.stop();
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn a_cut_link_longer_than_the_keepalive_is_noticed_and_recovered_from_over_quic() {
    a_cut_link_longer_than_the_keepalive_is_noticed_and_recovered_from("quic", "lcq");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn a_cut_link_longer_than_the_keepalive_is_noticed_and_recovered_from_over_tcp() {
    a_cut_link_longer_than_the_keepalive_is_noticed_and_recovered_from("tcp", "lct");
}

/// 50 connections through the endpoint, each sending 1 KiB every 100 ms and reading its echo.
/// Prints `live` once all 50 have echoed, then, as each connection ends (EOF or error), the
/// wall-clock time it ended; exits 0 when all have ended, 1 if any is still open after 30 s.
const LIVE_TRANSFERS: &str = include_str!("scripts/live_transfers.py");

fn killing_the_agent_during_50_live_transfers_closes_them_and_a_restart_serves_again(
    transport: &str,
    tag: &str,
) {
    let links = [Link::veth(0, 1, CLOUD_ADDR, VNET_ADDR)];
    let Some(topology) = topology_or_skip(tag, &["cloud", "vnet"], &links) else { return };
    let mut tunnel = EchoTunnel::start(&topology, transport);
    let cloud = topology.ns(0);

    let mut transfers =
        Running::spawn(topology.exec(cloud, "python3", &["-c", LIVE_TRANSFERS, "8443", "50"]));
    transfers.wait_for("live");
    let killed_at = std::time::SystemTime::now();
    tunnel.agent.kill_hard();
    // The relay notices the dead agent (QUIC: idle timeout; TCP: the kernel's reset of the
    // dead process's connection) and closes every client connection.
    transfers.wait_for("ended");
    let report = transfers.last_seen().to_owned();
    let fields: Vec<&str> = report.split_whitespace().collect();
    assert_eq!(fields.get(1), Some(&"50"), "not every transfer was closed: {report}");
    let last_end: f64 = fields.get(2).and_then(|f| f.parse().ok()).expect("end time");
    let killed: f64 = killed_at.duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let closed_after = last_end - killed;
    assert!(
        closed_after < 20.0,
        "client connections hung for {closed_after:.1}s after the agent died"
    );

    // A new agent process serves new connections.
    let restarted = std::time::Instant::now();
    tunnel.restart_agent();
    tunnel.wait_served();
    let back_after = restarted.elapsed();
    echo_through_the_tunnel(&topology, "after the agent restarted");
    eprintln!(
        "kill -9 agent ({transport}): all 50 client connections closed {closed_after:.2}s after the kill; \
         restarted agent approved after {back_after:?}"
    );
    tunnel.stop();
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn killing_the_agent_during_50_live_transfers_closes_them_and_a_restart_serves_again_over_quic() {
    killing_the_agent_during_50_live_transfers_closes_them_and_a_restart_serves_again(
        "quic", "k9q",
    );
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn killing_the_agent_during_50_live_transfers_closes_them_and_a_restart_serves_again_over_tcp() {
    killing_the_agent_during_50_live_transfers_closes_them_and_a_restart_serves_again("tcp", "k9t");
}

/// One-way delay and loss on the emulated cloud–vnet link of the WAN tests.
const WAN_DELAY: std::time::Duration = std::time::Duration::from_millis(50);
const WAN_LOSS: f64 = 0.02;
const WAN_BYTES: usize = 128 * 1024 * 1024;

/// Reads `conn` to its end (failing if it stalls for 30 s) and returns how many bytes came
/// and their SHA-256; `first_byte` is told when the first bytes arrive.
async fn read_to_end_hashed(
    conn: &mut tokio::net::TcpStream,
    mut first_byte: Option<tokio::sync::oneshot::Sender<()>>,
) -> (usize, aws_lc_rs::digest::Digest) {
    use tokio::io::AsyncReadExt as _;

    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0usize;
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), conn.read(&mut buf))
            .await
            .expect("the transfer stalled for 30 s")
            .expect("read");
        if n == 0 {
            return (received, hasher.finish());
        }
        if let Some(told) = first_byte.take() {
            let _ = told.send(());
        }
        hasher.update(&buf[..n]);
        received += n;
    }
}

/// 128 MiB from a server in the vnet to a client in the cloud, through the tunnel over an
/// emulated WAN link (50 ms each way, 2 % loss each way); the SHA-256 must match.
fn bulk_transfer_over_a_lossy_wan_arrives_intact(transport: &str, tag: &str) {
    use privlink_testbed::LinkProfile;
    use privlink_testbed::netns::spawn_in_namespace;
    use tokio::io::AsyncWriteExt as _;

    let links =
        [Link::emulated(0, 1, CLOUD_ADDR, VNET_ADDR, LinkProfile::wan(WAN_DELAY, WAN_LOSS))];
    let Some(topology) = topology_or_skip(tag, &["cloud", "vnet"], &links) else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = write_configs(dir.path(), transport);
    let (cloud, vnet) = (topology.ns(0), topology.ns(1));

    let payload = std::sync::Arc::new(common::random_bytes(WAN_BYTES));
    let expected = common::sha256(&payload);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let payload = payload.clone();
        spawn_in_namespace(vnet, move || async move {
            let listener =
                tokio::net::TcpListener::bind((VNET_ADDR, 9000)).await.expect("bind server");
            ready_tx.send(()).expect("ready");
            let (mut conn, _) = listener.accept().await.expect("accept");
            conn.write_all(&payload).await.expect("send payload");
            conn.shutdown().await.expect("shutdown");
        })
    };
    ready_rx.recv_timeout(common::WAIT).expect("server ready");
    let placement = Placement::Namespaces { relay: cloud, agent: vnet };
    let tunnel = Tunnel::start(common::BIN, &configs, placement);

    let started = std::time::Instant::now();
    let (received, digest) = spawn_in_namespace(cloud, || async {
        let mut conn = tokio::net::TcpStream::connect("127.0.0.1:8443").await.expect("connect");
        read_to_end_hashed(&mut conn, None).await
    })
    .join()
    .expect("client thread")
    .expect("client in namespace");
    let elapsed = started.elapsed();
    server.join().expect("server thread").expect("server in namespace");
    assert_eq!(received, WAN_BYTES);
    assert_eq!(digest.as_ref(), &expected[..], "the bytes changed on the way");
    let emulator = topology.emulator(0).expect("emulated link");
    let (fwd, lost, _, _) = emulator.b_to_a().snapshot();
    eprintln!(
        "{transport}: 128 MiB over {WAN_DELAY:?} each way / {}% loss in {elapsed:.1?} \
         ({:.1} Mbit/s); vnet→cloud packets forwarded {fwd}, lost {lost}",
        WAN_LOSS * 100.0,
        WAN_BYTES as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
    );
    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "exits: agent {agent}, relay {relay}");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn bulk_transfer_over_a_lossy_wan_arrives_intact_over_quic() {
    bulk_transfer_over_a_lossy_wan_arrives_intact("quic", "wq");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn bulk_transfer_over_a_lossy_wan_arrives_intact_over_tcp() {
    bulk_transfer_over_a_lossy_wan_arrives_intact("tcp", "wt");
}

/// The thin link of the test below: 2 Mbit/s each way with a quarter-megabyte queue.
const THIN_RATE_BPS: u64 = 2_000_000;
/// What the download beside the exchanges carries: about six seconds of the thin link.
const THIN_DOWNLOAD_BYTES: usize = 1536 * 1024;

/// One download fills a thin link (2 Mbit/s, 20 ms each way) from the vnet to the cloud;
/// meanwhile new connections through the same tunnel open one after another and each
/// echoes 1 KiB. Every exchange must succeed (an open behind the download must not outlast
/// the relay's open deadline), the download must arrive intact, and the tunnel connection
/// must be the one it started on (its heartbeats, queued behind the download, were answered
/// in time). What each exchange waited is printed: `docs/benchmarks.md` has the measurement.
fn a_download_filling_a_thin_link_leaves_room_for_new_connections(transport: &str, tag: &str) {
    use std::time::{Duration, Instant};

    use privlink_testbed::LinkProfile;
    use privlink_testbed::netns::spawn_in_namespace;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let profile = LinkProfile {
        delay: Duration::from_millis(20),
        rate_bps: Some(THIN_RATE_BPS),
        queue_bytes: 256 * 1024,
        ..LinkProfile::default()
    };
    let links = [Link::emulated(0, 1, CLOUD_ADDR, VNET_ADDR, profile)];
    let Some(topology) = topology_or_skip(tag, &["cloud", "vnet"], &links) else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = write_configs(dir.path(), transport);
    let (cloud, vnet) = (topology.ns(0), topology.ns(1));

    let payload = std::sync::Arc::new(common::random_bytes(THIN_DOWNLOAD_BYTES));
    let expected = common::sha256(&payload);
    // The first connection gets the download; every later one is an echo, until `stop`.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let payload = payload.clone();
        spawn_in_namespace(vnet, move || async move {
            let listener =
                tokio::net::TcpListener::bind((VNET_ADDR, 9000)).await.expect("bind server");
            ready_tx.send(()).expect("ready");
            let (mut download, _) = listener.accept().await.expect("accept the download");
            tokio::spawn(async move {
                download.write_all(&payload).await.expect("send the download");
                download.shutdown().await.expect("shutdown");
            });
            let echoes = async {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else { return };
                    tokio::spawn(async move {
                        let (mut from, mut to) = conn.split();
                        let _ = tokio::io::copy(&mut from, &mut to).await;
                    });
                }
            };
            tokio::select! {
                () = echoes => {}
                _ = stop_rx => {}
            }
        })
    };
    ready_rx.recv_timeout(common::WAIT).expect("server ready");
    let placement = Placement::Namespaces { relay: cloud, agent: vnet };
    let tunnel = Tunnel::start(common::BIN, &configs, placement);
    let link_before = tunnel.relay_admin.relay_status().agents[0].remote.clone();

    let (received, digest, waits) = spawn_in_namespace(cloud, || async {
        let (first_byte_tx, first_byte_rx) = tokio::sync::oneshot::channel::<()>();
        let download = tokio::spawn(async move {
            let mut conn = tokio::net::TcpStream::connect("127.0.0.1:8443").await.expect("connect");
            read_to_end_hashed(&mut conn, Some(first_byte_tx)).await
        });
        first_byte_rx.await.expect("the download started");
        let mut waits = Vec::new();
        let request = [0x5au8; 1024];
        // Bounded: the download leaves room for about a dozen exchanges on TLS/TCP and fifty
        // on QUIC; 500 is far past either.
        for exchange in 0..500 {
            if download.is_finished() {
                break;
            }
            let began = Instant::now();
            let mut conn = tokio::net::TcpStream::connect("127.0.0.1:8443").await.expect("connect");
            conn.write_all(&request).await.expect("send the request");
            let mut response = [0u8; 1024];
            tokio::time::timeout(Duration::from_secs(30), conn.read_exact(&mut response))
                .await
                .expect("no echo within 30 s")
                .unwrap_or_else(|e| panic!("exchange {exchange} beside the download failed: {e}"));
            assert_eq!(response, request, "the echo came back changed");
            waits.push(began.elapsed());
        }
        let (received, digest) = download.await.expect("download task");
        (received, digest, waits)
    })
    .join()
    .expect("client thread")
    .expect("client in namespace");
    let _ = stop_tx.send(());
    server.join().expect("server thread").expect("server in namespace");
    assert_eq!(received, THIN_DOWNLOAD_BYTES);
    assert_eq!(digest.as_ref(), &expected[..], "the bytes changed on the way");
    assert!(!waits.is_empty(), "no exchange ran beside the download");
    let link_after = tunnel.relay_admin.relay_status().agents[0].remote.clone();
    assert_eq!(link_before, link_after, "the agent's tunnel connection was replaced");
    let mut sorted = waits.clone();
    sorted.sort_unstable();
    eprintln!(
        "{transport}: {} exchanges beside a {} KiB download on a {} Mbit/s link: median {:?}, \
         worst {:?}",
        waits.len(),
        THIN_DOWNLOAD_BYTES / 1024,
        THIN_RATE_BPS / 1_000_000,
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "exits: agent {agent}, relay {relay}");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn a_download_filling_a_thin_link_leaves_room_for_new_connections_over_quic() {
    a_download_filling_a_thin_link_leaves_room_for_new_connections("quic", "tq");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn a_download_filling_a_thin_link_leaves_room_for_new_connections_over_tcp() {
    a_download_filling_a_thin_link_leaves_room_for_new_connections("tcp", "tt");
}

/// Relay killed with SIGKILL and started again at once (as a supervisor would): the agent
/// notices on its own, re-dials and serves again, with no operator action.
fn killing_the_relay_and_restarting_it_the_agent_reconnects_on_its_own(transport: &str, tag: &str) {
    let links = [Link::veth(0, 1, CLOUD_ADDR, VNET_ADDR)];
    let Some(topology) = topology_or_skip(tag, &["cloud", "vnet"], &links) else { return };
    let mut tunnel = EchoTunnel::start(&topology, transport);
    echo_through_the_tunnel(&topology, "before the kill");

    let killed = std::time::Instant::now();
    tunnel.relay.kill_hard();
    tunnel.restart_relay();
    let relay_up = killed.elapsed();
    tunnel.agent.wait_for("relay link down");
    let noticed = killed.elapsed();
    let why = tunnel.agent.last_seen().to_owned();
    tunnel.wait_served();
    let served = killed.elapsed();
    if transport == "quic" {
        // The restarted relay recognises the old connection's IDs and answers with a stateless
        // reset, instead of leaving the agent to wait out the idle timeout.
        assert!(why.contains("reset"), "the agent did not see a stateless reset: {why}");
    }
    echo_through_the_tunnel(&topology, "after the relay restarted");
    eprintln!(
        "kill -9 relay ({transport}): new relay listening after {relay_up:?}; agent noticed the \
         dead link after {noticed:?} ({why}); endpoint approved again {served:?} after the kill"
    );
    tunnel.stop();
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn killing_the_relay_and_restarting_it_the_agent_reconnects_on_its_own_over_quic() {
    killing_the_relay_and_restarting_it_the_agent_reconnects_on_its_own("quic", "rq");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn killing_the_relay_and_restarting_it_the_agent_reconnects_on_its_own_over_tcp() {
    killing_the_relay_and_restarting_it_the_agent_reconnects_on_its_own("tcp", "rt");
}

/// `n` echo connections through the endpoint. Prints `live` once every one has echoed its
/// first KiB, keeps each busy for 30 more rounds of 1 KiB every 100 ms (about 3 s), then
/// half-closes and reads to EOF. Prints `done OK FAILED`; exits 0 only if every byte of every
/// connection came back.
const DRAINED_TRANSFERS: &str = r#"
import os, socket, sys, threading, time
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
def echo(c):
    chunk = os.urandom(1024)
    c.sendall(chunk)
    got = b""
    while len(got) < len(chunk):
        d = c.recv(65536)
        if not d: raise EOFError("closed early")
        got += d
    if got != chunk: raise ValueError("bytes changed")
for c in conns: echo(c)
print("live", flush=True)
ok, failed = [], []
def run(c):
    try:
        for _ in range(30):
            echo(c); time.sleep(0.1)
        c.shutdown(socket.SHUT_WR)
        if c.recv(65536) != b"": raise ValueError("bytes after the last echo")
        ok.append(c)
    except Exception as e:
        failed.append(repr(e))
threads = [threading.Thread(target=run, args=(c,)) for c in conns]
for t in threads: t.start()
for t in threads: t.join()
print("done", len(ok), len(failed), failed[:3], flush=True)
sys.exit(0 if len(ok) == n else 1)
"#;

/// Connects to the endpoint once after the relay began shutting down. Prints `refused` if the
/// connection is refused or reset without service, `served` if bytes came back.
const REFUSAL_PROBE: &str = r#"
import socket, sys
try:
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    c.sendall(b"ping")
    print("served" if c.recv(16) else "refused", flush=True)
except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
    print("refused", flush=True)
"#;

fn sigterm_to_the_relay_lets_transfers_in_flight_finish_and_refuses_new_connections(
    transport: &str,
    tag: &str,
) {
    const TRANSFERS: &str = "20";
    let links = [Link::veth(0, 1, CLOUD_ADDR, VNET_ADDR)];
    let Some(topology) = topology_or_skip(tag, &["cloud", "vnet"], &links) else { return };
    let EchoTunnel { tunnel, _echo, _dir } = EchoTunnel::start(&topology, transport);
    let Tunnel { relay, agent, relay_admin, .. } = tunnel;
    let cloud = topology.ns(0);

    let mut transfers = Running::spawn(topology.exec(
        cloud,
        "python3",
        &["-c", DRAINED_TRANSFERS, "8443", TRANSFERS],
    ));
    transfers.wait_for("live");
    let signalled = std::time::Instant::now();
    relay.signal_terminate();
    let draining = relay_admin.wait("/readyz", |code, _| code == 503);
    assert!(draining.contains("draining"), "{draining}");
    let probe = topology
        .exec(cloud, "python3", &["-c", REFUSAL_PROBE, "8443"])
        .output()
        .expect("run probe");
    let verdict = String::from_utf8_lossy(&probe.stdout);
    assert_eq!(verdict.trim(), "refused", "a new connection during the drain was not refused");
    assert!(!transfers.seen_contains("done"), "the transfers ended before the probe ran");

    transfers.wait_for("done");
    let report = transfers.last_seen().to_owned();
    assert_eq!(
        report.split_whitespace().nth(1),
        Some(TRANSFERS),
        "transfers in flight did not all complete during the grace period: {report}"
    );
    let status = relay.wait_exit();
    let stopped = signalled.elapsed();
    assert!(status.success(), "relay exit status after SIGTERM: {status}");
    assert!(
        stopped < relay_grace(),
        "the relay waited out the whole grace period ({stopped:?}) although every transfer ended"
    );
    eprintln!(
        "SIGTERM relay ({transport}): {TRANSFERS} transfers in flight completed intact, a new connection was \
         refused during the drain, relay exited {stopped:?} after the signal"
    );
    assert!(agent.terminate().success());
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn sigterm_to_the_relay_lets_transfers_in_flight_finish_and_refuses_new_connections_over_quic() {
    sigterm_to_the_relay_lets_transfers_in_flight_finish_and_refuses_new_connections("quic", "stq");
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn sigterm_to_the_relay_lets_transfers_in_flight_finish_and_refuses_new_connections_over_tcp() {
    sigterm_to_the_relay_lets_transfers_in_flight_finish_and_refuses_new_connections("tcp", "stt");
}

/// The relay's default shutdown grace period (the test configs do not set one).
fn relay_grace() -> std::time::Duration {
    privlink_relay::config::DEFAULT_SHUTDOWN_GRACE
}

/// A tiny DNS server (see the script).
const DNS_SERVER: &str = include_str!("scripts/dns_server.py");

/// Accepts connections on ADDRESS PORT and sends each one BANNER and a newline, then closes.
const BANNER_SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("banner ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[3].encode() + b"\n"); c.close()
"#;

/// Connects to 127.0.0.1:PORT and prints the first line the far end sends.
const BANNER_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
got = b""
while not got.endswith(b"\n"):
    d = c.recv(64)
    if not d: break
    got += d
print(got.decode().strip() or "nothing", flush=True)
"#;

/// An address in the vnet where an impostor listens (outside the veth's /30).
const IMPOSTOR_ADDR: &str = "10.231.9.9";

/// The agent's network has a search domain and Kubernetes' `ndots:5`, and a host in the search
/// domain answers for the vault's name. An endpoint whose destination is written absolute
/// (`vault.corp.test.:9000`) reaches the real vault: the agent resolves it as written, not
/// through the search list. The same name written relative goes through the search list, as
/// the system resolver does for every program — which is why absolute names exist, and the
/// control showing that this test's resolver really applies the search domain.
#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn an_absolute_destination_name_is_resolved_without_the_search_domains() {
    let links = [Link::veth(0, 1, CLOUD_ADDR, VNET_ADDR)];
    let Some(mut topology) = topology_or_skip("dn", &["cloud", "vnet"], &links) else { return };
    let (cloud, vnet) = (topology.ns(0).to_owned(), topology.ns(1).to_owned());
    must(
        "ip",
        &["netns", "exec", &vnet, "ip", "addr", "add", &format!("{IMPOSTOR_ADDR}/32"), "dev", "lo"],
    );
    topology.set_hosts(1, "");
    topology.set_resolver(
        1,
        &format!("nameserver {VNET_ADDR}\nsearch search.test\noptions ndots:5 attempts:1\n"),
    );
    let real = format!("vault.corp.test.={VNET_ADDR}");
    let impostor = format!("vault.corp.test.search.test.={IMPOSTOR_ADDR}");
    let mut dns = Running::spawn(topology.exec(
        &vnet,
        "python3",
        &["-c", DNS_SERVER, VNET_ADDR, &real, &impostor],
    ));
    dns.wait_for("dns ready");
    let mut vault = Running::spawn(topology.exec(
        &vnet,
        "python3",
        &["-c", BANNER_SERVER, VNET_ADDR, "9000", "the-real-vault"],
    ));
    vault.wait_for("banner ready");
    let mut fake = Running::spawn(topology.exec(
        &vnet,
        "python3",
        &["-c", BANNER_SERVER, IMPOSTOR_ADDR, "9000", "an-impostor"],
    ));
    fake.wait_for("banner ready");

    let dir = tempfile::tempdir().expect("tempdir");
    let configs = common::write_tunnel_files(
        dir.path(),
        &common::TunnelFiles {
            tunnel_listen: &format!("{CLOUD_ADDR}:7443"),
            endpoint: "absolute",
            endpoint_listen: "127.0.0.1:8443",
            destination: "vault.corp.test.:9000",
            endpoint_extra: "\n[[endpoint]]\nname = \"relative\"\nconnector = \"tunnel\"\n\
                             destination = \"vault.corp.test:9000\"\nlisten = \"127.0.0.1:8444\"\n",
            agent_extra: "transport = \"quic\"",
            allow: "vault.corp.test:9000",
            admin: ADMIN,
        },
    );
    let placement = Placement::Namespaces { relay: &cloud, agent: &vnet };
    let tunnel = Tunnel::start(common::BIN, &configs, placement);

    let (ok, out, err) = topology.run(&cloud, "python3", &["-c", BANNER_CLIENT, "8443"]);
    assert!(ok, "client of the absolute endpoint: {err}");
    assert_eq!(out.trim(), "the-real-vault", "the absolute name went through the search list");
    let (ok, out, err) = topology.run(&cloud, "python3", &["-c", BANNER_CLIENT, "8444"]);
    assert!(ok, "client of the relative endpoint: {err}");
    assert_eq!(out.trim(), "an-impostor", "control: this resolver must apply its search domain");
    dns.wait_for("query vault.corp.test.search.test.");

    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "agent {agent}, relay {relay}");
}

/// Two private networks joined to the cloud, each with an agent of the connector.
const SPLIT_CLOUD_1: &str = "10.231.3.1";
const SPLIT_VNET_1: &str = "10.231.3.2";
const SPLIT_CLOUD_2: &str = "10.231.4.1";
const SPLIT_VNET_2: &str = "10.231.4.2";

/// The destination is in `vnet1` and cannot be reached from `vnet2` (no route). Every client
/// connection must be served: those first given to the agent in `vnet2` come back
/// `unreachable` before any answer and are replayed on the agent in `vnet1`, which the relay's
/// retry counter shows.
#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn a_destination_only_one_of_two_agents_can_reach_costs_no_client_a_failure() {
    use privlink_testbed::load;
    use privlink_testbed::netns::spawn_in_namespace;

    let links = [
        Link::veth(0, 1, SPLIT_CLOUD_1, SPLIT_VNET_1),
        Link::veth(0, 2, SPLIT_CLOUD_2, SPLIT_VNET_2),
    ];
    let Some(topology) = topology_or_skip("sp", &["cloud", "vnet1", "vnet2"], &links) else {
        return;
    };
    let (cloud, vnet1, vnet2) = (topology.ns(0), topology.ns(1), topology.ns(2));
    // The destination: the load tool's echo backend, in vnet1 only.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop_backend = tokio_util::sync::CancellationToken::new();
    let tls = load::LoadTls::new(common::LOAD_BACKEND_NAME);
    let backend = {
        let stop = stop_backend.clone();
        let server = std::sync::Arc::clone(&tls.server);
        spawn_in_namespace(vnet1, move || async move {
            let listener =
                tokio::net::TcpListener::bind((SPLIT_VNET_1, 9000)).await.expect("bind backend");
            ready_tx.send(()).expect("ready");
            load::serve_backend_tls(listener, stop, Some(server)).await;
        })
    };
    ready_rx.recv_timeout(common::WAIT).expect("backend ready");

    let dir = tempfile::tempdir().expect("tempdir");
    let destination = format!("{SPLIT_VNET_1}:9000");
    let configs = common::write_tunnel_files(
        dir.path(),
        &common::TunnelFiles {
            tunnel_listen: &format!("{SPLIT_CLOUD_1}:7443"),
            endpoint: "vault",
            endpoint_listen: "127.0.0.1:8443",
            destination: &destination,
            endpoint_extra: "",
            agent_extra: "transport = \"quic\"\nname = \"agent-1\"",
            allow: &destination,
            admin: ADMIN,
        },
    );
    // The relay answers on both links: one certificate for both of its addresses.
    let certs = dir.path().join("certs");
    let out = Command::new(common::BIN)
        .args(["certs", "init", "--force", "--dir", certs.to_str().expect("utf-8")])
        .args(["--name", SPLIT_CLOUD_1, "--name", SPLIT_CLOUD_2])
        .output()
        .expect("certs init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let relay_text = std::fs::read_to_string(&configs.relay).expect("relay.toml");
    std::fs::write(
        &configs.relay,
        relay_text.replace(&format!("{SPLIT_CLOUD_1}:7443\""), "0.0.0.0:7443\""),
    )
    .expect("relay.toml");
    let second_agent = std::fs::read_to_string(&configs.agent)
        .expect("agent.toml")
        .replace("name = \"agent-1\"", "name = \"agent-2\"")
        .replace(SPLIT_CLOUD_1, SPLIT_CLOUD_2);
    let second_path = dir.path().join("agent-2.toml");
    std::fs::write(&second_path, second_agent).expect("agent-2.toml");

    let placement = Placement::Namespaces { relay: cloud, agent: vnet1 };
    let tunnel = Tunnel::start(common::BIN, &configs, placement);
    let _agent2 = Running::spawn(topology.exec(
        vnet2,
        common::BIN,
        &["agent", "--config", second_path.to_str().expect("utf-8")],
    ));
    let agent2_admin = AdminProbe::new(Some(vnet2), ADMIN.1);
    agent2_admin.wait_ready();
    let agent2_id = agent2_admin.agent_status().id;
    tunnel
        .relay_admin
        .wait_relay_status(|s| privlink_testbed::process::approved_by(s, &agent2_id, "vault"));

    // Two seconds of new TLS connections from the cloud side, four at a time.
    let samples = spawn_in_namespace(cloud, move || async move {
        let endpoint = "127.0.0.1:8443".parse().expect("addr");
        load::churn_for(endpoint, 4, std::time::Duration::from_secs(2), Some(tls)).await
    })
    .join()
    .expect("load thread")
    .expect("load in namespace");
    let failed: Vec<_> = samples.iter().filter_map(|s| s.failure.as_deref()).collect();
    let worst = samples.iter().map(|s| s.took).max().unwrap_or_default();
    let (_, metrics) = tunnel.relay_admin.get("/metrics");
    let retried: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("privlink_relay_open_retries_total{") && l.contains("destination_failed")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    eprintln!(
        "destination reachable from one of two agents: {} connections, {} failed, {retried} \
         replayed on the other agent, worst open {worst:?}",
        samples.len(),
        failed.len()
    );
    assert!(samples.len() > 20, "too little load: {}", samples.len());
    assert!(failed.is_empty(), "clients saw the unreachable agent: {failed:?}");
    assert!(retried > 0, "the agent that cannot reach the destination was never tried");
    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "exits: agent {agent}, relay {relay}");
    stop_backend.cancel();
    let _ = backend.join();
}
