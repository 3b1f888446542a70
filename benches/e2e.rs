//! The end-to-end benchmark harness: `cargo bench --bench e2e` (release build). It starts a
//! backend (the test bed's load tool), HAProxy in TCP mode (installed from Debian packages when
//! missing), and the real `privlink` relay and agent processes over QUIC and over TLS/TCP, and
//! measures each of them in the same run with the same load tool: bulk throughput (one and
//! eight streams, each way), 1 KiB request/response latency, new connections (sequential and
//! 64 concurrent workers), resident memory per idle connection; then, in network namespaces
//! joined by the test bed's link emulator (25 ms each way, then 0.5 % loss), time to first byte
//! of a new TLS connection against the round trips it physically needs and single-stream bulk
//! against direct TCP over the same path. It prints a Markdown report (every figure also as a
//! ratio to direct) and writes it to `target/e2e-report.md`; `docs/benchmarks.md` explains it.
//! Set `E2E_QUICK=1` for a short smoke run, `E2E_ONLY=quic,tcp` (any of direct, haproxy, haproxy2,
//! quic, tcp, wan) to run a subset and `E2E_MEASURES=connections` (any of memory, bulk, rr,
//! connections = sequential + concurrent) to run only some measurements, e.g. under a profiler.
//! Nothing here asserts on timing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Running;
use privlink_testbed::load::{self, Direction, Latencies};
use privlink_testbed::netns::{sh, spawn_in_namespace};
use privlink_testbed::{Link, LinkProfile, Topology};
use privlink_transport::pki::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const IDLE_CONNECTIONS: usize = 5_000;
const WAN_DELAY: Duration = Duration::from_millis(25);
const WAN_LOSS: f64 = 0.005;
const CLOUD_ADDR: &str = "10.232.0.1";
const VNET_ADDR: &str = "10.232.0.2";
const VAULT_NAME: &str = "contoso-kv.vault.azure.net";

/// How long each measurement runs.
#[derive(Clone, Copy)]
struct Budget {
    bulk: Duration,
    latency: Duration,
    round_trips: usize,
    sequential: usize,
    concurrent: Duration,
    idle: usize,
    wan_bulk: Duration,
    ttfb_samples: usize,
}

impl Budget {
    fn from_env() -> Self {
        if std::env::var_os("E2E_QUICK").is_some() {
            Self {
                bulk: Duration::from_millis(500),
                latency: Duration::from_millis(500),
                round_trips: 2_000,
                sequential: 100,
                concurrent: Duration::from_millis(500),
                idle: 500,
                wan_bulk: Duration::from_secs(2),
                ttfb_samples: 3,
            }
        } else {
            Self {
                bulk: Duration::from_secs(3),
                latency: Duration::from_secs(3),
                round_trips: 50_000,
                sequential: 1_000,
                concurrent: Duration::from_secs(3),
                idle: IDLE_CONNECTIONS,
                wan_bulk: Duration::from_secs(8),
                ttfb_samples: 15,
            }
        }
    }
}

/// Everything measured against one target (`None`: not measured in this run).
#[derive(Default)]
struct Figures {
    /// Gbit/s: one stream up, one down, eight up, eight down.
    bulk: Option<[f64; 4]>,
    rr: Option<Latencies>,
    sequential: Option<Latencies>,
    concurrent: Option<Latencies>,
    /// KiB of resident memory per idle connection (the forwarding processes together).
    idle_kib: Option<f64>,
}

