//! Tests of the real `privlink` binary as separate processes: the example configs in config/
//! run as shipped (with ports and secrets filled in), the agent survives being killed and
//! restarted, the agent reconnects on its own when the relay is killed and restarted,
//! invalid configurations exit 64 naming file, line and key, and the README's first command,
//! `privlink demo`, does what it prints.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, Running, echo_round_trip, echo_server};
use privlink_admin::snapshot::{StatusSnapshot, VerdictView};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run privlink");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sets `key` in `table` of a TOML text (`""` for the top level, `[tunnel]`, the first
/// `[[endpoint]]`, …) to `value`, whatever it was: the example configs stay what they are while
/// the tests point them at their own ports and secrets, and an operator's edits to the values
/// (the operator guide's walkthrough, say) change nothing here. The line must exist.
fn set_key(text: &str, table: &str, key: &str, value: &str) -> String {
    let mut current = String::new();
    let mut seen_table = false;
    let mut done = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            current = trimmed.split('#').next().unwrap_or("").trim().to_owned();
            if current == table {
                if seen_table {
                    current.clear(); // only the first table of an array
                }
                seen_table = true;
            }
        }
        let is_key =
            trimmed.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='));
        if !done && current == table && is_key {
            out.push(format!("{key} = {value}"));
            done = true;
        } else {
            out.push(line.to_owned());
        }
    }
    assert!(done, "no `{key}` in {table:?} of the example config");
    out.join("\n") + "\n"
}

/// The shipped example configs.
fn example_configs() -> (String, String) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| {
        std::fs::read_to_string(manifest.join("config").join(name)).expect("example config")
    };
    (read("relay.toml"), read("agent.toml"))
}

/// Lays out a deployment in `dir` from the shipped example configs: certs from
/// `privlink certs init`, a token from `privlink token new --out`, and loopback ports.
fn deploy(dir: &Path, destination: SocketAddr) -> Deployment {
    let (relay, agent) = example_configs();
    deploy_from(dir, destination, &relay, &agent)
}

/// What [`deploy`] laid out.
struct Deployment {
    relay_cfg: PathBuf,
    agent_cfg: PathBuf,
    /// The endpoint's address.
    endpoint: SocketAddr,
    /// The relay's admin listener.
    admin: SocketAddr,
    /// The agent's admin listener.
    agent_admin: SocketAddr,
}

