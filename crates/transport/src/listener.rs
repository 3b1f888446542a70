//! The relay's way in for agents: [`TunnelListener`] binds QUIC (UDP) and TLS over TCP on one
//! port number, runs both accept loops and hands each new connection's handshake, not yet
//! awaited, to the caller, who spawns it (a stalled peer never blocks an accept loop).
//! Before a handshake starts, the caller's [`Admission`] decides whether it may (the relay
//! caps unauthenticated connections; under load a QUIC source proves its address first).
//! [`TunnelEndpoint`] is the part that outlives the loops: the identity both transports
//! present, replaced in place on reload (new handshakes use it, links up keep theirs), and
//! the QUIC endpoint closed at shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::codes::{CloseCode, DialError, TransportKind};
use crate::crypto::PostQuantum;
use crate::quic::{self, QuicSetupError};
use crate::tls::{self, TlsError};
use crate::tunnel::RelayConnection;
use crate::{h2, tcp};

/// Why the tunnel listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The QUIC endpoint could not be set up.
    #[error("tunnel listener")]
    Quic(#[from] QuicSetupError),
    /// The TCP listener could not be bound.
    #[error("tunnel listener: cannot listen on TCP {addr}")]
    Tcp {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The TLS identity is unusable.
    #[error("tunnel TLS")]
    Tls(#[from] TlsError),
}

/// What the relay decides about a tunnel connection before its handshake starts.
pub trait Admission {
    /// What an admitted connection holds until it is authenticated (a place among the
    /// pending ones).
    type Ticket: Send + 'static;

    /// Whether a new QUIC source should prove its address first (a stateless retry: one round
    /// trip, no state kept), as a relay under a flood asks.
    fn wants_address_validation(&self) -> bool;

    /// Admits a connection from `remote`, or turns it away (`None`: it is closed at once, and
    /// the admission counts and logs it). `first` says whether the peer has sent a byte: at
    /// once on QUIC (its first packet holds its ClientHello), on TCP when its first byte has
    /// arrived — seen by its task, or by a look at its socket when the admission asks.
    fn admit(&self, remote: SocketAddr, first: Arc<FirstBytes>) -> Option<Self::Ticket>;
}

/// Whether a pending connection's peer has sent its first bytes. Its task records them once
/// it has read them; until then [`arrived`](Self::arrived) looks at the socket itself (a
/// duplicate of its descriptor, peeked at, never read), so a connection whose ClientHello
/// came while its task waited behind a flood is not taken for a silent one.
#[derive(Debug, Default)]
pub struct FirstBytes {
    seen: AtomicBool,
    socket: Option<std::net::TcpStream>,
}

impl FirstBytes {
    /// A peer known to have spoken (QUIC: its first packet carried its ClientHello).
    pub fn spoken() -> Self {
        Self { seen: AtomicBool::new(true), socket: None }
    }

    /// A TCP peer, looked at through a duplicate of `socket`'s descriptor.
    fn watching(socket: &tokio::net::TcpStream) -> Self {
        use std::os::fd::AsFd as _;
        let socket = socket.as_fd().try_clone_to_owned().ok().map(std::net::TcpStream::from);
        let first = Self { seen: AtomicBool::new(false), socket };
        first.arrived();
        first
    }

    /// Whether the peer has sent a byte (a system call while not known yet).
    pub fn arrived(&self) -> bool {
        if self.seen.load(Ordering::Relaxed) {
            return true;
        }
        let waiting =
            self.socket.as_ref().is_some_and(|s| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0));
        if waiting {
            self.seen.store(true, Ordering::Relaxed);
        }
        waiting
    }

    fn record(&self) {
        self.seen.store(true, Ordering::Relaxed);
    }
}

/// One agent connection's transport handshake, started by awaiting it (within the deadline
/// given to [`TunnelListener::serve`]).
pub struct Handshake(Pin<Box<dyn Future<Output = Result<RelayConnection, DialError>> + Send>>);

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handshake")
    }
}

impl Future for Handshake {
    type Output = Result<RelayConnection, DialError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// How long an accepted TCP connection may stay silent before its first byte: an agent sends
/// its ClientHello at once, so a connection silent this long is dropped rather than holding a
/// pending place for the whole handshake deadline.
pub const FIRST_BYTE_DEADLINE: Duration = Duration::from_secs(2);

/// Waits for a TCP peer's first byte (without taking it), within [`FIRST_BYTE_DEADLINE`].
async fn first_byte(socket: &tokio::net::TcpStream) -> Result<(), DialError> {
    match tokio::time::timeout(FIRST_BYTE_DEADLINE, socket.peek(&mut [0u8; 1])).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err(DialError::Handshake("closed before sending a byte".to_owned())),
        Ok(Err(e)) => Err(DialError::Handshake(format!("TCP: {e}"))),
        Err(_) => Err(DialError::Timeout(FIRST_BYTE_DEADLINE)),
    }
}

/// The tunnel's QUIC endpoint and the identity both transports present.
#[derive(Debug, Clone)]
pub struct TunnelEndpoint {
    quic: quinn::Endpoint,
    /// The TLS settings in force, read at each accept (by QUIC too, which gives each incoming
    /// connection its own copy to learn what it negotiated).
    tcp: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    /// The key exchange both transports accept.
    post_quantum: PostQuantum,
    /// Each agent stream's receive window, on both transports (`stream_window`).
    stream_window: u32,
}

