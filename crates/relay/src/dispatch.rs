//! Dispatch of one client connection: choose the least-loaded approving agent, open a tunnel
//! stream on it, write the open header with the client's first bytes in the same write (no
//! round trip before data flows), then splice client and stream through the open-reply gate,
//! which holds the destination's bytes back until the agent's answer has been read.
//!
//! Until that answer, nothing has reached the client, so an open that fails in a way another
//! agent might not (see [`crate::open`]) is replayed on another agent: every client byte read
//! before the answer is kept (bounded by `open_retry_buffer`) and written again behind a new
//! open header, up to `open_attempts` agents. An agent that left an open unanswered is
//! suspected — chosen for nothing new — until it is heard from again.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use privlink_protocol::client_hello::ACCESS_DENIED_ALERT;
use privlink_protocol::message::Open;
use privlink_protocol::{frame, http_connect, proxy_header};
use privlink_transport::budget::BudgetCharge;
use privlink_transport::copy::{CopyTimeouts, DEFAULT_BUFFER_SIZE, copy_bidirectional_counted};
use privlink_transport::io::write_and_flush;
use privlink_transport::live::Live;
use privlink_transport::splice::{self, Hop, Origin, Outcome, SpliceStream as _};
use privlink_transport::tcp::{abort, reset_on_close};
use privlink_transport::tunnel::ResetCode;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::config::{EndpointSpec, MAX_OPEN_ATTEMPTS};
use crate::connect;
use crate::endpoint::{Endpoint, LiveClient};
use crate::flow::Flow;
use crate::open::{OpenReplyGate, Recording, Replay, Unanswered, retry_elsewhere};
use crate::registry::{ChosenAgent, EndpointStatus, Registry};
use crate::{preread, refuse};

/// How long a client waits for a stream when the chosen agent's stream limit is full (within
/// the endpoint's `open_timeout`, which is shorter by default).
pub(crate) const OPEN_STREAM_WAIT: Duration = Duration::from_secs(5);
/// How long the open header (with the client's first bytes) may take to enter the stream
/// (within `open_timeout`, likewise). It is a few KiB, so only an agent that has stopped
/// taking data — its connection window full — makes it wait; past this the attempt fails
/// rather than holding a `max_connections` slot with no timer running (the inactivity
/// watchdog starts with the copy).
pub(crate) const FIRST_WRITE_WAIT: Duration = Duration::from_secs(5);
/// Most client bytes sent along with the open header (a TLS ClientHello fits).
const EARLY_DATA_MAX: usize = 4096;

/// How a client connection arrived: who the client is, the load balancer that said so in a
/// PROXY header (if one did), and what was read of the connection already — after that
/// header, and the ClientHello when a shared listener `routed` it by its name.
#[derive(Debug)]
pub(crate) struct Arrival {
    pub(crate) client: SocketAddr,
    pub(crate) via: Option<SocketAddr>,
    pub(crate) read: Vec<u8>,
    pub(crate) routed: bool,
    /// The shared listener's `max_duration`, for a connection it routed (the endpoint's own,
    /// if shorter, wins).
    pub(crate) max_duration: Option<Duration>,
}

impl Arrival {
    /// A client that connected itself, nothing read yet.
    pub(crate) fn direct(client: SocketAddr) -> Self {
        Self { client, via: None, read: Vec::new(), routed: false, max_duration: None }
    }

    /// The client, and the balancer that named it: what refusals and the audit trail record.
    fn source(&self) -> (SocketAddr, Option<SocketAddr>) {
        (self.client, self.via)
    }
}

