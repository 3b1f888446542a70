//! The load tool: a backend server and the client-side measurements the benchmark harness
//! runs against it — bulk throughput each way, request/response latency, new connections
//! (sequential and concurrent) and idle connections held open. It speaks plain TCP, so the
//! same code measures a direct connection, HAProxy and the tunnel alike.
//!
//! Every client connection starts with one command byte: [`UPLOAD`] (the backend reads to
//! EOF and answers the byte count as a u64), [`DOWNLOAD`] followed by a u32 duration in
//! milliseconds (the backend sends for that long, then FIN), [`ECHO`] (everything is
//! echoed back until EOF) or [`SINK`] (the backend never reads: an upload to it backs up).
//! [`stall`] holds connections whose transfers back up, for measuring what they cost the
//! others. [`churn`] keeps opening connections and records every failure, for faults; with
//! [`LoadTls`] each is a new TLS connection (the backend speaks TLS to clients that start with
//! a handshake). Each measurement is bounded in count and in time.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Command byte: the client sends until it shuts down its side; the backend answers the count.
pub const UPLOAD: u8 = b'U';
/// Command byte: the backend sends for the requested time, then FIN.
pub const DOWNLOAD: u8 = b'D';
/// Command byte: the backend echoes every byte.
pub const ECHO: u8 = b'E';
/// Command byte: the backend never reads again, for [`SINK_HOLD`] or until stopped.
pub const SINK: u8 = b'S';
/// How long the backend holds a [`SINK`] connection (it cannot see the client leave without
/// reading).
const SINK_HOLD: Duration = Duration::from_secs(120);

/// Size of the writes bulk senders make.
const BULK_CHUNK: usize = 128 * 1024;
/// Slack added to a measurement's own duration before it is declared stalled.
const STALL: Duration = Duration::from_secs(30);

/// Serves the load protocol on `listener` until `stop` fires; one task per connection.
pub async fn serve_backend(listener: TcpListener, stop: CancellationToken) {
    serve_backend_tls(listener, stop, None).await;
}

/// [`serve_backend`], also speaking TLS with `tls`: a connection whose first byte is a TLS
/// record (0x16, which no command byte is) gets a handshake first, then the load protocol.
pub async fn serve_backend_tls(
    listener: TcpListener,
    stop: CancellationToken,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((conn, _)) = accepted else { continue };
        let _ = conn.set_nodelay(true);
        let stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_maybe_tls(conn, tls) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn serve_maybe_tls(
    conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<()> {
    let Some(tls) = tls else { return serve_one(conn).await };
    let mut first = [0u8; 1];
    if tokio::time::timeout(STALL, conn.peek(&mut first)).await.map_err(io::Error::other)?? == 0 {
        return Ok(());
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        return serve_one(conn).await;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream =
        tokio::time::timeout(STALL, acceptor.accept(conn)).await.map_err(io::Error::other)??;
    serve_one(stream).await
}

/// The first byte of a TLS ClientHello record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S) -> io::Result<()> {
    match conn.read_u8().await? {
        UPLOAD => {
            let mut buf = vec![0u8; BULK_CHUNK];
            let mut total = 0u64;
            loop {
                let n = conn.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            conn.write_u64(total).await?;
            conn.shutdown().await
        }
        DOWNLOAD => {
            let millis = conn.read_u32().await?;
            let until = Instant::now() + Duration::from_millis(u64::from(millis));
            let chunk = vec![0x5au8; BULK_CHUNK];
            while Instant::now() < until {
                conn.write_all(&chunk).await?;
            }
            conn.shutdown().await?;
            // Wait for the client's close so the last bytes are not lost to a reset.
            let mut sink = [0u8; 64];
            while conn.read(&mut sink).await? > 0 {}
            Ok(())
        }
        ECHO => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = conn.read(&mut buf).await?;
                if n == 0 {
                    return conn.shutdown().await;
                }
                conn.write_all(&buf[..n]).await?;
            }
        }
        SINK => {
            tokio::time::sleep(SINK_HOLD).await;
            Ok(())
        }
        other => {
            Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown command {other}")))
        }
    }
}

/// Bytes moved in a time.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Bytes that arrived at the receiving end.
    pub bytes: u64,
    /// From the first byte sent to the receiver's confirmation.
    pub elapsed: Duration,
}

impl Throughput {
    /// Gigabits per second.
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Which way bulk data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → backend.
    Upload,
    /// Backend → client.
    Download,
}

async fn bounded<T>(limit: Duration, work: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, work).await.map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, format!("no result within {limit:?}"))
    })?
}

