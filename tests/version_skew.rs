//! Relays and agents of different versions: this build against the previous release — the
//! last commit that landed before this round's work (`PREVIOUS`), built here from the
//! repository's own history — in both directions: a new relay with an old agent, an old relay
//! with a new agent. Each pair links, the endpoint is approved and a connection is served.
//! (What is *not* compatible across versions — `[fleet]`, CONNECT endpoints — is in
//! docs/operator.md's upgrade table.) The old build takes a few minutes the first time; it is
//! kept under target/ for the runs after.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use privlink_testbed::process::free_fixed_port;
use tokio::net::TcpStream;

/// The previous release: the last commit that landed before this round (stop 35). build.rs
/// names it too, to ignore this test in a checkout without it.
const PREVIOUS: &str = "9538b35";

/// Builds the previous release's binary (once; kept under target/) and returns its path, or
/// why it cannot be built here (then the test fails saying so).
fn previous_binary() -> Result<PathBuf, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("previous-{PREVIOUS}"));
    let binary = base.join("target/debug/privlink");
    if binary.exists() {
        return Ok(binary);
    }
    let source = base.join("source");
    std::fs::create_dir_all(&source).map_err(|e| e.to_string())?;
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!("git -C \"$0\" archive {PREVIOUS} | tar -x -C \"$1\""))
        .arg(repo)
        .arg(&source)
        .output()
        .map_err(|e| format!("git: {e}"))?;
    if !archive.status.success() {
        return Err(format!(
            "cannot take {PREVIOUS} from the repository's history (a shallow clone?): {}",
            String::from_utf8_lossy(&archive.stderr)
        ));
    }
    // The dependencies this build fetched already: the current lock file, offline.
    std::fs::copy(repo.join("Cargo.lock"), source.join("Cargo.lock")).map_err(|e| e.to_string())?;
    let built = Command::new(env!("CARGO"))
        .args(["build", "--offline", "--bin", "privlink"])
        .current_dir(&source)
        .env("CARGO_TARGET_DIR", base.join("target"))
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_INCREMENTAL", "0")
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "building {PREVIOUS} failed: {}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    Ok(binary)
}

/// Starts a relay from `relay_bin` and an agent from `agent_bin` on `configs` and checks that
/// the endpoint is approved and serves.
async fn pair_serves(relay_bin: &Path, agent_bin: &Path, dir: &Path, echo: SocketAddr) {
    let (relay_admin, agent_admin) = (loopback(free_fixed_port()), loopback(free_fixed_port()));
    let endpoint = loopback(free_fixed_port());
    let configs = write_tunnel_files(
        dir,
        &TunnelFiles {
            tunnel_listen: &format!("127.0.0.1:{}", free_fixed_port()),
            endpoint: "kv",
            endpoint_listen: &endpoint.to_string(),
            destination: &echo.to_string(),
            endpoint_extra: "",
            agent_extra: "transport = \"auto\"",
            allow: &echo.to_string(),
            admin: (relay_admin, agent_admin),
        },
    );
    let spawn = |bin: &Path, role: &str, config: &str| {
        let mut command = Command::new(bin);
        command.args([role, "--config", config]);
        Running::spawn(command)
    };
    let relay = spawn(relay_bin, "relay", &configs.relay);
    let relay_probe = AdminProbe::new(None, relay_admin);
    relay_probe.wait_ready();
    let agent = spawn(agent_bin, "agent", &configs.agent);
    let agent_probe = AdminProbe::new(None, agent_admin);
    tokio::task::block_in_place(|| {
        agent_probe.wait_ready();
        relay_probe.wait_relay_status(|s| s.endpoints.iter().any(|e| e.status == "Approved"));
    });
    let socket = TcpStream::connect(endpoint).await.expect("connect the endpoint");
    let back = tokio::time::timeout(WAIT, echo_round_trip(socket, b"across versions"))
        .await
        .expect("echoed in time");
    assert_eq!(back, b"across versions");
    assert!(agent.terminate().success() && relay.terminate().success(), "both stop cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    privlink_no_previous_release,
    ignore = "the previous release's commit is not in this checkout (a shallow clone)"
)]
async fn the_previous_release_and_this_one_serve_each_other_both_ways() {
    let previous = match tokio::task::block_in_place(previous_binary) {
        Ok(path) => path,
        Err(why) => panic!("the version-skew test needs the previous release: {why}"),
    };
    let current = Path::new(common::BIN);
    let echo = echo_server().await;
    let new_relay = tempfile::tempdir().expect("tempdir");
    pair_serves(current, &previous, new_relay.path(), echo).await;
    let old_relay = tempfile::tempdir().expect("tempdir");
    pair_serves(&previous, current, old_relay.path(), echo).await;
}
