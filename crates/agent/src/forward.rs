//! One data stream on the agent: read the relay's open header, re-check the destination
//! against the allowlist, resolve it with the system resolver, connect (trying every address
//! within one deadline), answer opened or a precise failure, then splice stream and socket
//! with the endpoint's inactivity timeout.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use privlink_protocol::destination::{Destination, Host};
use privlink_protocol::message::{MAX_OPEN_BODY, Open, OpenFailCode, OpenFailure, OpenReply};
use privlink_protocol::text;
use privlink_transport::audit::AuditTrail;
use privlink_transport::budget::BufferBudget;
use privlink_transport::copy::{CopyTimeouts, DEFAULT_BUFFER_SIZE, copy_bidirectional_counted};
use privlink_transport::io::{read_frame, write_frame};
use privlink_transport::live::LiveTable;
use privlink_transport::splice::{self, Hop, Outcome};
use privlink_transport::tcp::abort;
use privlink_transport::throttle::Throttle;
use privlink_transport::tunnel::{DELIVERY_WAIT, ResetCode, TunnelStream};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::allowlist::{Allowlist, DestinationPattern, special_address_kind};

/// Longest silence between two warnings of one kind about streams the relay asked for (a
/// refused destination, a malformed header) while they keep coming; each counts the others.
const STREAM_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Deadline for the open header to arrive after the relay opened the stream.
pub const OPEN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Inactivity timeout used when the relay sends none.
const FALLBACK_INACTIVITY: Duration = Duration::from_secs(60);

/// What a stream needs from the agent: its configuration (which a reload may replace), and
/// where it is counted and listed.
#[derive(Debug)]
pub struct StreamPolicy {
    /// The allowlist and deadlines in force.
    pub rules: std::sync::RwLock<std::sync::Arc<StreamRules>>,
    /// Where streams are counted.
    pub metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
    /// The streams forwarding now, for `/api/v1/connections` and the byte counters.
    pub live: LiveTable<LiveStream>,
    /// What destinations that do not read may make the agent hold, all streams together.
    pub budget: std::sync::Arc<BufferBudget>,
    /// Each endpoint's share of it, by name (only endpoints this agent approved get one).
    shares: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<BufferBudget>>>,
    /// The agent's audit trail: destinations refused, streams closed (off unless `[audit]`).
    pub audit: AuditTrail,
}

/// The part of the agent's configuration a stream is judged and connected by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRules {
    /// Destinations the agent opens.
    pub allowlist: Allowlist,
    /// Deadline for resolving a destination.
    pub dns_timeout: Duration,
    /// Deadline for connecting to a destination.
    pub connect_timeout: Duration,
    /// Reset a stream whose destination (or the relay) stopped taking bytes for this long.
    pub stall_timeout: Duration,
}

impl StreamPolicy {
    /// A policy with `rules`, counting into `metrics`, holding at most `budget` bytes for
    /// destinations that do not read (a budget that charges each stream for a receive window
    /// of `stream_window` bytes).
    pub fn new(
        rules: StreamRules,
        metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
        budget: u64,
        stream_window: u32,
    ) -> Self {
        Self {
            rules: std::sync::RwLock::new(std::sync::Arc::new(rules)),
            metrics,
            live: LiveTable::default(),
            budget: std::sync::Arc::new(BufferBudget::new(budget).for_stream_window(stream_window)),
            shares: std::sync::Mutex::default(),
            audit: AuditTrail::off(),
        }
    }

    /// `endpoint`'s share of the budget.
    fn share(&self, endpoint: &str) -> std::sync::Arc<BufferBudget> {
        let mut shares = self.shares.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let share = shares
            .entry(endpoint.to_owned())
            .or_insert_with(|| std::sync::Arc::new(BufferBudget::share_of(&self.budget)));
        std::sync::Arc::clone(share)
    }

