//! The TLS-over-TCP transport: TLS 1.3 (tokio-rustls) carrying an HTTP/2 multiplexer (the `h2`
//! crate) with roles reversed — the agent dials and is the HTTP/2 *server*, the relay is the
//! HTTP/2 *client* and opens one request stream per tunnel stream (cloudflared's http2
//! transport works this way). Each request body carries relay→agent bytes, each response
//! body agent→relay bytes; END_STREAM is FIN, RST_STREAM is reset.
//!
//! Flow control is HTTP/2's own: windows are sized like the QUIC ones, and receive capacity is
//! released only as the copy loop consumes data, so a slow reader holds back its own stream
//! and no other.
//!
//! A dead peer is noticed by TCP keep-alives and `TCP_USER_TIMEOUT` (about ten seconds), the
//! counterpart of QUIC's idle timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;

mod read_ahead;
mod stream;

use read_ahead::{ReadAhead, ReadAheadSwitch};
pub use stream::H2Stream;
use stream::{RecvState, SendState, Unsent};

use crate::codes::{DialError, StreamError};
use crate::limits::{H2_CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS};

/// Largest HTTP/2 DATA frame either side accepts (the protocol's maximum is 16 MiB); what each
/// sends is at most one write, and writes are cut at `stream::MAX_DATA_FRAME` (32 KiB). A frame
/// is what another stream's next bytes may wait behind (about 1 s at 2 Mbit/s for 256 KiB);
/// 16 KiB frames saved little of that and cost eight-stream bulk a quarter of its throughput
/// (`docs/benchmarks.md`, "Thin links").
const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Bytes the h2 layer may buffer per stream before `poll_write` waits for the socket.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Largest header list either side accepts. privlink's own requests and responses carry a few
/// dozen bytes of headers; h2's default (16 MiB per stream) let a hostile relay make an agent
/// buffer gigabytes across its concurrent streams.
const MAX_HEADER_LIST: u32 = 8 * 1024;
/// How long a graceful close may take to flush what is queued.
const GRACEFUL_CLOSE: Duration = Duration::from_secs(3);
/// Unsent bytes past which the kernel stops taking more for a tunnel socket
/// (`TCP_NOTSENT_LOWAT`). Without it the kernel queues up to its whole send buffer (hundreds
/// of KiB) in front of every stream's next byte — a new connection's reply, a heartbeat's
/// answer — and on a thin link that queue is seconds long: at 2 Mbit/s, one download made a
/// 1-byte exchange on another connection wait 1.3 s, and at 500 kbit/s new connections outlived
/// the relay's 3 s open deadline (below about 1 Mbit/s one frame still can). Bytes held back
/// stay in HTTP/2's per-stream buffers, where frames of all streams take turns. 16 KiB:
/// 4 Mbit/s exchanges beside a download wait ~0.3 s, not ~0.9 s, for about a tenth of
/// single-stream bulk over an emulated WAN (`docs/benchmarks.md`, "Thin links").
const NOTSENT_LOWAT: u32 = 16 * 1024;
/// TCP keep-alive: first probe after this much silence.
const KEEPALIVE_TIME: Duration = Duration::from_secs(4);
/// TCP keep-alive: interval between probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Unacknowledged data older than this aborts the connection (`TCP_USER_TIMEOUT`).
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the socket options a tunnel TCP connection needs (no Nagle, fast dead-peer
/// detection, a short unsent queue).
fn tune_socket(socket: &TcpStream) {
    let _ = socket.set_nodelay(true);
    let sock = socket2::SockRef::from(socket);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
    let _ = sock.set_tcp_notsent_lowat(NOTSENT_LOWAT);
}

/// Shared close state of one h2 tunnel connection (opaque outside this crate).
#[derive(Debug)]
pub struct CloseState {
    /// Cancelled to tear the connection down.
    stop: CancellationToken,
    /// Why it closed, once it has.
    reason: watch::Sender<Option<String>>,
    remote: SocketAddr,
    /// What the TLS underneath negotiated.
    pub(crate) tls: Option<Arc<crate::crypto::TlsSummary>>,
    /// When the peer's certificate expires (the relay's, on the agent's side).
    pub(crate) peer_certificate_expires: Option<i64>,
    /// Turns on reading the TCP connection ahead, once the peer is trusted.
    read_ahead: Arc<ReadAheadSwitch>,
}

/// What a finished TLS handshake tells about itself: what it negotiated, and when the peer's
/// certificate expires.
type Negotiated = (Option<crate::crypto::TlsSummary>, Option<i64>);

fn negotiated(state: &rustls::CommonState) -> Negotiated {
    let expires = state.peer_certificates().and_then(crate::tls::leaf_expiry);
    (crate::crypto::TlsSummary::of(state), expires)
}

impl CloseState {
    fn new(
        remote: SocketAddr,
        (tls, peer_certificate_expires): Negotiated,
        read_ahead: Arc<ReadAheadSwitch>,
    ) -> Arc<Self> {
        let reason = watch::Sender::new(None);
        let tls = tls.map(Arc::new);
        let stop = CancellationToken::new();
        Arc::new(Self { stop, reason, remote, tls, peer_certificate_expires, read_ahead })
    }

    /// The peer is trusted: from now on the TCP connection is read in [`read_ahead::READ_AHEAD`]
    /// bytes at a time, at the cost of a buffer that size for the connection's life.
    pub(crate) fn read_ahead(&self) {
        self.read_ahead.enable();
    }

    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.remote
    }

    /// Tears the connection down; the reason is what `closed` reports.
    pub(crate) fn close(&self, reason: &str) {
        self.set_reason(format!("closed locally: {reason}"));
        self.stop.cancel();
    }

    pub(crate) async fn closed(&self) -> String {
        let mut reason = self.reason.subscribe();
        match reason.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => "closed".to_owned(),
        }
    }

    pub(crate) fn close_reason(&self) -> Option<String> {
        self.reason.borrow().clone()
    }

    fn set_reason(&self, reason: String) {
        self.reason.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

type Incoming = (http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>);

impl AsRef<CloseState> for H2Opener {
    fn as_ref(&self) -> &CloseState {
        &self.state
    }
}

impl AsRef<CloseState> for H2Acceptor {
    fn as_ref(&self) -> &CloseState {
        &self.state
    }
}

/// Agent side: connects to a relay at `addr` — or, with `via`, to the HTTP proxy at `addr`,
/// which is asked to CONNECT to the relay — then TLS (verifying `server_name`) and the HTTP/2
/// handshake, all within `deadline`. The acceptor is the agent's half of the connection;
/// `AgentConnection::from` wraps it.
/// Streams from the relay get `stream_window` bytes of receive window each.
pub async fn dial(
    addr: SocketAddr,
    via: Option<&crate::http_proxy::ProxyHop>,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    stream_window: u32,
    deadline: Duration,
) -> Result<H2Acceptor, DialError> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| DialError::Handshake(format!("relay name: {e}")))?;
    let steps = async {
        let mut socket = TcpStream::connect(addr).await.map_err(|e| match via {
            Some(hop) => DialError::Proxy(crate::http_proxy::ProxyError::Unreachable {
                proxy: hop.proxy.clone(),
                reason: format!("TCP connect to {addr}: {e}"),
            }),
            None => DialError::Handshake(format!("TCP connect: {e}")),
        })?;
        tune_socket(&socket);
        if let Some(hop) = via {
            crate::http_proxy::connect_through(&mut socket, hop).await?;
        }
        let switch = Arc::new(ReadAheadSwitch::default());
        let socket = ReadAhead::new(socket, Arc::clone(&switch));
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, socket)
            .await
            .map_err(tls_failure)?;
        // The relay's certificate is verified: the agent trusts this connection.
        switch.enable();
        let summary = negotiated(tls.get_ref().1);
        agent_handshake(tls, addr, summary, switch, stream_window)
            .await
            .map_err(|e| DialError::Handshake(format!("HTTP/2 handshake failed: {e}")))
    };
    match tokio::time::timeout(deadline, steps).await {
        Ok(Ok(acceptor)) => Ok(acceptor),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DialError::Timeout(deadline)),
    }
}

