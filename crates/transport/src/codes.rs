//! What both tunnel transports report in the same words: which transport carries a
//! connection, the codes a connection is closed and a stream reset with, and why a stream or
//! a connection could not be had.

use std::fmt;
use std::time::Duration;

/// Which transport carries a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP carrying HTTP/2.
    Tcp,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        })
    }
}

/// Application codes for closing a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Ordinary close.
    Normal = 0,
    /// The sender is shutting down.
    Shutdown = 1,
    /// The agent's hello was refused.
    Refused = 2,
    /// The peer broke the protocol.
    ProtocolError = 3,
}

/// Application codes for resetting one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ResetCode {
    /// The TCP peer on the sender's side reset or failed.
    PeerReset = 1,
    /// The inactivity timeout fired.
    IdleTimeout = 2,
    /// The sender is shutting down.
    Shutdown = 3,
    /// The stream broke the protocol.
    ProtocolError = 4,
}

/// Why a stream could not be opened or accepted.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection is closed (the reason says by whom and why).
    #[error("tunnel connection closed: {0}")]
    ConnectionClosed(String),
    /// The peer's concurrent-stream limit stayed full for the whole wait.
    #[error("no stream available within {0:?}: the agent's concurrent-stream limit is reached")]
    LimitReached(Duration),
}

/// Why a tunnel connection could not be established (dialled by the agent or accepted by
/// the relay), on either transport.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No handshake completed before the deadline (UDP blocked, relay down, …).
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    /// The connection or its handshake failed (refused, reset, ALPN, …).
    #[error("{0}")]
    Handshake(String),
    /// The relay's certificate was not accepted. Not a network problem: neither retrying at
    /// full speed nor falling back to another transport helps; an operator has to act.
    #[error("{0}")]
    Certificate(String),
    /// The peer refused the key exchange (`handshake_failure`: no group in common, as when
    /// one side has `post_quantum = "require"` and the other cannot). Like a certificate, an
    /// operator has to act.
    #[error("{0}")]
    KeyExchange(String),
    /// The HTTP proxy on the way to the relay did not open the way: not the relay's failure,
    /// and not one another transport avoids (QUIC cannot cross a proxy).
    #[error(transparent)]
    Proxy(#[from] crate::http_proxy::ProxyError),
}
