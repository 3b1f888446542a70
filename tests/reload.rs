//! Hot reload of a running relay process (SIGHUP, or the file changing): an ACL change
//! applies to new connections while a long transfer on the endpoint completes intact;
//! endpoints added and removed — the agent told, its verdict on the new one shown, the removed
//! one's open connection going on; an invalid file and a change that needs a restart leave
//! the running configuration serving and say so in `privlink_config_last_reload_successful`;
//! a change written to the file, or to the certificate, key or token file it names, is picked
//! up without a signal; a token rotation with two
//! hashes, then the old one removed, disconnects the old token's agent while the new one's
//! keeps serving.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use privlink_testbed::load;
use privlink_testbed::process::{TunnelConfigs, approved_by, free_fixed_port, write_tunnel_files};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A relay and an agent on loopback in front of the load tool's backend, both ready.
struct Running2 {
    configs: TunnelConfigs,
    relay: Running,
    relay_admin: AdminProbe,
    agent: Running,
    endpoint: SocketAddr,
    _dir: tempfile::TempDir,
    stop_backend: tokio_util::sync::CancellationToken,
}

impl Running2 {
    async fn start() -> Self {
        Self::start_with("").await
    }

    /// With `endpoint_extra` after endpoint `e` in relay.toml (more endpoints, say).
    async fn start_with(endpoint_extra: &str) -> Self {
        let (destination, stop_backend, _) = load_backend().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = loopback(free_fixed_port());
        let configs = write_tunnel_files(
            common::BIN,
            dir.path(),
            &TunnelFiles {
                tunnel_listen: &loopback(free_fixed_port()).to_string(),
                endpoint: "e",
                endpoint_listen: &endpoint.to_string(),
                destination: &destination,
                endpoint_extra: &endpoint_extra.replace("DESTINATION", &destination),
                agent_extra: "transport = \"quic\"",
                allow: &destination,
                admin: (loopback(free_fixed_port()), loopback(free_fixed_port())),
            },
        );
        let relay = common::privlink(&["relay", "--config", &configs.relay]);
        let relay_admin = AdminProbe::new(None, configs.relay_admin);
        let agent = common::privlink(&["agent", "--config", &configs.agent]);
        let running =
            Self { configs, relay, relay_admin, agent, endpoint, _dir: dir, stop_backend };
        tokio::task::block_in_place(|| running.wait_agent_served(running.configs.agent_admin));
        running
    }

    /// Waits until the agent whose admin listener is `admin` is approved on the relay.
    fn wait_agent_served(&self, admin: SocketAddr) {
        let agent_admin = AdminProbe::new(None, admin);
        agent_admin.wait_ready();
        let id = agent_admin.agent_status().id;
        self.relay_admin.wait_relay_status(|s| approved_by(s, &id, "e"));
    }

    fn relay_config(&self) -> String {
        std::fs::read_to_string(&self.configs.relay).expect("relay.toml")
    }

    /// Writes a new relay.toml (a rename over the old one, as editors and ConfigMaps do).
    fn write_relay_config(&self, text: &str) {
        let staged = format!("{}.new", self.configs.relay);
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, &self.configs.relay).expect("rename");
    }

    fn sighup(&self) {
        signal(self.relay.pid(), "-HUP");
    }

    /// `privlink_config_last_reload_successful` and the success timestamp, from `/metrics`.
    fn reload_metrics(&self) -> (i64, i64) {
        let (_, text) = self.relay_admin.get("/metrics");
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<i64>().ok())
                .unwrap_or_else(|| panic!("{name} in /metrics:\n{text}"))
        };
        (
            value("privlink_config_last_reload_successful "),
            value("privlink_config_last_reload_success_timestamp_seconds "),
        )
    }

    /// Runs `trigger`, then waits until the relay has ended one more reload with `result`.
    fn reload_and_wait(&self, result: &str, trigger: impl FnOnce()) {
        reload_and_wait(&self.relay_admin, result, trigger);
    }
}

impl Drop for Running2 {
    fn drop(&mut self) {
        self.stop_backend.cancel();
    }
}

/// The (first) endpoint destination written in a relay.toml.
fn destination_in(config: &str) -> String {
    config
        .lines()
        .find_map(|l| l.strip_prefix("destination = \""))
        .and_then(|d| d.strip_suffix('"'))
        .expect("destination")
        .to_owned()
}

