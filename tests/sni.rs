//! Routing by server name. A shared listener (`[[listener]]`) reads each client's ClientHello and
//! hands the connection to the endpoint that claims the name it asks for: two vaults behind one
//! port, each reached by its own name and verifying its own certificate. SNI pinning: an
//! endpoint with `server_names` on a port of its own reads each client's TLS
//! ClientHello before it asks an agent, and refuses — TLS's `unrecognized_name` alert, or a
//! plain close for a client that did not speak TLS — any that names something else; the
//! ClientHello it read goes on to the destination untouched, so the vault's own certificate
//! verifies end to end. Real clients nobody here wrote: curl, `openssl s_client`, Python's
//! `ssl`; and a ClientHello written one byte per TCP segment.

#[macro_use]
mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::client_hello::UNRECOGNIZED_NAME_ALERT;
use privlink_protocol::config::AdminSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VAULT: &str = "contoso-kv.vault.test";
const OTHER_VAULT: &str = "fabrikam-kv.vault.test";

/// A relay whose endpoint `kv` is pinned to [`VAULT`] in front of that vault, an agent that
/// approved it, the CA file the vault's certificate chains to, and the relay's admin listener.
struct Pinned {
    harness: Harness,
    agent: tokio_util::sync::CancellationToken,
    ca_file: tempfile::NamedTempFile,
    admin: SocketAddr,
}

impl Pinned {
    async fn start(transport: TransportChoice) -> Self {
        let ca = privlink_transport::pki::CertificateAuthority::new("Test Vault CA").expect("CA");
        let vault = vault::https_vault(&ca, VAULT).await;
        let mut ca_file = tempfile::NamedTempFile::new().expect("ca file");
        ca_file.write_all(ca.identity.cert_pem.as_bytes()).expect("write ca");
        let mut kv = endpoint("kv", vault);
        kv.server_names = vec![VAULT.to_owned(), "*.pinned.test".to_owned()];
        let admin = loopback(privlink_testbed::process::free_fixed_port());
        let harness =
            Harness::start_with_admin(vec![kv], Some(AdminSettings::new(admin, None))).await;
        let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(vault)]));
        harness.wait_approved("kv").await;
        Self { harness, agent, ca_file, admin }
    }

    fn port(&self) -> u16 {
        self.harness.addr("kv").port()
    }

    /// curl to `https://NAME:PORT/`, NAME resolved to the relay: its exit code, body, stderr.
    fn curl(&self, name: &str) -> (i32, String, String) {
        curl(self.port(), self.ca_file.path(), name)
    }

    /// Python's `ssl` to NAME through the relay, verifying against the vault CA: what it
    /// printed (the body, or the error).
    fn python(&self, name: &str) -> String {
        python(self.port(), self.ca_file.path(), name)
    }

    fn openssl(&self, name: &str) -> String {
        openssl(self.port(), self.ca_file.path(), Some(name))
    }
}

