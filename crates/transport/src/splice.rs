//! One forwarded connection, end to end: the copy loop between a TCP socket and a tunnel
//! stream, and what its end means — which side gets a stream reset, which a TCP reset, and an
//! [`Outcome`] tagged by where the cause lies (client, relay, agent, destination) with a flag
//! saying whether trying another agent would be safe (pingora's retry idea). Relay and agent
//! both end their connections through [`conclude`], so the mapping exists once.

use std::fmt;

use privlink_protocol::message::{OpenFailCode, OpenFailure};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

#[cfg(doc)]
use crate::copy::copy_bidirectional_metered;
use crate::copy::{CopyEnd, CopyReport, Side};
use crate::tcp::reset_on_close;
use crate::tunnel::{ResetCode, TunnelStream};

/// Which process runs the splice, which says what its socket is: the client on the relay, the
/// destination on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// The relay: socket = client, tunnel = agent.
    Relay,
    /// The agent: socket = destination, tunnel = relay.
    Agent,
}

impl Hop {
    fn socket_origin(self) -> Origin {
        match self {
            Self::Relay => Origin::Client,
            Self::Agent => Origin::Destination,
        }
    }

    fn tunnel_origin(self) -> Origin {
        match self {
            Self::Relay => Origin::Agent,
            Self::Agent => Origin::Relay,
        }
    }
}

/// Where the cause of a failure lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client of an endpoint.
    Client,
    /// The relay, or the tunnel seen from the agent.
    Relay,
    /// The agent, or the tunnel seen from the relay.
    Agent,
    /// The destination the agent connected to.
    Destination,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Relay => "relay",
            Self::Agent => "agent",
            Self::Destination => "destination",
        })
    }
}

/// How one forwarded connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed normally.
    Completed,
    /// No byte moved in either direction for the inactivity timeout.
    IdleTimeout,
    /// The process was shutting down and the grace period ended.
    Shutdown,
    /// The connection lived its endpoint's `max_duration` and was closed, busy or not.
    MaxDuration,
    /// No connected agent has approved the endpoint (relay only).
    NoAgent,
    /// Every connected agent rejected the endpoint (relay only): one agent's reason.
    Rejected(String),
    /// The client's first bytes were not a TLS ClientHello asking for a name the endpoint
    /// serves (relay only; refused before an agent was asked): what it asked for, or why it
    /// could not be read.
    SniUnmatched(String),
    /// A connection from a source not trusted to send a PROXY header began with one (relay
    /// only; refused before a byte reached the agent).
    ProxyHeaderRefused,
    /// An HTTP CONNECT request refused before any agent was asked (relay only): the status
    /// it was answered with and why.
    ConnectRefused {
        /// 400, 403, 405 or 407.
        status: u16,
        /// The one-line reason the client was given.
        reason: String,
    },
    /// The relay must audit every connection (`[audit] require = true`) and its trail could
    /// not take the record (relay only; refused before an agent was asked).
    Unaudited,
    /// The receiver at `origin` took too little for the stall timeout while bytes waited for
    /// it (it stopped reading, or reads a trickle): reset both ways.
    Stalled(Origin),
    /// The agent answered the open with a failure.
    OpenFailed(OpenFailure),
    /// A side failed.
    Failed {
        /// Where the failure lies.
        origin: Origin,
        /// What happened.
        message: String,
        /// Whether nothing was answered yet, so that the connection could be replayed on
        /// another agent without the client seeing a difference.
        retry_safe: bool,
    },
}

impl Outcome {
    /// A failure at `origin`.
    pub fn failed(origin: Origin, message: impl fmt::Display, retry_safe: bool) -> Self {
        Self::Failed { origin, message: message.to_string(), retry_safe }
    }

    /// Whether another agent might serve the same connection where this attempt failed.
    pub fn retry_safe(&self) -> bool {
        match self {
            Self::OpenFailed(failure) => failure.code.retry_elsewhere(),
            Self::Failed { retry_safe, .. } => *retry_safe,
            Self::Completed
            | Self::IdleTimeout
            | Self::Shutdown
            | Self::MaxDuration
            | Self::NoAgent
            | Self::Rejected(_)
            | Self::SniUnmatched(_)
            | Self::ProxyHeaderRefused
            | Self::ConnectRefused { .. }
            | Self::Unaudited
            | Self::Stalled(_) => false,
        }
    }