impl TunnelEndpoint {
    /// Puts a new certificate chain and key in force on both transports, once both settings
    /// have been built from them (a bad pair changes nothing).
    pub fn replace_identity(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), ListenError> {
        let tls = tls::tunnel_server_config(chain, key, self.post_quantum)?;
        let quic = quic::relay_server_config(tls.clone(), self.stream_window)?;
        self.quic.set_server_config(Some(quic));
        *self.tcp.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tls);
        Ok(())
    }

    /// Closes every QUIC connection with `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.quic.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
    }

    /// Waits until the QUIC connections have told their peers they are closed.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await;
    }

    fn tcp_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current_tls())
    }

    /// The TLS settings in force (both transports use the same).
    fn current_tls(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.tcp.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// QUIC and TLS/TCP bound on one port number, not accepting yet.
#[derive(Debug)]
pub struct TunnelListener {
    endpoint: TunnelEndpoint,
    tcp: TcpListener,
    local_addr: SocketAddr,
}

impl TunnelListener {
    /// Binds TCP (TLS) and UDP (QUIC) on the same port number of `listen`, presenting `chain`
    /// and `key`, accepting the key exchanges `post_quantum` allows, giving each agent stream
    /// `stream_window` bytes of receive window. With port 0 the kernel picks the TCP port — the crowded space, where every
    /// outgoing connection holds an ephemeral port — and UDP follows it; if that UDP port is
    /// taken, a new pair is tried.
    pub fn bind(
        listen: SocketAddr,
        (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        post_quantum: PostQuantum,
        stream_window: u32,
    ) -> Result<Self, ListenError> {
        const ATTEMPTS: usize = 32;
        // The stateless-reset and connection-ID keys are derived from the private key (see
        // `quic`), so a restarted relay recognises its agents' packets.
        let reset_secret = key.secret_der().to_vec();
        let tls = tls::tunnel_server_config(chain, key, post_quantum)?;
        let mut attempt = 1;
        loop {
            let tcp_error = |source| ListenError::Tcp { addr: listen, source };
            let tcp = tcp::listen(listen).map_err(tcp_error)?;
            let local_addr = tcp.local_addr().map_err(tcp_error)?;
            let udp_addr = SocketAddr::new(listen.ip(), local_addr.port());
            match quic::relay_endpoint(udp_addr, tls.clone(), &reset_secret, stream_window) {
                Ok(quic) => {
                    let tcp_tls = Arc::new(RwLock::new(Arc::new(tls)));
                    let endpoint =
                        TunnelEndpoint { quic, tcp: tcp_tls, post_quantum, stream_window };
                    return Ok(Self { endpoint, tcp, local_addr });
                }
                Err(QuicSetupError::Bind(_, e))
                    if listen.port() == 0
                        && attempt < ATTEMPTS
                        && e.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    tracing::debug!(%udp_addr, "UDP side of the tunnel port is taken ({e}); trying another");
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The bound address (the same port on TCP and UDP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The endpoint that outlives the accept loops: identity replacement and close.
    pub fn endpoint(&self) -> TunnelEndpoint {
        self.endpoint.clone()
    }

    /// Accepts agents on both transports until `stop` is cancelled: each connection
    /// `admission` lets in is handed to `on_connection` with its handshake (bounded by
    /// `handshake_deadline` once awaited), its address, transport and ticket.
    pub async fn serve<A, F>(
        self,
        admission: &A,
        handshake_deadline: Duration,
        stop: &CancellationToken,
        on_connection: F,
    ) where
        A: Admission,
        F: Fn(Handshake, SocketAddr, TransportKind, A::Ticket),
    {
        let Self { endpoint, tcp, .. } = self;
        let quic_loop = async {
            loop {
                let incoming = tokio::select! {
                    () = stop.cancelled() => break,
                    incoming = endpoint.quic.accept() => match incoming {
                        Some(incoming) => incoming,
                        None => break,
                    },
                };
                let remote = incoming.remote_address();
                let incoming = if admission.wants_address_validation() && incoming.may_retry() {
                    match incoming.retry() {
                        Ok(()) => continue,
                        Err(not_retried) => not_retried.into_incoming(),
                    }
                } else {
                    incoming
                };
                let Some(ticket) = admission.admit(remote, Arc::new(FirstBytes::spoken())) else {
                    incoming.refuse();
                    continue;
                };
                let tls = endpoint.current_tls();
                let window = endpoint.stream_window;
                let handshake = Handshake(Box::pin(async move {
                    quic::accept(incoming, handshake_deadline, &tls, window).await
                }));
                on_connection(handshake, remote, TransportKind::Quic, ticket);
            }
        };
        let shed_log = crate::throttle::Throttle::new(tcp::ACCEPT_ERROR_LOG_INTERVAL);
        let tcp_loop = tcp::accept_until(
            &tcp,
            stop,
            |socket, remote| {
                // Under a flood an agent's task may run long after its ClientHello has come: the
                // admission looks at the socket itself before it takes it for a silent one.
                let first = Arc::new(FirstBytes::watching(&socket));
                let Some(ticket) = admission.admit(remote, Arc::clone(&first)) else {
                    tcp::abort(socket);
                    return;
                };
                // Read at each accept: a reload may have replaced the certificate.
                let acceptor = endpoint.tcp_acceptor();
                let window = endpoint.stream_window;
                let handshake = Handshake(Box::pin(async move {
                    first_byte(&socket).await?;
                    first.record();
                    let accepted =
                        h2::accept(socket, remote, acceptor, window, handshake_deadline).await;
                    accepted.map(RelayConnection::from)
                }));
                on_connection(handshake, remote, TransportKind::Tcp, ticket);
            },
            |remote| {
                if let Some(left_out) = shed_log.admit(std::time::Instant::now()) {
                    tracing::warn!(
                        %remote,
                        left_out,
                        "agent connection refused: this relay has no file descriptor left (raise \
                         its open-file limit: LimitNOFILE, ulimit -n) (left_out: refusals since the \
                         last such line)"
                    );
                }
            },
        );
        tokio::join!(quic_loop, tcp_loop);
    }
}