/// A failed client TLS handshake, telling a rejected certificate apart from the rest.
fn tls_failure(error: io::Error) -> DialError {
    let message = format!("TLS handshake failed: {error}");
    match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => DialError::Certificate(message),
        // The relay found no key exchange group in common (it says no more than this alert).
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)) => {
            DialError::KeyExchange(message)
        }
        _ => DialError::Handshake(message),
    }
}

/// Relay side: TLS and the HTTP/2 handshake on an accepted TCP connection, within `deadline`.
/// Call it from a task of its own: a stalled peer must not block the accept loop. The opener
/// is the relay's half of the connection; `RelayConnection::from` wraps it.
/// Streams from the agent get `stream_window` bytes of receive window each.
pub async fn accept(
    socket: TcpStream,
    remote: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    stream_window: u32,
    deadline: Duration,
) -> Result<H2Opener, DialError> {
    tune_socket(&socket);
    let steps = async {
        // Read-ahead waits for the agent's hello to be admitted (`CloseState::read_ahead`):
        // until then the peer is anyone.
        let switch = Arc::new(ReadAheadSwitch::default());
        let socket = ReadAhead::new(socket, Arc::clone(&switch));
        let tls = tls.accept(socket).await.map_err(|e| {
            let no_common_group =
                e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some_and(|e| {
                    matches!(
                        e,
                        rustls::Error::PeerIncompatible(
                            rustls::PeerIncompatible::NoKxGroupsInCommon
                        )
                    )
                });
            let message = format!("TLS: {e}");
            if no_common_group {
                DialError::KeyExchange(message)
            } else {
                DialError::Handshake(message)
            }
        })?;
        let summary = negotiated(tls.get_ref().1);
        relay_handshake(tls, remote, summary, switch, stream_window)
            .await
            .map_err(|e| DialError::Handshake(format!("HTTP/2: {e}")))
    };
    match tokio::time::timeout(deadline, steps).await {
        Ok(result) => result,
        Err(_) => Err(DialError::Timeout(deadline)),
    }
}

