//! A stand-in for a network that may drop UDP in front of the relay's tunnel port.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// A gate in front of the relay's tunnel port, standing in for a network that may drop UDP:
/// one port number that forwards TCP always and UDP only while opened.
pub struct TunnelGate {
    /// The port agents dial (TCP and UDP).
    pub port: u16,
    relay: SocketAddr,
    udp: Option<tokio::task::JoinHandle<()>>,
}

impl TunnelGate {
    /// Starts forwarding TCP on a fresh port to `relay`; UDP is dropped (nothing listens).
    pub async fn tcp_only(relay: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(relay).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port, relay, udp: None }
    }

    /// Starts forwarding UDP too (one agent's datagrams to the relay and back).
    pub async fn open_udp(&mut self) {
        let front =
            tokio::net::UdpSocket::bind(("127.0.0.1", self.port)).await.expect("bind UDP gate");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        back.connect(self.relay).await.expect("connect");
        self.udp = Some(tokio::spawn(async move {
            let mut peer = None;
            let (mut from_agent, mut from_relay) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            loop {
                tokio::select! {
                    received = front.recv_from(&mut from_agent) => {
                        let Ok((n, agent)) = received else { break };
                        peer = Some(agent);
                        let _ = back.send(&from_agent[..n]).await;
                    }
                    received = back.recv(&mut from_relay) => {
                        let Ok(n) = received else { break };
                        if let Some(agent) = peer {
                            let _ = front.send_to(&from_relay[..n], agent).await;
                        }
                    }
                }
            }
        }));
    }
}

impl TunnelGate {
    /// Stops forwarding UDP: datagrams to the port go nowhere from now on.
    pub fn close_udp(&mut self) {
        if let Some(udp) = self.udp.take() {
            udp.abort();
        }
    }
}

impl Drop for TunnelGate {
    fn drop(&mut self) {
        if let Some(udp) = self.udp.take() {
            udp.abort();
        }
    }
}
