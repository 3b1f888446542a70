//! An `http-connect` endpoint's client (an `HTTPS_PROXY` user): its CONNECT request head read
//! within the deadline and [`MAX_HEAD`](http_connect::MAX_HEAD), judged — credentials first
//! (nothing about the destinations is told to a client without them), then the target against
//! the endpoint's `destinations` — and answered: a refusal before any agent is asked, or, once
//! the agent has opened, `200 Connection established` (the open-reply gate writes it ahead of
//! the destination's first byte), or the status the agent's failure calls for. The bytes a
//! client sends right behind its head are kept and forwarded with the open.

use std::time::Duration;

use privlink_protocol::destination::Destination;
use privlink_protocol::http_connect::{self, Authorization, Status};
use privlink_protocol::message::OpenFailCode;
use privlink_transport::splice::{Origin, Outcome};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::ConnectPolicy;
use crate::refuse;

/// How long an answer may take to be written and the client's remaining bytes to be read (and
/// dropped) after it, so that closing does not reset the answer away.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// A request that passed: where it goes, the pattern that admitted it, and what the client
/// sent after its head.
#[derive(Debug)]
pub(crate) struct Requested {
    pub(crate) target: Destination,
    pub(crate) pattern: String,
    pub(crate) early: Vec<u8>,
}

/// A request turned away before an agent was asked: the answer it gets (none when the client
/// closed, was too slow, or the relay is stopping), why, and where it asked to go if that
/// was read.
#[derive(Debug)]
pub(crate) struct Turned {
    pub(crate) answer: Option<Status>,
    pub(crate) reason: String,
    pub(crate) target: Option<Destination>,
    /// Credentials were given and are wrong (or unusable): the answer is delayed by the
    /// endpoint's failure limiter.
    pub(crate) wrong_credentials: bool,
}

impl Turned {
    fn answered(status: Status, reason: impl Into<String>, target: Option<Destination>) -> Self {
        Self { answer: Some(status), reason: reason.into(), target, wrong_credentials: false }
    }

    fn silent(reason: impl Into<String>) -> Self {
        Self { answer: None, reason: reason.into(), target: None, wrong_credentials: false }
    }

    /// The flow log's outcome.
    pub(crate) fn outcome(&self) -> Outcome {
        match self.answer {
            Some(status) => {
                Outcome::ConnectRefused { status: status.code(), reason: self.reason.clone() }
            }
            None => Outcome::failed(Origin::Client, &self.reason, false),
        }
    }
}

