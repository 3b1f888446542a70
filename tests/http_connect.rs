//! HTTP CONNECT endpoints (`mode = "http-connect"`): clients that know only `HTTPS_PROXY`
//! reach a vault by its own URL through the relay. curl (a client nobody here wrote) through
//! the endpoint: served with the vault's certificate verified end to end; credentials missing
//! or wrong → 407 with the Basic challenge; a target outside `destinations` → 403, as is one
//! the agent's allowlist refuses (its allowlist still decides); a destination that refuses →
//! 502. Bytes a client sends right behind its head reach the destination, and the `200` comes
//! before the destination's first byte. Both transports. (Name resolution in the private
//! network, a destination that never answers → 504, and the Azure SDK with `HTTPS_PROXY`: the
//! namespace test, tests/http_proxy.rs.)

#[macro_use]
mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Command;

use common::*;
use privlink_agent::config::TransportChoice;
use privlink_protocol::token::TokenDigest;
use privlink_relay::config::{ConnectPolicy, EndpointTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The vault's name: `localhost`, the one name that resolves here without a hosts file of the
/// test's own (the agent is in this process); a rule that names it lets the agent open loopback.
const VAULT: &str = "localhost";
const CREDENTIALS: &str = "kv-client:s3cret word";

/// A relay with CONNECT endpoint `proxy` (credentials [`CREDENTIALS`]) admitting the vault, an
/// echo server and a closed port, in front of an agent that allows the vault, the echo server
/// and the closed port — but not `localhost:1`, which the endpoint admits.
struct ConnectProxy {
    harness: Harness,
    /// The relay's admin listener.
    admin: SocketAddr,
    agent: tokio_util::sync::CancellationToken,
    ca_file: tempfile::NamedTempFile,
    vault: SocketAddr,
    echo: SocketAddr,
    closed: SocketAddr,
}

impl ConnectProxy {
    async fn start(transport: TransportChoice) -> Self {
        let ca = privlink_transport::pki::CertificateAuthority::new("Test Vault CA").expect("CA");
        let vault = vault::https_vault(&ca, VAULT).await;
        let echo = echo_server().await;
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let mut ca_file = tempfile::NamedTempFile::new().expect("ca file");
        ca_file.write_all(ca.identity.cert_pem.as_bytes()).expect("write ca");
        let named = |addr: SocketAddr| format!("{VAULT}:{}", addr.port());
        let mut proxy = endpoint("proxy", vault);
        proxy.destination = EndpointTarget::Connect(ConnectPolicy {
            destinations: [vault, echo, closed, "127.0.0.1:1".parse().expect("addr")]
                .into_iter()
                .map(|addr| named(addr).parse().expect("pattern"))
                .collect(),
            proxy_auth: vec![TokenDigest::of(CREDENTIALS.as_bytes())],
        });
        let admin = loopback(privlink_testbed::process::free_fixed_port());
        let settings = privlink_protocol::config::AdminSettings::new(admin, None);
        let harness = Harness::start_with_admin(vec![proxy], Some(settings)).await;
        let allow = [named(vault), named(echo), named(closed)];
        let agent = harness.spawn_agent(harness.agent_config(transport, &allow));
        harness.wait_approved("proxy").await;
        Self { harness, admin, agent, ca_file, vault, echo, closed }
    }

    /// curl through the endpoint to `https://localhost:PORT/` with `credentials`: the status
    /// the proxy answered the CONNECT with, curl's exit code, the body and stderr.
    fn curl(&self, port: u16, credentials: Option<&str>) -> (String, i32, String, String) {
        let proxy = match credentials {
            Some(credentials) => {
                format!("http://{}@{}", credentials.replace(' ', "%20"), self.harness.addr("proxy"))
            }
            None => format!("http://{}", self.harness.addr("proxy")),
        };
        let out = tokio::task::block_in_place(|| {
            Command::new("curl")
                .args(["--silent", "--show-error", "--max-time", "15", "--noproxy", ""])
                .args(["--proxy", &proxy, "--cacert"])
                .arg(self.ca_file.path())
                .args(["--write-out", "\n%{http_connect}"])
                .arg(format!("https://{VAULT}:{port}/"))
                .output()
                .expect("curl")
        });
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, connect) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (
            connect.to_owned(),
            out.status.code().unwrap_or(-1),
            body.to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn stop(self) {
        self.harness.shutdown(&[self.agent]).await;
    }
}

async fn curl_reaches_the_vault_through_connect_with_its_certificate_verified(
    transport: TransportChoice,
) {
    let proxy = ConnectProxy::start(transport).await;
    let (connect, code, body, stderr) = proxy.curl(proxy.vault.port(), Some(CREDENTIALS));
    assert_eq!((connect.as_str(), code), ("200", 0), "served: {stderr}");
    assert_eq!(body, VAULT, "the vault answered, its certificate verified by curl");
    proxy.stop().await;
}

async fn refusals_carry_their_status(transport: TransportChoice) {
    let proxy = ConnectProxy::start(transport).await;
    let vault = proxy.vault.port();
    for (credentials, port, want, what) in [
        (None, vault, "407", "no credentials"),
        (Some("kv-client:wrong"), vault, "407", "wrong credentials"),
        (Some(CREDENTIALS), 2, "403", "outside the endpoint's destinations"),
        (Some(CREDENTIALS), 1, "403", "admitted by the endpoint, refused by the agent"),
        (Some(CREDENTIALS), proxy.closed.port(), "502", "a destination that refuses"),
    ] {
        let (connect, code, _, stderr) = proxy.curl(port, credentials);
        assert_eq!(connect, want, "{what}: {stderr}");
        assert_ne!(code, 0, "{what}: curl reports the failure");
    }
    proxy.stop().await;
}

/// An agent that can take no stream (its whole buffer budget spent: `over_budget`) is answered
/// `503` while it is the only one; once another agent approves, every request is served —
/// replayed on the other agent when the spent one is tried first, as for any endpoint.
async fn a_spent_agent_gets_503_alone_and_is_replayed_past_with_another(
    transport: TransportChoice,
) {
    let proxy = ConnectProxy::start(transport).await;
    proxy.agent.cancel();
    let agents_of =
        |n: usize| move |agents: &[privlink_relay::registry::AgentView]| agents.len() == n;
    proxy.harness.relay.wait_for_agents(CONNECTOR, WAIT, agents_of(0)).await;
    let named = |addr: SocketAddr| format!("{VAULT}:{}", addr.port());
    let mut spent = proxy.harness.agent_config(transport, &[named(proxy.vault)]);
    spent.buffer_budget = 1; // no stream's first charge fits
    let spent = proxy.harness.spawn_agent(spent);
    proxy.harness.wait_approved("proxy").await;
    let (connect, _, body, stderr) = proxy.curl(proxy.vault.port(), Some(CREDENTIALS));
    assert_eq!(connect, "503", "only a spent agent: {body}{stderr}");

    let fresh =
        proxy.harness.spawn_agent(proxy.harness.agent_config(transport, &[named(proxy.vault)]));
    let both = proxy.harness.relay.wait_for_agents(CONNECTOR, WAIT, agents_of(2)).await;
    assert_eq!(both.len(), 2);
    proxy
        .harness
        .wait_status("proxy", |_| {
            proxy.harness.relay.agents(CONNECTOR).iter().all(|a| a.verdict("proxy").is_some())
        })
        .await;
    for _ in 0..4 {
        let (connect, code, body, stderr) = proxy.curl(proxy.vault.port(), Some(CREDENTIALS));
        assert_eq!((connect.as_str(), code, body.as_str()), ("200", 0, VAULT), "{stderr}");
    }
    proxy.harness.shutdown(&[spent, fresh]).await;
}

/// The head, the challenge and the reason a raw client reads for a missing credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_407_carries_the_basic_challenge_and_a_one_line_reason() {
    let proxy = ConnectProxy::start(TransportChoice::Tcp).await;
    let mut client = TcpStream::connect(proxy.harness.addr("proxy")).await.expect("connect");
    let head = format!("CONNECT {VAULT}:{} HTTP/1.1\r\nHost: x\r\n\r\n", proxy.vault.port());
    client.write_all(head.as_bytes()).await.expect("write");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, client.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 407 Proxy Authentication Required\r\n"), "{answer}");
    assert!(answer.contains("\r\nProxy-Authenticate: Basic realm=\"privlink\""), "{answer}");
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    assert_eq!(body, "this proxy asks for Basic credentials\n");
    proxy.stop().await;
}

async fn bytes_behind_the_head_are_forwarded_after_the_200(transport: TransportChoice) {
    let proxy = ConnectProxy::start(transport).await;
    let mut client = TcpStream::connect(proxy.harness.addr("proxy")).await.expect("connect");
    // Credentials, head and the first bytes for the destination in one write.
    let request = format!(
        "CONNECT {VAULT}:{} HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\nping, pipelined",
        proxy.echo.port(),
        base64_of(CREDENTIALS)
    );
    client.write_all(request.as_bytes()).await.expect("write");
    let mut greeting = [0u8; 39 + 15];
    client.read_exact(&mut greeting).await.expect("the 200 and the echo");
    // While it is open, the relay's connection list names where it asked to go.
    let (_, listed) = admin_get(proxy.admin, "/api/v1/connections");
    let asked = format!("\"destination\":\"{VAULT}:{}\"", proxy.echo.port());
    assert!(listed.contains(&asked), "{asked} in {listed}");
    client.shutdown().await.expect("half-close");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, client.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&greeting).into_owned() + &answer;
    assert_eq!(answer, "HTTP/1.1 200 Connection established\r\n\r\nping, pipelined");
    proxy.stop().await;
}

on_both_transports!(
    curl_reaches_the_vault_through_connect_with_its_certificate_verified,
    a_spent_agent_gets_503_alone_and_is_replayed_past_with_another,
    refusals_carry_their_status,
    bytes_behind_the_head_are_forwarded_after_the_200,
);

/// Standard base64 (the test's own, so that it does not take the parser's word for it).
fn base64_of(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
