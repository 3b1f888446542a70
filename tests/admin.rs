//! The admin listener, asked by a real HTTP client (curl): liveness, the relay's readiness
//! flipping with a drain and the agent's with its relay link, the relay's status snapshot
//! through every endpoint status an agent can cause and the agent's links, the bearer-token
//! guard, unknown paths and methods, and the request bounds.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::token::TokenDigest;
use privlink_relay::config::AdminSettings;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `curl` against the admin listener: the status code and the body.
async fn curl(admin: SocketAddr, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("http://{admin}{path}");
    let mut command = Command::new("curl");
    command.args(["-s", "-m", "10", "-w", "\n%{http_code}"]).args(extra).arg(&url);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("curl runs (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl prints the status code");
    (code.trim().parse().expect("a status code"), body.to_owned())
}

fn loopback_admin(token: Option<&str>) -> Option<AdminSettings> {
    Some(AdminSettings::new(
        "127.0.0.1:0".parse().expect("addr"),
        token.map(|t| TokenDigest::of(t.as_bytes())),
    ))
}

/// The status snapshot's entry for endpoint `e`.
fn endpoint_e(status: &Value) -> &Value {
    status["endpoints"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["name"] == "e"))
        .unwrap_or_else(|| panic!("endpoint e is in the status: {status}"))
}