    /// The outcome's name in metrics and logs (`completed`, `agent_error`, …).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::IdleTimeout => "idle_timeout",
            Self::Shutdown => "shutdown",
            Self::MaxDuration => "max_duration",
            Self::NoAgent => "no_agent",
            Self::Rejected(_) => "rejected",
            Self::SniUnmatched(_) => "sni_unmatched",
            Self::ProxyHeaderRefused => "proxy_header_invalid",
            Self::ConnectRefused { status: 407, .. } => "proxy_auth_required",
            Self::ConnectRefused { status: 403, .. } => "forbidden",
            Self::ConnectRefused { .. } => "bad_request",
            Self::Unaudited => "audit_unavailable",
            Self::Stalled(_) => "stalled",
            Self::OpenFailed(failure) if failure.code == OpenFailCode::OverBudget => "over_budget",
            Self::OpenFailed(_) | Self::Failed { origin: Origin::Destination, .. } => {
                "destination_failed"
            }
            Self::Failed { origin: Origin::Client, .. } => "client_error",
            Self::Failed { origin: Origin::Relay, .. } => "relay_error",
            Self::Failed { origin: Origin::Agent, .. } => "agent_error",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Completed => f.write_str("completed"),
            Self::IdleTimeout => f.write_str("idle-timeout"),
            Self::Shutdown => f.write_str("shutdown"),
            Self::MaxDuration => {
                f.write_str("max-duration: closed after the endpoint's max_duration")
            }
            Self::NoAgent => f.write_str("no-agent: no connected agent has approved this endpoint"),
            Self::Rejected(reason) => {
                let reason = privlink_protocol::text::loggable(reason);
                write!(f, "rejected: every connected agent rejects this endpoint ({reason})")
            }
            Self::SniUnmatched(asked) => write!(f, "sni-unmatched: {asked}"),
            Self::ProxyHeaderRefused => f.write_str(
                "proxy-header-invalid: a PROXY header from a source not trusted to send one",
            ),
            Self::ConnectRefused { status, reason } => {
                let reason = privlink_protocol::text::loggable(reason);
                write!(f, "connect-refused ({status}): {reason}")
            }
            Self::Unaudited => f.write_str(
                "audit-unavailable: the audit trail cannot take records now and require = true",
            ),
            Self::Stalled(origin) => {
                write!(f, "stalled: the {origin} stopped taking bytes (or took a trickle)")
            }
            Self::OpenFailed(failure) => {
                let message = privlink_protocol::text::loggable(&failure.message);
                write!(f, "destination-failed ({}): {message}", failure.code)
            }
            Self::Failed { origin, message, .. } => write!(f, "{origin}-error: {message}"),
        }
    }
}

/// A tunnel stream as the splice sees it: bytes both ways, a reset, and whether the far side
/// has answered yet.
pub trait SpliceStream: AsyncRead + AsyncWrite + Unpin {
    /// Aborts the stream both ways.
    fn reset(&mut self, code: ResetCode);

    /// Whether the far side has answered the open (the relay's open-reply gate says; the
    /// agent's side answered it itself). Before that, a failure is safe to retry elsewhere.
    fn answered(&self) -> bool {
        true
    }
}

impl SpliceStream for TunnelStream {
    fn reset(&mut self, code: ResetCode) {
        TunnelStream::reset(self, code);
    }
}

