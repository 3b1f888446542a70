//! Bad input from every side, kept here so it keeps being tried: peers driven by hand with the
//! protocol crate (a wrong token, names that forge log lines, a relay asking for a destination
//! the agent never allowed, a full stream limit) and clients and destinations that misbehave
//! (stalling a direction of the tunnel).

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::frame::MAX_BODY_LEN;
use privlink_protocol::message::{
    Control, EndpointAssignment, EndpointVerdict, Open, OpenFailCode, OpenReply, PROTOCOL_VERSION,
    Verdict,
};
use privlink_transport::io::{read_frame, write_frame};
use privlink_transport::limits::STREAM_RECEIVE_WINDOW as WINDOW;
use privlink_transport::tls;
use privlink_transport::tunnel::{CloseCode, RelayConnection, StreamError, TransportKind};
use privlink_transport::{h2, quic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Dials the relay as an agent would on `transport` and presents `connector` / `token`;
/// returns the relay's answer to the hello.
async fn hello_with(
    harness: &Harness,
    transport: TransportKind,
    connector: &str,
    token: &str,
) -> Result<Control, String> {
    timed_hello(harness, transport, connector, token, "raw").await.map(|(answer, _)| answer)
}

/// [`hello_with`], and how long the relay took to answer the hello (the dial not included).
async fn timed_hello(
    harness: &Harness,
    transport: TransportKind,
    connector: &str,
    token: &str,
    agent_name: &str,
) -> Result<(Control, Duration), String> {
    let connection = dial_relay(harness, transport).await?;
    let (_control, answer, took) = hello_on(&connection, connector, token, agent_name).await?;
    Ok((answer, took))
}

async fn wrong_tokens_are_refused_with_a_reason_and_never_lock_the_right_one_out(
    transport: TransportChoice,
) {
    let transport = match transport {
        TransportChoice::Tcp => TransportKind::Tcp,
        _ => TransportKind::Quic,
    };
    let harness = Harness::start(vec![endpoint("e", echo_server().await)]).await;

    let answer =
        hello_with(&harness, transport, CONNECTOR, "not-the-token").await.expect("an answer");
    let Control::Refused { reason } = answer else { panic!("expected a refusal, got {answer:?}") };
    assert!(reason.contains("authentication failed"), "{reason}");
    assert!(!reason.contains("not-the-token"), "the refusal must not echo the token");
    assert!(harness.relay.agents(CONNECTOR).is_empty());

    let answer = hello_with(&harness, transport, "no-such-connector", &harness.token)
        .await
        .expect("an answer");
    assert!(matches!(answer, Control::Refused { .. }), "{answer:?}");

    // The right token is welcomed (so the refusals above were about the token).
    let answer = hello_with(&harness, transport, CONNECTOR, &harness.token.clone())
        .await
        .expect("an answer");
    assert!(
        matches!(answer, Control::Welcome { ref endpoints } if endpoints.len() == 1),
        "{answer:?}"
    );

    // Ten more failures from the same address: each is refused with its reason (slowed down,
    // not cut off), and the right token is then served at once — a wrong token, from a
    // misconfigured agent behind the same NAT say, never locks the right one out.
    for attempt in 0..10 {
        let answer = hello_with(&harness, transport, CONNECTOR, "wrong")
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: no refusal but {e}"));
        assert!(
            matches!(answer, Control::Refused { ref reason } if reason.contains("authentication failed")),
            "attempt {attempt}: {answer:?}"
        );
    }
    let (answer, took) = timed_hello(&harness, transport, CONNECTOR, &harness.token.clone(), "raw")
        .await
        .expect("the right token is answered");
    assert!(matches!(answer, Control::Welcome { .. }), "{answer:?}");
    assert!(took < Duration::from_secs(1), "the right token waited {took:?} after wrong ones");
    harness.shutdown(&[]).await;
}

/// A hello whose names could forge log lines (a newline, an escape sequence, a 60 kB name) is
/// refused by name syntax, even with the right token, and never registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_with_names_that_could_forge_log_lines_are_refused() {
    let harness = Harness::start(vec![endpoint("e", echo_server().await)]).await;
    let token = harness.token.clone();
    let huge = "a".repeat(60_000);
    for name in ["agent\n2026-12-01T00:00:00Z INFO agent connected", "x\u{1b}[31m", huge.as_str()] {
        let answer = timed_hello(&harness, TransportKind::Quic, CONNECTOR, &token, name)
            .await
            .map(|(answer, _)| answer)
            .expect("an answer");
        assert!(
            matches!(answer, Control::Refused { ref reason } if reason.contains("invalid hello: agent_name")),
            "{answer:?}"
        );
    }
    assert!(harness.relay.agents(CONNECTOR).is_empty());
    harness.shutdown(&[]).await;
}

