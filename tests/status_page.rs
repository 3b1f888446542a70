//! The status page in a real browser: Debian's headless Chromium, driven over the DevTools
//! protocol by `scripts/browse_status.py`, loads `/` from a running relay once and watches it
//! refresh itself. First: the endpoint `Approved` with an open connection listed (its client
//! address), a client the ACL refused highlighted in the event list and drawn in the chart of
//! connections by outcome, two agents in the peers chart — and an agent's rejection reason made
//! of HTML shown as text, in the endpoint table and the event list, with no element of it in
//! the page. Then, after the connection closes and both agents leave: `Disconnected`, no
//! connection, the agents' departures listed and none left in the chart — with no reload.
//! Screenshots of both go under `target/tmp/` (CI keeps them). CI installs `chromium`; without
//! it the test fails saying so.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::acl::Acl;
use privlink_protocol::message::{EndpointVerdict, Verdict};
use privlink_protocol::token::TokenDigest;
use privlink_relay::config::AdminSettings;
use privlink_relay::registry::EndpointStatus;
use privlink_transport::tunnel::TransportKind;

const BROWSE_STATUS: &str = include_str!("scripts/browse_status.py");

/// What a hostile agent gives as its reason for rejecting an endpoint: markup that would run a
/// script and draw elements if the page ever wrote it as HTML.
const HTML_REASON: &str = "<img src=x onerror=\"document.title='owned'\"><b>bold</b> & <i>it</i>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_connections_events_and_charts_in_chromium() {
    assert!(
        Command::new("chromium").arg("--version").output().is_ok_and(|o| o.status.success()),
        "the browser test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    );
    let destination = echo_server().await;
    let elsewhere = echo_server().await;
    let mut locked = endpoint("locked", destination);
    locked.acl = Acl { allow: Vec::new(), deny: vec!["127.0.0.0/8".parse().expect("net")] };
    let endpoints = vec![endpoint("e", destination), endpoint("judged", elsewhere), locked];
    let admin = AdminSettings::new("127.0.0.1:0".parse().expect("addr"), None);
    let harness = Harness::start_with_admin(endpoints, Some(admin)).await;
    let agent =
        harness.spawn_agent(harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]));
    harness.wait_approved("e").await;
    let rejection = EndpointVerdict {
        endpoint: "judged".into(),
        verdict: Verdict::Rejected { reason: HTML_REASON.into() },
    };
    let hostile =
        FakeAgent::judging(&harness, TransportKind::Quic, rejection, OnOpen::Ignore, true).await;
    let admin = harness.relay.admin_addr().expect("admin listener");
    let url = format!("http://{admin}/");
    // One open connection, for the page's connection list.
    let open = forwarded_connection(harness.addr("e")).await;
    let client = open.local_addr().expect("addr").to_string();
    // One client the ACL refuses.
    let refused = tokio::net::TcpStream::connect(harness.addr("locked")).await;
    assert!(is_refused(refused).await, "the ACL refuses loopback");

    let phases = serde_json::json!([
        {"shot": "status-page-approved", "status": "Approved", "connections": 1, "denials": 1,
         "series": "acl_denied", "peers": "agents connected: 2 now"},
        {"shot": "status-page-disconnected", "status": "Disconnected", "connections": 0,
         "code": "PL2003", "peers": "agents connected: 0 now"},
    ]);
    let mut browser = BrowsedPage::open(&url, Some("e"), &phases);
    let (approved, line) = browser.seen("status-page-approved");
    let summary = approved["summary"].as_str().expect("summary");
    assert!(summary.contains("2 of 3 endpoints approved"), "the summary counts it: {summary}");
    assert!(summary.contains(" 2 agents connected"), "{summary}");
    assert_eq!(approved["client"], client.as_str(), "the open connection is listed: {line}");
    assert!(
        approved["denials"].as_array().expect("denials").iter().any(|d| {
            let d = d.as_str().unwrap_or_default();
            d.contains("connection.denied") && d.contains("locked") && d.contains("acl_denied")
        }),
        "the ACL refusal is listed and highlighted: {line}"
    );
    assert!(
        approved["reasons"].as_array().expect("reasons").iter().any(|r| r == HTML_REASON),
        "the hostile reason is shown, as text, in the endpoint table: {line}"
    );
    let events = approved["events_text"].as_str().expect("events");
    assert!(events.contains(HTML_REASON), "and in the event list, as text: {events}");
    assert_eq!(approved["smuggled"], 0, "no element came from the reason: {line}");
    assert_eq!(approved["bytes_lines"], 2, "bytes each way: {line}");

    drop(open);
    drop(hostile);
    let gone = |_: u16, body: &str| body.contains("\"total\":0");
    tokio::task::block_in_place(|| wait_admin(admin, "/api/v1/connections", gone));
    agent.cancel();
    harness.wait_status("e", |s| *s == EndpointStatus::Disconnected).await;
    browser.next_phase();
    let (disconnected, line) = browser.seen("status-page-disconnected");
    let summary = disconnected["summary"].as_str().expect("summary");
    assert!(summary.contains("0 agents connected"), "{summary}");
    let codes = disconnected["codes"].as_array().expect("codes");
    let departures = codes.iter().filter(|c| *c == "PL2003").count();
    assert_eq!(departures, 2, "both agents' departures are listed: {line}");
    assert!(
        disconnected["series"].as_array().expect("series").iter().any(|s| s == "completed"),
        "the closed connection is drawn: {line}"
    );

    browser.finish(&["status-page-approved", "status-page-disconnected"]);
    harness.shutdown(&[]).await;
}

