//! privlink-admin: the admin HTTP listener the relay and the agent both run — liveness
//! (`/healthz`), readiness (`/readyz`), metrics (`/metrics`, OpenMetrics text) and the status
//! snapshot (`/api/v1/status`, JSON), the open connections (`/api/v1/connections`), the last
//! events (`/api/v1/events`) and ten minutes of traffic (`/api/v1/history`, from [`history`]),
//! and the status page (`/`, embedded) — over
//! HTTP/1.1 with every request bounded: headers in 16 KiB and 5 s, one request per connection,
//! [`MAX_CONNECTIONS`] connections at once, each on its own task, so a slow or hostile admin
//! client never touches the data path. With a token configured, `/api/*` needs
//! `Authorization: Bearer <token>` (compared in constant time); the probes, the metrics and the
//! status page's static files stay open — the page holds no data, and a browser cannot send a
//! bearer token when it navigates, so the page asks for the token and sends it on its API
//! requests.
//!
//! What is reported is the role's business: it implements [`AdminView`]. This crate decides
//! only how it is served — and, in [`client`], how `privlink status` asks for it; [`audit`]
//! holds the audit-trail metrics and status view both roles report.
#![forbid(unsafe_code)]

pub mod audit;
pub mod client;
pub mod history;
mod latch;
mod slots;
pub mod snapshot;

pub use latch::ReadyLatch;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use privlink_protocol::config::AdminSettings;
use privlink_protocol::token::TokenDigest;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Admin connections open at once (a quarter of them from one address at most); beyond, the
/// one waiting longest for its request head makes room (see `slots`).
pub const MAX_CONNECTIONS: usize = 256;
/// Longest a client may take to send its request headers: a probe or a scraper sends them in
/// one packet, and a client that trickles them holds one of the [`MAX_CONNECTIONS`] slots.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one connection may last, request and answer together.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (hyper's smallest allowed read buffer).
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Most connections `/api/v1/connections` lists (a few MiB of JSON); the answer says how
/// many are open in all.
pub const MAX_LISTED_CONNECTIONS: usize = 10_000;

/// Whether the process should receive work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Serving.
    Ready,
    /// Not serving, and why (starting, no relay link, draining, …).
    NotReady(String),
}

/// What a role reports on its admin listener.
pub trait AdminView: Send + Sync + 'static {
    /// For `/readyz`.
    fn readiness(&self) -> Readiness;
    /// For `/api/v1/status`: the role's status snapshot.
    fn status(&self) -> snapshot::StatusSnapshot;
    /// For `/api/v1/connections`: the connections open now, at most
    /// [`MAX_LISTED_CONNECTIONS`] of them, oldest first.
    fn connections(&self) -> snapshot::ConnectionsSnapshot;
    /// For `/api/v1/events`: the last audit records.
    fn events(&self) -> snapshot::EventsSnapshot;
    /// For `/api/v1/history`: the last ten minutes of traffic.
    fn history(&self) -> history::HistorySnapshot;
    /// For `/metrics`: OpenMetrics text, or `None` where the role has no metrics yet.
    fn metrics(&self) -> Option<String> {
        None
    }
}

/// A metrics registry with the `privlink_` prefix and
/// `privlink_build_info{version, role, crypto, fips}` (`crypto`: the provider; `fips`: whether
/// it runs in FIPS mode), which both roles' `/metrics` start from.
pub fn metrics_registry(
    role: &'static str,
    (crypto, fips): (&'static str, bool),
) -> prometheus_client::registry::Registry {
    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct BuildLabels {
        version: &'static str,
        role: &'static str,
        crypto: &'static str,
        fips: &'static str,
    }
    let mut registry = prometheus_client::registry::Registry::with_prefix("privlink");
    registry.register(
        "build",
        "The privlink build (always 1)",
        prometheus_client::metrics::info::Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            role,
            crypto,
            fips: if fips { "true" } else { "false" },
        }),
    );
    registry
}

/// The buffer-budget gauges both roles expose: `privlink_buffer_budget_bytes` (the limit)
/// and `privlink_buffer_held_bytes` (what streams whose receivers do not keep up are charged
/// now), set at each scrape.
#[derive(Debug)]
pub struct BufferMetrics {
    limit: prometheus_client::metrics::gauge::Gauge,
    held: prometheus_client::metrics::gauge::Gauge,
}

impl BufferMetrics {
    /// Registers them in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self { limit: Default::default(), held: Default::default() };
        registry.register(
            "buffer_budget_bytes",
            "Bytes this process may hold for streams whose receivers do not keep up before it \
             refuses new ones (buffer_budget)",
            metrics.limit.clone(),
        );
        registry.register(
            "buffer_held_bytes",
            "Bytes charged now to streams whose receivers do not keep up (each at most its \
             stream window and copy buffer)",
            metrics.held.clone(),
        );
        metrics
    }

    /// Sets both before a scrape.
    pub fn set(&self, held: u64, limit: u64) {
        self.held.set(i64::try_from(held).unwrap_or(i64::MAX));
        self.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
}