/// A QUIC endpoint with the relay's certificate and transport settings but no relay logic:
/// the test plays the relay by hand.
fn bare_relay_endpoint(pki: &Pki) -> quinn::Endpoint {
    let reset_secret = pki.relay.key_der.secret_der();
    quic::relay_endpoint(
        "127.0.0.1:0".parse().expect("addr"),
        bare_relay_tls(pki),
        reset_secret,
        WINDOW,
    )
    .expect("endpoint")
}

/// The relay's TLS settings for `pki`'s certificate, as a bare relay accepts with them.
fn bare_relay_tls(pki: &Pki) -> rustls::ServerConfig {
    tls::tunnel_server_config(
        vec![pki.relay.cert_der.clone()],
        pki.relay.key_der.clone_key(),
        Default::default(),
    )
    .expect("tls")
}

/// A relay that does not follow the rules: it assigns and then opens a destination the agent
/// never allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_destinations_outside_its_allowlist_even_when_a_relay_asks() {
    init_tracing();
    let pki = pki();
    let fake_relay = bare_relay_endpoint(&pki);
    let relay_addr = fake_relay.local_addr().expect("addr");

    // A private service the agent must not open, and one it may.
    let secret_service = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let secret_addr = secret_service.local_addr().expect("addr");
    let allowed = echo_server().await;

    // A harness only for its agent-config builder; its own relay is not used.
    let harness = Harness::start(vec![]).await;
    let mut config = harness.agent_config(TransportChoice::Quic, &[rule_for(allowed)]);
    config.relays[0].port = relay_addr.port();
    config.relay_roots = vec![pki.ca.identity.cert_der.clone()];
    let agent = harness.spawn_agent(config);

    let incoming = tokio::time::timeout(WAIT, fake_relay.accept())
        .await
        .expect("agent dials")
        .expect("incoming");
    let connection: RelayConnection =
        quic::accept(incoming, WAIT, &bare_relay_tls(&pki), WINDOW).await.expect("handshake");
    let mut control = connection.open_stream(WAIT).await.expect("control stream");
    write_frame(
        &mut control,
        &Control::RelayHello {
            protocol_version: PROTOCOL_VERSION,
            software_version: "evil".into(),
        },
    )
    .await
    .expect("relay hello");
    let hello: Control = read_frame(&mut control, MAX_BODY_LEN, WAIT).await.expect("hello");
    assert!(matches!(hello, Control::Hello(_)));
    write_frame(
        &mut control,
        &Control::Welcome {
            endpoints: vec![
                EndpointAssignment { name: "sneaky".into(), destination: secret_addr.to_string() },
                EndpointAssignment { name: "fine".into(), destination: allowed.to_string() },
            ],
        },
    )
    .await
    .expect("welcome");
    let verdicts: Control = read_frame(&mut control, MAX_BODY_LEN, WAIT).await.expect("verdicts");
    let Control::Verdicts(verdicts) = verdicts else {
        panic!("expected verdicts, got {verdicts:?}")
    };
    assert!(matches!(verdicts[0].verdict, Verdict::Rejected { .. }), "{verdicts:?}");
    assert_eq!(verdicts[1].verdict, Verdict::Approved, "{verdicts:?}");

    // Ask anyway: the rejected endpoint, the rejected destination and the cloud metadata
    // address behind the approved endpoint, and an allowed destination behind an endpoint the
    // agent never approved.
    for (endpoint, destination, client) in [
        ("sneaky", secret_addr.to_string(), "198.51.100.7:50000"),
        ("fine", secret_addr.to_string(), "198.51.100.7:50001"),
        ("fine", "169.254.169.254:80".into(), "198.51.100.7:50002"),
        ("never-assigned", allowed.to_string(), "198.51.100.7:50003"),
    ] {
        let mut stream = connection.open_stream(WAIT).await.expect("data stream");
        let open = Open {
            endpoint: endpoint.into(),
            destination: destination.clone(),
            client_addr: client.parse::<SocketAddr>().expect("addr"),
            inactivity_timeout_ms: 60_000,
        };
        write_frame(&mut stream, &open).await.expect("open");
        let reply: OpenReply = read_frame(&mut stream, MAX_BODY_LEN, WAIT).await.expect("reply");
        match reply {
            OpenReply::Failed(failure) => {
                assert_eq!(failure.code, OpenFailCode::NotAllowed, "{destination}: {failure}")
            }
            OpenReply::Opened => panic!("the agent opened {destination}, which it never allowed"),
        }
    }
    // Nothing reached the private service.
    let reached = tokio::time::timeout(Duration::from_millis(200), secret_service.accept()).await;
    assert!(reached.is_err(), "the agent connected to a destination outside its allowlist");

    // The allowed destination, asked properly, is opened: the refusals above were policy.
    let mut stream = connection.open_stream(WAIT).await.expect("data stream");
    let open = Open {
        endpoint: "fine".into(),
        destination: allowed.to_string(),
        client_addr: "198.51.100.7:50004".parse().expect("addr"),
        inactivity_timeout_ms: 60_000,
    };
    write_frame(&mut stream, &open).await.expect("open");
    let reply: OpenReply = read_frame(&mut stream, MAX_BODY_LEN, WAIT).await.expect("reply");
    assert_eq!(reply, OpenReply::Opened);

    connection.close(CloseCode::Shutdown, "test over");
    harness.shutdown(&[agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_limit_is_a_clear_error_not_a_hang() {
    let pki = pki();
    let relay = bare_relay_endpoint(&pki);
    let client_tls = tls::tunnel_client_config(
        std::slice::from_ref(&pki.ca.identity.cert_der),
        Default::default(),
    )
    .expect("tls");
    let agent = quic::agent_endpoint("127.0.0.1:0".parse().expect("addr"), client_tls, WINDOW)
        .expect("agent");
    let relay_addr = relay.local_addr().expect("addr");
    let (dialed, accepted) =
        tokio::join!(quic::dial(&agent, relay_addr, "localhost", WAIT), async {
            let incoming = relay.accept().await.expect("incoming");
            quic::accept(incoming, WAIT, &bare_relay_tls(&pki), WINDOW).await
        });
    let agent_side = dialed.expect("dial");
    agent_side.allow_data_streams();
    let relay_side = accepted.expect("handshake");

    // The agent admits MAX_CONCURRENT_STREAMS data streams plus the control stream.
    let mut open = Vec::new();
    for _ in 0..=quic::MAX_CONCURRENT_STREAMS {
        open.push(relay_side.open_stream(WAIT).await.expect("within the limit"));
    }
    let started = std::time::Instant::now();
    let wait = Duration::from_millis(300);
    match relay_side.open_stream(wait).await {
        Err(StreamError::LimitReached(waited)) => {
            assert_eq!(waited, wait);
            assert!(started.elapsed() < WAIT, "the wait must be bounded");
        }
        Ok(_) => panic!("a stream beyond the agent's limit was opened"),
        Err(other) => panic!("expected LimitReached, got {other}"),
    }
}

/// Clients that stall one tunnel direction in [`stalled_clients_hold_only_their_own_windows`].
const STALLED: usize = 10;
/// Each transfer's size: far more than a stream's window, so every stalled one backs up.
const TRANSFER: usize = 40 << 20;
/// What the stalled transfers have pushed into the tunnel before the fresh one starts: enough
/// to fill a 64 MiB connection window (the old setting, with which the fresh transfer got no
/// byte at all).
const BACKED_UP: u64 = 60 << 20;

/// Ten clients that stop reading their downloads, then ten that upload to a destination that
/// stops reading: each holds back its own stream, and a fresh transfer in each direction on the
/// same tunnel connection still completes.
async fn stalled_clients_hold_only_their_own_windows(transport: TransportChoice) {
    let server = choosy_server(TRANSFER).await;
    let (harness, agent) = Harness::single(transport, server.addr).await;

    let mut stalled_downloads = Vec::new();
    for _ in 0..STALLED {
        let mut socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
        socket.write_all(&[ask::DOWNLOAD]).await.expect("ask");
        let mut first = [0u8; 4096];
        tokio::time::timeout(WAIT, socket.read_exact(&mut first))
            .await
            .expect("the download starts")
            .expect("read");
        stalled_downloads.push(socket); // and never read again
    }
    let mut sent = server.sent.clone();
    tokio::time::timeout(WAIT, sent.wait_for(|sent| *sent >= BACKED_UP))
        .await
        .expect("the stalled downloads back up")
        .expect("server runs");
    let mut fresh = TcpStream::connect(harness.addr("e")).await.expect("connect");
    fresh.write_all(&[ask::DOWNLOAD]).await.expect("ask");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, fresh.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("a fresh download froze behind {STALLED} stalled ones"))
        .expect("read");
    assert_eq!(got.len(), TRANSFER);
    assert!(*sent.borrow() < (STALLED as u64 + 1) * TRANSFER as u64, "nothing stalled");

    let pushed = Arc::new(tokio::sync::watch::Sender::new(0u64));
    let mut pushers = Vec::new();
    for _ in 0..STALLED {
        let mut socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
        socket.write_all(&[ask::SINK]).await.expect("ask");
        let pushed = Arc::clone(&pushed);
        pushers.push(tokio::spawn(async move {
            let chunk = vec![0u8; 64 * 1024];
            for _ in 0..TRANSFER / chunk.len() {
                if socket.write_all(&chunk).await.is_err() {
                    return;
                }
                pushed.send_modify(|pushed| *pushed += chunk.len() as u64);
            }
        }));
    }
    tokio::time::timeout(WAIT, pushed.subscribe().wait_for(|pushed| *pushed >= BACKED_UP))
        .await
        .expect("the stalled uploads back up")
        .expect("pushers run");
    let payload = random_bytes(TRANSFER);
    let mut fresh = TcpStream::connect(harness.addr("e")).await.expect("connect");
    fresh.write_all(&[ask::DIGEST]).await.expect("ask");
    let digest = tokio::time::timeout(WAIT, echo_round_trip(fresh, &payload))
        .await
        .unwrap_or_else(|_| panic!("a fresh upload froze behind {STALLED} stalled ones"));
    assert_eq!(digest, sha256(&payload));
    assert!(pushers.iter().all(|pusher| !pusher.is_finished()), "an upload never stalled");
    for pusher in pushers {
        pusher.abort();
    }
    drop(stalled_downloads);
    harness.shutdown(&[agent]).await;
}

/// An agent that stops taking data (its connection window full) gets no more clients stuck on
/// it: a new client's open header cannot enter its stream, and the relay turns that client away
/// within its first-write deadline instead of holding the connection (and its
/// `max_connections` slot) with no timer running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_takes_no_data_gets_no_client_stuck_on_it() {
    let harness = Harness::start(vec![endpoint("e", "192.0.2.1:443".parse().expect("addr"))]).await;
    // The misbehaving agent: a 64 KiB connection window, and it never reads a data stream.
    let mut transport = quic::transport_config(quic::Role::Agent, WINDOW);
    transport.receive_window(quinn::VarInt::from_u32(64 * 1024));
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls_for(&harness)).expect("quic tls");
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    let mut quic_endpoint =
        quic::agent_endpoint("127.0.0.1:0".parse().expect("addr"), tls_for(&harness), WINDOW)
            .expect("ep");
    quic_endpoint.set_default_client_config(client);
    let connection = quic::dial(&quic_endpoint, harness.relay.tunnel_addr(), "localhost", WAIT)
        .await
        .expect("dial");
    let (mut control, welcome, _) =
        hello_on(&connection, CONNECTOR, &harness.token.clone(), "stuck").await.expect("hello");
    assert!(matches!(welcome, Control::Welcome { .. }), "{welcome:?}");
    connection.allow_data_streams();
    let approve = vec![EndpointVerdict { endpoint: "e".into(), verdict: Verdict::Approved }];
    write_frame(&mut control, &Control::Verdicts(approve)).await.expect("verdicts");
    harness.wait_approved("e").await;

    // The first client fills the window: the relay writes its bytes into a stream nobody reads.
    let mut filler = TcpStream::connect(harness.addr("e")).await.expect("connect");
    let push = vec![0u8; 256 * 1024];
    let filling = tokio::spawn(async move {
        let _ = filler.write_all(&push).await;
        filler
    });
    // quinn says so with a DATA_BLOCKED frame once the window is full.
    let blocked = async {
        while connection.quic_stats().expect("quic").frame_rx.data_blocked == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, blocked).await.expect("the relay fills the agent's window");
    // The next client's open header finds no room; the relay gives up on it in time.
    let mut stuck = TcpStream::connect(harness.addr("e")).await.expect("connect");
    stuck.write_all(b"hello").await.expect("write");
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(WAIT, stuck.read(&mut buf))
        .await
        .expect("the relay turns the client away within its first-write deadline");
    assert!(matches!(ended, Ok(0) | Err(_)), "the stuck client got data: {ended:?}");
    filling.abort();
    drop(control);
    harness.shutdown(&[]).await;
}