async fn status(admin: SocketAddr) -> Value {
    let (code, body) = curl(admin, "/api/v1/status", &[]).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("status is JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_the_status_follow_the_agent_through_every_endpoint_status() {
    let destination = echo_server().await;
    let harness =
        Harness::start_with_admin(vec![endpoint("e", destination)], loopback_admin(None)).await;
    let admin = harness.relay.admin_addr().expect("admin listener");

    assert_eq!(curl(admin, "/healthz", &[]).await, (200, "ok\n".to_owned()));
    assert_eq!(curl(admin, "/readyz", &[]).await, (200, "ready\n".to_owned()));
    // Before any agent: Disconnected.
    let before = status(admin).await;
    assert_eq!(before["role"], "relay");
    assert_eq!(endpoint_e(&before)["status"], "Disconnected", "{before}");
    assert_eq!(endpoint_e(&before)["destination"], destination.to_string());

    // An agent that does not allow the destination: Rejected, with its reason.
    let refusing = harness.spawn_agent(harness.agent_config(TransportChoice::Quic, &[]));
    harness
        .wait_status("e", |s| matches!(s, privlink_relay::EndpointStatus::Rejected { .. }))
        .await;
    let rejected = status(admin).await;
    assert_eq!(endpoint_e(&rejected)["status"], "Rejected", "{rejected}");
    assert!(endpoint_e(&rejected)["reason"].as_str().is_some_and(|r| !r.is_empty()), "{rejected}");
    refusing.cancel();
    harness.relay.wait_for_agents(CONNECTOR, WAIT, <[_]>::is_empty).await;

    // An agent that allows it: Approved, with the agent named and its verdict recorded.
    let agent =
        harness.spawn_agent(harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]));
    harness.wait_approved("e").await;
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    assert_eq!(echo_round_trip(socket, b"counted").await, b"counted");
    let approved = status(admin).await;
    let e = endpoint_e(&approved);
    assert_eq!(e["status"], "Approved", "{approved}");
    assert_eq!(e["approving_agents"], serde_json::json!(["test-agent"]), "{approved}");
    assert!(e["total_connections"].as_u64() >= Some(1), "{approved}");
    let agents = approved["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 1, "{approved}");
    assert_eq!(agents[0]["transport"], "quic");
    assert_eq!(agents[0]["verdicts"]["e"]["verdict"], "Approved", "{approved}");
    assert!(agents[0]["remote"].as_str().is_some_and(|r| r.starts_with("127.0.0.1:")));

    // The agent goes: Disconnected again.
    agent.cancel();
    harness.wait_status("e", |s| *s == privlink_relay::EndpointStatus::Disconnected).await;
    assert_eq!(endpoint_e(&status(admin).await)["status"], "Disconnected");

    // Unknown paths and methods.
    assert_eq!(curl(admin, "/nope", &[]).await.0, 404);
    assert_eq!(curl(admin, "/healthz", &["-X", "POST"]).await.0, 405);
    harness.shutdown(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_while_the_relay_drains_and_liveness_stays_200() {
    let (harness, agent) = {
        let destination = echo_server().await;
        let harness =
            Harness::start_with_admin(vec![endpoint("e", destination)], loopback_admin(None)).await;
        let agent = harness
            .spawn_agent(harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]));
        harness.wait_approved("e").await;
        (harness, agent)
    };
    let admin = harness.relay.admin_addr().expect("admin listener");
    // A connection in flight keeps the relay draining (up to its 5 s grace).
    let mut open = TcpStream::connect(harness.addr("e")).await.expect("connect");
    open.write_all(b"x").await.expect("write");
    let mut echoed = [0u8; 1];
    open.read_exact(&mut echoed).await.expect("echo");
    harness.begin_shutdown();
    let body = poll("readiness to turn 503", || async {
        let (code, body) = curl(admin, "/readyz", &[]).await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("draining"), "{body}");
    assert_eq!(curl(admin, "/healthz", &[]).await.0, 200, "liveness does not follow the drain");
    drop(open);
    harness.shutdown(&[agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_api_needs_the_bearer_token_and_the_probes_do_not() {
    let harness = Harness::start_with_admin(
        vec![endpoint("e", echo_server().await)],
        loopback_admin(Some("admin-secret")),
    )
    .await;
    let admin = harness.relay.admin_addr().expect("admin listener");
    assert_eq!(curl(admin, "/api/v1/status", &[]).await.0, 401);
    let wrong = curl(admin, "/api/v1/status", &["-H", "Authorization: Bearer nope"]).await;
    assert_eq!(wrong.0, 401);
    let right = curl(admin, "/api/v1/status", &["-H", "Authorization: Bearer admin-secret"]).await;
    assert_eq!(right.0, 200, "{}", right.1);
    assert_eq!(curl(admin, "/healthz", &[]).await.0, 200);
    assert_eq!(curl(admin, "/readyz", &[]).await.0, 200);
    harness.shutdown(&[]).await;
}

/// A page on another origin that rebinds its name to a loopback admin listener sends its own
/// name as `Host`: answered 421, whatever the path, while an IP literal, `localhost` and a
/// configured name are served; and with `metrics_require_token`, `/metrics` needs the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_its_own_host_names_are_answered_and_metrics_can_need_the_token() {
    let mut settings = AdminSettings::new(
        "127.0.0.1:0".parse().expect("addr"),
        Some(TokenDigest::of(b"admin-secret")),
    );
    settings.hosts = vec!["admin.privlink.example".to_owned()];
    settings.metrics_require_token = true;
    let harness =
        Harness::start_with_admin(vec![endpoint("e", echo_server().await)], Some(settings)).await;
    let admin = harness.relay.admin_addr().expect("admin listener");
    let port = admin.port();
    let bearer = ["-H", "Authorization: Bearer admin-secret"];
    for foreign in ["rebind.attacker.example", "evil.example:80", "127.0.0.1.nip.io"] {
        let host = format!("Host: {foreign}");
        for path in ["/api/v1/status", "/healthz", "/"] {
            let (code, body) = curl(admin, path, &["-H", &host, bearer[0], bearer[1]]).await;
            assert_eq!(code, 421, "{foreign} {path}: {body}");
        }
    }
    for own in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST".to_owned(),
        "[::1]".to_owned(),
        format!("admin.privlink.example:{port}"),
    ] {
        let host = format!("Host: {own}");
        let (code, body) =
            curl(admin, "/api/v1/status", &["-H", &host, bearer[0], bearer[1]]).await;
        assert_eq!(code, 200, "{own}: {body}");
    }
    assert_eq!(curl(admin, "/metrics", &[]).await.0, 401, "metrics need the token");
    assert_eq!(curl(admin, "/metrics", &bearer).await.0, 200);
    assert_eq!(curl(admin, "/healthz", &[]).await.0, 200, "the probes stay open");
    harness.shutdown(&[]).await;
}

/// Clients that trickle request heads, reconnecting as they are cut off, cannot starve the
/// probes: `/healthz` answers at least 95 % of them meanwhile — beside 64 such clients on the
/// prober's own address (the slowest head makes room), and beside 1,000 on another (one
/// address holds at most a quarter of the slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_do_not_starve_the_probes() {
    const PROBES: usize = 20;
    let harness =
        Harness::start_with_admin(vec![endpoint("e", echo_server().await)], loopback_admin(None))
            .await;
    let admin = harness.relay.admin_addr().expect("admin listener");
    for (attackers, from) in [(64, "127.0.0.1"), (1_000, "127.0.0.2")] {
        let from: std::net::IpAddr = from.parse().expect("ip");
        let stop = tokio_util::sync::CancellationToken::new();
        // A permit for each client that has sent the start of its request once.
        let started = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let mut trickling = tokio::task::JoinSet::new();
        for _ in 0..attackers {
            let stop = stop.clone();
            let started = std::sync::Arc::clone(&started);
            trickling.spawn(async move {
                let mut first = true;
                // Bounded by `stop`, which the test cancels after its probes.
                while !stop.is_cancelled() {
                    let Ok(socket) = tokio::net::TcpSocket::new_v4() else { return };
                    if socket.bind(SocketAddr::new(from, 0)).is_err() {
                        return;
                    }
                    let Ok(mut socket) = socket.connect(admin).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    if socket
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    if std::mem::take(&mut first) {
                        started.add_permits(1);
                    }
                    // One byte of a header every 100 ms, until the listener cuts it off.
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                        if socket.write_all(b"X").await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
        // Every trickling client has started before the probes.
        let all = u32::try_from(attackers).expect("small");
        let begun = tokio::time::timeout(WAIT, started.acquire_many(all)).await;
        begun.expect("the trickling clients start").expect("open").forget();
        let mut answered = 0;
        let mut failures = Vec::new();
        for _ in 0..PROBES {
            let started = std::time::Instant::now();
            match curl(admin, "/healthz", &["-m", "2"]).await {
                (200, _) => answered += 1,
                (code, body) => {
                    failures.push(format!("{code} after {:?}: {body}", started.elapsed()))
                }
            }
        }
        stop.cancel();
        while trickling.join_next().await.is_some() {}
        assert!(
            answered * 100 >= PROBES * 95,
            "{answered} of {PROBES} probes answered beside {attackers} trickling clients: {failures:?}"
        );
    }
    harness.shutdown(&[]).await;
}

/// A request head over the bound is refused; one that never finishes is cut off by the
/// header deadline; and the listener keeps answering others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unfinished_requests_are_cut_off() {
    let harness =
        Harness::start_with_admin(vec![endpoint("e", echo_server().await)], loopback_admin(None))
            .await;
    let admin = harness.relay.admin_addr().expect("admin listener");
    let huge = format!("X-Filler: {}", "a".repeat(privlink_admin::MAX_REQUEST_HEAD * 2));
    let (code, _) = curl(admin, "/healthz", &["-H", &huge]).await;
    assert_eq!(code, 431, "an oversized request head is refused");

    let mut slow = TcpStream::connect(admin).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    assert_eq!(curl(admin, "/healthz", &[]).await.0, 200, "others are served meanwhile");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        privlink_admin::HEADER_TIMEOUT + Duration::from_secs(5),
        slow.read_to_end(&mut rest),
    )
    .await;
    assert!(ended.is_ok(), "an unfinished request head is cut off by the header deadline");
    harness.shutdown(&[]).await;
}

/// Waits until the agent's status satisfies `want`.
async fn wait_agent_status(
    status: &privlink_agent::status::AgentStatus,
    want: impl Fn(&privlink_agent::status::AgentStatus) -> bool,
) {
    let mut changes = status.subscribe();
    let wait = async {
        while !want(status) {
            let _ = changes.changed().await;
        }
    };
    tokio::time::timeout(WAIT, wait).await.expect("the agent's status changes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_readiness_and_status_follow_its_relay_link() {
    let destination = echo_server().await;
    let harness = Harness::start(vec![endpoint("e", destination)]).await;
    let mut config = harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]);
    config.admin = loopback_admin(None);
    let agent = privlink_agent::Agent::new(config).expect("agent starts");
    let admin = agent.admin_addr().expect("admin listener");
    let status = agent.status();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(agent.run(stop.clone()));

    harness.wait_approved("e").await;
    wait_agent_status(&status, |s| s.any_connected()).await;
    assert_eq!(curl(admin, "/healthz", &[]).await, (200, "ok\n".to_owned()));
    assert_eq!(curl(admin, "/readyz", &[]).await, (200, "ready\n".to_owned()));
    let (code, body) = curl(admin, "/api/v1/status", &[]).await;
    assert_eq!(code, 200, "{body}");
    let json: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["role"], "agent");
    let link = &json["links"][0];
    assert_eq!(link["state"], "connected", "{json}");
    assert_eq!(link["transport"], "quic", "{json}");
    assert_eq!(link["verdicts"]["e"]["verdict"], "Approved", "{json}");
    assert_eq!(link["address"], harness.relay.tunnel_addr().to_string(), "{json}");

    // Its metrics: the link, and a stream counted once it ends.
    let payload = vec![3u8; 50_000];
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    assert_eq!(echo_round_trip(socket, &payload).await, payload);
    let samples = poll("the stream to be counted", || async {
        let samples = scrape(admin).await;
        let completed =
            sample(&samples, "privlink_agent_streams_total", &[("outcome", "completed")]);
        (completed == Some(1.0)).then_some(samples)
    })
    .await;
    assert_eq!(sample(&samples, "privlink_build_info", &[("role", "agent")]), Some(1.0));
    let up = sample(
        &samples,
        "privlink_agent_relay_links",
        &[("state", "connected"), ("transport", "quic")],
    );
    assert_eq!(up, Some(1.0));
    let to = sample(&samples, "privlink_agent_bytes_total", &[("direction", "to_destination")]);
    assert_eq!(to, Some(50_000.0));
    let connects = sample(&samples, "privlink_agent_connect_duration_seconds_count", &[]);
    assert_eq!(connects, Some(1.0));
    assert!(samples.iter().all(|s| s["help"].as_str().is_some_and(|h| !h.is_empty())));

    // The relay goes away: the link is down and the agent is not ready, though alive.
    harness.shutdown(&[]).await;
    wait_agent_status(&status, |s| !s.any_connected()).await;
    let (code, body) = curl(admin, "/readyz", &[]).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no relay link"), "{body}");
    assert_eq!(curl(admin, "/healthz", &[]).await.0, 200);
    let (_, body) = curl(admin, "/api/v1/status", &[]).await;
    let json: Value = serde_json::from_str(&body).expect("JSON");
    assert_ne!(json["links"][0]["state"], "connected", "{json}");

    stop.cancel();
    tokio::time::timeout(WAIT, running).await.expect("agent stops").expect("agent task");
}

/// Prometheus' own Python parser (prometheus_client from PyPI; `.ci/run` installs it).
const PARSE_METRICS: &str = include_str!("scripts/parse_metrics.py");

/// `/metrics` parsed by a real Prometheus parser: the samples as (name, labels, value).
async fn scrape(admin: SocketAddr) -> Vec<Value> {
    let (code, text) = curl(admin, "/metrics", &[]).await;
    assert_eq!(code, 200, "{text}");
    let parsed = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = Command::new("python3")
            .args(["-c", PARSE_METRICS])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
        child.wait_with_output().expect("parser")
    })
    .await
    .expect("join");
    assert!(
        parsed.status.success(),
        "prometheus_client could not parse /metrics (pip install prometheus_client): {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&parsed.stdout).expect("samples")
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_prometheus_and_count_what_happens() {
    let destination = echo_server().await;
    let mut spec = endpoint("e", destination);
    spec.acl.deny.push("127.0.0.2/32".parse().expect("cidr"));
    let harness = Harness::start_with_admin(vec![spec], loopback_admin(None)).await;
    let admin = harness.relay.admin_addr().expect("admin listener");
    let before = scrape(admin).await;
    assert_eq!(sample(&before, "privlink_build_info", &[("role", "relay")]), Some(1.0));
    let posture = [("crypto", "aws-lc-rs"), ("fips", "false")];
    assert_eq!(sample(&before, "privlink_build_info", &posture), Some(1.0), "the build's crypto");
    let e_status = |samples: &[Value], status| {
        sample(samples, "privlink_relay_endpoint_status", &[("endpoint", "e"), ("status", status)])
    };
    assert_eq!(e_status(&before, "Disconnected"), Some(1.0));
    assert_eq!(e_status(&before, "Approved"), Some(0.0));

    let agent =
        harness.spawn_agent(harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]));
    harness.wait_approved("e").await;
    let payload = vec![7u8; 100_000];
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    assert_eq!(echo_round_trip(socket, &payload).await, payload);
    assert!(is_refused(connect_from("127.0.0.2", harness.addr("e")).await).await, "ACL");
    // The flow ends (and is counted) just after the client sees the end.
    let after = poll("the connection to be counted", || async {
        let samples = scrape(admin).await;
        let completed = sample(
            &samples,
            "privlink_relay_connections_total",
            &[("endpoint", "e"), ("outcome", "completed")],
        );
        (completed == Some(1.0)).then_some(samples)
    })
    .await;
    assert_eq!(e_status(&after, "Approved"), Some(1.0));
    assert_eq!(e_status(&after, "Disconnected"), Some(0.0));
    let bytes = |direction| {
        sample(&after, "privlink_relay_bytes_total", &[("endpoint", "e"), ("direction", direction)])
    };
    assert_eq!(bytes("from_client"), Some(100_000.0));
    assert_eq!(bytes("to_client"), Some(100_000.0));
    let denied = sample(
        &after,
        "privlink_relay_connections_total",
        &[("endpoint", "e"), ("outcome", "acl_denied")],
    );
    assert_eq!(denied, Some(1.0));
    let agents = sample(
        &after,
        "privlink_relay_agents_connected",
        &[("connector", CONNECTOR), ("transport", "quic")],
    );
    assert_eq!(agents, Some(1.0));
    let opened = sample(&after, "privlink_relay_open_duration_seconds_count", &[("endpoint", "e")]);
    assert_eq!(opened, Some(1.0));
    // Every family says what it is, and no label carries a client address.
    for s in &after {
        assert!(s["help"].as_str().is_some_and(|h| !h.is_empty()), "no HELP: {s}");
        let labels = s["labels"].as_object().expect("labels");
        assert!(labels.keys().all(|k| k != "client"), "{s}");
        assert!(
            labels.values().all(|v| !v.as_str().is_some_and(|v| v.contains("127.0.0."))),
            "{s}"
        );
    }
    harness.shutdown(&[agent]).await;
}

