//! Small TCP helpers both ends need.

use std::time::Duration;

use tokio::net::TcpStream;

/// Closes a TCP connection with a reset (RST) instead of a FIN, so the peer learns at once
/// that the connection was refused or aborted rather than finished.
///
/// `SO_LINGER` with a zero timeout makes `close` send RST and return immediately (it is the
/// non-zero timeout that would block the thread on drop, which is why tokio deprecates its own
/// setter; socket2 sets the option without that concern).
pub fn abort(socket: TcpStream) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    drop(socket);
}
