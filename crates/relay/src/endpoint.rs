//! The client-facing side of the relay: one accept loop per endpoint, policy on accept (ACL,
//! then connection limit, before a byte is read), and one task per client connection that
//! opens a tunnel stream on the least-loaded approving agent, sends the open header and lets
//! the client's bytes follow at once, copies both ways, and writes one flow-log line at close.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use privlink_protocol::copy::{CopyEnd, DEFAULT_BUFFER_SIZE, Side, copy_bidirectional_metered};
use privlink_protocol::frame::{self, HEADER_LEN};
use privlink_protocol::io::write_and_flush;
use privlink_protocol::message::{Open, OpenFailure, OpenReply};
use privlink_protocol::tcp::abort;
use privlink_protocol::transport::{ResetCode, TunnelStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::config::EndpointSpec;
use crate::registry::Registry;

/// How long a client waits for a stream when the chosen agent's stream limit is full.
pub const OPEN_STREAM_WAIT: Duration = Duration::from_secs(5);
/// Largest open reply accepted from an agent.
const MAX_REPLY_BODY: usize = 4096;
/// Most client bytes sent along with the open header (a TLS ClientHello fits).
const EARLY_DATA_MAX: usize = 4096;

/// Counters of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    /// Connections accepted and forwarded.
    pub accepted: AtomicU64,
    /// Connections closed at once by the ACL.
    pub denied: AtomicU64,
    /// Connections closed at once because `max_connections` was reached.
    pub over_limit: AtomicU64,
}

/// One endpoint at run time.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) spec: EndpointSpec,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) counters: EndpointCounters,
}

impl Endpoint {
    pub(crate) fn new(spec: EndpointSpec) -> Self {
        let slots = Arc::new(Semaphore::new(spec.max_connections));
        Self { spec, slots, counters: EndpointCounters::default() }
    }
}

/// Accepts clients on one endpoint until `stop` is cancelled; client tasks end early only when
/// `force` is cancelled.
pub(crate) async fn accept_clients(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    registry: Arc<Registry>,
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (socket, client) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: log, pause briefly so we do not spin, keep serving.
                    warn!(endpoint = %endpoint.spec.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !endpoint.spec.acl.permits(client.ip()) {
            endpoint.counters.denied.fetch_add(1, Ordering::Relaxed);
            debug!(endpoint = %endpoint.spec.name, %client, "connection denied by ACL");
            abort(socket);
            continue;
        }
        let Ok(slot) = Arc::clone(&endpoint.slots).try_acquire_owned() else {
            endpoint.counters.over_limit.fetch_add(1, Ordering::Relaxed);
            warn!(
                endpoint = %endpoint.spec.name,
                %client,
                max_connections = endpoint.spec.max_connections,
                "connection refused: endpoint at max_connections"
            );
            abort(socket);
            continue;
        };
        endpoint.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("client", endpoint = %endpoint.spec.name, %client);
        let endpoint = Arc::clone(&endpoint);
        let registry = Arc::clone(&registry);
        let force = force.clone();
        tracker.spawn(
            async move {
                forward(socket, client, &endpoint, &registry, &force).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// How a client connection ended, for the flow log. Tagged by where the cause lies.
#[derive(Debug)]
enum Outcome {
    /// Both sides closed normally.
    Completed,
    /// No byte moved for the inactivity timeout.
    IdleTimeout,
    /// The relay was shutting down and the grace period ended.
    Shutdown,
    /// No connected agent has approved this endpoint.
    NoAgent,
    /// The relay could not open a stream to the agent.
    Relay(String),
    /// The client's side failed (reset, …).
    Client(io::Error),
    /// The tunnel or agent side failed.
    Agent(io::Error),
    /// The agent could not open the destination.
    Destination(OpenFailure),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Completed => f.write_str("completed"),
            Self::IdleTimeout => f.write_str("idle-timeout"),
            Self::Shutdown => f.write_str("shutdown"),
            Self::NoAgent => f.write_str("no-agent: no connected agent has approved this endpoint"),
            Self::Relay(e) => write!(f, "relay-error: {e}"),
            Self::Client(e) => write!(f, "client-error: {e}"),
            Self::Agent(e) => write!(f, "agent-error: {e}"),
            Self::Destination(failure) => {
                write!(f, "destination-failed ({}): {}", failure.code, failure.message)
            }
        }
    }
}

async fn forward(
    mut socket: TcpStream,
    client: SocketAddr,
    endpoint: &Endpoint,
    registry: &Registry,
    force: &CancellationToken,
) {
    let started = Instant::now();
    let spec = &endpoint.spec;
    let _ = socket.set_nodelay(true);
    let mut bytes = (0, 0);
    let mut agent_name = String::from("-");

    let outcome = 'outcome: {
        let Some(agent) = registry.choose(&spec.connector, &spec.name) else {
            abort(socket);
            break 'outcome Outcome::NoAgent;
        };
        agent_name.clone_from(&agent.name);
        let mut stream = match agent.connection.open_stream(OPEN_STREAM_WAIT).await {
            Ok(stream) => stream,
            Err(e) => {
                abort(socket);
                break 'outcome Outcome::Relay(e.to_string());
            }
        };
        let open = Open {
            endpoint: spec.name.clone(),
            destination: spec.destination.to_string(),
            client_addr: client,
            inactivity_timeout_ms: u64::try_from(spec.inactivity_timeout.as_millis())
                .unwrap_or(u64::MAX),
        };
        // The header is written now and the client's bytes follow in the copy below, without
        // waiting for the agent's reply: no round trip before data flows. Whatever the client
        // has sent already (usually its TLS ClientHello) goes in the same write as the header:
        // one packet or TLS record to the agent instead of two.
        // (A heap buffer freed after the write, not an array in this task: that would stay in
        // every connection's task for its whole life.)
        let mut first_write = match frame::encode(&open) {
            Ok(header) => header,
            Err(e) => {
                // Nothing was sent on the stream yet: reset it so the agent does not wait on it.
                stream.reset(ResetCode::ProtocolError);
                abort(socket);
                break 'outcome Outcome::Relay(e.to_string());
            }
        };
        let header_len = first_write.len();
        first_write.reserve_exact(EARLY_DATA_MAX);
        match socket.try_read_buf(&mut first_write) {
            // Ok(0) is an end of stream, which the copy loop sees again.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                stream.reset(ResetCode::PeerReset);
                break 'outcome Outcome::Client(e);
            }
        }
        let early_len = first_write.len() - header_len;
        let written = write_and_flush(&mut stream, &first_write).await;
        drop(first_write);
        if let Err(e) = written {
            abort(socket);
            break 'outcome Outcome::Agent(e);
        }
        let mut gated = OpenReplyGate::new(&mut stream);
        let report = copy_bidirectional_metered(
            &mut socket,
            &mut gated,
            spec.inactivity_timeout,
            DEFAULT_BUFFER_SIZE,
            force.cancelled(),
        )
        .await;
        bytes = (report.socket_to_tunnel + early_len as u64, report.tunnel_to_socket);
        match report.end {
            CopyEnd::Finished => Outcome::Completed,
            CopyEnd::IdleTimeout => {
                stream.reset(ResetCode::IdleTimeout);
                Outcome::IdleTimeout
            }
            CopyEnd::Cancelled => {
                stream.reset(ResetCode::Shutdown);
                abort(socket);
                Outcome::Shutdown
            }
            CopyEnd::Failed { side: Side::Socket, error } => {
                stream.reset(ResetCode::PeerReset);
                Outcome::Client(error)
            }
            CopyEnd::Failed { side: Side::Tunnel, error } => {
                stream.reset(ResetCode::PeerReset);
                abort(socket);
                match error.get_ref().and_then(|e| e.downcast_ref::<OpenFailure>()) {
                    Some(failure) => Outcome::Destination(failure.clone()),
                    None => Outcome::Agent(error),
                }
            }
        }
    };

    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // The flow log: one line per connection, like Satellite's flow logs.
    info!(
        target: "privlink::flow",
        %client,
        endpoint = %spec.name,
        destination = %spec.destination,
        agent = %agent_name,
        duration_ms,
        bytes_from_client = bytes.0,
        bytes_to_client = bytes.1,
        outcome = %outcome,
        "flow"
    );
}