/// One bulk stream for `duration`.
pub async fn bulk(
    addr: SocketAddr,
    direction: Direction,
    duration: Duration,
) -> io::Result<Throughput> {
    bounded(duration + STALL, async {
        let mut conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        let started = Instant::now();
        match direction {
            Direction::Upload => {
                conn.write_u8(UPLOAD).await?;
                let chunk = vec![0xa5u8; BULK_CHUNK];
                while started.elapsed() < duration {
                    conn.write_all(&chunk).await?;
                }
                conn.shutdown().await?;
                let bytes = conn.read_u64().await?;
                Ok(Throughput { bytes, elapsed: started.elapsed() })
            }
            Direction::Download => {
                let mut request = [DOWNLOAD, 0, 0, 0, 0];
                let millis = u32::try_from(duration.as_millis()).unwrap_or(u32::MAX);
                request[1..].copy_from_slice(&millis.to_be_bytes());
                conn.write_all(&request).await?;
                let mut buf = vec![0u8; BULK_CHUNK];
                let mut bytes = 0u64;
                loop {
                    let n = conn.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
                Ok(Throughput { bytes, elapsed: started.elapsed() })
            }
        }
    })
    .await
}

/// `streams` bulk streams at once; bytes summed over the longest elapsed time.
pub async fn parallel_bulk(
    addr: SocketAddr,
    direction: Direction,
    streams: usize,
    duration: Duration,
) -> io::Result<Throughput> {
    let runs: Vec<_> =
        (0..streams).map(|_| tokio::spawn(bulk(addr, direction, duration))).collect();
    let mut total = Throughput { bytes: 0, elapsed: Duration::ZERO };
    for run in runs {
        let one = run.await.map_err(io::Error::other)??;
        total.bytes += one.bytes;
        total.elapsed = total.elapsed.max(one.elapsed);
    }
    Ok(total)
}

/// Latency samples.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
    /// Wall time the samples took in all.
    pub wall: Duration,
}

impl Latencies {
    fn new(mut samples: Vec<Duration>, wall: Duration) -> Self {
        samples.sort_unstable();
        Self { sorted: samples, wall }
    }

    /// Number of samples.
    pub fn count(&self) -> usize {
        self.sorted.len()
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        #[allow(clippy::cast_possible_truncation, reason = "q is in 0..=1, so rank ≤ len")]
        let rank = (q.clamp(0.0, 1.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    /// Arithmetic mean.
    pub fn mean(&self) -> Duration {
        let n = u32::try_from(self.sorted.len().max(1)).unwrap_or(u32::MAX);
        self.sorted.iter().sum::<Duration>() / n
    }

    /// Samples per second of wall time.
    pub fn rate(&self) -> f64 {
        self.sorted.len() as f64 / self.wall.as_secs_f64()
    }
}

/// `size`-byte request, `size`-byte response, on one connection: up to `count` round trips
/// or `limit` of time, whichever comes first.
pub async fn request_response(
    addr: SocketAddr,
    size: usize,
    count: usize,
    limit: Duration,
) -> io::Result<Latencies> {
    bounded(limit + STALL, async {
        let mut conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        conn.write_u8(ECHO).await?;
        let request = vec![0x42u8; size];
        let mut response = vec![0u8; size];
        let mut samples = Vec::with_capacity(count);
        let started = Instant::now();
        while samples.len() < count && started.elapsed() < limit {
            let sent = Instant::now();
            conn.write_all(&request).await?;
            conn.read_exact(&mut response).await?;
            samples.push(sent.elapsed());
        }
        Ok(Latencies::new(samples, started.elapsed()))
    })
    .await
}

/// Connect, one `size`-byte echo round trip; the connection is returned open.
async fn connect_and_round_trip(addr: SocketAddr, size: usize) -> io::Result<TcpStream> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    round_trip(&mut conn, size).await?;
    Ok(conn)
}

/// One echo round trip of `size` bytes on `conn`.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    size: usize,
) -> io::Result<()> {
    let mut request = vec![0x17u8; size + 1];
    request[0] = ECHO;
    conn.write_all(&request).await?;
    let mut response = vec![0u8; size];
    conn.read_exact(&mut response).await?;
    if response[..] != request[1..] {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo came back changed"));
    }
    Ok(())
}

/// TLS for the load tool's backend and clients: a private CA, a backend certificate for a
/// name, and both sides' settings.
#[derive(Debug, Clone)]
pub struct LoadTls {
    /// The backend's settings (for [`serve_backend_tls`]).
    pub server: Arc<rustls::ServerConfig>,
    /// The clients' settings, trusting only the CA.
    pub client: Arc<rustls::ClientConfig>,
    /// The name clients ask for and the certificate carries.
    pub name: rustls::pki_types::ServerName<'static>,
}

impl LoadTls {
    /// A fresh CA and a backend certificate for `name`.
    pub fn new(name: &str) -> Self {
        let ca = privlink_transport::pki::CertificateAuthority::new("load backend CA").expect("CA");
        let issued = ca.issue_server(&[name]).expect("certificate");
        let provider = privlink_transport::crypto::default_provider();
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![issued.cert_der.clone()], issued.key_der.clone_key())
            .expect("server TLS");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.identity.cert_der.clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
        Self { server: Arc::new(server), client: Arc::new(client), name }
    }
}

