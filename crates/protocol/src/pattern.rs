//! Destination patterns, the one syntax for "which destinations": an agent's `[[allow]]`
//! rules and an HTTP CONNECT endpoint's `destinations`. A pattern is `host:port` with an exact
//! port; the host is an exact name, an IP literal, or `*.suffix`, where `*` stands for exactly
//! one DNS label (as in TLS wildcard certificates). Names compare lowercased and without a
//! trailing dot.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::destination::{
    Destination, DestinationError, Host, normalize_dns_name, parse_port, split_host_port,
};

/// The host part of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this name.
    Exact(String),
    /// `*.suffix`: one label, then this suffix (stored without the leading `*.`).
    Wildcard(String),
    /// Exactly this address.
    Ip(IpAddr),
}

/// A destination pattern: an agent's `[[allow]]` rule, or one of a CONNECT endpoint's
/// `destinations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationPattern {
    /// Host pattern.
    pub host: HostPattern,
    /// Exact port.
    pub port: u16,
}

impl fmt::Display for DestinationPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Exact(name) => write!(f, "{name}:{}", self.port),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}:{}", self.port),
            HostPattern::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            HostPattern::Ip(ip) => write!(f, "{ip}:{}", self.port),
        }
    }
}

impl FromStr for DestinationPattern {
    type Err = DestinationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = split_host_port(s)?;
        let port = parse_port(port)?;
        let host = if let Some(suffix) = host.strip_prefix("*.") {
            HostPattern::Wildcard(normalize_dns_name(suffix)?)
        } else if host.contains('*') {
            return Err(DestinationError::BadHost(format!(
                "{host} (a wildcard must be the whole first label: *.example.net)"
            )));
        } else {
            match host.parse::<Host>()? {
                Host::Name(name) => HostPattern::Exact(name.as_str().to_owned()),
                Host::Ip(ip) => HostPattern::Ip(ip.to_canonical()),
            }
        };
        Ok(Self { host, port })
    }
}

impl DestinationPattern {
    /// Whether the pattern admits `destination` (by name or literal; not yet resolved).
    pub fn matches(&self, destination: &Destination) -> bool {
        if destination.port != self.port {
            return false;
        }
        match (&self.host, &destination.host) {
            (HostPattern::Exact(rule), Host::Name(name)) => rule == name.as_str(),
            (HostPattern::Wildcard(suffix), Host::Name(name)) => name
                .as_str()
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            (HostPattern::Ip(rule), Host::Ip(ip)) => *rule == ip.to_canonical(),
            _ => false,
        }
    }

    /// Whether the pattern names `ip` explicitly, which lifts the special-address refusal.
    pub fn names_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match &self.host {
            HostPattern::Ip(rule) => *rule == ip,
            HostPattern::Exact(name) => name == "localhost" && ip.is_loopback(),
            HostPattern::Wildcard(_) => false,
        }
    }

    /// Whether some destination matches both patterns: how an agent judges a CONNECT
    /// endpoint, whose destinations are patterns too (it approves one that can reach at least
    /// something it allows; each stream is still checked on its own).
    pub fn overlaps(&self, other: &DestinationPattern) -> bool {
        if self.port != other.port {
            return false;
        }
        let one_label_under = |name: &str, suffix: &str| {
            name.strip_suffix(suffix)
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
        };
        match (&self.host, &other.host) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Wildcard(a), HostPattern::Wildcard(b)) => a == b,
            (HostPattern::Exact(name), HostPattern::Wildcard(suffix))
            | (HostPattern::Wildcard(suffix), HostPattern::Exact(name)) => {
                one_label_under(name, suffix)
            }
            (HostPattern::Ip(a), HostPattern::Ip(b)) => a == b,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> DestinationPattern {
        s.parse().expect("rule")
    }

    fn dest(s: &str) -> Destination {
        s.parse().expect("destination")
    }

    #[test]
    fn wildcards_match_exactly_one_label_and_the_port() {
        let r = rule("*.privatelink.vaultcore.azure.net:443");
        assert!(r.matches(&dest("contoso-kv.privatelink.vaultcore.azure.net:443")));
        assert!(r.matches(&dest("CONTOSO-KV.PrivateLink.VaultCore.Azure.Net.:443")));
        assert!(!r.matches(&dest("contoso-kv.privatelink.vaultcore.azure.net:8443")));
        assert!(!r.matches(&dest("a.b.privatelink.vaultcore.azure.net:443")));
        assert!(!r.matches(&dest("privatelink.vaultcore.azure.net:443")));
        assert!(!r.matches(&dest("evilprivatelink.vaultcore.azure.net:443")));
        assert!(!r.matches(&dest("x.privatelink.vaultcore.azure.net.evil.com:443")));
    }

    #[test]
    fn exact_names_and_literals() {
        assert!(rule("db.internal:5432").matches(&dest("DB.internal:5432")));
        assert!(!rule("db.internal:5432").matches(&dest("db2.internal:5432")));
        assert!(rule("10.0.0.4:443").matches(&dest("10.0.0.4:443")));
        assert!(!rule("10.0.0.4:443").matches(&dest("10.0.0.5:443")));
        assert!(rule("[2001:db8::4]:443").matches(&dest("[2001:db8::4]:443")));
        // A name rule does not admit a literal that happens to be its address, nor vice versa.
        assert!(!rule("db.internal:443").matches(&dest("10.0.0.4:443")));
    }

    #[test]
    fn malformed_rules_are_refused() {
        for bad in ["*.example.net", "a.*.example.net:443", "*example.net:443", "*:443", "x:0"] {
            assert!(bad.parse::<DestinationPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_overlap_when_one_destination_matches_both() {
        let overlap = |a: &str, b: &str| {
            let (a, b) = (rule(a), rule(b));
            assert_eq!(a.overlaps(&b), b.overlaps(&a), "symmetric: {a} {b}");
            a.overlaps(&b)
        };
        assert!(overlap("*.vault.azure.net:443", "*.vault.azure.net:443"));
        assert!(overlap("*.vault.azure.net:443", "contoso-kv.vault.azure.net:443"));
        assert!(!overlap("*.vault.azure.net:443", "a.b.vault.azure.net:443"));
        assert!(!overlap("*.vault.azure.net:443", "vault.azure.net:443"));
        assert!(!overlap("*.vault.azure.net:443", "*.vault.azure.net:8443"));
        assert!(!overlap("*.vault.azure.net:443", "*.privatelink.vaultcore.azure.net:443"));
        assert!(
            !overlap("*.a.example:443", "*.b.a.example:443"),
            "a.b.a.example is not x.a.example"
        );
        assert!(overlap("10.0.0.4:443", "10.0.0.4:443"));
        assert!(!overlap("10.0.0.4:443", "db.internal:443"));
    }
}
