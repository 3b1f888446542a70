//! Dispatch of one client connection: choose the least-loaded approving agent, open a tunnel
//! stream on it, write the open header with the client's first bytes in the same write (no
//! round trip before data flows), then splice client and stream through the open-reply gate,
//! which holds the destination's bytes back until the agent's answer has been read.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use privlink_protocol::frame::{self, HEADER_LEN};
use privlink_protocol::message::{MAX_OPEN_BODY, Open, OpenReply};
use privlink_transport::copy::{DEFAULT_BUFFER_SIZE, copy_bidirectional_counted};
use privlink_transport::io::write_and_flush;
use privlink_transport::splice::{self, Hop, Origin, Outcome, SpliceStream};
use privlink_transport::tcp::abort;
use privlink_transport::tunnel::{ResetCode, TunnelStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::flow::Flow;
use crate::listen::{Endpoint, LiveClient};
use crate::registry::Registry;

/// How long a client waits for a stream when the chosen agent's stream limit is full.
pub const OPEN_STREAM_WAIT: Duration = Duration::from_secs(5);
/// How long the open header (with the client's first bytes) may take to enter the stream. It
/// is a few KiB, so only an agent that has stopped taking data — its connection window full —
/// makes it wait; past this the client is turned away rather than holding a `max_connections`
/// slot with no timer running (the inactivity watchdog starts with the copy).
pub const FIRST_WRITE_WAIT: Duration = Duration::from_secs(5);
/// Most client bytes sent along with the open header (a TLS ClientHello fits).
const EARLY_DATA_MAX: usize = 4096;

/// Forwards one admitted client connection and writes its flow-log line.
pub(crate) async fn forward(
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
    let mut unreported = (0, 0);
    let mut agent_name = String::from("-");

    let outcome = 'outcome: {
        let Some(agent) = registry.choose(&spec.connector, &spec.name) else {
            abort(socket);
            break 'outcome Outcome::NoAgent;
        };
        agent_name.clone_from(&agent.name);
        // Listed in `/api/v1/connections`, its bytes counted as they move, until it ends.
        let live = endpoint.live.insert(LiveClient { client, agent: agent.name.clone() });
        let mut stream = match agent.connection.open_stream(OPEN_STREAM_WAIT).await {
            Ok(stream) => stream,
            Err(e) => {
                abort(socket);
                break 'outcome Outcome::failed(Origin::Relay, e, true);
            }
        };
        let open = Open {
            endpoint: spec.name.clone(),
            destination: spec.destination.to_string(),
            client_addr: client,
            inactivity_timeout_ms: u64::try_from(spec.inactivity_timeout.as_millis())
                .unwrap_or(u64::MAX),
        };
        // Whatever the client has sent already (usually its TLS ClientHello) goes in the same
        // write as the header: one packet or TLS record to the agent instead of two. A heap
        // buffer freed after the write, not an array in this task, which would stay in every
        // connection's task for its whole life.
        let mut first_write = match frame::encode(&open) {
            Ok(header) => header,
            Err(e) => {
                // Nothing was sent on the stream yet: reset it so the agent does not wait on it.
                stream.reset(ResetCode::ProtocolError);
                abort(socket);
                break 'outcome Outcome::failed(Origin::Relay, e, false);
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
                break 'outcome Outcome::failed(Origin::Client, e, false);
            }
        }
        live.bytes.add_socket_to_tunnel((first_write.len() - header_len) as u64);
        let written =
            tokio::time::timeout(FIRST_WRITE_WAIT, write_and_flush(&mut stream, &first_write))
                .await
                .unwrap_or_else(|_| {
                    stream.reset(ResetCode::IdleTimeout);
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the agent took no data for {FIRST_WRITE_WAIT:?}"),
                    ))
                });
        drop(first_write);
        if let Err(e) = written {
            abort(socket);
            break 'outcome Outcome::failed(Origin::Agent, e, true);
        }
        let mut gated = OpenReplyGate::new(&mut stream);
        let copied = copy_bidirectional_counted(
            &mut socket,
            &mut gated,
            spec.inactivity_timeout,
            DEFAULT_BUFFER_SIZE,
            force.cancelled(),
            &live.bytes,
        )
        .await;
        if let Some(at) = gated.opened_at {
            endpoint.metrics.opened(&spec.name, at.duration_since(started).as_secs_f64());
        }
        let spliced = splice::conclude(copied, &socket, &mut gated, Hop::Relay);
        drop(socket); // closes the client's side now, with a reset where the splice asked for one
        bytes = (spliced.socket_to_tunnel, spliced.tunnel_to_socket);
        // What a scrape has not counted yet; the entry leaves the list when `live` drops here.
        unreported = live.unreported();
        spliced.outcome
    };

    endpoint.metrics.connection_ended(&spec.name, outcome.label(), unreported);
    Flow {
        client,
        endpoint: spec,
        agent: &agent_name,
        duration: started.elapsed(),
        bytes_from_client: bytes.0,
        bytes_to_client: bytes.1,
        outcome: &outcome,
    }
    .log();
}

/// Reads the agent's [`OpenReply`] at the head of a data stream before passing the
/// destination's bytes through. Writes (the client's bytes) pass straight through from the
/// start. An open failure surfaces as a `ConnectionRefused` error carrying the
/// [`OpenFailure`], so the copy loop ends on the tunnel side with the agent's reason.
#[derive(Debug)]
struct OpenReplyGate<'a> {
    stream: &'a mut TunnelStream,
    state: GateState,
    /// When the agent's answer was read.
    opened_at: Option<Instant>,
}

#[derive(Debug)]
enum GateState {
    Header { buf: [u8; HEADER_LEN], filled: usize },
    Body { buf: Vec<u8>, filled: usize },
    Open,
}

impl<'a> OpenReplyGate<'a> {
    fn new(stream: &'a mut TunnelStream) -> Self {
        Self {
            stream,
            state: GateState::Header { buf: [0; HEADER_LEN], filled: 0 },
            opened_at: None,
        }
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
                        let len = frame::decode_header(buf, MAX_OPEN_BODY)
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
                        OpenReply::Opened => {
                            this.state = GateState::Open;
                            this.opened_at = Some(Instant::now());
                        }
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

impl SpliceStream for OpenReplyGate<'_> {
    fn reset(&mut self, code: ResetCode) {
        self.stream.reset(code);
    }

    fn answered(&self) -> bool {
        matches!(self.state, GateState::Open)
    }
}
