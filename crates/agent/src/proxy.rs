//! The HTTP proxy between the agent and its relays, when its network's only way out is one:
//! `proxy = "http://proxy.corp:3128"` in agent.toml (credentials in the URL or, better, in
//! `proxy_credentials_file`), or else `HTTPS_PROXY` from the environment; `NO_PROXY` exempts
//! relays the way curl reads it (`*`, name suffixes with or without a leading dot, IP
//! addresses, CIDR blocks; ports ignored). Only TLS over TCP crosses a proxy: QUIC is UDP.
//!
//! The proxy URL is read by hand: `http://[user:password@]host[:port][/]` is the whole
//! grammar a proxy setting has, and the one percent-decoding credentials need is a few lines —
//! a URL crate would add a dependency for less than this module's tests cover.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use privlink_protocol::destination::{Destination, Host, parse_port, split_host_port};
use privlink_protocol::http_connect::BasicCredentials;
use privlink_transport::http_proxy::ProxyHop;

/// The port a proxy URL without one means (curl's default).
pub const DEFAULT_PROXY_PORT: u16 = 1080;
/// The environment variables a proxy is taken from, in curl's order of preference.
pub const PROXY_ENV: [&str; 2] = ["https_proxy", "HTTPS_PROXY"];
/// The environment variables exemptions are taken from, likewise.
pub const NO_PROXY_ENV: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// Where the proxy setting came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyOrigin {
    /// The `proxy` key.
    Config,
    /// This environment variable.
    Environment(&'static str),
}

/// The proxy the agent crosses to reach its relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// The proxy's host and port.
    pub address: Destination,
    /// Basic credentials (`Debug` redacts them).
    pub credentials: Option<BasicCredentials>,
    /// Where the setting came from.
    pub origin: ProxyOrigin,
    /// Relays reached directly (`NO_PROXY`).
    pub no_proxy: NoProxy,
}

impl ProxySettings {
    /// Whether the way to a relay on `host` crosses the proxy.
    pub fn applies_to(&self, host: &Host) -> bool {
        !self.no_proxy.exempts(host)
    }

    /// The CONNECT the proxy is asked for to reach `relay`: by the name the agent dials (the
    /// proxy resolves it — an agent behind a proxy often has no outside DNS).
    pub fn hop_to(&self, relay: Destination) -> ProxyHop {
        ProxyHop {
            proxy: self.address.to_string(),
            target: relay,
            credentials: self.credentials.clone(),
        }
    }
}

/// What the process environment says about proxies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyEnvironment {
    /// The proxy variable set, and its value.
    pub proxy: Option<(&'static str, String)>,
    /// `NO_PROXY`'s value.
    pub no_proxy: Option<String>,
}

impl ProxyEnvironment {
    /// Reads the variables (lowercase first, as curl does); empty values count as unset.
    pub fn from_process() -> Self {
        let first = |names: [&'static str; 2]| {
            names.into_iter().find_map(|name| {
                std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| (name, v))
            })
        };
        Self { proxy: first(PROXY_ENV), no_proxy: first(NO_PROXY_ENV).map(|(_, v)| v) }
    }
}

/// A proxy URL, read: `http://[user:password@]host[:port][/]`, or `host:port` (then `http` is
/// meant). Credentials are percent-decoded.
pub fn parse_proxy_url(text: &str) -> Result<(Destination, Option<BasicCredentials>), String> {
    let text = text.trim();
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "`{scheme}://` proxies are not supported: give an http:// proxy (the tunnel's own \
                 TLS runs inside its CONNECT)"
            ));
        }
        None => text,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err("a proxy URL has no path: http://[user:password@]host:port".to_owned());
    }
    let (userinfo, authority) = match rest.rsplit_once('@') {
        Some((userinfo, authority)) => (Some(userinfo), authority),
        None => (None, rest),
    };
    let credentials = userinfo
        .map(|userinfo| {
            if !userinfo.contains(':') {
                return Err("credentials in a proxy URL are user:password".to_owned());
            }
            percent_decode(userinfo).map(BasicCredentials::new)
        })
        .transpose()?;
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:{DEFAULT_PROXY_PORT}")
    } else {
        authority.to_owned()
    };
    let (host, port) = split_host_port(&with_port).map_err(|e| e.to_string())?;
    let host = host.parse::<Host>().map_err(|e| e.to_string())?;
    Ok((Destination { host, port: parse_port(port).map_err(|e| e.to_string())? }, credentials))
}

/// `%XX` escapes decoded (credentials may hold `@`, `:` or `%` that way).
fn percent_decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(
                byte.ok_or("a `%` in the proxy credentials is not followed by two hex digits")?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Credentials from `proxy_credentials_file`: one line, `user:password`.
pub fn credentials_in_file(path: &Path) -> Result<BasicCredentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.trim_end_matches(['\n', '\r']);
    if line.contains('\n') || !line.contains(':') {
        return Err(format!("{}: expected one line, user:password", path.display()));
    }
    Ok(BasicCredentials::new(line))
}

