//! A small private PKI (feature `pki`): a CA and the certificates it signs, for
//! `privlink certs init`, the demo and tests. Production deployments may use any CA; this
//! exists so a first deployment needs nothing else.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How long a CA made here is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a server certificate made here is valid (the common ceiling for server certificates).
pub const SERVER_VALIDITY: Duration = Duration::from_secs(825 * 24 * 3600);
/// Certificates start this long before they are made, for peers whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);

/// Sets a validity window of `length` starting (backdated) now.
fn set_validity(params: &mut CertificateParams, length: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + length).into();
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation: {0}")]
pub struct PkiError(#[from] rcgen::Error);

/// A certificate and its private key, in PEM and DER.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, DER.
    pub key_der: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("key", &"<redacted>").finish_non_exhaustive()
    }
}

fn issued(cert_pem: String, cert_der: CertificateDer<'static>, key: &KeyPair) -> Issued {
    Issued {
        cert_pem,
        key_pem: key.serialize_pem(),
        cert_der,
        key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// A certificate authority that can sign server certificates.
#[derive(Debug)]
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA's own certificate and key.
    pub identity: Issued,
}

impl CertificateAuthority {
    /// A new self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        Self::with_key(common_name, KeyPair::generate()?)
    }

    /// A new CA named `prefix`, the day it was made and a short id of its key
    /// (`privlink private CA 2026-12-07 3f9a1c22`): every CA `certs init` makes has a name of
    /// its own, so that a message comparing the CA a relay's certificate names with the one
    /// an agent trusts compares two different names when they differ.
    pub fn new_distinct(prefix: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key_raw());
        let key_id: String = digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
        let today = time::OffsetDateTime::now_utc().date();
        Self::with_key(&format!("{prefix} {today} {key_id}"), key)
    }

    fn with_key(common_name: &str, key: KeyPair) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        // pathlen:0 — this CA signs server certificates, never other CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        set_validity(&mut params, CA_VALIDITY);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let identity_key_pem = key.serialize_pem();
        let identity_key_der = key.serialize_der();
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        let identity = Issued {
            cert_pem: issuer.pem(),
            key_pem: identity_key_pem,
            cert_der: issuer.der().clone(),
            key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity_key_der)),
        };
        Ok(Self { issuer, identity })
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        self.issue_server_valid_for(names, SERVER_VALIDITY)
    }

    /// [`issue_server`](Self::issue_server) with a validity of `length` from now (tests of
    /// expiry warnings use short ones).
    pub fn issue_server_valid_for(
        &self,
        names: &[&str],
        length: Duration,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("privlink"));
        params.distinguished_name = dn;
        // Names the CA's key: an agent that does not trust it can say which CA it needs.
        params.use_authority_key_identifier_extension = true;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into()?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, length);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(issued(cert.pem(), cert.der().clone(), &key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_cas_have_distinct_names_with_their_day() {
        let summary = |ca: &CertificateAuthority| {
            crate::tls::CertificateSummary::of(&ca.identity.cert_der).expect("parses").subject
        };
        let (a, b) = (
            CertificateAuthority::new_distinct("privlink private CA").expect("CA"),
            CertificateAuthority::new_distinct("privlink private CA").expect("CA"),
        );
        let today = time::OffsetDateTime::now_utc().date().to_string();
        assert!(summary(&a).contains(&format!("privlink private CA {today} ")), "{}", summary(&a));
        assert_ne!(summary(&a), summary(&b));
    }

    #[test]
    fn certificates_have_finite_validity_and_the_ca_signs_no_other_ca() {
        let ca = CertificateAuthority::new("test CA").expect("CA");
        let server = ca.issue_server(&["localhost"]).expect("server");
        let parse = |der: &CertificateDer<'_>| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
            let validity = cert.validity();
            let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
            let path_len = cert
                .basic_constraints()
                .ok()
                .flatten()
                .map(|bc| (bc.value.ca, bc.value.path_len_constraint));
            (days, path_len)
        };
        let (ca_days, ca_constraints) = parse(&ca.identity.cert_der);
        assert_eq!(ca_days, 3650 + 1, "CA validity in days (backdated one day)");
        assert_eq!(ca_constraints, Some((true, Some(0))), "CA with pathlen:0");
        let (server_days, server_constraints) = parse(&server.cert_der);
        assert_eq!(server_days, 825 + 1, "server validity in days");
        assert!(!matches!(server_constraints, Some((true, _))), "the server certificate is no CA");
    }
}