    /// The rules in force now.
    pub fn rules(&self) -> std::sync::Arc<StreamRules> {
        std::sync::Arc::clone(&self.rules.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Replaces the rules (a reload); streams already open keep going.
    pub fn set_rules(&self, rules: StreamRules) {
        *self.rules.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            std::sync::Arc::new(rules);
    }
}

/// What `/api/v1/connections` shows of a stream besides its times and bytes (as the relay
/// described it in the open request).
#[derive(Debug)]
pub struct LiveStream {
    /// The relay's endpoint.
    pub endpoint: String,
    /// The relay's client.
    pub client: SocketAddr,
    /// The destination connected to.
    pub destination: String,
}

/// Longest inactivity timeout the agent applies, whatever a relay asks for: a relay cannot
/// make the agent hold idle destination connections forever.
pub const MAX_INACTIVITY: Duration = Duration::from_secs(24 * 3600);

/// The inactivity timeout for a relay's request (0: none sent), within the agent's bounds.
fn inactivity_timeout(requested_ms: u64) -> Duration {
    match requested_ms {
        0 => FALLBACK_INACTIVITY,
        ms => Duration::from_millis(ms).min(MAX_INACTIVITY),
    }
}

/// Serves one relay-opened stream to completion. `approved` holds the endpoints this agent
/// approved on the stream's connection: an open for any other is refused, even when its
/// destination would match the allowlist.
///
/// The stream is borrowed, not taken: the task that owns it holds it once, where an `async fn`
/// taking it would hold it twice (the argument and the local it is moved into), for as long as
/// the stream lives.
pub async fn serve_stream(
    stream: &mut TunnelStream,
    policy: &StreamPolicy,
    approved: &HashSet<String>,
    force: &CancellationToken,
) {
    // Read in a future of its own, so that no borrow of `open` keeps a second copy of it in
    // this one while `forward` runs.
    let Some((open, span)) = read_open(stream).await else { return };
    forward(stream, open, policy, approved, force).instrument(span).await;
}

/// Reads the relay's open header and makes the stream's span from it; on a bad header,
/// resets the stream (a throttled warning says why).
async fn read_open(stream: &mut TunnelStream) -> Option<(Open, tracing::Span)> {
    let open: Open = match read_frame(stream, MAX_OPEN_BODY, OPEN_HEADER_TIMEOUT).await {
        Ok(open) => open,
        Err(e) => {
            static BAD_HEADERS: Throttle = Throttle::new(STREAM_LOG_INTERVAL);
            if let Some(left_out) = BAD_HEADERS.admit(std::time::Instant::now()) {
                warn!(left_out, "bad open header from relay: {e}");
            }
            stream.reset(ResetCode::ProtocolError);
            return None;
        }
    };
    let span = tracing::info_span!(
        "stream",
        endpoint = %text::loggable(&open.endpoint),
        client = %open.client_addr,
        destination = %text::loggable(&open.destination),
    );
    Some((open, span))
}

/// The open's connect, answer and copy. Not an `async fn`, which would keep `open` twice in
/// the task for the stream's whole life (see `serve_stream`); its fields are used in place.
#[expect(clippy::manual_async_fn, reason = "an `async fn` keeps each argument twice in its future")]
fn forward<'a>(
    stream: &'a mut TunnelStream,
    open: Open,
    policy: &'a StreamPolicy,
    approved: &'a HashSet<String>,
    force: &'a CancellationToken,
) -> impl Future<Output = ()> + 'a {
    async move {
        let started = Instant::now();
        let approved = approved.contains(&open.endpoint);
        let share = approved.then(|| policy.share(&open.endpoint));
        // Taken now, before the connect: a burst of opens meets the budget as it will be.
        let charge = share.as_deref().and_then(BufferBudget::admit_stream);
        let connected = if !approved {
            Err(failure(
                OpenFailCode::NotAllowed,
                format!(
                    "endpoint `{}` was not approved by this agent",
                    text::loggable(&open.endpoint)
                ),
            ))
        } else if charge.is_none() {
            Err(failure(
                OpenFailCode::OverBudget,
                format!(
                    "destinations that do not read hold the agent's buffer_budget ({} bytes: all \
                     of it, or this endpoint's three quarters)",
                    policy.budget.limit()
                ),
            ))
        } else {
            connect_allowed(&open.destination, policy).await
        };
        let mut socket = match connected {
            Ok(socket) => {
                policy.metrics.connected(started.elapsed().as_secs_f64());
                socket
            }
            Err(failure) => {
                let outcome = match failure.code {
                    OpenFailCode::NotAllowed => "not_allowed",
                    OpenFailCode::OverBudget => "over_budget",
                    _ => "destination_failed",
                };
                policy.metrics.stream_ended(outcome, 0, 0);
                let asked = (open.endpoint.as_str(), open.client_addr, open.destination.as_str());
                if failure.code == OpenFailCode::NotAllowed {
                    crate::audit::destination_refused(&policy.audit, asked, &failure.message);
                } else {
                    let took = started.elapsed();
                    crate::audit::stream_failed(
                        &policy.audit,
                        asked,
                        took,
                        outcome,
                        &failure.message,
                    );
                }
                if matches!(failure.code, OpenFailCode::NotAllowed | OpenFailCode::OverBudget) {
                    // A relay asking for what the allowlist refuses can ask as fast as it likes;
                    // over the budget, every new stream is refused until some is returned.
                    static REFUSALS: Throttle = Throttle::new(STREAM_LOG_INTERVAL);
                    if let Some(left_out) = REFUSALS.admit(std::time::Instant::now()) {
                        warn!(left_out, "refused: {}", failure.message);
                    }
                } else {
                    info!(code = %failure.code, "destination not opened: {}", failure.message);
                }
                // Tell the relay why and finish our side, then keep the stream until the relay
                // has read the answer and ended it: dropping it now would reset it, and over
                // HTTP/2 a reset can overtake the answer (the relay would see a lost stream, not
                // the reason, and try another agent for a policy refusal).
                let _ = write_frame(&mut *stream, &OpenReply::Failed(failure)).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut *stream).await;
                // Boxed: this rare path's read buffer would otherwise sit in every stream's task
                // for its whole life (the task is as large as its largest await).
                let _ =
                    Box::pin(tokio::time::timeout(DELIVERY_WAIT, discard_until_end(&mut *stream)))
                        .await;
                return;
            }
        };
        if let Err(e) = write_frame(&mut *stream, &OpenReply::Opened).await {
            debug!("relay went away before the reply: {e}");
            abort(socket);
            return;
        }
        let timeouts = CopyTimeouts {
            inactivity: inactivity_timeout(open.inactivity_timeout_ms),
            stall: Some(policy.rules().stall_timeout),
            ends_at: None,
        };
        let live = policy.live.insert(LiveStream {
            endpoint: open.endpoint,
            client: open.client_addr,
            destination: open.destination,
        });
        let copied = copy_bidirectional_counted(
            &mut socket,
            &mut *stream,
            timeouts,
            DEFAULT_BUFFER_SIZE,
            std::pin::pin!(force.cancelled()),
            &live.bytes,
            charge.as_ref(),
        )
        .await;
        let spliced = splice::conclude(copied, &socket, &mut *stream, Hop::Agent);
        drop(socket);
        if spliced.outcome == Outcome::Completed {
            // The stream's end may still be in flight; the agent's connection must not close
            // under it (a drain ends by closing it once the streams are done).
            stream.delivered().await;
        }
        // What a scrape has not counted yet (socket → tunnel is from the destination).
        let (from_destination, to_destination) = live.unreported();
        let asked = (live.info.endpoint.as_str(), live.info.client, live.info.destination.as_str());
        let moved = (spliced.tunnel_to_socket, spliced.socket_to_tunnel);
        crate::audit::stream_closed(
            &policy.audit,
            asked,
            started.elapsed(),
            moved,
            &spliced.outcome,
        );
        drop(live);
        policy.metrics.stream_ended(spliced.outcome.label(), to_destination, from_destination);
        debug!(
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            bytes_to_destination = spliced.tunnel_to_socket,
            bytes_from_destination = spliced.socket_to_tunnel,
            end = %spliced.outcome,
            "stream closed"
        );
    }
}

