//! What `privlink check` concludes from names and addresses alone, without I/O: whether an
//! address is private, which private DNS zone a Private Link name belongs to, the server name a
//! client sends for it, and how near a certificate's expiry is.

use std::net::IpAddr;

use serde::Serialize;

use crate::allowlist::{reached_address, special_address_kind};

/// A certificate expiring within this many days is a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// What kind of address a destination name resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressClass {
    /// RFC 1918 (10/8, 172.16/12, 192.168/16).
    Private,
    /// IPv6 unique-local, fc00::/7 (RFC 4193).
    UniqueLocal,
    /// Shared address space, 100.64/10 (RFC 6598), used by carrier-grade NAT.
    Cgnat,
    /// Loopback, link-local, metadata and other addresses the agent refuses by default.
    Special,
    /// Anything else: routed on the internet (or meant to be).
    Public,
}

impl AddressClass {
    /// Classifies `ip` (an IPv4 address in IPv6 clothing as the IPv4 address it reaches).
    pub fn of(ip: IpAddr) -> Self {
        if special_address_kind(ip).is_some() {
            return Self::Special;
        }
        match reached_address(ip) {
            IpAddr::V4(v4) if v4.is_private() => Self::Private,
            IpAddr::V4(v4) if v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 => Self::Cgnat,
            IpAddr::V6(v6) if (v6.segments()[0] & 0xfe00) == 0xfc00 => Self::UniqueLocal,
            _ => Self::Public,
        }
    }

    /// Whether this is an address of a private network (RFC 1918, unique-local or CGNAT).
    pub fn is_private(self) -> bool {
        matches!(self, Self::Private | Self::UniqueLocal | Self::Cgnat)
    }

    /// For messages: "private, RFC 1918", "public", …
    pub fn describe(self, ip: IpAddr) -> String {
        match self {
            Self::Private => "private, RFC 1918".to_owned(),
            Self::UniqueLocal => "private, unique-local".to_owned(),
            Self::Cgnat => "private, CGNAT range".to_owned(),
            Self::Special => special_address_kind(ip).unwrap_or("special").to_owned(),
            Self::Public => "public".to_owned(),
        }
    }
}

/// The private DNS zone a Private Link name lives in: for
/// `kv1.privatelink.vaultcore.azure.net`, `privatelink.vaultcore.azure.net` — the zone that
/// must be linked to the network the agent runs in. `None` for other names.
pub fn private_link_zone(host: &str) -> Option<&str> {
    let host = host.trim_end_matches('.');
    let mut offset = 0;
    for label in host.split('.') {
        if label.eq_ignore_ascii_case("privatelink") && offset > 0 {
            return Some(&host[offset..]);
        }
        offset += label.len() + 1;
    }
    None
}

/// Private Link zones whose public name is not the zone without `privatelink.`.
const PUBLIC_ZONES: &[(&str, &str)] = &[
    ("privatelink.vaultcore.azure.net", "vault.azure.net"),
    ("privatelink.vaultcore.azure.cn", "vault.azure.cn"),
    ("privatelink.vaultcore.usgovcloudapi.net", "vault.usgovcloudapi.net"),
];

/// The server name a client sends when it reaches `host`: a Private Link name is reached
/// under its public name (`kv1.privatelink.vaultcore.azure.net` → `kv1.vault.azure.net`,
/// `x.privatelink.blob.core.windows.net` → `x.blob.core.windows.net`), which is also the
/// name the service's certificate carries; other names are sent as they are.
pub fn client_server_name(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let Some(zone) = private_link_zone(&host) else { return host };
    let resource = &host[..host.len() - zone.len()]; // "kv1."
    let public_zone = PUBLIC_ZONES.iter().find(|(private, _)| *private == zone).map_or_else(
        || zone["privatelink.".len()..].to_owned(),
        |(_, public)| (*public).to_owned(),
    );
    format!("{resource}{public_zone}")
}

