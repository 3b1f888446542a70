//! The tunnel transport behind one interface: a [`TunnelConnection`] is a multiplexed
//! connection on which the relay opens byte streams and the agent accepts them; a
//! [`TunnelStream`] is one such stream, an ordinary `AsyncRead + AsyncWrite` that carries FIN
//! as FIN and can be reset. The relay, the agent and the copy loop use only these types, so
//! they do not know which transport carries a stream. QUIC ([`quic`]) is the transport today;
//! TLS over TCP with an HTTP/2 multiplexer will be a second variant of the same types.

pub mod quic;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which transport carries a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quic => "quic",
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

/// A multiplexed tunnel connection between a relay and an agent.
#[derive(Debug, Clone)]
pub struct TunnelConnection {
    inner: quinn::Connection,
}

impl TunnelConnection {
    /// Wraps an established QUIC connection.
    pub fn from_quic(connection: quinn::Connection) -> Self {
        Self { inner: connection }
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Opens a stream, waiting at most `wait` for the peer's stream limit to allow it.
    ///
    /// Nothing is sent until the caller writes, so the open header and the first data go
    /// out together: opening costs no round trip.
    pub async fn open_stream(&self, wait: Duration) -> Result<TunnelStream, StreamError> {
        match tokio::time::timeout(wait, self.inner.open_bi()).await {
            Ok(Ok((send, recv))) => Ok(TunnelStream { send, recv }),
            Ok(Err(e)) => Err(StreamError::ConnectionClosed(e.to_string())),
            Err(_) => Err(StreamError::LimitReached(wait)),
        }
    }

    /// Waits for the peer to open a stream.
    pub async fn accept_stream(&self) -> Result<TunnelStream, StreamError> {
        self.inner
            .accept_bi()
            .await
            .map(|(send, recv)| TunnelStream { send, recv })
            .map_err(|e| StreamError::ConnectionClosed(e.to_string()))
    }

    /// Closes the connection with a code and a reason the peer will see.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.inner.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
    }

    /// Resolves when the connection is closed, with a description of why.
    pub async fn closed(&self) -> String {
        describe_close(&self.inner.closed().await)
    }

    /// The close reason if the connection is already closed.
    pub fn close_reason(&self) -> Option<String> {
        self.inner.close_reason().map(|e| describe_close(&e))
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }
}

fn describe_close(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => format!(
            "closed by peer (code {}): {}",
            close.error_code,
            String::from_utf8_lossy(&close.reason)
        ),
        quinn::ConnectionError::LocallyClosed => "closed locally".to_owned(),
        quinn::ConnectionError::TimedOut => "peer unresponsive (idle timeout)".to_owned(),
        other => other.to_string(),
    }
}

/// One byte stream of a tunnel connection. Shutting down the write side sends FIN;
/// [`TunnelStream::reset`] aborts both directions.
#[derive(Debug)]
pub struct TunnelStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl TunnelStream {
    /// Aborts the stream both ways: the peer's reads fail with a reset and its writes stop.
    pub fn reset(&mut self, code: ResetCode) {
        let code = quinn::VarInt::from_u32(code as u32);
        // Either half may already be finished or stopped; resetting what is left is enough.
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}
