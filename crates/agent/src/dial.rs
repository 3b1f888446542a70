//! One connection attempt to one relay address on the transport the configuration asks for:
//! `quic`, `tcp`, or `auto` — QUIC first, TLS over TCP when QUIC does not get through in time,
//! QUIC probed again while on TCP and promoted once it works, the TCP session then drained.

use std::net::SocketAddr;
use std::time::Duration;

use privlink_protocol::control::Timers;
use privlink_transport::dialer::Dialer;
use privlink_transport::tls::CertificateSummary;
use privlink_transport::tunnel::{AgentConnection, CloseCode, DialError, TransportKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{RelayAddress, TransportChoice};
use crate::session::{SessionError, serve_connection};
use crate::{AgentConfig, AgentError, AgentShared};

/// One session with a relay address on the transport(s) the configuration asks for.
pub(crate) async fn session(
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let only = match shared.config.transport {
        TransportChoice::Auto => return auto_session(relay, addr, shared, stop).await,
        TransportChoice::Quic => TransportKind::Quic,
        TransportChoice::Tcp => TransportKind::Tcp,
    };
    let connection = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(only, relay, addr, shared, Timers::HANDSHAKE) => dialed?,
    };
    serve_connection(&connection, addr, shared, stop, &CancellationToken::new()).await
}

/// `transport = "auto"`: QUIC if a handshake completes within `quic_fallback_after`, else TLS
/// over TCP. While on TCP, QUIC is probed every `quic_probe_interval`; once it works, a QUIC
/// session starts (the relay prefers the newest agent connection) and the TCP session drains:
/// it tells the relay to send it no new streams and closes when its open streams are done.
async fn auto_session(
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let fallback_after = shared.config.quic_fallback_after;
    let quic_failure = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(TransportKind::Quic, relay, addr, shared, fallback_after) => match dialed {
            Ok(connection) => return serve_connection(&connection, addr, shared, stop, &CancellationToken::new()).await,
            // A rejected certificate is not UDP being blocked: TCP would fail the same way.
            Err(e @ SessionError::Dial(DialError::Certificate(_))) => return Err(e),
            Err(e) => e,
        },
    };
    warn!("QUIC did not get through ({quic_failure}); falling back to TLS over TCP");
    shared.metrics.fell_back();
    let tcp = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        dialed = dial(TransportKind::Tcp, relay, addr, shared, Timers::HANDSHAKE) => dialed?,
    };
    let tcp_wind_down = stop.child_token();
    let tcp_ready = CancellationToken::new();
    let mut on_tcp =
        std::pin::pin!(serve_connection(&tcp, addr, shared, &tcp_wind_down, &tcp_ready));
    let quic = tokio::select! {
        result = &mut on_tcp => return result,
        quic = probe_quic(relay, addr, shared) => quic,
    };
    info!(
        "QUIC gets through again: new streams move to QUIC once it is approved; open TCP streams run to completion"
    );
    let quic_ready = CancellationToken::new();
    // Drain TCP only once the QUIC session has given its verdicts, so the relay always has an
    // approving agent; if the QUIC session fails before that, TCP simply carries on.
    let drain_tcp = async {
        tokio::select! {
            () = quic_ready.cancelled() => {
                tcp_wind_down.cancel();
                on_tcp.await
            }
            result = &mut on_tcp => result,
        }
    };
    let (on_quic, tcp_tail) =
        tokio::join!(serve_connection(&quic, addr, shared, stop, &quic_ready), drain_tcp);
    if let Err(e) = tcp_tail {
        debug!("TCP session after the move to QUIC: {e}");
    }
    on_quic
}

/// Dials QUIC every `quic_probe_interval` until a handshake completes.
async fn probe_quic(
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
) -> AgentConnection {
    let mut ticks = tokio::time::interval(shared.config.quic_probe_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match dial(TransportKind::Quic, relay, addr, shared, shared.config.quic_fallback_after)
            .await
        {
            Ok(connection) => return connection,
            Err(e) => debug!("QUIC probe: {e}"),
        }
    }
}

