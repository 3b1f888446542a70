//! QUIC endpoints tuned for a tunnel rather than for quinn's defaults.
//!
//! * A 2 MiB stream window (about 330 Mbit/s per stream at 50 ms RTT) and a connection window
//!   with credit for every stream's whole window and the control stream's besides, so a
//!   stream whose reader stalls holds back only itself and never the heartbeats (see
//!   [`crate::limits`]).
//! * The agent admits one relay-opened stream — the control stream — until its control
//!   handshake is done, then up to [`MAX_CONCURRENT_STREAMS`] more
//!   (`AgentConnection::allow_data_streams`); the relay admits none from the agent (the relay
//!   opens every stream).
//! * Keep-alives every [`KEEP_ALIVE`] and an idle timeout of [`IDLE_TIMEOUT`], so a dead peer
//!   is noticed within seconds.
//! * UDP socket buffers raised to [`UDP_BUFFER_BYTES`]; what the kernel granted is logged.
//! * BBR congestion control instead of quinn's default Cubic: tunnels to private networks
//!   often cross long, lossy paths where a loss-based controller collapses (the measurement
//!   behind the choice is in `docs/benchmarks.md`, "QUIC congestion control"). quinn marks its
//!   BBR experimental; the lossy-WAN namespace test exercises it.
//! * The relay's stateless-reset key and connection-ID key are derived from its private key
//!   rather than drawn at random, so a relay that restarts (crash, kill -9, upgrade)
//!   recognises the agent's next packet as one of its own connection IDs and answers it with a
//!   reset the agent accepts (RFC 9000 §10.3): the agent re-dials at once instead of waiting
//!   out the idle timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::codes::DialError;
use crate::crypto::ClientHelloRecorder;
use crate::limits::quic_connection_window;
pub use crate::limits::{MAX_CONCURRENT_STREAMS, Role, STREAM_RECEIVE_WINDOW};
use crate::quic_session::{WatchedClientConfig, WatchedHandshake};
use crate::tls::TlsError;
use crate::tunnel::{AgentConnection, RelayConnection};

/// Send buffer per connection.
pub const SEND_WINDOW: u64 = 64 * 1024 * 1024;
/// Interval of QUIC keep-alive packets.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Silence after which a peer is declared dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Requested UDP socket buffer size for each direction.
pub const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// The transport parameters both ends use, with the stream limit set for `role` and each
/// stream's receive window `stream_window` bytes (the connection's follows it).
pub fn transport_config(role: Role, stream_window: u32) -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    let incoming_streams = match role {
        // The control stream; data streams are allowed once the handshake is done.
        Role::Agent => 1u32,
        Role::Relay => 0,
    };
    config
        .max_concurrent_bidi_streams(incoming_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(stream_window.into())
        .receive_window(
            quinn::VarInt::from_u64(quic_connection_window(stream_window))
                .unwrap_or(quinn::VarInt::MAX),
        )
        .send_window(SEND_WINDOW)
        .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        .keep_alive_interval(Some(KEEP_ALIVE))
        // The tunnel carries streams only. quinn's default keeps a 1.25 MB buffer of unread
        // datagrams per connection, which an unauthenticated peer could fill on every
        // connection it opens.
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(8_000))),
        ));
    config
}

/// Binds a UDP socket with raised buffers and logs what the kernel granted.
fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4 too when bound to [::], as the TCP listeners do.
        let _ = socket.set_only_v6(false);
    }
    // Failures here only cost throughput; the kernel clamps to net.core.[rw]mem_max.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    let granted_recv = socket.recv_buffer_size().unwrap_or(0);
    let granted_send = socket.send_buffer_size().unwrap_or(0);
    if granted_recv < UDP_BUFFER_BYTES || granted_send < UDP_BUFFER_BYTES {
        tracing::info!(
            requested = UDP_BUFFER_BYTES,
            granted_recv,
            granted_send,
            "UDP socket buffers smaller than requested; raise net.core.rmem_max/wmem_max for \
             high-bandwidth tunnels"
        );
    } else {
        tracing::debug!(granted_recv, granted_send, "UDP socket buffers");
    }
    Ok(socket.into())
}

/// Keys derived from a secret that survives restarts — the relay's private key — so that a
/// restarted relay recognises the connection IDs an earlier run of it issued and produces the
/// same stateless-reset tokens for them. The derivation is HKDF-Extract (HMAC-SHA256 keyed
/// with a label of each purpose); neither key reveals anything about the secret.
struct RestartStableKeys {
    reset: aws_lc_rs::hmac::Key,
    connection_id: u64,
}

impl RestartStableKeys {
    fn derive(secret: &[u8]) -> Self {
        let extract = |label: &[u8]| {
            let salt = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, label);
            aws_lc_rs::hmac::sign(&salt, secret)
        };
        let reset = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            extract(b"privlink QUIC stateless reset v1").as_ref(),
        );
        let cid = extract(b"privlink QUIC connection id v1");
        let mut connection_id = [0u8; 8];
        connection_id.copy_from_slice(&cid.as_ref()[..8]);
        Self { reset, connection_id: u64::from_le_bytes(connection_id) }
    }

    fn endpoint_config(self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::new(Arc::new(self.reset));
        let key = self.connection_id;
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(key))
        });
        config
    }
}