fn main() {
    let budget = Budget::from_env();
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        tokio::spawn(load::serve_backend(listener, CancellationToken::new()));
        addr
    });
    eprintln!("backend on {backend}");

    let wanted = |part: &str| selected("E2E_ONLY", part);

    let mut columns: Vec<(&str, Option<Figures>)> = Vec::new();
    let direct = wanted("direct").then(|| runtime.block_on(measure(backend, budget, None)));
    columns.push(("direct", direct));

    let haproxy = wanted("haproxy").then(|| start_haproxy(dir.path(), backend)).flatten();
    columns.push((
        "HAProxy (tcp)",
        haproxy.map(|(running, addr)| {
            let figures = runtime.block_on(measure(addr, budget, Some(&[running.pid()])));
            drop(running);
            figures
        }),
    ));
    // Two HAProxy processes in a row: what two user-space hops without a tunnel cost here,
    // the reference for privlink's relay + agent.
    let chained = wanted("haproxy2")
        .then(|| {
            let (second, second_addr) = start_haproxy(dir.path(), backend)?;
            let (first, first_addr) = start_haproxy(dir.path(), second_addr)?;
            Some((first, second, first_addr))
        })
        .flatten();
    columns.push((
        "2 × HAProxy",
        chained.map(|(first, second, addr)| {
            let pids = [first.pid(), second.pid()];
            let figures = runtime.block_on(measure(addr, budget, Some(&pids)));
            drop((first, second));
            figures
        }),
    ));

    for (transport, label) in [("quic", "privlink QUIC"), ("tcp", "privlink TCP")] {
        if !wanted(transport) {
            columns.push((label, None));
            continue;
        }
        let tunnel = Tunnel::start(dir.path(), "127.0.0.1", transport, backend, None);
        let pids = [tunnel.relay.pid(), tunnel.agent.pid()];
        let figures = runtime.block_on(measure(tunnel.endpoint, budget, Some(&pids)));
        columns.push((label, Some(figures)));
        tunnel.stop();
    }

    let mut report = String::new();
    let _ = writeln!(report, "{}", machine_line());
    write_loopback_table(&mut report, &columns, budget);
    if wanted("wan") {
        match wan(dir.path(), budget) {
            Ok(wan_report) => report.push_str(&wan_report),
            Err(reason) => {
                let _ = writeln!(report, "\nWAN part skipped: {reason}");
            }
        }
    }
    let _ = writeln!(report, "\nHarness wall time: {:.0?}", started.elapsed());
    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-report.md");
    if std::fs::write(&out, &report).is_ok() {
        eprintln!("report written to {}", out.display());
    }
}

/// Runs every loopback measurement against `addr`; `pids` are the processes whose memory the
/// idle-connection figure counts (none for the direct connection).
async fn measure(addr: SocketAddr, budget: Budget, pids: Option<&[u32]>) -> Figures {
    let mut figures = Figures::default();
    let wanted = |part: &str| selected("E2E_MEASURES", part);
    // Memory first, while the processes are fresh: a heap that already served bulk transfers
    // would hand its free space to the idle connections and hide their cost.
    if let Some(pids) = pids.filter(|_| wanted("memory")) {
        figures.idle_kib = idle_memory(addr, budget.idle, pids).await;
    }
    let bulk = |direction, streams| async move {
        let result = load::parallel_bulk(addr, direction, streams, budget.bulk).await;
        result.map(|t| t.gbit_per_s()).unwrap_or_else(|e| fail("bulk", &e))
    };
    if wanted("bulk") {
        // The first bulk transfer against a target runs well below the ones after it (direct
        // upload measured first: 8–20 Gbit/s, measured after a download: 30–33), so one short
        // transfer, not reported, warms every target up alike.
        let warm_up = load::bulk(addr, Direction::Download, budget.bulk / 4).await;
        warm_up.unwrap_or_else(|e| fail("bulk warm-up", &e));
        figures.bulk = Some([
            bulk(Direction::Upload, 1).await,
            bulk(Direction::Download, 1).await,
            bulk(Direction::Upload, 8).await,
            bulk(Direction::Download, 8).await,
        ]);
    }
    if wanted("rr") {
        let rr = load::request_response(addr, 1024, budget.round_trips, budget.latency).await;
        figures.rr = Some(rr.unwrap_or_else(|e| fail("request/response", &e)));
    }
    if wanted("connections") || wanted("sequential") {
        let sequential =
            load::sequential_connections(addr, budget.sequential, budget.latency).await;
        figures.sequential = Some(sequential.unwrap_or_else(|e| fail("sequential", &e)));
    }
    if wanted("connections") || wanted("concurrent") {
        let concurrent = load::concurrent_connections(addr, 64, budget.concurrent).await;
        figures.concurrent = Some(concurrent.unwrap_or_else(|e| fail("concurrent", &e)));
    }
    eprintln!("measured {addr}");
    figures
}