/// An agent holding a valid token floods the relay with verdicts, most for endpoints that do
/// not exist: the made-up names are never recorded, and the flood of messages ends the agent's
/// session (the control conversation's rate limit) while the relay goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_flood_is_cut_off_and_made_up_endpoints_are_never_recorded() {
    let destination = echo_server().await;
    let (harness, agent) = Harness::single(TransportChoice::Quic, destination).await;
    let connection = dial_relay(&harness, TransportKind::Quic).await.expect("dial");
    let (mut control, welcome, _) =
        hello_on(&connection, CONNECTOR, &harness.token.clone(), "flooder").await.expect("hello");
    assert!(matches!(welcome, Control::Welcome { .. }), "{welcome:?}");
    // As many made-up verdicts as fit in one frame, with long reasons.
    let bogus: Vec<EndpointVerdict> = (0..250)
        .map(|i| EndpointVerdict {
            endpoint: format!("no-such-endpoint-{i}"),
            verdict: Verdict::Rejected { reason: "x".repeat(200) },
        })
        .collect();
    // The first set answers what was assigned (a first set longer than that is refused
    // outright); the flood comes as updates.
    let first = vec![EndpointVerdict {
        endpoint: "e".into(),
        verdict: Verdict::Rejected { reason: "flooder".into() },
    }];
    write_frame(&mut control, &Control::Verdicts(first)).await.expect("first verdicts");
    let mut sent = 0;
    let flood = async {
        while write_frame(&mut control, &Control::Verdicts(bogus.clone())).await.is_ok() {
            sent += 1;
            if sent == 1_000 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(WAIT, flood).await;
    let reason = tokio::time::timeout(WAIT, connection.closed())
        .await
        .expect("the relay ends a session that floods it");
    assert!(reason.contains("too fast"), "{reason}");
    assert!(sent < 1_000, "the relay took {sent} verdict messages without a word");
    // The made-up names left no trace, and the relay still serves the real endpoint.
    assert_eq!(harness.relay.endpoint_status("no-such-endpoint-1"), None);
    // The peer sees the close as the relay's session task ends: wait for the relay's view.
    let agents = harness
        .relay
        .wait_for_agents(CONNECTOR, WAIT, |agents| agents.iter().all(|a| a.name != "flooder"))
        .await;
    assert!(agents.iter().all(|a| a.name != "flooder"), "{agents:?}");
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    assert_eq!(echo_round_trip(socket, b"still served").await, b"still served");
    harness.shutdown(&[agent]).await;
}

/// A connector's token holder cannot fill the relay with agent sessions: past
/// `MAX_AGENTS_PER_CONNECTOR` the next one is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_per_connector_are_capped() {
    let harness = Harness::start(vec![endpoint("e", echo_server().await)]).await;
    let token = harness.token.clone();
    let mut sessions = Vec::new();
    for i in 0..privlink_relay::agents::MAX_AGENTS_PER_CONNECTOR {
        let connection = dial_relay(&harness, TransportKind::Quic).await.expect("dial");
        let (control, answer, _) =
            hello_on(&connection, CONNECTOR, &token, &format!("agent-{i}")).await.expect("hello");
        assert!(matches!(answer, Control::Welcome { .. }), "agent {i}: {answer:?}");
        sessions.push((connection, control));
    }
    let connection = dial_relay(&harness, TransportKind::Quic).await.expect("dial");
    let (_control, answer, _) =
        hello_on(&connection, CONNECTOR, &token, "one-too-many").await.expect("hello");
    let Control::Refused { reason } = answer else { panic!("expected a refusal, got {answer:?}") };
    assert!(reason.contains("the most it takes"), "{reason}");
    // One leaves; the next is welcomed again.
    let (leaving, _) = sessions.pop().expect("a session");
    leaving.close(CloseCode::Shutdown, "leaving");
    let max = privlink_relay::agents::MAX_AGENTS_PER_CONNECTOR;
    harness.relay.wait_for_agents(CONNECTOR, WAIT, |agents| agents.len() < max).await;
    let connection = dial_relay(&harness, TransportKind::Quic).await.expect("dial");
    let (_control, answer, _) =
        hello_on(&connection, CONNECTOR, &token, "next").await.expect("hello");
    assert!(matches!(answer, Control::Welcome { .. }), "{answer:?}");
    harness.shutdown(&[]).await;
}

