//! HTTP proxies on both sides, across network namespaces, with real processes and clients
//! nobody here wrote. `client` ⇄ `cloud` (the relay) ⇄ `corp` (tinyproxy, from Debian, with
//! Basic auth) ⇄ `vnet` (the agent and a Key Vault stand-in). Nothing routes between the
//! networks, and nftables in `vnet` drops every packet that leaves it except TCP to the proxy:
//! the agent's only way out is the corporate proxy.
//!
//! The agent (`transport = "auto"`) links over TLS/TCP through the proxy without sending a
//! single UDP datagram (an nftables counter proves it); `privlink check` reports the proxy hop;
//! an agent with wrong proxy credentials is told so by name. On the client side the relay's
//! CONNECT endpoint serves curl and the Azure SDK for Python (`HTTPS_PROXY`; secrets set and
//! read, an RSA key created and read, challenge verification on) by the vault's public name,
//! which resolves only inside the vnet, to the private vault — certificate verified end to
//! end; and answers 403 (outside `destinations`), 407 (credentials missing or wrong), 502 (the
//! destination refuses) and 504 (it never answers), each counted in `/metrics`.
//!
//! Needs root, iproute2, nftables, curl, python3 with `azure-keyvault-secrets` and
//! `azure-keyvault-keys`, and tinyproxy (`.ci/run` installs them). Where namespaces cannot be
//! made, the test says so loudly (see `privlink_testbed::netns::skip_notice`).

mod common;

use std::path::Path;

use common::{AdminProbe, Placement, Running, Tunnel};
use privlink_protocol::token::TokenDigest;
use privlink_testbed::netns::{sh, skip_notice};
use privlink_testbed::{Link, Topology};

/// Addresses inside the namespaces this test creates (nothing outside them is contacted).
const CLIENT: &str = "10.236.0.1";
const CLOUD_FRONT: &str = "10.236.0.2";
const CLOUD_BACK: &str = "10.236.0.5";
const CORP_OUTER: &str = "10.236.0.6";
const CORP_INNER: &str = "10.236.0.9";
const VNET: &str = "10.236.0.10";
/// On the vnet's loopback: nothing listens there, so a connection is refused.
const REFUSING: &str = "10.236.9.9";
/// Routed out of the vnet, where nftables drops every packet to it: a connection never
/// completes.
const SILENT: &str = "10.236.8.8";

const VAULT_NAME: &str = "contoso-kv.vault.azure.net";
const CLIENT_CREDENTIALS: &str = "kv-client:s3cret";
const PROXY_USER: &str = "privlink-agent";
const PROXY_PASSWORD: &str = "corp-proxy-pw";

const KEY_VAULT: &str = include_str!("scripts/key_vault.py");
const AZURE_SDK_CLIENT: &str = include_str!("scripts/azure_sdk_client.py");
const CONNECT_PROBE: &str = include_str!("scripts/connect_probe.py");

/// The relay's and agents' admin listeners, each on its namespace's loopback.
const RELAY_ADMIN: &str = "127.0.0.1:9090";
const AGENT_ADMIN: &str = "127.0.0.1:9091";
const WRONG_AGENT_ADMIN: &str = "127.0.0.1:9092";

/// Makes vnet drop every packet it sends except TCP to the proxy (and its own loopback),
/// counting the UDP datagrams it drops.
fn only_the_proxy_out_of(topology: &Topology, vnet: &str) {
    let rules = format!(
        "table inet plkproxy {{\n\
           chain out {{\n\
             type filter hook output priority 0; policy drop;\n\
             oif \"lo\" accept\n\
             ip daddr {CORP_INNER} tcp dport 3128 accept\n\
             meta l4proto udp counter drop\n\
           }}\n\
         }}\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.nft");
    std::fs::write(&file, rules).expect("rules");
    let (ok, _, err) = topology.run(vnet, "nft", &["-f", file.to_str().expect("utf-8")]);
    assert!(ok, "nft: {err}");
}

