//! At the open-file limit: a relay whose limit leaves room for a few clients (set on the
//! running process with util-linux's `prlimit`) resets the client that does not fit at once —
//! no hang in the backlog — and counts it as `no_descriptors`; the clients it holds go on
//! echoing, and as soon as two of them close a new client is served again.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use privlink_testbed::process::{approved_by, free_fixed_port};

/// Descriptors left free above what the relay holds once serving: clients it can take.
const ROOM: usize = 8;

/// A TCP echo server on threads.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    addr
}

/// One round trip on `client`: what came back, or how it failed.
fn round_trip(client: &mut TcpStream) -> std::io::Result<()> {
    client.write_all(b"ping")?;
    let mut answer = [0u8; 4];
    client.read_exact(&mut answer)?;
    assert_eq!(&answer, b"ping");
    Ok(())
}

fn connect(endpoint: SocketAddr) -> TcpStream {
    let client = TcpStream::connect(endpoint).expect("connect: the kernel's backlog takes it");
    client.set_read_timeout(Some(PROCESS_WAIT)).expect("timeout");
    client
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc").count()
}

#[test]
fn out_of_descriptors_a_client_is_reset_at_once_and_the_others_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let destination = echo_server().to_string();
    let port = free_fixed_port;
    let endpoint = loopback(port());
    let configs = write_tunnel_files(
        dir.path(),
        &TunnelFiles {
            tunnel_listen: &format!("127.0.0.1:{}", port()),
            endpoint: "vault",
            endpoint_listen: &endpoint.to_string(),
            destination: &destination,
            endpoint_extra: "",
            agent_extra: "transport = \"quic\"",
            allow: &destination,
            admin: (loopback(port()), loopback(port())),
        },
    );
    let mut tunnel = Tunnel::start(BIN, &configs, Placement::Here);
    let relay = tunnel.relay.pid();

    // Leave the running relay room for ROOM more descriptors.
    let limit = open_descriptors(relay) + ROOM;
    let set = Command::new("prlimit")
        .args([format!("--pid={relay}"), format!("--nofile={limit}:{limit}")])
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(set.status.success(), "prlimit: {}", String::from_utf8_lossy(&set.stderr));

    // Clients until one does not fit (bounded: the room is ROOM descriptors).
    let mut held = Vec::new();
    let refusal = loop {
        assert!(held.len() <= 4 * ROOM, "{} clients held under a limit of {limit}", held.len());
        let mut client = connect(endpoint);
        match round_trip(&mut client) {
            Ok(()) => held.push(client),
            Err(e) => break e,
        }
    };
    // A reset (or an end) came back: not the read timeout of a client left in the backlog.
    assert!(
        matches!(
            refusal.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
        ),
        "the client that did not fit: {refusal:?}"
    );
    assert!(!held.is_empty(), "the room ({ROOM} descriptors) held no client");

    // The clients held are not disturbed.
    for client in &mut held {
        round_trip(client).expect("a client held before the refusal still echoes");
    }

    // Two leave; the relay closes their descriptors as it sees them go, then serves again.
    held.truncate(held.len().saturating_sub(2));
    let mut served = false;
    for _ in 0..100 {
        let mut client = connect(endpoint);
        if round_trip(&mut client).is_ok() {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "no client served after two closed");

    // Counted, with the reason (the admin listener needs a descriptor too: one is free now).
    drop(held);
    let body = tunnel.relay_admin.wait("/metrics", |code, body| {
        code == 200
            && body.contains(
                "privlink_relay_connections_total{endpoint=\"vault\",outcome=\"no_descriptors\"}",
            )
    });
    let line = body
        .lines()
        .find(|l| l.contains("outcome=\"no_descriptors\""))
        .expect("the no_descriptors line");
    let count: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a count");
    assert!(count >= 1.0, "{line}");
    // The relay says why (its warning; bounded wait for the line already written).
    tunnel.relay.wait_for("no file descriptor left");
    let id = tunnel.agent_id();
    tunnel.relay_admin.wait_relay_status(|status| approved_by(status, &id, "vault"));
    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "agent {agent}, relay {relay}");
}