/// Sources that flood the tunnel port with connections that never authenticate: each holds
/// at most its share of pending places (`PendingCaps::per_source`), a newcomer beyond its share evicting its
/// own oldest (counted); with that many pending, QUIC sources must answer a Retry; throughout,
/// agents from another source get in on both transports and the endpoint keeps serving; and a
/// silent connection is cut after the first-byte deadline even while its peer holds it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_connections_is_capped_and_agents_still_get_in() {
    let (harness, agent) = Harness::single(TransportChoice::Quic, echo_server().await).await;
    let tunnel = harness.relay.tunnel_addr();
    let sources = ["127.0.0.3", "127.0.0.4", "127.0.0.5"];
    const EXTRA: usize = 8;
    let caps = harness.relay.pending_caps();
    let held = sources.len() * caps.per_source;
    assert!(held >= caps.retry_above, "the flood must be large enough to ask for Retry");

    // TCP first: each source holds its share; beyond it, each newcomer evicts its own oldest.
    let mut flood = Vec::new();
    for source in sources {
        for _ in 0..caps.per_source + EXTRA {
            if let Ok(socket) = connect_from(source, tunnel).await {
                flood.push(socket);
            }
        }
    }
    let settled = async {
        while harness.relay.turned_away_tunnel_connections() < (sources.len() * EXTRA) as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, settled).await.unwrap_or_else(|_| {
        panic!(
            "pending {} evicted {}",
            harness.relay.pending_tunnel_connections(),
            harness.relay.turned_away_tunnel_connections()
        )
    });
    assert!(harness.relay.pending_tunnel_connections() <= held, "no source exceeds its share");

    // QUIC from the same sources: each gets a place, made from its own source's oldest.
    let mut quic_flood = Vec::new();
    for source in sources {
        let endpoint = quic::agent_endpoint(
            format!("{source}:0").parse().expect("addr"),
            tls_for(&harness),
            WINDOW,
        )
        .expect("endpoint");
        let dialed = quic::dial(&endpoint, tunnel, "localhost", WAIT).await;
        quic_flood.push((endpoint, dialed.expect("a place is made for it")));
        assert!(harness.relay.pending_tunnel_connections() <= held, "{source} over its share");
    }

    // Meanwhile: an agent from another source gets in over QUIC (through a Retry, with this
    // many pending) and over TCP, and the endpoint serves.
    for transport in [TransportKind::Quic, TransportKind::Tcp] {
        let answer = hello_with(&harness, transport, CONNECTOR, &harness.token.clone())
            .await
            .unwrap_or_else(|e| panic!("{transport}: no answer during the flood: {e}"));
        assert!(matches!(answer, Control::Welcome { .. }), "{transport}: {answer:?}");
    }
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    assert_eq!(echo_round_trip(socket, b"during the flood").await, b"during the flood");

    // The silent TCP connections are cut by the first-byte deadline though their peers keep
    // them open; the QUIC ones give their places back when they go.
    drop(quic_flood);
    let drained = async {
        while harness.relay.pending_tunnel_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, drained).await.expect("pending places are given back");
    drop(flood);
    harness.shutdown(&[agent]).await;
}

