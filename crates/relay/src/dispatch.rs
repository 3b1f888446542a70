//! Dispatch of one client connection: choose the least-loaded approving agent, open a tunnel
//! stream on it, write the open header with the client's first bytes in the same write (no
//! round trip before data flows), then splice client and stream through the open-reply gate,
//! which holds the destination's bytes back until the agent's answer has been read.
//!
//! Until that answer, nothing has reached the client, so an open that fails in a way another
//! agent might not (a destination this agent could not reach, a lost stream or connection, no
//! answer within `open_timeout`) is replayed on another agent: every client byte read before
//! the answer is kept ([`Replay`], bounded by `open_retry_buffer`) and written again behind a
//! new open header, up to `open_attempts` agents. An agent that left an open unanswered is
//! suspected — chosen for nothing new — until it is heard from again.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use privlink_protocol::frame::{self, HEADER_LEN};
use privlink_protocol::message::{MAX_OPEN_BODY, Open, OpenFailure, OpenReply};
use privlink_transport::copy::{CopyEnd, DEFAULT_BUFFER_SIZE, Side, copy_bidirectional_counted};
use privlink_transport::io::write_and_flush;
use privlink_transport::live::Live;
use privlink_transport::splice::{self, Hop, Origin, Outcome, SpliceStream};
use privlink_transport::tcp::{abort, reset_on_close};
use privlink_transport::tunnel::{ResetCode, TunnelStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::{EndpointSpec, MAX_OPEN_ATTEMPTS};
use crate::flow::Flow;
use crate::listen::{Endpoint, LiveClient};
use crate::registry::{ChosenAgent, Registry};

/// How long a client waits for a stream when the chosen agent's stream limit is full (within
/// the endpoint's `open_timeout`, which is shorter by default).
pub const OPEN_STREAM_WAIT: Duration = Duration::from_secs(5);
/// How long the open header (with the client's first bytes) may take to enter the stream
/// (within `open_timeout`, likewise). It is a few KiB, so only an agent that has stopped
/// taking data — its connection window full — makes it wait; past this the attempt fails
/// rather than holding a `max_connections` slot with no timer running (the inactivity
/// watchdog starts with the copy).
pub const FIRST_WRITE_WAIT: Duration = Duration::from_secs(5);
/// Most client bytes sent along with the open header (a TLS ClientHello fits).
const EARLY_DATA_MAX: usize = 4096;

/// Forwards one admitted client connection and writes its flow-log line.
pub(crate) async fn forward(
    mut socket: TcpStream,
    client: SocketAddr,
    endpoint: &Endpoint,
    spec: Arc<EndpointSpec>,
    registry: &Registry,
    force: &CancellationToken,
) {
    let started = Instant::now();
    let spec = &*spec;
    let _ = socket.set_nodelay(true);
    let mut bytes = (0, 0);
    let mut unreported = (0, 0);
    // The agents tried, in order: registry ids (in the task, no allocation: at most
    // `MAX_OPEN_ATTEMPTS`), and their names for the flow log, comma-separated.
    let mut tried = [0u64; MAX_OPEN_ATTEMPTS as usize];
    let mut attempts = 0;
    let mut agents_tried = String::new();
    // With one attempt allowed nothing is ever replayed: keep nothing.
    let mut replay = Replay::new(if spec.open.attempts > 1 { spec.open.buffer } else { 0 });
    // Listed in `/api/v1/connections`, its bytes counted as they move, from the first agent
    // chosen until it ends.
    let mut live = None;
    let mut last_failure: Option<Outcome> = None;

    let outcome = loop {
        let Some(agent) = registry.choose(&spec.connector, &spec.name, &tried[..attempts]) else {
            abort(socket);
            break last_failure.unwrap_or(Outcome::NoAgent);
        };
        tried[attempts] = agent.id;
        attempts += 1;
        if !agents_tried.is_empty() {
            agents_tried.push(',');
        }
        agents_tried.push_str(&agent.name);
        let entry = live.get_or_insert_with(|| {
            endpoint.live.insert(LiveClient::new(client, agent.name.clone()))
        });
        entry.info.set_agent(&agent.name);
        let first = attempts == 1;
        match attempt(&mut socket, client, spec, &agent, &mut replay, entry, force, first).await {
            Attempt::Ended { outcome, opened_at } => {
                if let Some(at) = opened_at {
                    endpoint.metrics.opened(&spec.name, at.duration_since(started).as_secs_f64());
                }
                bytes = entry.bytes.get();
                // What a scrape has not counted yet; the entry leaves the list when it drops.
                unreported = entry.unreported();
                drop(socket); // closes the client's side now, with a reset where one was asked
                break outcome;
            }
            Attempt::Unanswered { failure, timed_out } => {
                if timed_out {
                    agent.suspect();
                }
                registry.open_failed(agent.id, &spec.name);
                let retry = attempts < spec.open.attempts as usize
                    && replay.intact()
                    && !force.is_cancelled();
                if !retry {
                    bytes = entry.bytes.get();
                    unreported = entry.unreported();
                    abort(socket);
                    break failure;
                }
                debug!(agent = %agent.name, "open not answered, trying another agent: {failure}");
                endpoint.metrics.open_retried(&spec.name, failure.label());
                last_failure = Some(failure);
            }
        }
    };
    drop(live);

    endpoint.metrics.connection_ended(&spec.name, outcome.label(), unreported);
    Flow {
        client,
        endpoint: spec,
        agent: agents_tried.rsplit(',').next().filter(|a| !a.is_empty()).unwrap_or("-"),
        attempts,
        agents_tried: &agents_tried,
        duration: started.elapsed(),
        bytes_from_client: bytes.0,
        bytes_to_client: bytes.1,
        outcome: &outcome,
    }
    .log();
}

/// How one agent's try at a connection ended.
enum Attempt {
    /// For good: served, or failed in a way no other agent would change. Any reset the
    /// client's socket needs is set; the caller drops it.
    Ended { outcome: Outcome, opened_at: Option<Instant> },
    /// Before the agent answered, in a way another agent might not fail: nothing reached the
    /// client, and the socket is untouched.
    Unanswered {
        failure: Outcome,
        /// The agent did not answer in time (it becomes suspect).
        timed_out: bool,
    },
}

/// One agent's try: stream, open header with the client's bytes so far, then the copy.
#[allow(clippy::too_many_arguments)] // one call site; the pieces are the connection's own
async fn attempt(
    socket: &mut TcpStream,
    client: SocketAddr,
    spec: &EndpointSpec,
    agent: &ChosenAgent,
    replay: &mut Replay,
    live: &Live<LiveClient>,
    force: &CancellationToken,
    first: bool,
) -> Attempt {
    let deadline = Instant::now() + spec.open.timeout;
    let unanswered = |origin, message: String, timed_out| Attempt::Unanswered {
        failure: Outcome::failed(origin, message, true),
        timed_out,
    };
    let opening = agent.connection.open_stream(OPEN_STREAM_WAIT);
    let mut stream = match tokio::time::timeout_at(deadline, opening).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return unanswered(Origin::Relay, e.to_string(), false),
        Err(_) => {
            let message = format!("no stream on the agent within {:?}", spec.open.timeout);
            return unanswered(Origin::Agent, message, true);
        }
    };
    // Whatever the client has sent already (usually its TLS ClientHello) goes in the same
    // write as the header: one packet or TLS record to the agent instead of two. A heap
    // buffer freed after the write, not an array in this task, which would stay in every
    // connection's task for its whole life. (The header is a temporary for the same reason:
    // a local would keep its 88 bytes through the copy.)
    let mut first_write = match frame::encode(&Open {
        endpoint: spec.name.clone(),
        destination: spec.destination.to_string(),
        client_addr: client,
        inactivity_timeout_ms: u64::try_from(spec.inactivity_timeout.as_millis())
            .unwrap_or(u64::MAX),
    }) {
        Ok(header) => header,
        Err(e) => {
            // Nothing was sent on the stream yet: reset it so the agent does not wait on it.
            stream.reset(ResetCode::ProtocolError);
            reset_on_close(socket);
            return Attempt::Ended {
                outcome: Outcome::failed(Origin::Relay, e, false),
                opened_at: None,
            };
        }
    };
    let header_len = first_write.len();
    if first {
        first_write.reserve_exact(EARLY_DATA_MAX);
        match socket.try_read_buf(&mut first_write) {
            // Ok(0) is an end of stream, which the copy loop sees again.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                stream.reset(ResetCode::PeerReset);
                return Attempt::Ended {
                    outcome: Outcome::failed(Origin::Client, e, false),
                    opened_at: None,
                };
            }
        }
        let early = &first_write[header_len..];
        live.bytes.add_socket_to_tunnel(early.len() as u64);
        replay.record(early);
    } else {
        first_write.extend_from_slice(replay.bytes());
    }
    let write_deadline = deadline.min(Instant::now() + FIRST_WRITE_WAIT);
    let written =
        tokio::time::timeout_at(write_deadline, write_and_flush(&mut stream, &first_write)).await;
    drop(first_write);
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            stream.reset(ResetCode::PeerReset);
            return unanswered(Origin::Agent, e.to_string(), false);
        }
        Err(_) => {
            stream.reset(ResetCode::IdleTimeout);
            let message =
                format!("the agent took no data for {:?}", spec.open.timeout.min(FIRST_WRITE_WAIT));
            return unanswered(Origin::Agent, message, true);
        }
    }

    let answered = AtomicBool::new(false);
    let mut gated = OpenReplyGate::new(&mut stream, deadline, &answered);
    let mut recording =
        Recording { socket: &mut *socket, replay: &mut *replay, answered: &answered };
    let copied = copy_bidirectional_counted(
        &mut recording,
        &mut gated,
        spec.inactivity_timeout,
        DEFAULT_BUFFER_SIZE,
        force.cancelled(),
        &live.bytes,
    )
    .await;
    // The agent's refusal, if it sent one, decides — whichever error the copy saw first (the
    // agent resets the stream right after its answer, which a write may hit before the read).
    let refusal = gated.refusal.take();
    if !gated.answered() {
        let retry = match (&refusal, &copied.end) {
            (Some(failure), _) if failure.code.retry_elsewhere() => {
                Some((Outcome::OpenFailed(failure.clone()), false))
            }
            (Some(_), _) => None, // a policy refusal: every agent would say the same
            (None, CopyEnd::Failed { side: Side::Tunnel, error }) => {
                Some((Outcome::failed(Origin::Agent, error, true), gated.timed_out))
            }
            (None, _) => None,
        };
        if let Some((failure, timed_out)) = retry {
            gated.reset(ResetCode::PeerReset);
            return Attempt::Unanswered { failure, timed_out };
        }
    }
    let opened_at = gated.opened_at;
    let mut spliced = splice::conclude(copied, socket, &mut gated, Hop::Relay);
    if let Some(failure) = refusal {
        spliced.outcome = Outcome::OpenFailed(failure);
    }
    if spliced.outcome == Outcome::Completed {
        // The client's last bytes may still be in flight to the agent; the relay's connection
        // must not close under them (a drain closes it once the clients are done).
        stream.delivered().await;
    }
    Attempt::Ended { outcome: spliced.outcome, opened_at }
}

