//! The emulated WAN: cloud and vnet namespaces joined by the test bed's link emulator (25 ms
//! each way, then 0.5 % loss); time to first byte of a new TLS connection and single-stream
//! bulk, through the tunnel and directly across the same link; then, the link capped at
//! 4 Mbit/s, request/response latency beside a download that fills it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use privlink_testbed::load::{self, Direction};
use privlink_testbed::netns::spawn_in_namespace;
use privlink_testbed::{Link, LinkProfile, Topology};
use privlink_transport::pki::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Budget;
use crate::report::ms;
use crate::targets::PrivlinkTarget;

pub(crate) const WAN_DELAY: Duration = Duration::from_millis(25);

pub(crate) const WAN_LOSS: f64 = 0.005;

pub(crate) const CLOUD_ADDR: &str = "10.232.0.1";

pub(crate) const VNET_ADDR: &str = "10.232.0.2";

/// The thin link of the "beside a download" rows: a few Mbit/s with a quarter-second queue.
fn thin_link() -> LinkProfile {
    LinkProfile {
        rate_bps: Some(4_000_000),
        queue_bytes: 128 * 1024,
        ..LinkProfile::wan(WAN_DELAY, 0.0)
    }
}

/// How long the download runs before the exchanges beside it are timed.
const THIN_LINK_SETTLE: Duration = Duration::from_secs(1);

pub(crate) const VAULT_NAME: &str = "contoso-kv.vault.azure.net";

/// A TLS server (certificate for [`VAULT_NAME`]) that answers any request with a short HTTP
/// response: what a client's time to first byte is measured against.
pub(crate) async fn serve_tls(listener: TcpListener, ca: Arc<CertificateAuthority>) {
    let issued = ca.issue_server(&[VAULT_NAME]).expect("vault cert");
    let config =
        rustls::ServerConfig::builder_with_provider(privlink_transport::crypto::default_provider())
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
pub(crate) async fn tls_ttfb(
    addr: SocketAddr,
    ca: &CertificateAuthority,
) -> std::io::Result<Duration> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.identity.cert_der.clone()).map_err(std::io::Error::other)?;
    let config =
        rustls::ClientConfig::builder_with_provider(privlink_transport::crypto::default_provider())
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
pub(crate) fn sample_in<T, F, Fut>(ns: &str, run: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    spawn_in_namespace(ns, run).join().expect("client thread").expect("client in namespace")
}

pub(crate) fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// The emulated-WAN part: cloud (relay, clients) and vnet (agent, backends) joined by the
/// link emulator.
pub(crate) fn wan(dir: &Path, budget: Budget) -> Result<String, String> {
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
    let on_the_wan = Some((cloud.as_str(), vnet.as_str()));
    for (label, loss) in [("no loss", 0.0), ("0.5 % loss", WAN_LOSS)] {
        topology.emulator(0).expect("emulated link").set_profile(LinkProfile::wan(WAN_DELAY, loss));
        let direct_ttfb = ttfb(&cloud, tls_backend);
        // Direct, the TCP handshake, TLS 1.3 and the request each cross the WAN; through the
        // tunnel only TLS and the request do (the tunnel is up; the agent's connect is local).
        ttfb_rows.push((label, "direct (TCP handshake + TLS 1.3 + request)", direct_ttfb, 3));
        let direct = bulk_down(&cloud, bulk_backend);
        loss_rows.push((label, "direct TCP", direct, direct));
        for (transport, path) in [("quic", "privlink QUIC"), ("tcp", "privlink TCP")] {
            let tunnel =
                PrivlinkTarget::start(dir, CLOUD_ADDR, (transport, false), tls_backend, on_the_wan);
            let through = ttfb(&cloud, tunnel.endpoint);
            ttfb_rows.push((label, path, through, 2));
            tunnel.stop();
            let tunnel = PrivlinkTarget::start(
                dir,
                CLOUD_ADDR,
                (transport, false),
                bulk_backend,
                on_the_wan,
            );
            loss_rows.push((label, path, bulk_down(&cloud, tunnel.endpoint), direct));
            tunnel.stop();
        }
    }

    // A thin link (a branch office's uplink, say) filled by one download: how long a small
    // exchange on a second connection waits behind it. What queues ahead of the reply is the
    // link's own queue (direct pays it too) plus whatever the path buffers before the link.
    topology.emulator(0).expect("emulated link").set_profile(thin_link());
    let beside_bulk = |ns: &str, addr: SocketAddr| {
        sample_in(ns, move || async move {
            let bulk = tokio::spawn(load::bulk(addr, Direction::Download, wan_bulk));
            // Let the download reach its steady state (its queues full) before sampling.
            tokio::time::sleep(THIN_LINK_SETTLE).await;
            let exchanges = load::request_response(addr, 1024, 10_000, wan_bulk / 2)
                .await
                .expect("request/response beside the download");
            let bulk = bulk.await.expect("bulk task").expect("bulk");
            (exchanges.quantile(0.5), exchanges.quantile(0.99), bulk.gbit_per_s() * 1e3)
        })
    };
    let mut thin_rows = vec![("direct TCP", beside_bulk(&cloud, bulk_backend))];
    for (transport, path) in [("quic", "privlink QUIC"), ("tcp", "privlink TCP")] {
        let tunnel =
            PrivlinkTarget::start(dir, CLOUD_ADDR, (transport, false), bulk_backend, on_the_wan);
        thin_rows.push((path, beside_bulk(&cloud, tunnel.endpoint)));
        tunnel.stop();
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
    let thin = thin_link();
    let _ = writeln!(
        report,
        "\n| 1 KiB request/response beside a one-stream download, {} Mbit/s link, {} KiB queue, \
         {WAN_DELAY:?} each way | p50 | p99 | download Mbit/s |\n|---|---|---|---|",
        thin.rate_bps.unwrap_or(0) / 1_000_000,
        thin.queue_bytes / 1024
    );
    let direct_p50 = thin_rows.first().map_or(Duration::ZERO, |(_, (p50, _, _))| *p50);
    for (path, (p50, p99, mbit)) in thin_rows {
        let _ = writeln!(
            report,
            "| {path} | {} ({:.2}×) | {} | {mbit:.1} |",
            ms(p50),
            p50.as_secs_f64() / direct_p50.as_secs_f64(),
            ms(p99)
        );
    }
    stop.cancel();
    drop(topology);
    let _ = backends.join();
    Ok(report)
}
