//! `privlink demo`: the whole path on loopback in one process — a TLS "key vault" with a
//! certificate for `contoso-kv.vault.azure.net` from a fresh demo CA, a relay, an agent that
//! dials it over QUIC — then one HTTPS request through the endpoint, verified end to end
//! against the demo CA (proof that nothing in between terminated TLS). It prints what
//! happened and what to try next, and runs until Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use privlink_agent::allowlist::Allowlist;
use privlink_agent::config::{AgentConfig, RelayAddress, TransportChoice};
use privlink_protocol::acl::Acl;
use privlink_protocol::destination::Host;
use privlink_protocol::token::{Token, TokenDigest};
use privlink_relay::config::{ConnectorSpec, EndpointSpec, OpenRetry, RelayConfig, TlsIdentity};
use privlink_relay::{EndpointStatus, Relay};
use privlink_transport::pki::CertificateAuthority;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::cmd::certs::write_file;
use crate::cmd::token::new_token;

/// The vault's public name, on its certificate and in the client's SNI.
const VAULT_NAME: &str = "contoso-kv.vault.azure.net";
/// Its private-link alias, also on the certificate (as on a real Key Vault).
const VAULT_PRIVATE_NAME: &str = "contoso-kv.privatelink.vaultcore.azure.net";
/// The request the demo sends, shaped like Key Vault's REST API.
const REQUEST_PATH: &str = "/secrets/demo-secret?api-version=7.4";
/// Bound on the request head the demo vault reads.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Deadline for anything the demo waits on.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

use super::Unavailable;