/// Reads and drops what the peer still sends until it ends or resets the stream.
async fn discard_until_end(stream: &mut TunnelStream) {
    // On the heap: an array here would size every stream's task for its whole life.
    let mut sink = vec![0u8; 1024];
    while let Ok(n) = tokio::io::AsyncReadExt::read(stream, &mut sink).await {
        if n == 0 {
            return;
        }
    }
}

fn failure(code: OpenFailCode, message: impl Into<String>) -> OpenFailure {
    OpenFailure { code, message: message.into() }
}

/// Checks, resolves and connects, or says precisely why not.
pub async fn connect_allowed(
    destination: &str,
    policy: &StreamPolicy,
) -> Result<TcpStream, OpenFailure> {
    let destination: Destination = destination
        .parse()
        .map_err(|e| failure(OpenFailCode::BadRequest, format!("invalid destination: {e}")))?;
    let rules = policy.rules();
    let rule = rules.allowlist.matching(&destination).ok_or_else(|| {
        failure(OpenFailCode::NotAllowed, format!("{destination} is not in this agent's allowlist"))
    })?;

    let resolved: Vec<SocketAddr> = match &destination.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, destination.port)],
        Host::Name(name) => {
            // An absolute name keeps its dot: no search domain is tried (see `DnsName`).
            let lookup = tokio::net::lookup_host((name.lookup_form(), destination.port));
            match tokio::time::timeout(rules.dns_timeout, lookup).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => {
                    return Err(failure(
                        OpenFailCode::DnsFailure,
                        format!("cannot resolve {name}: {e}"),
                    ));
                }
                Err(_) => {
                    return Err(failure(
                        OpenFailCode::DnsFailure,
                        format!("resolving {name} took longer than {:?}", rules.dns_timeout),
                    ));
                }
            }
        }
    };
    let candidates = admissible_addresses(&destination, rule, resolved)?;
    connect_any(&candidates, rules.connect_timeout).await
}