/// Whether `part` is in the comma-separated list in environment variable `var` (unset: all).
fn selected(var: &str, part: &str) -> bool {
    std::env::var(var).map_or(true, |list| list.split(',').any(|p| p.trim() == part))
}

fn fail<T>(what: &str, error: &std::io::Error) -> T {
    panic!("{what} failed: {error}")
}

/// Resident memory of `pids` together, in KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Opens `count` connections (each with one 64-byte round trip, then idle) and returns the
/// growth of the processes' resident memory per connection, in KiB.
async fn idle_memory(addr: SocketAddr, count: usize, pids: &[u32]) -> Option<f64> {
    // Warm up: the first connections pay for one-time allocations (runtime, TLS, tables).
    drop(load::open_idle(addr, 50, Duration::from_secs(30)).await.ok()?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pids);
    let open = load::open_idle(addr, count, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| fail("idle connections", &e));
    // Let the processes finish the work the last connections started (flow state, acks).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pids);
    drop(open);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Some(after.saturating_sub(before) as f64 / count as f64)
}

/// A free loopback port (bound, then released for a child process to take).
fn free_port(ip: &str) -> u16 {
    StdListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("free port").port()
}

/// Waits until something accepts TCP connections on `addr` (bounded).
fn wait_listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// HAProxy in TCP mode in front of the backend; installed from Debian packages if missing.
fn start_haproxy(dir: &Path, backend: SocketAddr) -> Option<(Running, SocketAddr)> {
    if !sh("sh", &["-c", "command -v haproxy"]).0 {
        eprintln!("installing haproxy (Debian package) …");
        let (ok, out) = sh(
            "sh",
            &[
                "-c",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy || \
                    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy)",
            ],
        );
        if !ok {
            eprintln!("HAProxy column skipped: could not install haproxy: {out}");
            return None;
        }
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    // maxconn stays under this machine's open-file limit (HAProxy needs two per connection).
    let config = format!(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  \
         timeout server 300s\n\nfrontend bench\n  bind {addr}\n  default_backend backend\n\n\
         backend backend\n  server b1 {backend}\n"
    );
    let path = dir.join(format!("haproxy-{}.cfg", addr.port()));
    std::fs::write(&path, config).expect("haproxy config");
    let mut command = Command::new("haproxy");
    command.args(["-db", "-f", path.to_str().expect("utf-8")]);
    let running = Running::spawn(command);
    if !wait_listening(addr) {
        eprintln!("HAProxy column skipped: haproxy did not listen on {addr}");
        return None;
    }
    Some((running, addr))
}

/// A relay and an agent, each a real `privlink` process.
struct Tunnel {
    relay: Running,
    agent: Running,
    endpoint: SocketAddr,
    _files: tempfile::TempDir,
}

