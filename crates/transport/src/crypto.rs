//! The one place privlink's cryptography is chosen. Every rustls `CryptoProvider` — the
//! tunnel's server and client on both transports, the agent's `check` probes, the demo's and
//! the tests' servers — is built here, on aws-lc-rs, with the key exchange `post_quantum`
//! asks for; nothing relies on a process-wide default provider. The hybrid X25519MLKEM768
//! (ML-KEM-768 with X25519, the group browsers and Cloudflare use) comes first unless told
//! `off`; with `require` it is the only one. [`Posture`] says what a build and a setting
//! amount to, for `--version`, the start-up log and the metrics.

use std::sync::Arc;

use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};

pub use privlink_protocol::config::{PostQuantum, TunnelCrypto};

/// The provider's name, as `--version`, the log and `privlink_build_info{crypto}` say it.
pub const PROVIDER: &str = "aws-lc-rs";

/// The provider for the tunnel's TLS (TLS/TCP and QUIC) with `post_quantum`'s key exchange.
pub fn provider(post_quantum: PostQuantum) -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = key_exchange_groups(post_quantum);
    Arc::new(provider)
}

/// The provider for connections that are not the tunnel's (`check`'s probes of destinations,
/// test servers and clients): the same library and defaults, post-quantum preferred.
pub fn default_provider() -> Arc<CryptoProvider> {
    provider(PostQuantum::Prefer)
}

/// The key exchange groups offered (client) or accepted (server), in order of preference.
pub fn key_exchange_groups(post_quantum: PostQuantum) -> Vec<&'static dyn SupportedKxGroup> {
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
        assert_eq!(names(PostQuantum::Prefer)[1], rustls::NamedGroup::X25519);
        assert_eq!(names(PostQuantum::Require), vec![rustls::NamedGroup::X25519MLKEM768]);
        assert!(names(PostQuantum::Off).iter().all(|g| !is_post_quantum(*g)));
        assert_eq!(u16::from(rustls::NamedGroup::X25519MLKEM768), 0x11ec);
    }

    #[test]
    fn the_posture_says_provider_fips_and_setting() {
        let posture = Posture::of(PostQuantum::Prefer);
        assert_eq!(
            posture.to_string(),
            "crypto aws-lc-rs, FIPS no, post-quantum key exchange prefer"
        );
    }
}