/// Establishes a tunnel connection on one transport within `deadline`.
async fn dial(
    kind: TransportKind,
    relay: &RelayAddress,
    addr: SocketAddr,
    shared: &AgentShared,
    deadline: Duration,
) -> Result<AgentConnection, SessionError> {
    Ok(shared.dialer.dial(kind, relay, addr, &shared.config, deadline).await?)
}

/// Dialling a relay as the configuration says — transport's [`Dialer`] (one QUIC endpoint,
/// the TLS settings for TLS over TCP) with the relay's name taken from its address and a
/// rejected certificate explained against `relay_ca` — shared by the agent's links and by
/// `privlink check`.
#[derive(Debug)]
pub(crate) struct RelayDialer {
    dialer: Dialer,
}

impl RelayDialer {
    /// Trusts `config`'s relay roots. Call it within a tokio runtime.
    pub(crate) fn new(config: &AgentConfig) -> Result<Self, AgentError> {
        Ok(Self { dialer: Dialer::new(&config.relay_roots)? })
    }

    /// Establishes a tunnel connection to `addr` (an address of `relay`) on one transport
    /// within `deadline`; a rejected certificate is explained against `config`'s `relay_ca`.
    pub(crate) async fn dial(
        &self,
        kind: TransportKind,
        relay: &RelayAddress,
        addr: SocketAddr,
        config: &AgentConfig,
        deadline: Duration,
    ) -> Result<AgentConnection, DialError> {
        let server_name = relay.host.to_string();
        let server_name = server_name.trim_start_matches('[').trim_end_matches(']');
        let dialed = self.dialer.dial(kind, addr, server_name, deadline).await;
        dialed.map_err(|e| match e {
            DialError::Certificate(detail) => {
                DialError::Certificate(self.explain_untrusted(&detail, server_name, addr, config))
            }
            e => e,
        })
    }

    /// Closes every QUIC link with `reason`, and waits up to `wait` for the relays to hear it.
    pub(crate) async fn close(&self, reason: &str, wait: Duration) {
        self.dialer.close(CloseCode::Normal, reason);
        let _ = tokio::time::timeout(wait, self.dialer.wait_idle()).await;
    }

    /// Waits up to `wait` for closed QUIC links to reach their relays.
    pub(crate) async fn wait_idle(&self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.dialer.wait_idle()).await;
    }

    /// What an operator needs when the relay's certificate is rejected: which file the agent
    /// trusts, what the relay presented, and what to check.
    fn explain_untrusted(
        &self,
        detail: &str,
        server_name: &str,
        addr: SocketAddr,
        config: &AgentConfig,
    ) -> String {
        let relay_ca = config
            .relay_ca
            .as_ref()
            .map_or_else(|| "relay_ca".to_owned(), |p| format!("relay_ca ({})", p.display()));
        let trusted: Vec<String> = config
            .relay_roots
            .iter()
            .filter_map(CertificateSummary::of)
            .map(|ca| format!("`{}`", ca.subject))
            .collect();
        let mut message = format!("the relay's certificate is not trusted ({detail}).");
        match self
            .dialer
            .rejected_certificate(server_name)
            .as_ref()
            .and_then(CertificateSummary::of)
        {
            Some(presented) => {
                message.push_str(&format!(
                    " The relay at {addr} presented `{}`, issued by `{}`, for the names [{}]; \
                     {relay_ca} holds {}.",
                    presented.subject,
                    presented.issuer,
                    presented.names.join(", "),
                    if trusted.is_empty() {
                        "no readable certificate".to_owned()
                    } else {
                        trusted.join(", ")
                    }
                ));
                if !presented.names.iter().any(|n| n.eq_ignore_ascii_case(server_name)) {
                    message.push_str(&format!(
                        " The agent dials it as `{server_name}`, a name the certificate does \
                         not list: put one of its names in `relays`, or reissue the relay's \
                         certificate with `privlink certs init --name {server_name}`."
                    ));
                }
            }
            None => message.push_str(&format!(" {relay_ca} holds {}.", trusted.join(", "))),
        }
        message.push_str(&format!(
            " Check that {relay_ca} is the ca.crt that signed the relay's certificate (the one \
             `privlink certs init` wrote together with relay.crt)."
        ));
        message
    }
}