/// Drops resolved addresses the agent refuses by default (loopback, link-local, metadata, …)
/// unless `rule` names them explicitly; fails when nothing admissible is left.
pub fn admissible_addresses(
    destination: &Destination,
    rule: &DestinationPattern,
    resolved: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, OpenFailure> {
    let mut refused_special: Option<(IpAddr, &str)> = None;
    let candidates: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|addr| match special_address_kind(addr.ip()) {
            Some(kind) if !rule.names_address(addr.ip()) => {
                refused_special.get_or_insert((addr.ip(), kind));
                false
            }
            _ => true,
        })
        .collect();
    if !candidates.is_empty() {
        return Ok(candidates);
    }
    Err(match refused_special {
        Some((ip, kind)) => failure(
            OpenFailCode::NotAllowed,
            format!(
                "{destination} resolves to {ip}, a {kind} address, which is refused unless an \
                 [[allow]] rule names it explicitly"
            ),
        ),
        None => failure(OpenFailCode::DnsFailure, format!("{destination} resolved to no address")),
    })
}

/// Tries each address in turn until one connects or the deadline passes.
async fn connect_any(
    candidates: &[SocketAddr],
    deadline: Duration,
) -> Result<TcpStream, OpenFailure> {
    let give_up = Instant::now() + deadline;
    let mut last_error: Option<(SocketAddr, io::Error)> = None;
    for addr in candidates {
        match tokio::time::timeout_at(give_up, TcpStream::connect(addr)).await {
            Ok(Ok(socket)) => {
                let _ = socket.set_nodelay(true);
                return Ok(socket);
            }
            Ok(Err(e)) => {
                debug!(%addr, "connect failed: {e}");
                last_error = Some((*addr, e));
            }
            Err(_) => {
                return Err(failure(
                    OpenFailCode::Timeout,
                    format!("no connection within {deadline:?} (last tried {addr})"),
                ));
            }
        }
    }
    Err(match last_error {
        Some((addr, e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            failure(OpenFailCode::Refused, format!("{addr} refused the connection"))
        }
        Some((addr, e)) => failure(OpenFailCode::Unreachable, format!("{addr}: {e}")),
        None => failure(OpenFailCode::DnsFailure, "no address to connect to"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().expect("addr")).collect()
    }

    #[test]
    fn a_relay_cannot_ask_for_an_unbounded_inactivity_timeout() {
        assert_eq!(inactivity_timeout(0), FALLBACK_INACTIVITY);
        assert_eq!(inactivity_timeout(60_000), Duration::from_secs(60));
        assert_eq!(inactivity_timeout(u64::MAX), MAX_INACTIVITY);
    }

    #[test]
    fn names_resolving_to_special_addresses_are_refused() {
        let destination: Destination = "vault.internal:443".parse().expect("dest");
        let rule: DestinationPattern = "*.internal:443".parse().expect("rule");
        let refused = admissible_addresses(&destination, &rule, addrs(&["169.254.169.254:443"]))
            .expect_err("metadata");
        assert_eq!(refused.code, OpenFailCode::NotAllowed);
        assert!(refused.message.contains("cloud metadata"), "{}", refused.message);
        // Mixed answers keep only the ordinary addresses.
        let kept =
            admissible_addresses(&destination, &rule, addrs(&["127.0.0.1:443", "10.0.0.4:443"]))
                .expect("one ordinary address");
        assert_eq!(kept, addrs(&["10.0.0.4:443"]));
        // A rule naming the address lifts the refusal.
        let explicit: DestinationPattern = "127.0.0.1:443".parse().expect("rule");
        let lo: Destination = "127.0.0.1:443".parse().expect("dest");
        assert!(admissible_addresses(&lo, &explicit, addrs(&["127.0.0.1:443"])).is_ok());
    }

    fn policy(rule: &str) -> StreamPolicy {
        let rules = StreamRules {
            allowlist: Allowlist { rules: vec![rule.parse().expect("rule")] },
            dns_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(30),
        };
        let window = privlink_transport::limits::STREAM_RECEIVE_WINDOW;
        StreamPolicy::new(rules, std::sync::Arc::default(), 1 << 20, window)
    }

    #[tokio::test]
    async fn failures_carry_precise_codes() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let refused = connect_allowed(&addr, &policy(&addr)).await.expect_err("nothing listens");
        assert_eq!(refused.code, OpenFailCode::Refused, "{refused}");

        let outside =
            connect_allowed("10.9.9.9:443", &policy(&addr)).await.expect_err("not allowed");
        assert_eq!(outside.code, OpenFailCode::NotAllowed);

        // `.invalid` never resolves (RFC 2606), with or without a reachable DNS server.
        let dns = connect_allowed("vault.invalid:443", &policy("*.invalid:443"))
            .await
            .expect_err("nxdomain");
        assert_eq!(dns.code, OpenFailCode::DnsFailure, "{dns}");

        let bad = connect_allowed("not a destination", &policy(&addr)).await.expect_err("garbage");
        assert_eq!(bad.code, OpenFailCode::BadRequest);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = listener.local_addr().expect("addr").to_string();
        assert!(connect_allowed(&open, &policy(&open)).await.is_ok());
    }
}