/// The client bytes read before the agent answered, kept to be written again behind a new
/// open header if this agent fails before answering. Bounded: past the limit the copy is
/// dropped and the connection is no longer retried.
#[derive(Debug)]
struct Replay {
    /// `None` once the limit was passed.
    bytes: Option<Vec<u8>>,
    limit: usize,
}

impl Replay {
    fn new(limit: usize) -> Self {
        Self { bytes: Some(Vec::new()), limit }
    }

    fn record(&mut self, data: &[u8]) {
        if let Some(bytes) = &mut self.bytes {
            if bytes.len() + data.len() > self.limit {
                self.bytes = None;
            } else {
                bytes.extend_from_slice(data);
            }
        }
    }

    /// Whether every byte the client sent so far is kept.
    fn intact(&self) -> bool {
        self.bytes.is_some()
    }

    fn bytes(&self) -> &[u8] {
        self.bytes.as_deref().unwrap_or_default()
    }

    /// The agent answered: nothing will be replayed.
    fn release(&mut self) {
        if self.bytes.as_ref().is_some_and(|b| b.capacity() > 0) {
            self.bytes = Some(Vec::new());
        }
    }
}

/// The client's socket as the copy loop reads it: until the agent answers, every byte read is
/// also kept in the [`Replay`].
#[derive(Debug)]
struct Recording<'a> {
    socket: &'a mut TcpStream,
    replay: &'a mut Replay,
    /// Set by the open-reply gate when the agent answered.
    answered: &'a AtomicBool,
}

