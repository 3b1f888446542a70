//! The FIPS build, end to end: a relay and an agent from a `--features fips` binary, both with
//! `fips = true`, report FIPS mode (`--version`, `privlink_build_info`), negotiate only what
//! the FIPS module approves (X25519MLKEM768 by default, AES-GCM), and carry a connection to a
//! destination and back. A classical agent of the ordinary build (`post_quantum = "off"`:
//! X25519 first) still joins that relay, on P-256.
//!
//! The FIPS binary is a build of its own (aws-lc-fips-sys needs CMake and Go), so this test is
//! ignored — visibly, in `cargo test`'s summary — unless `PRIVLINK_FIPS_BIN` names it:
//! `.ci/run` builds it and runs
//! `PRIVLINK_FIPS_BIN=target/fips/privlink cargo test --test fips -- --ignored`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use common::*;
use privlink_testbed::process::free_fixed_port;

fn fips_binary() -> String {
    std::env::var("PRIVLINK_FIPS_BIN").expect(
        "PRIVLINK_FIPS_BIN names a `cargo build --features fips` binary (see this file's header)",
    )
}

/// A TCP echo server on a thread, for `connections` connections.
fn echo_server(connections: usize) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    addr
}

/// Sends `size` random bytes through `endpoint` to the echo server and checks they come back.
fn echo_through(endpoint: std::net::SocketAddr, size: usize) {
    let mut client = TcpStream::connect(endpoint).expect("connect to the endpoint");
    client.set_read_timeout(Some(PROCESS_WAIT)).expect("timeout");
    let sent = random_bytes(size);
    let writer = {
        let mut client = client.try_clone().expect("clone");
        let sent = sent.clone();
        std::thread::spawn(move || {
            client.write_all(&sent).expect("send");
            client.shutdown(std::net::Shutdown::Write).expect("half-close");
        })
    };
    let mut echoed = Vec::with_capacity(size);
    client.read_to_end(&mut echoed).expect("the echo comes back");
    writer.join().expect("writer");
    assert!(echoed == sent, "{} bytes sent, {} came back (or others)", sent.len(), echoed.len());
}

#[test]
#[ignore = "needs a FIPS build: PRIVLINK_FIPS_BIN=target/fips/privlink (.ci/run builds it)"]
fn a_fips_build_reports_fips_and_serves_a_connection_end_to_end() {
    let fips = fips_binary();
    let version = std::process::Command::new(&fips).arg("--version").output().expect("run");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(version.contains("FIPS mode: yes"), "{version}");
    assert!(
        version.contains("in order of preference: X25519MLKEM768, secp256r1, secp384r1"),
        "X25519 is not FIPS-approved: {version}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let destination = echo_server(16).to_string();
    let port = free_fixed_port;
    let (tunnel, endpoint) = (format!("127.0.0.1:{}", port()), loopback(port()));
    let admin = (loopback(port()), loopback(port()));
    let configs = privlink_testbed::process::write_tunnel_files(
        &fips,
        dir.path(),
        &TunnelFiles {
            tunnel_listen: &tunnel,
            endpoint: "vault",
            endpoint_listen: &endpoint.to_string(),
            destination: &destination,
            endpoint_extra: "",
            agent_extra: "transport = \"tcp\"\nfips = true",
            allow: &destination,
            admin,
        },
    );
    let relay_toml = std::fs::read_to_string(&configs.relay).expect("relay.toml");
    std::fs::write(&configs.relay, relay_toml.replacen("[tunnel]\n", "[tunnel]\nfips = true\n", 1))
        .expect("relay.toml");

    let tunnel = Tunnel::start(&fips, &configs, Placement::Here);
    for (role, probe) in [("relay", &tunnel.relay_admin), ("agent", &tunnel.agent_admin)] {
        let (_, metrics) = probe.get("/metrics");
        assert!(
            metrics.contains("privlink_build_info{") && metrics.contains("fips=\"true\""),
            "the {role} reports FIPS mode:\n{metrics}"
        );
    }
    let link = tunnel.agent_admin.agent_status().links.remove(0);
    let tls = link.tls.expect("a TLS/TCP link shows its TLS");
    assert_eq!((tls.key_exchange.as_str(), tls.post_quantum), ("X25519MLKEM768", true));
    assert!(tls.cipher.contains("AES_") && tls.cipher.contains("GCM"), "{tls:?}");
    echo_through(endpoint, 256 * 1024);

    // An agent of the ordinary build with a classical key exchange offers X25519 first; the
    // FIPS relay asks it for P-256 (a HelloRetryRequest) and it joins.
    let classical = dir.path().join("classical-agent.toml");
    let classical_admin = loopback(port());
    let agent_toml = std::fs::read_to_string(&configs.agent).expect("agent.toml");
    std::fs::write(
        &classical,
        agent_toml
            .replace("fips = true", "post_quantum = \"off\"")
            .replace(&admin.1.to_string(), &classical_admin.to_string()),
    )
    .expect("classical agent.toml");
    let mut command = std::process::Command::new(BIN);
    command.args(["agent", "--config", classical.to_str().expect("utf-8")]);
    let classical_agent = Running::spawn(command);
    let probe = AdminProbe::new(None, classical_admin);
    probe.wait_ready();
    let link = probe.agent_status().links.remove(0);
    let tls = link.tls.expect("a TLS/TCP link shows its TLS");
    assert_eq!((tls.key_exchange.as_str(), tls.post_quantum), ("secp256r1", false));
    echo_through(endpoint, 1024);

    let status = classical_agent.terminate();
    assert!(status.success(), "the classical agent exits cleanly: {status}");
    let (agent, relay) = tunnel.stop();
    assert!(agent.success() && relay.success(), "agent {agent}, relay {relay}");
}
