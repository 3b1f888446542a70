//! The client side, for `privlink status`: one bounded `GET` of an admin route over HTTP/1.1,
//! with the bearer token when one is given.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper::header::{AUTHORIZATION, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest answer read.
pub const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Why an admin route could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL is not `http://host:port[/path]`.
    #[error("`{0}` is not an admin URL (expected http://HOST:PORT)")]
    BadUrl(String),
    /// Nothing answered at the address (connect, HTTP or time).
    #[error("cannot reach the admin listener at {url}: {reason}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// `GET base + path` (`base` like `http://127.0.0.1:9090`), within `timeout`; the status code
/// and the body (at most [`MAX_ANSWER`] bytes).
pub async fn get(
    base: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), FetchError> {
    let authority = base
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| FetchError::BadUrl(base.to_owned()))?;
    let url = format!("http://{authority}{path}");
    let unreachable = |reason: String| FetchError::Unreachable { url: url.clone(), reason };
    let exchange = async {
        let stream = TcpStream::connect(authority).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = Request::get(path).header(HOST, authority);
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(reason)) => Err(unreachable(reason)),
        Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
    }
}
