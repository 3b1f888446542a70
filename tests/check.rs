//! `privlink check` in the namespace test bed: the relay in `cloud`, the check (where an agent
//! would run) and the vault-like TLS destinations in `vnet`, whose own hosts file plays the
//! private DNS zone. Covered: a private answer passes with times and the certificate; a
//! Private Link name answered with a public (documentation, unrouted) address warns about the
//! unlinked zone; nothing listening, a certificate for another name, and one expiring soon are
//! flagged; a refused token fails the relay steps; UDP dropped fails QUIC with the reason while
//! TLS over TCP passes. Exit codes: 0 with warnings, 69 with a failure.
//!
//! Needs root, iproute2 and nftables (`.ci/run` installs them); where namespaces cannot be
//! made, each test fails naming why, or skips loudly with `PRIVLINK_SKIP_NETNS=1`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{AdminProbe, Running, TunnelConfigs};
use privlink_testbed::netns::{drop_outbound_udp, skip_notice};
use privlink_testbed::{Link, Topology};
use privlink_transport::pki::CertificateAuthority;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Addresses inside the namespaces this test creates (nothing outside them is contacted).
const CLOUD_ADDR: &str = "10.232.0.1";
const VNET_ADDR: &str = "10.232.0.2";
/// A documentation address (RFC 5737) that nothing routes: `vnet` has no route to it.
const PUBLIC_ADDR: &str = "203.0.113.5";

const ADMIN: (std::net::SocketAddr, std::net::SocketAddr) = (
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090),
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9091),
);

/// The vault-like destinations in `vnet`: port → (certificate names, validity).
const VAULTS: [(u16, &str, u64); 3] = [
    // kv1: the right name, valid for 400 days.
    (9443, "kv1.vault.azure.net", 400),
    // kv2: a certificate for another vault.
    (9444, "other.vault.azure.net", 400),
    // kv3: the right name, expiring in 10 days.
    (9445, "kv3.vault.azure.net", 10),
];

const HOSTS: &str = "10.232.0.2 kv1.privatelink.vaultcore.azure.net\n\
                     10.232.0.2 kv2.privatelink.vaultcore.azure.net\n\
                     10.232.0.2 kv3.privatelink.vaultcore.azure.net\n\
                     203.0.113.5 kv4.privatelink.vaultcore.azure.net";

/// The relay in `cloud` (endpoint `kv1` → kv1's Private Link name), the vaults in `vnet`.
struct CheckBed {
    topology: Topology,
    configs: TunnelConfigs,
    dir: tempfile::TempDir,
    _relay: Running,
    vaults_stop: CancellationToken,
}

impl CheckBed {
    fn start(tag: &str, agent_extra: &str) -> Option<Self> {
        let links = [Link::veth(0, 1, CLOUD_ADDR, VNET_ADDR)];
        let mut topology = Topology::create(tag, &["cloud", "vnet"], &links)
            .map_err(|reason| skip_notice(&reason))
            .ok()?;
        topology.set_hosts(1, HOSTS);
        let dir = tempfile::tempdir().expect("tempdir");
        let configs = common::write_tunnel_files(
            dir.path(),
            &common::TunnelFiles {
                tunnel_listen: &format!("{CLOUD_ADDR}:7443"),
                endpoint: "kv1",
                endpoint_listen: "127.0.0.1:8443",
                destination: "kv1.privatelink.vaultcore.azure.net:9443",
                endpoint_extra: "",
                agent_extra,
                allow: "*.privatelink.vaultcore.azure.net:9443",
                admin: ADMIN,
            },
        );
        let (cloud, vnet) = (topology.ns(0), topology.ns(1));
        let vaults_stop = CancellationToken::new();
        start_vaults(vnet, vaults_stop.clone());
        let relay = Running::spawn(topology.exec(
            cloud,
            common::BIN,
            &["relay", "--config", &configs.relay],
        ));
        AdminProbe::new(Some(cloud), configs.relay_admin).wait_ready();
        Some(Self { topology, configs, dir, _relay: relay, vaults_stop })
    }

    /// Runs `privlink check --json` in `vnet` with `agent_config`: exit code and report.
    fn check(&self, agent_config: &str, destinations: &[&str]) -> (i32, Value) {
        let mut args = vec!["check", "--config", agent_config, "--json"];
        for destination in destinations {
            args.extend(["--destination", destination]);
        }
        let (code, stdout, stderr) = self.run_check(&args);
        let report: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {stdout}\n{stderr}"));
        (code, report)
    }

