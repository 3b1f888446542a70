//! Source-IP access control lists for endpoints.
//!
//! Semantics (the contract in DESIGN.md): an empty allow list admits every source; a source
//! matching any deny entry is refused even if an allow entry matches too. IPv4 clients that
//! reach a dual-stack listener as IPv4-mapped IPv6 addresses are matched as IPv4.

use std::net::IpAddr;

use ipnet::IpNet;

/// An endpoint's allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Networks admitted; empty means every source.
    pub allow: Vec<IpNet>,
    /// Networks refused; a match here wins over any allow entry.
    pub deny: Vec<IpNet>,
}

impl Acl {
    /// Whether a connection from `source` may proceed.
    pub fn permits(&self, source: IpAddr) -> bool {
        let source = source.to_canonical();
        if self.deny.iter().any(|net| net.contains(&source)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&source))
    }
}

/// Parses an ACL entry: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address, which
/// stands for itself alone (/32 or /128). IPv4-mapped IPv6 entries (`::ffff:10.0.0.0/104`,
/// `::ffff:10.0.0.4`) become the IPv4 entries they mean, since sources are matched as IPv4:
/// written as mapped they would never match.
pub fn parse_acl_entry(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => {
            if net.trunc() != net {
                return Err(format!("`{text}` has host bits set; did you mean `{}`?", net.trunc()));
            }
            net
        }
        Err(_) => text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("`{text}` is not a CIDR block or IP address"))?,
    };
    Ok(unmap(net))
}

/// The IPv4 network an IPv4-mapped IPv6 network (`::ffff:0:0/96` and narrower) stands for.
fn unmap(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        let parse = |v: &[&str]| v.iter().map(|s| parse_acl_entry(s).expect("entry")).collect();
        Acl { allow: parse(allow), deny: parse(deny) }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn mapped_rules_match_the_ipv4_sources_they_name() {
        let rules = acl(&["::ffff:10.1.0.0/112", "::ffff:192.0.2.7"], &[]);
        assert_eq!(rules.allow[0].to_string(), "10.1.0.0/16");
        assert_eq!(rules.allow[1].to_string(), "192.0.2.7/32");
        assert!(rules.permits(ip("10.1.2.3")));
        assert!(rules.permits(ip("::ffff:10.1.2.3")));
        assert!(rules.permits(ip("192.0.2.7")));
        assert!(!rules.permits(ip("10.2.0.1")));
        assert_eq!(parse_acl_entry("2001:db8::/32").expect("v6").to_string(), "2001:db8::/32");
    }

    #[test]
    fn empty_allow_admits_everyone() {
        assert!(acl(&[], &[]).permits(ip("198.51.100.7")));
        assert!(acl(&[], &[]).permits(ip("2001:db8::1")));
    }

    #[test]
    fn allow_list_restricts() {
        let a = acl(&["203.0.113.0/24", "2001:db8::/32"], &[]);
        assert!(a.permits(ip("203.0.113.9")));
        assert!(a.permits(ip("2001:db8:1::9")));
        assert!(!a.permits(ip("198.51.100.7")));
        assert!(!a.permits(ip("2001:db9::1")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let a = acl(&["10.0.0.0/8"], &["10.1.0.0/16", "10.2.3.4"]);
        assert!(a.permits(ip("10.3.0.1")));
        assert!(!a.permits(ip("10.1.2.3")));
        assert!(!a.permits(ip("10.2.3.4")));
        assert!(!acl(&[], &["0.0.0.0/0"]).permits(ip("192.0.2.1")));
    }

    #[test]
    fn mapped_ipv4_is_matched_as_ipv4() {
        let a = acl(&["203.0.113.0/24"], &["203.0.113.66/32"]);
        assert!(a.permits(ip("::ffff:203.0.113.5")));
        assert!(!a.permits(ip("::ffff:203.0.113.66")));
    }

    #[test]
    fn entries_are_validated() {
        assert!(parse_acl_entry("10.0.0.300/8").is_err());
        assert!(parse_acl_entry("10.0.0.0/33").is_err());
        assert!(parse_acl_entry("10.0.0.1/8").expect_err("host bits").contains("10.0.0.0/8"));
        assert_eq!(parse_acl_entry("::1").expect("addr").prefix_len(), 128);
    }
}
