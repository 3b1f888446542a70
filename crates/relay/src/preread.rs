//! Reading what comes before a client's own bytes, before an agent is asked: the PROXY header a
//! trusted load balancer puts first ([`proxy_header`]), and the TLS ClientHello of a client of
//! an endpoint that serves only some server names, or of a shared listener ([`server_name`]).
//! Bytes go through protocol's sans-IO readers within a deadline and a size bound; what follows
//! the header, and the ClientHello itself, are kept whole to be forwarded untouched. A client
//! refused for its name gets TLS's `unrecognized_name` alert (a plain close when it did not
//! speak TLS) and nothing else.

use std::time::Duration;

use privlink_protocol::client_hello::{
    MAX_CLIENT_HELLO, NotRoutable, Preread, ServerNameReader, UNRECOGNIZED_NAME_ALERT,
};
use privlink_protocol::proxy_header::{self as proxy, ProxyHeader, ProxyParse};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::refuse;

/// Why a connection's ClientHello could not be read.
#[derive(Debug)]
pub(crate) enum Unread {
    /// Its first bytes are not a routable ClientHello.
    NotRoutable(NotRoutable),
    /// No whole ClientHello within the deadline.
    Timeout(Duration),
    /// The client closed (or reset) before a whole ClientHello.
    Closed,
    /// The relay is shutting down.
    Cancelled,
}

/// What was read: every byte (to forward), the server name the ClientHello asks for, and
/// whether the first byte was a TLS record's.
pub(crate) type Read = (Vec<u8>, Option<String>);

/// Reads until `socket` has sent a whole ClientHello, within `timeout`, unless `cancel` fires;
/// `read` are its bytes read already (after a PROXY header, say).
pub(crate) async fn server_name(
    socket: &mut TcpStream,
    read: Vec<u8>,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Read, (Vec<u8>, Unread)> {
    let mut reader = ServerNameReader::new();
    match reader.feed(&read) {
        Preread::NeedMore => {}
        Preread::ClientHello { server_name } => return Ok((read, server_name)),
        Preread::Refused(why) => return Err((read, Unread::NotRoutable(why))),
    }
    let mut bytes = read;
    bytes.reserve(2048);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let room = MAX_CLIENT_HELLO.saturating_sub(bytes.len()).max(1);
        let mut chunk = [0u8; 2048];
        let want = room.min(chunk.len());
        let read = tokio::select! {
            () = cancel.cancelled() => return Err((bytes, Unread::Cancelled)),
            read = tokio::time::timeout_at(deadline, socket.read(&mut chunk[..want])) => read,
        };
        let n = match read {
            Err(_) => return Err((bytes, Unread::Timeout(timeout))),
            Ok(Ok(0) | Err(_)) => return Err((bytes, Unread::Closed)),
            Ok(Ok(n)) => n,
        };
        bytes.extend_from_slice(&chunk[..n]);
        match reader.feed(&chunk[..n]) {
            Preread::NeedMore => {}
            Preread::ClientHello { server_name } => return Ok((bytes, server_name)),
            Preread::Refused(why) => return Err((bytes, Unread::NotRoutable(why))),
        }
    }
}

/// Reads the PROXY header a trusted load balancer puts before a connection, within `timeout`:
/// the header and the bytes read after it (the client's own). An error says why there is none
/// (for the log).
pub(crate) async fn proxy_header(
    socket: &mut TcpStream,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(ProxyHeader, Vec<u8>), String> {
    let mut bytes = Vec::with_capacity(256);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match proxy::parse(&bytes) {
            ProxyParse::Header(header) => return Ok((header, bytes.split_off(header.len))),
            ProxyParse::NotProxy => {
                return Err("a trusted source's connection without a PROXY header".to_owned());
            }
            ProxyParse::Invalid(why) => return Err(why.to_owned()),
            ProxyParse::NeedMore => {}
        }
        if bytes.len() >= proxy::MAX_V2 {
            return Err("a PROXY header over its bound".to_owned());
        }
        let mut chunk = [0u8; 512];
        let want = (proxy::MAX_V2 - bytes.len()).min(chunk.len());
        let read = tokio::select! {
            () = cancel.cancelled() => return Err("the relay is shutting down".to_owned()),
            read = tokio::time::timeout_at(deadline, socket.read(&mut chunk[..want])) => read,
        };
        match read {
            Err(_) => return Err(format!("no whole PROXY header within {timeout:?}")),
            Ok(Ok(0) | Err(_)) => return Err("closed before its PROXY header".to_owned()),
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether `bytes` (a connection's first) begin with a PROXY header's signature, whole or in
/// part: from a source not trusted to send one, that is a forgery.
pub(crate) fn looks_like_proxy_header(bytes: &[u8]) -> bool {
    !bytes.is_empty() && proxy::parse(bytes) != ProxyParse::NotProxy
}

/// Turns away a client whose ClientHello `read` found (or did not) a name the endpoint serves:
/// the `unrecognized_name` alert to one that spoke TLS, answered and closed as every refusal is
/// ([`refuse::answer_and_close`]), a plain close to any other. Returns what the flow log says
/// it asked for.
pub(crate) async fn refuse(mut socket: TcpStream, read: Result<Read, (Vec<u8>, Unread)>) -> String {
    let (spoke_tls, asked) = match read {
        Ok((_, Some(name))) => {
            (true, format!("the client asked for {name}, a name this endpoint does not serve"))
        }
        Ok((_, None)) => (true, "the client's ClientHello names no server".to_owned()),
        Err((_, Unread::NotRoutable(NotRoutable::NotTls))) => {
            (false, "the client did not begin with a TLS ClientHello".to_owned())
        }
        Err((bytes, Unread::NotRoutable(why))) => (bytes.first() == Some(&0x16), why.to_string()),
        Err((bytes, Unread::Timeout(after))) => {
            (bytes.first() == Some(&0x16), format!("no whole ClientHello within {after:?}"))
        }
        Err((_, Unread::Closed)) => (false, "the client closed before its ClientHello".to_owned()),
        Err((_, Unread::Cancelled)) => (false, "the relay is shutting down".to_owned()),
    };
    if spoke_tls {
        refuse::answer_and_close(&mut socket, &UNRECOGNIZED_NAME_ALERT, refuse::ALERT_WAIT).await;
    }
    asked
}
