//! End-to-end tests of the tunnel core on loopback: a relay and an agent in this process,
//! real TCP sockets, real QUIC and TLS/TCP tunnels, real TLS certificates from a test CA.
//! Every scenario runs once per transport (modules `over_quic` and `over_tcp`).

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_relay::EndpointStatus;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn tls_destination_is_verified_end_to_end(transport: TransportChoice) {
    init_tracing();
    // The vault: TLS with a certificate for its public name, from the test CA.
    let pki = pki();
    let vault_cert = pki.ca.issue_server(&["contoso-kv.vault.azure.net"]).expect("cert");
    let provider = privlink_transport::crypto::default_provider();
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![vault_cert.cert_der.clone()], vault_cert.key_der.clone_key())
        .expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let vault = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        // Serve every connection: the second client below must fail on the certificate, not
        // on a vault that stopped listening.
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else { return };
                let mut request = vec![0u8; 64];
                let n = tls.read(&mut request).await.expect("read request");
                assert!(request[..n].starts_with(b"GET /secrets/s"));
                tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"value\":\"v\"}")
                    .await
                    .expect("reply");
                tls.shutdown().await.expect("close_notify");
            });
        }
    });

    let (harness, agent) = Harness::single(transport, vault).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.identity.cert_der.clone()).expect("root");
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = TcpStream::connect(harness.addr("e")).await.expect("connect endpoint");
    let name = ServerName::try_from("contoso-kv.vault.azure.net").expect("name");
    // The handshake verifies the vault's certificate chain and name: it can only succeed if
    // the TLS session runs end to end, untouched by relay and agent.
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake through the tunnel");
    tls.write_all(
        b"GET /secrets/s?api-version=7.4 HTTP/1.1\r\nHost: contoso-kv.vault.azure.net\r\n\r\n",
    )
    .await
    .expect("request");
    let mut response = String::new();
    tls.read_to_string(&mut response).await.expect("response");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("{\"value\":\"v\"}"));
    // Close our side too; a half-open connection is (rightly) kept until the grace period.
    drop(tls);

    // A client that trusts a different CA must fail: the certificate it sees is the vault's.
    let other = common::pki();
    let mut other_roots = rustls::RootCertStore::empty();
    other_roots.add(other.ca.identity.cert_der.clone()).expect("root");
    let untrusting =
        rustls::ClientConfig::builder_with_provider(privlink_transport::crypto::default_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(other_roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(harness.addr("e")).await.expect("connect endpoint");
    let result = tokio_rustls::TlsConnector::from(Arc::new(untrusting))
        .connect(ServerName::try_from("contoso-kv.vault.azure.net").expect("name"), tcp)
        .await;
    let error =
        result.expect_err("a client with another CA must not accept the vault's certificate");
    let cause = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(
        matches!(cause, Some(rustls::Error::InvalidCertificate(_))),
        "the handshake must fail on the certificate, not on something else: {error}"
    );
    harness.shutdown(&[agent]).await;
}

async fn bulk_64_mib_each_way_arrives_intact(transport: TransportChoice) {
    let (harness, agent) = Harness::single(transport, echo_server().await).await;
    let payload = random_bytes(64 * 1024 * 1024);
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    let back = tokio::time::timeout(Duration::from_secs(120), echo_round_trip(socket, &payload))
        .await
        .expect("64 MiB each way within two minutes");
    assert_eq!(back.len(), payload.len());
    assert_eq!(sha256(&back), sha256(&payload), "SHA-256 of what came back differs");
    harness.shutdown(&[agent]).await;
}

async fn half_close_reaches_the_destination_and_the_reply_still_arrives(
    transport: TransportChoice,
) {
    let (harness, agent) = Harness::single(transport, reply_after_eof_server().await).await;
    let mut socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    let request = random_bytes(100_000);
    socket.write_all(&request).await.expect("write");
    // The server answers only after it sees EOF: the FIN must cross the tunnel, and the
    // reply must still come back on the half-open connection.
    socket.shutdown().await.expect("shutdown write side");
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .expect("read");
    assert_eq!(reply, sha256(&request));
    harness.shutdown(&[agent]).await;
}

async fn five_hundred_concurrent_connections_are_all_correct(transport: TransportChoice) {
    let (harness, agent) = Harness::single(transport, echo_server().await).await;
    let addr = harness.addr("e");
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        clients.spawn(async move {
            let socket = TcpStream::connect(addr).await.expect("connect");
            let mut payload = i.to_be_bytes().repeat(2048);
            payload.extend(random_bytes(1024));
            let back = echo_round_trip(socket, &payload).await;
            assert_eq!(back, payload, "connection {i} got someone else's bytes");
        });
    }
    let all = async {
        while let Some(done) = clients.join_next().await {
            done.expect("client task");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("500 connections within a minute");
    harness.shutdown(&[agent]).await;
}

async fn inactivity_timeout_closes_idle_connections_and_spares_busy_ones(
    transport: TransportChoice,
) {
    let destination = echo_server().await;
    let mut spec = endpoint("e", destination);
    let timeout = Duration::from_millis(800);
    spec.inactivity_timeout = timeout;
    let harness = Harness::start(vec![spec]).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(destination)]));
    harness.wait_approved("e").await;

    let mut idle = TcpStream::connect(harness.addr("e")).await.expect("connect idle");
    let mut busy = TcpStream::connect(harness.addr("e")).await.expect("connect busy");
    let mut byte = [0u8; 1];
    for socket in [&mut idle, &mut busy] {
        socket.write_all(b"x").await.expect("write");
        socket.read_exact(&mut byte).await.expect("echo");
    }
    let idle_started = tokio::time::Instant::now();
    // Busy: one byte every 200 ms for four timeouts. Each must come back.
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    for _ in 0..16 {
        ticks.tick().await;
        busy.write_all(b"y").await.expect("busy connection still open");
        busy.read_exact(&mut byte).await.expect("busy connection still echoes");
    }
    // Idle: closed by now (EOF or reset), not before the timeout.
    let closed =
        tokio::time::timeout(WAIT, idle.read(&mut byte)).await.expect("idle closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "idle connection still delivered data: {closed:?}");
    assert!(idle_started.elapsed() >= timeout);
    harness.shutdown(&[agent]).await;
}

