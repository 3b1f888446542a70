//! The one place privlink's cryptography is chosen. Every rustls `CryptoProvider` — the
//! tunnel's server and client on both transports, the agent's `check` probes, the demo's and
//! the tests' servers — is built here, on aws-lc-rs, with the key exchange `post_quantum`
//! asks for; nothing relies on a process-wide default provider. The hybrid X25519MLKEM768
//! (ML-KEM-768 with X25519, the group browsers and Cloudflare use) comes first unless told
//! `off`; with `require` it is the only one. A build with the `fips` feature starts from
//! rustls' FIPS provider (the AWS-LC FIPS 140-3 module; AES-GCM suites only) and keeps only the
//! groups that provider counts as approved: X25519MLKEM768 (ML-KEM first in the hybrid), P-256
//! and P-384 — not X25519. [`Posture`] says what a build and a setting amount to, for
//! `--version`, the start-up log and the metrics.

use std::sync::Arc;

use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};

pub use privlink_protocol::config::{PostQuantum, TunnelCrypto};

/// The provider's name, as `--version`, the log and `privlink_build_info{crypto}` say it.
pub const PROVIDER: &str = "aws-lc-rs";

/// The provider for the tunnel's TLS (TLS/TCP and QUIC) with `post_quantum`'s key exchange.
pub fn provider(post_quantum: PostQuantum) -> Arc<CryptoProvider> {
    #[cfg(not(feature = "fips"))]
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(feature = "fips")]
    let mut provider = rustls::crypto::default_fips_provider();
    provider.kx_groups = key_exchange_groups(post_quantum);
    Arc::new(provider)
}

/// The provider for connections that are not the tunnel's (`check`'s probes of destinations,
/// test servers and clients): the same library and defaults, post-quantum preferred.
pub fn default_provider() -> Arc<CryptoProvider> {
    provider(PostQuantum::Prefer)
}

/// The key exchange groups offered (client) or accepted (server), in order of preference; in a
/// FIPS build only those the FIPS provider approves (X25519 is not).
pub fn key_exchange_groups(post_quantum: PostQuantum) -> Vec<&'static dyn SupportedKxGroup> {
    let mut groups = every_key_exchange_group(post_quantum);
    if cfg!(feature = "fips") {
        groups.retain(|group| group.fips());
    }
    groups
}

/// [`key_exchange_groups`]' names, comma-separated (`X25519MLKEM768, X25519, secp256r1, …`).
pub fn group_names(post_quantum: PostQuantum) -> String {
    let names: Vec<String> = key_exchange_groups(post_quantum)
        .iter()
        .map(|group| {
            let name = group.name();
            name.as_str().map_or_else(|| format!("{name:?}"), str::to_owned)
        })
        .collect();
    names.join(", ")
}

fn every_key_exchange_group(post_quantum: PostQuantum) -> Vec<&'static dyn SupportedKxGroup> {
    match post_quantum {
        PostQuantum::Prefer => vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        PostQuantum::Require => vec![kx_group::X25519MLKEM768],
        PostQuantum::Off => vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
    }
}

/// What one tunnel connection's TLS negotiated: what the status API shows per link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    /// `TLS 1.3`.
    pub version: String,
    /// The cipher suite (`TLS13_AES_256_GCM_SHA384`).
    pub cipher: String,
    /// The key exchange group (`X25519MLKEM768`).
    pub key_exchange: String,
    /// Whether that group is post-quantum.
    pub post_quantum: bool,
}

impl TlsSummary {
    /// What a finished rustls handshake negotiated (`None` before it finished).
    pub fn of(state: &rustls::CommonState) -> Option<Self> {
        let version = state.protocol_version()?;
        let cipher = state.negotiated_cipher_suite()?.suite();
        let group = state.negotiated_key_exchange_group()?.name();
        Some(Self::negotiated(version, cipher, group))
    }

    /// The summary of a handshake that negotiated `version`, `cipher` and `group`.
    pub fn negotiated(
        version: rustls::ProtocolVersion,
        cipher: rustls::CipherSuite,
        group: rustls::NamedGroup,
    ) -> Self {
        let version = match version {
            rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3".to_owned(),
            rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2".to_owned(),
            other => format!("{other:?}"),
        };
        Self {
            version,
            cipher: cipher.as_str().map_or_else(|| format!("{cipher:?}"), str::to_owned),
            key_exchange: group.as_str().map_or_else(|| format!("{group:?}"), str::to_owned),
            post_quantum: is_post_quantum(group),
        }
    }

