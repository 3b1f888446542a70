//! How a client is turned away before any byte of a destination reached it: a TLS client (its
//! first byte begins a handshake record) gets a fatal alert it prints — `access_denied` for the
//! ACL and the limits, `internal_error` when nothing on the far side could take it — and a
//! plain close; any other client a reset. And the count and flow-log line of a connection
//! refused before any agent was asked.

use std::net::SocketAddr;
use std::time::Duration;

use privlink_protocol::client_hello::{ACCESS_DENIED_ALERT, INTERNAL_ERROR_ALERT};
use privlink_protocol::destination::Destination;
use privlink_protocol::http_connect::{self, Status};
use privlink_protocol::message::OpenFailCode;
use privlink_transport::splice::{Origin, Outcome};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::EndpointSpec;
use crate::endpoint::Endpoint;
use crate::flow::Flow;

/// How long a client turned away is given to show it speaks TLS (its first byte), and then to
/// read the alert.
pub(crate) const ALERT_WAIT: Duration = Duration::from_secs(1);
/// Most bytes read (and dropped) from a refused client after its answer, so that the close does
/// not reset the answer away.
const DRAIN_AFTER_ANSWER: usize = 64 * 1024;

/// Turns away a client before any of its bytes reached a destination. One that speaks TLS —
/// its first byte, `first` when it was read already, else waited for up to [`ALERT_WAIT`],
/// begins a handshake record — gets the fatal `alert` and a plain close, so that curl or an
/// SDK prints a reason (`tlsv1 alert access denied`) rather than "connection reset"; any other
/// client gets the reset it always got.
pub(crate) async fn with_alert(mut socket: TcpStream, first: Option<u8>, alert: [u8; 7]) {
    let first = match first {
        Some(byte) => Some(byte),
        None => {
            let mut head = [0u8; 1];
            match tokio::time::timeout(ALERT_WAIT, socket.peek(&mut head)).await {
                Ok(Ok(1)) => Some(head[0]),
                _ => None,
            }
        }
    };
    if first != Some(HANDSHAKE_RECORD) {
        privlink_transport::tcp::abort(socket);
        return;
    }
    answer_and_close(&mut socket, &alert, ALERT_WAIT).await;
}

/// Writes `answer` to a client being turned away and closes: a plain close (not the reset a
/// copy may have asked for), the write side first, then the client's remaining bytes read and
/// dropped (at most 64 KiB) so that a close with unread bytes does not reset the answer away
/// before the client reads it. All within `wait`.
pub(crate) async fn answer_and_close(socket: &mut TcpStream, answer: &[u8], wait: Duration) {
    privlink_transport::tcp::close_plainly(socket);
    let answered = async {
        socket.write_all(answer).await?;
        socket.shutdown().await?;
        let mut drained = 0;
        // On the heap: a 4 KiB array here would be part of every connection task that may
        // refuse, for the task's whole life (`-Zprint-type-sizes`: 4.4 KiB of 5.6).
        let mut sink = vec![0u8; 4096];
        while drained < DRAIN_AFTER_ANSWER {
            match socket.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(wait, answered).await;
}

/// The first byte of a TLS handshake record: a ClientHello begins with it.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The TLS alert a client that got no byte from a destination is turned away with, for an
/// outcome that is not the client's own doing: `access_denied` when the agent's allowlist
/// refused the destination, `internal_error` when nothing on the far side could take it.
pub(crate) fn alert_for(outcome: &Outcome) -> Option<[u8; 7]> {
    match outcome {
        Outcome::OpenFailed(failure) if failure.code == OpenFailCode::NotAllowed => {
            Some(ACCESS_DENIED_ALERT)
        }
        Outcome::NoAgent
        | Outcome::Unaudited
        | Outcome::Rejected(_)
        | Outcome::OpenFailed(_)
        | Outcome::Failed { origin: Origin::Agent | Origin::Relay | Origin::Destination, .. } => {
            Some(INTERNAL_ERROR_ALERT)
        }
        _ => None,
    }
}

/// Counts and flow-logs a connection turned away before any agent was asked.
pub(crate) fn before_open(
    endpoint: &Endpoint,
    spec: &EndpointSpec,
    (client, via): (SocketAddr, Option<SocketAddr>),
    started: Instant,
    outcome: &Outcome,
    requested: Option<&Destination>,
) {
    endpoint.metrics.connection_ended(&spec.name, outcome.label(), (0, 0));
    Flow {
        client,
        via,
        endpoint: spec,
        agent: "-",
        attempts: 0,
        agents_tried: "",
        duration: started.elapsed(),
        bytes_from_client: 0,
        bytes_to_client: 0,
        outcome,
        requested,
        connection: None,
    }
    .record(&endpoint.audit);
}

/// Turns away a connection that passed the policy but cannot be audited (`[audit] require`):
/// a CONNECT client is answered 503, a TLS client gets the `internal_error` alert.
pub(crate) async fn unaudited(mut socket: TcpStream, first: Option<u8>, connect: bool) {
    if connect {
        let answer = http_connect::refusal(Status::ServiceUnavailable, "the relay cannot audit it");
        answer_and_close(&mut socket, &answer, ALERT_WAIT).await;
    } else {
        with_alert(socket, first, INTERNAL_ERROR_ALERT).await;
    }
}