impl Tunnel {
    /// Starts a relay whose tunnel listens on `relay_ip` and an agent that dials it over
    /// `transport`; the endpoint forwards to `destination`. With `namespaces` = (cloud, vnet)
    /// the relay runs in the first and the agent in the second.
    fn start(
        dir: &Path,
        relay_ip: &str,
        transport: &str,
        destination: SocketAddr,
        namespaces: Option<(&Topology, &str, &str)>,
    ) -> Self {
        let tunnel_port = if namespaces.is_some() { 7443 } else { free_port(relay_ip) };
        let endpoint_port = if namespaces.is_some() { 8443 } else { free_port("127.0.0.1") };
        let files = tempfile::tempdir_in(dir).expect("tunnel files");
        let destination = destination.to_string();
        let (relay_cfg, agent_cfg) = common::write_tunnel_files(
            files.path(),
            &common::TunnelFiles {
                tunnel_listen: &format!("{relay_ip}:{tunnel_port}"),
                endpoint: "backend",
                endpoint_listen: &format!("127.0.0.1:{endpoint_port}"),
                destination: &destination,
                endpoint_extra: "inactivity_timeout = \"300s\"\nmax_connections = 20000",
                agent_extra: &format!("transport = \"{transport}\""),
                allow: &destination,
            },
        );
        let relay_args = ["relay", "--config", relay_cfg.as_str()];
        let agent_args = ["agent", "--config", agent_cfg.as_str()];
        let (mut relay, mut agent) = match namespaces {
            Some((topology, cloud, vnet)) => {
                let mut relay = Running::spawn(topology.exec(cloud, common::BIN, &relay_args));
                relay.wait_for("endpoint listening");
                (relay, Running::spawn(topology.exec(vnet, common::BIN, &agent_args)))
            }
            None => {
                let mut relay = Running::privlink(&relay_args);
                relay.wait_for("endpoint listening");
                (relay, Running::privlink(&agent_args))
            }
        };
        agent.wait_for("connected to relay");
        relay.wait_for("endpoint approved by agent");
        let endpoint = format!("127.0.0.1:{endpoint_port}").parse().expect("endpoint");
        Self { relay, agent, endpoint, _files: files }
    }

    fn stop(self) {
        let _ = self.agent.terminate();
        let _ = self.relay.terminate();
    }
}

fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("Machine: {cores} cores ({cpu}), Linux {kernel}.")
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// One table row: a formatted value per column, each with its ratio to the first column.
fn row(report: &mut String, label: &str, values: &[Option<f64>], show: impl Fn(f64) -> String) {
    let direct = values.first().copied().flatten();
    let _ = write!(report, "| {label} |");
    for value in values {
        match (value, direct) {
            (Some(v), Some(d)) if d > 0.0 => {
                let _ = write!(report, " {} ({:.2}×) |", show(*v), v / d);
            }
            (Some(v), _) => {
                let _ = write!(report, " {} |", show(*v));
            }
            (None, _) => report.push_str(" — |"),
        }
    }
    report.push('\n');
}

fn write_loopback_table(report: &mut String, columns: &[(&str, Option<Figures>)], budget: Budget) {
    let _ = writeln!(
        report,
        "\n### Loopback (all processes on this machine; ratios are to `direct`)\n"
    );
    let _ = write!(report, "| measure |");
    for (name, _) in columns {
        let _ = write!(report, " {name} |");
    }
    let _ = write!(report, "\n|---|");
    for _ in columns {
        report.push_str("---|");
    }
    report.push('\n');
    let pick = |f: &dyn Fn(&Figures) -> Option<f64>| -> Vec<Option<f64>> {
        columns.iter().map(|(_, figures)| figures.as_ref().and_then(f)).collect()
    };
    let gbit = |v: f64| format!("{v:.2} Gbit/s");
    let secs = |v: f64| ms(Duration::from_secs_f64(v));
    let micros = |v: f64| us(Duration::from_secs_f64(v));
    let count = |v: f64| format!("{v:.0}");
    for (i, label) in
        ["1 stream, upload", "1 stream, download", "8 streams, upload", "8 streams, download"]
            .into_iter()
            .enumerate()
    {
        row(report, &format!("bulk {label}"), &pick(&|f| f.bulk.map(|b| b[i])), gbit);
    }
    for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        let quantile = |f: &Figures| f.rr.as_ref().map(|l| l.quantile(q).as_secs_f64());
        row(report, &format!("1 KiB req/resp {label}"), &pick(&quantile), micros);
    }
    row(report, "1 KiB round trips/s", &pick(&|f| f.rr.as_ref().map(Latencies::rate)), count);
    let mean = |f: &Figures| f.sequential.as_ref().map(|l| l.mean().as_secs_f64());
    row(report, "new conn, sequential, mean", &pick(&mean), secs);
    let p99 = |f: &Figures| f.sequential.as_ref().map(|l| l.quantile(0.99).as_secs_f64());
    row(report, "new conn, sequential, p99", &pick(&p99), secs);
    let rate = |f: &Figures| f.concurrent.as_ref().map(Latencies::rate);
    row(report, "new conn, 64 workers, conn/s", &pick(&rate), count);
    let memory_label =
        format!("idle conn memory (forwarders' RSS growth / conn, {} conns)", budget.idle);
    row(report, &memory_label, &pick(&|f| f.idle_kib), |k| format!("{k:.1} KiB"));
    let samples: Vec<String> = columns
        .iter()
        .filter_map(|(n, f)| {
            let f = f.as_ref()?;
            let len = |l: &Option<Latencies>| l.as_ref().map_or(0, Latencies::count);
            Some(format!(
                "{n}: {} round trips, {} sequential, {} concurrent",
                len(&f.rr),
                len(&f.sequential),
                len(&f.concurrent)
            ))
        })
        .collect();
    let _ = writeln!(report, "\nSamples: {}.", samples.join("; "));
}