/// Runs `trigger`, then waits until the process behind `admin` has ended one more reload with
/// `result` (`applied`, `refused`) and its success gauge agrees.
fn reload_and_wait(admin: &AdminProbe, result: &str, trigger: impl FnOnce()) {
    let before = count_of(&admin.get("/metrics").1, result);
    trigger();
    let gauge = if result == "applied" { "1" } else { "0" };
    admin.wait("/metrics", |code, text| {
        code == 200
            && count_of(text, result) > before
            && text.lines().any(|l| {
                l.strip_prefix("privlink_config_last_reload_successful ")
                    .is_some_and(|v| v.trim() == gauge)
            })
    });
}

fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill").args([which, &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill {which} {pid}");
}

/// `privlink_config_reloads_total{result}` in a scrape.
fn count_of(metrics: &str, result: &str) -> u64 {
    let prefix = format!("privlink_config_reloads_total{{result=\"{result}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0)
}

/// Whether a new client gets an echo through `endpoint`.
async fn served(endpoint: SocketAddr) -> bool {
    let attempt = async {
        let mut conn = TcpStream::connect(endpoint).await?;
        conn.write_all(&[load::ECHO, 7]).await?;
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).await?;
        Ok::<_, std::io::Error>(byte[0] == 7)
    };
    matches!(tokio::time::timeout(WAIT, attempt).await, Ok(Ok(true)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_change_applies_to_new_connections_and_spares_a_transfer_under_way() {
    const TRANSFER: u64 = 256 << 20;
    const PACE: Duration = Duration::from_millis(30);
    let running = Running2::start().await;
    let endpoint = running.endpoint;
    let original = running.relay_config();
    assert_eq!(tokio::task::block_in_place(|| running.reload_metrics()).0, 1);

    // 256 MiB up, paced so that it spans the reloads.
    let transfer = tokio::spawn(paced_upload(endpoint, TRANSFER, 4 << 20, PACE));

    // SIGHUP with an ACL that denies loopback: new clients are refused at once.
    let denying = format!("{original}\n[endpoint.acl]\ndeny = [\"127.0.0.0/8\"]\n");
    tokio::task::block_in_place(|| {
        running.reload_and_wait("applied", || {
            running.write_relay_config(&denying);
            running.sighup();
        });
    });
    assert!(is_refused(TcpStream::connect(endpoint).await).await, "the new ACL applies");

    // A file that does not parse: refused, the metric says so, the running ACL stays.
    tokio::task::block_in_place(|| {
        running.reload_and_wait("refused", || {
            running.write_relay_config(&format!("{denying}\nthis is not toml ["));
            running.sighup();
        });
    });
    assert!(is_refused(TcpStream::connect(endpoint).await).await, "still the last good ACL");

    // A change that needs a restart (the endpoint's destination), beside an ACL change:
    // refused as a whole.
    let destination = destination_in(&original);
    let moved = original.replace(&destination, "127.0.0.1:9");
    tokio::task::block_in_place(|| {
        running.reload_and_wait("refused", || {
            running.write_relay_config(&moved);
            running.sighup();
        });
    });
    assert!(is_refused(TcpStream::connect(endpoint).await).await, "nothing of it applied");

    // The original, written to the file without a signal: picked up by the watch.
    tokio::task::block_in_place(|| {
        running.reload_and_wait("applied", || running.write_relay_config(&original));
    });
    assert!(served(endpoint).await, "open again after the file changed");

    let transfer = transfer.await.expect("join");
    transfer.unwrap_or_else(|e| panic!("the transfer under way was cut: {e}"));
    assert!(served(endpoint).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotation_keeps_the_new_agent_and_disconnects_the_old_one() {
    let running = Running2::start().await;
    let old_token = std::fs::read_to_string(
        std::path::Path::new(&running.configs.agent).parent().expect("dir").join("certs/token"),
    )
    .expect("token");
    let old_digest =
        privlink_protocol::token::TokenDigest::of(old_token.trim().as_bytes()).to_hex();
    let new_token = "plk_rotated_token_for_the_test";
    let new_digest = privlink_protocol::token::TokenDigest::of(new_token.as_bytes()).to_hex();
    let original = running.relay_config();

    // Step 1: the connector holds both hashes.
    let both = original.replace(
        &format!("token_sha256 = \"{old_digest}\""),
        &format!("token_sha256 = [\"{old_digest}\", \"{new_digest}\"]"),
    );
    assert_ne!(both, original);
    tokio::task::block_in_place(|| {
        running.reload_and_wait("applied", || {
            running.write_relay_config(&both);
            running.sighup();
        });
    });

    // Step 2: a second agent with the new token joins (in a rotation: each agent in turn).
    let dir = std::path::Path::new(&running.configs.agent).parent().expect("dir");
    std::fs::write(dir.join("certs/new-token"), new_token).expect("token");
    let new_admin = loopback(free_fixed_port());
    let new_config = std::fs::read_to_string(&running.configs.agent)
        .expect("agent.toml")
        .replace("certs/token", "certs/new-token")
        .replace(&running.configs.agent_admin.to_string(), &new_admin.to_string());
    let new_path = dir.join("agent-new.toml");
    std::fs::write(&new_path, new_config).expect("agent config");
    let _new_agent = common::privlink(&["agent", "--config", new_path.to_str().expect("utf-8")]);
    tokio::task::block_in_place(|| running.wait_agent_served(new_admin));
    let old_id = AdminProbe::new(None, running.configs.agent_admin).agent_status().id;

    // Step 3: the old hash removed: its agent is disconnected, the new one serves on.
    let only_new = original.replace(&old_digest, &new_digest);
    tokio::task::block_in_place(|| {
        running.reload_and_wait("applied", || {
            running.write_relay_config(&only_new);
            running.sighup();
        });
        running
            .relay_admin
            .wait_relay_status(|s| s.agents.len() == 1 && s.agents.iter().all(|a| a.id != old_id));
    });
    for _ in 0..5 {
        assert!(served(running.endpoint).await, "the new token's agent serves");
    }
    // The old agent, re-dialling, is refused for good.
    tokio::task::block_in_place(|| {
        AdminProbe::new(None, running.configs.agent_admin).wait("/readyz", |code, _| code == 503)
    });
    let _ = &running.agent;
}

/// An `[[endpoint]]` table for relay.toml (destination filled in by `start_with`).
fn endpoint_table(name: &str, listen: SocketAddr, extra: &str) -> String {
    format!(
        "\n[[endpoint]]\nname = \"{name}\"\nconnector = \"tunnel\"\ndestination = \"DESTINATION\"\n\
         listen = \"{listen}\"\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_endpoints_and_changes_an_acl_while_a_transfer_runs() {
    const TRANSFER: u64 = 256 << 20;
    const PACE: Duration = Duration::from_millis(30);
    let (old_listen, guarded_listen, new_listen) =
        (loopback(free_fixed_port()), loopback(free_fixed_port()), loopback(free_fixed_port()));
    let before = format!(
        "{}{}",
        endpoint_table("old", old_listen, ""),
        endpoint_table("guarded", guarded_listen, "")
    );
    let running = Running2::start_with(&before).await;
    let endpoint = running.endpoint;
    let original = running.relay_config();
    for listen in [endpoint, old_listen, guarded_listen] {
        assert!(served(listen).await, "{listen} serves before the reload");
    }
    let destination = destination_in(&original);

    // Held open on the endpoint about to go: it keeps working after the reload.
    let mut held = TcpStream::connect(old_listen).await.expect("connect");
    held.write_all(&[load::ECHO, 1]).await.expect("write");
    held.read_exact(&mut [0u8; 1]).await.expect("echo");

    let transfer = tokio::spawn(paced_upload(endpoint, TRANSFER, 4 << 20, PACE));

    // `old` removed, `new` added, `guarded` denies loopback; `e` unchanged.
    let e_only = original
        .split("\n[[endpoint]]\nname = \"old\"")
        .next()
        .expect("the file up to the second endpoint")
        .to_owned();
    let after = format!(
        "{e_only}{}{}",
        endpoint_table("new", new_listen, ""),
        endpoint_table("guarded", guarded_listen, "\n[endpoint.acl]\ndeny = [\"127.0.0.0/8\"]\n")
    )
    .replace("DESTINATION", &destination);
    tokio::task::block_in_place(|| {
        running.reload_and_wait("applied", || {
            running.write_relay_config(&after);
            running.sighup();
        });
        // The agent was told: it judged `new`, and the relay lists it approved; `old` is gone.
        running.relay_admin.wait_relay_status(|s| {
            s.endpoint("new").is_some_and(|e| e.status == "Approved") && s.endpoint("old").is_none()
        });
    });
    assert!(served(new_listen).await, "the added endpoint serves");
    assert!(is_refused(TcpStream::connect(old_listen).await).await, "the removed one takes no one");
    assert!(is_refused(TcpStream::connect(guarded_listen).await).await, "the new ACL applies");
    held.write_all(&[2]).await.expect("write");
    held.read_exact(&mut [0u8; 1]).await.expect("the removed endpoint's open connection goes on");

    let transfer = transfer.await.expect("join");
    transfer.unwrap_or_else(|e| panic!("the transfer under way was cut: {e}"));
}

/// `privlink certs init` into `<config dir>/<name>`: a new CA and relay certificate for
/// 127.0.0.1, which the running agent does not trust.
fn certs_from_another_ca(running: &Running2, name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(&running.configs.agent).parent().expect("dir").join(name);
    let out = std::process::Command::new(common::BIN)
        .args(["certs", "init", "--dir", dir.to_str().expect("utf-8"), "--name", "127.0.0.1"])
        .output()
        .expect("certs init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// A new agent trusting only `<config dir>/<ca>` gets in, over QUIC and over TLS/TCP: new
/// handshakes use the certificate that CA signed.
fn new_agents_trusting(running: &Running2, ca: &str) {
    let dir = std::path::Path::new(&running.configs.agent).parent().expect("dir").to_owned();
    let new_admin = loopback(free_fixed_port());
    let text = std::fs::read_to_string(&running.configs.agent)
        .expect("agent.toml")
        .replace("certs/ca.crt", ca)
        .replace(&running.configs.agent_admin.to_string(), &new_admin.to_string());
    for transport in ["quic", "tcp"] {
        let path = dir.join(format!("agent-{transport}.toml"));
        let text = text.replace("transport = \"quic\"", &format!("transport = \"{transport}\""));
        std::fs::write(&path, text).expect("agent config");
        let agent = common::privlink(&["agent", "--config", path.to_str().expect("utf-8")]);
        running.wait_agent_served(new_admin);
        drop(agent);
        AdminProbe::new(None, new_admin).wait("/healthz", |code, _| code == 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tunnel_certificate_serves_new_handshakes_and_the_live_link_stays() {
    let running = Running2::start().await;
    let agent_id = AdminProbe::new(None, running.configs.agent_admin).agent_status().id;
    certs_from_another_ca(&running, "renewed");
    let new_config = running
        .relay_config()
        .replace("certs/relay.crt", "renewed/relay.crt")
        .replace("certs/relay.key", "renewed/relay.key");
    tokio::task::block_in_place(|| {
        running.reload_and_wait("applied", || {
            running.write_relay_config(&new_config);
            running.sighup();
        });
    });
    // The link made with the old certificate stays and serves.
    let status = tokio::task::block_in_place(|| running.relay_admin.relay_status());
    assert!(approved_by(&status, &agent_id, "e"), "the live link stays: {status:?}");
    assert!(served(running.endpoint).await);
    tokio::task::block_in_place(|| new_agents_trusting(&running, "renewed/ca.crt"));
}

/// A certificate renewed where it lies (cert-manager updating a Secret, certbot's deploy hook)
/// is picked up with no signal and no change to relay.toml.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_in_place_is_picked_up_without_a_signal() {
    let running = Running2::start().await;
    let renewed = certs_from_another_ca(&running, "renewed");
    let certs = renewed.parent().expect("dir").join("certs");
    let config_before = running.relay_config();
    tokio::task::block_in_place(|| {
        running.reload_and_wait("applied", || {
            // One file at a time, as a renewal tool writes them: a watch that reads the new key
            // beside the old certificate refuses that pair and applies the next.
            for file in ["relay.key", "relay.crt"] {
                std::fs::rename(renewed.join(file), certs.join(file)).expect("rename");
            }
        });
    });
    assert_eq!(running.relay_config(), config_before, "relay.toml itself never changed");
    assert!(served(running.endpoint).await, "the live link serves on");
    tokio::task::block_in_place(|| new_agents_trusting(&running, "renewed/ca.crt"));
}

/// The endpoint `e`'s status in the relay's snapshot.
fn status_of_e(status: &privlink_admin::snapshot::RelayStatus) -> String {
    status.endpoint("e").map(|e| e.status.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reloads_its_allowlist_its_relays_and_its_token() {
    let running = Running2::start().await;
    let agent_admin = AdminProbe::new(None, running.configs.agent_admin);
    let agent_config = running.configs.agent.clone();
    let original = std::fs::read_to_string(&agent_config).expect("agent.toml");
    let write_agent = |text: &str| {
        let staged = format!("{agent_config}.new");
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, &agent_config).expect("rename");
    };
    let destination = original
        .lines()
        .find_map(|l| l.strip_prefix("destination = \""))
        .and_then(|d| d.strip_suffix('"'))
        .expect("allow rule")
        .to_owned();

    // The allowlist no longer admits the destination: the relay hears the new verdict.
    let narrowed = original
        .replace(&format!("destination = \"{destination}\""), "destination = \"10.9.9.9:1\"");
    tokio::task::block_in_place(|| {
        reload_and_wait(&agent_admin, "applied", || {
            write_agent(&narrowed);
            signal(running.agent.pid(), "-HUP");
        });
        running.relay_admin.wait_relay_status(|s| status_of_e(s) == "Rejected");
    });
    // Back, picked up from the file alone: approved and serving again.
    tokio::task::block_in_place(|| {
        reload_and_wait(&agent_admin, "applied", || write_agent(&original));
        running.relay_admin.wait_relay_status(|s| status_of_e(s) == "Approved");
    });
    assert!(served(running.endpoint).await);

    // A second relay: the agent links to it when it is added to `relays`…
    let relay_text = running.relay_config();
    let (tunnel2, endpoint2, admin2) =
        (loopback(free_fixed_port()), loopback(free_fixed_port()), loopback(free_fixed_port()));
    let tunnel1 = original
        .lines()
        .find_map(|l| l.strip_prefix("relays = [\""))
        .and_then(|r| r.strip_suffix("\"]"))
        .expect("relays")
        .to_owned();
    let second = relay_text
        .replace(&tunnel1, &tunnel2.to_string())
        .replace(&running.endpoint.to_string(), &endpoint2.to_string())
        .replace(&running.configs.relay_admin.to_string(), &admin2.to_string());
    let dir = std::path::Path::new(&agent_config).parent().expect("dir").to_owned();
    let second_path = dir.join("relay-2.toml");
    std::fs::write(&second_path, second).expect("relay-2.toml");
    let relay2 = common::privlink(&["relay", "--config", second_path.to_str().expect("utf-8")]);
    let relay2_admin = AdminProbe::new(None, admin2);
    let both = original.replace(
        &format!("relays = [\"{tunnel1}\"]"),
        &format!("relays = [\"{tunnel1}\", \"{tunnel2}\"]"),
    );
    tokio::task::block_in_place(|| {
        relay2_admin.wait_ready();
        reload_and_wait(&agent_admin, "applied", || write_agent(&both));
        relay2_admin.wait_relay_status(|s| status_of_e(s) == "Approved");
    });
    assert!(served(endpoint2).await, "the added relay serves");
    // …and drains its link to the one removed from it.
    let only_second = original
        .replace(&format!("relays = [\"{tunnel1}\"]"), &format!("relays = [\"{tunnel2}\"]"));
    tokio::task::block_in_place(|| {
        reload_and_wait(&agent_admin, "applied", || write_agent(&only_second));
        running.relay_admin.wait_relay_status(|s| status_of_e(s) == "Disconnected");
    });
    assert!(served(endpoint2).await, "the remaining relay serves on");

    // A change that needs a restart is refused whole: the agent keeps running as it was.
    tokio::task::block_in_place(|| {
        reload_and_wait(&agent_admin, "refused", || {
            write_agent(&only_second.replace("transport = \"quic\"", "transport = \"tcp\""));
        });
        reload_and_wait(&agent_admin, "applied", || write_agent(&only_second));
    });
    assert!(served(endpoint2).await);

    // The token, read again from its file on reload, is what the next hello presents: the
    // relay's rotation (both hashes, then only the new one) keeps the agent.
    let token_path = dir.join("certs/token");
    let old_token = std::fs::read_to_string(&token_path).expect("token");
    let digest = |t: &str| privlink_protocol::token::TokenDigest::of(t.trim().as_bytes()).to_hex();
    let new_token = "plk_reloaded_by_the_agent";
    let relay2_text = std::fs::read_to_string(&second_path).expect("relay-2.toml");
    let old_line = format!("token_sha256 = \"{}\"", digest(&old_token));
    let write_relay2 = |text: &str| {
        let staged = second_path.with_extension("new");
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, &second_path).expect("rename");
    };
    tokio::task::block_in_place(|| {
        reload_and_wait(&relay2_admin, "applied", || {
            write_relay2(&relay2_text.replace(
                &old_line,
                &format!("token_sha256 = [\"{}\", \"{}\"]", digest(&old_token), digest(new_token)),
            ));
        });
        // No signal: the agent watches token_file as it watches its config file.
        reload_and_wait(&agent_admin, "applied", || {
            std::fs::write(&token_path, new_token).expect("token");
        });
        reload_and_wait(&relay2_admin, "applied", || {
            write_relay2(
                &relay2_text
                    .replace(&old_line, &format!("token_sha256 = \"{}\"", digest(new_token))),
            );
            signal(relay2.pid(), "-HUP");
        });
    });
    // Disconnected for the old token, back at once with the new one.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !served(endpoint2).await {
        assert!(tokio::time::Instant::now() < deadline, "the agent did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = tokio::task::block_in_place(|| relay2_admin.get("/metrics"));
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("privlink_relay_auth_failures_total{reason=\"wrong_token\"}")),
        "the agent never presented a token the relay had stopped accepting"
    );
}
