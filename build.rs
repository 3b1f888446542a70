//! Decides, before the tests are compiled, whether this machine can run the network-namespace
//! tests (root, iproute2, nftables, /dev/net/tun), and marks them `#[ignore]` with a reason when
//! it cannot — or when `PRIVLINK_SKIP_NETNS=1` asks for that — so that a plain `cargo test`
//! summary counts them as ignored instead of passing them silently. (The tests themselves still
//! fail loudly if the machine said yes here and then cannot make a namespace.) Likewise the
//! version-skew test, which builds the previous release from the repository's history: ignored,
//! with the reason, in a checkout that does not hold that commit (a shallow clone).

use std::path::Path;
use std::process::Command;

/// The previous release the version-skew test builds (tests/version_skew.rs says the same).
const PREVIOUS_RELEASE: &str = "9538b35";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(privlink_no_netns)");
    println!("cargo::rustc-check-cfg=cfg(privlink_no_previous_release)");
    let has_previous = Command::new("git")
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_previous {
        println!("cargo::rustc-cfg=privlink_no_previous_release");
        println!(
            "cargo::warning=the version-skew test will be ignored: commit {PREVIOUS_RELEASE} is not \
             in this checkout (a shallow clone?)"
        );
    }
    println!("cargo::rerun-if-env-changed=PRIVLINK_SKIP_NETNS");
    println!("cargo::rerun-if-changed=build.rs");
    if let Some(reason) = netns_missing() {
        println!("cargo::rustc-cfg=privlink_no_netns");
        println!("cargo::warning=network-namespace tests will be ignored: {reason}");
    }
}

/// Why the namespace tests cannot run here, if they cannot.
fn netns_missing() -> Option<String> {
    if std::env::var("PRIVLINK_SKIP_NETNS").as_deref() == Ok("1") {
        return Some("PRIVLINK_SKIP_NETNS=1".to_owned());
    }
    let root = std::fs::read_to_string("/proc/self/status").ok().is_some_and(|status| {
        status.lines().any(|line| {
            line.strip_prefix("Uid:").and_then(|ids| ids.split_whitespace().nth(1)) == Some("0")
        })
    });
    if !root {
        return Some("not running as root".to_owned());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".to_owned());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|out| out.status.success()) {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}
