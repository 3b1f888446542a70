//! Small destination servers and client helpers the end-to-end tests share: echo servers,
//! connecting from a chosen source address, telling a refused connection from a served one,
//! random payloads and their digests.

use std::net::SocketAddr;

use aws_lc_rs::rand::SecureRandom as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// The allow rule that admits exactly `addr`.
pub fn rule_for(addr: SocketAddr) -> String {
    addr.to_string()
}

/// A TCP echo server; each connection echoes until EOF, then closes its write side.
pub async fn echo_server() -> SocketAddr {
    let listener =
        privlink_transport::tcp::listen("127.0.0.1:0".parse().expect("addr")).expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A server that reads until EOF and only then answers with the SHA-256 of what it read.
pub async fn reply_after_eof_server() -> SocketAddr {
    let listener =
        privlink_transport::tcp::listen("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if socket.read_to_end(&mut got).await.is_ok() {
                    let _ = socket.write_all(&sha256(&got)).await;
                    let _ = socket.shutdown().await;
                }
            });
        }
    });
    addr
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes).expect("random");
    bytes
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

pub use privlink_protocol::token::hex;

/// Sends `payload` through `socket` while reading everything back; returns what came back.
pub async fn echo_round_trip(socket: TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = socket.into_split();
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.expect("write payload");
        w.shutdown().await.expect("shutdown write");
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.expect("read echo");
    writer.await.expect("writer");
    back
}

/// Connects from a chosen loopback source address.
pub async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source"))?;
    socket.connect(to).await
}

/// True when the relay closed the connection without forwarding: the connect itself is reset,
/// or the first read sees EOF or a reset before any echo.
pub async fn is_refused(connected: std::io::Result<TcpStream>) -> bool {
    let Ok(mut socket) = connected else {
        return true;
    };
    let _ = socket.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(WAIT, socket.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("connection neither served nor refused within {WAIT:?}"),
    }
}

/// What a client of [`choosy_server`] asks for with its first byte.
pub mod ask {
    /// Send the download (its length is the server's) and close.
    pub const DOWNLOAD: u8 = b'd';
    /// Never read again: an upload to this connection backs up.
    pub const SINK: u8 = b's';
    /// Read to EOF, then answer the SHA-256 of what was read.
    pub const DIGEST: u8 = b'r';
}

/// A destination whose behaviour each connection picks with its first byte (see [`ask`]).
#[derive(Debug)]
pub struct ChoosyServer {
    pub addr: SocketAddr,
    /// Download bytes written so far, over every connection.
    pub sent: tokio::sync::watch::Receiver<u64>,
}

/// Starts a [`ChoosyServer`] whose downloads are `download_len` bytes.
pub async fn choosy_server(download_len: usize) -> ChoosyServer {
    let listener =
        privlink_transport::tcp::listen("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (sent_tx, sent) = tokio::sync::watch::channel(0u64);
    let sent_tx = std::sync::Arc::new(sent_tx);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let sent_tx = std::sync::Arc::clone(&sent_tx);
            tokio::spawn(async move {
                let mut choice = [0u8; 1];
                if socket.read_exact(&mut choice).await.is_err() {
                    return;
                }
                match choice[0] {
                    ask::DOWNLOAD => {
                        let chunk = vec![0x5a; 64 * 1024];
                        let mut left = download_len;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            if socket.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n;
                            sent_tx.send_modify(|sent| *sent += n as u64);
                        }
                        let _ = socket.shutdown().await;
                    }
                    ask::SINK => {
                        // Hold the connection open without reading until the peer goes away.
                        let _ = socket.writable().await;
                        std::future::pending::<()>().await;
                    }
                    ask::DIGEST => {
                        let mut got = Vec::new();
                        if socket.read_to_end(&mut got).await.is_ok() {
                            let _ = socket.write_all(&sha256(&got)).await;
                            let _ = socket.shutdown().await;
                        }
                    }
                    _ => {}
                }
            });
        }
    });
    ChoosyServer { addr, sent }
}

/// Uploads `len` bytes (a multiple of `chunk`) to the load tool's backend through `endpoint`,
/// one `chunk` every `pause` — a transfer that lasts a while — and checks the backend counted
/// every byte.
pub async fn paced_upload(
    endpoint: SocketAddr,
    len: u64,
    chunk: usize,
    pause: std::time::Duration,
) -> Result<(), String> {
    let transfer = async {
        let mut conn = TcpStream::connect(endpoint).await?;
        conn.write_all(&[privlink_testbed::load::UPLOAD]).await?;
        let bytes = vec![0x42u8; chunk];
        for _ in 0..len / chunk as u64 {
            conn.write_all(&bytes).await?;
            tokio::time::sleep(pause).await;
        }
        conn.shutdown().await?;
        conn.read_u64().await
    };
    match tokio::time::timeout(WAIT * 4, transfer).await {
        Ok(Ok(count)) if count == len => Ok(()),
        Ok(Ok(count)) => Err(format!("the backend counted {count} of {len} bytes")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the transfer did not end".to_owned()),
    }
}

/// The load tool's backend on loopback (plain, and TLS for clients that start a handshake),
/// served until the token is cancelled: its address as a destination string, the token, and
/// the TLS settings its clients use.
pub async fn load_backend()
-> (String, tokio_util::sync::CancellationToken, privlink_testbed::load::LoadTls) {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let destination = backend.local_addr().expect("addr").to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let tls = privlink_testbed::load::LoadTls::new(LOAD_BACKEND_NAME);
    tokio::spawn(privlink_testbed::load::serve_backend_tls(
        backend,
        stop.clone(),
        Some(std::sync::Arc::clone(&tls.server)),
    ));
    (destination, stop, tls)
}

/// The name on the load backend's certificate, which its TLS clients ask for.
pub const LOAD_BACKEND_NAME: &str = "backend.privlink.test";
