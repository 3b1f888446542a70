//! The agent's QUIC TLS sessions, watched: quinn keeps its rustls connection to itself, so
//! nothing tells an agent which key exchange and cipher suite its relay chose. Each session
//! here is quinn's own rustls session with one addition — the relay's handshake bytes are also
//! shown to a [`ServerHelloReader`] — and its handshake data carries what that reader found
//! ([`WatchedHandshake`]). Everything else is passed through unchanged.

use std::any::Any;
use std::sync::Arc;

use privlink_protocol::server_hello::ServerHelloReader;
use quinn::crypto::rustls::QuicClientConfig;
use quinn_proto::crypto::{self, ExportKeyingMaterialError, KeyPair, Keys};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectError, ConnectionId, Side, TransportError};

use crate::crypto::TlsSummary;

/// quinn's rustls client configuration, starting watched sessions.
pub(crate) struct WatchedClientConfig(pub(crate) Arc<QuicClientConfig>);

impl crypto::ClientConfig for WatchedClientConfig {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn crypto::Session>, ConnectError> {
        let inner = Arc::clone(&self.0).start_session(version, server_name, params)?;
        Ok(Box::new(WatchedSession { inner, server_hello: ServerHelloReader::default() }))
    }
}

/// A connection's handshake data: what the relay chose (in place of rustls' own, which holds
/// the ALPN protocol nobody here asks for: there is only one).
#[derive(Debug)]
pub(crate) struct WatchedHandshake {
    /// What the relay's ServerHello chose, if it was read.
    tls: Option<TlsSummary>,
}

impl WatchedHandshake {
    /// What `connection`'s handshake negotiated, when its session was a watched one.
    pub(crate) fn of(connection: &quinn::Connection) -> Option<TlsSummary> {
        let data = connection.handshake_data()?.downcast::<Self>().ok()?;
        data.tls
    }
}

struct WatchedSession {
    inner: Box<dyn crypto::Session>,
    server_hello: ServerHelloReader,
}

impl crypto::Session for WatchedSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        self.inner.handshake_data()?;
        let tls = self.server_hello.negotiated().map(|chosen| {
            TlsSummary::negotiated(
                rustls::ProtocolVersion::TLSv1_3,
                chosen.cipher_suite.into(),
                chosen.group.into(),
            )
        });
        Some(Box::new(WatchedHandshake { tls }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn crypto::HeaderKey>, Box<dyn crypto::PacketKey>)> {
        self.inner.early_crypto()
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let ready = self.inner.read_handshake(buf)?;
        self.server_hello.feed(buf);
        Ok(ready)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        self.inner.write_handshake(buf)
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn crypto::PacketKey>>> {
        self.inner.next_1rtt_keys()
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}
