//! The tunnel behind one interface, whichever transport carries it: a [`Connection`] is a
//! multiplexed connection between a relay and an agent, typed by the side holding it — the
//! relay's [`RelayConnection`] opens byte streams, the agent's [`AgentConnection`] accepts
//! them — and a [`TunnelStream`] is one such stream, an ordinary `AsyncRead + AsyncWrite` that
//! carries FIN as FIN and can be reset. The relay, the agent and the copy loop use only these
//! types, so they do not know whether QUIC ([`crate::quic`]) or TLS over TCP with an HTTP/2
//! multiplexer ([`crate::h2`]) carries a stream. Both transports fail to connect with one
//! [`DialError`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::codes::{CloseCode, DialError, ResetCode, StreamError, TransportKind};
use crate::h2;
use crate::limits::MAX_CONCURRENT_STREAMS;

mod sealed {
    pub trait Sealed {}
}

/// Which end of the tunnel holds a [`Connection`]; sealed, with two implementations:
/// [`RelaySide`] and [`AgentSide`].
pub trait Role: sealed::Sealed + fmt::Debug + Send + Sync + 'static {
    /// This side's half of an HTTP/2 tunnel connection.
    #[doc(hidden)]
    type H2Half: fmt::Debug + Clone + Send + Sync + AsRef<h2::CloseState>;
}

/// The relay's end: it opens streams.
#[derive(Debug)]
pub enum RelaySide {}

/// The agent's end: it accepts streams.
#[derive(Debug)]
pub enum AgentSide {}

impl sealed::Sealed for RelaySide {}
impl sealed::Sealed for AgentSide {}

impl Role for RelaySide {
    type H2Half = h2::H2Opener;
}

impl Role for AgentSide {
    type H2Half = h2::H2Acceptor;
}

/// A multiplexed tunnel connection, as seen from side `R`.
#[derive(Debug)]
pub struct Connection<R: Role> {
    inner: Inner<R::H2Half>,
    /// What its TLS negotiated, where this side can tell (not an agent's QUIC connection:
    /// quinn does not show it; the relay works it out from the ClientHello).
    tls: Option<Arc<crate::crypto::TlsSummary>>,
    /// When the certificate the peer presented expires (seconds since the Unix epoch): the
    /// relay's, on the agent's side; `None` on the relay's (agents present none).
    peer_certificate_expires: Option<i64>,
}

/// The relay's tunnel connection to one agent.
pub type RelayConnection = Connection<RelaySide>;
/// The agent's tunnel connection to one relay.
pub type AgentConnection = Connection<AgentSide>;

#[derive(Debug, Clone)]
enum Inner<H> {
    Quic(quinn::Connection),
    H2(H),
}

impl From<h2::H2Opener> for RelayConnection {
    fn from(opener: h2::H2Opener) -> Self {
        let state: &h2::CloseState = opener.as_ref();
        let (tls, peer_certificate_expires) = (state.tls.clone(), state.peer_certificate_expires);
        Self { inner: Inner::H2(opener), tls, peer_certificate_expires }
    }
}

impl From<h2::H2Acceptor> for AgentConnection {
    fn from(acceptor: h2::H2Acceptor) -> Self {
        let state: &h2::CloseState = acceptor.as_ref();
        let (tls, peer_certificate_expires) = (state.tls.clone(), state.peer_certificate_expires);
        Self { inner: Inner::H2(acceptor), tls, peer_certificate_expires }
    }
}

impl<R: Role> Clone for Connection<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            tls: self.tls.clone(),
            peer_certificate_expires: self.peer_certificate_expires,
        }
    }
}

impl<R: Role> Connection<R> {
    pub(crate) fn from_quic(
        connection: quinn::Connection,
        tls: Option<crate::crypto::TlsSummary>,
    ) -> Self {
        let certificates = connection.peer_identity().and_then(|identity| {
            identity.downcast::<Vec<rustls::pki_types::CertificateDer>>().ok()
        });
        let peer_certificate_expires = certificates.and_then(|c| crate::tls::leaf_expiry(&c));
        Self { inner: Inner::Quic(connection), tls: tls.map(Arc::new), peer_certificate_expires }
    }

    /// When the certificate the peer presented expires (seconds since the Unix epoch): the
    /// relay's certificate, on the agent's side.
    pub fn peer_certificate_expires(&self) -> Option<i64> {
        self.peer_certificate_expires
    }

    /// What this connection's TLS negotiated — version, cipher suite, key exchange — where
    /// this side can tell: both sides of TLS/TCP, the relay's side of QUIC.
    pub fn tls(&self) -> Option<&crate::crypto::TlsSummary> {
        self.tls.as_deref()
    }

    /// The QUIC connection underneath, for this crate's tests.
    #[cfg(test)]
    pub(crate) fn quic(&self) -> Option<&quinn::Connection> {
        match &self.inner {
            Inner::Quic(c) => Some(c),
            Inner::H2(_) => None,
        }
    }