/// Reads the CONNECT head (`read`: bytes read already) within `timeout` and judges it by
/// `policy`.
pub(crate) async fn read_request(
    socket: &mut TcpStream,
    read: Vec<u8>,
    policy: &ConnectPolicy,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Requested, Turned> {
    let mut bytes = read;
    let deadline = tokio::time::Instant::now() + timeout;
    let request = loop {
        match http_connect::parse_request(&bytes) {
            Ok(Some(request)) => break request,
            Ok(None) => {}
            Err(e) => return Err(Turned::answered(e.status(), e.to_string(), None)),
        }
        let mut chunk = [0u8; 2048];
        let n = tokio::select! {
            () = cancel.cancelled() => return Err(Turned::silent("the relay is shutting down")),
            read = tokio::time::timeout_at(deadline, socket.read(&mut chunk)) => match read {
                Err(_) => {
                    return Err(Turned::silent(format!("no whole CONNECT request within {timeout:?}")));
                }
                Ok(Err(e)) => return Err(Turned::silent(format!("reading the request: {e}"))),
                Ok(Ok(0)) => return Err(Turned::silent("closed before a whole CONNECT request")),
                Ok(Ok(n)) => n,
            },
        };
        bytes.extend_from_slice(&chunk[..n]);
    };
    let target = request.target;
    if !policy.proxy_auth.is_empty() {
        let refused = match &request.authorization {
            Authorization::Basic(given) if given.matches_any(&policy.proxy_auth) => None,
            Authorization::Basic(given) => {
                Some((format!("the credentials of `{}` are not accepted", given.user()), true))
            }
            Authorization::Missing => {
                Some(("this proxy asks for Basic credentials".to_owned(), false))
            }
            Authorization::Unusable => {
                Some(("only Basic credentials are accepted".to_owned(), true))
            }
        };
        if let Some((reason, wrong)) = refused {
            // The target is not told back, nor whether it would have been allowed.
            let mut turned = Turned::answered(Status::ProxyAuthenticationRequired, reason, None);
            turned.wrong_credentials = wrong;
            return Err(turned);
        }
    }
    let Some(pattern) = policy.admitting(&target) else {
        let reason = format!("{target} is not among this endpoint's destinations");
        return Err(Turned::answered(Status::Forbidden, reason, Some(target)));
    };
    let pattern = pattern.to_string();
    let early = bytes.split_off(request.head_len);
    Ok(Requested { target, pattern, early })
}

/// The status, and the one-line reason, a CONNECT client gets for an attempt that ended with
/// `outcome` before the agent opened (`timed_out`: the agent left it unanswered past the open
/// deadline): `None` when the client itself went away. The reasons name the kind of failure,
/// not the private network's addresses (the flow log has those).
pub(crate) fn status_after(outcome: &Outcome, timed_out: bool) -> Option<(Status, String)> {
    let (status, reason) = match outcome {
        Outcome::OpenFailed(failure) => match failure.code {
            OpenFailCode::NotAllowed => (Status::Forbidden, "the agent's allowlist refuses it"),
            OpenFailCode::DnsFailure => (
                Status::BadGateway,
                "the destination's name does not resolve in the private network",
            ),
            OpenFailCode::Refused => (Status::BadGateway, "the destination refused the connection"),
            OpenFailCode::Unreachable | OpenFailCode::BadRequest => {
                (Status::BadGateway, "the destination cannot be reached")
            }
            OpenFailCode::Timeout => {
                (Status::GatewayTimeout, "the destination did not answer in time")
            }
            OpenFailCode::OverBudget => {
                (Status::ServiceUnavailable, "the agents are at their buffer budget; try again")
            }
        },
        Outcome::NoAgent => (Status::ServiceUnavailable, "no agent serves this endpoint now"),
        Outcome::Shutdown => (Status::ServiceUnavailable, "the relay is shutting down"),
        Outcome::Unaudited => (Status::ServiceUnavailable, "the relay cannot audit it now"),
        Outcome::Failed { origin: Origin::Agent | Origin::Relay, .. } if timed_out => {
            (Status::GatewayTimeout, "the agent did not answer in time")
        }
        Outcome::Failed { origin: Origin::Agent | Origin::Relay | Origin::Destination, .. } => {
            (Status::BadGateway, "the tunnel to the private network failed")
        }
        _ => return None,
    };
    Some((status, reason.to_owned()))
}

/// Writes a refusal to the client, then closes ([`refuse::answer_and_close`], within
/// [`ANSWER_WAIT`]).
pub(crate) async fn answer(socket: &mut TcpStream, status: Status, reason: &str) {
    let refusal = http_connect::refusal(status, reason);
    refuse::answer_and_close(socket, &refusal, ANSWER_WAIT).await;
}

#[cfg(test)]
mod tests {
    use privlink_protocol::message::OpenFailure;
    use privlink_protocol::token::TokenDigest;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;

    fn policy(auth: &[&str]) -> ConnectPolicy {
        ConnectPolicy {
            destinations: vec!["*.vault.azure.net:443".parse().expect("pattern")],
            proxy_auth: auth.iter().map(|c| TokenDigest::of(c.as_bytes())).collect(),
        }
    }

    /// A connected pair: the relay's side and the client's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("c");
        (listener.accept().await.expect("accept").0, client)
    }

    async fn judge(head: &[u8], policy: &ConnectPolicy) -> Result<Requested, Turned> {
        let (mut relay, mut client) = pair().await;
        client.write_all(head).await.expect("write");
        let cancel = CancellationToken::new();
        read_request(&mut relay, Vec::new(), policy, Duration::from_secs(5), &cancel).await
    }

    #[tokio::test]
    async fn credentials_are_asked_for_before_the_target_is_judged() {
        let policy = policy(&["ops:s3cret"]);
        let missing = judge(b"CONNECT evil.example:22 HTTP/1.1\r\n\r\n", &policy).await;
        let missing = missing.expect_err("no credentials");
        assert_eq!(missing.answer, Some(Status::ProxyAuthenticationRequired));
        assert_eq!(missing.target, None, "nothing about the target is told back");
        assert!(!missing.wrong_credentials, "asking first is not a guess");

        // ops:wrong
        let wrong = b"CONNECT kv.vault.azure.net:443 HTTP/1.1\r\n\
                      Proxy-Authorization: Basic b3BzOndyb25n\r\n\r\n";
        let wrong = judge(wrong, &policy).await.expect_err("wrong credentials");
        assert_eq!(wrong.answer, Some(Status::ProxyAuthenticationRequired));
        assert!(
            wrong.reason.contains("`ops`") && !wrong.reason.contains("wrong"),
            "{}",
            wrong.reason
        );

        // ops:s3cret, then a ClientHello's first bytes right behind the head.
        let right = b"CONNECT kv.vault.azure.net:443 HTTP/1.1\r\n\
                      Proxy-Authorization: Basic b3BzOnMzY3JldA==\r\n\r\n\x16\x03\x01";
        let served = judge(right, &policy).await.expect("served");
        assert_eq!(served.target.to_string(), "kv.vault.azure.net:443");
        assert_eq!(served.pattern, "*.vault.azure.net:443");
        assert_eq!(served.early, b"\x16\x03\x01");

        let outside = b"CONNECT db.internal:5432 HTTP/1.1\r\n\
                        Proxy-Authorization: Basic b3BzOnMzY3JldA==\r\n\r\n";
        let outside = judge(outside, &policy).await.expect_err("outside destinations");
        assert_eq!(outside.answer, Some(Status::Forbidden));
        assert_eq!(outside.outcome().label(), "forbidden");
    }

    #[tokio::test]
    async fn a_slow_or_silent_client_gets_no_answer_and_a_long_head_a_400() {
        let (mut relay, _client) = pair().await;
        let cancel = CancellationToken::new();
        let policy = policy(&[]);
        let slow = read_request(
            &mut relay,
            b"CONNECT kv".to_vec(),
            &policy,
            Duration::from_millis(50),
            &cancel,
        )
        .await
        .expect_err("too slow");
        assert_eq!(slow.answer, None);
        assert_eq!(slow.outcome().label(), "client_error");

        let mut long = b"CONNECT kv.vault.azure.net:443 HTTP/1.1\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', 9000));
        let refused = judge(&long, &policy).await.expect_err("too long");
        assert_eq!(refused.answer, Some(Status::BadRequest));
    }

    #[tokio::test]
    async fn the_answer_reaches_a_client_that_sent_more_than_its_head() {
        let (mut relay, mut client) = pair().await;
        client.write_all(&[b'x'; 10_000]).await.expect("write");
        answer(&mut relay, Status::Forbidden, "not here").await;
        let mut text = String::new();
        client.read_to_string(&mut text).await.expect("read the answer, not a reset");
        assert!(
            text.starts_with("HTTP/1.1 403 Forbidden\r\n") && text.ends_with("not here\n"),
            "{text}"
        );
    }

    #[test]
    fn failures_after_the_request_map_to_gateway_statuses() {
        let failed = |code| {
            Outcome::OpenFailed(OpenFailure { code, message: "10.1.2.3:443 refused".into() })
        };
        let status = |outcome: &Outcome| status_after(outcome, false).map(|(s, _)| s);
        assert_eq!(status(&failed(OpenFailCode::Refused)), Some(Status::BadGateway));
        assert_eq!(status(&failed(OpenFailCode::DnsFailure)), Some(Status::BadGateway));
        assert_eq!(status(&failed(OpenFailCode::Timeout)), Some(Status::GatewayTimeout));
        assert_eq!(status(&failed(OpenFailCode::NotAllowed)), Some(Status::Forbidden));
        assert_eq!(status(&failed(OpenFailCode::OverBudget)), Some(Status::ServiceUnavailable));
        assert_eq!(status(&Outcome::NoAgent), Some(Status::ServiceUnavailable));
        let unanswered = Outcome::failed(Origin::Agent, "no stream on the agent within 3s", true);
        assert_eq!(status_after(&unanswered, true).map(|(s, _)| s), Some(Status::GatewayTimeout));
        assert_eq!(status(&unanswered), Some(Status::BadGateway));
        assert_eq!(status(&Outcome::failed(Origin::Client, "reset", false)), None);
        let (_, reason) = status_after(&failed(OpenFailCode::Refused), false).expect("answered");
        assert!(!reason.contains("10.1.2.3"), "no private address is told: {reason}");
    }
}