/// UDP datagrams vnet has dropped so far.
fn udp_dropped(topology: &Topology, vnet: &str) -> u64 {
    let (ok, out, err) = topology.run(vnet, "nft", &["list", "chain", "inet", "plkproxy", "out"]);
    assert!(ok, "nft list: {err}");
    let line = out.lines().find(|l| l.contains("udp")).expect("the udp rule");
    let packets = line.split_whitespace().skip_while(|w| *w != "packets").nth(1);
    packets.and_then(|n| n.parse().ok()).expect("a packet count")
}

/// tinyproxy in `corp`, on the inner address, admitting the vnet with Basic auth.
fn start_tinyproxy(topology: &Topology, corp: &str, dir: &Path) -> Running {
    let config = dir.join("tinyproxy.conf");
    std::fs::write(
        &config,
        format!(
            "Port 3128\nListen {CORP_INNER}\nTimeout 60\nMaxClients 64\nAllow {VNET}\n\
             BasicAuth {PROXY_USER} {PROXY_PASSWORD}\nLogLevel Info\n"
        ),
    )
    .expect("tinyproxy.conf");
    let mut proxy = Running::spawn(topology.exec(
        corp,
        "tinyproxy",
        &["-d", "-c", config.to_str().expect("utf-8")],
    ));
    // Ready once it accepts a connection (tinyproxy has no readiness signal of its own).
    let probe = format!(
        "import socket, time\nfor _ in range(100):\n    try:\n        socket.create_connection(('{CORP_INNER}', 3128), timeout=1); break\n    except OSError: time.sleep(0.05)\nelse: raise SystemExit('tinyproxy does not listen')"
    );
    let (ok, out, err) = topology.run(corp, "python3", &["-c", &probe]);
    assert!(ok, "tinyproxy did not start: {out}{err}{:?}", proxy.output_so_far());
    proxy
}