    /// What a rustls server with `provider` chooses for a TLS 1.3 ClientHello offering
    /// `groups` and `suites`: the first of the *client's* groups it supports, and the first of
    /// the client's suites (rustls `server::hs::choose_suite_and_kx_group`, with the client's
    /// order honoured as privlink's configurations leave it). For QUIC, whose connection quinn
    /// does not show: see [`ClientHelloRecorder`].
    pub fn chosen_by(
        provider: &CryptoProvider,
        groups: &[rustls::NamedGroup],
        suites: &[rustls::CipherSuite],
    ) -> Option<Self> {
        let group = groups.iter().find(|g| provider.kx_groups.iter().any(|k| k.name() == **g))?;
        let suite = suites.iter().find(|s| {
            provider.cipher_suites.iter().any(|c| {
                c.suite() == **s && c.version().version == rustls::ProtocolVersion::TLSv1_3
            })
        })?;
        Some(Self::negotiated(rustls::ProtocolVersion::TLSv1_3, *suite, *group))
    }
}

/// A certificate resolver that remembers the last ClientHello's key exchange groups and cipher
/// suites before handing the choice of certificate to the real resolver: given to one QUIC
/// connection's rustls configuration, it tells what that connection negotiated.
#[derive(Debug)]
pub struct ClientHelloRecorder {
    inner: Arc<dyn rustls::server::ResolvesServerCert>,
    seen: std::sync::Mutex<Option<(Vec<rustls::NamedGroup>, Vec<rustls::CipherSuite>)>>,
}

impl ClientHelloRecorder {
    /// `config`, its certificate resolver wrapped in a recorder (returned too).
    pub fn wrap(config: &rustls::ServerConfig) -> (rustls::ServerConfig, Arc<Self>) {
        let recorder = Arc::new(Self {
            inner: Arc::clone(&config.cert_resolver),
            seen: std::sync::Mutex::default(),
        });
        let mut config = config.clone();
        config.cert_resolver = Arc::clone(&recorder) as Arc<dyn rustls::server::ResolvesServerCert>;
        (config, recorder)
    }

    /// What the server (with `provider`) chose for the last ClientHello seen.
    pub fn chosen(&self, provider: &CryptoProvider) -> Option<TlsSummary> {
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (groups, suites) = seen.as_ref()?;
        TlsSummary::chosen_by(provider, groups, suites)
    }
}

impl rustls::server::ResolvesServerCert for ClientHelloRecorder {
    fn resolve(
        &self,
        client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let groups = client_hello.named_groups().unwrap_or_default().to_vec();
        let suites = client_hello.cipher_suites().to_vec();
        *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((groups, suites));
        self.inner.resolve(client_hello)
    }
}

/// Whether `group` (a negotiated key exchange's name) is post-quantum.
pub fn is_post_quantum(group: rustls::NamedGroup) -> bool {
    matches!(
        group,
        rustls::NamedGroup::X25519MLKEM768
            | rustls::NamedGroup::secp256r1MLKEM768
            | rustls::NamedGroup::MLKEM768
            | rustls::NamedGroup::MLKEM1024
    )
}

/// A build's cryptography and a role's setting: what `--version`, the start-up line and
/// `privlink_build_info` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posture {
    /// The provider ([`PROVIDER`]).
    pub provider: &'static str,
    /// Whether the provider runs in FIPS mode.
    pub fips: bool,
    /// The tunnel's key exchange setting.
    pub post_quantum: PostQuantum,
}

impl Posture {
    /// This build with `post_quantum`.
    pub fn of(post_quantum: PostQuantum) -> Self {
        Self { provider: PROVIDER, fips: provider(post_quantum).fips(), post_quantum }
    }
}

/// Whether this build's provider runs in FIPS mode (with the key exchange it would use by
/// default).
pub fn fips_mode() -> bool {
    default_provider().fips()
}

impl std::fmt::Display for Posture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "crypto {}, FIPS {}, post-quantum key exchange {}",
            self.provider,
            if self.fips { "yes" } else { "no" },
            self.post_quantum
        )
    }
}

/// Why `fips = true` cannot be honoured by this build, if it cannot.
pub fn fips_refusal(post_quantum: PostQuantum) -> Option<String> {
    (!Posture::of(post_quantum).fips).then(|| {
        format!(
            "this build's crypto ({PROVIDER}) is not in FIPS mode: use a FIPS build of privlink \
             (`cargo build --release --features fips`; see the README) or remove the key"
        )
    })
}

/// What an agent is told when the relay refused its key exchange (`handshake_failure`), from
/// its own setting.
pub fn refused_key_exchange(own: PostQuantum, failure: &str) -> String {
    match own {
        PostQuantum::Require => format!(
            "{failure} — this agent has post_quantum = \"require\" and the relay does not \
             offer X25519MLKEM768 (a relay with post_quantum = \"off\", or an older release); \
             set post_quantum = \"prefer\" here to accept a classical key exchange"
        ),
        PostQuantum::Off => format!(
            "{failure} — this agent has post_quantum = \"off\"; the relay probably has \
             post_quantum = \"require\": set post_quantum = \"prefer\" (the default) here"
        ),
        PostQuantum::Prefer => format!(
            "{failure} — the relay accepted none of the key exchanges and cipher suites this \
             agent offers"
        ),
    }
}