/// `privlink_tunnel_links{role, transport, key_exchange, cipher}`: tunnel connections up now,
/// by what their TLS negotiated (`unknown` where this side cannot tell: an agent's QUIC links),
/// so that a link that is not post-quantum shows at a glance. Set at each scrape.
#[derive(Debug)]
pub struct TunnelLinkMetrics {
    role: &'static str,
    links: prometheus_client::metrics::family::Family<
        TunnelLinkLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
}

/// The labels of `privlink_tunnel_links`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TunnelLinkLabels {
    role: &'static str,
    transport: String,
    key_exchange: String,
    cipher: String,
}

impl TunnelLinkMetrics {
    /// Registers it in `registry` for `role`.
    pub fn register(
        registry: &mut prometheus_client::registry::Registry,
        role: &'static str,
    ) -> Self {
        let metrics = Self { role, links: Default::default() };
        registry.register(
            "tunnel_links",
            "Tunnel connections up now, by transport, key exchange group and cipher suite",
            metrics.links.clone(),
        );
        metrics
    }

    /// Counts `links` — each its transport, key exchange and cipher, when known.
    pub fn set<'a>(&self, links: impl IntoIterator<Item = (&'a str, Option<(&'a str, &'a str)>)>) {
        // Links that went away would otherwise keep their series.
        self.links.clear();
        for (transport, tls) in links {
            let (key_exchange, cipher) = tls.unwrap_or(("unknown", "unknown"));
            let labels = TunnelLinkLabels {
                role: self.role,
                transport: transport.to_owned(),
                key_exchange: key_exchange.to_owned(),
                cipher: cipher.to_owned(),
            };
            self.links.get_or_create(&labels).inc();
        }
    }
}

/// The configuration-reload metrics both roles expose: `privlink_config_last_reload_successful`
/// (1 until a reload is refused), `…_success_timestamp_seconds`, and
/// `privlink_config_reloads_total{result}`.
#[derive(Debug)]
pub struct ReloadMetrics {
    successful: prometheus_client::metrics::gauge::Gauge,
    success_time: prometheus_client::metrics::gauge::Gauge,
    reloads: prometheus_client::metrics::family::Family<
        ReloadResult,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// The `result` label of `privlink_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReloadResult {
    result: &'static str,
}

impl ReloadMetrics {
    /// Registers them in `registry`, as of a configuration loaded now.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            successful: prometheus_client::metrics::gauge::Gauge::default(),
            success_time: prometheus_client::metrics::gauge::Gauge::default(),
            reloads: prometheus_client::metrics::family::Family::default(),
        };
        metrics.successful.set(1);
        metrics.success_time.set(unix_now());
        registry.register(
            "config_last_reload_successful",
            "Whether the last configuration reload was applied (1) or refused (0)",
            metrics.successful.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded or reloaded successfully",
            metrics.success_time.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads attempted, by result (applied, refused)",
            metrics.reloads.clone(),
        );
        metrics
    }

    /// A reload was applied (`true`) or refused.
    pub fn reloaded(&self, applied: bool) {
        self.successful.set(i64::from(applied));
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ReloadResult { result }).inc();
        if applied {
            self.success_time.set(unix_now());
        }
    }
}

fn unix_now() -> i64 {
    i64::try_from(unix_seconds(std::time::SystemTime::now())).unwrap_or(i64::MAX)
}

/// Seconds since the Unix epoch, as the JSON writes every time (0 for a time before it).
pub fn unix_seconds(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A bound admin listener, ready to [`run`](AdminServer::run).
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    guard: Guard,
}

/// What a request must show: a `Host` this listener answers to, and the token where one is
/// configured.
#[derive(Debug)]
struct Guard {
    /// The digest of the token `/api/*` (and `/metrics`, when asked) needs.
    token: Option<TokenDigest>,
    /// Host names answered besides IP literals and `localhost`, in lower case.
    hosts: Vec<String>,
    /// Whether `/metrics` needs the token.
    metrics_require_token: bool,
}

