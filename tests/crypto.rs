//! The tunnel's key exchange, confirmed from outside: Debian's `tcpdump` captures the TLS/TCP
//! handshake on loopback, and the relay's ServerHello names the group it chose in its
//! key_share — X25519MLKEM768 (0x11EC) by default and with `require`, X25519 (0x001D) when
//! one side has `post_quantum = "off"`. A side that requires it against one that has it off
//! fails on both transports, and the agent's link says which setting to change. CI installs
//! `tcpdump` (the tests run as root, as the capture needs).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_transport::crypto::PostQuantum;

const X25519MLKEM768: u16 = 0x11ec;
const X25519: u16 = 0x001d;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_prefers_x25519mlkem768_as_a_capture_of_the_handshake_shows() {
    for (relay, agent, expected) in [
        (PostQuantum::Prefer, PostQuantum::Prefer, X25519MLKEM768),
        (PostQuantum::Require, PostQuantum::Prefer, X25519MLKEM768),
        (PostQuantum::Prefer, PostQuantum::Off, X25519),
        (PostQuantum::Off, PostQuantum::Prefer, X25519),
    ] {
        let (group, shown) = captured_group(relay, agent).await;
        assert_eq!(
            group, expected,
            "relay {relay}, agent {agent}: the ServerHello chose {group:#06x}, not {expected:#06x}"
        );
        let name = if expected == X25519MLKEM768 { "X25519MLKEM768" } else { "X25519" };
        assert_eq!(shown, [name, name], "the relay's and the agent's status say what was chosen");
    }
}