/// Silent connections that reconnect as soon as they are cut — more than the total cap from
/// 20 sources (600 with the default caps), and 2,000 from the agent's own address (a NAT,
/// where nothing tells the agent's connection from the flood's until its first byte is read)
/// — cannot keep an agent out: its hello is welcomed within 3 s on both transports, several
/// times over (the first flood used to keep a reconnecting TLS/TCP agent out for as long as it
/// lasted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_flood_cannot_keep_an_agent_out() {
    let harness = Harness::start(vec![endpoint("e", echo_server().await)]).await;
    let tunnel = harness.relay.tunnel_addr();
    let twenty: Vec<String> = (10..30).map(|n| format!("127.0.1.{n}")).collect();
    // Over the total cap, each source within its share.
    let each =
        (harness.relay.pending_caps().total / 20 + 5).min(harness.relay.pending_caps().per_source);
    let cases = [
        (format!("{} from 20 sources", 20 * each), twenty, each),
        ("2,000 from the agent's own address".to_owned(), vec!["127.0.0.1".to_owned()], 2_000),
    ];
    for (label, sources, per_source) in cases {
        let stop = tokio_util::sync::CancellationToken::new();
        let opened = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let mut flood = tokio::task::JoinSet::new();
        for source in &sources {
            for _ in 0..per_source {
                let (source, stop, opened) = (source.clone(), stop.clone(), opened.clone());
                flood.spawn(async move {
                    let mut first = true;
                    // Bounded by `stop`, which the test cancels after its hellos.
                    while !stop.is_cancelled() {
                        let Ok(mut socket) = connect_from(&source, tunnel).await else {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_millis(20)) => continue,
                            }
                        };
                        if std::mem::take(&mut first) {
                            opened.add_permits(1);
                        }
                        // Silent until the relay cuts it, then again.
                        let mut byte = [0u8; 1];
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = socket.read(&mut byte) => {}
                        }
                    }
                });
            }
        }
        let all = u32::try_from(sources.len() * per_source).expect("small");
        let begun = tokio::time::timeout(WAIT, opened.acquire_many(all)).await;
        begun.expect("the flood opens").expect("open").forget();
        for transport in [TransportKind::Tcp, TransportKind::Quic] {
            for _ in 0..3 {
                let token = harness.token.clone();
                let hello = hello_with(&harness, transport, CONNECTOR, &token);
                let answer = tokio::time::timeout(Duration::from_secs(3), hello)
                    .await
                    .unwrap_or_else(|_| panic!("{label}: no welcome over {transport} in 3 s"))
                    .unwrap_or_else(|e| panic!("{label}: {transport}: {e}"));
                assert!(matches!(answer, Control::Welcome { .. }), "{label}: {answer:?}");
            }
        }
        stop.cancel();
        while flood.join_next().await.is_some() {}
    }
    harness.shutdown(&[]).await;
}