/// The agent's page: its relay link connected, the stream it forwards listed, its link's
/// coming up in the event list and in the chart of relay links, and a stream whose destination
/// did not answer highlighted; then, with the relay gone, the link's loss listed and none
/// left in the chart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_page_shows_its_links_streams_and_refusals_in_chromium() {
    assert!(
        Command::new("chromium").arg("--version").output().is_ok_and(|o| o.status.success()),
        "the browser test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    );
    let destination = echo_server().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let harness = Harness::start(vec![endpoint("e", destination), endpoint("dead", closed)]).await;
    let allow = [rule_for(destination), rule_for(closed)];
    let mut config = harness.agent_config(TransportChoice::Quic, &allow);
    config.admin = Some(AdminSettings::new("127.0.0.1:0".parse().expect("addr"), None));
    let agent = harness.watch_agent(config);
    let admin = agent.admin.expect("the agent's admin listener");
    harness.wait_approved("e").await;
    harness.wait_approved("dead").await;
    let open = forwarded_connection(harness.addr("e")).await;
    let unanswered = tokio::net::TcpStream::connect(harness.addr("dead")).await;
    assert!(is_refused(unanswered).await, "nothing listens behind `dead`");

    let phases = serde_json::json!([
        {"shot": "agent-page-connected", "link": "connected", "connections": 1,
         "code": "PL4001", "failed": 1, "peers": "relay links connected: 1 now"},
        {"shot": "agent-page-down", "connections": 0, "code": "PL4002",
         "peers": "relay links connected: 0 now"},
    ]);
    let mut browser = BrowsedPage::open(&format!("http://{admin}/"), None, &phases);
    let (connected, line) = browser.seen("agent-page-connected");
    let summary = connected["summary"].as_str().expect("summary");
    assert!(summary.contains("1 of 1 relay link connected"), "{summary}");
    assert!(
        connected["failed"].as_array().expect("failed").iter().any(|d| {
            let d = d.as_str().unwrap_or_default();
            d.contains("stream.closed") && d.contains("dead") && d.contains("destination_failed")
        }),
        "the stream whose destination did not answer is highlighted: {line}"
    );
    let series = connected["series"].as_array().expect("series");
    assert!(series.iter().any(|s| s == "destination_failed"), "and drawn: {line}");
    assert_eq!(connected["smuggled"], 0, "{line}");

    drop(open);
    harness.shutdown(&[]).await;
    browser.next_phase();
    let (down, line) = browser.seen("agent-page-down");
    assert_ne!(down["link"], "connected", "down, or trying again: {line}");
    assert!(
        down["series"].as_array().expect("series").iter().any(|s| s == "completed"),
        "the stream that ended is drawn: {line}"
    );
    browser.finish(&["agent-page-connected", "agent-page-down"]);
    agent.stop().await;
}

/// A connection to `endpoint` that has been forwarded (a ping echoed back), left open.
async fn forwarded_connection(endpoint: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut open = tokio::net::TcpStream::connect(endpoint).await.expect("connect");
    open.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    open.read_exact(&mut back).await.expect("echoed: forwarded");
    open
}

/// `scripts/browse_status.py` watching one page through its phases.
struct BrowsedPage {
    script: std::process::Child,
    to_script: std::process::ChildStdin,
    said: mpsc::Receiver<String>,
}

impl BrowsedPage {
    /// Starts the script on `url` (`endpoint`: the relay endpoint whose row it watches).
    fn open(url: &str, endpoint: Option<&str>, phases: &serde_json::Value) -> Self {
        let endpoint = serde_json::to_string(&endpoint).expect("json");
        let mut script = Command::new("python3")
            .args(["-c", BROWSE_STATUS, url, &endpoint, SHOTS, &phases.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let to_script = script.stdin.take().expect("stdin");
        let (lines, said) = mpsc::channel();
        let stdout = script.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        Self { script, to_script, said }
    }

    /// What the page showed when it reached the phase `shot`, and the script's line.
    fn seen(&mut self, shot: &str) -> (serde_json::Value, String) {
        // The script waits 20 s at most for each phase; this waits a little longer for its
        // word.
        let line = tokio::task::block_in_place(|| self.said.recv_timeout(WAIT * 2))
            .expect("the browser script reports");
        let rest = line.strip_prefix(&format!("seen {shot} ")).unwrap_or_else(|| panic!("{line}"));
        let json = &rest[..rest.rfind(' ').expect("the screenshot follows")];
        (serde_json::from_str(json).expect("the page as the script saw it"), line)
    }

    /// Lets the script wait for the next phase.
    fn next_phase(&mut self) {
        writeln!(self.to_script, "next").expect("tell the script");
    }

    /// Waits for the script to end well, and checks its screenshots.
    fn finish(mut self, shots: &[&str]) {
        let status = tokio::task::block_in_place(|| self.script.wait()).expect("script ends");
        assert!(status.success(), "browser script failed");
        for shot in shots {
            let path = std::path::Path::new(SHOTS).join(format!("{shot}.png"));
            let png = std::fs::read(&path).expect("screenshot");
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "{shot} is a PNG");
        }
    }
}

/// Where the screenshots go (`target/tmp/`).
const SHOTS: &str = env!("CARGO_TARGET_TMPDIR");

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
