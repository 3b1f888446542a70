//! HTTP CONNECT (RFC 9110 §9.3.6), both ways a tunnel meets it, sans-IO: the request head a
//! client sends an `http-connect` endpoint ([`parse_request`]) and the answers the relay gives
//! it ([`ESTABLISHED`], [`refusal`]); and, for an agent whose way out is a corporate proxy, the
//! request it sends that proxy ([`encode_request`]) and the proxy's answer ([`parse_response`]).
//!
//! Heads are parsed by `httparse` (a small, fuzzed, allocation-free HTTP/1 parser) within
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields; what this module adds is what CONNECT means:
//! the authority-form target as a [`Destination`] (names, absolute names, bracketed IPv6),
//! `Proxy-Authorization: Basic`, and the status a refusal carries.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::destination::Destination;
use crate::text;
use crate::token::TokenDigest;

/// Longest request (or response) head accepted, the blank line included.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields in a head.
pub const MAX_HEADERS: usize = 64;
/// The answer that opens the tunnel: the client's next byte is the destination's.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
/// The realm a `407` names in its `Proxy-Authenticate` challenge.
pub const REALM: &str = "privlink";

/// Basic credentials (`user:password` as bytes): parsed from a client's `Proxy-Authorization`
/// or configured for the proxy an agent crosses. Never shown: `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials(Vec<u8>);

impl BasicCredentials {
    /// `user:password`, as bytes.
    pub fn new(user_password: impl Into<Vec<u8>>) -> Self {
        Self(user_password.into())
    }

    /// The user name (before the first `:`), safe to log.
    pub fn user(&self) -> String {
        let user = self.0.split(|&b| b == b':').next().unwrap_or_default();
        text::loggable(&String::from_utf8_lossy(user)).into_owned()
    }

    /// Whether their SHA-256 digest is one of `digests` (constant time, every digest compared).
    pub fn matches_any(&self, digests: &[TokenDigest]) -> bool {
        TokenDigest::any_matches(digests, &self.0)
    }

    /// The `Proxy-Authorization` value that carries them.
    fn header_value(&self) -> String {
        format!("Basic {}", BASE64.encode(&self.0))
    }
}

impl fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BasicCredentials(<redacted>)")
    }
}

/// What a request's `Proxy-Authorization` held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// No such field.
    Missing,
    /// `Basic` with well-formed credentials.
    Basic(BasicCredentials),
    /// Another scheme, or `Basic` with a value that does not decode: never accepted.
    Unusable,
}

/// A CONNECT request head, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where the client asks to go.
    pub target: Destination,
    /// Its credentials.
    pub authorization: Authorization,
    /// Length of the head, blank line included: bytes after it are the client's first bytes
    /// for the destination (a client may send its ClientHello without waiting for the 200).
    pub head_len: usize,
}

/// The statuses a CONNECT endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// 400: the head is malformed, too long, or its target is not `host:port`.
    BadRequest,
    /// 403: the target is not one the endpoint (or the agent) allows.
    Forbidden,
    /// 405: a method other than CONNECT.
    MethodNotAllowed,
    /// 407: credentials missing or wrong.
    ProxyAuthenticationRequired,
    /// 502: the destination refused, did not resolve, or could not be reached.
    BadGateway,
    /// 503: no agent can take the connection now (none connected, or all at their budget).
    ServiceUnavailable,
    /// 504: the destination did not answer in time.
    GatewayTimeout,
}

impl Status {
    /// The status code.
    pub fn code(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Forbidden => 403,
            Self::MethodNotAllowed => 405,
            Self::ProxyAuthenticationRequired => 407,
            Self::BadGateway => 502,
            Self::ServiceUnavailable => 503,
            Self::GatewayTimeout => 504,
        }
    }

    /// The reason phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            Self::BadRequest => "Bad Request",
            Self::Forbidden => "Forbidden",
            Self::MethodNotAllowed => "Method Not Allowed",
            Self::ProxyAuthenticationRequired => "Proxy Authentication Required",
            Self::BadGateway => "Bad Gateway",
            Self::ServiceUnavailable => "Service Unavailable",
            Self::GatewayTimeout => "Gateway Timeout",
        }
    }
}