/// Reads the agent's [`OpenReply`] at the head of a data stream before passing the
/// destination's bytes through. Writes (the client's bytes) pass straight through from the
/// start. An open failure surfaces as a `ConnectionRefused` error carrying the
/// [`OpenFailure`], so the copy loop ends on the tunnel side with the agent's reason.
#[derive(Debug)]
struct OpenReplyGate<'a> {
    stream: &'a mut TunnelStream,
    state: GateState,
}

#[derive(Debug)]
enum GateState {
    Header { buf: [u8; HEADER_LEN], filled: usize },
    Body { buf: Vec<u8>, filled: usize },
    Open,
}

impl<'a> OpenReplyGate<'a> {
    fn new(stream: &'a mut TunnelStream) -> Self {
        Self { stream, state: GateState::Header { buf: [0; HEADER_LEN], filled: 0 } }
    }

    /// Reads into `dest` from the stream, never more than `dest` holds: the reply frame is
    /// consumed exactly, so no destination byte behind it is lost.
    fn poll_fill(
        stream: &mut TunnelStream,
        cx: &mut Context<'_>,
        dest: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(dest);
        ready!(Pin::new(stream).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "agent closed the stream before answering the open request",
            )));
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for OpenReplyGate<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                GateState::Open => return Pin::new(&mut *this.stream).poll_read(cx, out),
                GateState::Header { buf, filled } => {
                    *filled += ready!(Self::poll_fill(this.stream, cx, &mut buf[*filled..]))?;
                    if *filled == HEADER_LEN {
                        let len = frame::decode_header(buf, MAX_REPLY_BODY)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        this.state = GateState::Body { buf: vec![0; len], filled: 0 };
                    }
                }
                GateState::Body { buf, filled } => {
                    if *filled < buf.len() {
                        *filled += ready!(Self::poll_fill(this.stream, cx, &mut buf[*filled..]))?;
                        continue;
                    }
                    let reply: OpenReply = frame::decode_body(buf)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    match reply {
                        OpenReply::Opened => this.state = GateState::Open,
                        OpenReply::Failed(failure) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::ConnectionRefused,
                                failure,
                            )));
                        }
                    }
                }
            }
        }
    }
}

impl AsyncWrite for OpenReplyGate<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_shutdown(cx)
    }
}