    fn run_check(&self, args: &[&str]) -> (i32, String, String) {
        let out = self
            .topology
            .exec(self.topology.ns(1), common::BIN, args)
            .output()
            .expect("run privlink check");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for CheckBed {
    fn drop(&mut self) {
        self.vaults_stop.cancel();
    }
}

/// Serves the [`VAULTS`] on `vnet`'s address, each with a certificate from one test CA: a TLS
/// handshake, then the connection is held until the client closes it. Returns once every
/// listener is bound.
fn start_vaults(vnet: &str, stop: CancellationToken) {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let _server = privlink_testbed::netns::spawn_in_namespace(vnet, move || async move {
        let ca = CertificateAuthority::new("Test Vault CA").expect("CA");
        let mut listeners = Vec::new();
        for (port, name, days) in VAULTS {
            let issued = ca
                .issue_server_valid_for(&[name], Duration::from_secs(days * 86_400))
                .expect("certificate");
            let config = rustls::ServerConfig::builder_with_provider(
                privlink_transport::crypto::default_provider(),
            )
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![issued.cert_der], issued.key_der)
            .expect("server config");
            let listener =
                tokio::net::TcpListener::bind((VNET_ADDR, port)).await.expect("bind vault");
            listeners.push((listener, tokio_rustls::TlsAcceptor::from(Arc::new(config))));
        }
        bound_tx.send(()).expect("signal bound");
        let tasks = tokio_util::task::TaskTracker::new();
        for (listener, acceptor) in listeners {
            let stop = stop.clone();
            tasks.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        accepted = listener.accept() => accepted,
                        () = stop.cancelled() => return,
                    };
                    let Ok((socket, _)) = accepted else { continue };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(mut tls) = acceptor.accept(socket).await {
                            let mut sink = [0u8; 512];
                            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut sink).await;
                        }
                    });
                }
            });
        }
        tasks.close();
        tasks.wait().await;
    });
    bound_rx.recv_timeout(Duration::from_secs(30)).expect("vaults bound");
}

/// The steps of `check` whose subject contains `subject`.
fn steps<'a>(report: &'a Value, check: &str, subject: &str) -> Vec<&'a Value> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| {
            s["check"] == check && s["subject"].as_str().is_some_and(|t| t.contains(subject))
        })
        .collect()
}

