//! Stand-ins for key vaults: HTTPS servers whose certificate (from a test CA) names the vault —
//! one answering every request with `200` and the vault's name as the body, so a client can
//! tell which vault it reached and verify that vault's own certificate end to end; one speaking
//! enough of Key Vault (the bearer challenge, a secret) for the Azure SDK — and the ClientHello
//! a client writes, to send by hand.

use std::net::SocketAddr;
use std::sync::Arc;

use privlink_transport::pki::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts an HTTPS "vault" for `name` on loopback, its certificate issued by `ca`.
pub async fn https_vault(ca: &CertificateAuthority, name: &str) -> SocketAddr {
    serve_https(ca, name, |vault, _head| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{vault}",
            vault.len()
        )
    })
    .await
}

/// An HTTPS server on loopback for `name` (its certificate issued by `ca`) that reads each
/// connection's request head (bounded) and writes what `answer` makes of it (given the name and
/// the head), then closes.
async fn serve_https(
    ca: &CertificateAuthority,
    name: &str,
    answer: fn(&str, &str) -> String,
) -> SocketAddr {
    let issued = ca.issue_server(&[name]).expect("vault certificate");
    let config =
        rustls::ServerConfig::builder_with_provider(privlink_transport::crypto::default_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![issued.cert_der], issued.key_der)
            .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind vault");
    let addr = listener.local_addr().expect("addr");
    let vault = name.to_owned();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, vault) = (acceptor.clone(), vault.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = answer(&vault, &String::from_utf8_lossy(&head));
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// The ClientHello rustls writes for `name` (to send by hand, a byte at a time, say).
pub fn client_hello_for(name: &str) -> Vec<u8> {
    let config =
        rustls::ClientConfig::builder_with_provider(privlink_transport::crypto::default_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut client = rustls::ClientConnection::new(Arc::new(config), server).expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("ClientHello");
    hello
}

/// The answer a Key Vault-like server gives a request head: without the bearer token, a 401
/// with the challenge Azure SDKs parse (`resource` on `vault.azure.net`, which their challenge
/// verification checks against the vault's name); with it, secret `name` as Key Vault's JSON.
fn key_vault_answer(vault: &str, head: &str) -> String {
    let authorized = head
        .lines()
        .any(|line| line.to_ascii_lowercase().starts_with("authorization: bearer test-token"));
    if !authorized {
        return "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer \
                authorization=\"https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000\", \
                resource=\"https://vault.azure.net\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_owned();
    }
    let secret = head.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/");
    let name = secret.trim_end_matches('/').rsplit('/').next().unwrap_or("secret");
    let body = format!(
        "{{\"value\":\"{vault}/{name}\",\"id\":\"https://{vault}/secrets/{name}/1\",\
         \"attributes\":{{\"enabled\":true}}}}"
    );
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A Key Vault stand-in for `name` (`<vault>.vault.azure.net`): HTTPS with a certificate for
/// the name from `ca`, the bearer challenge, and secrets whose value is `<name>/<secret>`.
pub async fn https_key_vault(ca: &CertificateAuthority, name: &str) -> SocketAddr {
    serve_https(ca, name, key_vault_answer).await
}
