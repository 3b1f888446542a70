//! The tunnel transport behind one interface: a [`TunnelConnection`] is a multiplexed
//! connection on which the relay opens byte streams and the agent accepts them; a
//! [`TunnelStream`] is one such stream, an ordinary `AsyncRead + AsyncWrite` that carries FIN
//! as FIN and can be reset. The relay, the agent and the copy loop use only these types, so
//! they do not know which transport carries a stream: QUIC ([`quic`]) or TLS over TCP with
//! an HTTP/2 multiplexer ([`h2`]).

pub mod h2;
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

/// A multiplexed tunnel connection between a relay and an agent.
#[derive(Debug, Clone)]
pub struct TunnelConnection {
    inner: Connection,
}

#[derive(Debug, Clone)]
enum Connection {
    Quic(quinn::Connection),
    /// Relay side of TLS/TCP: opens streams.
    H2Opener(h2::H2Opener),
    /// Agent side of TLS/TCP: accepts streams.
    H2Acceptor(h2::H2Acceptor),
}

impl From<h2::H2Opener> for TunnelConnection {
    fn from(opener: h2::H2Opener) -> Self {
        Self { inner: Connection::H2Opener(opener) }
    }
}

impl From<h2::H2Acceptor> for TunnelConnection {
    fn from(acceptor: h2::H2Acceptor) -> Self {
        Self { inner: Connection::H2Acceptor(acceptor) }
    }
}

impl TunnelConnection {
    /// Wraps an established QUIC connection.
    pub fn from_quic(connection: quinn::Connection) -> Self {
        Self { inner: Connection::Quic(connection) }
    }

    /// The close state of a TLS/TCP connection (callers match on the variant first).
    fn h2_state(&self) -> &h2::CloseState {
        match &self.inner {
            Connection::H2Opener(c) => c.state(),
            Connection::H2Acceptor(c) => c.state(),
            Connection::Quic(_) => unreachable!("only called for h2 connections"),
        }
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        match self.inner {
            Connection::Quic(_) => TransportKind::Quic,
            Connection::H2Opener(_) | Connection::H2Acceptor(_) => TransportKind::Tcp,
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match &self.inner {
            Connection::Quic(c) => c.remote_address(),
            Connection::H2Opener(_) | Connection::H2Acceptor(_) => self.h2_state().remote_address(),
        }
    }

    /// Opens a stream, waiting at most `wait` for the peer's stream limit to allow it.
    ///
    /// Nothing but the stream's opening is sent until the caller writes, and the open header
    /// and the first data go out together: opening costs no round trip.
    pub async fn open_stream(&self, wait: Duration) -> Result<TunnelStream, StreamError> {
        match &self.inner {
            Connection::Quic(c) => match tokio::time::timeout(wait, c.open_bi()).await {
                Ok(Ok((send, recv))) => Ok(TunnelStream { inner: Stream::Quic { send, recv } }),
                Ok(Err(e)) => Err(StreamError::ConnectionClosed(e.to_string())),
                Err(_) => Err(StreamError::LimitReached(wait)),
            },
            Connection::H2Opener(c) => {
                c.open_stream(wait).await.map(|s| TunnelStream { inner: Stream::H2(s) })
            }
            Connection::H2Acceptor(_) => Err(StreamError::ConnectionClosed(
                "the agent side of a TLS/TCP tunnel does not open streams".to_owned(),
            )),
        }
    }

    /// Waits for the peer to open a stream.
    pub async fn accept_stream(&self) -> Result<TunnelStream, StreamError> {
        match &self.inner {
            Connection::Quic(c) => c
                .accept_bi()
                .await
                .map(|(send, recv)| TunnelStream { inner: Stream::Quic { send, recv } })
                .map_err(|e| StreamError::ConnectionClosed(describe_close(&e))),
            Connection::H2Acceptor(c) => {
                c.accept_stream().await.map(|s| TunnelStream { inner: Stream::H2(s) })
            }
            Connection::H2Opener(c) => {
                // The relay never accepts streams: wait for the connection to end instead.
                Err(StreamError::ConnectionClosed(c.state().closed().await))
            }
        }
    }

    /// Closes the connection with a code and a reason (QUIC delivers both to the peer; over
    /// TLS/TCP the reason travels on the control stream before this is called).
    pub fn close(&self, code: CloseCode, reason: &str) {
        match &self.inner {
            Connection::Quic(c) => c.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes()),
            Connection::H2Opener(_) | Connection::H2Acceptor(_) => self.h2_state().close(reason),
        }
    }

    /// Resolves when the connection is closed, with a description of why.
    pub async fn closed(&self) -> String {
        match &self.inner {
            Connection::Quic(c) => describe_close(&c.closed().await),
            Connection::H2Opener(_) | Connection::H2Acceptor(_) => self.h2_state().closed().await,
        }
    }

    /// The close reason if the connection is already closed.
    pub fn close_reason(&self) -> Option<String> {
        match &self.inner {
            Connection::Quic(c) => c.close_reason().map(|e| describe_close(&e)),
            Connection::H2Opener(_) | Connection::H2Acceptor(_) => self.h2_state().close_reason(),
        }
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
    inner: Stream,
}

#[derive(Debug)]
enum Stream {
    Quic { send: quinn::SendStream, recv: quinn::RecvStream },
    H2(h2::H2Stream),
}

impl TunnelStream {
    /// Aborts the stream both ways: the peer's reads fail with a reset and its writes stop.
    pub fn reset(&mut self, code: ResetCode) {
        match &mut self.inner {
            Stream::Quic { send, recv } => {
                let code = quinn::VarInt::from_u32(code as u32);
                // Either half may already be finished or stopped; resetting the rest is enough.
                let _ = send.reset(code);
                let _ = recv.stop(code);
            }
            Stream::H2(s) => s.reset(code),
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Stream::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
            Stream::H2(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Stream::Quic { send, .. } => AsyncWrite::poll_write(Pin::new(send), cx, buf),
            Stream::H2(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Stream::Quic { send, .. } => AsyncWrite::poll_flush(Pin::new(send), cx),
            Stream::H2(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Stream::Quic { send, .. } => AsyncWrite::poll_shutdown(Pin::new(send), cx),
            Stream::H2(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