/// Why a request head is refused before anything else is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No blank line within [`MAX_HEAD`] bytes.
    #[error("request head longer than {MAX_HEAD} bytes")]
    TooLong,
    /// Not an HTTP/1 request head.
    #[error("malformed request head: {0}")]
    Malformed(String),
    /// A method other than CONNECT (`GET http://…` is not proxied here).
    #[error("method `{0}` is not CONNECT: this endpoint only opens tunnels")]
    NotConnect(String),
    /// The target is not `host:port`.
    #[error("CONNECT target `{0}` is not host:port")]
    BadTarget(String),
}

impl RequestError {
    /// The status the client is answered with.
    pub fn status(&self) -> Status {
        match self {
            Self::NotConnect(_) => Status::MethodNotAllowed,
            _ => Status::BadRequest,
        }
    }
}

/// Reads a CONNECT request head from the bytes a client sent so far: `Ok(None)` while it is
/// incomplete (read more), the request once the blank line is in, an error as soon as the
/// bytes cannot become an acceptable head.
pub fn parse_request(buf: &[u8]) -> Result<Option<ConnectRequest>, RequestError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(RequestError::TooLong),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(RequestError::TooLong);
        }
        Ok(httparse::Status::Partial) => {
            // A method already known is judged at once: a `GET` need not send its whole head
            // to learn it gets a 405.
            if let Some(method) = request.method.filter(|m| *m != "CONNECT") {
                return Err(RequestError::NotConnect(text::loggable(method).into_owned()));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::Malformed(format!("more than {MAX_HEADERS} header fields")));
        }
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    let method = request.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(RequestError::NotConnect(text::loggable(method).into_owned()));
    }
    let written = request.path.unwrap_or_default();
    let target: Destination = written
        .parse()
        .map_err(|_| RequestError::BadTarget(text::loggable(written).into_owned()))?;
    let mut authorization = Authorization::Missing;
    for field in request.headers.iter() {
        if field.name.eq_ignore_ascii_case("proxy-authorization") {
            if authorization != Authorization::Missing {
                return Err(RequestError::Malformed("Proxy-Authorization given twice".into()));
            }
            authorization = basic_credentials(field.value);
        }
    }
    Ok(Some(ConnectRequest { target, authorization, head_len }))
}

/// A `Proxy-Authorization` value: `Basic <base64 of user:password>` (scheme case-insensitive).
fn basic_credentials(value: &[u8]) -> Authorization {
    let value = value.trim_ascii();
    let Some(split) = value.iter().position(|&b| b == b' ') else { return Authorization::Unusable };
    let (scheme, encoded) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return Authorization::Unusable;
    }
    match BASE64.decode(encoded.trim_ascii()) {
        Ok(decoded) if decoded.contains(&b':') => {
            Authorization::Basic(BasicCredentials::new(decoded))
        }
        _ => Authorization::Unusable,
    }
}

/// A refusal as the client reads it: the status line, a one-line plain-text reason as the
/// body, and `Connection: close`; a 407 carries the `Basic` challenge, a 405 the one method
/// allowed. The reason is made one printable line whatever it holds.
pub fn refusal(status: Status, reason: &str) -> Vec<u8> {
    let mut body = text::loggable(reason).into_owned();
    body.retain(|c| c != '\r' && c != '\n');
    body.push('\n');
    let extra = match status {
        Status::ProxyAuthenticationRequired => {
            format!("Proxy-Authenticate: Basic realm=\"{REALM}\", charset=\"UTF-8\"\r\n")
        }
        Status::MethodNotAllowed => "Allow: CONNECT\r\n".to_owned(),
        _ => String::new(),
    };
    format!(
        "HTTP/1.1 {} {}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status.code(),
        status.phrase(),
        body.len()
    )
    .into_bytes()
}

/// The request an agent sends the proxy it must cross: `CONNECT authority`, with `Host` and,
/// when it has credentials, `Proxy-Authorization: Basic`. `authority` is `host:port` as a
/// [`Destination`] prints it.
pub fn encode_request(authority: &Destination, credentials: Option<&BasicCredentials>) -> Vec<u8> {
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(credentials) = credentials {
        head.push_str(&format!("Proxy-Authorization: {}\r\n", credentials.header_value()));
    }
    head.push_str(concat!("User-Agent: privlink/", env!("CARGO_PKG_VERSION"), "\r\n\r\n"));
    head.into_bytes()
}