/// How a certificate's validity stands at `now` (seconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid for this many more whole days, at least [`EXPIRY_WARNING_DAYS`].
    Valid(i64),
    /// Valid, but for fewer than [`EXPIRY_WARNING_DAYS`] whole days.
    ExpiresSoon(i64),
    /// Expired this many whole days ago (0: today).
    Expired(i64),
    /// Not valid before this many more whole days (0: later today).
    NotYetValid(i64),
}

impl Validity {
    /// Judges a validity period against `now`.
    pub fn at(not_before: i64, not_after: i64, now: i64) -> Self {
        const DAY: i64 = 86_400;
        if now < not_before {
            Self::NotYetValid((not_before - now) / DAY)
        } else if now > not_after {
            Self::Expired((now - not_after) / DAY)
        } else {
            let days = (not_after - now) / DAY;
            if days < EXPIRY_WARNING_DAYS { Self::ExpiresSoon(days) } else { Self::Valid(days) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_classified() {
        let class = |s: &str| AddressClass::of(s.parse().expect("address"));
        assert_eq!(class("10.1.2.3"), AddressClass::Private);
        assert_eq!(class("172.31.255.1"), AddressClass::Private);
        assert_eq!(class("172.32.0.1"), AddressClass::Public);
        assert_eq!(class("192.168.0.9"), AddressClass::Private);
        assert_eq!(class("100.64.0.1"), AddressClass::Cgnat);
        assert_eq!(class("100.127.255.255"), AddressClass::Cgnat);
        assert_eq!(class("100.128.0.1"), AddressClass::Public);
        assert_eq!(class("fd00::1"), AddressClass::UniqueLocal);
        assert_eq!(class("fc12::1"), AddressClass::UniqueLocal);
        assert_eq!(class("2001:db8::1"), AddressClass::Public);
        assert_eq!(class("203.0.113.5"), AddressClass::Public);
        assert_eq!(class("::ffff:10.0.0.1"), AddressClass::Private);
        assert_eq!(class("127.0.0.1"), AddressClass::Special);
        assert_eq!(class("169.254.169.254"), AddressClass::Special);
        assert!(AddressClass::Cgnat.is_private());
        assert!(!AddressClass::Special.is_private());
        assert!(!AddressClass::Public.is_private());
    }

    #[test]
    fn private_link_names_give_their_zone_and_public_name() {
        assert_eq!(
            private_link_zone("kv1.privatelink.vaultcore.azure.net"),
            Some("privatelink.vaultcore.azure.net")
        );
        assert_eq!(
            private_link_zone("kv1.PrivateLink.vaultcore.azure.net."),
            Some("PrivateLink.vaultcore.azure.net")
        );
        assert_eq!(private_link_zone("privatelink.example.net"), None);
        assert_eq!(private_link_zone("kv1.vault.azure.net"), None);
        assert_eq!(private_link_zone("notprivatelink.example.net"), None);
        assert_eq!(
            client_server_name("kv1.privatelink.vaultcore.azure.net"),
            "kv1.vault.azure.net"
        );
        assert_eq!(client_server_name("KV1.privatelink.vaultcore.azure.cn."), "kv1.vault.azure.cn");
        assert_eq!(
            client_server_name("acct.privatelink.blob.core.windows.net"),
            "acct.blob.core.windows.net"
        );
        assert_eq!(client_server_name("vault.example.net"), "vault.example.net");
    }

    #[test]
    fn validity_is_judged_in_whole_days() {
        const DAY: i64 = 86_400;
        let now = 1_000 * DAY;
        assert_eq!(Validity::at(now - DAY, now + 90 * DAY, now), Validity::Valid(90));
        assert_eq!(Validity::at(now - DAY, now + 30 * DAY, now), Validity::Valid(30));
        assert_eq!(Validity::at(now - DAY, now + 29 * DAY + 5, now), Validity::ExpiresSoon(29));
        assert_eq!(Validity::at(now - DAY, now + 5, now), Validity::ExpiresSoon(0));
        assert_eq!(Validity::at(now - 9 * DAY, now - 2 * DAY - 1, now), Validity::Expired(2));
        assert_eq!(Validity::at(now + 3 * DAY, now + 90 * DAY, now), Validity::NotYetValid(3));
    }
}