/// A new TLS connection with one echo round trip: connect, handshake (the destination's
/// certificate verified end to end), 64 bytes each way, close.
pub async fn tls_round_trip(addr: SocketAddr, tls: &LoadTls) -> io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
    let mut conn = connector.connect(tls.name.clone(), tcp).await?;
    round_trip(&mut conn, 64).await?;
    conn.shutdown().await
}

/// Connections one after another, each timed from connect to the end of its round trip and
/// then closed, until `count` are done or `started + duration` has passed.
async fn time_connections(
    addr: SocketAddr,
    count: usize,
    started: Instant,
    duration: Duration,
) -> io::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    while samples.len() < count && started.elapsed() < duration {
        let begun = Instant::now();
        drop(connect_and_round_trip(addr, 64).await?);
        samples.push(begun.elapsed());
    }
    Ok(samples)
}

/// New connections one after another, each with a 64-byte round trip: up to `count` or `limit`.
pub async fn sequential_connections(
    addr: SocketAddr,
    count: usize,
    limit: Duration,
) -> io::Result<Latencies> {
    bounded(limit + STALL, async {
        let started = Instant::now();
        let samples = time_connections(addr, count, started, limit).await?;
        Ok(Latencies::new(samples, started.elapsed()))
    })
    .await
}

/// `workers` loops opening connections (each with a 64-byte round trip) for `duration`;
/// every connection's time, and the wall time (so [`Latencies::rate`] is connections/s).
pub async fn concurrent_connections(
    addr: SocketAddr,
    workers: usize,
    duration: Duration,
) -> io::Result<Latencies> {
    bounded(duration + STALL, async {
        let started = Instant::now();
        let loops: Vec<_> = (0..workers)
            .map(|_| tokio::spawn(time_connections(addr, usize::MAX, started, duration)))
            .collect();
        let mut all = Vec::new();
        for one in loops {
            all.extend(one.await.map_err(io::Error::other)??);
        }
        Ok(Latencies::new(all, started.elapsed()))
    })
    .await
}

/// Opens `count` connections, each with one 64-byte round trip, and returns them open (idle).
pub async fn open_idle(
    addr: SocketAddr,
    count: usize,
    limit: Duration,
) -> io::Result<Vec<TcpStream>> {
    bounded(limit, async {
        let mut open = Vec::with_capacity(count);
        for _ in 0..count {
            open.push(connect_and_round_trip(addr, 64).await?);
        }
        Ok(open)
    })
    .await
}

