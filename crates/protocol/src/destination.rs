//! Destinations: a host (DNS name or IP literal) and a port, as written in configs and sent
//! in open headers (`vault.example.net:443`, `10.0.0.4:443`, `[2001:db8::4]:443`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Longest DNS name accepted, in its textual form without a trailing dot (RFC 1035).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// The host part of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name.
    Name(DnsName),
    /// An IP address literal.
    Ip(IpAddr),
}

/// A DNS name, lowercased, and whether it was written absolute (with a trailing dot).
///
/// An absolute name is resolved as written: without its dot the system resolver would try
/// the search domains first (`ndots:5` on Kubernetes sends `vault.example.net` to
/// `vault.example.net.<namespace>.svc.cluster.local` and friends first), and whoever answers
/// for one of those would get the connection. Policy (allowlist rules) compares names without
/// the dot: `vault.example.net.` and `vault.example.net` are the same name to a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsName {
    name: String,
    absolute: bool,
}

impl DnsName {
    /// The name without a trailing dot, for comparisons and messages.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// Whether it was written with a trailing dot.
    pub fn is_absolute(&self) -> bool {
        self.absolute
    }

    /// What to hand the resolver: the name, with its trailing dot when it was written
    /// absolute, so no search domain is tried.
    pub fn lookup_form(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.absolute { f.write_str(".") } else { Ok(()) }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => write!(f, "{name}"),
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A `host:port` pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Name or address.
    pub host: Host,
    /// TCP port (never 0).
    pub port: u16,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Why a string is not a valid destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// No `:port` suffix.
    #[error("`{0}` has no port (expected host:port)")]
    MissingPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("`{0}` is not a port from 1 to 65535")]
    BadPort(String),
    /// The host is neither an IP literal nor a valid DNS name.
    #[error("`{0}` is not a valid host name or IP address")]
    BadHost(String),
}

/// Splits `host:port` (with `[v6]:port` for IPv6) into its parts.
pub fn split_host_port(s: &str) -> Result<(&str, &str), DestinationError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) =
            rest.split_once(']').ok_or_else(|| DestinationError::BadHost(s.to_owned()))?;
        let port =
            after.strip_prefix(':').ok_or_else(|| DestinationError::MissingPort(s.to_owned()))?;
        (host, port)
    } else {
        let (host, port) =
            s.rsplit_once(':').ok_or_else(|| DestinationError::MissingPort(s.to_owned()))?;
        if host.contains(':') {
            // An unbracketed IPv6 address: ambiguous, refuse rather than guess.
            return Err(DestinationError::BadHost(s.to_owned()));
        }
        (host, port)
    };
    Ok((host, port))
}

/// Parses a port from 1 to 65535.
pub fn parse_port(port: &str) -> Result<u16, DestinationError> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(DestinationError::BadPort(port.to_owned())),
    }
}

/// Normalises a DNS name (lowercase, no trailing dot) and checks its syntax. Underscores are
/// accepted because private zones use them.
pub fn normalize_dns_name(name: &str) -> Result<String, DestinationError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if trimmed.is_empty() || trimmed.len() > MAX_NAME_LEN || !trimmed.split('.').all(valid_label) {
        return Err(DestinationError::BadHost(name.to_owned()));
    }
    Ok(trimmed.to_ascii_lowercase())
}

impl FromStr for Host {
    type Err = DestinationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(Self::Ip(ip)),
            Err(_) => normalize_dns_name(s)
                .map(|name| Self::Name(DnsName { name, absolute: s.ends_with('.') })),
        }
    }
}

impl FromStr for Destination {
    type Err = DestinationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = split_host_port(s)?;
        let host = if s.starts_with('[') {
            // Brackets are for IPv6 literals only.
            match host.parse::<std::net::Ipv6Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V6(ip)),
                Err(_) => return Err(DestinationError::BadHost(s.to_owned())),
            }
        } else {
            host.parse()?
        };
        Ok(Self { host, port: parse_port(port)? })
    }
}

impl<'de> serde::Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_literals() {
        let d: Destination =
            "Contoso-KV.privatelink.vaultcore.azure.net:443".parse().expect("name");
        let Host::Name(name) = &d.host else { panic!("a name: {d:?}") };
        assert_eq!(name.as_str(), "contoso-kv.privatelink.vaultcore.azure.net");
        assert!(!name.is_absolute());
        assert_eq!(d.port, 443);
        assert_eq!(d.to_string(), "contoso-kv.privatelink.vaultcore.azure.net:443");

        // Written absolute, it stays absolute: in its text (which the relay sends the agent)
        // and in what the resolver is given.
        let d: Destination = "Vault.Corp.Test.:443".parse().expect("absolute name");
        let Host::Name(name) = &d.host else { panic!("a name: {d:?}") };
        assert_eq!(name.as_str(), "vault.corp.test");
        assert!(name.is_absolute());
        assert_eq!(name.lookup_form(), "vault.corp.test.");
        assert_eq!(d.to_string(), "vault.corp.test.:443");
        assert_eq!(d.to_string().parse::<Destination>(), Ok(d));

        let d: Destination = "10.1.2.3:8443".parse().expect("v4");
        assert_eq!(d.host, Host::Ip("10.1.2.3".parse().expect("ip")));

        let d: Destination = "[2001:db8::4]:443".parse().expect("v6");
        assert_eq!(d.to_string(), "[2001:db8::4]:443");
    }

    #[test]
    fn refuses_malformed_destinations() {
        for bad in [
            "vault",
            "vault:",
            "vault:0",
            "vault:65536",
            "vault:https",
            ":443",
            "a..b:443",
            "-a.b:443",
            "a b:443",
            "2001:db8::4:443",
            "[vault]:443",
            "[::1]443",
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad} should be refused");
        }
        let long_label = format!("{}.net:443", "a".repeat(64));
        assert!(long_label.parse::<Destination>().is_err());
    }
}
