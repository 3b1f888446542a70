//! The status page in a real browser: Debian's headless Chromium, driven over the DevTools
//! protocol by `scripts/browse_status.py`, loads `/` from a running relay once and watches it
//! refresh itself — the endpoint shows `Approved` with an open connection listed (its client
//! address) while the agent is connected, and turns `Disconnected` with none after the
//! connection closes and the agent stops, with no reload. Screenshots of both go under
//! `target/tmp/`. CI installs `chromium`; without it the test fails saying so.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::token::TokenDigest;
use privlink_relay::config::AdminSettings;
use privlink_relay::registry::EndpointStatus;

const BROWSE_STATUS: &str = include_str!("scripts/browse_status.py");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_endpoint_approved_then_disconnected_in_chromium() {
    assert!(
        Command::new("chromium").arg("--version").output().is_ok_and(|o| o.status.success()),
        "the browser test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    );
    let destination = echo_server().await;
    let admin = AdminSettings::new("127.0.0.1:0".parse().expect("addr"), None);
    let harness = Harness::start_with_admin(vec![endpoint("e", destination)], Some(admin)).await;
    let agent =
        harness.spawn_agent(harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]));
    harness.wait_approved("e").await;
    let admin = harness.relay.admin_addr().expect("admin listener");
    let url = format!("http://{admin}/");
    // One open connection, for the page's connection list.
    let mut open = tokio::net::TcpStream::connect(harness.addr("e")).await.expect("connect");
    let client = open.local_addr().expect("addr").to_string();
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        open.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        open.read_exact(&mut back).await.expect("echoed: forwarded");
    }

    let shots = env!("CARGO_TARGET_TMPDIR");
    let mut browser = Command::new("python3")
        .args(["-c", BROWSE_STATUS, &url, "e", shots])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut to_script = browser.stdin.take().expect("stdin");
    let (lines, said) = mpsc::channel();
    let stdout = browser.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    // The script waits 20 s at most for each state; this waits a little longer for its word.
    let next_line = || said.recv_timeout(WAIT * 2).expect("the browser script reports");

    let approved = tokio::task::block_in_place(next_line);
    assert!(approved.starts_with("seen Approved"), "{approved}");
    assert!(approved.contains("1 of 1 endpoint approved"), "the summary counts it: {approved}");
    assert!(approved.contains(" 1 agent connected"), "one agent, not \"1 agents\": {approved}");
    assert!(approved.contains(&format!("\"client\": \"{client}\"")), "listed: {approved}");

    drop(open);
    let gone = |_: u16, body: &str| body.contains("\"total\":0");
    tokio::task::block_in_place(|| wait_admin(admin, "/api/v1/connections", gone));
    agent.cancel();
    harness.wait_status("e", |s| *s == EndpointStatus::Disconnected).await;
    writeln!(to_script, "agent stopped").expect("tell the script");
    let disconnected = tokio::task::block_in_place(next_line);
    assert!(disconnected.starts_with("seen Disconnected"), "{disconnected}");
    assert!(disconnected.contains("0 agents connected"), "{disconnected}");

    let status = tokio::task::block_in_place(|| browser.wait()).expect("script ends");
    assert!(status.success(), "browser script failed");
    for shot in ["status-page-approved.png", "status-page-disconnected.png"] {
        let png = std::fs::read(std::path::Path::new(shots).join(shot)).expect("screenshot");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "{shot} is a PNG");
    }
    harness.shutdown(&[]).await;
}

#[tokio::test]
async fn the_page_is_served_without_a_token_and_its_data_is_not() {
    let token = "page-token";
    let admin = AdminSettings::new(
        "127.0.0.1:0".parse().expect("addr"),
        Some(TokenDigest::of(token.as_bytes())),
    );
    let harness =
        Harness::start_with_admin(vec![endpoint("e", echo_server().await)], Some(admin)).await;
    let addr = harness.relay.admin_addr().expect("admin listener");
    let (code, page) =
        tokio::task::spawn_blocking(move || admin_get(addr, "/")).await.expect("join");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("<title>privlink status</title>"), "{page}");
    assert!(!page.contains("\"e\""), "the page itself carries no status");
    let (code, script) =
        tokio::task::spawn_blocking(move || admin_get(addr, "/status.js")).await.expect("join");
    assert_eq!(code, 200);
    assert!(script.contains("/api/v1/status"), "the script asks the API");
    let (code, _) =
        tokio::task::spawn_blocking(move || admin_get(addr, "/api/v1/status")).await.expect("join");
    assert_eq!(code, 401, "the data needs the token");
    harness.shutdown(&[]).await;
}