/// Connections whose transfers have stopped moving: downloads whose client stopped reading,
/// or uploads to a backend that does not read. Dropping it closes them.
#[derive(Debug)]
pub struct Stalled {
    connections: Vec<TcpStream>,
    pushers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Stalled {
    fn drop(&mut self) {
        for pusher in &self.pushers {
            pusher.abort();
        }
    }
}

/// Opens `count` transfers in `direction` that stall: a download reads its first 4 KiB and
/// stops reading; an upload pushes at a backend that never reads (a task per connection keeps
/// pushing whatever the path accepts). Each backs up through every buffer and window on the
/// way while the value lives.
pub async fn stall(addr: SocketAddr, direction: Direction, count: usize) -> io::Result<Stalled> {
    bounded(STALL, async {
        let mut stalled = Stalled { connections: Vec::new(), pushers: Vec::new() };
        for _ in 0..count {
            let mut conn = TcpStream::connect(addr).await?;
            match direction {
                Direction::Download => {
                    let millis = u32::try_from(SINK_HOLD.as_millis()).unwrap_or(u32::MAX);
                    let mut request = [DOWNLOAD, 0, 0, 0, 0];
                    request[1..].copy_from_slice(&millis.to_be_bytes());
                    conn.write_all(&request).await?;
                    let mut first = [0u8; 4096];
                    conn.read_exact(&mut first).await?;
                    stalled.connections.push(conn);
                }
                Direction::Upload => {
                    conn.write_u8(SINK).await?;
                    stalled.pushers.push(tokio::spawn(async move {
                        let chunk = vec![0xa5u8; BULK_CHUNK];
                        while conn.write_all(&chunk).await.is_ok() {}
                    }));
                }
            }
        }
        Ok(stalled)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn backend() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve_backend(listener, stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn every_measurement_runs_against_the_backend() {
        let (addr, stop) = backend().await;
        let short = Duration::from_millis(100);
        let up = bulk(addr, Direction::Upload, short).await.expect("upload");
        let down = bulk(addr, Direction::Download, short).await.expect("download");
        assert!(up.bytes > 0 && down.bytes > 0, "{up:?} {down:?}");
        let both = parallel_bulk(addr, Direction::Download, 3, short).await.expect("parallel");
        assert!(both.bytes > 0);
        let rr = request_response(addr, 1024, 50, Duration::from_secs(5)).await.expect("rr");
        assert_eq!(rr.count(), 50);
        assert!(rr.quantile(0.5) <= rr.quantile(0.99));
        let seq = sequential_connections(addr, 20, Duration::from_secs(5)).await.expect("seq");
        assert_eq!(seq.count(), 20);
        let conc = concurrent_connections(addr, 4, short).await.expect("concurrent");
        assert!(conc.count() >= 4);
        let idle = open_idle(addr, 10, Duration::from_secs(5)).await.expect("idle");
        assert_eq!(idle.len(), 10);
        // Stalled transfers leave the backend serving others.
        let stalled_down = stall(addr, Direction::Download, 3).await.expect("stall downloads");
        let stalled_up = stall(addr, Direction::Upload, 3).await.expect("stall uploads");
        let down = bulk(addr, Direction::Download, short).await.expect("download beside them");
        assert!(down.bytes > 0);
        drop((stalled_down, stalled_up));
        stop.cancel();
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let lat = Latencies::new(samples, Duration::from_secs(1));
        assert_eq!(lat.quantile(0.5), Duration::from_millis(50));
        assert_eq!(lat.quantile(0.99), Duration::from_millis(99));
        assert_eq!(lat.quantile(1.0), Duration::from_millis(100));
        assert_eq!(lat.quantile(0.0), Duration::from_millis(1));
    }
}

/// One connection of a [`churn`]: when it started and how it went.
#[derive(Debug, Clone)]
pub struct ChurnSample {
    /// When it began connecting.
    pub started: Instant,
    /// Connect to the end of its round trip (or to its failure).
    pub took: Duration,
    /// `None` when the round trip came back whole; what went wrong otherwise (an error, a
    /// truncated or changed echo, no answer within the per-connection limit).
    pub failure: Option<String>,
}

/// `workers` loops opening connections, each with a 64-byte echo round trip written before
/// any answer (like a TLS ClientHello), until `stop` fires; every connection is recorded —
/// failures counted, not fatal — and none may take longer than `per_connection` (a client
/// that gives up). For measuring what a fault costs connections opened during it.
pub async fn churn(
    addr: SocketAddr,
    workers: usize,
    per_connection: Duration,
    stop: CancellationToken,
) -> Vec<ChurnSample> {
    churn_tls(addr, workers, per_connection, stop, None).await
}

/// [`churn`], each connection a new TLS connection to the backend when `tls` is given (the
/// handshake and the round trip inside it).
pub async fn churn_tls(
    addr: SocketAddr,
    workers: usize,
    per_connection: Duration,
    stop: CancellationToken,
    tls: Option<LoadTls>,
) -> Vec<ChurnSample> {
    let loops: Vec<_> = (0..workers)
        .map(|_| {
            let stop = stop.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    let attempt = async {
                        match &tls {
                            Some(tls) => tls_round_trip(addr, tls).await,
                            None => connect_and_round_trip(addr, 64).await.map(drop),
                        }
                    };
                    let result = tokio::time::timeout(per_connection, attempt).await;
                    let failure = match result {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some(format!("no answer within {per_connection:?}")),
                    };
                    samples.push(ChurnSample { started, took: started.elapsed(), failure });
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for one in loops {
        all.extend(one.await.unwrap_or_default());
    }
    all
}

/// [`churn`] for `duration`, then stopped.
pub async fn churn_for(
    addr: SocketAddr,
    workers: usize,
    duration: Duration,
    tls: Option<LoadTls>,
) -> Vec<ChurnSample> {
    let stop = CancellationToken::new();
    let running = tokio::spawn(churn_tls(addr, workers, STALL, stop.clone(), tls));
    tokio::time::sleep(duration).await;
    stop.cancel();
    running.await.unwrap_or_default()
}