/// A QUIC endpoint for the relay, listening for agents on `listen`. `reset_secret` (the
/// relay's private key) seeds the stateless-reset and connection-ID keys; see the module
/// notes. Streams from agents get `stream_window` bytes of receive window each.
pub fn relay_endpoint(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    reset_secret: &[u8],
    stream_window: u32,
) -> Result<quinn::Endpoint, QuicSetupError> {
    let server = relay_server_config(tls, stream_window)?;
    let socket = bind_udp(listen).map_err(|e| QuicSetupError::Bind(listen, e))?;
    quinn::Endpoint::new(
        RestartStableKeys::derive(reset_secret).endpoint_config(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| QuicSetupError::Bind(listen, e))
}

/// The relay's QUIC server settings for `tls`: what [`relay_endpoint`] starts with, and what
/// a reload hands to `quinn::Endpoint::set_server_config` when the certificate changes (new
/// handshakes use it; connections already up keep theirs).
pub fn relay_server_config(
    tls: rustls::ServerConfig,
    stream_window: u32,
) -> Result<quinn::ServerConfig, QuicSetupError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(Role::Relay, stream_window)));
    Ok(server)
}

/// A QUIC endpoint for the agent, dialling out from an ephemeral port on `bind`; streams from
/// relays get `stream_window` bytes of receive window each.
pub fn agent_endpoint(
    bind: SocketAddr,
    tls: rustls::ClientConfig,
    stream_window: u32,
) -> Result<quinn::Endpoint, QuicSetupError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(WatchedClientConfig(Arc::new(crypto))));
    client.transport_config(Arc::new(transport_config(Role::Agent, stream_window)));
    let socket = bind_udp(bind).map_err(|e| QuicSetupError::Bind(bind, e))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| QuicSetupError::Bind(bind, e))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Dials a relay and completes the QUIC handshake within `deadline`.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    server_name: &str,
    deadline: Duration,
) -> Result<AgentConnection, DialError> {
    let connecting =
        endpoint.connect(relay, server_name).map_err(|e| DialError::Handshake(e.to_string()))?;
    let started = std::time::Instant::now();
    match tokio::time::timeout(deadline, connecting).await {
        // quinn does not show what the TLS inside negotiated: the session read the relay's
        // ServerHello (`quic_session`).
        Ok(Ok(connection)) => {
            let tls = WatchedHandshake::of(&connection);
            Ok(AgentConnection::from_quic(connection, tls))
        }
        // The idle timeout ended the handshake before `deadline`: no answer, as for a timeout.
        Ok(Err(quinn::ConnectionError::TimedOut)) => Err(DialError::Timeout(Duration::from_secs(
            (started.elapsed() + Duration::from_millis(500)).as_secs(),
        ))),
        Ok(Err(quinn::ConnectionError::TransportError(e)))
            if e.reason.starts_with("invalid peer certificate") =>
        {
            Err(DialError::Certificate(format!("handshake failed: {}", e.reason)))
        }
        Ok(Err(e)) if refused_key_exchange(&e) => {
            Err(DialError::KeyExchange(describe_handshake_error(&e)))
        }
        Ok(Err(e)) => Err(DialError::Handshake(describe_handshake_error(&e))),
        Err(_) => Err(DialError::Timeout(deadline)),
    }
}

/// Whether the handshake ended with a TLS `handshake_failure` alert, from either side: in
/// privlink's TLS 1.3 with fixed suites, no key exchange group in common.
fn refused_key_exchange(error: &quinn::ConnectionError) -> bool {
    const HANDSHAKE_FAILURE: u8 = 40;
    let code = quinn_proto::TransportErrorCode::crypto(HANDSHAKE_FAILURE);
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code == code,
        quinn::ConnectionError::TransportError(e) => e.code == code,
        _ => false,
    }
}

/// Relay side: completes an incoming agent connection's handshake within `deadline`, with
/// `tls` (the tunnel's current settings) given a [`ClientHelloRecorder`] of its own so that
/// the connection knows what it negotiated. Call it from a task of its own: a stalled peer
/// must not block the accept loop.
pub async fn accept(
    incoming: quinn::Incoming,
    deadline: Duration,
    tls: &rustls::ServerConfig,
    stream_window: u32,
) -> Result<RelayConnection, DialError> {
    let (recording, recorder) = ClientHelloRecorder::wrap(tls);
    let server = relay_server_config(recording, stream_window)
        .map_err(|e| DialError::Handshake(e.to_string()))?;
    let connecting =
        incoming.accept_with(Arc::new(server)).map_err(|e| DialError::Handshake(e.to_string()))?;
    match tokio::time::timeout(deadline, connecting).await {
        Ok(Ok(connection)) => {
            let summary = recorder.chosen(tls.crypto_provider());
            Ok(RelayConnection::from_quic(connection, summary))
        }
        Ok(Err(e)) if refused_key_exchange(&e) => {
            Err(DialError::KeyExchange(describe_handshake_error(&e)))
        }
        Ok(Err(e)) => Err(DialError::Handshake(describe_handshake_error(&e))),
        Err(_) => Err(DialError::Timeout(deadline)),
    }
}