/// [`deploy`] from the given config texts.
fn deploy_from(dir: &Path, destination: SocketAddr, relay: &str, agent: &str) -> Deployment {
    let certs = dir.join("certs");
    let (code, _, err) = run(&["certs", "init", "--dir", certs.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "certs init: {err}");
    let token_file = certs.join("token");
    let (code, out, err) = run(&["token", "new", "--out", token_file.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "token new: {err}");
    let hash = out.trim().strip_prefix("token_sha256 = ").expect("the hash line, alone");

    let tunnel = format!("\"127.0.0.1:{}\"", privlink_testbed::process::free_fixed_port());
    let endpoint: SocketAddr =
        format!("127.0.0.1:{}", privlink_testbed::process::free_fixed_port())
            .parse()
            .expect("addr");
    let quoted = |p: &Path| format!("\"{}\"", p.display());
    let destination = format!("\"{destination}\"");
    let mut relay = set_key(relay, "[tunnel]", "listen", &tunnel);
    relay = set_key(&relay, "[tunnel]", "cert", &quoted(&certs.join("relay.crt")));
    relay = set_key(&relay, "[tunnel]", "key", &quoted(&certs.join("relay.key")));
    relay = set_key(&relay, "[[connector]]", "token_sha256", hash);
    relay = set_key(&relay, "[[endpoint]]", "destination", &destination);
    relay = set_key(&relay, "[[endpoint]]", "listen", &format!("\"{endpoint}\""));
    relay = set_key(&relay, "[endpoint.acl]", "allow", "[]");
    relay = set_key(&relay, "[endpoint.acl]", "deny", "[]");
    let admin: SocketAddr = format!("127.0.0.1:{}", privlink_testbed::process::free_fixed_port())
        .parse()
        .expect("addr");
    relay = set_key(&relay, "[admin]", "listen", &format!("\"{admin}\""));
    let mut agent = set_key(agent, "", "token_file", &quoted(&token_file));
    agent = set_key(&agent, "", "relays", &format!("[{tunnel}]"));
    agent = set_key(&agent, "", "relay_ca", &quoted(&certs.join("ca.crt")));
    agent = set_key(&agent, "[[allow]]", "destination", &destination);
    let agent_admin: SocketAddr =
        format!("127.0.0.1:{}", privlink_testbed::process::free_fixed_port())
            .parse()
            .expect("addr");
    agent = set_key(&agent, "[admin]", "listen", &format!("\"{agent_admin}\""));

    let config = dir.join("config");
    std::fs::create_dir_all(&config).expect("config dir");
    let relay_path = config.join("relay.toml");
    let agent_path = config.join("agent.toml");
    std::fs::write(&relay_path, relay).expect("write relay.toml");
    std::fs::write(&agent_path, agent).expect("write agent.toml");
    Deployment { relay_cfg: relay_path, agent_cfg: agent_path, endpoint, admin, agent_admin }
}

async fn assert_endpoint_serves(endpoint: SocketAddr) {
    let socket = TcpStream::connect(endpoint).await.expect("connect endpoint");
    let back = tokio::time::timeout(common::WAIT, echo_round_trip(socket, b"through the tunnel"))
        .await
        .expect("echo in time");
    assert_eq!(back, b"through the tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_configs_run_and_survive_agent_and_relay_restarts_auto() {
    survive_restarts("auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_configs_run_and_survive_agent_and_relay_restarts_tcp() {
    survive_restarts("tcp").await;
}

/// The shipped configs with `transport` set as given (`auto` lands on QUIC here).
async fn survive_restarts(transport: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let destination = echo_server().await;
    let Deployment { relay_cfg, agent_cfg, endpoint, admin, agent_admin } =
        deploy(dir.path(), destination);
    let agent_text = std::fs::read_to_string(&agent_cfg).expect("agent.toml");
    let agent_text = set_key(&agent_text, "", "transport", &format!("\"{transport}\""));
    std::fs::write(&agent_cfg, agent_text).expect("agent.toml");
    let relay_args = ["relay", "--config", relay_cfg.to_str().expect("utf-8")];
    let agent_args = ["agent", "--config", agent_cfg.to_str().expect("utf-8")];

    // Started with the common soft limit of 1,024 open files, the relay raises it to the hard
    // limit (each client connection takes two descriptors).
    let mut lowered = Command::new("sh");
    lowered.args(["-c", "ulimit -Sn 1024 && exec \"$0\" \"$@\"", BIN]).args(relay_args);
    let mut relay = Running::spawn(lowered);
    common::wait_admin(admin, "/readyz", |code, _| code == 200);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.pid())).expect("limits");
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).expect("line");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "the soft limit was not raised: {open_files}");
    let mut agent = common::privlink(&agent_args);
    common::wait_admin(agent_admin, "/readyz", |code, _| code == 200);
    common::wait_endpoint_status(admin, "contoso-kv", "Approved");
    let expected = if transport == "tcp" { "tcp" } else { "quic" };
    let (_, body) = common::admin_get(agent_admin, "/api/v1/status");
    let on = format!("\"transport\":\"{expected}\"");
    assert!(body.contains(&on), "agent is not on {expected}: {body}");
    assert_endpoint_serves(endpoint).await;
    // The flow record counts every byte, including those the relay sent along with the open
    // header (the echo request is written as soon as the connection is up).
    relay.wait_for("bytes_from_client=18 bytes_to_client=18");

    // kill -9 the agent and start a new one: new connections work once it is approved. The
    // status may list the dead agent as approving until the relay notices it is gone, so this
    // waits for an agent with a new id to approve.
    let (_, before) = common::admin_get(admin, "/api/v1/status");
    let before: StatusSnapshot = serde_json::from_str(&before).expect("a status snapshot");
    let old_id = before.relay().expect("a relay's status").agents[0].id.clone();
    agent.kill_hard();
    let agent = common::privlink(&agent_args);
    common::wait_admin(admin, "/api/v1/status", |code, body| {
        code == 200
            && serde_json::from_str::<StatusSnapshot>(body).is_ok_and(|s| {
                s.relay().is_some_and(|relay| {
                    relay.agents.iter().any(|a| {
                        a.id != old_id
                            && a.verdicts.get("contoso-kv") == Some(&VerdictView::Approved)
                    })
                })
            })
    });
    assert_endpoint_serves(endpoint).await;

    // kill -9 the relay and start it again on the same ports: the agent reconnects by itself.
    relay.kill_hard();
    let relay = common::privlink(&relay_args);
    common::wait_endpoint_status(admin, "contoso-kv", "Approved");
    common::wait_admin(agent_admin, "/readyz", |code, _| code == 200);
    assert_endpoint_serves(endpoint).await;

    // SIGTERM: both exit cleanly.
    assert!(agent.terminate().success(), "agent exits 0 on SIGTERM");
    assert!(relay.terminate().success(), "relay exits 0 on SIGTERM");
}