/// Asks `ask` until it returns something, pausing briefly between tries; panics after [`WAIT`].
async fn poll<T, F, Fut>(what: &str, mut ask: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(found) = ask().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `/api/v1/connections` as JSON.
async fn connections(admin: SocketAddr) -> Value {
    let (code, body) = curl(admin, "/api/v1/connections", &[]).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("connections are JSON ({e}): {body}"))
}

/// A relay and an agent in this runtime, each with a loopback admin listener, endpoint `e`
/// (an echo server) approved.
struct Served {
    destination: SocketAddr,
    harness: Harness,
    relay_admin: SocketAddr,
    agent_admin: SocketAddr,
    /// Stops the agent.
    stop: tokio_util::sync::CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

async fn served_with_admin_listeners() -> Served {
    let destination = echo_server().await;
    let harness =
        Harness::start_with_admin(vec![endpoint("e", destination)], loopback_admin(None)).await;
    let relay_admin = harness.relay.admin_addr().expect("admin listener");
    let mut config = harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]);
    config.admin = loopback_admin(None);
    let agent = privlink_agent::Agent::new(config).expect("agent starts");
    let agent_admin = agent.admin_addr().expect("admin listener");
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(agent.run(stop.clone()));
    harness.wait_approved("e").await;
    Served { destination, harness, relay_admin, agent_admin, stop, running }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_listed_and_its_bytes_counted_while_it_runs() {
    let Served { destination, harness, relay_admin, agent_admin, stop, running } =
        served_with_admin_listeners().await;
    assert_eq!(connections(relay_admin).await["total"], 0);

    // A transfer in rounds that never closes: what is counted must grow while it is open.
    let mut socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    let client = socket.local_addr().expect("addr").to_string();
    let round = vec![5u8; 64 * 1024];
    let mut echoed = vec![0u8; round.len()];
    let mut last_scraped = 0.0;
    for sent in 1..=3u64 {
        socket.write_all(&round).await.expect("write");
        socket.read_exact(&mut echoed).await.expect("echo");
        let want = (sent * round.len() as u64) as f64;
        // The relay lists the connection with its bytes so far.
        let listed = poll("the relay to list the bytes so far", || async {
            let json = connections(relay_admin).await;
            let entry = json["connections"].as_array()?.first()?.clone();
            (entry["bytes_to_client"].as_f64() == Some(want)).then_some(entry)
        })
        .await;
        assert_eq!(listed["client"], client, "{listed}");
        assert_eq!(listed["endpoint"], "e", "{listed}");
        assert_eq!(listed["bytes_from_client"].as_f64(), Some(want), "{listed}");
        assert!(listed["agent"].as_str().is_some_and(|a| !a.is_empty()), "{listed}");
        assert!(listed["started_unix"].as_u64().is_some_and(|t| t > 1_600_000_000), "{listed}");
        // The byte counters have risen to it, with the connection still open.
        let scraped = poll("the relay's byte counter to rise", || async {
            let samples = scrape(relay_admin).await;
            let from = sample(
                &samples,
                "privlink_relay_bytes_total",
                &[("endpoint", "e"), ("direction", "from_client")],
            )?;
            (from == want).then_some(from)
        })
        .await;
        assert!(scraped > last_scraped);
        last_scraped = scraped;
        // And so has the agent's, for the same stream.
        poll("the agent's byte counter to rise", || async {
            let samples = scrape(agent_admin).await;
            let to =
                sample(&samples, "privlink_agent_bytes_total", &[("direction", "to_destination")])?;
            (to == want).then_some(())
        })
        .await;
    }
    let on_agent = connections(agent_admin).await;
    assert_eq!(on_agent["total"], 1, "{on_agent}");
    let stream = &on_agent["connections"][0];
    assert_eq!(stream["endpoint"], "e", "{on_agent}");
    assert_eq!(stream["client"], client, "{on_agent}");
    assert_eq!(stream["destination"], destination.to_string(), "{on_agent}");
    assert_eq!(stream["bytes_from_destination"].as_u64(), Some(3 * round.len() as u64));

    // Closed: it leaves both lists, and the counters neither drop nor count it twice.
    drop(socket);
    poll("the relay to drop the connection", || async {
        (connections(relay_admin).await["total"] == 0).then_some(())
    })
    .await;
    poll("the agent to drop the stream", || async {
        (connections(agent_admin).await["total"] == 0).then_some(())
    })
    .await;
    let samples = scrape(relay_admin).await;
    let from = sample(
        &samples,
        "privlink_relay_bytes_total",
        &[("endpoint", "e"), ("direction", "from_client")],
    );
    assert_eq!(from, Some(last_scraped));

    // The agent drains with a stream open: not ready, though alive, until it has finished.
    let mut open = TcpStream::connect(harness.addr("e")).await.expect("connect");
    open.write_all(b"x").await.expect("write");
    open.read_exact(&mut [0u8; 1]).await.expect("echo");
    stop.cancel();
    let body = poll("the agent's readiness to turn 503", || async {
        let (code, body) = curl(agent_admin, "/readyz", &[]).await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("draining"), "{body}");
    assert_eq!(curl(agent_admin, "/healthz", &[]).await.0, 200);
    drop(open);
    tokio::time::timeout(WAIT, running).await.expect("agent stops").expect("agent task");
    harness.shutdown(&[]).await;
}

/// The JSON example that follows `heading` in docs/admin-api.md.
fn documented_example(heading: &str) -> Value {
    const DOC: &str = include_str!("../docs/admin-api.md");
    let after = DOC.split_once(heading).unwrap_or_else(|| panic!("the doc has {heading}")).1;
    let block = after.split_once("```json\n").expect("an example").1;
    let json = block.split_once("```").expect("the example ends").0;
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{heading}'s example is JSON: {e}"))
}

/// Every key path in `value` (`agents[].verdicts.*.verdict`): array items merged, and the
/// keys of a `verdicts` map (endpoint names) and of an `ended` map (outcomes) as `*`.
fn key_paths(value: &Value, path: &str, into: &mut std::collections::BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                // Maps keyed by endpoint or by outcome.
                let any = path.ends_with("verdicts") || path.ends_with("ended");
                let key = if any { "*" } else { key.as_str() };
                let here = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
                into.insert(here.clone());
                key_paths(inner, &here, into);
            }
        }
        Value::Array(items) => {
            for item in items {
                key_paths(item, &format!("{path}[]"), into);
            }
        }
        _ => {}
    }
}