/// A client that stops reading its download is reset at the endpoint's stall timeout, and an
/// upload into a destination that stops reading at the agent's — though the inactivity timeout
/// (60 s) never fires, since a stalled stream's other direction may still move; each is counted
/// as `stalled`, and a fresh transfer on the same endpoint is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receivers_are_reset_at_the_stall_timeout() {
    const STALL: Duration = Duration::from_secs(2);
    // More than every buffer on the way can hold (kernel socket buffers autotune to tens of MiB
    // here), so that a receiver that stops reading does hold the transfer back.
    const DOWNLOAD: usize = 160 << 20;
    let server = choosy_server(DOWNLOAD).await;
    let mut spec = endpoint("e", server.addr);
    spec.stall_timeout = STALL;
    let admin = Some(privlink_relay::config::AdminSettings::new(
        "127.0.0.1:0".parse().expect("addr"),
        None,
    ));
    let harness = Harness::start_with_admin(vec![spec], admin).await;
    let mut config = harness.agent_config(TransportChoice::Quic, &[rule_for(server.addr)]);
    config.stall_timeout = STALL;
    let agent = privlink_agent::Agent::new(config).expect("agent starts");
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(agent.run(stop.clone()));
    harness.wait_approved("e").await;

    // A download read once, then never again: reset, well before the transfer could end.
    let mut download = TcpStream::connect(harness.addr("e")).await.expect("connect");
    download.write_all(&[ask::DOWNLOAD]).await.expect("ask");
    let mut first = [0u8; 4096];
    download.read_exact(&mut first).await.expect("the download starts");
    // An upload into a destination that never reads: cut by the agent.
    let mut upload = TcpStream::connect(harness.addr("e")).await.expect("connect");
    upload.write_all(&[ask::SINK]).await.expect("ask");
    let pushing = tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        // Bounded: far more than every buffer on the way holds, and the copy is cut first.
        for _ in 0..(TRANSFER * 4) / chunk.len() {
            if upload.write_all(&chunk).await.is_err() {
                return true;
            }
        }
        false
    });
    // Meanwhile a fresh download is served whole.
    let mut fresh = TcpStream::connect(harness.addr("e")).await.expect("connect");
    fresh.write_all(&[ask::DOWNLOAD]).await.expect("ask");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, fresh.read_to_end(&mut got)).await.expect("in time").expect("read");
    assert_eq!(got.len(), DOWNLOAD);
    drop(fresh);

    let cut = tokio::time::timeout(WAIT, pushing).await.expect("the upload is cut").expect("join");
    assert!(cut, "the stalled upload was never cut");
    // Both stalled connections are gone, and the relay counted at least the download as
    // stalled (the upload is cut by whichever side saw it first: the agent, or the relay).
    let admin = harness.relay.admin_addr().expect("admin listener");
    let counted = |body: &str| {
        body.contains("privlink_relay_connections_active{endpoint=\"e\"} 0")
            && body.contains("privlink_relay_connections_total{endpoint=\"e\",outcome=\"stalled\"}")
    };
    tokio::task::block_in_place(|| {
        privlink_testbed::process::AdminProbe::new(None, admin)
            .wait("/metrics", |code, body| code == 200 && counted(body));
    });
    let mut rest = Vec::new();
    let read = download.read_to_end(&mut rest).await;
    assert!(read.is_err() || rest.len() + first.len() < DOWNLOAD, "the stalled download ran on");

    stop.cancel();
    tokio::time::timeout(WAIT, running).await.expect("agent stops").expect("agent task");
    harness.shutdown(&[]).await;
}

