//! The link emulator measured: two namespaces joined only by the emulated link, real UDP and
//! TCP sockets on each side. Asserts what physics and the model fix — a round trip is never
//! shorter than twice the configured delay, the loss rate matches the configured probability,
//! throughput never exceeds the cap — and prints what it measured.
//!
//! Needs root and iproute2; where namespaces cannot be made the tests say so and skip.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use privlink_testbed::netns::{skip_notice, spawn_in_namespace};
use privlink_testbed::{Link, LinkProfile, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "10.232.0.1";
const B: &str = "10.232.0.2";

fn topology(tag: &str, profile: LinkProfile) -> Option<Topology> {
    match Topology::create(tag, &["a", "b"], &[Link::emulated(0, 1, A, B, profile)]) {
        Ok(t) => Some(t),
        Err(reason) => {
            skip_notice(&reason);
            None
        }
    }
}

/// A UDP echo in namespace `b` answering `count` datagrams (or giving up after 10 s quiet).
fn udp_echo(topology: &Topology, count: usize) -> std::thread::JoinHandle<std::io::Result<usize>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = spawn_in_namespace(topology.ns(1), move || async move {
        let socket = tokio::net::UdpSocket::bind((B, 7000)).await.expect("bind echo");
        tx.send(()).expect("ready");
        let mut buf = [0u8; 2048];
        let mut answered = 0;
        while answered < count {
            match tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) => {
                    socket.send_to(&buf[..n], from).await.expect("echo");
                    answered += 1;
                }
                _ => break,
            }
        }
        answered
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("echo ready");
    handle
}

#[test]
fn round_trips_take_twice_the_configured_delay() {
    let delay = Duration::from_millis(20);
    let Some(topology) = topology("ed", LinkProfile::wan(delay, 0.0)) else { return };
    let pings: u32 = 40;
    let echo = udp_echo(&topology, pings as usize);
    let rtts = spawn_in_namespace(topology.ns(0), move || async move {
        let socket = tokio::net::UdpSocket::bind((A, 0)).await.expect("bind");
        socket.connect((B, 7000)).await.expect("connect");
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..pings {
            let sent = Instant::now();
            socket.send(&i.to_be_bytes()).await.expect("send");
            let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
                .await
                .expect("a reply within 2 s (no loss configured)")
                .expect("recv");
            assert_eq!(&buf[..n], &i.to_be_bytes());
            rtts.push(sent.elapsed());
        }
        rtts
    })
    .join()
    .expect("client thread")
    .expect("client in namespace");
    assert_eq!(echo.join().expect("echo thread").expect("echo"), pings as usize);

    let mut sorted = rtts.clone();
    sorted.sort();
    let (min, median) = (sorted[0], sorted[sorted.len() / 2]);
    eprintln!("configured one-way delay {delay:?}: RTT min {min:?}, median {median:?}");
    assert!(min >= 2 * delay, "a round trip took {min:?}, less than twice the {delay:?} delay");
    // A generous ceiling: catches a delay applied twice or a stalled scheduler.
    assert!(median < 2 * delay + Duration::from_millis(30), "median RTT {median:?}");
    let stats = topology.emulator(0).expect("emulated");
    // Equal, not at least: a packet carried twice would show here.
    let settle = Duration::from_secs(2);
    assert_eq!(stats.a_to_b().forwarded_once(pings.into(), settle), u64::from(pings));
    assert_eq!(stats.b_to_a().forwarded_once(pings.into(), settle), u64::from(pings));
}

#[test]
fn the_configured_share_of_packets_is_lost() {
    let loss = 0.10;
    let Some(topology) = topology("el", LinkProfile::wan(Duration::ZERO, loss)) else { return };
    let sent = 4000usize;
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = spawn_in_namespace(topology.ns(1), move || async move {
        let socket = tokio::net::UdpSocket::bind((B, 7001)).await.expect("bind");
        tx.send(()).expect("ready");
        let mut buf = [0u8; 2048];
        let mut received = 0usize;
        // Every datagram that survives arrives within the quiet period after the last one.
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await
        {
            received += 1;
        }
        received
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("receiver ready");
    spawn_in_namespace(topology.ns(0), move || async move {
        let socket = tokio::net::UdpSocket::bind((A, 0)).await.expect("bind");
        socket.connect((B, 7001)).await.expect("connect");
        for i in 0..sent {
            socket.send(&[7u8; 200]).await.expect("send");
            // Paced so that no queue before the emulator overflows: every loss is the model's.
            if i % 32 == 31 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    })
    .join()
    .expect("sender thread")
    .expect("sender");
    let received = receiver.join().expect("receiver thread").expect("receiver");

    let (forwarded, lost, queue_dropped, failed) =
        topology.emulator(0).expect("emulated").a_to_b().snapshot();
    let measured = lost as f64 / (forwarded + lost) as f64;
    eprintln!(
        "configured loss {loss}: {lost} of {} lost ({measured:.4}); {received} received",
        forwarded + lost
    );
    assert_eq!(forwarded + lost, sent as u64, "every datagram reached the emulator");
    assert_eq!((queue_dropped, failed), (0, 0));
    assert_eq!(received as u64, forwarded, "the receiver got exactly what was forwarded");
    // 4,000 trials at p = 0.1: the standard deviation is 0.0047; this is over 4 sigma.
    assert!((measured - loss).abs() < 0.02, "measured loss {measured}");
}

#[test]
fn throughput_never_exceeds_the_bandwidth_cap() {
    let rate = 40_000_000u64;
    let profile = LinkProfile {
        delay: Duration::from_millis(5),
        rate_bps: Some(rate),
        queue_bytes: 256 * 1024,
        ..LinkProfile::default()
    };
    let Some(topology) = topology("eb", profile) else { return };
    let total = 4 * 1024 * 1024usize;
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = spawn_in_namespace(topology.ns(1), move || async move {
        let listener = tokio::net::TcpListener::bind((B, 7002)).await.expect("bind");
        tx.send(()).expect("ready");
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        let mut first: Option<Instant> = None;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf))
                .await
                .expect("the transfer stalled for 30 s")
                .expect("read");
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n;
        }
        (got, first.map(|t| t.elapsed()).unwrap_or_default())
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("sink ready");
    let addr: SocketAddr = format!("{B}:7002").parse().expect("addr");
    spawn_in_namespace(topology.ns(0), move || async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..total / chunk.len() {
            conn.write_all(&chunk).await.expect("write");
        }
        conn.shutdown().await.expect("shutdown");
    })
    .join()
    .expect("sender thread")
    .expect("sender");
    let (got, elapsed) = sink.join().expect("sink thread").expect("sink");
    assert_eq!(got, total);
    // Bytes on the wire exceed the payload (headers), so payload rate must be below the cap.
    let measured = got as f64 * 8.0 / elapsed.as_secs_f64();
    eprintln!("cap {} Mbit/s: payload {:.1} Mbit/s", rate / 1_000_000, measured / 1e6);
    assert!(measured <= rate as f64 * 1.02, "{measured} bit/s through a {rate} bit/s cap");
}