/// Forwards one admitted client connection and writes its flow-log line.
///
/// Not an `async fn`: that would keep the socket and the arrival twice in the connection's
/// task (each argument, and the local it is moved into) for the connection's whole life; the
/// block here uses them in place.
#[expect(clippy::manual_async_fn, reason = "an `async fn` keeps each argument twice in its future")]
pub(crate) fn forward<'a>(
    mut socket: TcpStream,
    mut arrival: Arrival,
    endpoint: &'a Endpoint,
    spec: Arc<EndpointSpec>,
    registry: &'a Registry,
) -> impl Future<Output = ()> + 'a {
    async move {
        let force = &endpoint.force;
        // Taken before any agent is asked (`listen::admit` looked a moment ago; this takes the
        // charge and looks again in one step, so a burst of clients cannot all pass the look
        // before any of them is charged).
        let Some(charge) = endpoint.budget.admit_stream() else {
            endpoint.refused_over_budget(arrival.source());
            refuse::with_alert(socket, arrival.read.first().copied(), ACCESS_DENIED_ALERT).await;
            return;
        };
        let started = Instant::now();
        let spec = &*spec;
        let _ = socket.set_nodelay(true);
        // An endpoint with server names reads the ClientHello first: one that asks for another
        // name gets no agent (SNI pinning). What was read goes to the agent with the open header.
        let mut preread = if arrival.routed || spec.server_names.is_empty() {
            std::mem::take(&mut arrival.read)
        } else {
            // Boxed here and below: a future awaited inline sizes the whole connection's task for
            // as long as it lives, and these reads are over before the copy starts.
            match Box::pin(preread::server_name(
                &mut socket,
                std::mem::take(&mut arrival.read),
                spec.preread_timeout,
                force,
            ))
            .await
            {
                Ok((bytes, name)) if spec.admits_server_name(name.as_deref()) => bytes,
                refused => {
                    let asked = preread::refuse(socket, refused).await;
                    let outcome = Outcome::SniUnmatched(asked);
                    refuse::before_open(endpoint, spec, arrival.source(), started, &outcome, None);
                    return;
                }
            }
        };
        // From a source not trusted to send a PROXY header, a connection that begins with one is
        // a forgery (the endpoint expects headers from its balancer only): its first bytes are
        // looked at before an agent is asked (a client that says nothing for a while is let on).
        let guard_proxy = spec.proxy_protocol.is_some() && arrival.via.is_none();
        if guard_proxy && preread.is_empty() {
            let deadline = Instant::now() + spec.preread_timeout;
            first_bytes(&mut socket, &mut preread, deadline).await;
        }
        if guard_proxy && preread::looks_like_proxy_header(&preread) {
            abort(socket);
            let outcome = Outcome::ProxyHeaderRefused;
            refuse::before_open(endpoint, spec, arrival.source(), started, &outcome, None);
            return;
        }
        // An `http-connect` endpoint reads its client's CONNECT head: where the client asks to go
        // (the open names it), and the bytes behind the head go with the open. Boxed: kept to
        // the end for the flow log, it would otherwise take its size in every connection's
        // task, CONNECT client or not.
        let mut requested: Option<Box<connect::Requested>> = None;
        if let Some(policy) = spec.destination.connect() {
            let read = std::mem::take(&mut preread);
            let request =
                connect::read_request(&mut socket, read, policy, spec.preread_timeout, force);
            match Box::pin(request).await {
                Ok(request) => {
                    preread = std::mem::take(&mut requested.insert(Box::new(request)).early);
                }
                Err(turned) => {
                    if turned.wrong_credentials {
                        // A guess is answered later the more a source guesses (at most 1 s).
                        let delay = endpoint
                            .proxy_auth_failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .record_failure(arrival.client.ip(), std::time::Instant::now());
                        tokio::time::sleep(delay).await;
                    }
                    if let Some(status) = turned.answer {
                        endpoint.metrics.connect_answered(&spec.name, None, status.code());
                        connect::answer(&mut socket, status, &turned.reason).await;
                    }
                    let outcome = turned.outcome();
                    refuse::before_open(
                        endpoint,
                        spec,
                        arrival.source(),
                        started,
                        &outcome,
                        turned.target.as_ref(),
                    );
                    return;
                }
            }
        }
        // Our own PROXY header, if the endpoint sends one, goes ahead of the client's bytes (so
        // it is not taken for one the client forged, below and in `attempt`).
        let ours = match spec.send_proxy_protocol {
            Some(version) => {
                // The destination learns the original client first; the header rides with the open.
                let local = socket.local_addr().unwrap_or(spec.listen);
                let mut header = proxy_header::encode(version, arrival.client, local);
                let len = header.len();
                header.append(&mut preread);
                preread = header;
                len
            }
            None => 0,
        };
        let destination = match &requested {
            Some(request) => request.target.to_string(),
            None => spec.destination.to_string(),
        };
        let Some(connection) = endpoint.audit.opened(arrival.source(), &spec.name, &destination)
        else {
            let target = requested.as_ref().map(|r| &r.target);
            refuse::unaudited(socket, preread.get(ours).copied(), target.is_some()).await;
            refuse::before_open(
                endpoint,
                spec,
                arrival.source(),
                started,
                &Outcome::Unaudited,
                target,
            );
            return;
        };
        // Busy or not, the connection ends this long after it was accepted (the shorter of the
        // endpoint's and its shared listener's `max_duration`).
        let ends_at = match (spec.max_duration, arrival.max_duration) {
            (Some(a), Some(b)) => Some(started + a.min(b)),
            (a, b) => a.or(b).map(|d| started + d),
        };
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

        // Whether the agent opened; whether the last attempt was left unanswered past its deadline.
        let (mut opened, mut timed_out) = (false, false);
        // Every way out of the loop leaves the socket to the close below: dropped (with a reset
        // where the copy asked for one), reset, or — a CONNECT client the agent did not open
        // for — answered.
        let mut reset = true;
        let outcome = loop {
            let Some(agent) = registry.choose(&spec.connector, &spec.name, &tried[..attempts])
            else {
                break last_failure.unwrap_or_else(|| {
                    match registry.status(&spec.connector, &spec.name) {
                        // The real cause, not "no agent": the agents are there and said no.
                        EndpointStatus::Rejected { reason } => Outcome::Rejected(reason),
                        _ => Outcome::NoAgent,
                    }
                });
            };
            tried[attempts] = agent.id;
            attempts += 1;
            if !agents_tried.is_empty() {
                agents_tried.push(',');
            }
            agents_tried.push_str(&agent.name);
            let entry = live.get_or_insert_with(|| {
                let target = requested.as_ref().map(|r| r.target.to_string().into_boxed_str());
                endpoint.live.insert(LiveClient::new(
                    (arrival.client, connection),
                    agent.name.clone(),
                    target,
                ))
            });
            entry.info.set_agent(&agent.name);
            let first = attempts == 1;

            let first = first.then_some(First { preread: &preread, ours, guard_proxy });
            let opening =
                Opening { destination: &destination, connect: requested.is_some(), ends_at };
            match attempt(
                &mut socket,
                arrival.client,
                spec,
                &agent,
                &mut replay,
                entry,
                endpoint,
                &charge,
                first,
                opening,
            )
            .await
            {
                Attempt::Ended { outcome, opened_at } => {
                    if let Some(at) = opened_at {
                        endpoint
                            .metrics
                            .opened(&spec.name, at.duration_since(started).as_secs_f64());
                    }
                    opened = opened_at.is_some();
                    reset = false; // the copy set the reset it wants, if any
                    bytes = entry.bytes.get();
                    // What a scrape has not counted yet; the entry leaves the list when it drops.
                    unreported = entry.unreported();
                    break outcome;
                }
                Attempt::Unanswered(Unanswered { failure, timed_out: late }) => {
                    timed_out = late;
                    if late {
                        agent.suspect();
                    }
                    registry.open_failed(agent.id, &spec.name);
                    let retry = attempts < spec.open.attempts as usize
                        && replay.intact()
                        && !force.is_cancelled();
                    if !retry {
                        bytes = entry.bytes.get();
                        unreported = entry.unreported();
                        break failure;
                    }
                    debug!(agent = %agent.name, "open not answered, trying another agent: {failure}");
                    endpoint.metrics.open_retried(&spec.name, failure.label());
                    last_failure = Some(failure);
                }
            }
        };
        drop(live);
        if let Some(request) = &requested {
            let answer = if opened { None } else { connect::status_after(&outcome, timed_out) };
            let status = answer.as_ref().map_or(200, |(status, _)| status.code());
            if opened || answer.is_some() {
                endpoint.metrics.connect_answered(&spec.name, Some(&request.pattern), status);
            }
            if let Some((status, reason)) = answer {
                connect::answer(&mut socket, status, &reason).await;
                reset = false;
            }
        }
        // A client no destination byte reached, turned away for a reason on the relay's side, is
        // told with a TLS alert when it speaks TLS (its first byte says).
        let alert = if requested.is_none() && !opened { refuse::alert_for(&outcome) } else { None };
        match alert {
            Some(alert) => {
                let first = preread.get(ours).copied().or(replay.first_byte());
                refuse::with_alert(socket, first, alert).await;
            }
            None if reset => abort(socket),
            None => drop(socket), // closes the client's side now, with a reset where one was asked
        }

        endpoint.metrics.connection_ended(&spec.name, outcome.label(), unreported);
        Flow {
            client: arrival.client,
            via: arrival.via,
            endpoint: spec,
            agent: agents_tried.rsplit(',').next().filter(|a| !a.is_empty()).unwrap_or("-"),
            attempts,
            agents_tried: &agents_tried,
            duration: started.elapsed(),
            bytes_from_client: bytes.0,
            bytes_to_client: bytes.1,
            outcome: &outcome,
            requested: requested.as_ref().map(|r| &r.target),
            connection: Some(connection),
        }
        .record(&endpoint.audit);
    }
}