/// curl to `https://NAME:PORT/`, NAME resolved to the relay, trusting `ca`: its exit code,
/// body, stderr.
fn curl(port: u16, ca: &Path, name: &str) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["--cacert", ca.to_str().expect("utf-8")])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .expect("curl (Debian package curl)");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Python's `ssl` to NAME through the relay at `port`, verifying against `ca`: what it printed
/// (the body, or the error).
fn python(port: u16, ca: &Path, name: &str) -> String {
    let script = format!(
        "import socket, ssl\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         try:\n\
         \x20   with socket.create_connection(('127.0.0.1', {port}), timeout=10) as raw:\n\
         \x20       with ctx.wrap_socket(raw, server_hostname={name:?}) as tls:\n\
         \x20           tls.sendall(b'GET / HTTP/1.1\\r\\nHost: {name}\\r\\n\\r\\n')\n\
         \x20           print(tls.recv(4096).decode().split('\\r\\n\\r\\n')[-1])\n\
         except ssl.SSLError as e:\n\
         \x20   print('SSLError', e.reason)\n",
        ca = ca.to_str().expect("utf-8"),
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `openssl s_client` to the relay at `port` asking for `name` (none: `-noservername`), trusting
/// `ca`: everything it printed.
fn openssl(port: u16, ca: &Path, name: Option<&str>) -> String {
    let sni = match name {
        Some(name) => vec!["-servername", name],
        None => vec!["-noservername"],
    };
    let child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(sni)
        .args(["-CAfile", ca.to_str().expect("utf-8")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl (Debian package openssl)");
    let out = child.wait_with_output().expect("openssl runs");
    String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned()
}

/// What the relay answers to `bytes` sent one per TCP segment: the first bytes back (empty
/// when it closed without a word, or reset).
async fn answer_to_trickle(relay: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut socket = TcpStream::connect(relay).await.expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    for byte in bytes {
        // A refusal may close the connection before the last byte is written.
        if socket.write_all(std::slice::from_ref(byte)).await.is_err() {
            break;
        }
    }
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, socket.read(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap_or(0);
    answer.truncate(n);
    answer
}

fn sni_unmatched(admin: SocketAddr) -> u64 {
    let (code, body) = admin_get(admin, "/metrics");
    assert_eq!(code, 200);
    let series = "privlink_relay_connections_total{endpoint=\"kv\",outcome=\"sni_unmatched\"} ";
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

async fn a_pinned_endpoint_serves_its_names_and_refuses_every_other(transport: TransportChoice) {
    let pinned = Pinned::start(transport).await;
    let relay = pinned.harness.addr("kv");
    tokio::task::block_in_place(|| {
        // Its own name, and one under the wildcard... which the vault's certificate does not
        // name: routed (the relay does not judge certificates), and then curl refuses it.
        let (code, body, stderr) = pinned.curl(VAULT);
        assert_eq!((code, body.as_str()), (0, VAULT), "curl: {stderr}");
        let (code, _, stderr) = pinned.curl("x.pinned.test");
        assert_eq!(code, 60, "routed, then the vault's certificate fails for the name: {stderr}");
        // Any other name: the unrecognized_name alert, before any agent is asked.
        let (code, _, stderr) = pinned.curl("fabrikam-kv.vault.test");
        assert_eq!(code, 35, "{stderr}");
        assert!(stderr.contains("unrecognized name"), "{stderr}");
        assert_eq!(pinned.python(VAULT), VAULT);
        let refused = pinned.python("other.vault.test");
        assert!(refused.contains("UNRECOGNIZED_NAME"), "{refused}");
        let verified = pinned.openssl(VAULT);
        assert!(verified.contains("Verify return code: 0 (ok)"), "{verified}");
        let refused = pinned.openssl("other.vault.test");
        assert!(refused.contains("unrecognized name"), "{refused}");
    });
    // One byte per segment: still read, still routed (the vault answers with its handshake).
    let answer = answer_to_trickle(relay, &vault::client_hello_for(VAULT)).await;
    assert_eq!(answer.first(), Some(&0x16), "a TLS handshake record back: {answer:?}");
    let answer = answer_to_trickle(relay, &vault::client_hello_for("elsewhere.test")).await;
    assert_eq!(answer, UNRECOGNIZED_NAME_ALERT, "the alert, one byte at a time too");
    // Not TLS: closed without a word.
    let answer = answer_to_trickle(relay, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.is_empty(), "plain HTTP gets a close: {answer:?}");
    // Every refusal counted.
    let counted = tokio::task::block_in_place(|| sni_unmatched(pinned.admin));
    assert_eq!(counted, 5, "curl, python, openssl, the trickle, plain HTTP");
    pinned.harness.shutdown(&[pinned.agent]).await;
}

/// Two vaults behind one shared port, and a wildcard: each client reaches the vault its name
/// asks for and verifies that vault's own certificate; an unknown name, no name at all and
/// plain HTTP are turned away (alert, alert, close) and counted on the listener.
async fn two_vaults_behind_one_shared_port_each_by_its_own_name(transport: TransportChoice) {
    let ca = privlink_transport::pki::CertificateAuthority::new("Test Vault CA").expect("CA");
    let contoso = vault::https_vault(&ca, VAULT).await;
    let fabrikam = vault::https_vault(&ca, OTHER_VAULT).await;
    let wild = vault::https_vault(&ca, "team.wild.test").await;
    let mut ca_file = tempfile::NamedTempFile::new().expect("ca file");
    ca_file.write_all(ca.identity.cert_pem.as_bytes()).expect("write ca");
    let on_port = |name: &str, destination: SocketAddr, names: &[&str]| {
        let mut spec = endpoint(name, destination);
        spec.listener = Some("vaults".to_owned());
        spec.server_names = names.iter().map(|n| (*n).to_owned()).collect();
        spec
    };
    let endpoints = vec![
        on_port("contoso", contoso, &[VAULT]),
        on_port("fabrikam", fabrikam, &[OTHER_VAULT]),
        on_port("wild", wild, &["*.wild.test"]),
    ];
    let routes = [(VAULT, "contoso"), (OTHER_VAULT, "fabrikam"), ("*.wild.test", "wild")];
    let listener = listener("vaults", &routes);
    let admin = loopback(privlink_testbed::process::free_fixed_port());
    let harness =
        Harness::start_with(endpoints, vec![listener], Some(AdminSettings::new(admin, None))).await;
    let allow = [rule_for(contoso), rule_for(fabrikam), rule_for(wild)];
    let agent = harness.spawn_agent(harness.agent_config(transport, &allow));
    for name in ["contoso", "fabrikam", "wild"] {
        harness.wait_approved(name).await;
    }
    let shared = harness.addr("contoso");
    assert_eq!(harness.addr("fabrikam"), shared, "both on the one port");
    let (port, ca) = (shared.port(), ca_file.path());
    tokio::task::block_in_place(|| {
        for name in [VAULT, OTHER_VAULT, "team.wild.test"] {
            let (code, body, stderr) = curl(port, ca, name);
            assert_eq!((code, body.as_str()), (0, name), "curl {name}: {stderr}");
            assert_eq!(python(port, ca, name), name);
            let verified = openssl(port, ca, Some(name));
            assert!(verified.contains("Verify return code: 0 (ok)"), "{name}: {verified}");
        }
        let (code, _, stderr) = curl(port, ca, "unknown.vault.test");
        assert_eq!(code, 35, "{stderr}");
        assert!(stderr.contains("unrecognized name"), "{stderr}");
        let no_name = openssl(port, ca, None);
        assert!(no_name.contains("unrecognized name"), "{no_name}");
    });
    let answer = answer_to_trickle(shared, &vault::client_hello_for(OTHER_VAULT)).await;
    assert_eq!(answer.first(), Some(&0x16), "routed one byte at a time: {answer:?}");
    let answer = answer_to_trickle(shared, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.is_empty(), "plain HTTP gets a close: {answer:?}");
    tokio::task::block_in_place(|| {
        let (code, body) = admin_get(admin, "/metrics");
        assert_eq!(code, 200);
        let series =
            "privlink_relay_listener_refused_total{listener=\"vaults\",reason=\"sni_unmatched\"} 3";
        assert!(body.contains(series), "{series} in:\n{body}");
        let (_, status) = admin_get(admin, "/api/v1/status");
        let status: privlink_admin::snapshot::StatusSnapshot =
            serde_json::from_str(&status).expect("status");
        let listeners = &status.relay().expect("relay").listeners;
        assert_eq!(listeners.len(), 1);
        assert_eq!(listeners[0].routes.get(VAULT).map(String::as_str), Some("contoso"));
        assert_eq!(listeners[0].listen, shared.to_string());
    });
    harness.shutdown(&[agent]).await;
}

on_both_transports!(
    a_pinned_endpoint_serves_its_names_and_refuses_every_other,
    two_vaults_behind_one_shared_port_each_by_its_own_name,
);

/// `privlink check --endpoint NAME:PORT`, run where a client runs: healthy (resolves to the
/// relay, routed, the vault's certificate chains to the CA given), the name resolving
/// elsewhere, a name no endpoint claims (`unrecognized_name`), and a certificate the client
/// would refuse (another CA) — each named in its JSON output, exit 0 or 69.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_endpoint_explains_what_a_client_would_meet() {
    let ca = privlink_transport::pki::CertificateAuthority::new("Test Vault CA").expect("CA");
    let foreign = privlink_transport::pki::CertificateAuthority::new("Other CA").expect("CA");
    // `localhost` is a name this machine resolves without help; the relay claims it.
    let vault = vault::https_vault(&ca, "localhost").await;
    let mut spec = endpoint("kv", vault);
    spec.listener = Some("vaults".to_owned());
    spec.server_names = vec!["localhost".to_owned()];
    let listener = listener("vaults", &[("localhost", "kv")]);
    // A second listener that claims another name only: `localhost` is unmatched there.
    let mut other = endpoint("other", vault);
    other.listener = Some("others".to_owned());
    other.server_names = vec!["other.test".to_owned()];
    let others = common::listener("others", &[("other.test", "other")]);
    let harness = Harness::start_with(vec![spec, other], vec![listener, others], None).await;
    let agent =
        harness.spawn_agent(harness.agent_config(TransportChoice::Quic, &[rule_for(vault)]));
    harness.wait_approved("kv").await;
    let port = harness.addr("kv").port();
    let other_port = harness.addr("other").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_file, foreign_file) = (dir.path().join("ca.pem"), dir.path().join("foreign.pem"));
    std::fs::write(&ca_file, &ca.identity.cert_pem).expect("ca");
    std::fs::write(&foreign_file, &foreign.identity.cert_pem).expect("foreign ca");
    let check = |endpoint: &str, ca: &Path, relay: &str| {
        let out = Command::new(BIN)
            .args(["check", "--endpoint", endpoint, "--ca", ca.to_str().expect("utf-8")])
            .args(["--relay", relay, "--json"])
            .output()
            .expect("privlink check");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), report)
    };
    let step = |report: &serde_json::Value, name: &str| {
        report["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["check"] == name).cloned())
            .unwrap_or_else(|| panic!("no {name} step in {report:#}"))
    };
    tokio::task::block_in_place(|| {
        let endpoint = format!("localhost:{port}");
        let (code, report) = check(&endpoint, &ca_file, "127.0.0.1");
        assert_eq!(code, Some(0), "{report:#}");
        let tls = step(&report, "endpoint-tls");
        assert_eq!(tls["outcome"], "pass", "{tls:#}");
        assert!(tls["detail"].as_str().is_some_and(|d| d.contains("chain leads to")), "{tls:#}");

        let (code, report) = check(&endpoint, &ca_file, "127.0.0.2");
        assert_eq!(code, Some(69));
        let dns = step(&report, "endpoint-dns");
        assert!(dns["detail"].as_str().is_some_and(|d| d.contains("not to the relay")), "{dns:#}");

        let (code, report) = check(&endpoint, &foreign_file, "127.0.0.1");
        assert_eq!(code, Some(69));
        let tls = step(&report, "endpoint-tls");
        assert!(tls["detail"].as_str().is_some_and(|d| d.contains("would refuse")), "{tls:#}");
    });
    // A name no endpoint claims, and no name at all: the relay's unrecognized_name, explained.
    tokio::task::block_in_place(|| {
        let (code, report) = check(&format!("localhost:{other_port}"), &ca_file, "127.0.0.1");
        assert_eq!(code, Some(69));
        let tls = step(&report, "endpoint-tls");
        let detail = tls["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("unrecognized_name") && detail.contains("`localhost`"), "{tls:#}");
        let (code, report) = check(&format!("127.0.0.1:{port}"), &ca_file, "127.0.0.1");
        assert_eq!(code, Some(69));
        let tls = step(&report, "endpoint-tls");
        let detail = tls["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("without a server name"), "{tls:#}");
    });
    harness.shutdown(&[agent]).await;
}

/// A reload adds a shared listener (bound at once, its names routed) and removes it again
/// (its port closes), leaving the other listener and its connections alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_shared_listeners() {
    let ca = privlink_transport::pki::CertificateAuthority::new("Test Vault CA").expect("CA");
    let contoso = vault::https_vault(&ca, VAULT).await;
    let fabrikam = vault::https_vault(&ca, OTHER_VAULT).await;
    let mut ca_file = tempfile::NamedTempFile::new().expect("ca file");
    ca_file.write_all(ca.identity.cert_pem.as_bytes()).expect("write ca");
    let on = |listener: &str, name: &str, destination: SocketAddr, vault: &str| {
        let mut spec = endpoint(name, destination);
        spec.listener = Some(listener.to_owned());
        spec.server_names = vec![vault.to_owned()];
        spec
    };
    let first = (
        vec![on("vaults", "contoso", contoso, VAULT)],
        vec![listener("vaults", &[(VAULT, "contoso")])],
    );
    let harness = Harness::start_with(first.0.clone(), first.1.clone(), None).await;
    let allow = [rule_for(contoso), rule_for(fabrikam)];
    let agent = harness.spawn_agent(harness.agent_config(TransportChoice::Quic, &allow));
    harness.wait_approved("contoso").await;
    let vaults = harness.addr("contoso");

    let mut endpoints = first.0.clone();
    endpoints.push(on("more", "fabrikam", fabrikam, OTHER_VAULT));
    let mut listeners = first.1.clone();
    listeners.push(listener("more", &[(OTHER_VAULT, "fabrikam")]));
    let summary = harness.relay.reload(harness.config_with(endpoints, listeners)).expect("reload");
    assert_eq!(summary.listeners_added, ["more"]);
    harness.wait_approved("fabrikam").await;
    let more = harness.addr("fabrikam");
    assert_ne!(more.port(), vaults.port(), "a port of its own");
    tokio::task::block_in_place(|| {
        let (code, body, stderr) = curl(more.port(), ca_file.path(), OTHER_VAULT);
        assert_eq!((code, body.as_str()), (0, OTHER_VAULT), "{stderr}");
        let (code, body, _) = curl(vaults.port(), ca_file.path(), VAULT);
        assert_eq!((code, body.as_str()), (0, VAULT), "the first listener is untouched");
    });

    let summary = harness.relay.reload(harness.config_with(first.0, first.1)).expect("reload");
    assert_eq!(summary.listeners_removed, ["more"]);
    // Its accept loop ends as soon as it is polled again: wait until the port refuses.
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(more).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the removed listener's port stays open");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::task::block_in_place(|| {
        let (code, body, _) = curl(vaults.port(), ca_file.path(), VAULT);
        assert_eq!((code, body.as_str()), (0, VAULT));
    });
    harness.shutdown(&[agent]).await;
}