/// Over QUIC the relay's status names the key exchange too (worked out from the ClientHello,
/// as quinn hides the TLS connection), the agent's the same (read from the ServerHello), and
/// `privlink_tunnel_links` counts the link under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_names_each_quic_links_key_exchange() {
    for (agent, expected, post_quantum) in
        [(PostQuantum::Prefer, "X25519MLKEM768", true), (PostQuantum::Off, "X25519", false)]
    {
        let destination = echo_server().await;
        let admin =
            privlink_relay::config::AdminSettings::new("127.0.0.1:0".parse().expect("addr"), None);
        let harness =
            Harness::start_with_admin(vec![endpoint("e", destination)], Some(admin)).await;
        let mut config = harness.agent_config(TransportChoice::Quic, &[rule_for(destination)]);
        config.crypto.post_quantum = agent;
        let agent = harness.watch_agent(config);
        harness.wait_approved("e").await;
        let link = &agent.status.links()[0];
        assert_relay_certificate_expiry(link.relay_certificate_expires);
        let agents = harness.relay.agents(CONNECTOR);
        let tls = agents[0].tls.as_ref().expect("the relay knows the QUIC link's TLS");
        assert_eq!((tls.key_exchange.as_str(), tls.post_quantum), (expected, post_quantum));
        assert_eq!(tls.version, "TLS 1.3");
        // The agent read the same from the relay's ServerHello.
        let agent_tls = link.tls.as_ref().expect("the agent knows its QUIC link's TLS");
        assert_eq!(
            (agent_tls.key_exchange.as_str(), agent_tls.cipher.as_str(), agent_tls.post_quantum),
            (tls.key_exchange.as_str(), tls.cipher.as_str(), tls.post_quantum)
        );
        let addr = harness.relay.admin_addr().expect("admin");
        let (_, metrics) =
            tokio::task::spawn_blocking(move || admin_get(addr, "/metrics")).await.expect("join");
        let line = format!(
            "privlink_tunnel_links{{role=\"relay\",transport=\"quic\",key_exchange=\"{expected}\",cipher=\"{}\"}} 1",
            tls.cipher
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
        agent.stop().await;
        harness.shutdown(&[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_off_fails_on_both_transports_naming_the_setting() {
    for transport in [TransportChoice::Quic, TransportChoice::Tcp] {
        for (relay, agent, says) in [
            (PostQuantum::Require, PostQuantum::Off, "this agent has post_quantum = \"off\""),
            (PostQuantum::Off, PostQuantum::Require, "this agent has post_quantum = \"require\""),
        ] {
            let error = refused_link(relay, agent, transport).await;
            assert!(error.contains(says), "{transport}, relay {relay}, agent {agent}: {error}");
            assert!(error.contains("post_quantum = \"prefer\""), "names the fix: {error}");
        }
    }
}

/// Runs a relay and an agent on TLS/TCP with these settings, capturing the tunnel's handshake;
/// returns the group of the relay's key_share, and the key exchange the relay's status and the
/// agent's show for the link.
async fn captured_group(relay: PostQuantum, agent: PostQuantum) -> (u16, [String; 2]) {
    let destination = echo_server().await;
    let harness = Harness::start_tuned(vec![endpoint("e", destination)], Vec::new(), |config| {
        config.crypto.post_quantum = relay;
    })
    .await;
    let port = harness.relay.tunnel_addr().port();
    let dir = tempfile::tempdir().expect("dir");
    let pcap = dir.path().join("handshake.pcap");
    // The capture's waits block: off the runtime's workers.
    let capture = tokio::task::block_in_place(|| Capture::start(port, &pcap));
    let mut config = harness.agent_config(TransportChoice::Tcp, &[rule_for(destination)]);
    config.crypto.post_quantum = agent;
    let agent = harness.watch_agent(config);
    harness.wait_approved("e").await;
    let group = tokio::task::block_in_place(|| capture.stop_at(&pcap, port, server_hello_group));
    let key_exchange = |tls: Option<&privlink_transport::crypto::TlsSummary>| {
        tls.map_or_else(|| "none".to_owned(), |tls| tls.key_exchange.clone())
    };
    let on_relay = key_exchange(harness.relay.agents(CONNECTOR)[0].tls.as_ref());
    let link = &agent.status.links()[0];
    let on_agent = key_exchange(link.tls.as_ref());
    assert_relay_certificate_expiry(link.relay_certificate_expires);
    agent.stop().await;
    harness.shutdown(&[]).await;
    (group, [on_relay, on_agent])
}

/// The link says when the relay's test certificate expires: `SERVER_VALIDITY` from its issue,
/// a moment ago.
fn assert_relay_certificate_expiry(expires: Option<i64>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now");
    let validity = privlink_transport::pki::SERVER_VALIDITY.as_secs();
    let expected = i64::try_from(now.as_secs() + validity).expect("secs");
    let expires = expires.expect("the link knows when the relay's certificate expires");
    assert!((expected - 600..=expected).contains(&expires), "{expires}, not about {expected}");
}

/// Runs a relay and an agent whose settings cannot agree; returns the agent link's error.
async fn refused_link(
    relay: PostQuantum,
    agent: PostQuantum,
    transport: TransportChoice,
) -> String {
    let destination = echo_server().await;
    let harness = Harness::start_tuned(vec![endpoint("e", destination)], Vec::new(), |config| {
        config.crypto.post_quantum = relay;
    })
    .await;
    let mut config = harness.agent_config(transport, &[rule_for(destination)]);
    config.crypto.post_quantum = agent;
    let agent = harness.watch_agent(config);
    let mut changes = agent.status.subscribe();
    let error = async {
        loop {
            if let Some(error) = agent.status.links().iter().find_map(|l| l.last_error.clone()) {
                return error;
            }
            changes.changed().await.expect("the agent runs");
        }
    };
    let error = tokio::time::timeout(WAIT, error).await.expect("the link fails in time");
    agent.stop().await;
    harness.shutdown(&[]).await;
    error
}

/// `tcpdump` writing what crosses loopback to or from `port` into a file, packet by packet.
struct Capture(Child);

impl Capture {
    fn start(port: u16, file: &Path) -> Self {
        let child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "--immediate-mode", "-s", "0", "-w"])
            .arg(file)
            .args(["tcp", "port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "the capture test needs Debian's tcpdump (apt-get install tcpdump; .ci/run does)",
            );
        // The file's header is written once the capture is live.
        let deadline = Instant::now() + WAIT;
        while std::fs::metadata(file).map_or(0, |m| m.len()) < 24 {
            assert!(Instant::now() < deadline, "tcpdump did not start capturing (as root?)");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }

    /// Stops the capture once `found` finds what it looks for in the TCP payload `port` sent
    /// (in sequence order) — tcpdump writes what it reads as it reads it; returns that.
    fn stop_at<T>(mut self, file: &Path, port: u16, found: impl Fn(&[u8]) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        let seen = loop {
            let pcap = std::fs::read(file).expect("the capture");
            let sent = tcp_payload_from(&pcap, port);
            if let Some(seen) = found(&sent) {
                break seen;
            }
            assert!(
                Instant::now() < deadline,
                "not in the capture: {} bytes from {port}",
                sent.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = self.0.kill();
        let _ = self.0.wait();
        seen
    }
}

/// The payload of every TCP segment from `port` in a pcap file (Ethernet or Linux cooked
/// frames, IPv4), ordered by sequence number, each byte once.
fn tcp_payload_from(pcap: &[u8], port: u16) -> Vec<u8> {
    let u32_at = |b: &[u8], at: usize, little: bool| {
        let bytes: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        if little { u32::from_le_bytes(bytes) } else { u32::from_be_bytes(bytes) }
    };
    let little = match &pcap[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        other => panic!("not a pcap file: {other:?}"),
    };
    let link_header = match u32_at(pcap, 20, little) {
        1 => 14,   // Ethernet
        113 => 16, // Linux cooked
        276 => 20, // Linux cooked v2
        other => panic!("link type {other}"),
    };
    let mut segments: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let captured = u32_at(pcap, at + 8, little) as usize;
        let frame = &pcap[at + 16..(at + 16 + captured).min(pcap.len())];
        at += 16 + captured;
        let Some(ip) = frame.get(link_header..) else { continue };
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
            continue;
        }
        let tcp = &ip[usize::from(ip[0] & 0x0f) * 4..];
        if tcp.len() < 20 || u16::from_be_bytes([tcp[0], tcp[1]]) != port {
            continue;
        }
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let payload = &tcp[usize::from(tcp[12] >> 4) * 4..];
        if !payload.is_empty() && !segments.iter().any(|(s, _)| *s == seq) {
            segments.push((seq, payload.to_vec()));
        }
    }
    segments.sort_by_key(|(seq, _)| *seq);
    segments.into_iter().flat_map(|(_, payload)| payload).collect()
}

/// The group in the key_share extension of the first ServerHello in a server's TLS bytes.
fn server_hello_group(tls: &[u8]) -> Option<u16> {
    let mut at = 0;
    while at + 5 <= tls.len() {
        let length = usize::from(u16::from_be_bytes([tls[at + 3], tls[at + 4]]));
        let record = tls.get(at + 5..at + 5 + length)?;
        at += 5 + length;
        // A handshake record holding a ServerHello (type 2).
        if tls[at - 5 - length] != 22 || record.first() != Some(&2) {
            continue;
        }
        let hello = record.get(4..)?;
        // version (2), random (32), session id (1 + n), cipher suite (2), compression (1).
        let mut cursor = 2 + 32;
        cursor += 1 + usize::from(*hello.get(cursor)?);
        cursor += 2 + 1;
        let extensions_end =
            cursor + 2 + usize::from(u16::from_be_bytes([hello[cursor], hello[cursor + 1]]));
        cursor += 2;
        while cursor + 4 <= extensions_end.min(hello.len()) {
            let kind = u16::from_be_bytes([hello[cursor], hello[cursor + 1]]);
            let size = usize::from(u16::from_be_bytes([hello[cursor + 2], hello[cursor + 3]]));
            if kind == 0x0033 {
                return Some(u16::from_be_bytes([hello[cursor + 4], hello[cursor + 5]]));
            }
            cursor += 4 + size;
        }
        return None;
    }
    None
}