/// What a relay logs when an agent offered none of the key exchanges it accepts.
pub fn no_common_key_exchange(own: PostQuantum) -> &'static str {
    match own {
        PostQuantum::Require => {
            "the agent offered no X25519MLKEM768 key exchange and this relay has post_quantum \
             = \"require\" (the agent has post_quantum = \"off\", or is an older release)"
        }
        PostQuantum::Prefer | PostQuantum::Off => {
            "the agent offered none of the key exchanges this relay accepts"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_offer_the_groups_they_say() {
        let names = |pq| -> Vec<rustls::NamedGroup> {
            key_exchange_groups(pq).iter().map(|g| g.name()).collect()
        };
        assert_eq!(names(PostQuantum::Prefer)[0], rustls::NamedGroup::X25519MLKEM768);
        assert_eq!(names(PostQuantum::Require), vec![rustls::NamedGroup::X25519MLKEM768]);
        assert!(names(PostQuantum::Off).iter().all(|g| !is_post_quantum(*g)));
        assert!(!names(PostQuantum::Off).is_empty());
        assert_eq!(u16::from(rustls::NamedGroup::X25519MLKEM768), 0x11ec);
        if cfg!(feature = "fips") {
            assert_eq!(group_names(PostQuantum::Prefer), "X25519MLKEM768, secp256r1, secp384r1");
            assert_eq!(group_names(PostQuantum::Off), "secp256r1, secp384r1");
        } else {
            assert_eq!(
                group_names(PostQuantum::Prefer),
                "X25519MLKEM768, X25519, secp256r1, secp384r1"
            );
            assert_eq!(group_names(PostQuantum::Off), "X25519, secp256r1, secp384r1");
        }
    }

    #[test]
    fn a_fips_build_offers_only_what_its_module_approves() {
        for setting in [PostQuantum::Prefer, PostQuantum::Require, PostQuantum::Off] {
            let provider = provider(setting);
            assert_eq!(provider.fips(), cfg!(feature = "fips"), "{setting}");
            if cfg!(feature = "fips") {
                assert!(provider.kx_groups.iter().all(|group| group.fips()), "{setting}");
                assert!(provider.cipher_suites.iter().all(|suite| suite.fips()), "{setting}");
            }
        }
        assert_eq!(fips_refusal(PostQuantum::Prefer).is_none(), cfg!(feature = "fips"));
    }

    #[test]
    #[cfg(not(feature = "fips"))] // it offers X25519 and ChaCha20, which a FIPS build does not
    fn a_server_chooses_the_clients_first_group_and_suite_it_supports() {
        use rustls::{CipherSuite, NamedGroup};
        let server = provider(PostQuantum::Prefer);
        let client_groups = [NamedGroup::X25519, NamedGroup::X25519MLKEM768];
        let suites =
            [CipherSuite::TLS13_CHACHA20_POLY1305_SHA256, CipherSuite::TLS13_AES_128_GCM_SHA256];
        let chosen = TlsSummary::chosen_by(&server, &client_groups, &suites).expect("chosen");
        assert_eq!(chosen.key_exchange, "X25519", "the client's order");
        assert_eq!(chosen.cipher, "TLS13_CHACHA20_POLY1305_SHA256");
        assert!(!chosen.post_quantum);
        let pq_first = [NamedGroup::X25519MLKEM768, NamedGroup::X25519];
        let chosen = TlsSummary::chosen_by(&server, &pq_first, &suites).expect("chosen");
        assert_eq!((chosen.key_exchange.as_str(), chosen.post_quantum), ("X25519MLKEM768", true));
        let classical = provider(PostQuantum::Off);
        let chosen = TlsSummary::chosen_by(&classical, &pq_first, &suites).expect("chosen");
        assert_eq!(chosen.key_exchange, "X25519", "the first the server supports");
        let required = provider(PostQuantum::Require);
        assert_eq!(TlsSummary::chosen_by(&required, &[NamedGroup::X25519], &suites), None);
    }

    #[test]
    fn the_posture_says_provider_fips_and_setting() {
        let posture = Posture::of(PostQuantum::Prefer);
        let fips = if cfg!(feature = "fips") { "yes" } else { "no" };
        assert_eq!(
            posture.to_string(),
            format!("crypto aws-lc-rs, FIPS {fips}, post-quantum key exchange prefer")
        );
    }
}
