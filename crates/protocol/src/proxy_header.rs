//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a load balancer puts before a
//! connection's first byte to say whom the connection came from: read ([`parse`]) from the
//! bytes a relay has so far, and written ([`encode`]) by an agent before any byte it sends a
//! destination that asked for one. Sans-IO: the caller reads, keeps the bytes after the header,
//! and decides whom to trust. Written by hand: the format is short and fixed, and the crates
//! that parse it pull in parsers for what privlink never reads (TLVs) or its own I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 header, `\r\n` included (the specification's bound).
pub const MAX_V1: usize = 107;
/// Longest version 2 header: 16 bytes, then at most 65,535 of addresses and TLVs.
pub const MAX_V2: usize = 16 + 65_535;

/// What the bytes read so far begin with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyParse {
    /// They could still be a header: read more.
    NeedMore,
    /// A whole header.
    Header(ProxyHeader),
    /// They do not begin with a PROXY signature.
    NotProxy,
    /// A PROXY signature followed by something that is not a valid header.
    Invalid(&'static str),
}

/// A PROXY header that was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Its length: the connection's own bytes start after it.
    pub len: usize,
    /// 1 or 2.
    pub version: u8,
    /// The original client and the address it connected to; `None` for a `LOCAL` command (a
    /// balancer's health check) or an `UNKNOWN` / unspecified family.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Whether the command was `LOCAL` (version 2): the balancer's own connection.
    pub local: bool,
}

/// Which version [`encode`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The text form.
    V1,
    /// The binary form.
    V2,
}

/// Reads a PROXY header from the start of `bytes` (everything read from the connection so far).
pub fn parse(bytes: &[u8]) -> ProxyParse {
    if bytes.is_empty() {
        return ProxyParse::NeedMore;
    }
    if bytes[0] == V2_SIGNATURE[0] {
        return parse_v2(bytes);
    }
    parse_v1(bytes)
}

fn parse_v1(bytes: &[u8]) -> ProxyParse {
    const START: &[u8] = b"PROXY ";
    let seen = bytes.len().min(START.len());
    if bytes[..seen] != START[..seen] {
        return ProxyParse::NotProxy;
    }
    let Some(end) = bytes.iter().take(MAX_V1).position(|&b| b == b'\n') else {
        return if bytes.len() >= MAX_V1 {
            ProxyParse::Invalid("a version 1 header over 107 bytes")
        } else {
            ProxyParse::NeedMore
        };
    };
    let Some(line) = bytes[..end].strip_suffix(b"\r") else {
        return ProxyParse::Invalid("a version 1 header not ended by CRLF");
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return ProxyParse::Invalid("a version 1 header that is not text");
    };
    let mut fields = line.split(' ').skip(1);
    let family = fields.next();
    let header = |addresses| ProxyHeader { len: end + 1, version: 1, addresses, local: false };
    if family == Some("UNKNOWN") {
        return ProxyParse::Header(header(None));
    }
    let (Some(source), Some(destination), Some(source_port), Some(destination_port), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return ProxyParse::Invalid("a version 1 header without two addresses and two ports");
    };
    let ip = |text: &str| -> Option<IpAddr> {
        match family {
            Some("TCP4") => text.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            Some("TCP6") => text.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            _ => None,
        }
    };
    let port = |text: &str| -> Option<u16> {
        // Decimal without a sign or leading zeros, as the specification writes them.
        let plain = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        (plain && (text == "0" || !text.starts_with('0'))).then(|| text.parse().ok()).flatten()
    };
    match (ip(source), ip(destination), port(source_port), port(destination_port)) {
        (Some(s), Some(d), Some(sp), Some(dp)) => {
            ProxyParse::Header(header(Some((SocketAddr::new(s, sp), SocketAddr::new(d, dp)))))
        }
        _ => ProxyParse::Invalid("a version 1 header with a bad family, address or port"),
    }
}

