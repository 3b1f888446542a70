//! Criterion benchmarks of the copy loop, the hot path of every tunnelled connection: bytes
//! from a TCP source through `copy_bidirectional_metered` to a sink, over loopback TCP and
//! over a real tunnel stream (QUIC and HTTP/2 over TLS, in process), for several write sizes.
//! tokio's `copy_bidirectional_with_sizes` runs beside it over loopback TCP as the baseline
//! the loop was derived from (it keeps two 32 KiB buffers per connection for its whole life;
//! ours keeps none while idle — this shows what that costs in throughput).
//! Run with `cargo bench --bench copy_loop`.

use std::future::pending;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use privlink_transport::copy::{DEFAULT_BUFFER_SIZE, copy_bidirectional_metered};
use privlink_transport::limits::STREAM_RECEIVE_WINDOW as WINDOW;
use privlink_transport::pki::CertificateAuthority;
use privlink_transport::tls;
use privlink_transport::tunnel::{AgentConnection, RelayConnection, TunnelStream};
use privlink_transport::{h2, quic};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Bytes moved per measured iteration.
const PER_ITERATION: usize = 8 * 1024 * 1024;
const WRITE_SIZES: [usize; 3] = [1024, 16 * 1024, 64 * 1024];
const LONG: Duration = Duration::from_secs(3600);

/// Which copy runs in the middle.
#[derive(Clone, Copy)]
enum Loop {
    Privlink,
    Tokio,
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, (accepted, _)) = (client.expect("connect"), accepted.expect("accept"));
    client.set_nodelay(true).expect("nodelay");
    accepted.set_nodelay(true).expect("nodelay");
    (client, accepted)
}

/// Starts the copy between `middle_in` and `middle_out` on its own task.
fn spawn_copy<A, B>(mut middle_in: A, mut middle_out: B, which: Loop)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match which {
            Loop::Privlink => {
                copy_bidirectional_metered(
                    &mut middle_in,
                    &mut middle_out,
                    LONG,
                    DEFAULT_BUFFER_SIZE,
                    pending(),
                )
                .await;
            }
            Loop::Tokio => {
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut middle_in,
                    &mut middle_out,
                    DEFAULT_BUFFER_SIZE,
                    DEFAULT_BUFFER_SIZE,
                )
                .await;
            }
        }
    });
}

/// Writes `PER_ITERATION` bytes per iteration in `write_size` pieces into `source` and reads
/// them all from `sink`; returns the time the iterations took.
async fn pump<W, R>(source: &mut W, sink: &mut R, write_size: usize, iterations: u64) -> Duration
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let chunk = vec![0x6bu8; write_size];
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    for _ in 0..iterations {
        let write = async {
            let mut left = PER_ITERATION;
            while left > 0 {
                let n = left.min(write_size);
                source.write_all(&chunk[..n]).await.expect("write");
                left -= n;
            }
        };
        let read = async {
            let mut got = 0;
            while got < PER_ITERATION {
                let n = sink.read(&mut buf).await.expect("read");
                assert!(n > 0, "the copy ended early");
                got += n;
            }
        };
        tokio::join!(write, read);
    }
    started.elapsed()
}

/// A relay-side stream and the agent-side stream it reaches, over `kind` ("quic" or "h2").
async fn tunnel_stream_pair(kind: &str) -> (TunnelStream, TunnelStream) {
    let ca = CertificateAuthority::new("bench CA").expect("CA");
    let relay_cert = ca.issue_server(&["localhost"]).expect("relay cert");
    let server_tls = tls::tunnel_server_config(
        vec![relay_cert.cert_der.clone()],
        relay_cert.key_der.clone_key(),
        Default::default(),
    )
    .expect("server tls");
    let client_tls =
        tls::tunnel_client_config(std::slice::from_ref(&ca.identity.cert_der), Default::default())
            .expect("client tls");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (relay, agent): (RelayConnection, AgentConnection) = if kind == "quic" {
        let relay_ep = quic::relay_endpoint(any, server_tls.clone(), b"bench secret", WINDOW)
            .expect("relay ep");
        let addr = relay_ep.local_addr().expect("addr");
        let agent_ep = quic::agent_endpoint(any, client_tls, WINDOW).expect("agent ep");
        let accept = async {
            let incoming = relay_ep.accept().await.expect("incoming");
            quic::accept(incoming, LONG, &server_tls, WINDOW).await.expect("handshake")
        };
        let (relay, agent) = tokio::join!(accept, quic::dial(&agent_ep, addr, "localhost", LONG));
        // The endpoints must outlive the bench; leak them (a benchmark process is short-lived).
        std::mem::forget((relay_ep, agent_ep));
        (relay, agent.expect("dial"))
    } else {
        let listener = TcpListener::bind(any).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        let relay_side = async {
            let (socket, remote) = listener.accept().await.expect("accept");
            RelayConnection::from(
                h2::accept(socket, remote, acceptor, WINDOW, LONG).await.expect("h2 relay"),
            )
        };
        let agent_side = async {
            AgentConnection::from(
                h2::dial(addr, None, "localhost", Arc::new(client_tls), WINDOW, LONG)
                    .await
                    .expect("h2 agent"),
            )
        };
        tokio::join!(relay_side, agent_side)
    };
    let mut opened = relay.open_stream(LONG).await.expect("open stream");
    // A stream becomes visible to the peer with its first byte.
    opened.write_all(b"x").await.expect("first byte");
    let mut accepted = agent.accept_stream().await.expect("accept stream");
    let mut first = [0u8; 1];
    accepted.read_exact(&mut first).await.expect("first byte");
    std::mem::forget((relay, agent));
    (opened, accepted)
}

fn copy_over_loopback_tcp(c: &mut Criterion, runtime: &Runtime) {
    let mut group = c.benchmark_group("copy_loop/loopback_tcp");
    group.throughput(Throughput::Bytes(PER_ITERATION as u64));
    for (name, which) in [("privlink", Loop::Privlink), ("tokio", Loop::Tokio)] {
        for write_size in WRITE_SIZES {
            let (mut source, sink) = runtime.block_on(async {
                let (source, middle_in) = tcp_pair().await;
                let (middle_out, sink) = tcp_pair().await;
                spawn_copy(middle_in, middle_out, which);
                (source, sink)
            });
            let mut sink = sink;
            group.bench_function(BenchmarkId::new(name, write_size), |b| {
                b.iter_custom(|iterations| {
                    runtime.block_on(pump(&mut source, &mut sink, write_size, iterations))
                });
            });
        }
    }
    group.finish();
}

fn copy_into_a_tunnel_stream(c: &mut Criterion, runtime: &Runtime) {
    let mut group = c.benchmark_group("copy_loop/tunnel_stream");
    group.throughput(Throughput::Bytes(PER_ITERATION as u64));
    for kind in ["quic", "h2"] {
        for write_size in WRITE_SIZES {
            let (mut source, mut sink) = runtime.block_on(async {
                let (source, middle_in) = tcp_pair().await;
                let (relay_stream, agent_stream) = tunnel_stream_pair(kind).await;
                spawn_copy(middle_in, relay_stream, Loop::Privlink);
                (source, agent_stream)
            });
            group.bench_function(BenchmarkId::new(kind, write_size), |b| {
                b.iter_custom(|iterations| {
                    runtime.block_on(pump(&mut source, &mut sink, write_size, iterations))
                });
            });
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    copy_over_loopback_tcp(c, &runtime);
    copy_into_a_tunnel_stream(c, &runtime);
}

criterion_group! {
    name = copy_loop;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(copy_loop);