/// The Key Vault walkthrough (docs/operator.md) has an operator edit the example configs (the token hash, the
/// vault's name, an ACL, relay names); the suite must not depend on them staying as shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthroughs_edits_to_the_example_configs_do_not_break_the_suite() {
    let (relay, agent) = example_configs();
    let relay = relay
        .replace("REPLACE-with-the-token_sha256-line-from-privlink-token-new", &"0f".repeat(32))
        .replace("contoso-kv.privatelink", "fabrikam-kv.privatelink")
        .replace("allow = []", "allow = [\"203.0.113.0/24\"]")
        .replace("0.0.0.0:8443", "0.0.0.0:9443");
    let agent = agent.replace("127.0.0.1:7443", "relay.example.com:7443");
    let dir = tempfile::tempdir().expect("tempdir");
    let Deployment { relay_cfg, agent_cfg, endpoint, admin, agent_admin } =
        deploy_from(dir.path(), echo_server().await, &relay, &agent);
    let relay = common::privlink(&["relay", "--config", relay_cfg.to_str().expect("utf-8")]);
    common::wait_admin(admin, "/readyz", |code, _| code == 200);
    let agent = common::privlink(&["agent", "--config", agent_cfg.to_str().expect("utf-8")]);
    common::wait_admin(agent_admin, "/readyz", |code, _| code == 200);
    common::wait_endpoint_status(admin, "contoso-kv", "Approved");
    assert_endpoint_serves(endpoint).await;
    assert!(agent.terminate().success() && relay.terminate().success());
}