impl AsyncRead for Recording<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Freed at the first poll after the answer, read or not: an idle connection keeps no
        // copy of its first bytes.
        let answered = this.answered.load(Ordering::Relaxed);
        if answered {
            this.replay.release();
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.socket).poll_read(cx, buf))?;
        if !answered {
            this.replay.record(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Recording<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().socket).poll_shutdown(cx)
    }
}

/// Reads the agent's [`OpenReply`] at the head of a data stream before passing the
/// destination's bytes through. Writes (the client's bytes) pass straight through from the
/// start. An open failure surfaces as a `ConnectionRefused` error carrying the
/// [`OpenFailure`], so the copy loop ends on the tunnel side with the agent's reason; no
/// answer by the deadline, as a `TimedOut` error.
#[derive(Debug)]
struct OpenReplyGate<'a> {
    stream: &'a mut TunnelStream,
    state: GateState,
    /// When the agent's answer was read.
    opened_at: Option<Instant>,
    /// The answer's deadline; dropped (freed) once it has come.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Whether the deadline passed first.
    timed_out: bool,
    /// Set when the agent answered `Opened` (the [`Recording`] stops keeping bytes).
    answered: &'a AtomicBool,
    /// The agent's refusal, when it answered `OpenFailed`.
    refusal: Option<OpenFailure>,
}

#[derive(Debug)]
enum GateState {
    Header { buf: [u8; HEADER_LEN], filled: usize },
    Body { buf: Vec<u8>, filled: usize },
    Open,
}

impl<'a> OpenReplyGate<'a> {
    fn new(stream: &'a mut TunnelStream, deadline: Instant, answered: &'a AtomicBool) -> Self {
        Self {
            stream,
            state: GateState::Header { buf: [0; HEADER_LEN], filled: 0 },
            opened_at: None,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            timed_out: false,
            answered,
            refusal: None,
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
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                this.timed_out = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the agent did not answer the open request in time",
                )));
            }
        }
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
                            this.deadline = None;
                            this.answered.store(true, Ordering::Relaxed);
                        }
                        OpenReply::Failed(failure) => {
                            this.deadline = None;
                            this.refusal = Some(failure.clone());
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
