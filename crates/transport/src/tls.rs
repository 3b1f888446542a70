//! TLS material and the rustls configurations of the tunnel: PEM loading (every certificate
//! of a bundle, not just the first), a TLS 1.3-only server config for the relay and a client
//! config for the agent that trusts the configured relay CA, both with privlink's ALPN.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol name: the protocol and its major version.
pub const ALPN: &[u8] = b"privlink/1";

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the material (mismatched key, unsupported algorithm, …).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem { path: path.display().to_string(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        message: format!("no usable private key: {e}"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The relay's TLS 1.3-only server configuration for the tunnel.
pub fn tunnel_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The agent's TLS 1.3-only client configuration: trusts exactly `roots`.
pub fn tunnel_client_config(
    roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}