/// curl in `client` through the CONNECT endpoint to `https://NAME/...`: the CONNECT status
/// curl saw, and the body.
fn curl(
    topology: &Topology,
    client: &str,
    ca: &str,
    credentials: Option<&str>,
    name: &str,
) -> (String, String) {
    let proxy = match credentials {
        Some(credentials) => format!("http://{credentials}@{CLOUD_FRONT}:3128"),
        None => format!("http://{CLOUD_FRONT}:3128"),
    };
    let url = format!("https://{name}/secrets/db-password?api-version=7.4");
    let (_, out, _) = topology.run(
        client,
        "curl",
        &[
            "--silent",
            "--max-time",
            "20",
            "--proxy",
            &proxy,
            "--cacert",
            ca,
            "--header",
            "Authorization: Bearer test-token",
            "--write-out",
            "\n%{http_connect}",
            &url,
        ],
    );
    let (body, connect) = out.rsplit_once('\n').unwrap_or(("", &out));
    (connect.to_owned(), body.to_owned())
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn through_http_proxies_on_both_sides() {
    for tool in ["curl", "python3", "tinyproxy"] {
        if !sh("sh", &["-c", &format!("command -v {tool}")]).0 {
            skip_notice(&format!("`{tool}` is not installed"));
            return;
        }
    }
    let sdk = sh("python3", &["-c", "import azure.keyvault.secrets, azure.keyvault.keys"]);
    assert!(
        sdk.0,
        "the Azure SDK is not installed: pip install azure-keyvault-secrets azure-keyvault-keys (.ci/run does)"
    );
    let links = [
        Link::veth(0, 1, CLIENT, CLOUD_FRONT),
        Link::veth(1, 2, CLOUD_BACK, CORP_OUTER),
        Link::veth(2, 3, CORP_INNER, VNET),
    ];
    let mut topology = match Topology::create("hp", &["client", "cloud", "corp", "vnet"], &links) {
        Ok(topology) => topology,
        Err(reason) => return skip_notice(&reason),
    };
    // The vault's public name resolves, inside the vnet only, to the private vault.
    topology.set_hosts(
        3,
        &format!("{VNET} {VAULT_NAME}\n{REFUSING} refused.vault.azure.net\n{SILENT} silent.vault.azure.net"),
    );
    let [client, cloud, corp, vnet] = [0, 1, 2, 3].map(|i| topology.ns(i).to_owned());
    for command in [
        vec!["ip", "addr", "add", &format!("{REFUSING}/32"), "dev", "lo"],
        // Routed towards corp, where nftables drops it before it leaves.
        vec!["ip", "route", "add", "10.236.8.0/24", "via", CORP_INNER],
    ] {
        let (ok, _, err) = topology.run(&vnet, command[0], &command[1..]);
        assert!(ok, "{command:?}: {err}");
    }
    only_the_proxy_out_of(&topology, &vnet);
    // Isolation: from the vnet, the relay's tunnel port cannot be reached but by the proxy.
    let (ok, out, err) = topology.run(&vnet, "python3", &["-c", CONNECT_PROBE, CLOUD_BACK, "7443"]);
    assert!(ok, "the vnet reaches the relay directly: {out}{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let vault_dir = dir.path().join("vault");
    let (ok, err) = sh(
        common::BIN,
        &["certs", "init", "--dir", vault_dir.to_str().expect("utf-8"), "--name", VAULT_NAME],
    );
    assert!(ok, "certs init: {err}");
    let vault_ca = vault_dir.join("ca.crt");
    let vault_ca = vault_ca.to_str().expect("utf-8");
    let (cert, key) = (vault_dir.join("relay.crt"), vault_dir.join("relay.key"));
    let mut vault = Running::spawn(topology.exec(
        &vnet,
        "python3",
        &["-c", KEY_VAULT, VNET, cert.to_str().expect("utf-8"), key.to_str().expect("utf-8")],
    ));
    vault.wait_for("vault ready");
    let _proxy = start_tinyproxy(&topology, &corp, dir.path());

    std::fs::write(
        dir.path().join("proxy-credentials"),
        format!("{PROXY_USER}:{PROXY_PASSWORD}\n"),
    )
    .expect("credentials");
    let client_hash = TokenDigest::of(CLIENT_CREDENTIALS.as_bytes()).to_hex();
    let configs = common::write_tunnel_files(
        dir.path(),
        &common::TunnelFiles {
            tunnel_listen: &format!("{CLOUD_BACK}:7443"),
            endpoint: "vault-proxy",
            endpoint_listen: &format!("{CLOUD_FRONT}:3128"),
            destination: "",
            endpoint_extra: &format!(
                "mode = \"http-connect\"\ndestinations = [\"*.vault.azure.net:443\"]\n\
                 proxy_auth_sha256 = \"{client_hash}\"\nopen_timeout = \"8s\"\nopen_attempts = 1\n\
                 [endpoint.acl]\nallow = [\"{CLIENT}/32\"]\n\n[audit]\npath = \"relay-audit.jsonl\""
            ),
            agent_extra: &format!(
                "transport = \"auto\"\nproxy = \"http://{CORP_INNER}:3128\"\n\
                 proxy_credentials_file = \"proxy-credentials\"\nconnect_timeout = \"2s\""
            ),
            allow: "*.vault.azure.net:443",
            admin: (RELAY_ADMIN.parse().expect("addr"), AGENT_ADMIN.parse().expect("addr")),
        },
    );
    let placement = Placement::Namespaces { relay: &cloud, agent: &vnet };
    let tunnel = Tunnel::start(common::BIN, &configs, placement);

    // The agent linked over TLS/TCP through the proxy (its link dials the proxy's address), and
    // not one UDP datagram left the vnet: `auto` did not even try QUIC.
    let status = tunnel.agent_admin.agent_status();
    let link = status.links.first().expect("a link");
    assert_eq!(link.transport.as_deref(), Some("tcp"), "{link:?}");
    assert_eq!(link.address, format!("{CORP_INNER}:3128"), "{link:?}");
    assert_eq!(udp_dropped(&topology, &vnet), 0, "the agent sent UDP (QUIC) behind a proxy");

    // curl by the vault's own name through the CONNECT endpoint: the vault's certificate
    // verified end to end, the secret served.
    let (connect, body) = curl(&topology, &client, vault_ca, Some(CLIENT_CREDENTIALS), VAULT_NAME);
    assert_eq!(connect, "200", "{body}");
    assert!(
        body.contains("SecretNotFound") || body.contains("\"value\""),
        "the vault answered: {body}"
    );
    for (credentials, name, want, what) in [
        (Some(CLIENT_CREDENTIALS), "db.corp.example", "403", "outside destinations"),
        (None, VAULT_NAME, "407", "no credentials"),
        (Some("kv-client:wrong"), VAULT_NAME, "407", "wrong credentials"),
        (Some(CLIENT_CREDENTIALS), "refused.vault.azure.net", "502", "refused"),
        (Some(CLIENT_CREDENTIALS), "silent.vault.azure.net", "504", "never answers"),
    ] {
        let (connect, body) = curl(&topology, &client, vault_ca, credentials, name);
        assert_eq!(connect, want, "{what}: {body}");
    }

    // The Azure SDK for Python with HTTPS_PROXY: secrets and keys by the vault's own URL.
    let proxy_url = format!("http://{CLIENT_CREDENTIALS}@{CLOUD_FRONT}:3128");
    let out = topology
        .exec(&client, "python3", &["-c", AZURE_SDK_CLIENT, &format!("https://{VAULT_NAME}")])
        .env("HTTPS_PROXY", &proxy_url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("REQUESTS_CA_BUNDLE", vault_ca)
        .output()
        .expect("python3");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the SDK failed: {stdout}{stderr}");
    assert_eq!(stdout, "secret hunter2-through-connect\nkey kek RSA\n", "{stderr}");

    // Each answer counted, by the pattern that admitted the request and the status.
    let relay_admin = AdminProbe::new(Some(&cloud), RELAY_ADMIN.parse().expect("addr"));
    let (_, metrics) = relay_admin.get("/metrics");
    for (destination, status) in [
        ("*.vault.azure.net:443", 200),
        ("-", 403),
        ("-", 407),
        ("*.vault.azure.net:443", 502),
        ("*.vault.azure.net:443", 504),
    ] {
        let series = format!(
            "privlink_relay_connect_answers_total{{endpoint=\"vault-proxy\",destination=\"{destination}\",status=\"{status}\"}}"
        );
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }

    // `privlink check` in the vnet: the proxy hop, then the relay through it.
    let (ok, report, err) = topology.run(
        &vnet,
        common::BIN,
        &["check", "--config", &configs.agent, "--json", "--no-tls"],
    );
    let report: serde_json::Value = serde_json::from_str(&report).expect("JSON report");
    let step = |check: &str| {
        report["steps"].as_array().expect("steps").iter().find(|s| s["check"] == check).cloned()
    };
    for check in ["proxy", "proxy-connect", "relay-tcp"] {
        let found = step(check).unwrap_or_else(|| panic!("no {check} step: {report:#}{err}"));
        assert_eq!(found["outcome"], "pass", "{check}: {found:#}");
    }
    assert!(step("relay-quic").is_none(), "QUIC is not tried behind a proxy: {report:#}");
    assert!(ok, "check passes: {report:#}{err}");

    // Wrong proxy credentials: `check` names the proxy's refusal and the key to fix, and a
    // running agent's link says the same.
    std::fs::write(dir.path().join("wrong-credentials"), format!("{PROXY_USER}:nope\n"))
        .expect("file");
    let wrong = std::fs::read_to_string(&configs.agent)
        .expect("agent.toml")
        .replace("\"proxy-credentials\"", "\"wrong-credentials\"")
        .replace(AGENT_ADMIN, WRONG_AGENT_ADMIN);
    let wrong_config = dir.path().join("agent-wrong.toml");
    std::fs::write(&wrong_config, wrong).expect("agent-wrong.toml");
    let wrong_config = wrong_config.to_str().expect("utf-8");
    let (ok, report, _) = topology.run(
        &vnet,
        common::BIN,
        &["check", "--config", wrong_config, "--json", "--no-tls"],
    );
    assert!(!ok, "check fails with wrong proxy credentials");
    let report: serde_json::Value = serde_json::from_str(&report).expect("JSON report");
    let refused = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["check"] == "proxy-connect")
        .expect("a proxy-connect step")
        .clone();
    let detail = refused["detail"].as_str().unwrap_or_default();
    assert_eq!(refused["outcome"], "fail", "{refused:#}");
    // tinyproxy answers wrong credentials with 401 (missing ones with 407): either is named.
    assert!(detail.contains("the proxy does not accept the credentials"), "{detail}");
    assert!(detail.contains("proxy_credentials_file"), "{detail}");
    assert!(!detail.contains("nope"), "no credential in a report: {detail}");

    let wrong_agent =
        Running::spawn(topology.exec(&vnet, common::BIN, &["agent", "--config", wrong_config]));
    let wrong_admin = AdminProbe::new(Some(&vnet), WRONG_AGENT_ADMIN.parse().expect("addr"));
    let status = wrong_admin.wait_agent_status(|status| {
        let named = |e: &str| e.contains("does not accept the credentials");
        status.links.iter().any(|l| l.last_error.as_deref().is_some_and(named))
    });
    let error = status.links[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("HTTP proxy") && error.contains("proxy_credentials_file"), "{error}");
    let mut wrong_agent = wrong_agent;
    // The status said it; the log line about it follows at once.
    wrong_agent.wait_for("does not accept the credentials");
    let logged = wrong_agent.output_so_far().join("\n");
    assert!(!logged.contains("nope"), "no credential in a log line: {logged}");
    drop(wrong_agent);
    let mut tunnel = tunnel;
    let logged = tunnel.agent.output_so_far().join("\n") + &tunnel.relay.output_so_far().join("\n");
    // The flow log names where each CONNECT client asked to go.
    assert!(
        logged.lines().any(|l| l.contains("privlink::flow")
            && l.contains(&format!("destination={VAULT_NAME}:443"))
            && l.contains("outcome=completed")),
        "no completed flow line names {VAULT_NAME}:443"
    );
    for secret in [PROXY_PASSWORD, "s3cret"] {
        assert!(!logged.contains(secret), "`{secret}` in a log line");
    }

    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "exits: agent {agent}, relay {relay}");
    // The audit trail names where each CONNECT client asked to go, served or refused, and
    // holds no credential.
    let trail = std::fs::read_to_string(dir.path().join("relay-audit.jsonl")).expect("trail");
    let records: Vec<serde_json::Value> =
        trail.lines().map(|l| serde_json::from_str(l).expect("a record")).collect();
    let vault_destination = format!("{VAULT_NAME}:443");
    let with = |event: &str, outcome: Option<&str>, destination: &str| {
        records.iter().any(|r| {
            r["event"] == event
                && outcome.is_none_or(|o| r["outcome"] == o)
                && r["destination"] == destination
        })
    };
    assert!(with("connection.opened", None, &vault_destination), "{trail}");
    assert!(with("connection.closed", Some("completed"), &vault_destination), "{trail}");
    assert!(with("connection.denied", Some("forbidden"), "db.corp.example:443"), "{trail}");
    for secret in [PROXY_PASSWORD, "s3cret", CLIENT_CREDENTIALS] {
        assert!(!trail.contains(secret), "`{secret}` in the audit trail");
    }
    drop(vault);
}