/// Reads what the client sends first into `into`: until some bytes come, the client closes, or
/// `deadline` passes (readiness can wake without bytes).
async fn first_bytes(socket: &mut TcpStream, into: &mut Vec<u8>, deadline: Instant) {
    into.reserve(EARLY_DATA_MAX);
    while let Ok(Ok(())) = tokio::time::timeout_at(deadline, socket.readable()).await {
        match socket.try_read_buf(into) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => break,
        }
    }
}

/// How one agent's try at a connection ended.
enum Attempt {
    /// For good: served, or failed in a way no other agent would change. Any reset the
    /// client's socket needs is set; the caller drops it.
    Ended { outcome: Outcome, opened_at: Option<Instant> },
    /// Before the agent answered, in a way another agent might not fail: nothing reached the
    /// client, and the socket is untouched.
    Unanswered(Unanswered),
}

/// What the first try sends along with its open header.
struct First<'a> {
    /// Bytes read from the client already (behind our own PROXY header, if one is sent).
    preread: &'a [u8],
    /// How many of them, at the start, are our own PROXY header.
    ours: usize,
    /// Whether a PROXY header at the start of the client's bytes is to be refused.
    guard_proxy: bool,
}

/// What every try opens: the destination the open names, and whether the client is a CONNECT
/// client (it reads `200 Connection established` once the agent has opened).
#[derive(Clone, Copy)]
struct Opening<'a> {
    destination: &'a str,
    connect: bool,
    /// When `max_duration` ends the connection, if it has one.
    ends_at: Option<Instant>,
}

