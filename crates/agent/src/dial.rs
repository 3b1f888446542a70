//! One connection attempt to one relay address on the transport the configuration asks for:
//! `quic`, `tcp`, or `auto` — QUIC first, TLS over TCP when QUIC does not get through in time,
//! QUIC probed again while on TCP and promoted once it works, the TCP session then drained;
//! behind an HTTP proxy, TLS over TCP through it and nothing else.

use std::time::Duration;

use privlink_admin::{Readiness, ReadyLatch};
use privlink_protocol::control::Timers;
use privlink_transport::dialer::QuicSource;
use privlink_transport::tunnel::{AgentConnection, DialError, TransportKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::TransportChoice;
use crate::fleet::Link;
use crate::session::{SessionError, serve_connection};
use crate::shared::AgentShared;

/// One session on `link` on the transport(s) the configuration asks for.
pub(crate) async fn session(
    link: &Link,
    shared: &AgentShared,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    // QUIC cannot cross an HTTP proxy: behind one, `auto` goes straight to TLS over TCP and
    // probes no UDP (the configuration refuses `quic` with a proxy).
    let proxied = shared.config.proxy_for(&link.relay).is_some();
    let only = match shared.config.transport {
        TransportChoice::Auto if !proxied => return auto_session(link, shared, stop).await,
        TransportChoice::Quic => TransportKind::Quic,
        TransportChoice::Auto | TransportChoice::Tcp => TransportKind::Tcp,
    };
    let connection = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(only, link, shared, Timers::HANDSHAKE) => dialed?,
    };
    serve_connection(&connection, link, shared, stop, &session_latch()).await
}

/// `transport = "auto"`: QUIC if a handshake completes within `quic_fallback_after`, else TLS
/// over TCP. While on TCP, QUIC is probed every `quic_probe_interval`; once it works, a QUIC
/// session starts (the relay prefers the newest agent connection) and the TCP session drains:
/// it tells the relay to send it no new streams and closes when its open streams are done.
async fn auto_session(
    link: &Link,
    shared: &AgentShared,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let fallback_after = shared.config.quic_fallback_after;
    let quic_failure = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(TransportKind::Quic, link, shared, fallback_after) => match dialed {
            Ok(connection) => return serve_connection(&connection, link, shared, stop, &session_latch()).await,
            // A rejected certificate or key exchange is not UDP being blocked: TCP would fail
            // the same way.
            Err(e @ SessionError::Dial(DialError::Certificate(_) | DialError::KeyExchange(_))) => {
                return Err(e);
            }
            Err(e) => e,
        },
    };
    warn!("QUIC did not get through ({quic_failure}); falling back to TLS over TCP");
    shared.metrics.fell_back();
    let tcp = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(TransportKind::Tcp, link, shared, Timers::HANDSHAKE) => dialed?,
    };
    let tcp_wind_down = stop.child_token();
    let tcp_ready = session_latch();
    let mut on_tcp =
        std::pin::pin!(serve_connection(&tcp, link, shared, &tcp_wind_down, &tcp_ready));
    let quic = tokio::select! {
        result = &mut on_tcp => return result,
        quic = probe_quic(link, shared) => quic,
    };
    info!(
        "QUIC gets through again: new streams move to QUIC once it is approved; open TCP streams run to completion"
    );
    let quic_ready = session_latch();
    // Drain TCP only once the QUIC session has given its verdicts, so the relay always has an
    // approving agent; if the QUIC session fails before that, TCP simply carries on.
    let drain_tcp = async {
        tokio::select! {
            () = quic_ready.ready() => {
                tcp_wind_down.cancel();
                on_tcp.await
            }
            result = &mut on_tcp => result,
        }
    };
    let (on_quic, tcp_tail) =
        tokio::join!(serve_connection(&quic, link, shared, stop, &quic_ready), drain_tcp);
    if let Err(e) = tcp_tail {
        debug!("TCP session after the move to QUIC: {e}");
    }
    on_quic
}

/// A session's readiness: ready once the relay has its verdicts.
fn session_latch() -> ReadyLatch {
    ReadyLatch::new(Readiness::NotReady("awaiting the welcome".to_owned()))
}

/// Dials QUIC every `quic_probe_interval` until a handshake completes.
async fn probe_quic(link: &Link, shared: &AgentShared) -> AgentConnection {
    let mut ticks = tokio::time::interval(shared.config.quic_probe_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match dial(TransportKind::Quic, link, shared, shared.config.quic_fallback_after).await {
            Ok(connection) => return connection,
            Err(e) => debug!("QUIC probe: {e}"),
        }
    }
}

/// Establishes a tunnel connection for `link` on one transport within `deadline`. In front of
/// a relay fleet a QUIC connection goes out from a UDP socket of its own: a UDP balancer
/// hashes source ports, and links from one port would all land on one relay.
async fn dial(
    kind: TransportKind,
    link: &Link,
    shared: &AgentShared,
    deadline: Duration,
) -> Result<AgentConnection, SessionError> {
    let in_fleet = link.key.slot > 0 || link.cover.links_wanted() > 1;
    let source = if in_fleet { QuicSource::Own } else { QuicSource::Shared };
    let target = (&link.relay, link.key.address);
    Ok(shared.dialer.dial(kind, target, &shared.config, deadline, source).await?)
}