/// `NO_PROXY`, read as curl reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<Exempt>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Exempt {
    /// `*`: every host.
    All,
    /// A name and every name under it.
    Domain(String),
    /// An address, or a block of them (for hosts written as addresses).
    Net(IpNet),
}

impl NoProxy {
    /// Reads a comma- (or space-) separated list; entries that are none of the forms are
    /// ignored, as curl ignores them.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .split([',', ' '])
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(|entry| {
                if entry == "*" {
                    return Some(Exempt::All);
                }
                if let Ok(net) = entry.parse::<IpNet>() {
                    return Some(Exempt::Net(net));
                }
                let unbracketed = entry.trim_start_matches('[').trim_end_matches(']');
                if let Ok(ip) = unbracketed.parse::<IpAddr>() {
                    return Some(Exempt::Net(IpNet::from(ip)));
                }
                // A port is ignored (curl does not match ports).
                let name = match split_host_port(entry) {
                    Ok((host, _)) => host,
                    Err(_) => entry,
                };
                let name = name.trim_start_matches("*.").trim_start_matches('.');
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                (!name.is_empty()).then_some(Exempt::Domain(name))
            })
            .collect();
        Self { entries }
    }

    /// Whether `host` is reached without the proxy.
    pub fn exempts(&self, host: &Host) -> bool {
        self.entries.iter().any(|entry| match (entry, host) {
            (Exempt::All, _) => true,
            (Exempt::Net(net), Host::Ip(ip)) => net.contains(&ip.to_canonical()),
            (Exempt::Domain(domain), Host::Name(name)) => {
                let name = name.as_str();
                name == domain
                    || name.strip_suffix(domain.as_str()).is_some_and(|head| head.ends_with('.'))
            }
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        s.parse().expect("host")
    }

    #[test]
    fn proxy_urls_as_operators_write_them() {
        let (address, credentials) = parse_proxy_url("http://proxy.corp:3128").expect("plain");
        assert_eq!(address.to_string(), "proxy.corp:3128");
        assert_eq!(credentials, None);
        let (address, credentials) =
            parse_proxy_url("HTTP://agent%40corp:p%3Ass%25w@10.0.0.8:8080/").expect("creds");
        assert_eq!(address.to_string(), "10.0.0.8:8080");
        assert_eq!(credentials, Some(BasicCredentials::new("agent@corp:p:ss%w")));
        let (address, _) = parse_proxy_url("proxy.corp").expect("no scheme, no port");
        assert_eq!(address.port, DEFAULT_PROXY_PORT);
        let (address, _) = parse_proxy_url("http://[2001:db8::8]").expect("v6");
        assert_eq!(address.to_string(), "[2001:db8::8]:1080");
        for bad in [
            "https://proxy.corp:3128",
            "socks5://proxy.corp:1080",
            "http://proxy.corp:3128/path",
            "http://user@proxy.corp:3128",
            "http://u:%zz@proxy.corp:3128",
            "http://proxy.corp:0",
            "http://",
        ] {
            assert!(parse_proxy_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_never_show_in_debug_or_in_errors() {
        let (address, credentials) =
            parse_proxy_url("http://agent:hunter2@proxy.corp:3128").expect("valid");
        let settings = ProxySettings {
            address,
            credentials,
            origin: ProxyOrigin::Config,
            no_proxy: NoProxy::default(),
        };
        let shown = format!("{settings:?} {:?}", settings.hop_to(settings.address.clone()));
        assert!(!shown.contains("hunter2"), "{shown}");
        let error = parse_proxy_url("http://agent:hunter2@proxy.corp:99999").expect_err("port");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn no_proxy_is_read_the_way_curl_reads_it() {
        let exempt = NoProxy::parse(".corp.example, relay.internal:7443 10.0.0.0/8,::1 , ");
        assert!(exempt.exempts(&host("relay.corp.example")));
        assert!(exempt.exempts(&host("corp.example")));
        assert!(!exempt.exempts(&host("evilcorp.example")));
        assert!(exempt.exempts(&host("relay.internal")));
        assert!(exempt.exempts(&host("a.relay.internal")));
        assert!(exempt.exempts(&host("10.20.30.40")));
        assert!(!exempt.exempts(&host("11.0.0.1")));
        assert!(exempt.exempts(&host("::1")));
        assert!(!exempt.exempts(&host("relay.example.com")));
        assert!(NoProxy::parse("*").exempts(&host("anything.example")));
        assert!(!NoProxy::parse("").exempts(&host("anything.example")));
    }
}