fn describe_handshake_error(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ConnectionClosed(close)
            if close.reason.as_ref() == b"peer doesn't support any known protocol" =>
        {
            "the relay does not speak privlink/1 (ALPN mismatch)".to_owned()
        }
        quinn::ConnectionError::TransportError(e) => format!("handshake failed: {e}"),
        other => format!("handshake failed: {other}"),
    }
}

/// Why a QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {0}")]
    Bind(SocketAddr, #[source] io::Error),
    /// The TLS configuration is unusable for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Tls(String),
}

impl From<TlsError> for QuicSetupError {
    fn from(e: TlsError) -> Self {
        Self::Tls(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay's and an agent's tunnel TLS settings for a fresh self-signed `localhost`.
    fn tunnel_configs(
        relay: crate::crypto::PostQuantum,
        agent: crate::crypto::PostQuantum,
    ) -> (rustls::ServerConfig, rustls::ClientConfig) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let chain = vec![cert.der().clone()];
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let server =
            crate::tls::tunnel_server_config(chain.clone(), key_der, relay).expect("server");
        let client = crate::tls::tunnel_client_config(&chain, agent).expect("client");
        (server, client)
    }

    #[tokio::test]
    async fn neither_end_accepts_datagrams() {
        let (server, client) = tunnel_configs(Default::default(), Default::default());
        let (relay_side, agent_side) = connect(&server, client).await;
        for (side, connection) in [("relay", relay_side.quic()), ("agent", agent_side.quic())] {
            let connection = connection.expect("a QUIC connection");
            assert_eq!(connection.max_datagram_size(), None, "the {side} accepts datagrams");
        }
    }

    /// Both sides know what the handshake chose: the relay from the agent's ClientHello, the
    /// agent from the relay's ServerHello — also after a HelloRetryRequest (the relay has no
    /// X25519MLKEM768 for the agent's first key share and asks for X25519).
    #[tokio::test]
    async fn both_sides_know_the_key_exchange_and_suite() {
        use crate::crypto::PostQuantum::{Off, Prefer};
        for (relay, agent, expected) in
            [(Prefer, Prefer, "X25519MLKEM768"), (Off, Prefer, "X25519"), (Prefer, Off, "X25519")]
        {
            let (server, client) = tunnel_configs(relay, agent);
            let (relay_side, agent_side) = connect(&server, client).await;
            let relay_tls = relay_side.tls().expect("the relay's side knows its TLS");
            assert_eq!(relay_tls.key_exchange, expected, "relay {relay}, agent {agent}");
            assert_eq!(relay_tls.version, "TLS 1.3");
            let agent_tls = agent_side.tls().expect("the agent's side knows its TLS");
            assert_eq!(agent_tls, relay_tls, "relay {relay}, agent {agent}");
        }
    }

    async fn connect(
        server: &rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> (RelayConnection, AgentConnection) {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let window = STREAM_RECEIVE_WINDOW;
        let relay = relay_endpoint(any, server.clone(), b"test", window).expect("relay endpoint");
        let agent = agent_endpoint(any, client, window).expect("agent endpoint");
        let addr = relay.local_addr().expect("addr");
        let wait = Duration::from_secs(5);
        let (accepted, dialed) = tokio::join!(
            async { accept(relay.accept().await.expect("incoming"), wait, server, window).await },
            dial(&agent, addr, "localhost", wait)
        );
        (accepted.expect("accept"), dialed.expect("dial"))
    }

    fn token(secret: &[u8], connection_id: &[u8]) -> Vec<u8> {
        aws_lc_rs::hmac::sign(&RestartStableKeys::derive(secret).reset, connection_id)
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_restarted_relay_derives_the_same_keys_and_another_relay_does_not() {
        let relay_key = b"relay private key (DER)";
        assert_eq!(token(relay_key, b"cid-1"), token(relay_key, b"cid-1"));
        assert_ne!(token(relay_key, b"cid-1"), token(relay_key, b"cid-2"));
        assert_ne!(token(relay_key, b"cid-1"), token(b"another relay's key", b"cid-1"));
        // The reset key is derived, not the secret itself.
        let raw = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, relay_key);
        assert_ne!(token(relay_key, b"cid-1"), aws_lc_rs::hmac::sign(&raw, b"cid-1").as_ref());

        let cid_key = |secret: &[u8]| RestartStableKeys::derive(secret).connection_id;
        assert_eq!(cid_key(relay_key), cid_key(relay_key));
        assert_ne!(cid_key(relay_key), cid_key(b"another relay's key"));
    }
}