/// A relay played by hand on either transport: a bound listener with the relay's certificate.
enum FakeRelay {
    Quic(quinn::Endpoint, Box<rustls::ServerConfig>),
    Tcp(TcpListener, tokio_rustls::TlsAcceptor),
}

impl FakeRelay {
    async fn bind(pki: &Pki, transport: TransportChoice) -> Self {
        match transport {
            TransportChoice::Tcp => {
                let server_tls = tls::tunnel_server_config(
                    vec![pki.relay.cert_der.clone()],
                    pki.relay.key_der.clone_key(),
                    Default::default(),
                )
                .expect("tls");
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                Self::Tcp(listener, tokio_rustls::TlsAcceptor::from(Arc::new(server_tls)))
            }
            _ => Self::Quic(bare_relay_endpoint(pki), Box::new(bare_relay_tls(pki))),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Self::Quic(endpoint, _) => endpoint.local_addr().expect("addr"),
            Self::Tcp(listener, _) => listener.local_addr().expect("addr"),
        }
    }

    /// The relay's side of the next agent connection.
    async fn accept(&self) -> RelayConnection {
        match self {
            Self::Quic(endpoint, tls) => {
                let incoming = tokio::time::timeout(WAIT, endpoint.accept())
                    .await
                    .expect("agent dials")
                    .expect("incoming");
                quic::accept(incoming, WAIT, tls, WINDOW).await.expect("handshake")
            }
            Self::Tcp(listener, acceptor) => {
                let (socket, remote) = tokio::time::timeout(WAIT, listener.accept())
                    .await
                    .expect("agent dials")
                    .expect("accept");
                h2::accept(socket, remote, acceptor.clone(), WINDOW, WAIT)
                    .await
                    .expect("handshake")
                    .into()
            }
        }
    }
}