fn parse_v2(bytes: &[u8]) -> ProxyParse {
    let seen = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..seen] != V2_SIGNATURE[..seen] {
        return ProxyParse::NotProxy;
    }
    if bytes.len() < 16 {
        return ProxyParse::NeedMore;
    }
    let (version, command) = (bytes[12] >> 4, bytes[12] & 0x0f);
    if version != 2 {
        return ProxyParse::Invalid("a version 2 signature with another version");
    }
    let length = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if bytes.len() < 16 + length {
        return ProxyParse::NeedMore;
    }
    let payload = &bytes[16..16 + length];
    let header = |addresses, local| ProxyHeader { len: 16 + length, version: 2, addresses, local };
    match command {
        // LOCAL: the balancer's own connection; whatever address block follows is ignored.
        0x0 => return ProxyParse::Header(header(None, true)),
        0x1 => {}
        _ => return ProxyParse::Invalid("a version 2 header with an unknown command"),
    }
    let addresses = match bytes[13] {
        // UNSPEC: the sender does not know.
        0x00 => None,
        // TCP over IPv4.
        0x11 if payload.len() >= 12 => {
            let ip = |at: usize| {
                Ipv4Addr::new(payload[at], payload[at + 1], payload[at + 2], payload[at + 3])
            };
            let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
            Some((SocketAddr::new(ip(0).into(), port(8)), SocketAddr::new(ip(4).into(), port(10))))
        }
        // TCP over IPv6.
        0x21 if payload.len() >= 36 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&payload[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
            Some((
                SocketAddr::new(ip(0).into(), port(32)),
                SocketAddr::new(ip(16).into(), port(34)),
            ))
        }
        0x11 | 0x21 => return ProxyParse::Invalid("a version 2 address block cut short"),
        _ => return ProxyParse::Invalid("a version 2 header for a transport other than TCP"),
    };
    ProxyParse::Header(header(addresses, false))
}

/// A header saying the connection came from `source` to `destination`. Mixed address families
/// are written as IPv6, IPv4 addresses mapped.
pub fn encode(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (source, destination)
        }
        _ => (as_v6(source), as_v6(destination)),
    };
    match version {
        ProxyVersion::V1 => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21); // version 2, PROXY
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.extend_from_slice(&[0x11, 0x00, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.extend_from_slice(&[0x21, 0x00, 36]);
                    out.extend_from_slice(&as_v6_ip(s).octets());
                    out.extend_from_slice(&as_v6_ip(d).octets());
                }
            }
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
            out
        }
    }
}