/// A proxy's answer to a CONNECT, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResponse {
    /// The status code.
    pub code: u16,
    /// The status line after the code (loggable; may be empty).
    pub reason: String,
    /// Length of the head: bytes after it already belong to the tunnel.
    pub head_len: usize,
}

/// Why a proxy's answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// No blank line within [`MAX_HEAD`] bytes.
    #[error("the proxy's answer has a head longer than {MAX_HEAD} bytes")]
    TooLong,
    /// Not an HTTP/1 response.
    #[error("the proxy's answer is not HTTP: {0}")]
    Malformed(String),
}

/// Reads a proxy's answer to a CONNECT from the bytes received so far: `Ok(None)` while the
/// head is incomplete.
pub fn parse_response(buf: &[u8]) -> Result<Option<ProxyResponse>, ResponseError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => Ok(Some(ProxyResponse {
            code: response.code.unwrap_or_default(),
            reason: text::loggable(response.reason.unwrap_or_default()).into_owned(),
            head_len: len,
        })),
        Ok(httparse::Status::Complete(_)) => Err(ResponseError::TooLong),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(ResponseError::TooLong),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(ResponseError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(head: &str) -> ConnectRequest {
        parse_request(head.as_bytes()).expect("valid").expect("complete")
    }

    #[test]
    fn reads_a_connect_head_and_keeps_the_bytes_after_it() {
        let head = "CONNECT Contoso-KV.vault.azure.net:443 HTTP/1.1\r\n\
                    Host: contoso-kv.vault.azure.net:443\r\n\
                    Proxy-Authorization: basic dXNlcjpwYXNz\r\n\r\n";
        let mut bytes = head.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x16\x03\x01 ClientHello");
        let request = parse_request(&bytes).expect("valid").expect("complete");
        assert_eq!(request.target.to_string(), "contoso-kv.vault.azure.net:443");
        assert_eq!(request.head_len, head.len());
        assert_eq!(&bytes[request.head_len..], b"\x16\x03\x01 ClientHello");
        let Authorization::Basic(credentials) = request.authorization else { panic!("Basic") };
        assert_eq!(credentials, BasicCredentials::new("user:pass"));
        assert_eq!(credentials.user(), "user");
        assert_eq!(format!("{credentials:?}"), "BasicCredentials(<redacted>)");
    }

    #[test]
    fn targets_may_be_absolute_names_and_bracketed_ipv6() {
        let absolute = complete("CONNECT kv.vault.azure.net.:443 HTTP/1.1\r\n\r\n");
        assert_eq!(absolute.target.to_string(), "kv.vault.azure.net.:443");
        let v6 = complete("CONNECT [2001:db8::4]:8443 HTTP/1.0\r\n\r\n");
        assert_eq!(v6.target.to_string(), "[2001:db8::4]:8443");
        assert_eq!(v6.authorization, Authorization::Missing);
    }

    #[test]
    fn incomplete_heads_ask_for_more_until_the_bound() {
        let head = b"CONNECT kv.vault.azure.net:443 HTTP/1.1\r\nHost: kv\r\n\r\n";
        for cut in 0..head.len() {
            assert_eq!(parse_request(&head[..cut]), Ok(None), "cut at {cut}");
        }
        let mut long = b"CONNECT kv.vault.azure.net:443 HTTP/1.1\r\n".to_vec();
        while long.len() < MAX_HEAD {
            long.extend_from_slice(format!("X-Padding: {}\r\n", "a".repeat(1000)).as_bytes());
        }
        assert_eq!(parse_request(&long), Err(RequestError::TooLong));
    }

    #[test]
    fn other_methods_get_405_and_garbage_400() {
        let get = parse_request(b"GET http://kv.vault.azure.net/ HTTP/1.1\r\n").expect_err("GET");
        assert_eq!(get.status(), Status::MethodNotAllowed);
        let lower = parse_request(b"connect kv:443 HTTP/1.1\r\n\r\n").expect_err("lowercase");
        assert_eq!(lower.status(), Status::MethodNotAllowed, "methods are case-sensitive");
        for bad in [
            &b"CONNECT kv.vault.azure.net HTTP/1.1\r\n\r\n"[..],
            b"CONNECT http://kv:443/ HTTP/1.1\r\n\r\n",
            b"CONNECT 2001:db8::4:443 HTTP/1.1\r\n\r\n",
            b"CONNECT user@kv:443 HTTP/1.1\r\n\r\n",
            b"CONNECT kv:443 HTTP/2\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"CONNECT kv:443 HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\
              Proxy-Authorization: Basic eDp5\r\n\r\n",
        ] {
            let refused = parse_request(bad).expect_err("refused");
            assert_eq!(refused.status(), Status::BadRequest, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn unusable_credentials_are_told_apart_from_missing_ones() {
        for value in ["Bearer abc", "Basic !!!", "Basic dXNlcg==", "Basic", "NTLM TlRMTVNTUAAB"] {
            let head = format!("CONNECT kv:443 HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n");
            assert_eq!(complete(&head).authorization, Authorization::Unusable, "{value}");
        }
    }

    #[test]
    fn credentials_match_their_digest_only() {
        let credentials = BasicCredentials::new("ops:s3cret");
        let digests = [TokenDigest::of(b"other:x"), TokenDigest::of(b"ops:s3cret")];
        assert!(credentials.matches_any(&digests));
        assert!(!BasicCredentials::new("ops:s3cre").matches_any(&digests));
        assert!(!credentials.matches_any(&[]));
    }

    #[test]
    fn refusals_are_one_line_with_their_challenge() {
        let text = String::from_utf8(refusal(
            Status::ProxyAuthenticationRequired,
            "credentials\r\nX-Injected: yes",
        ))
        .expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 407 Proxy Authentication Required\r\n"), "{text}");
        assert!(text.contains("\r\nProxy-Authenticate: Basic realm=\"privlink\""), "{text}");
        assert!(!text.contains("\r\nX-Injected"), "the reason cannot add a header: {text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{text}");
        assert_eq!(body.lines().count(), 1, "{body}");
        let parsed = parse_response(text.as_bytes()).expect("valid").expect("complete");
        assert_eq!((parsed.code, parsed.reason.as_str()), (407, "Proxy Authentication Required"));
    }

    #[test]
    fn the_agents_request_and_a_proxys_answer() {
        let target: Destination = "relay.example.com:7443".parse().expect("destination");
        let credentials = BasicCredentials::new("agent:pw");
        let request = encode_request(&target, Some(&credentials));
        let text = String::from_utf8(request.clone()).expect("utf-8");
        assert!(text.starts_with("CONNECT relay.example.com:7443 HTTP/1.1\r\n"), "{text}");
        let read = parse_request(&request).expect("valid").expect("complete");
        assert_eq!(read.target, target);
        assert_eq!(read.authorization, Authorization::Basic(credentials));

        let answer = b"HTTP/1.1 200 Connection established\r\nVia: tinyproxy\r\n\r\n\x16\x03";
        let parsed = parse_response(answer).expect("valid").expect("complete");
        assert_eq!(parsed.code, 200);
        assert_eq!(&answer[parsed.head_len..], b"\x16\x03");
        assert_eq!(parse_response(&answer[..20]), Ok(None));
        assert!(parse_response(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").is_err());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any bytes: a verdict without a panic, and never a head beyond the bound.
        #[test]
        fn any_bytes_get_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..10_000)) {
            if let Ok(Some(request)) = parse_request(&bytes) {
                prop_assert!(request.head_len <= MAX_HEAD && request.head_len <= bytes.len());
            }
            let _ = parse_response(&bytes);
        }

        /// Every well-formed CONNECT to a name and port is read back as written, with the
        /// bytes after it untouched, however the head is cut.
        #[test]
        fn written_requests_read_back(
            labels in proptest::collection::vec("[a-z0-9]{1,12}", 1..5),
            port in 1u16..,
            user in "[a-zA-Z0-9]{0,16}",
            password in "[ -~]{0,32}",
            cut in 0usize..200,
        ) {
            let target: Destination = format!("{}:{port}", labels.join(".")).parse().expect("valid");
            let credentials = BasicCredentials::new(format!("{user}:{password}"));
            let mut bytes = encode_request(&target, Some(&credentials));
            let head_len = bytes.len();
            bytes.extend_from_slice(b"early");
            let cut = cut.min(head_len - 1);
            prop_assert_eq!(parse_request(&bytes[..cut]), Ok(None));
            let read = parse_request(&bytes).expect("valid").expect("complete");
            prop_assert_eq!(read.target, target);
            prop_assert_eq!(read.head_len, head_len);
            prop_assert_eq!(read.authorization, Authorization::Basic(credentials));
        }
    }
}
