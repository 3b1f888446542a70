//! The agent's way out to its relays: [`Dialer`] holds one QUIC endpoint for every relay
//! (one dual-stack UDP socket), the TLS settings for TLS over TCP, and the verifier both
//! use, which remembers the certificate a relay presented when it was rejected so that an
//! error can say whose it was. It dials one address on one transport; which transport, when
//! to fall back and how often to retry are the agent's business.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::codes::{CloseCode, DialError, TransportKind};
use crate::h2;
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

/// What dialling a relay takes, shared by every link of an agent and by `privlink check`.
#[derive(Debug)]
pub struct Dialer {
    /// One endpoint for every relay: its UDP socket is the agent's QUIC source.
    quic: quinn::Endpoint,
    /// TLS over TCP's client settings.
    tls: Arc<rustls::ClientConfig>,
    /// Keeps rejected certificates so that errors can say whose they were.
    verifier: Arc<RelayVerifier>,
}

impl Dialer {
    /// Trusts `relay_roots`; binds one dual-stack UDP socket for every relay (IPv4 only on
    /// hosts without IPv6). Call it within a tokio runtime.
    pub fn new(relay_roots: &[CertificateDer<'static>]) -> Result<Self, DialerError> {
        let (tls, verifier) = tls::tunnel_client_config_with_verifier(relay_roots)?;
        let quic = quic::agent_endpoint(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), tls.clone())
            .or_else(|_| {
                quic::agent_endpoint(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), tls.clone())
            })?;
        Ok(Self { quic, tls: Arc::new(tls), verifier })
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
        match kind {
            TransportKind::Quic => quic::dial(&self.quic, addr, server_name, deadline).await,
            TransportKind::Tcp => h2::dial(addr, server_name, Arc::clone(&self.tls), deadline)
                .await
                .map(AgentConnection::from),
        }
    }

    /// The certificate the relay dialled as `server_name` presented when it was last rejected.
    pub fn rejected_certificate(&self, server_name: &str) -> Option<CertificateDer<'static>> {
        self.verifier.rejected(server_name)
    }

    /// Closes every QUIC connection with `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.quic.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
    }

    /// Waits until the QUIC endpoint's connections have told their peers they are closed.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await;
    }
}