pub(crate) async fn run(port: u16, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ca = CertificateAuthority::new("privlink demo CA").context("creating the demo CA")?;
    let relay_cert = ca.issue_server(&["localhost", "127.0.0.1"])?;
    let vault_cert = ca.issue_server(&[VAULT_NAME, VAULT_PRIVATE_NAME])?;
    let dir = std::env::temp_dir().join(format!("privlink-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_path = dir.join("ca.crt");
    write_file(&ca_path, &ca.identity.cert_pem, 0o644)?;

    // The "key vault": a TLS server only the agent's side can see (here: loopback).
    let vault_tls =
        rustls::ServerConfig::builder_with_provider(privlink_transport::crypto::default_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![vault_cert.cert_der.clone()], vault_cert.key_der.clone_key())?;
    let vault_listener =
        TcpListener::bind("127.0.0.1:0").await.context("binding the demo vault")?;
    let vault_addr = vault_listener.local_addr()?;
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(serve_vault(vault_listener, Arc::new(vault_tls), shutdown.clone()));

    let token = new_token()?;
    let endpoint = |listen: SocketAddr| EndpointSpec {
        name: "contoso-kv".into(),
        connector: "demo".into(),
        destination: format!("{vault_addr}").parse().expect("a socket address is a destination"),
        listen,
        inactivity_timeout: Duration::from_secs(60),
        stall_timeout: Duration::from_secs(30),
        max_connections: 1024,
        per_source: Default::default(),
        max_duration: None,
        acl: Acl { allow: vec!["127.0.0.0/8".parse().expect("cidr")], deny: vec![] },
        open: OpenRetry::default(),
        server_names: Vec::new(),
        listener: None,
        proxy_protocol: None,
        send_proxy_protocol: None,
        preread_timeout: privlink_relay::config::DEFAULT_PREREAD_TIMEOUT,
    };
    let relay_config = |listen| RelayConfig {
        tunnel_listen: "127.0.0.1:0".parse().expect("addr"),
        identity: TlsIdentity {
            chain: vec![relay_cert.cert_der.clone()],
            key: relay_cert.key_der.clone_key(),
        },
        admin: None,
        shutdown_grace: Duration::from_secs(5),
        buffer_budget: privlink_transport::budget::default_limit(),
        stream_window: privlink_transport::limits::STREAM_RECEIVE_WINDOW,
        crypto: Default::default(),
        connectors: vec![ConnectorSpec {
            name: "demo".into(),
            token_sha256: vec![TokenDigest::of(token.as_bytes())],
        }],
        endpoints: vec![endpoint(listen)],
        fleet: None,
        listeners: Vec::new(),
        source_files: Vec::new(),
        audit: None,
        source: None,
    };
    let wanted: SocketAddr = ([127, 0, 0, 1], port).into();
    let relay = match Relay::bind(relay_config(wanted)).await {
        Ok(relay) => relay,
        Err(e) if port != 0 => {
            eprintln!("(port {port} is not available: {e}; using a free port instead)");
            Relay::bind(relay_config(([127, 0, 0, 1], 0).into())).await?
        }
        Err(e) => return Err(e.into()),
    };
    let relay_handle = relay.handle();
    let endpoint_addr = relay_handle.endpoint_addr("contoso-kv").context("endpoint address")?;
    let relay_stop = CancellationToken::new();
    tasks.spawn(relay.run(relay_stop.clone()));

    let agent_config = AgentConfig {
        name: "demo-agent".into(),
        connector: "demo".into(),
        token: Token::new(token),
        relays: vec![RelayAddress {
            host: Host::Ip([127, 0, 0, 1].into()),
            port: relay_handle.tunnel_addr().port(),
        }],
        relay_roots: vec![ca.identity.cert_der.clone()],
        relay_ca: None,
        transport: TransportChoice::Auto,
        quic_fallback_after: privlink_agent::config::DEFAULT_QUIC_FALLBACK_AFTER,
        quic_probe_interval: privlink_agent::config::DEFAULT_QUIC_PROBE_INTERVAL,
        allowlist: Allowlist { rules: vec![vault_addr.to_string().parse()?] },
        connect_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(30),
        dns_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
        buffer_budget: privlink_transport::budget::default_limit(),
        stream_window: privlink_transport::limits::STREAM_RECEIVE_WINDOW,
        crypto: Default::default(),
        admin: None,
        proxy: None,
        source_files: Vec::new(),
        audit: None,
        source: None,
    };
    let agent = privlink_agent::Agent::new(agent_config)?;
    let agent_stop = CancellationToken::new();
    tasks.spawn(agent.run(agent_stop.clone()));
    tasks.close();

    let status = relay_handle
        .wait_for_status("contoso-kv", STEP_TIMEOUT, |s| *s == EndpointStatus::Approved)
        .await;
    if status != Some(EndpointStatus::Approved) {
        return Err(Unavailable(format!(
            "the agent did not approve the endpoint in time (status {status:?})"
        ))
        .into());
    }

    let outcome = request_through_tunnel(endpoint_addr, &ca).await;
    print_report(endpoint_addr, vault_addr, relay_handle.tunnel_addr(), &ca_path, &outcome);
    if outcome.is_err() {
        relay_stop.cancel();
        agent_stop.cancel();
        tasks.wait().await;
        return Err(Unavailable("the request through the tunnel failed".into()).into());
    }

    shutdown.cancelled().await;
    relay_stop.cancel();
    agent_stop.cancel();
    tasks.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// What the client saw.
struct Seen {
    elapsed: Duration,
    tls_version: String,
    cipher: String,
    status_line: String,
    body: String,
}

async fn request_through_tunnel(
    endpoint: SocketAddr,
    ca: &CertificateAuthority,
) -> anyhow::Result<Seen> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.identity.cert_der.clone())?;
    let config =
        rustls::ClientConfig::builder_with_provider(privlink_transport::crypto::default_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let started = Instant::now();
    let work = async {
        let tcp = TcpStream::connect(endpoint).await.context("connecting to the relay endpoint")?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut tls = connector
            .connect(ServerName::try_from(VAULT_NAME)?, tcp)
            .await
            .context("TLS handshake with the vault through the tunnel")?;
        let (_, session) = tls.get_ref();
        let tls_version = format!("{:?}", session.protocol_version().context("no TLS version")?);
        let cipher =
            format!("{:?}", session.negotiated_cipher_suite().context("no cipher suite")?.suite());
        let request = format!(
            "GET {REQUEST_PATH} HTTP/1.1\r\nHost: {VAULT_NAME}\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tls.read_to_end(&mut response).await.context("reading the response")?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        anyhow::Ok(Seen {
            elapsed: started.elapsed(),
            tls_version,
            cipher,
            status_line: head.lines().next().unwrap_or_default().to_owned(),
            body: body.to_owned(),
        })
    };
    tokio::time::timeout(STEP_TIMEOUT, work).await.context("the request timed out")?
}

fn print_report(
    endpoint: SocketAddr,
    vault: SocketAddr,
    tunnel: SocketAddr,
    ca_path: &Path,
    outcome: &anyhow::Result<Seen>,
) {
    println!();
    println!("privlink demo — everything on loopback, in this one process");
    println!("  client ──TCP/TLS──▶ relay endpoint {endpoint}");
    println!("         ══QUIC tunnel══ relay {tunnel} ◀── agent (dialled out)");
    println!("         agent ──TCP──▶ demo key vault {vault} (cert for {VAULT_NAME})");
    println!();
    match outcome {
        Ok(seen) => {
            println!("GET https://{VAULT_NAME}{REQUEST_PATH}  (sent to {endpoint})");
            println!(
                "  TLS: {} {}, certificate for {VAULT_NAME} verified against the demo CA",
                seen.tls_version, seen.cipher
            );
            println!(
                "       → the TLS session runs end to end; relay and agent only carried bytes"
            );
            println!("  {}", seen.status_line);
            println!("  {}", seen.body.trim());
            println!(
                "  round trip including TCP, TLS and the tunnel: {:.1} ms",
                seen.elapsed.as_secs_f64() * 1e3
            );
        }
        Err(e) => println!("The request through the tunnel FAILED: {e:#}"),
    }
    println!();
    println!("Try next (while this runs):");
    println!(
        "  curl --cacert {} --resolve {VAULT_NAME}:{port}:127.0.0.1 'https://{VAULT_NAME}:{port}{REQUEST_PATH}'",
        ca_path.display(),
        port = endpoint.port()
    );
    println!(
        "  openssl s_client -connect {endpoint} -servername {VAULT_NAME} -CAfile {}",
        ca_path.display()
    );
    println!(
        "  Each connection prints one flow-log line (client, endpoint, bytes, outcome) on stderr."
    );
    println!("  For real deployments: privlink token new; privlink certs init --dir certs;");
    println!(
        "  then privlink relay --config config/relay.toml and privlink agent --config config/agent.toml."
    );
    println!();
    println!("Press Ctrl-C to stop.");
}

/// The demo vault: answers every HTTPS request with a Key Vault-shaped JSON secret.
async fn serve_vault(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = tokio_util::task::TaskTracker::new();
    // An accept error (EMFILE, say) is logged, throttled, and paused on: the loop never spins.
    privlink_transport::tcp::accept_until(&listener, &stop, |socket, _| {
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let served = tokio::time::timeout(STEP_TIMEOUT, async {
                let mut tls = acceptor.accept(socket).await?;
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tls.read(&mut chunk).await?;
                    if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
                        bail!("incomplete or oversized request head");
                    }
                    head.extend_from_slice(&chunk[..n]);
                }
                let body = format!(
                    "{{\"value\":\"hello from inside the private network\",\"id\":\"https://{VAULT_NAME}/secrets/demo-secret/1\",\"attributes\":{{\"enabled\":true}}}}"
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                tls.write_all(response.as_bytes()).await?;
                tls.shutdown().await?;
                anyhow::Ok(())
            })
            .await;
            if let Ok(Err(e)) = served {
                tracing::debug!("demo vault: {e:#}");
            }
        });
    }, |_| {})
    .await;
    connections.close();
    connections.wait().await;
}