/// Every key path in `value` whose value is `null` or an empty list: what is documented below
/// it cannot be served (a relay without a fleet serves `"fleet": null`).
fn empty_paths(value: &Value, path: &str, into: &mut std::collections::BTreeSet<String>) {
    match value {
        Value::Null => {
            into.insert(path.to_owned());
        }
        Value::Array(items) if items.is_empty() => {
            into.insert(format!("{path}[]"));
        }
        Value::Object(map) => {
            for (key, inner) in map {
                // Maps keyed by endpoint or by outcome.
                let any = path.ends_with("verdicts") || path.ends_with("ended");
                let key = if any { "*" } else { key.as_str() };
                let here = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
                empty_paths(inner, &here, into);
            }
        }
        Value::Array(items) => {
            for item in items {
                empty_paths(item, &format!("{path}[]"), into);
            }
        }
        _ => {}
    }
}

fn assert_same_keys(live: &Value, heading: &str) {
    let (mut documented, mut served, mut empty) =
        (Default::default(), Default::default(), std::collections::BTreeSet::new());
    key_paths(&documented_example(heading), "", &mut documented);
    key_paths(live, "", &mut served);
    empty_paths(live, "", &mut empty);
    // Keys documented under a value the live answer leaves empty are not expected from it.
    documented.retain(|path: &String| {
        served.contains(path)
            || !empty.iter().any(|e| {
                path.strip_prefix(e.as_str()).is_some_and(|rest| rest.starts_with(['.', '[']))
            })
    });
    assert_eq!(served, documented, "{heading}: the live answer and the doc differ: {live:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_have_exactly_the_keys_the_doc_shows() {
    let Served { destination: _, harness, relay_admin, agent_admin, stop, running } =
        served_with_admin_listeners().await;
    // One connection open, so that both connection lists have an entry.
    let mut open = TcpStream::connect(harness.addr("e")).await.expect("connect");
    open.write_all(b"x").await.expect("write");
    open.read_exact(&mut [0u8; 1]).await.expect("echo");
    let agent_status = poll("the agent's link to show its verdict", || async {
        let status = status(agent_admin).await;
        (status["links"][0]["verdicts"]["e"]["verdict"] == "Approved").then_some(status)
    })
    .await;

    assert_same_keys(&status(relay_admin).await, "## `/api/v1/status` (relay)");
    assert_same_keys(&agent_status, "## `/api/v1/status` (agent)");
    assert_same_keys(&connections(relay_admin).await, "## `/api/v1/connections`");
    // The connection above ends with a completed outcome the history counts.
    drop(open);
    let history = poll("the history to count the connection that ended", || async {
        let (_, body) = curl(relay_admin, "/api/v1/history", &[]).await;
        let history: Value = serde_json::from_str(&body).expect("JSON");
        let counted = history["buckets"].as_array().is_some_and(|buckets| {
            buckets.iter().any(|b| b["ended"]["completed"].as_u64().is_some_and(|n| n > 0))
        });
        counted.then_some(history)
    })
    .await;
    assert_same_keys(&history, "## `/api/v1/history`");
    for admin in [relay_admin, agent_admin] {
        let (code, body) = curl(admin, "/api/v1/events", &[]).await;
        assert_eq!(code, 200, "{body}");
        let live: Value = serde_json::from_str(&body).expect("JSON");
        let mut served = Default::default();
        key_paths(&live, "", &mut served);
        let mut documented = Default::default();
        key_paths(&documented_example("## `/api/v1/events`"), "", &mut documented);
        for common in ["events", "events[].time", "events[].code", "events[].event"] {
            assert!(documented.contains(common) && served.contains(common), "{common}: {live:#}");
        }
    }
    // What the types read back is what was served.
    let (_, body) = curl(relay_admin, "/api/v1/status", &[]).await;
    let typed: privlink_admin::snapshot::StatusSnapshot =
        serde_json::from_str(&body).expect("the relay's answer reads as a status snapshot");
    assert_eq!(
        serde_json::to_value(&typed).expect("JSON"),
        serde_json::from_str::<Value>(&body).expect("JSON")
    );

    stop.cancel();
    tokio::time::timeout(WAIT, running).await.expect("agent stops").expect("agent task");
    harness.shutdown(&[]).await;
}