/// A wrong token and a relay certificate the agent does not trust are operator problems: the
/// agent says so at ERROR, with the relay's reason or the certificates involved and what to
/// check — and neither is mistaken for UDP being blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_and_an_untrusted_relay_certificate_are_reported_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Deployment { relay_cfg, agent_cfg, admin, agent_admin, .. } =
        deploy(dir.path(), echo_server().await);
    let relay = common::privlink(&["relay", "--config", relay_cfg.to_str().expect("utf-8")]);
    common::wait_admin(admin, "/readyz", |code, _| code == 200);
    let agent_args = ["agent", "--config", agent_cfg.to_str().expect("utf-8")];
    let token_file = dir.path().join("certs/token");
    let right_token = std::fs::read_to_string(&token_file).expect("token");

    std::fs::write(&token_file, "plk_not_the_right_token\n").expect("wrong token");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let readable = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(&token_file, readable).expect("chmod 644");
    }
    let mut agent = common::privlink(&agent_args);
    agent.wait_for("relay refused this agent");
    let line = agent.last_seen().to_owned();
    assert!(line.contains("ERROR"), "not reported as an error: {line}");
    assert!(line.contains("authentication failed for connector `onprem-east`"), "{line}");
    assert!(line.contains("token_sha256"), "no hint at what to check: {line}");
    assert!(!agent.seen_contains("falling back"), "a refusal is not a transport problem");
    // The token file is readable by others (0644): said at start.
    assert!(agent.seen_contains("is readable by group or others"), "no permission warning");
    drop(agent);

    std::fs::write(&token_file, right_token).expect("right token");
    let other_ca = dir.path().join("other-ca");
    let (code, _, err) = run(&["certs", "init", "--dir", other_ca.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    let other_ca = other_ca.join("ca.crt");
    let text = std::fs::read_to_string(&agent_cfg).expect("agent.toml");
    let text = set_key(&text, "", "relay_ca", &format!("\"{}\"", other_ca.display()));
    std::fs::write(&agent_cfg, text).expect("agent.toml");
    let mut agent = common::privlink(&agent_args);
    agent.wait_for("the relay's certificate is not trusted");
    let line = agent.last_seen().to_owned();
    assert!(line.contains("ERROR"), "not reported as an error: {line}");
    assert!(line.contains(&format!("relay_ca ({})", other_ca.display())), "{line}");
    assert!(line.contains("presented `CN=localhost` (fingerprint "), "no subject: {line}");
    // Two CAs made by `certs init` have names of their own (the day and a key id), and the
    // message gives the key ids and fingerprints to compare.
    let issuer = line.split("issued by `").nth(1).and_then(|rest| rest.split('`').next());
    let holds = line.split("holds `").nth(1).and_then(|rest| rest.split('`').next());
    let (Some(issuer), Some(holds)) = (issuer, holds) else { panic!("both CAs named: {line}") };
    assert!(issuer.starts_with("CN=privlink private CA 20"), "{line}");
    assert!(holds.starts_with("CN=privlink private CA 20") && holds != issuer, "{line}");
    assert!(line.contains("(the CA's key id ") && line.contains("(key id "), "{line}");
    // The status shows the whole message, not its first 256 characters.
    let probe = common::AdminProbe::new(None, agent_admin);
    let status = probe.wait_agent_status(|s| {
        s.links.iter().any(|l| l.last_error.as_deref().is_some_and(|e| e.contains("not trusted")))
    });
    let shown = status.links[0].last_error.clone().unwrap_or_default();
    assert!(shown.ends_with("relay.crt)."), "cut short: {shown}");
    assert!(!agent.seen_contains("falling back"), "a certificate is not a transport problem");
    drop(agent);
    assert!(relay.terminate().success());
}

/// `token new --out` writes the token alone, private, and prints the matching hash line.
#[test]
fn token_new_out_writes_only_the_token_privately() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    let path = file.to_str().expect("utf-8");
    let (code, out, err) = run(&["token", "new", "--out", path]);
    assert_eq!(code, 0, "{err}");
    let token = std::fs::read_to_string(&file).expect("token file");
    assert!(token.starts_with("plk_") && token.trim().lines().count() == 1, "{token:?}");
    let mode = std::fs::metadata(&file).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let digest = privlink_protocol::token::TokenDigest::of(token.trim().as_bytes()).to_hex();
    assert_eq!(out.trim(), format!("token_sha256 = \"{digest}\""));
    assert!(!out.contains(token.trim()), "the token is not printed when written to a file");
    let (code, _, err) = run(&["token", "new", "--out", path]);
    assert_ne!(code, 0, "an existing token file is not overwritten without --force");
    assert!(err.contains("--force"), "{err}");
    // The hash line again, for the token file as it is (the walkthrough, run a second time).
    let (code, again, err) = run(&["token", "hash", path]);
    assert_eq!((code, again.trim()), (0, out.trim()), "{err}");
    let missing = dir.path().join("missing");
    let (code, _, err) = run(&["token", "hash", missing.to_str().expect("utf-8")]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot read the token file") && err.contains("missing"), "{err}");
}

/// Writes `text` as a config file and checks the binary refuses it with exit code 64 and a
/// message naming the file, the line and the key.
fn assert_config_rejected(kind: &str, text: &str, line: usize, key: &str, dir: &Path) {
    let path = dir.join(format!("{kind}-{}.toml", key.replace(['[', ']', '.'], "_")));
    std::fs::write(&path, text).expect("write config");
    let (code, _, stderr) = run(&[kind, "--config", path.to_str().expect("utf-8")]);
    assert_eq!(code, 64, "{kind} config with a bad `{key}` must exit 64; stderr: {stderr}");
    let expected = format!("{}:{line}: key `{key}`", path.display());
    assert!(stderr.contains(&expected), "expected {expected:?} in: {stderr}");
}

#[test]
fn invalid_configs_exit_64_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let (code, _, err) = run(&["certs", "init", "--dir", certs.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(certs.join("token"), "plk_test_token\n").expect("token file");
    let hash = "ab".repeat(32);
    let relay = |endpoint_extra: &str, acl: &str| {
        format!(
            "[tunnel]\nlisten = \"127.0.0.1:7443\"\ncert = \"certs/relay.crt\"\nkey = \"certs/relay.key\"\n\n\
             [[connector]]\nname = \"c\"\ntoken_sha256 = \"{hash}\"\n\n\
             [[endpoint]]\nname = \"e\"\nconnector = \"c\"\ndestination = \"vault.internal:443\"\nlisten = \"127.0.0.1:8443\"\n{endpoint_extra}\n\
             [endpoint.acl]\n{acl}\n"
        )
    };
    // Lines: 1 [tunnel] … 5 blank, 6 [[connector]] 7 name 8 token, 9 blank, 10 [[endpoint]]
    // 11 name 12 connector 13 destination 14 listen 15 extra.
    let d = dir.path();
    assert_config_rejected("relay", &relay("listn = \"x\"", ""), 15, "endpoint[0].listn", d);
    // A misspelt table is named, at its own line.
    let tables =
        relay("", "").replace("[[endpoint]]", "[[endpoints]]").replace("[endpoint.acl]", "");
    assert_config_rejected("relay", &tables, 10, "endpoints", d);
    let names = |list: &str| relay(&format!("server_names = [{list}]"), "");
    assert_config_rejected("relay", &names("\"a.b.*.test\""), 15, "endpoint[0].server_names[0]", d);
    assert_config_rejected(
        "relay",
        &names("\"x.test\", \"X.test.\""),
        15,
        "endpoint[0].server_names[1]",
        d,
    );
    assert_config_rejected("relay", &names(""), 15, "endpoint[0].server_names", d);
    // Two endpoints on one shared listener claiming the same name: both are named.
    let shared = |second_names: &str| {
        format!(
            "[tunnel]\nlisten = \"127.0.0.1:7443\"\ncert = \"certs/relay.crt\"\nkey = \"certs/relay.key\"\n\n\
             [[connector]]\nname = \"c\"\ntoken_sha256 = \"{hash}\"\n\n\
             [[listener]]\nname = \"vaults\"\nlisten = \"127.0.0.1:8443\"\n\n\
             [[endpoint]]\nname = \"a\"\nconnector = \"c\"\ndestination = \"a.internal:443\"\nlistener = \"vaults\"\nserver_names = [\"a.vault.test\"]\n\n\
             [[endpoint]]\nname = \"b\"\nconnector = \"c\"\ndestination = \"b.internal:443\"\nlistener = \"vaults\"\nserver_names = [{second_names}]\n"
        )
    };
    let twice = shared("\"x.vault.test\", \"A.vault.test\"");
    assert_config_rejected("relay", &twice, 26, "endpoint[1].server_names[1]", d);
    let path = d.join("relay-twice-named.toml");
    std::fs::write(&path, &twice).expect("write");
    let (_, _, stderr) = run(&["relay", "--config", path.to_str().expect("utf-8")]);
    assert!(stderr.contains("endpoint[0] (`a`) and endpoint[1] (`b`)"), "{stderr}");
    assert_config_rejected(
        "relay",
        &shared("").replace("listener = \"vaults\"\nserver_names = []", "listener = \"nope\""),
        25,
        "endpoint[1].listener",
        d,
    );
    let both = shared("\"b.vault.test\"").replace(
        "listener = \"vaults\"\nserver_names = [\"b",
        "listen = \"127.0.0.1:9443\"\nlistener = \"vaults\"\nserver_names = [\"b",
    );
    assert_config_rejected("relay", &both, 25, "endpoint[1].listener", d);
    // An admin listener off loopback without a token file: the status API would be open.
    let open_admin = format!("{}\n[admin]\nlisten = \"0.0.0.0:9090\"\n", relay("", ""));
    assert_config_rejected("relay", &open_admin, 20, "admin.listen", d);
    assert_config_rejected(
        "relay",
        &relay("inactivity_timeout = \"60\"", ""),
        15,
        "endpoint[0].inactivity_timeout",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("open_attempts = 0", ""),
        15,
        "endpoint[0].open_attempts",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("open_retry_buffer = 99999999", ""),
        15,
        "endpoint[0].open_retry_buffer",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("open_timeout = \"0s\"", ""),
        15,
        "endpoint[0].open_timeout",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("", "allow = [\"10.0.0.0/8\", \"10.0.0.300/8\"]"),
        17,
        "endpoint[0].acl.allow[1]",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("", "").replace("connector = \"c\"\ndest", "connector = \"d\"\ndest"),
        12,
        "endpoint[0].connector",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("", "").replace("token_sha256 = \"ab", "token_sha256 = \"xy"),
        8,
        "connector[0].token_sha256",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("", "").replace(&format!("token_sha256 = \"{hash}\""), "token_sha256 = []"),
        8,
        "connector[0].token_sha256",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("", "").replace("certs/relay.crt", "certs/missing.crt"),
        3,
        "tunnel.cert",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("", "").replace("certs/relay.key", "certs/ca.key"),
        4,
        "tunnel.key",
        d,
    );
    assert_config_rejected(
        "relay",
        &relay("", "").replace(
            "key = \"certs/relay.key\"\n",
            "key = \"certs/relay.key\"\nbuffer_budget = \"512MB\"\n",
        ),
        5,
        "tunnel.buffer_budget",
        d,
    );
    // The tunnel's crypto: an unknown key exchange setting; FIPS asked of a build without it.
    let tunnel_key = |line: &str| {
        relay("", "")
            .replace("key = \"certs/relay.key\"\n", &format!("key = \"certs/relay.key\"\n{line}\n"))
    };
    assert_config_rejected(
        "relay",
        &tunnel_key("post_quantum = \"maybe\""),
        5,
        "tunnel.post_quantum",
        d,
    );
    assert_config_rejected("relay", &tunnel_key("fips = true"), 5, "tunnel.fips", d);
    // A stream window outside 64 KiB – 64 MiB.
    let window = tunnel_key("stream_window = \"32KiB\"");
    assert_config_rejected("relay", &window, 5, "tunnel.stream_window", d);
    let duplicate_name = format!(
        "{}\n[[endpoint]]\nname = \"e\"\nconnector = \"c\"\ndestination = \"v.internal:443\"\nlisten = \"127.0.0.1:8444\"\n",
        relay("", "")
    );
    assert_config_rejected("relay", &duplicate_name, 20, "endpoint[1].name", d);
    let duplicate_listen = duplicate_name
        .replace(
            "name = \"e\"\nconnector = \"c\"\ndestination = \"v.",
            "name = \"e2\"\nconnector = \"c\"\ndestination = \"v.",
        )
        .replace("8444", "8443");
    assert_config_rejected("relay", &duplicate_listen, 23, "endpoint[1].listen", d);
    // HTTP CONNECT endpoints: line 13 is `mode`, line 14 `destinations`.
    let connect = |destinations: &str, extra: &str| {
        relay(extra, "").replace(
            "destination = \"vault.internal:443\"",
            &format!("mode = \"http-connect\"\ndestinations = [{destinations}]"),
        )
    };
    let vaults = "\"*.vault.azure.net:443\"";
    assert_config_rejected(
        "relay",
        &connect("\"*.vault.azure.net\"", ""),
        14,
        "endpoint[0].destinations[0]",
        d,
    );
    assert_config_rejected("relay", &connect("", ""), 14, "endpoint[0].destinations", d);
    let socks = connect(vaults, "").replace("http-connect", "socks");
    assert_config_rejected("relay", &socks, 13, "endpoint[0].mode", d);
    let with_destination = connect(vaults, "destination = \"other.internal:443\"");
    assert_config_rejected("relay", &with_destination, 13, "endpoint[0].destination", d);
    let bad_hash = connect(vaults, "proxy_auth_sha256 = \"user:password\"");
    assert_config_rejected("relay", &bad_hash, 16, "endpoint[0].proxy_auth_sha256", d);
    let instant = connect(vaults, "preread_timeout = \"0s\"");
    assert_config_rejected("relay", &instant, 16, "endpoint[0].preread_timeout", d);
    for (extra, key) in [
        ("per_source_rate = \"10/h\"", "per_source_rate"),
        ("per_source_rate = 10", "per_source_rate"),
        ("per_source_max_connections = 0", "per_source_max_connections"),
        ("max_duration = \"0s\"", "max_duration"),
    ] {
        assert_config_rejected("relay", &relay(extra, ""), 15, &format!("endpoint[0].{key}"), d);
    }
    let on_tcp = relay(&format!("destinations = [{vaults}]"), "");
    assert_config_rejected("relay", &on_tcp, 15, "endpoint[0].destinations", d);

    let agent = |extra: &str| {
        format!(
            "connector = \"c\"\ntoken_file = \"certs/token\"\nrelays = [\"127.0.0.1:7443\"]\nrelay_ca = \"certs/ca.crt\"\n{extra}\n"
        )
    };
    assert_config_rejected(
        "agent",
        &agent("[[allow]]\ndestination = \"*.vault.azure.net\""),
        6,
        "allow[0].destination",
        d,
    );
    assert_config_rejected("agent", &agent("transport = \"udp\""), 5, "transport", d);
    assert_config_rejected("agent", &agent("stream_window = \"128MiB\""), 5, "stream_window", d);
    let proxy = |url: &str| agent(&format!("proxy = \"{url}\""));
    assert_config_rejected("agent", &proxy("https://proxy.corp:3128"), 5, "proxy", d);
    assert_config_rejected("agent", &proxy("http://proxy.corp:3128/path"), 5, "proxy", d);
    let quic = proxy("http://proxy.corp:3128") + "transport = \"quic\"\n";
    assert_config_rejected("agent", &quic, 5, "proxy", d);
    let no_file = proxy("http://proxy.corp:3128") + "proxy_credentials_file = \"certs/none\"\n";
    assert_config_rejected("agent", &no_file, 6, "proxy_credentials_file", d);
    let twice = proxy("http://u:p@proxy.corp:3128") + "proxy_credentials_file = \"certs/token\"\n";
    assert_config_rejected("agent", &twice, 6, "proxy_credentials_file", d);
    assert_config_rejected("agent", &agent("post_quantum = \"on\""), 5, "post_quantum", d);
    assert_config_rejected("agent", &agent("fips = true"), 5, "fips", d);
    assert_config_rejected("agent", &agent("buffer_budget = 0"), 5, "buffer_budget", d);
    assert_config_rejected("agent", &agent("buffer_budget = \"5GiB\""), 5, "buffer_budget", d);
    let open_admin = agent("[admin]\nlisten = \"[::]:9091\"");
    assert_config_rejected("agent", &open_admin, 6, "admin.listen", d);
    assert_config_rejected(
        "agent",
        &agent("").replace("127.0.0.1:7443", "relay.example.com"),
        3,
        "relays[0]",
        d,
    );
    assert_config_rejected(
        "agent",
        &agent("").replace("token_file = \"certs/token\"", "token_file = \"certs/none\""),
        2,
        "token_file",
        d,
    );
    assert_config_rejected(
        "agent",
        &agent("").replace("relay_ca = \"certs/ca.crt\"", "relay_ca = \"certs/relay.key\""),
        4,
        "relay_ca",
        d,
    );

    // A token file holding more than the token (`privlink token new > file`), and a token in
    // both the file and the environment, are refused rather than half-used.
    assert_config_rejected(
        "agent",
        &agent("").replace("token_file = \"certs/token\"", "token_file = \"certs/ca.crt\""),
        2,
        "token_file",
        d,
    );
    let both = d.join("agent-both-tokens.toml");
    std::fs::write(&both, agent("")).expect("write config");
    let out = Command::new(BIN)
        .args(["agent", "--config", both.to_str().expect("utf-8")])
        .env("PRIVLINK_TOKEN", "plk_from_env")
        .output()
        .expect("run privlink");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("both token_file and the PRIVLINK_TOKEN"), "{stderr}");

    // A port already taken: one clear line naming the endpoint, the address and the cause once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let busy = d.join("relay-busy.toml");
    let busy_text = relay("", "").replace("127.0.0.1:7443", "127.0.0.1:0");
    std::fs::write(&busy, busy_text.replace("127.0.0.1:8443", &taken_addr)).expect("write");
    let (code, _, stderr) = run(&["relay", "--config", busy.to_str().expect("utf-8")]);
    assert_ne!(code, 0);
    assert!(stderr.contains(&format!("endpoint `e`: cannot listen on {taken_addr}")), "{stderr}");
    assert_eq!(stderr.matches("Address already in use").count(), 1, "{stderr}");
    drop(taken);

    // A file that does not exist is a usage error too.
    let (code, _, stderr) = run(&["relay", "--config", "/nonexistent/relay.toml"]);
    assert_eq!(code, 64);
    assert!(stderr.contains("/nonexistent/relay.toml"), "{stderr}");
}

/// `--log-format json`: every line the relay and the agent write is one JSON object with
/// timestamp, level, target and message, and the flow log's fields are JSON fields (numbers as
/// numbers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_flow_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Deployment { relay_cfg, agent_cfg, endpoint, admin, agent_admin } =
        deploy(dir.path(), echo_server().await);
    let json = ["--log-format", "json"];
    let mut relay = common::privlink(
        &[&["relay", "--config", relay_cfg.to_str().expect("utf-8")][..], &json[..]].concat(),
    );
    let mut agent = common::privlink(
        &[&["agent", "--config", agent_cfg.to_str().expect("utf-8")][..], &json[..]].concat(),
    );
    common::wait_admin(agent_admin, "/readyz", |code, _| code == 200);
    common::wait_endpoint_status(admin, "contoso-kv", "Approved");
    assert_endpoint_serves(endpoint).await;
    relay.wait_for("\"target\":\"privlink::flow\"");
    let flow: serde_json::Value =
        serde_json::from_str(relay.last_seen()).expect("the flow line is one JSON object");
    assert_eq!(flow["message"], "flow", "{flow}");
    assert_eq!(flow["level"], "INFO", "{flow}");
    assert!(flow["timestamp"].as_str().is_some_and(|t| t.contains('T')), "{flow}");
    assert_eq!(flow["bytes_from_client"], 18, "{flow}");
    assert_eq!(flow["bytes_to_client"], 18, "{flow}");
    assert_eq!(flow["outcome"], "completed", "{flow}");
    assert_eq!(flow["endpoint"], "contoso-kv", "{flow}");
    agent.wait_for("connected to relay");
    let connected: serde_json::Value =
        serde_json::from_str(agent.last_seen()).expect("the agent's lines are JSON too");
    assert_eq!(connected["target"], "privlink_agent::session", "{connected}");
    assert!(connected["spans"].is_array(), "the spans it happened in: {connected}");
    // Every line either process wrote so far was one JSON object.
    for line in relay.seen().iter().chain(agent.seen()) {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not JSON: {line}");
    }
    assert!(agent.terminate().success() && relay.terminate().success());
}