async fn acl_allows_denies_and_deny_wins(transport: TransportChoice) {
    let destination = echo_server().await;
    let mut only = endpoint("only-dot-2", destination);
    only.acl.allow = vec!["127.0.0.2/32".parse().expect("cidr")];
    let mut deny_wins = endpoint("deny-dot-3", destination);
    deny_wins.acl.allow = vec!["127.0.0.0/8".parse().expect("cidr")];
    deny_wins.acl.deny = vec!["127.0.0.3/32".parse().expect("cidr")];
    let harness = Harness::start(vec![only, deny_wins]).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(destination)]));
    harness.wait_approved("only-dot-2").await;
    harness.wait_approved("deny-dot-3").await;

    let served = |socket| async move { echo_round_trip(socket, b"hello").await == b"hello" };
    let a = harness.addr("only-dot-2");
    assert!(served(connect_from("127.0.0.2", a).await.expect("connect")).await, "allowed source");
    assert!(is_refused(connect_from("127.0.0.3", a).await).await, "source outside allow");
    let b = harness.addr("deny-dot-3");
    assert!(served(connect_from("127.0.0.2", b).await.expect("connect")).await, "allowed source");
    assert!(is_refused(connect_from("127.0.0.3", b).await).await, "deny must win");
    assert_eq!(harness.relay.endpoint_refusals("only-dot-2"), Some((1, 0)));
    assert_eq!(harness.relay.endpoint_refusals("deny-dot-3"), Some((1, 0)));
    harness.shutdown(&[agent]).await;
}

async fn max_connections_refuses_the_excess_and_leaves_the_rest_alone(transport: TransportChoice) {
    let destination = echo_server().await;
    let mut spec = endpoint("e", destination);
    spec.max_connections = 2;
    let harness = Harness::start(vec![spec]).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(destination)]));
    harness.wait_approved("e").await;

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
        let mut byte = [0u8; 1];
        socket.write_all(b"a").await.expect("write");
        socket.read_exact(&mut byte).await.expect("served");
        held.push(socket);
    }
    assert!(
        is_refused(TcpStream::connect(harness.addr("e")).await).await,
        "third connection must be refused"
    );
    assert_eq!(harness.relay.endpoint_refusals("e"), Some((0, 1)));
    // The two admitted connections are untouched.
    for socket in held {
        assert_eq!(echo_round_trip(socket, b"still here").await, b"still here");
    }
    harness.shutdown(&[agent]).await;
}

async fn unreachable_destination_closes_the_client_connection(transport: TransportChoice) {
    // A port with nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let (harness, agent) = Harness::single(transport, closed).await;
    assert!(is_refused(TcpStream::connect(harness.addr("e")).await).await);
    harness.shutdown(&[agent]).await;
}

async fn agent_rejects_endpoints_outside_its_allowlist(transport: TransportChoice) {
    let allowed = echo_server().await;
    let forbidden = echo_server().await;
    let harness = Harness::start(vec![endpoint("ok", allowed), endpoint("nope", forbidden)]).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &[rule_for(allowed)]));
    harness.wait_approved("ok").await;
    let status =
        harness.wait_status("nope", |s| matches!(s, EndpointStatus::Rejected { .. })).await;
    assert!(status.to_string().contains("allowlist"), "{status}");
    assert!(
        is_refused(TcpStream::connect(harness.addr("nope")).await).await,
        "a rejected endpoint must not be served"
    );
    harness.shutdown(&[agent]).await;
}

