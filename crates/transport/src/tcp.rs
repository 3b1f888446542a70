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
/// block the loop.
///
/// When the process has no file descriptor left (EMFILE, ENFILE), a waiting connection would
/// sit in the backlog until its client gives up, and the loop would spin on it. Instead the
/// loop frees the one descriptor the process keeps in reserve, accepts the connection with it,
/// closes it at once with a reset, hands its address to `on_shed` (to count and log why) and
/// takes the reserve again: clients learn at once, connections already open are untouched, and
/// service is back as soon as descriptors free. Other accept errors are logged — at most once
/// per [`ACCEPT_ERROR_LOG_INTERVAL`], with a count of the others — and the loop pauses
/// briefly, so that it neither spins nor stops serving.
pub async fn accept_until(
    listener: &tokio::net::TcpListener,
    stop: &CancellationToken,
    mut on_accept: impl FnMut(TcpStream, std::net::SocketAddr),
    mut on_shed: impl FnMut(std::net::SocketAddr),
) {
    let throttle = Throttle::new(ACCEPT_ERROR_LOG_INTERVAL);
    keep_reserve();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => on_accept(socket, peer),
                Err(e) => {
                    if out_of_descriptors(&e) {
                        if let Some(peer) = shed(listener).await {
                            on_shed(peer);
                            continue;
                        }
                    }
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

/// The descriptor kept for [`shed`]: `/dev/null`, opened while descriptors are plentiful.
static RESERVE: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// Opens the reserve descriptor if it is not held (at start, and after each use).
fn keep_reserve() {
    let mut reserve = RESERVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if reserve.is_none() {
        *reserve = std::fs::File::open("/dev/null").ok();
    }
}

/// EMFILE (this process's limit) or ENFILE (the system's): 24 and 23 on Linux and the BSDs;
/// std has no `ErrorKind` for them.
fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

/// With no descriptor left: frees the reserve, accepts the waiting connection with it and
/// resets it at once; its address, or `None` when there was no reserve to free (it is taken
/// again as soon as a descriptor is free) or another thread took the freed descriptor first.
async fn shed(listener: &tokio::net::TcpListener) -> Option<std::net::SocketAddr> {
    let reserve = RESERVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    let Some(freed) = reserve else {
        keep_reserve();
        return None;
    };
    drop(freed);
    // The connection that failed is still waiting: this returns at once, and the bound only
    // covers a client that left in between.
    let accepted = tokio::time::timeout(ACCEPT_ERROR_PAUSE, listener.accept()).await;
    let shed = match accepted {
        Ok(Ok((socket, peer))) => {
            abort(socket);
            Some(peer)
        }
        _ => None,
    };
    keep_reserve();
    shed
}

/// Longest silence between two "accept failed" lines while accepts keep failing.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