impl AdminServer {
    /// Binds `settings.listen`; its token (the digest), when given, guards `/api/*` and — with
    /// `metrics_require_token` — `/metrics`. Call it within a tokio runtime.
    pub fn bind(settings: &AdminSettings) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(settings.listen)?;
        listener.set_nonblocking(true)?;
        let guard = Guard {
            token: settings.token,
            hosts: settings.hosts.clone(),
            metrics_require_token: settings.metrics_require_token,
        };
        Ok(Self { listener: TcpListener::from_std(listener)?, guard })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled.
    pub async fn run(self, view: Arc<dyn AdminView>, stop: CancellationToken) {
        let slots = Arc::new(slots::Slots::default());
        let tasks = TaskTracker::new();
        let guard = Arc::new(self.guard);
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let Ok((socket, peer)) = accepted else {
                // EMFILE and friends: the data path's accept loops log these; pause and go on.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // Full, or this source over its share: the connection that has waited longest for
            // its request head makes room, so a trickling client cannot starve the probes.
            let Some(slot) = slots.take(peer.ip(), slots::HeadPeek::of(&socket)) else {
                tracing::debug!(%peer, "admin connection closed: {MAX_CONNECTIONS} already busy");
                continue;
            };
            let view = Arc::clone(&view);
            let guard = Arc::clone(&guard);
            tasks.spawn(async move {
                let evicted = slot.evicted();
                let head = slot.head_received();
                let service = hyper::service::service_fn(move |request| {
                    head();
                    let answer = answer(&request, view.as_ref(), &guard);
                    async move { Ok::<_, Infallible>(answer) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_REQUEST_HEAD)
                    .keep_alive(false);
                let connection = http.serve_connection(TokioIo::new(socket), service);
                tokio::select! {
                    served = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => match served {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, "admin connection: {e}"),
                        Err(_) => {
                            tracing::debug!(%peer, "admin connection over {CONNECTION_TIMEOUT:?}")
                        }
                    },
                    () = evicted => tracing::debug!(%peer, "admin connection evicted: its request head was the slowest"),
                }
                drop(slot);
            });
        }
        tasks.close();
        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, tasks.wait()).await;
    }
}

/// The answer to one request.
fn answer(
    request: &Request<Incoming>,
    view: &dyn AdminView,
    guard: &Guard,
) -> Response<Full<Bytes>> {
    let mut response = route(request, view, guard);
    let headers = response.headers_mut();
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("cache-control", HeaderValue::from_static("no-store"));
    response
}

fn route(
    request: &Request<Incoming>,
    view: &dyn AdminView,
    guard: &Guard,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    if !host_allowed(request.headers().get(HOST), &guard.hosts) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "this listener answers to its IP address, localhost and admin.hosts only\n",
        );
    }
    let path = request.uri().path();
    let guarded = path.starts_with("/api/") || (path == "/metrics" && guard.metrics_require_token);
    if guarded && !authorized(request.headers(), guard.token.as_ref()) {
        let mut response = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer realm=\"privlink\""));
        return response;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match view.readiness() {
            Readiness::Ready => text(StatusCode::OK, "ready\n"),
            Readiness::NotReady(reason) => {
                text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {reason}\n"))
            }
        },
        "/metrics" => match view.metrics() {
            Some(text) => {
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            None => text(StatusCode::NOT_FOUND, "no metrics in this version\n"),
        },
        "/" => page(STATUS_PAGE, "text/html; charset=utf-8"),
        "/status.js" => page(STATUS_SCRIPT, "text/javascript; charset=utf-8"),
        "/status.css" => page(STATUS_STYLE, "text/css; charset=utf-8"),
        "/api/v1/status" => json(&view.status()),
        "/api/v1/connections" => json(&view.connections()),
        "/api/v1/events" => json(&view.events()),
        "/api/v1/history" => json(&view.history()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether a request's `Host` is one this listener answers to: an IP literal (any address
/// this listener may be reached at), `localhost`, or a configured name — each with or without
/// a port. A name that merely resolves here (a DNS-rebinding page's own) is not. A request
/// without `Host` (HTTP/1.0) carries no name to rebind and is answered.
fn host_allowed(host: Option<&HeaderValue>, hosts: &[String]) -> bool {
    let Some(host) = host else { return true };
    let Ok(host) = host.to_str() else { return false };
    let Ok(authority) = host.parse::<hyper::http::uri::Authority>() else { return false };
    let name = authority.host();
    let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || hosts.contains(&name)
}

/// Whether the request carries the configured bearer token (always, with none configured).
fn authorized(headers: &hyper::HeaderMap, token: Option<&TokenDigest>) -> bool {
    let Some(expected) = token else { return true };
    headers
        .get(AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|presented| expected.matches(presented))
}

/// The status page, embedded: no build step, nothing fetched from elsewhere, so it works on an
/// isolated network. Its script asks the `/api/v1/` answers every two seconds.
const STATUS_PAGE: &str = include_str!("page/status.html");
const STATUS_SCRIPT: &str = include_str!("page/status.js");
const STATUS_STYLE: &str = include_str!("page/status.css");

/// The page loads only its own script and style and talks only to this listener; it cannot be
/// framed by another site.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn page(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("content-security-policy", HeaderValue::from_static(PAGE_POLICY));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    // Serializing these plain structs into a String cannot fail.
    let mut body = serde_json::to_string(value).unwrap_or_default();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: Option<&str>) -> hyper::HeaderMap {
        let mut headers = hyper::HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        }
        headers
    }

    #[test]
    fn only_the_configured_bearer_token_is_let_through() {
        let token = TokenDigest::of(b"s3cret");
        assert!(authorized(&headers(None), None), "no token configured: open");
        assert!(authorized(&headers(Some("Bearer s3cret")), Some(&token)));
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret "),
            Some("Basic s3cret"),
            Some("s3cret"),
        ] {
            assert!(!authorized(&headers(wrong), Some(&token)), "{wrong:?}");
        }
    }
}
