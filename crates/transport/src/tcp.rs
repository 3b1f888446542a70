//! TCP helpers both ends need: listening with a backlog sized for bursts, the accept loop,
//! and closing with a reset.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::throttle::Throttle;

/// Closes a TCP connection with a reset (RST) instead of a FIN, so the peer learns at once
/// that the connection was refused or aborted rather than finished.
///
/// `SO_LINGER` with a zero timeout makes `close` send RST and return immediately (it is the
/// non-zero timeout that would block the thread on drop, which is why tokio deprecates its own
/// setter; socket2 sets the option without that concern).
pub fn abort(socket: TcpStream) {
    reset_on_close(&socket);
    drop(socket);
}

/// Makes the eventual close of `socket` a reset (see [`abort`]), for code that does not own it.
pub fn reset_on_close(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Undoes [`reset_on_close`]: the close of `socket` is a plain FIN again, after whatever is
/// still to be written (an answer a client must read).
pub fn close_plainly(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(None);
}

/// Listen backlog for endpoint and tunnel listeners. `TcpListener::bind` uses std's 128, which
/// a burst of client connections overflows (the kernel then drops or resets connections the
/// relay never sees); the kernel caps this at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds a TCP listener with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (so a restarted relay can
/// bind its ports again at once).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections on `listener` until `stop` is cancelled, handing each to `on_accept`,
/// which should spawn the connection's work rather than await it: a stalled peer must never
/// block the loop. Accept errors (EMFILE and friends) are logged — at most once per
/// [`ACCEPT_ERROR_LOG_INTERVAL`], with a count of the others — and the loop pauses briefly, so
/// that it neither spins nor stops serving.
pub async fn accept_until(
    listener: &tokio::net::TcpListener,
    stop: &CancellationToken,
    mut on_accept: impl FnMut(TcpStream, std::net::SocketAddr),
) {
    let throttle = Throttle::new(ACCEPT_ERROR_LOG_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => on_accept(socket, peer),
                Err(e) => {
                    if let Some(left_out) = throttle.admit(std::time::Instant::now()) {
                        tracing::warn!(
                            left_out,
                            "accept failed: {e} (left_out: failures since the last such line)"
                        );
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// Longest silence between two "accept failed" lines while accepts keep failing.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