/// One agent's try: stream, open header with the client's bytes so far, then the copy.
/// `first`: this is the first try, with what was read from the client already. (Not an
/// `async fn`, for the reason `forward` gives.)
#[allow(clippy::too_many_arguments)] // one call site; the pieces are the connection's own
#[expect(clippy::manual_async_fn, reason = "an `async fn` keeps each argument twice in its future")]
fn attempt<'a>(
    socket: &'a mut TcpStream,
    client: SocketAddr,
    spec: &'a EndpointSpec,
    agent: &'a ChosenAgent,
    replay: &'a mut Replay,
    live: &'a Live<LiveClient>,
    endpoint: &'a Endpoint,
    charge: &'a BudgetCharge<'a>,
    first: Option<First<'a>>,
    opening: Opening<'a>,
) -> impl Future<Output = Attempt> + 'a {
    async move {
        let force = &endpoint.force;
        let deadline = Instant::now() + spec.open.timeout;
        let unanswered = |origin, message: String, timed_out| {
            Attempt::Unanswered(Unanswered::new(origin, message, timed_out))
        };
        let stream_opening = agent.connection.open_stream(OPEN_STREAM_WAIT);
        let mut stream = match tokio::time::timeout_at(deadline, stream_opening).await {
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
            destination: opening.destination.to_owned(),
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
        if let Some(First { preread, ours, guard_proxy }) = first {
            // The ClientHello read to route the connection, and whatever came after it.
            first_write.extend_from_slice(preread);
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
            if guard_proxy && preread::looks_like_proxy_header(&early[ours..]) {
                stream.reset(ResetCode::ProtocolError);
                reset_on_close(socket);
                return Attempt::Ended { outcome: Outcome::ProxyHeaderRefused, opened_at: None };
            }
            live.bytes.add_socket_to_tunnel(early.len() as u64);
            replay.record(early);
        } else {
            first_write.extend_from_slice(replay.bytes());
        }
        let write_deadline = deadline.min(Instant::now() + FIRST_WRITE_WAIT);
        let written =
            tokio::time::timeout_at(write_deadline, write_and_flush(&mut stream, &first_write))
                .await;
        drop(first_write);
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stream.reset(ResetCode::PeerReset);
                return unanswered(Origin::Agent, e.to_string(), false);
            }
            Err(_) => {
                stream.reset(ResetCode::IdleTimeout);
                let message = format!(
                    "the agent took no data for {:?}",
                    spec.open.timeout.min(FIRST_WRITE_WAIT)
                );
                return unanswered(Origin::Agent, message, true);
            }
        }

        let answered = AtomicBool::new(false);
        let greeting = if opening.connect { http_connect::ESTABLISHED } else { b"" };
        let mut gated = OpenReplyGate::new(&mut stream, deadline, &answered, greeting);
        let mut recording =
            Recording { socket: &mut *socket, replay: &mut *replay, answered: &answered };
        let timeouts = CopyTimeouts {
            inactivity: spec.inactivity_timeout,
            stall: Some(spec.stall_timeout),
            ends_at: opening.ends_at,
        };
        let copied = copy_bidirectional_counted(
            &mut recording,
            &mut gated,
            timeouts,
            DEFAULT_BUFFER_SIZE,
            std::pin::pin!(force.cancelled()),
            &live.bytes,
            Some(charge),
        )
        .await;
        let refusal = gated.refusal.take();
        if !gated.is_open() {
            if let Some(unanswered) =
                retry_elsewhere(refusal.as_ref(), &copied.end, gated.timed_out)
            {
                gated.reset(ResetCode::PeerReset);
                return Attempt::Unanswered(unanswered);
            }
        }
        let opened_at = gated.opened_at;
        let mut spliced = splice::conclude(copied, socket, &mut gated, Hop::Relay);
        if let Some(failure) = refusal {
            spliced.outcome = Outcome::OpenFailed(failure);
        }
        let over_time = opening.ends_at.is_some_and(|at| Instant::now() >= at);
        if spliced.outcome == Outcome::Shutdown && over_time && !force.is_cancelled() {
            spliced.outcome = Outcome::MaxDuration;
        }
        if spliced.outcome == Outcome::Completed {
            // The client's last bytes may still be in flight to the agent; the relay's connection
            // must not close under them (a drain closes it once the clients are done).
            stream.delivered().await;
        }
        Attempt::Ended { outcome: spliced.outcome, opened_at }
    }
}