    /// quinn's statistics of a QUIC connection (packets, frames, path); `None` over TCP.
    pub fn quic_stats(&self) -> Option<quinn::ConnectionStats> {
        match &self.inner {
            Inner::Quic(c) => Some(c.stats()),
            Inner::H2(_) => None,
        }
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        match self.inner {
            Inner::Quic(_) => TransportKind::Quic,
            Inner::H2(_) => TransportKind::Tcp,
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match &self.inner {
            Inner::Quic(c) => c.remote_address(),
            Inner::H2(h) => h.as_ref().remote_address(),
        }
    }

    /// Closes the connection with a code and a reason (QUIC delivers both to the peer; over
    /// TLS/TCP the reason travels on the control stream before this is called).
    pub fn close(&self, code: CloseCode, reason: &str) {
        match &self.inner {
            Inner::Quic(c) => c.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes()),
            Inner::H2(h) => h.as_ref().close(reason),
        }
    }

    /// Resolves when the connection is closed, with a description of why.
    pub async fn closed(&self) -> String {
        match &self.inner {
            Inner::Quic(c) => describe_close(&c.closed().await),
            Inner::H2(h) => h.as_ref().closed().await,
        }
    }

    /// The close reason if the connection is already closed.
    pub fn close_reason(&self) -> Option<String> {
        match &self.inner {
            Inner::Quic(c) => c.close_reason().map(|e| describe_close(&e)),
            Inner::H2(h) => h.as_ref().close_reason(),
        }
    }
}

impl Connection<RelaySide> {
    /// The agent is authenticated and admitted: the connection may spend memory on speed.
    /// Over TLS/TCP its socket is read ahead from now on (one 64 KiB buffer per connection,
    /// a quarter of the reads in a bulk transfer); a pending, unauthenticated connection
    /// holds none. Nothing changes over QUIC.
    pub fn admitted(&self) {
        if let Inner::H2(opener) = &self.inner {
            opener.as_ref().read_ahead();
        }
    }

    /// Opens a stream, waiting at most `wait` for the peer's stream limit to allow it.
    ///
    /// Nothing but the stream's opening is sent until the caller writes, and the open header
    /// and the first data go out together: opening costs no round trip.
    pub async fn open_stream(&self, wait: Duration) -> Result<TunnelStream, StreamError> {
        match &self.inner {
            Inner::Quic(c) => match tokio::time::timeout(wait, c.open_bi()).await {
                Ok(Ok((send, recv))) => Ok(TunnelStream { inner: Stream::Quic { send, recv } }),
                Ok(Err(e)) => Err(StreamError::ConnectionClosed(e.to_string())),
                Err(_) => Err(StreamError::LimitReached(wait)),
            },
            Inner::H2(opener) => {
                opener.open_stream(wait).await.map(|s| TunnelStream { inner: Stream::H2(s) })
            }
        }
    }
}

impl Connection<AgentSide> {
    /// Lets the relay open data streams, up to [`MAX_CONCURRENT_STREAMS`] at once.
    /// Until this is called only the control stream is admitted: a relay cannot pile up
    /// streams (and their data) before the control handshake is done. Over QUIC the new limit
    /// goes out as a MAX_STREAMS frame; over TCP further streams are refused until then.
    pub fn allow_data_streams(&self) {
        match &self.inner {
            Inner::Quic(c) => {
                c.set_max_concurrent_bi_streams((MAX_CONCURRENT_STREAMS + 1).into());
            }
            Inner::H2(acceptor) => acceptor.allow_data_streams(),
        }
    }

    /// Waits for the relay to open a stream.
    pub async fn accept_stream(&self) -> Result<TunnelStream, StreamError> {
        match &self.inner {
            Inner::Quic(c) => c
                .accept_bi()
                .await
                .map(|(send, recv)| TunnelStream { inner: Stream::Quic { send, recv } })
                .map_err(|e| StreamError::ConnectionClosed(describe_close(&e))),
            Inner::H2(acceptor) => {
                acceptor.accept_stream().await.map(|s| TunnelStream { inner: Stream::H2(s) })
            }
        }
    }
}

fn describe_close(error: &quinn::ConnectionError) -> String {
    match error {
        // A peer that drops its connection without closing it says nothing but code 0.
        quinn::ConnectionError::ApplicationClosed(close) if close.reason.is_empty() => {
            format!("closed by peer (code {}, no reason given)", close.error_code)
        }
        quinn::ConnectionError::ApplicationClosed(close) => format!(
            "closed by peer (code {}): {}",
            close.error_code,
            privlink_protocol::text::loggable(&String::from_utf8_lossy(&close.reason))
        ),
        quinn::ConnectionError::LocallyClosed => "closed locally".to_owned(),
        quinn::ConnectionError::TimedOut => "peer unresponsive (idle timeout)".to_owned(),
        other => other.to_string(),
    }
}

/// Longest a finished stream waits for its peer to take what it was sent before it is dropped
/// ([`TunnelStream::delivered`], and an agent keeping a refused stream until the relay has
/// read the refusal).
pub const DELIVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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

    /// Waits, at most [`DELIVERY_WAIT`], until the peer has acknowledged everything written
    /// and the FIN.
    /// Closing a QUIC connection discards stream data still in flight, so a side about to
    /// close its connection (an agent at the end of a drain) waits for this on each finished
    /// stream first. Over TLS/TCP it returns at once: the bytes are in the kernel's send
    /// buffer, which a close does not discard.
    pub async fn delivered(&mut self) {
        if let Stream::Quic { send, .. } = &mut self.inner {
            let _ = tokio::time::timeout(DELIVERY_WAIT, send.stopped()).await;
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