async fn relay_shutdown_lets_inflight_transfers_finish_and_refuses_new_ones(
    transport: TransportChoice,
) {
    let (harness, agent) = Harness::single(transport, echo_server().await).await;
    let addr = harness.addr("e");
    let mut inflight = TcpStream::connect(addr).await.expect("connect");
    // Readiness: an echo proves the connection is forwarded, not waiting in the backlog.
    let first = random_bytes(64 * 1024);
    inflight.write_all(&first).await.expect("write");
    let mut echoed = vec![0u8; first.len()];
    inflight.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(echoed, first);

    harness.begin_shutdown();
    // New connections are refused once the listener is gone (bounded poll).
    let mut refused = false;
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the endpoint still accepts connections during shutdown");
    // The in-flight transfer completes within the grace period.
    let rest = random_bytes(4 << 20);
    let back = echo_round_trip(inflight, &rest).await;
    assert_eq!(sha256(&back), sha256(&rest), "in-flight data lost during shutdown");
    harness.shutdown(&[agent]).await;
}

/// A tunnel to a destination that echoes a 5-byte hello and then hands its socket to `then`;
/// returns once the client has its echo back, so the whole path is known to be up.
async fn connected_hello<F, Fut>(
    transport: TransportChoice,
    then: F,
) -> (Harness, tokio_util::sync::CancellationToken, TcpStream)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let destination = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut hello = [0u8; 5];
        socket.read_exact(&mut hello).await.expect("hello");
        socket.write_all(&hello).await.expect("echo hello");
        then(socket).await;
    });
    let (harness, agent) = Harness::single(transport, destination).await;
    let mut client = TcpStream::connect(harness.addr("e")).await.expect("connect");
    client.write_all(b"hello").await.expect("write");
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).await.expect("the path is up");
    (harness, agent, client)
}

/// What a read loop ended with: `Ok` for a clean EOF.
async fn read_until_end(socket: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        if socket.read(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

async fn a_client_reset_reaches_the_destination_as_a_reset(transport: TransportChoice) {
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    let (harness, agent, client) = connected_hello(transport, |mut socket| async move {
        let _ = ended_tx.send(read_until_end(&mut socket).await);
    })
    .await;
    privlink_transport::tcp::abort(client);
    let ended = tokio::time::timeout(WAIT, ended_rx).await.expect("in time").expect("result");
    let error = ended.expect_err("the destination must see a reset, not a clean FIN");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    harness.shutdown(&[agent]).await;
}

async fn a_destination_reset_reaches_the_client_as_a_reset(transport: TransportChoice) {
    let (harness, agent, mut client) = connected_hello(transport, |mut socket| async move {
        // Reset only once the client has seen the echo and answered.
        let mut ack = [0u8; 3];
        socket.read_exact(&mut ack).await.expect("ack");
        privlink_transport::tcp::abort(socket);
    })
    .await;
    client.write_all(b"ack").await.expect("ack");
    let ended = tokio::time::timeout(WAIT, read_until_end(&mut client)).await.expect("in time");
    let error = ended.expect_err("the client must see a reset, not a clean FIN");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    harness.shutdown(&[agent]).await;
}

async fn a_slow_reader_does_not_stall_other_streams(transport: TransportChoice) {
    let (harness, agent) = Harness::single(transport, echo_server().await).await;
    // The slow stream: 96 MiB pushed at an echo whose replies nobody reads. It backs up
    // through every window and socket buffer on the way (together far less than 96 MiB)
    // until its writer blocks.
    let stalled = TcpStream::connect(harness.addr("e")).await.expect("connect");
    let (_unread_replies, mut stalled_writer) = stalled.into_split();
    let pusher = tokio::spawn(async move {
        let _ = stalled_writer.write_all(&vec![0u8; 96 << 20]).await;
    });

    // Meanwhile a bulk transfer on another stream of the same tunnel connection completes.
    let payload = random_bytes(32 << 20);
    let socket = TcpStream::connect(harness.addr("e")).await.expect("connect");
    let back = tokio::time::timeout(Duration::from_secs(60), echo_round_trip(socket, &payload))
        .await
        .expect("the bulk stream is not held back by the stalled one");
    assert_eq!(sha256(&back), sha256(&payload));
    // The test means something only if the slow stream really was stuck all along.
    assert!(!pusher.is_finished(), "the unread stream never backed up");
    pusher.abort();
    harness.shutdown(&[agent]).await;
}

on_both_transports!(
    tls_destination_is_verified_end_to_end,
    bulk_64_mib_each_way_arrives_intact,
    half_close_reaches_the_destination_and_the_reply_still_arrives,
    five_hundred_concurrent_connections_are_all_correct,
    inactivity_timeout_closes_idle_connections_and_spares_busy_ones,
    acl_allows_denies_and_deny_wins,
    max_connections_refuses_the_excess_and_leaves_the_rest_alone,
    unreachable_destination_closes_the_client_connection,
    agent_rejects_endpoints_outside_its_allowlist,
    relay_shutdown_lets_inflight_transfers_finish_and_refuses_new_ones,
    a_client_reset_reaches_the_destination_as_a_reset,
    a_destination_reset_reaches_the_client_as_a_reset,
    a_slow_reader_does_not_stall_other_streams,
);
