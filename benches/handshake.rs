//! What the post-quantum key exchange costs a tunnel handshake: the tunnel's TLS 1.3 (the same
//! configurations the relay and the agent build, `privlink_transport::tls`) over loopback TCP,
//! client and server in this process, with `post_quantum = "prefer"` (X25519MLKEM768) and
//! `"off"` (X25519) on both sides, interleaved in rounds so that the machine's drift falls on
//! both alike. Reports the median wall time of one handshake and the CPU this process spent
//! per handshake (both sides together, from `/proc/self/stat`), and the group negotiated.
//! Run with `cargo bench --bench handshake`; `HANDSHAKE_ROUNDS` (default 10) of 200 each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use privlink_transport::crypto::PostQuantum;
use privlink_transport::pki::CertificateAuthority;
use privlink_transport::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PER_ROUND: usize = 200;

/// CPU time this process has used (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces), which ends with ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

struct Setting {
    server: tokio_rustls::TlsAcceptor,
    client: tokio_rustls::TlsConnector,
}

fn setting(ca: &CertificateAuthority, post_quantum: PostQuantum) -> Setting {
    let cert = ca.issue_server(&["localhost"]).expect("cert");
    let server = tls::tunnel_server_config(vec![cert.cert_der.clone()], cert.key_der, post_quantum)
        .expect("server");
    let client =
        tls::tunnel_client_config(std::slice::from_ref(&ca.identity.cert_der), post_quantum)
            .expect("client");
    Setting {
        server: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        client: tokio_rustls::TlsConnector::from(Arc::new(client)),
    }
}

/// One round: `PER_ROUND` handshakes one after another; their wall times, and the key
/// exchange group the last one negotiated.
async fn round(setting: &Setting) -> (Vec<Duration>, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut times = Vec::with_capacity(PER_ROUND);
    let mut group = 0;
    for _ in 0..PER_ROUND {
        let started = Instant::now();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, (server, _)) = (client.expect("connect"), accepted.expect("accept"));
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let (client, server) =
            tokio::join!(setting.client.connect(name, client), setting.server.accept(server));
        let (mut client, mut server) = (client.expect("client handshake"), server.expect("server"));
        // One byte each way: the handshake is complete on both sides.
        let (a, b) = tokio::join!(client.write_all(b"x"), server.write_all(b"y"));
        a.expect("write");
        b.expect("write");
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).await.expect("read");
        server.read_exact(&mut byte).await.expect("read");
        times.push(started.elapsed());
        let negotiated = client.get_ref().1.negotiated_key_exchange_group().expect("a group");
        group = u16::from(negotiated.name());
    }
    (times, group)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    let rounds: usize =
        std::env::var("HANDSHAKE_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let ca = CertificateAuthority::new("handshake bench CA").expect("CA");
    let settings = [
        ("prefer (X25519MLKEM768)", setting(&ca, PostQuantum::Prefer)),
        ("off (X25519)", setting(&ca, PostQuantum::Off)),
    ];
    let mut wall: Vec<Vec<Duration>> = vec![Vec::new(); settings.len()];
    let mut cpu: Vec<Duration> = vec![Duration::ZERO; settings.len()];
    let mut groups = vec![0u16; settings.len()];
    for _ in 0..rounds {
        for (i, (_, setting)) in settings.iter().enumerate() {
            let before = cpu_time();
            let (times, group) = runtime.block_on(round(setting));
            cpu[i] += cpu_time() - before;
            wall[i].extend(times);
            groups[i] = group;
        }
    }
    println!(
        "| post_quantum | group | handshakes | median wall | CPU per handshake (both sides) |"
    );
    println!("|---|---|---|---|---|");
    for (i, (label, _)) in settings.iter().enumerate() {
        let count = wall[i].len();
        let per = cpu[i] / u32::try_from(count).expect("count");
        println!(
            "| {label} | {:#06x} | {count} | {:.1} µs | {:.1} µs |",
            groups[i],
            median(wall[i].clone()).as_secs_f64() * 1e6,
            per.as_secs_f64() * 1e6
        );
    }
}