/// Writes an `Open` for `endpoint` → `destination` on a new stream and returns the agent's
/// reply, or what kept it from coming.
async fn ask_open(
    connection: &RelayConnection,
    endpoint: &str,
    destination: SocketAddr,
    wait: Duration,
) -> Result<OpenReply, String> {
    let mut stream = connection.open_stream(wait).await.map_err(|e| e.to_string())?;
    let open = Open {
        endpoint: endpoint.into(),
        destination: destination.to_string(),
        client_addr: "198.51.100.7:50000".parse().expect("addr"),
        inactivity_timeout_ms: 60_000,
    };
    write_frame(&mut stream, &open).await.map_err(|e| e.to_string())?;
    read_frame(&mut stream, MAX_BODY_LEN, wait).await.map_err(|e| e.to_string())
}

/// A relay (a compromised one, say) cannot pile streams and their data up in an agent before
/// the control handshake: the agent admits only the control stream until it has sent its
/// verdicts, then data streams as usual.
async fn no_data_streams_before_the_handshake(transport: TransportChoice) {
    let pki = pki();
    let fake = FakeRelay::bind(&pki, transport).await;
    let allowed = echo_server().await;
    let harness = Harness::start(vec![]).await; // for its agent-config builder only
    let mut config = harness.agent_config(transport, &[rule_for(allowed)]);
    config.relays[0].port = fake.addr().port();
    config.relay_roots = vec![pki.ca.identity.cert_der.clone()];
    let agent = harness.spawn_agent(config);
    let connection = fake.accept().await;

    let mut control = connection.open_stream(WAIT).await.expect("control stream");
    let relay_hello =
        Control::RelayHello { protocol_version: PROTOCOL_VERSION, software_version: String::new() };
    write_frame(&mut control, &relay_hello).await.expect("relay hello");
    let hello: Control = read_frame(&mut control, MAX_BODY_LEN, WAIT).await.expect("hello");
    assert!(matches!(hello, Control::Hello(_)), "{hello:?}");
    // Before the welcome: a data stream gets no answer (QUIC: no stream credit; TCP: refused).
    let early = ask_open(&connection, "e", allowed, Duration::from_millis(500)).await;
    assert!(early.is_err(), "the agent took a data stream before the handshake: {early:?}");

    let welcome = Control::Welcome {
        endpoints: vec![EndpointAssignment { name: "e".into(), destination: allowed.to_string() }],
    };
    write_frame(&mut control, &welcome).await.expect("welcome");
    let verdicts: Control = read_frame(&mut control, MAX_BODY_LEN, WAIT).await.expect("verdicts");
    assert!(matches!(verdicts, Control::Verdicts(_)), "{verdicts:?}");
    // After it: streams are taken as usual.
    let reply = ask_open(&connection, "e", allowed, WAIT).await;
    assert_eq!(reply, Ok(OpenReply::Opened));
    connection.close(CloseCode::Shutdown, "test over");
    harness.shutdown(&[agent]).await;
}

on_both_transports!(
    wrong_tokens_are_refused_with_a_reason_and_never_lock_the_right_one_out,
    stalled_clients_hold_only_their_own_windows,
    no_data_streams_before_the_handshake,
);
