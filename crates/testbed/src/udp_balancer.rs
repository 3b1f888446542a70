//! A small UDP load balancer, as a cloud's network load balancer or kube-proxy treats UDP:
//! each flow (a client address and port) is given a backend when its first datagram arrives —
//! round-robin over the backends — and keeps it for as long as it lives; datagrams are passed
//! through unchanged, each flow from an upstream socket of its own. HAProxy balances no UDP,
//! so this stands in for the QUIC half of a relay fleet's tunnel balancer in tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most flows kept at once; past it the stalest is forgotten.
const MAX_FLOWS: usize = 1024;
/// A flow with no datagram either way for this long is forgotten.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Largest datagram passed on.
const MAX_DATAGRAM: usize = 65_535;

/// A running balancer; dropping it stops it.
#[derive(Debug)]
pub struct UdpBalancer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for UdpBalancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One client flow: its upstream socket and when it last carried a datagram.
struct Flow {
    upstream: Arc<UdpSocket>,
    last: Instant,
    stop: CancellationToken,
}

impl UdpBalancer {
    /// Listens on `bind` and spreads flows over `backends`. Call it within a tokio runtime.
    pub async fn start(bind: SocketAddr, backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        assert!(!backends.is_empty(), "a balancer needs backends");
        let socket = Arc::new(UdpSocket::bind(bind).await?);
        let addr = socket.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(serve(socket, backends, stop.clone()));
        Ok(Self { addr, stop })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn serve(socket: Arc<UdpSocket>, backends: Vec<SocketAddr>, stop: CancellationToken) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut next = 0usize;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = tokio::select! {
            () = stop.cancelled() => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(_) => continue,
            },
        };
        let now = Instant::now();
        if !flows.contains_key(&client) {
            flows.retain(|_, flow| {
                let keep = now.duration_since(flow.last) < FLOW_IDLE;
                if !keep {
                    flow.stop.cancel();
                }
                keep
            });
            if flows.len() >= MAX_FLOWS {
                if let Some(stalest) = flows.iter().min_by_key(|(_, f)| f.last).map(|(a, _)| *a) {
                    if let Some(flow) = flows.remove(&stalest) {
                        flow.stop.cancel();
                    }
                }
            }
            let backend = backends[next % backends.len()];
            next += 1;
            let Ok(upstream) = open_upstream(backend).await else { continue };
            let upstream = Arc::new(upstream);
            let flow_stop = stop.child_token();
            tokio::spawn(pass_back(
                Arc::clone(&upstream),
                Arc::clone(&socket),
                client,
                flow_stop.clone(),
            ));
            flows.insert(client, Flow { upstream, last: now, stop: flow_stop });
        }
        if let Some(flow) = flows.get_mut(&client) {
            flow.last = now;
            let _ = flow.upstream.send(&buf[..len]).await;
        }
    }
    for flow in flows.values() {
        flow.stop.cancel();
    }
}

/// A socket connected to `backend`, from a port of its own.
async fn open_upstream(backend: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if backend.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream = UdpSocket::bind(bind).await?;
    upstream.connect(backend).await?;
    Ok(upstream)
}

/// Passes the backend's datagrams back to `client` from the balancer's address.
async fn pass_back(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = tokio::select! {
            () = stop.cancelled() => return,
            received = upstream.recv(&mut buf) => match received {
                Ok(len) => len,
                // An ICMP unreachable from a backend that is gone: keep the flow.
                Err(_) => continue,
            },
        };
        let _ = socket.send_to(&buf[..len], client).await;
    }
}
