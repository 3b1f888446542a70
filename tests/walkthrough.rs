//! The README's one-machine walkthrough, run as it is written — twice in a row in the same
//! directory, as a newcomer who tries it again would: secrets made once and kept, the token's
//! hash line taken again with `privlink token hash`, every process stopped and waited for at
//! the end. It runs in a network namespace of its own (loopback only), so the walkthrough's
//! fixed ports meet no other test's, and with this build's binary first on `PATH` in place of
//! the release build it starts with.

mod common;

use std::process::Command;

use privlink_testbed::netns::skip_notice;

/// The walkthrough's shell block from the README.
fn walkthrough() -> String {
    let readme = include_str!("../README.md");
    let section = readme.split("## One machine, step by step").nth(1).expect("the walkthrough");
    let block = section.split("```sh\n").nth(1).expect("its shell block");
    block.split("```").next().expect("the block's end").to_owned()
}

#[test]
#[cfg_attr(
    privlink_no_netns,
    ignore = "needs network namespaces: root, iproute2, nftables, /dev/net/tun"
)]
fn the_readme_walkthrough_runs_twice_in_a_row() {
    for tool in ["unshare", "ip", "curl", "openssl", "timeout"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|out| out.status.success()) {
            return skip_notice(&format!("`{tool}` is not installed"));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config");
    std::fs::create_dir(&config).expect("config dir");
    for file in ["relay.toml", "agent.toml"] {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(file);
        std::fs::copy(shipped, config.join(file)).expect("copy the example config");
    }
    let bin_dir = std::path::Path::new(common::BIN).parent().expect("the binary's directory");
    // `cargo build --release` is this test's build already.
    let script = format!(
        "set -e\ncargo() {{ :; }}\nexport PATH=\"{}:$PATH\"\n{}",
        bin_dir.display(),
        walkthrough()
    );
    std::fs::write(dir.path().join("walkthrough.sh"), script).expect("script");
    for run in 1..=2 {
        // A PID namespace as well: when the script ends, however it ends, the kernel stops
        // whatever it left running (a failed step leaves the relay and the agent behind, and
        // they would hold this test's pipes open).
        let out = Command::new("unshare")
            .args(["--net", "--pid", "--fork", "sh", "-c"])
            .arg("ip link set lo up && exec timeout 90 bash walkthrough.sh")
            .current_dir(dir.path())
            .output()
            .expect("unshare (util-linux)");
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() && stderr.contains("unshare failed") {
            return skip_notice(&format!("cannot make a network namespace: {stderr}"));
        }
        assert!(out.status.success(), "run {run} failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("s_server"),
            "run {run}: the vault's page through the relay:\n{stdout}"
        );
        assert!(stdout.contains("\"Approved\""), "run {run}: the relay's status:\n{stdout}");
    }
}