/// The one step of `check` about `subject`.
fn step<'a>(report: &'a Value, check: &str, subject: &str) -> &'a Value {
    let found = steps(report, check, subject);
    assert_eq!(found.len(), 1, "one {check} step for {subject}: {report:#}");
    found[0]
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn check_passes_on_private_answers_and_fails_a_refused_token() {
    let Some(bed) = CheckBed::start("ck", "quic_fallback_after = \"2s\"") else { return };
    let (code, report) = bed.check(&bed.configs.agent, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["outcome"], "pass", "{report:#}");
    assert_eq!(step(&report, "config", "agent.toml")["outcome"], "pass");
    for transport in ["relay-quic", "relay-tcp"] {
        let relay = step(&report, transport, CLOUD_ADDR);
        assert_eq!(relay["outcome"], "pass", "{relay:#}");
        assert!(relay["millis"].as_f64().is_some_and(|ms| ms > 0.0), "{relay:#}");
        assert_eq!(relay["endpoints"][0]["name"], "kv1", "{relay:#}");
    }
    let allowed = step(&report, "allowlist", "endpoint kv1");
    assert_eq!(allowed["outcome"], "pass", "{allowed:#}");
    let dns = step(&report, "destination-dns", "kv1.privatelink");
    assert_eq!(dns["outcome"], "pass", "{dns:#}");
    assert_eq!(dns["addresses"][0]["address"], VNET_ADDR);
    assert_eq!(dns["addresses"][0]["private"], true);
    let tcp = step(&report, "destination-tcp", "kv1.privatelink");
    assert_eq!(tcp["outcome"], "pass", "{tcp:#}");
    let tls = step(&report, "destination-tls", "kv1.privatelink");
    assert_eq!(tls["outcome"], "pass", "{tls:#}");
    let certificate = &tls["certificate"];
    assert_eq!(certificate["server_name"], "kv1.vault.azure.net", "the client's SNI");
    assert_eq!(certificate["name_matches"], true);
    assert_eq!(certificate["issuer"], "CN=Test Vault CA");
    let days = certificate["days_left"].as_i64().expect("days");
    assert!((398..=400).contains(&days), "days left: {days}");

    // The text form: one line per step, each with its time.
    let (code, text, _) = bed.run_check(&["check", "--config", &bed.configs.agent]);
    assert_eq!(code, 0, "{text}");
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("PASS")).collect();
    assert!(lines.len() >= 7, "{text}");
    assert!(lines.iter().all(|l| l.contains(" ms ")), "{text}");

    // The relay keeps no agent from the check: its sessions ended at the welcome.
    let relay_admin = AdminProbe::new(Some(bed.topology.ns(0)), bed.configs.relay_admin);
    relay_admin.wait_relay_status(|status| status.agents.is_empty());

    // A token the relay does not know: both relay steps fail with the relay's reason.
    let bad_token = bed.dir.path().join("certs/other-token");
    std::fs::write(&bad_token, format!("plk_test_{:032x}", 7u128)).expect("token");
    let text = std::fs::read_to_string(&bed.configs.agent).expect("agent.toml");
    let bad = bed.dir.path().join("agent-bad-token.toml");
    std::fs::write(&bad, text.replace("certs/token", "certs/other-token")).expect("write");
    let (code, report) = bed.check(bad.to_str().expect("utf-8"), &[]);
    assert_eq!(code, 69, "{report:#}");
    for transport in ["relay-quic", "relay-tcp"] {
        let relay = step(&report, transport, CLOUD_ADDR);
        assert_eq!(relay["outcome"], "fail", "{relay:#}");
        assert!(relay["detail"].as_str().is_some_and(|d| d.contains("refused")), "{relay:#}");
    }

    // A relay_ca that did not sign the relay's certificate: both fail, saying whose it is.
    let other = bed.dir.path().join("other-ca");
    let made = std::process::Command::new(common::BIN)
        .args(["certs", "init", "--dir", other.to_str().expect("utf-8")])
        .output()
        .expect("certs init");
    assert!(made.status.success());
    let untrusting = bed.dir.path().join("agent-other-ca.toml");
    std::fs::write(&untrusting, text.replace("certs/ca.crt", "other-ca/ca.crt")).expect("write");
    let (code, report) = bed.check(untrusting.to_str().expect("utf-8"), &[]);
    assert_eq!(code, 69, "{report:#}");
    for transport in ["relay-quic", "relay-tcp"] {
        let relay = step(&report, transport, CLOUD_ADDR);
        assert_eq!(relay["outcome"], "fail", "{relay:#}");
        let detail = relay["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("certificate is not trusted") && detail.contains("other-ca"),
            "{detail}"
        );
    }
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn check_flags_a_public_answer_nothing_listening_a_wrong_name_and_an_expiring_certificate() {
    let Some(bed) = CheckBed::start("cf", "quic_fallback_after = \"2s\"") else { return };

    // Expiring soon is a warning: exit 0.
    let (code, report) =
        bed.check(&bed.configs.agent, &["kv3.privatelink.vaultcore.azure.net:9445"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["outcome"], "warn", "{report:#}");
    let tls = step(&report, "destination-tls", "kv3.privatelink");
    assert_eq!(tls["outcome"], "warn", "{tls:#}");
    assert_eq!(tls["certificate"]["name_matches"], true);
    let warning = tls["warnings"][0].as_str().expect("warning");
    assert!(
        warning.contains("expires in 9 days") || warning.contains("expires in 10 days"),
        "{warning}"
    );
    // Not in the allowlist (port 9445): said, not fatal.
    assert_eq!(step(&report, "allowlist", "kv3.privatelink")["outcome"], "warn");

    let (code, report) = bed.check(
        &bed.configs.agent,
        &[
            "kv4.privatelink.vaultcore.azure.net:9443",
            "kv1.privatelink.vaultcore.azure.net:9999",
            "kv2.privatelink.vaultcore.azure.net:9444",
        ],
    );
    assert_eq!(code, 69, "{report:#}");
    assert_eq!(report["outcome"], "fail");
    let (_, text, _) = bed.run_check(&[
        "check",
        "--config",
        &bed.configs.agent,
        "--destination",
        "kv4.privatelink.vaultcore.azure.net:9443",
        "--destination",
        "kv2.privatelink.vaultcore.azure.net:9444",
    ]);
    eprintln!("{text}");

    // The Private Link name answered with a public address: the unlinked-zone warning.
    let dns = step(&report, "destination-dns", "kv4.privatelink");
    assert_eq!(dns["outcome"], "warn", "{dns:#}");
    assert_eq!(dns["addresses"][0]["address"], PUBLIC_ADDR);
    assert_eq!(dns["addresses"][0]["private"], false);
    let warning = dns["warnings"][0].as_str().expect("warning");
    assert!(warning.contains("privatelink.vaultcore.azure.net"), "{warning}");
    assert!(warning.contains("not a private address"), "{warning}");
    assert_eq!(step(&report, "destination-tcp", "kv4.privatelink")["outcome"], "fail");

    // Nothing listening.
    let refused = step(&report, "destination-tcp", "kv1.privatelink.vaultcore.azure.net:9999");
    assert_eq!(refused["outcome"], "fail", "{refused:#}");
    assert!(refused["detail"].as_str().is_some_and(|d| d.contains("refused")), "{refused:#}");
    assert!(steps(&report, "destination-tls", ":9999").is_empty(), "no TLS step without TCP");

    // A certificate for another name.
    let tls = step(&report, "destination-tls", "kv2.privatelink");
    assert_eq!(tls["outcome"], "fail", "{tls:#}");
    assert_eq!(tls["certificate"]["name_matches"], false);
    assert_eq!(tls["certificate"]["names"][0], "other.vault.azure.net");
    assert!(
        tls["detail"].as_str().is_some_and(|d| d.contains("NOT valid for `kv2.vault.azure.net`")),
        "{tls:#}"
    );

    // A plain TCP service: --no-tls connects and stops there.
    let (code, plain, _) = bed.run_check(&[
        "check",
        "--config",
        &bed.configs.agent,
        "--json",
        "--no-tls",
        "--destination",
        "kv2.privatelink.vaultcore.azure.net:9444",
    ]);
    let plain: Value = serde_json::from_str(&plain).expect("JSON");
    assert_eq!(code, 0, "the wrong name is not looked at without TLS: {plain:#}");
    assert_eq!(step(&plain, "destination-tcp", "kv2.privatelink")["outcome"], "pass");
    assert!(steps(&plain, "destination-tls", "").is_empty(), "{plain:#}");

    // The configured endpoint's destination was still checked, and passed.
    assert_eq!(
        step(&report, "destination-tls", "kv1.privatelink.vaultcore.azure.net:9443")["outcome"],
        "pass"
    );
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn check_with_udp_dropped_fails_quic_with_the_reason_and_passes_tcp() {
    let Some(bed) = CheckBed::start("cu", "quic_fallback_after = \"1s\"") else { return };
    drop_outbound_udp(bed.topology.ns(1));

    // transport = "auto": the agent would fall back, so QUIC's failure is a warning.
    let (code, report) = bed.check(&bed.configs.agent, &[]);
    assert_eq!(code, 0, "{report:#}");
    let quic = step(&report, "relay-quic", CLOUD_ADDR);
    assert_eq!(quic["outcome"], "warn", "{quic:#}");
    assert_eq!(quic["detail"], "failed");
    let reason = quic["warnings"][0].as_str().expect("reason");
    assert!(reason.contains("no QUIC handshake within 1s") && reason.contains("UDP"), "{reason}");
    assert!(reason.contains("falls back to TLS over TCP"), "{reason}");
    let tcp = step(&report, "relay-tcp", CLOUD_ADDR);
    assert_eq!(tcp["outcome"], "pass", "{tcp:#}");
    assert_eq!(tcp["endpoints"][0]["name"], "kv1");
    // The destinations still come from the relay (over TCP).
    assert_eq!(step(&report, "destination-tls", "kv1.privatelink")["outcome"], "pass");

    // transport = "quic": nothing to fall back to, so the check fails.
    let text = std::fs::read_to_string(&bed.configs.agent).expect("agent.toml");
    let quic_only = bed.dir.path().join("agent-quic.toml");
    std::fs::write(&quic_only, format!("transport = \"quic\"\n{text}")).expect("write");
    let (code, report) = bed.check(quic_only.to_str().expect("utf-8"), &[]);
    assert_eq!(code, 69, "{report:#}");
    let quic = step(&report, "relay-quic", CLOUD_ADDR);
    assert_eq!(quic["outcome"], "fail", "{quic:#}");
    assert!(quic["detail"].as_str().is_some_and(|d| d.contains("UDP")), "{quic:#}");
    let tcp = step(&report, "relay-tcp", CLOUD_ADDR);
    assert!(tcp["detail"].as_str().is_some_and(|d| d.contains("not used")), "{tcp:#}");
}