/// A TLS server (certificate for [`VAULT_NAME`]) that answers any request with a short HTTP
/// response: what a client's time to first byte is measured against.
async fn serve_tls(listener: TcpListener, ca: Arc<CertificateAuthority>) {
    let issued = ca.issue_server(&[VAULT_NAME]).expect("vault cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_no_client_auth()
    .with_single_cert(vec![issued.cert_der.clone()], issued.key_der.clone_key())
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((conn, _)) = listener.accept().await else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(conn).await else { return };
            let mut request = [0u8; 1024];
            if tls.read(&mut request).await.unwrap_or(0) > 0 {
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                let _ = tls.shutdown().await;
            }
        });
    }
}

/// Time from `connect` to the first byte of the response to a request sent over a fresh TLS
/// connection to `addr`.
async fn tls_ttfb(addr: SocketAddr, ca: &CertificateAuthority) -> std::io::Result<Duration> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.identity.cert_der.clone()).map_err(std::io::Error::other)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name =
        rustls::pki_types::ServerName::try_from(VAULT_NAME).map_err(std::io::Error::other)?;
    let started = Instant::now();
    let conn = TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    let mut tls = connector.connect(name, conn).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: contoso-kv.vault.azure.net\r\n\r\n").await?;
    let mut first = [0u8; 1];
    tls.read_exact(&mut first).await?;
    Ok(started.elapsed())
}

