//! Crossing an HTTP proxy on the way to a relay: on a TCP connection to the proxy, `CONNECT
//! relay:port` (with Basic credentials when the agent has some), the proxy's answer read
//! within [`MAX_HEAD`](http_connect::MAX_HEAD) bytes, and then the connection is the relay's —
//! TLS starts on it as on a direct one. Every failure is named as the proxy's, with its status
//! line and what to change, never as a relay or TLS failure; credentials appear nowhere.

use std::fmt;

use privlink_protocol::destination::Destination;
use privlink_protocol::http_connect::{self, BasicCredentials, ResponseError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The proxy hop of a tunnel connection: which proxy (as configured, for messages), the relay
/// it is asked to reach, and the credentials it gets.
#[derive(Clone)]
pub struct ProxyHop {
    /// The proxy, `host:port` as configured.
    pub proxy: String,
    /// Where the proxy is asked to connect: the relay, by the name the agent dials.
    pub target: Destination,
    /// Basic credentials for the proxy.
    pub credentials: Option<BasicCredentials>,
}

impl fmt::Debug for ProxyHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyHop")
            .field("proxy", &self.proxy)
            .field("target", &self.target)
            .field("credentials", &self.credentials.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why the proxy did not open the way to the relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The TCP connection to the proxy failed.
    #[error("the HTTP proxy {proxy} cannot be reached: {reason}")]
    Unreachable {
        /// The proxy.
        proxy: String,
        /// The socket error.
        reason: String,
    },
    /// The proxy answered the CONNECT with something other than 2xx.
    #[error("{}", refused_message(.proxy, .target, *.code, .reason, *.credentials_sent))]
    Refused {
        /// The proxy.
        proxy: String,
        /// The relay it was asked for.
        target: String,
        /// The status code.
        code: u16,
        /// The proxy's reason phrase.
        reason: String,
        /// Whether credentials were sent.
        credentials_sent: bool,
    },
    /// The proxy's answer was not HTTP, or it closed before answering.
    #[error("the HTTP proxy {proxy} did not answer the CONNECT properly: {reason}")]
    Malformed {
        /// The proxy.
        proxy: String,
        /// What was wrong.
        reason: String,
    },
}

/// A refusal as an operator reads it: the status line and what to change.
fn refused_message(proxy: &str, target: &str, code: u16, reason: &str, sent: bool) -> String {
    let head = format!("the HTTP proxy {proxy} answered CONNECT {target} with {code} {reason}");
    let hint = match (code, sent) {
        // 407 is the standard answer; some proxies (tinyproxy, for wrong credentials) say 401.
        (401 | 407, false) => " — the proxy wants credentials: put user:password in \
                         proxy_credentials_file (or in the proxy URL)"
            .to_owned(),
        (401 | 407, true) => " — the proxy does not accept the credentials given: check \
                        proxy_credentials_file (or the user:password in the proxy URL)"
            .to_owned(),
        (403, _) => format!(
            " — the proxy refuses this destination: its operator must allow CONNECT to {target}"
        ),
        (502..=504, _) => {
            " — the proxy could not reach the relay (check the relay's address and that it runs)"
                .to_owned()
        }
        _ => String::new(),
    };
    head + &hint
}

/// Asks the proxy at the other end of `socket` to connect to `hop.target`, and waits for its
/// answer (the caller bounds the wait). On success the socket carries the relay's bytes.
pub async fn connect_through(socket: &mut TcpStream, hop: &ProxyHop) -> Result<(), ProxyError> {
    let malformed = |reason: String| ProxyError::Malformed { proxy: hop.proxy.clone(), reason };
    let request = http_connect::encode_request(&hop.target, hop.credentials.as_ref());
    socket.write_all(&request).await.map_err(|e| malformed(format!("sending CONNECT: {e}")))?;
    let mut answer = Vec::with_capacity(1024);
    let response = loop {
        match http_connect::parse_response(&answer) {
            Ok(Some(response)) => break response,
            Ok(None) => {}
            Err(e @ (ResponseError::TooLong | ResponseError::Malformed(_))) => {
                return Err(malformed(e.to_string()));
            }
        }
        let mut chunk = [0u8; 1024];
        match socket.read(&mut chunk).await {
            Ok(0) => return Err(malformed("it closed the connection before answering".into())),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(malformed(format!("reading its answer: {e}"))),
        }
    };
    if !(200..300).contains(&response.code) {
        return Err(ProxyError::Refused {
            proxy: hop.proxy.clone(),
            target: hop.target.to_string(),
            code: response.code,
            reason: response.reason,
            credentials_sent: hop.credentials.is_some(),
        });
    }
    if answer.len() > response.head_len {
        // TLS has not started: a relay never speaks first, so these bytes are the proxy's.
        return Err(malformed("it sent bytes after its 200, before the relay could speak".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A proxy that reads one request head and answers `answer`; returns the hop to it and
    /// the head it read.
    async fn proxy_answering(
        answer: &'static [u8],
        credentials: Option<BasicCredentials>,
    ) -> (ProxyHop, tokio::task::JoinHandle<Vec<u8>>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if socket.read(&mut byte).await.expect("read") == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            socket.write_all(answer).await.expect("answer");
            head
        });
        let hop = ProxyHop {
            proxy: addr.to_string(),
            target: "relay.example.com:7443".parse().expect("target"),
            credentials,
        };
        (hop, seen, TcpStream::connect(addr).await.expect("connect"))
    }

    #[tokio::test]
    async fn a_200_opens_the_way_and_the_request_carries_the_credentials() {
        let credentials = Some(BasicCredentials::new("agent:pw"));
        let (hop, seen, mut socket) =
            proxy_answering(b"HTTP/1.1 200 Connection established\r\n\r\n", credentials).await;
        connect_through(&mut socket, &hop).await.expect("open");
        let head = String::from_utf8(seen.await.expect("proxy")).expect("utf-8");
        assert!(head.starts_with("CONNECT relay.example.com:7443 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Proxy-Authorization: Basic YWdlbnQ6cHc=\r\n"), "{head}");
        assert!(!format!("{hop:?}").contains("pw"), "{hop:?}");
    }

    #[tokio::test]
    async fn refusals_are_the_proxys_and_name_what_to_set() {
        let (hop, _seen, mut socket) = proxy_answering(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
            None,
        )
        .await;
        let refused = connect_through(&mut socket, &hop).await.expect_err("407");
        let message = refused.to_string();
        assert!(message.contains("407 Proxy Authentication Required"), "{message}");
        assert!(message.contains("proxy_credentials_file"), "{message}");

        let (hop, _seen, mut socket) =
            proxy_answering(b"HTTP/1.0 403 Filtered\r\n\r\n", None).await;
        let message = connect_through(&mut socket, &hop).await.expect_err("403").to_string();
        assert!(message.contains("403 Filtered") && message.contains("refuses"), "{message}");

        let (hop, _seen, mut socket) = proxy_answering(b"SSH-2.0-OpenSSH\r\n\r\n", None).await;
        let refused = connect_through(&mut socket, &hop).await.expect_err("not HTTP");
        assert!(matches!(refused, ProxyError::Malformed { .. }), "{refused:?}");
    }
}
