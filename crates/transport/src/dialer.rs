//! The agent's way out to its relays: [`Dialer`] holds one QUIC endpoint for every relay
//! (one dual-stack UDP socket), the TLS settings for TLS over TCP, and the verifier both
//! use, which remembers the certificate a relay presented when it was rejected so that an
//! error can say whose it was. It dials one address on one transport; which transport, when
//! to fall back and how often to retry are the agent's business. A QUIC dial can also go out
//! from a socket of its own ([`QuicSource::Own`]): a UDP balancer in front of a relay fleet
//! hashes each flow's addresses and ports, so links that share a source port all land on one
//! relay.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::codes::{CloseCode, DialError, TransportKind};
use crate::crypto::{self, PostQuantum};
use crate::h2;
use crate::http_proxy::ProxyHop;
use crate::quic::{self, QuicSetupError};
use crate::tls::{self, RelayVerifier, TlsError};
use crate::tunnel::AgentConnection;

/// Why a [`Dialer`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DialerError {
    /// The relay CA could not be used.
    #[error("relay trust anchors")]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be set up.
    #[error("QUIC endpoint")]
    Quic(#[from] QuicSetupError),
}

/// Which UDP socket a QUIC dial goes out from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicSource {
    /// The dialler's one socket, shared by every link.
    Shared,
    /// A socket of its own, on a port of its own (a balancer in front of a relay fleet then
    /// treats it as a flow of its own).
    Own,
}

/// What dialling a relay takes, shared by every link of an agent and by `privlink check`.
#[derive(Debug)]
pub struct Dialer {
    /// One endpoint for every relay: its UDP socket is the agent's QUIC source.
    quic: quinn::Endpoint,
    /// Endpoints of dials from a socket of their own, while they have connections.
    own: std::sync::Mutex<Vec<quinn::Endpoint>>,
    /// TLS over TCP's client settings.
    tls: Arc<rustls::ClientConfig>,
    /// Keeps rejected certificates so that errors can say whose they were.
    verifier: Arc<RelayVerifier>,
    /// The key exchange offered, for explaining a refused one.
    post_quantum: PostQuantum,
    /// Each relay stream's receive window, on both transports (`stream_window`).
    stream_window: u32,
}

impl Dialer {
    /// Trusts `relay_roots`; binds one dual-stack UDP socket for every relay (IPv4 only on
    /// hosts without IPv6); gives each stream `stream_window` bytes of receive window. Call it
    /// within a tokio runtime.
    pub fn new(
        relay_roots: &[CertificateDer<'static>],
        post_quantum: PostQuantum,
        stream_window: u32,
    ) -> Result<Self, DialerError> {
        let (tls, verifier) = tls::tunnel_client_config_with_verifier(relay_roots, post_quantum)?;
        let bind = |ip: std::net::IpAddr| {
            quic::agent_endpoint(SocketAddr::new(ip, 0), tls.clone(), stream_window)
        };
        let quic =
            bind(Ipv6Addr::UNSPECIFIED.into()).or_else(|_| bind(Ipv4Addr::UNSPECIFIED.into()))?;
        let own = std::sync::Mutex::default();
        Ok(Self { quic, own, tls: Arc::new(tls), verifier, post_quantum, stream_window })
    }

    /// Establishes a tunnel connection to `addr` on one transport within `deadline`,
    /// verifying the relay's certificate for `server_name`.
    pub async fn dial(
        &self,
        kind: TransportKind,
        addr: SocketAddr,
        server_name: &str,
        deadline: Duration,
    ) -> Result<AgentConnection, DialError> {
        self.dial_from(kind, addr, server_name, deadline, QuicSource::Shared).await
    }

    /// [`dial`](Self::dial), a QUIC connection going out from `source`.
    pub async fn dial_from(
        &self,
        kind: TransportKind,
        addr: SocketAddr,
        server_name: &str,
        deadline: Duration,
        source: QuicSource,
    ) -> Result<AgentConnection, DialError> {
        let dialed = match (kind, source) {
            (TransportKind::Quic, QuicSource::Shared) => {
                quic::dial(&self.quic, addr, server_name, deadline).await
            }
            (TransportKind::Quic, QuicSource::Own) => {
                let endpoint = self.own_endpoint(addr)?;
                quic::dial(&endpoint, addr, server_name, deadline).await
            }
            (TransportKind::Tcp, _) => {
                let tls = Arc::clone(&self.tls);
                h2::dial(addr, None, server_name, tls, self.stream_window, deadline)
                    .await
                    .map(AgentConnection::from)
            }
        };
        dialed.map_err(|e| self.explained(e))
    }

    /// A refused key exchange, explained from this agent's `post_quantum`.
    fn explained(&self, error: DialError) -> DialError {
        match error {
            DialError::KeyExchange(failure) => {
                DialError::KeyExchange(crypto::refused_key_exchange(self.post_quantum, &failure))
            }
            other => other,
        }
    }

    /// A TLS-over-TCP tunnel connection through the HTTP proxy at `proxy`, which is asked to
    /// CONNECT to `hop.target`; the relay's certificate is verified for `server_name`.
    pub async fn dial_through_proxy(
        &self,
        proxy: SocketAddr,
        hop: &ProxyHop,
        server_name: &str,
        deadline: Duration,
    ) -> Result<AgentConnection, DialError> {
        let tls = Arc::clone(&self.tls);
        h2::dial(proxy, Some(hop), server_name, tls, self.stream_window, deadline)
            .await
            .map(AgentConnection::from)
            .map_err(|e| self.explained(e))
    }

    /// A new endpoint on a socket of its own, of the address family of `addr`, kept (for
    /// [`close`](Self::close) and [`wait_idle`](Self::wait_idle)) while it has connections.
    fn own_endpoint(&self, addr: SocketAddr) -> Result<quinn::Endpoint, DialError> {
        let bind = match addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let endpoint = quic::agent_endpoint(bind, (*self.tls).clone(), self.stream_window)
            .map_err(|e| DialError::Handshake(format!("a UDP socket of its own: {e}")))?;
        let mut own = self.own.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        own.retain(|endpoint| endpoint.open_connections() > 0);
        own.push(endpoint.clone());
        Ok(endpoint)
    }

    fn own_endpoints(&self) -> Vec<quinn::Endpoint> {
        self.own.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The certificate the relay dialled as `server_name` presented when it was last rejected.
    pub fn rejected_certificate(&self, server_name: &str) -> Option<CertificateDer<'static>> {
        self.verifier.rejected(server_name)
    }

    /// Closes every QUIC connection with `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        for endpoint in std::iter::once(self.quic.clone()).chain(self.own_endpoints()) {
            endpoint.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
        }
    }

    /// Waits until the QUIC endpoints' connections have told their peers they are closed.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await;
        for endpoint in self.own_endpoints() {
            endpoint.wait_idle().await;
        }
    }
}