/// Medians of repeated samples from `run`, which runs in namespace `ns`.
fn sample_in<T, F, Fut>(ns: &str, run: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    spawn_in_namespace(ns, run).join().expect("client thread").expect("client in namespace")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// The emulated-WAN part: cloud (relay, clients) and vnet (agent, backends) joined by the
/// link emulator.
fn wan(dir: &Path, budget: Budget) -> Result<String, String> {
    let links = [Link::emulated(0, 1, CLOUD_ADDR, VNET_ADDR, LinkProfile::wan(WAN_DELAY, 0.0))];
    let topology = Topology::create("bench", &["cloud", "vnet"], &links)?;
    let (cloud, vnet) = (topology.ns(0).to_owned(), topology.ns(1).to_owned());
    let ca = Arc::new(CertificateAuthority::new("privlink bench CA").map_err(|e| e.to_string())?);
    let bulk_backend: SocketAddr = format!("{VNET_ADDR}:9000").parse().expect("addr");
    let tls_backend: SocketAddr = format!("{VNET_ADDR}:9443").parse().expect("addr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop = CancellationToken::new();
    let backends = {
        let (ca, stop) = (ca.clone(), stop.clone());
        spawn_in_namespace(&vnet, move || async move {
            let bulk = TcpListener::bind(bulk_backend).await.expect("bind bulk backend");
            let tls = TcpListener::bind(tls_backend).await.expect("bind TLS backend");
            ready_tx.send(()).expect("ready");
            tokio::spawn(serve_tls(tls, ca));
            load::serve_backend(bulk, stop).await;
        })
    };
    ready_rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "backends did not start")?;

    // The physical round trip, measured: TCP connects from cloud to vnet take one.
    let rtt = sample_in(&cloud, move || async move {
        let mut samples = Vec::new();
        for _ in 0..10 {
            let begun = Instant::now();
            drop(TcpStream::connect(bulk_backend).await.expect("connect across the link"));
            samples.push(begun.elapsed());
        }
        median(samples)
    });

    let mut report = format!(
        "\n### Emulated WAN: cloud ⇄ vnet through the link emulator, {WAN_DELAY:?} each way \
         (measured TCP-connect RTT {})\n\n",
        ms(rtt)
    );
    let ttfb_samples = budget.ttfb_samples;
    let wan_bulk = budget.wan_bulk;
    let ttfb = |ns: &str, addr: SocketAddr| {
        let ca = ca.clone();
        sample_in(ns, move || async move {
            let mut samples = Vec::new();
            for _ in 0..ttfb_samples {
                samples.push(tls_ttfb(addr, &ca).await.expect("TLS through the path"));
            }
            median(samples)
        })
    };
    let bulk_down = |ns: &str, addr: SocketAddr| {
        sample_in(ns, move || async move {
            load::bulk(addr, Direction::Download, wan_bulk).await.expect("bulk").gbit_per_s() * 1e3
        })
    };

    let mut ttfb_rows = Vec::new();
    let mut loss_rows = Vec::new();
    let on_the_wan = Some((&topology, cloud.as_str(), vnet.as_str()));
    for (label, loss) in [("no loss", 0.0), ("0.5 % loss", WAN_LOSS)] {
        topology.emulator(0).expect("emulated link").set_profile(LinkProfile::wan(WAN_DELAY, loss));
        let direct_ttfb = ttfb(&cloud, tls_backend);
        // Direct, the TCP handshake, TLS 1.3 and the request each cross the WAN; through the
        // tunnel only TLS and the request do (the tunnel is up; the agent's connect is local).
        ttfb_rows.push((label, "direct (TCP handshake + TLS 1.3 + request)", direct_ttfb, 3));
        let direct = bulk_down(&cloud, bulk_backend);
        loss_rows.push((label, "direct TCP", direct, direct));
        for (transport, path) in [("quic", "privlink QUIC"), ("tcp", "privlink TCP")] {
            let tunnel = Tunnel::start(dir, CLOUD_ADDR, transport, tls_backend, on_the_wan);
            let through = ttfb(&cloud, tunnel.endpoint);
            ttfb_rows.push((label, path, through, 2));
            tunnel.stop();
            let tunnel = Tunnel::start(dir, CLOUD_ADDR, transport, bulk_backend, on_the_wan);
            loss_rows.push((label, path, bulk_down(&cloud, tunnel.endpoint), direct));
            tunnel.stop();
        }
    }
    topology.emulator(0).expect("emulated link").set_profile(LinkProfile::wan(WAN_DELAY, 0.0));

    let _ = writeln!(
        report,
        "| time to first byte, new TLS connection (median of {ttfb_samples}) | path | measured | \
         physical minimum | ratio |\n|---|---|---|---|---|"
    );
    for (label, path, measured, round_trips) in ttfb_rows {
        let minimum = rtt * round_trips;
        let _ = writeln!(
            report,
            "| {label} | {path} | {} | {} ({round_trips} RTT) | {:.2}× |",
            ms(measured),
            ms(minimum),
            measured.as_secs_f64() / minimum.as_secs_f64()
        );
    }
    let _ = writeln!(
        report,
        "\n| one-stream bulk, vnet → cloud ({wan_bulk:?}) | path | Mbit/s | ratio to direct TCP |\n|---|---|---|---|"
    );
    for (label, path, mbit, direct) in loss_rows {
        let _ = writeln!(report, "| {label} | {path} | {mbit:.0} | {:.2}× |", mbit / direct);
    }
    stop.cancel();
    drop(topology);
    let _ = backends.join();
    Ok(report)
}