/// The relay's side of an h2 tunnel connection: it opens streams.
#[derive(Debug, Clone)]
pub struct H2Opener {
    send_request: h2::client::SendRequest<Bytes>,
    state: Arc<CloseState>,
}

/// The agent's side of an h2 tunnel connection: it accepts streams.
#[derive(Debug, Clone)]
pub struct H2Acceptor {
    incoming: Arc<Mutex<mpsc::UnboundedReceiver<Incoming>>>,
    state: Arc<CloseState>,
    /// Set once data streams are allowed; until then every stream after the first (the
    /// control stream) is refused, so nothing queues before the control handshake.
    data_streams_allowed: Arc<std::sync::atomic::AtomicBool>,
}

/// Relay side: runs the HTTP/2 client handshake over an accepted, TLS-wrapped TCP connection
/// and spawns the task that drives it.
async fn relay_handshake<S>(
    io: S,
    remote: SocketAddr,
    tls: Negotiated,
    read_ahead: Arc<ReadAheadSwitch>,
    stream_window: u32,
) -> Result<H2Opener, h2::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send_request, connection) = h2::client::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(0)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake(io)
        .await?;
    let state = CloseState::new(remote, tls, read_ahead);
    let driver = Arc::clone(&state);
    tokio::spawn(async move {
        let reason = tokio::select! {
            result = connection => match result {
                Ok(()) => "closed by peer".to_owned(),
                Err(e) => describe(&e),
            },
            () = driver.stop.cancelled() => "closed locally".to_owned(),
        };
        driver.set_reason(reason);
    });
    Ok(H2Opener { send_request, state })
}

/// Agent side: runs the HTTP/2 server handshake over a dialled, TLS-wrapped TCP connection and
/// spawns the task that drives it and queues the relay's streams.
async fn agent_handshake<S>(
    io: S,
    remote: SocketAddr,
    tls: Negotiated,
    read_ahead: Arc<ReadAheadSwitch>,
    stream_window: u32,
) -> Result<H2Acceptor, h2::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = h2::server::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS + 1)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake(io)
        .await?;
    let state = CloseState::new(remote, tls, read_ahead);
    let driver = Arc::clone(&state);
    let (queue, incoming) = mpsc::unbounded_channel();
    let data_streams_allowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let allowed = Arc::clone(&data_streams_allowed);
    tokio::spawn(async move {
        let mut accepted = 0u64;
        // Polling `accept` is what drives the connection's I/O, so it runs for the connection's
        // whole life, not only when someone waits for a stream. The queue holds at most the
        // control stream until data streams are allowed, and after that at most the streams
        // h2's concurrency limit lets the relay open.
        let reason = loop {
            tokio::select! {
                next = connection.accept() => match next {
                    Some(Ok((request, mut respond))) => {
                        accepted += 1;
                        if accepted > 1 && !allowed.load(std::sync::atomic::Ordering::Acquire) {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        if queue.send((request, respond)).is_err() {
                            break "closed locally".to_owned();
                        }
                    }
                    Some(Err(e)) => break describe(&e),
                    None => break "closed by peer".to_owned(),
                },
                () = driver.stop.cancelled() => {
                    // GOAWAY, then keep driving the connection so frames already queued (the
                    // last DATA and END_STREAM of finished streams) reach the relay before the
                    // TCP connection closes. New streams arriving meanwhile are refused.
                    connection.graceful_shutdown();
                    let flush = async { while let Some(Ok(_refused)) = connection.accept().await {} };
                    let _ = tokio::time::timeout(GRACEFUL_CLOSE, flush).await;
                    break "closed locally".to_owned();
                }
            }
        };
        driver.set_reason(reason);
    });
    Ok(H2Acceptor { incoming: Arc::new(Mutex::new(incoming)), state, data_streams_allowed })
}

fn describe(error: &h2::Error) -> String {
    if error.is_go_away() {
        format!("peer sent GOAWAY ({:?})", error.reason())
    } else if error.is_io() {
        format!("connection lost: {error}")
    } else {
        error.to_string()
    }
}