/// `privlink status`: the relay's endpoints and agents, the agent's links and verdicts, the
/// JSON as it came, and exit 69 when nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privlink_status_prints_the_relays_and_the_agents_view() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Deployment { relay_cfg, agent_cfg, admin, agent_admin, .. } =
        deploy(dir.path(), echo_server().await);
    let relay = common::privlink(&["relay", "--config", relay_cfg.to_str().expect("utf-8")]);
    let agent = common::privlink(&["agent", "--config", agent_cfg.to_str().expect("utf-8")]);
    common::wait_admin(agent_admin, "/readyz", |code, _| code == 200);
    common::wait_endpoint_status(admin, "contoso-kv", "Approved");

    let (code, out, err) = run(&["status", "--admin", &format!("http://{admin}")]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ENDPOINT") && lines[0].contains("STATUS"), "{out}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[..2], ["contoso-kv", "Approved"], "{out}");
    assert!(out.contains("AGENT") && out.contains("onprem-east"), "{out}");

    let (code, out, err) = run(&["status", "--admin", &format!("http://{agent_admin}")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ready") && out.contains("connected"), "{out}");
    assert!(out.contains("contoso-kv") && out.contains("Approved"), "{out}");

    let (code, out, _) = run(&["status", "--admin", &format!("http://{admin}"), "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).expect("--json prints the JSON");
    assert_eq!(json["role"], "relay");

    let closed = format!("http://127.0.0.1:{}", privlink_testbed::process::free_fixed_port());
    let (code, _, err) = run(&["status", "--admin", &closed]);
    assert_eq!(code, 69, "nothing listening is 'unavailable': {err}");
    assert!(err.contains("cannot reach the admin listener"), "{err}");
    assert!(agent.terminate().success() && relay.terminate().success());
}

/// `privlink demo`: its request goes through end to end, the `curl` command it tells a newcomer
/// to try works against it (a client nobody here wrote, trusting only the demo CA), and Ctrl-C
/// stops it with exit 0.
#[test]
fn the_demo_serves_the_curl_it_prints_and_stops_on_ctrl_c() {
    let mut demo = common::privlink(&["demo", "--port", "0"]);
    // What the demo prints is its interface: the last line of its report.
    demo.wait_for("Press Ctrl-C to stop.");
    let report = demo.seen().join("\n");
    assert!(report.contains("HTTP/1.1 200 OK"), "{report}");
    assert!(report.contains("verified against the demo CA"), "{report}");
    let curl = demo
        .seen()
        .iter()
        .map(|line| line.trim())
        .find(|line| line.starts_with("curl "))
        .unwrap_or_else(|| panic!("no curl line in:\n{report}"))
        .to_owned();
    // The line is meant for a shell (its URL is quoted); bounded so a hang fails the test.
    let out = Command::new("sh")
        .args(["-c", &format!("{curl} --silent --show-error --max-time 10")])
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{curl}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(body.contains("hello from inside the private network"), "curl printed {body}");

    let pid = demo.pid().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().expect("kill -INT");
    assert!(sent.success());
    let exit = demo.wait_exit();
    assert!(exit.success(), "the demo exited with {exit} after Ctrl-C");
}

/// 2,000 connections over `max_connections` are each refused and counted, and the warning
/// about them is written once per interval with a count of the rest — not 2,000 times (a
/// flood of refusals used to be a flood of log lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_over_max_connections_is_counted_not_logged_line_by_line() {
    const FLOOD: usize = 2_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay, agent) = example_configs();
    let relay = set_key(&relay, "[[endpoint]]", "max_connections", "1");
    let Deployment { relay_cfg, agent_cfg, endpoint, admin, agent_admin } =
        deploy_from(dir.path(), echo_server().await, &relay, &agent);
    let mut relay = common::privlink(&["relay", "--config", relay_cfg.to_str().expect("utf-8")]);
    let agent = common::privlink(&["agent", "--config", agent_cfg.to_str().expect("utf-8")]);
    common::wait_admin(agent_admin, "/readyz", |code, _| code == 200);
    common::wait_endpoint_status(admin, "contoso-kv", "Approved");

    // One connection holds the only slot (its echo proves it was admitted).
    let mut held = TcpStream::connect(endpoint).await.expect("connect");
    held.write_all(b"x").await.expect("write");
    held.read_exact(&mut [0u8; 1]).await.expect("echo");
    for _ in 0..FLOOD {
        // Refused at once (a reset); a connect that the kernel turned away counts the same.
        drop(TcpStream::connect(endpoint).await);
    }
    let counted = format!(
        "privlink_relay_connections_total{{endpoint=\"contoso-kv\",outcome=\"over_limit\"}} {FLOOD}"
    );
    common::wait_admin(admin, "/metrics", |code, body| code == 200 && body.contains(&counted));
    relay.wait_for("endpoint at max_connections");
    let warned =
        relay.output_so_far().iter().filter(|l| l.contains("endpoint at max_connections")).count();
    assert!(warned <= 3, "{warned} warning lines for {FLOOD} refusals");
    drop(held);
    assert!(agent.terminate().success() && relay.terminate().success());
}

/// An agent given its token in `PRIVLINK_TOKEN` serves with it, and the process that runs —
/// the very PID that was started — no longer shows the token in `/proc/PID/environ` (removing
/// the variable alone left it there: the kernel keeps the environment a process started with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_environment_is_not_left_in_proc_environ() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Deployment { relay_cfg, agent_cfg, admin, agent_admin, .. } =
        deploy(dir.path(), echo_server().await);
    let token = std::fs::read_to_string(dir.path().join("certs").join("token")).expect("token");
    let token = token.trim().to_owned();
    let without_file: String = std::fs::read_to_string(&agent_cfg)
        .expect("agent.toml")
        .lines()
        .filter(|line| !line.starts_with("token_file"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&agent_cfg, without_file).expect("write agent.toml");
    let relay = common::privlink(&["relay", "--config", relay_cfg.to_str().expect("utf-8")]);
    let mut command = Command::new(BIN);
    command.args(["agent", "--config", agent_cfg.to_str().expect("utf-8")]);
    command.env("PRIVLINK_TOKEN", &token);
    let agent = Running::spawn(command);
    common::wait_admin(agent_admin, "/readyz", |code, _| code == 200);
    common::wait_endpoint_status(admin, "contoso-kv", "Approved");
    let environ = std::fs::read(format!("/proc/{}/environ", agent.pid())).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(&token), "the token is still in /proc/PID/environ");
    assert!(!environ.contains("PRIVLINK_TOKEN="), "the variable is still there");
    assert!(agent.terminate().success() && relay.terminate().success());
}
