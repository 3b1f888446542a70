//! What routing by server name costs a new connection, measured: `cargo bench --bench sni`.
//! One relay and one agent (real processes, QUIC), a TLS backend (the test bed's load backend)
//! for `contoso-kv.vault.azure.net`, and three ways to it through the relay — a dedicated port
//! without `server_names` (the path every endpoint took before), the same pinned to the name
//! (the relay reads the ClientHello first), and a shared listener that routes by the name —
//! beside the backend directly. Each sample is a fresh connection: connect, TLS 1.3 handshake,
//! one 64-byte round trip, close. The four are sampled in turn, round after round, so that the
//! machine's noise falls on all alike; the report gives medians and 90th percentiles, and each
//! as a ratio to the dedicated port. Nothing here asserts on timing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use privlink_testbed::load::{self, LoadTls};
use privlink_testbed::process::{
    Placement, Tunnel, TunnelFiles, free_fixed_port, write_tunnel_files,
};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_privlink");
const NAME: &str = "contoso-kv.vault.azure.net";

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn main() {
    let rounds: usize = if std::env::var_os("E2E_QUICK").is_some() { 50 } else { 400 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tls = LoadTls::new(NAME);
    let backend = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let server = std::sync::Arc::clone(&tls.server);
        tokio::spawn(load::serve_backend_tls(listener, CancellationToken::new(), Some(server)));
        addr
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let (plain, pinned, shared) =
        (loopback(free_fixed_port()), loopback(free_fixed_port()), loopback(free_fixed_port()));
    let configs = write_tunnel_files(
        BIN,
        dir.path(),
        &TunnelFiles {
            tunnel_listen: &loopback(free_fixed_port()).to_string(),
            endpoint: "plain",
            endpoint_listen: &plain.to_string(),
            destination: &backend.to_string(),
            endpoint_extra: "",
            agent_extra: "transport = \"quic\"",
            allow: &backend.to_string(),
            admin: (loopback(free_fixed_port()), loopback(free_fixed_port())),
        },
    );
    let mut relay = std::fs::read_to_string(&configs.relay).expect("relay.toml");
    relay.push_str(&format!(
        "\n[[endpoint]]\nname = \"pinned\"\nconnector = \"tunnel\"\ndestination = \"{backend}\"\n\
         listen = \"{pinned}\"\nserver_names = [\"{NAME}\"]\n\n\
         [[listener]]\nname = \"vaults\"\nlisten = \"{shared}\"\n\n\
         [[endpoint]]\nname = \"shared\"\nconnector = \"tunnel\"\ndestination = \"{backend}\"\n\
         listener = \"vaults\"\nserver_names = [\"{NAME}\"]\n"
    ));
    std::fs::write(&configs.relay, relay).expect("relay.toml");
    let tunnel = Tunnel::start(BIN, &configs, Placement::Here);
    tunnel
        .relay_admin
        .wait_relay_status(|s| s.endpoints.iter().filter(|e| e.status == "Approved").count() == 3);

    let paths = [
        ("direct", backend),
        ("dedicated port", plain),
        ("pinned port", pinned),
        ("shared listener", shared),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    let started = Instant::now();
    runtime.block_on(async {
        // Warm up every path (first handshakes pay for one-time work).
        for (_, addr) in paths {
            for _ in 0..20 {
                load::tls_round_trip(addr, &tls).await.expect("warm-up");
            }
        }
        for round in 0..rounds {
            for i in 0..paths.len() {
                let i = (i + round) % paths.len();
                let began = Instant::now();
                load::tls_round_trip(paths[i].1, &tls).await.expect("a TLS connection");
                samples[i].push(began.elapsed());
            }
        }
    });
    let stats = |s: &mut Vec<Duration>| {
        s.sort_unstable();
        (s[s.len() / 2], s[s.len() * 9 / 10])
    };
    let (dedicated_median, _) = stats(&mut samples[1].clone());
    let mut report = format!(
        "### New TLS connections by route ({rounds} rounds, {:.0} s)\n\n\
         | path | median | p90 | median vs dedicated port |\n|---|---|---|---|\n",
        started.elapsed().as_secs_f64()
    );
    for (i, (label, _)) in paths.iter().enumerate() {
        let (median, p90) = stats(&mut samples[i]);
        report.push_str(&format!(
            "| {label} | {:.3} ms | {:.3} ms | {:.2} |\n",
            median.as_secs_f64() * 1e3,
            p90.as_secs_f64() * 1e3,
            median.as_secs_f64() / dedicated_median.as_secs_f64()
        ));
    }
    println!("{report}");
    drop(tunnel);
}