impl H2Opener {
    pub(crate) async fn open_stream(&self, wait: Duration) -> Result<H2Stream, StreamError> {
        // Waiting for `ready` is what bounds the number of open streams; the request headers
        // themselves go out with the stream's first bytes (see `SendState`).
        let open = async {
            let ready = self.send_request.clone().ready().await?;
            Ok::<_, h2::Error>(H2Stream {
                send: SendState::Unsent(Unsent::Request(ready)),
                recv: RecvState::Waiting(None),
            })
        };
        match tokio::time::timeout(wait, open).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(StreamError::ConnectionClosed(describe(&e))),
            Err(_) => Err(StreamError::LimitReached(wait)),
        }
    }
}

impl H2Acceptor {
    pub(crate) fn allow_data_streams(&self) {
        self.data_streams_allowed.store(true, std::sync::atomic::Ordering::Release);
    }

    pub(crate) async fn accept_stream(&self) -> Result<H2Stream, StreamError> {
        let next = self.incoming.lock().await.recv().await;
        let Some((request, respond)) = next else {
            return Err(StreamError::ConnectionClosed(
                self.state.close_reason().unwrap_or_else(|| "closed".to_owned()),
            ));
        };
        Ok(H2Stream {
            send: SendState::Unsent(Unsent::Response(respond)),
            recv: RecvState::Body(request.into_body(), Bytes::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::codes::ResetCode;
    use crate::limits::STREAM_RECEIVE_WINDOW;

    const WAIT: Duration = Duration::from_secs(5);

    /// A relay and an agent side joined by an in-memory pipe (TLS is not what is tested here).
    async fn pair() -> (H2Opener, H2Acceptor) {
        let (relay_io, agent_io) = tokio::io::duplex(64 * 1024);
        let remote: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let (opener, acceptor) = tokio::join!(
            relay_handshake(relay_io, remote, (None, None), Arc::default(), STREAM_RECEIVE_WINDOW),
            agent_handshake(agent_io, remote, (None, None), Arc::default(), STREAM_RECEIVE_WINDOW)
        );
        (opener.expect("relay handshake"), acceptor.expect("agent handshake"))
    }

    /// Opens a stream, writes `first` on it and returns it with the agent's side of it.
    async fn open_with(
        opener: &H2Opener,
        acceptor: &H2Acceptor,
        first: &[u8],
    ) -> (H2Stream, H2Stream) {
        let mut opened = opener.open_stream(WAIT).await.expect("open");
        opened.write_all(first).await.expect("write");
        let accepted = tokio::time::timeout(WAIT, acceptor.accept_stream())
            .await
            .expect("in time")
            .expect("accept");
        (opened, accepted)
    }

    #[tokio::test]
    async fn a_stream_reset_before_its_first_byte_never_reaches_the_agent() {
        let (opener, acceptor) = pair().await;
        let mut abandoned = opener.open_stream(WAIT).await.expect("open");
        abandoned.reset(ResetCode::Shutdown);
        drop(abandoned);

        let (mut used, mut accepted) = open_with(&opener, &acceptor, b"first bytes").await;
        let mut got = [0u8; 11];
        tokio::time::timeout(WAIT, accepted.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&got, b"first bytes", "the agent's first stream is the one that carried bytes");

        accepted.write_all(b"answer").await.expect("answer");
        accepted.shutdown().await.expect("end");
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, used.read_to_end(&mut answer))
            .await
            .expect("in time")
            .expect("read answer");
        assert_eq!(answer, b"answer");
    }

    #[tokio::test]
    async fn a_request_with_an_oversized_header_list_never_becomes_a_stream() {
        let (opener, acceptor) = pair().await;
        let mut send_request = opener.send_request.clone().ready().await.expect("ready");
        let request = http::Request::post("https://privlink/stream")
            .header("x-padding", "a".repeat(100 * 1024))
            .body(())
            .expect("request");
        let _ = send_request.send_request(request, true);
        // The agent does not buffer it: a header list this far over the limit ends the
        // connection (h2's GOAWAY, ENHANCE_YOUR_CALM) — a relay that sends one has broken the
        // protocol — and no stream is ever handed out.
        let accepted = tokio::time::timeout(WAIT, acceptor.accept_stream()).await.expect("in time");
        match accepted {
            Ok(_) => panic!("a 100 KiB header list was accepted as a stream"),
            Err(StreamError::ConnectionClosed(reason)) => {
                assert!(reason.contains("GOAWAY"), "{reason}");
            }
            Err(other) => panic!("unexpected: {other}"),
        }
    }

    #[tokio::test]
    async fn an_agent_reset_before_answering_reaches_the_relay() {
        let (opener, acceptor) = pair().await;
        let (mut stream, mut accepted) = open_with(&opener, &acceptor, b"open header").await;
        accepted.reset(ResetCode::Shutdown);

        let mut buf = [0u8; 16];
        let error = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("in time")
            .expect_err("the relay sees the reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }
}
