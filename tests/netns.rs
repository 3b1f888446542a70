//! Network-namespace tests: the relay in a `cloud` namespace, the agent and its destination in
//! a `vnet` namespace, joined by a veth pair — separate networks, real processes. nftables in
//! `vnet` drops outbound UDP, and an agent with `transport = "auto"` must fall back to TLS over
//! TCP; when the rule is removed it must move back to QUIC.
//!
//! Needs root, iproute2 and nftables (`.ci/run` installs them). Where namespaces cannot be
//! made, the test says so loudly and skips.

mod common;

use std::path::Path;
use std::process::Command;

use common::Running;

/// Addresses inside the namespaces this test creates (nothing outside them is ever contacted).
const CLOUD_ADDR: &str = "10.231.0.1";
const VNET_ADDR: &str = "10.231.0.2";

/// Runs a command, returning whether it succeeded and its stderr.
fn sh(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(e) => (false, e.to_string()),
    }
}

fn must(program: &str, args: &[&str]) {
    let (ok, stderr) = sh(program, args);
    assert!(ok, "{program} {}: {stderr}", args.join(" "));
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct Topology {
    cloud: String,
    vnet: String,
}

impl Topology {
    fn create() -> Result<Self, String> {
        let (root, _) = sh("sh", &["-c", "[ \"$(id -u)\" = 0 ]"]);
        if !root {
            return Err("not running as root".into());
        }
        for tool in ["ip", "nft"] {
            if !sh("sh", &["-c", &format!("command -v {tool}")]).0 {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        let id = std::process::id();
        let topology = Self { cloud: format!("plk-cloud-{id}"), vnet: format!("plk-vnet-{id}") };
        for ns in [&topology.cloud, &topology.vnet] {
            let (ok, stderr) = sh("ip", &["netns", "add", ns]);
            if !ok {
                return Err(format!("cannot create a network namespace: {stderr}"));
            }
        }
        let (c_if, v_if) = (format!("plkc{id}"), format!("plkv{id}"));
        must("ip", &["link", "add", &c_if, "type", "veth", "peer", "name", &v_if]);
        for (ns, ifname, addr) in
            [(&topology.cloud, &c_if, CLOUD_ADDR), (&topology.vnet, &v_if, VNET_ADDR)]
        {
            must("ip", &["link", "set", ifname, "netns", ns]);
            must("ip", &["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", ifname]);
            must("ip", &["-n", ns, "link", "set", ifname, "up"]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        Ok(topology)
    }

    fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]).args(args);
        command
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and so the pair.
        let _ = sh("ip", &["netns", "del", &self.cloud]);
        let _ = sh("ip", &["netns", "del", &self.vnet]);
    }
}

const ECHO_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
print("echo ready", flush=True)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            c.shutdown(socket.SHUT_WR); c.close(); return
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

const ECHO_CLIENT: &str = r#"
import os, socket, sys
payload = os.urandom(256 * 1024)
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=15)
c.sendall(payload); c.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = c.recv(65536)
    if not d: break
    got += d
sys.exit(0 if got == payload else 1)
"#;

fn write_configs(dir: &Path) -> (String, String) {
    let certs = dir.join("certs");
    let certs_s = certs.to_str().expect("utf-8");
    let (ok, stderr) = sh(common::BIN, &["certs", "init", "--dir", certs_s, "--name", CLOUD_ADDR]);
    assert!(ok, "certs init: {stderr}");
    let token = "plk_netns_test_token";
    std::fs::write(certs.join("token"), token).expect("token");
    let digest = common::hex(&common::sha256(token.as_bytes()));
    let relay = format!(
        "[tunnel]\nlisten = \"{CLOUD_ADDR}:7443\"\ncert = \"certs/relay.crt\"\nkey = \"certs/relay.key\"\n\n\
         [[connector]]\nname = \"vnet\"\ntoken_sha256 = \"{digest}\"\n\n\
         [[endpoint]]\nname = \"vault\"\nconnector = \"vnet\"\ndestination = \"{VNET_ADDR}:9000\"\nlisten = \"127.0.0.1:8443\"\n"
    );
    let agent = format!(
        "connector = \"vnet\"\ntoken_file = \"certs/token\"\nrelays = [\"{CLOUD_ADDR}:7443\"]\n\
         relay_ca = \"certs/ca.crt\"\ntransport = \"auto\"\nquic_fallback_after = \"1s\"\n\
         quic_probe_interval = \"500ms\"\n\n[[allow]]\ndestination = \"{VNET_ADDR}:9000\"\n"
    );
    let relay_path = dir.join("relay.toml");
    let agent_path = dir.join("agent.toml");
    std::fs::write(&relay_path, relay).expect("relay.toml");
    std::fs::write(&agent_path, agent).expect("agent.toml");
    (relay_path.to_str().expect("utf-8").to_owned(), agent_path.to_str().expect("utf-8").to_owned())
}

#[test]
fn across_namespaces_auto_falls_back_to_tcp_when_udp_is_dropped_and_returns_to_quic() {
    let topology = match Topology::create() {
        Ok(t) => t,
        Err(reason) => {
            eprintln!("\n*** SKIPPED: network-namespace test not run: {reason} ***\n");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay_cfg, agent_cfg) = write_configs(dir.path());
    let (cloud, vnet) = (topology.cloud.as_str(), topology.vnet.as_str());

    // The private network drops every outbound UDP datagram.
    must("ip", &["netns", "exec", vnet, "nft", "add", "table", "inet", "plk"]);
    must(
        "ip",
        &[
            "netns",
            "exec",
            vnet,
            "nft",
            "add chain inet plk out { type filter hook output priority 0 ; policy accept ; }",
        ],
    );
    must(
        "ip",
        &[
            "netns", "exec", vnet, "nft", "add", "rule", "inet", "plk", "out", "meta", "l4proto",
            "udp", "drop",
        ],
    );

    let mut echo =
        Running::spawn(topology.exec(vnet, "python3", &["-c", ECHO_SERVER, VNET_ADDR, "9000"]));
    echo.wait_for("echo ready");
    let mut relay =
        Running::spawn(topology.exec(cloud, common::BIN, &["relay", "--config", &relay_cfg]));
    relay.wait_for("endpoint listening");
    let mut agent =
        Running::spawn(topology.exec(vnet, common::BIN, &["agent", "--config", &agent_cfg]));
    agent.wait_for("falling back to TLS over TCP");
    agent.wait_for("transport=tcp");
    relay.wait_for("endpoint approved by agent");

    let client = |label: &str| {
        let status = topology
            .exec(cloud, "python3", &["-c", ECHO_CLIENT, "8443"])
            .status()
            .expect("run client");
        assert!(status.success(), "client through the tunnel ({label}) failed");
    };
    client("over TCP, UDP dropped");

    // UDP is allowed again: the agent's probe gets through and new streams move to QUIC.
    must("ip", &["netns", "exec", vnet, "nft", "delete", "table", "inet", "plk"]);
    agent.wait_for("QUIC gets through again");
    relay.wait_for("transport=quic");
    relay.wait_for("agent is draining");
    client("over QUIC again");

    assert!(agent.terminate().success());
    assert!(relay.terminate().success());
    drop(echo);
}