fn as_v6_ip(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn as_v6(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(as_v6_ip(addr.ip()).into(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn version_1_as_haproxy_writes_it() {
        let line = b"PROXY TCP4 198.51.100.7 10.0.0.5 53122 443\r\nGET /";
        let ProxyParse::Header(header) = parse(line) else { panic!("{:?}", parse(line)) };
        assert_eq!(header.len, line.len() - 5);
        assert_eq!(header.addresses, Some((addr("198.51.100.7:53122"), addr("10.0.0.5:443"))));
        let six = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        assert!(
            matches!(parse(six), ProxyParse::Header(h) if h.addresses.is_some_and(|a| a.0 == addr("[2001:db8::7]:4000")))
        );
        assert!(
            matches!(parse(b"PROXY UNKNOWN\r\n"), ProxyParse::Header(h) if h.addresses.is_none())
        );
        for (i, _) in line.iter().enumerate().take(44) {
            assert_eq!(parse(&line[..i]), ProxyParse::NeedMore, "after {i} bytes");
        }
        for bad in [
            &b"PROXY TCP4 198.51.100.7 10.0.0.5 53122\r\n"[..],
            b"PROXY TCP4 198.51.100.7 10.0.0.5 053122 443\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.5 1 443\r\n",
            b"PROXY TCP4 198.51.100.7 10.0.0.5 70000 443\r\n",
            b"PROXY TCP4 198.51.100.7 10.0.0.5 1 443\n",
            b"PROXY UDP4 198.51.100.7 10.0.0.5 1 443\r\n",
        ] {
            assert!(
                matches!(parse(bad), ProxyParse::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(parse(&[b'P'; 200][..]), ProxyParse::NotProxy));
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), ProxyParse::Invalid(_)), "over 107 bytes without an end");
        assert_eq!(parse(b"\x16\x03\x01"), ProxyParse::NotProxy, "a TLS record");
        assert_eq!(parse(b"GET / HTTP/1.1"), ProxyParse::NotProxy);
    }

    #[test]
    fn version_2_addresses_local_and_bounds() {
        let ipv4 = encode(ProxyVersion::V2, addr("198.51.100.7:53122"), addr("10.0.0.5:443"));
        assert_eq!(ipv4.len(), 28);
        let ProxyParse::Header(header) = parse(&ipv4) else { panic!() };
        assert_eq!((header.len, header.version, header.local), (28, 2, false));
        assert_eq!(header.addresses, Some((addr("198.51.100.7:53122"), addr("10.0.0.5:443"))));
        for i in 0..ipv4.len() {
            assert_eq!(parse(&ipv4[..i]), ProxyParse::NeedMore, "after {i} bytes");
        }
        // LOCAL with an address block and a TLV after it: skipped whole.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x11, 0x00, 15]);
        local.extend_from_slice(&[0u8; 12]);
        local.extend_from_slice(&[0x04, 0x00, 0x00]); // an empty TLV (NOOP)
        assert!(
            matches!(parse(&local), ProxyParse::Header(h) if h.local && h.len == 31 && h.addresses.is_none())
        );
        // A bad version, a bad command, UDP, and an address block shorter than its family.
        let mut bad = ipv4.clone();
        bad[12] = 0x11;
        assert!(matches!(parse(&bad), ProxyParse::Invalid(_)));
        bad[12] = 0x22;
        assert!(matches!(parse(&bad), ProxyParse::Invalid(_)));
        let mut udp = ipv4.clone();
        udp[13] = 0x12;
        assert!(matches!(parse(&udp), ProxyParse::Invalid(_)));
        let mut short = ipv4[..16].to_vec();
        short[15] = 4;
        short.extend_from_slice(&[1, 2, 3, 4]);
        assert!(matches!(parse(&short), ProxyParse::Invalid(_)));
        // The declared length is waited for, up to the bound.
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&long), ProxyParse::NeedMore);
    }

    #[test]
    fn what_is_written_reads_back() {
        for (source, destination) in [
            ("198.51.100.7:53122", "10.0.0.5:443"),
            ("[2001:db8::7]:4000", "[2001:db8::1]:443"),
            ("198.51.100.7:1", "[2001:db8::1]:443"),
        ] {
            for version in [ProxyVersion::V1, ProxyVersion::V2] {
                let written = encode(version, addr(source), addr(destination));
                let ProxyParse::Header(header) = parse(&written) else { panic!("{version:?}") };
                assert_eq!(header.len, written.len());
                let (s, d) = header.addresses.expect("addresses");
                assert_eq!(s.port(), addr(source).port());
                assert_eq!(as_v6_ip(s.ip()), as_v6_ip(addr(source).ip()));
                assert_eq!(as_v6_ip(d.ip()), as_v6_ip(addr(destination).ip()));
                assert!(written.len() <= MAX_V1 || version == ProxyVersion::V2);
            }
        }
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic_and_a_header_fits_what_was_read(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            signature in any::<bool>(),
        ) {
            let bytes = if signature { [V2_SIGNATURE.as_slice(), &bytes].concat() } else { bytes };
            if let ProxyParse::Header(header) = parse(&bytes) {
                prop_assert!(header.len <= bytes.len());
                prop_assert!(header.len <= MAX_V2);
            }
        }

        #[test]
        fn any_address_pair_round_trips(
            s in any::<std::net::SocketAddrV4>(), d in any::<std::net::SocketAddrV4>(), v2 in any::<bool>(),
        ) {
            let version = if v2 { ProxyVersion::V2 } else { ProxyVersion::V1 };
            let written = encode(version, s.into(), d.into());
            prop_assert_eq!(
                parse(&written),
                ProxyParse::Header(ProxyHeader {
                    len: written.len(),
                    version: if v2 { 2 } else { 1 },
                    addresses: Some((s.into(), d.into())),
                    local: false,
                })
            );
        }
    }
}
