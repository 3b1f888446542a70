//! The `destination-tls` step: a TLS handshake with the server name a client would send,
//! over a connection the destination already accepted, and the leaf certificate it presented
//! judged by name and validity. The verifier only looks (every chain is accepted so that a
//! wrong or expired certificate can be described, not just refused); nothing is sent after
//! the handshake.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use privlink_protocol::destination::{Destination, Host};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::facts::{Validity, client_server_name};
use super::{CertificateFact, Outcome, Step, timed};

/// The `destination-tls` step over an established connection.
pub(super) async fn handshake(
    deadline: Duration,
    destination: &Destination,
    stream: TcpStream,
) -> Step {
    handshake_keeping_chain(deadline, destination, stream).await.0
}

/// [`handshake`], and the chain the server presented (when the handshake completed) for the
/// caller to judge against roots of its choosing.
pub(super) async fn handshake_keeping_chain(
    deadline: Duration,
    destination: &Destination,
    stream: TcpStream,
) -> (Step, Option<Vec<CertificateDer<'static>>>) {
    let subject = destination.to_string();
    let (server_name, sni) = match &destination.host {
        Host::Name(name) => {
            let sent = client_server_name(name.as_str());
            (Some(sent.clone()), ServerName::try_from(sent).map_err(|e| e.to_string()))
        }
        Host::Ip(ip) => (None, Ok(ServerName::IpAddress((*ip).into()))),
    };
    let connector = look_only_config().map(TlsConnector::from);
    let (sni, connector) = match (sni, connector) {
        (Ok(sni), Ok(connector)) => (sni, connector),
        (Err(e), _) | (_, Err(e)) => {
            return (Step::new("destination-tls", subject, Outcome::Fail, Duration::ZERO, e), None);
        }
    };
    let (result, took) =
        timed(tokio::time::timeout(deadline, connector.connect(sni.clone(), stream))).await;
    let tls = match result {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let unrecognized = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
                == Some(&rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName));
            let detail = match (unrecognized, &server_name) {
                (true, Some(name)) => format!(
                    "the server answered unrecognized_name: it serves no `{name}` (on a privlink \
                     relay, no endpoint claims the name in server_names)"
                ),
                (true, None) => "the server answered unrecognized_name to a ClientHello \
                                 without a server name (an IP address was dialled): connect by \
                                 the name the endpoint claims"
                    .to_owned(),
                _ => format!("TLS handshake failed: {e} (does {destination} speak TLS?)"),
            };
            return (Step::new("destination-tls", subject, Outcome::Fail, took, detail), None);
        }
        Err(_) => {
            let detail = format!(
                "no TLS handshake within {:?}: the destination accepted the connection but did \
                 not answer a TLS ClientHello",
                deadline
            );
            return (Step::new("destination-tls", subject, Outcome::Fail, took, detail), None);
        }
    };
    let (_, session) = tls.get_ref();
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_owned(),
    };
    let chain: Vec<CertificateDer<'static>> = session
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let Some(leaf) = chain.first() else {
        return (
            Step::new("destination-tls", subject, Outcome::Fail, took, "no certificate"),
            None,
        );
    };
    let step = judge_certificate(subject, took, server_name, &sni, version, leaf);
    (step, Some(chain))
}

/// Reads the leaf certificate a destination presented and judges its name and validity.
fn judge_certificate(
    subject: String,
    took: Duration,
    server_name: Option<String>,
    sni: &ServerName<'_>,
    version: String,
    leaf: &CertificateDer<'_>,
) -> Step {
    let Some(summary) = privlink_transport::tls::CertificateSummary::of(leaf) else {
        return Step::new(
            "destination-tls",
            subject,
            Outcome::Fail,
            took,
            "the certificate presented is not valid X.509",
        );
    };
    let name_matches = rustls::server::ParsedCertificate::try_from(leaf)
        .is_ok_and(|parsed| rustls::client::verify_server_name(&parsed, sni).is_ok());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let validity = Validity::at(summary.not_before_unix, summary.not_after_unix, now);
    let days_left = (summary.not_after_unix - now).div_euclid(86_400);
    let shown_name = server_name.clone().unwrap_or_else(|| sni.to_str().into_owned());
    let mut step = Step::new(
        "destination-tls",
        subject,
        Outcome::Pass,
        took,
        format!(
            "{}{version}: `{}` for [{}], issued by `{}`, valid until {}",
            server_name.as_ref().map_or_else(String::new, |n| format!("SNI {n}, ")),
            summary.subject,
            summary.names.join(", "),
            summary.issuer,
            summary.not_after,
        ),
    );
    match validity {
        Validity::Valid(days) => step.detail.push_str(&format!(" ({days} days)")),
        Validity::ExpiresSoon(days) => {
            step.detail.push_str(&format!(" ({days} days)"));
            step.warn(format!(
                "the certificate expires in {days} days: clients will refuse it then"
            ));
        }
        Validity::Expired(days) => {
            step.outcome = Outcome::Fail;
            step.detail.push_str(&format!(": EXPIRED {days} days ago — clients refuse it"));
        }
        Validity::NotYetValid(days) => {
            step.outcome = Outcome::Fail;
            step.detail.push_str(&format!(": NOT VALID YET (in {days} days) — clients refuse it"));
        }
    }
    if name_matches {
        step.detail.push_str(&format!("; valid for `{shown_name}`"));
    } else {
        step.outcome = Outcome::Fail;
        step.detail.push_str(&format!(
            "; NOT valid for `{shown_name}`, the name a client sends: clients refuse it"
        ));
    }
    step.certificate = Some(CertificateFact {
        server_name,
        tls_version: version,
        subject: summary.subject,
        names: summary.names,
        issuer: summary.issuer,
        not_after: summary.not_after,
        days_left,
        name_matches,
    });
    step
}

/// A client configuration that completes any handshake (signatures still checked, so the
/// peer holds the certificate's key) and judges the certificate afterwards: the check reports
/// on a certificate clients may not trust rather than stopping at it, and sends nothing over
/// the connection.
fn look_only_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = privlink_transport::crypto::default_provider();
    let verifier = Arc::new(LookOnly(Arc::clone(&provider)));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts the certificate for later judgement; verifies handshake signatures.
#[derive(Debug)]
struct LookOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for LookOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