/// What a splice did.
#[derive(Debug)]
pub struct Spliced {
    /// Bytes read from the socket and sent into the tunnel.
    pub socket_to_tunnel: u64,
    /// Bytes read from the tunnel and written to the socket.
    pub tunnel_to_socket: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// What the end of a copy between `socket` and `tunnel` means, and what it calls for: an idle
/// timeout resets the stream and leaves the socket to close with FIN; a shutdown resets both;
/// a failure on one side resets the other (a stream reset becomes a TCP reset, a TCP reset a
/// stream reset). TCP resets take effect when the caller drops `socket`. An [`OpenFailure`]
/// the relay's open-reply gate surfaced becomes [`Outcome::OpenFailed`].
///
/// Call it right after [`copy_bidirectional_metered`] on the same socket and stream. The two
/// are separate calls rather than one async function because that function's future would
/// live in every connection's task with its own copy of the arguments: measured with
/// `-Zprint-type-sizes`, 56–72 bytes more per connection on each side.
pub fn conclude<T: SpliceStream>(
    report: CopyReport,
    socket: &TcpStream,
    tunnel: &mut T,
    hop: Hop,
) -> Spliced {
    let outcome = match report.end {
        CopyEnd::Finished => Outcome::Completed,
        CopyEnd::IdleTimeout => {
            tunnel.reset(ResetCode::IdleTimeout);
            Outcome::IdleTimeout
        }
        CopyEnd::Cancelled => {
            tunnel.reset(ResetCode::Shutdown);
            reset_on_close(socket);
            Outcome::Shutdown
        }
        CopyEnd::Stalled { side } => {
            tunnel.reset(ResetCode::IdleTimeout);
            reset_on_close(socket);
            Outcome::Stalled(match side {
                Side::Socket => hop.socket_origin(),
                Side::Tunnel => hop.tunnel_origin(),
            })
        }
        CopyEnd::Failed { side: Side::Socket, error } => {
            tunnel.reset(ResetCode::PeerReset);
            Outcome::failed(hop.socket_origin(), error, false)
        }
        CopyEnd::Failed { side: Side::Tunnel, error } => {
            tunnel.reset(ResetCode::PeerReset);
            reset_on_close(socket);
            match error.get_ref().and_then(|e| e.downcast_ref::<OpenFailure>()) {
                Some(failure) => Outcome::OpenFailed(failure.clone()),
                None => Outcome::failed(hop.tunnel_origin(), error, !tunnel.answered()),
            }
        }
    };
    Spliced {
        socket_to_tunnel: report.socket_to_tunnel,
        tunnel_to_socket: report.tunnel_to_socket,
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use privlink_protocol::message::OpenFailCode;

    use super::*;

    #[test]
    fn outcomes_name_their_origin_and_retry_safety() {
        let refused = Outcome::OpenFailed(OpenFailure {
            code: OpenFailCode::Refused,
            message: "10.0.0.4:443 refused the connection".into(),
        });
        assert!(refused.retry_safe());
        assert_eq!(refused.label(), "destination_failed");
        assert!(refused.to_string().starts_with("destination-failed (refused)"));

        let policy = Outcome::OpenFailed(OpenFailure {
            code: OpenFailCode::NotAllowed,
            message: "outside the allowlist".into(),
        });
        assert!(!policy.retry_safe(), "every agent would refuse alike");

        let lost = Outcome::failed(Origin::Agent, "stream reset", true);
        assert!(lost.retry_safe());
        assert_eq!(lost.to_string(), "agent-error: stream reset");
        assert_eq!(Outcome::failed(Origin::Client, "reset", false).label(), "client_error");
        assert!(!Outcome::Completed.retry_safe());
    }

    /// A stream that fails every read with a reset and counts resets.
    struct BrokenTunnel {
        resets: Vec<ResetCode>,
        answered: bool,
    }

    impl AsyncRead for BrokenTunnel {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            _buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for BrokenTunnel {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl SpliceStream for BrokenTunnel {
        fn reset(&mut self, code: ResetCode) {
            self.resets.push(code);
        }
        fn answered(&self) -> bool {
            self.answered
        }
    }

    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (near, far) = tokio::join!(
            TcpStream::connect(listener.local_addr().expect("addr")),
            listener.accept()
        );
        (near.expect("connect"), far.expect("accept").0)
    }

    #[tokio::test]
    async fn a_tunnel_failure_resets_both_sides_and_is_retry_safe_only_before_the_answer() {
        for answered in [false, true] {
            let (mut socket, mut client) = socket_pair().await;
            let mut tunnel = BrokenTunnel { resets: vec![], answered };
            let report = crate::copy::copy_bidirectional_metered(
                &mut socket,
                &mut tunnel,
                std::time::Duration::from_secs(5),
                crate::copy::DEFAULT_BUFFER_SIZE,
                std::future::pending(),
            )
            .await;
            let spliced = conclude(report, &socket, &mut tunnel, Hop::Relay);
            drop(socket);
            assert_eq!(tunnel.resets, vec![ResetCode::PeerReset]);
            assert!(matches!(spliced.outcome, Outcome::Failed { origin: Origin::Agent, .. }));
            assert_eq!(spliced.outcome.retry_safe(), !answered);
            // The client's socket was closed with a reset, not a FIN.
            let mut byte = [0u8; 1];
            let read = tokio::io::AsyncReadExt::read(&mut client, &mut byte).await;
            assert_eq!(read.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::ConnectionReset));
        }
    }
}
