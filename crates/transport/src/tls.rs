//! TLS material and the rustls configurations of the tunnel: PEM loading (every certificate
//! of a bundle, not just the first), a TLS 1.3-only server config for the relay and a client
//! config for the agent that trusts the configured relay CA, both with privlink's ALPN. The
//! agent's verifier is rustls' own, wrapped so that a rejected relay certificate is kept and
//! can be described ([`CertificateSummary`]): "not trusted" alone tells an operator nothing.
//! Their provider and key exchange come from [`crate::crypto`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
/// The certificate and key types of the tunnel's identity, for crates that hold them without
/// depending on rustls.
pub use rustls::pki_types;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::crypto::{self, PostQuantum};

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

/// The relay's TLS 1.3-only server configuration for the tunnel, accepting the key exchanges
/// `post_quantum` allows.
pub fn tunnel_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    post_quantum: PostQuantum,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto::provider(post_quantum))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The agent's TLS 1.3-only client configuration: trusts exactly `roots`, offers the key
/// exchanges `post_quantum` allows.
pub fn tunnel_client_config(
    roots: &[CertificateDer<'static>],
    post_quantum: PostQuantum,
) -> Result<rustls::ClientConfig, TlsError> {
    tunnel_client_config_with_verifier(roots, post_quantum).map(|(config, _)| config)
}

/// [`tunnel_client_config`], and its verifier, which remembers the certificates it rejected.
pub fn tunnel_client_config_with_verifier(
    roots: &[CertificateDer<'static>],
    post_quantum: PostQuantum,
) -> Result<(rustls::ClientConfig, Arc<RelayVerifier>), TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    let provider = crypto::provider(post_quantum);
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(store), Arc::clone(&provider))
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(RelayVerifier { inner, rejected: Mutex::default() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok((config, verifier))
}

/// rustls' WebPKI verification of the relay's certificate, unchanged, keeping the last
/// certificate each server name presented and had rejected.
#[derive(Debug)]
pub struct RelayVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// Server name → the end-entity certificate last rejected for it (bounded by the number of
    /// relay names the agent dials).
    rejected: Mutex<HashMap<String, CertificateDer<'static>>>,
}

impl RelayVerifier {
    /// The certificate `server_name` last presented, if it was rejected.
    pub fn rejected(&self, server_name: &str) -> Option<CertificateDer<'static>> {
        self.rejected.lock().ok()?.get(server_name).cloned()
    }
}

impl ServerCertVerifier for RelayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let (Err(_), Ok(mut rejected)) = (&verdict, self.rejected.lock()) {
            rejected.insert(server_name.to_str().into_owned(), end_entity.clone().into_owned());
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What a certificate says about itself, for error messages and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// The subject's distinguished name (`CN=relay.example.com`).
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// DNS names and IP addresses of the subject-alternative-name extension.
    pub names: Vec<String>,
    /// End of validity, RFC 2822.
    pub not_after: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// SHA-256 of the certificate, the first 8 bytes as `openssl x509 -fingerprint -sha256`
    /// prints them (`AB:CD:…`), enough to tell two apart.
    pub fingerprint: String,
    /// Its subject key identifier, hex, when it has one (a CA's names the key it signs with).
    pub key_id: Option<String>,
    /// Its authority key identifier, hex, when it has one: the key id of the CA that signed it.
    pub issuer_key_id: Option<String>,
}

/// When the first of `certificates` (a peer's end-entity certificate) expires, in seconds
/// since the Unix epoch.
pub(crate) fn leaf_expiry(certificates: &[CertificateDer<'_>]) -> Option<i64> {
    CertificateSummary::of(certificates.first()?).map(|c| c.not_after_unix)
}

impl CertificateSummary {
    /// Parses a DER certificate (bytes from a peer: the parser is bounded by the input and
    /// never panics); `None` when it is not a valid X.509 certificate.
    pub fn of(der: &CertificateDer<'_>) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => names.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string(),
                        ),
                        16 => names.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).ok()?)
                                .to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        use x509_parser::extensions::ParsedExtension;
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let (mut key_id, mut issuer_key_id) = (None, None);
        for extension in cert.extensions() {
            match extension.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => key_id = Some(hex(id.0)),
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    issuer_key_id = aki.key_identifier.as_ref().map(|id| hex(id.0));
                }
                _ => {}
            }
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
        let fingerprint: Vec<String> =
            digest.as_ref()[..8].iter().map(|b| format!("{b:02X}")).collect();
        Some(Self {
            fingerprint: format!("{}…", fingerprint.join(":")),
            key_id,
            issuer_key_id,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            names,
            not_after: cert
                .validity()
                .not_after
                .to_rfc2822()
                .unwrap_or_else(|_| cert.validity().not_after.to_string()),
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
        })
    }
}
