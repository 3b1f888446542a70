//! The agent's consent: which destinations it opens. The agent is the last line of defence
//! for the private network, so the relay's word is never enough: every endpoint and every
//! stream is checked here.
//!
//! A rule is `host:port` with an exact port; the host is an exact name, an IP literal, or
//! `*.suffix`, where `*` stands for exactly one DNS label (as in TLS wildcard certificates).
//! Independently of the rules, addresses that reach the agent's own host or the cloud's
//! instance services — loopback, link-local (which contains 169.254.169.254), unspecified,
//! multicast, and the IPv6 metadata address fd00:ec2::254 — are refused unless the matching
//! rule names them explicitly (the same IP literal, or `localhost` for loopback).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use privlink_protocol::destination::Destination;
pub use privlink_protocol::pattern::{DestinationPattern, HostPattern};

/// AWS's IPv6 instance metadata address.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// The instance metadata address of most clouds (inside link-local, named for clearer errors).
const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Alibaba Cloud's instance metadata address.
const ALIBABA_METADATA_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// Azure's host address (WireServer, the IMDS fallback and DNS), reachable from every Azure VM —
/// and this product's agents run in Azure VNets.
const AZURE_HOST_V4: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
/// The NAT64 well-known prefix (RFC 6052): 64:ff9b::/96 reaches the IPv4 address in its last
/// 32 bits.
const NAT64_PREFIX: [u16; 6] = [0x64, 0xff9b, 0, 0, 0, 0];

/// The IPv4 address an IPv6 address reaches, in every form that does: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated but still routed by some
/// stacks) and NAT64 (`64:ff9b::a.b.c.d`). Other addresses are returned unchanged.
pub fn reached_address(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip.to_canonical() else { return ip.to_canonical() };
    let segments = v6.segments();
    let embedded = || {
        let o = v6.octets();
        IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    };
    if segments[..6] == NAT64_PREFIX {
        return embedded();
    }
    // IPv4-compatible, but not :: and ::1, which are IPv6's own unspecified and loopback.
    if segments[..6] == [0; 6] && (segments[6] != 0 || segments[7] > 1) {
        return embedded();
    }
    IpAddr::V6(v6)
}

/// The kind of a special address the agent refuses by default, or `None` for an ordinary one.
pub fn special_address_kind(ip: IpAddr) -> Option<&'static str> {
    match reached_address(ip) {
        IpAddr::V4(v4) if v4 == METADATA_V4 || v4 == ALIBABA_METADATA_V4 => Some("cloud metadata"),
        IpAddr::V4(v4) if v4 == AZURE_HOST_V4 => Some("Azure host (WireServer)"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() => Some("unspecified/broadcast"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("multicast"),
        IpAddr::V6(v6) if v6 == AWS_METADATA_V6 => Some("cloud metadata"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("loopback"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        _ => None,
    }
}

/// The agent's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    /// Rules in configuration order.
    pub rules: Vec<DestinationPattern>,
}

impl Allowlist {
    /// The first rule that admits `destination`.
    pub fn matching(&self, destination: &Destination) -> Option<&DestinationPattern> {
        self.rules.iter().find(|r| r.matches(destination))
    }

    /// Whether some destination `pattern` admits is allowed by a rule.
    pub fn overlapping(&self, pattern: &DestinationPattern) -> bool {
        self.rules.iter().any(|r| r.overlaps(pattern))
    }

    /// The rules as text, for the hello.
    pub fn describe(&self) -> Vec<String> {
        self.rules.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> DestinationPattern {
        s.parse().expect("rule")
    }

    #[test]
    fn special_addresses_are_classified() {
        let kind = |s: &str| special_address_kind(s.parse().expect("ip"));
        assert_eq!(kind("127.0.0.1"), Some("loopback"));
        assert_eq!(kind("127.8.9.10"), Some("loopback"));
        assert_eq!(kind("::1"), Some("loopback"));
        assert_eq!(kind("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(kind("169.254.169.254"), Some("cloud metadata"));
        assert_eq!(kind("fd00:ec2::254"), Some("cloud metadata"));
        assert_eq!(kind("169.254.1.1"), Some("link-local"));
        assert_eq!(kind("fe80::1"), Some("link-local"));
        assert_eq!(kind("0.0.0.0"), Some("unspecified/broadcast"));
        assert_eq!(kind("10.1.2.3"), None);
        assert_eq!(kind("2001:db8::1"), None);
    }

    #[test]
    fn only_explicit_rules_lift_the_special_refusal() {
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        assert!(rule("127.0.0.1:8443").names_address(lo));
        assert!(rule("localhost:8443").names_address(lo));
        assert!(!rule("127.0.0.2:8443").names_address(lo));
        assert!(!rule("vault.internal:8443").names_address(lo));
        assert!(!rule("*.internal:8443").names_address(lo));
        assert!(!rule("localhost:80").names_address("169.254.169.254".parse().expect("ip")));
    }

    #[test]
    fn cloud_host_addresses_and_translated_forms_are_special() {
        let kind = |s: &str| special_address_kind(s.parse().expect("ip"));
        assert_eq!(kind("168.63.129.16"), Some("Azure host (WireServer)"));
        assert_eq!(kind("100.100.100.200"), Some("cloud metadata"));
        // The metadata address behind IPv4-mapped, IPv4-compatible and NAT64 forms.
        for form in ["::ffff:169.254.169.254", "::169.254.169.254", "64:ff9b::a9fe:a9fe"] {
            assert_eq!(kind(form), Some("cloud metadata"), "{form}");
        }
        assert_eq!(kind("64:ff9b::7f00:1"), Some("loopback"));
        assert_eq!(kind("::1"), Some("loopback"), "IPv6 loopback is not IPv4-compatible");
        assert_eq!(kind("::"), Some("unspecified"));
        assert_eq!(kind("64:ff9b::a00:4"), None, "10.0.0.4 through NAT64 is ordinary");
        assert_eq!(kind("2001:db8::4"), None);
    }
}
