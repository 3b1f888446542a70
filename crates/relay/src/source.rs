//! A client or agent address as the relay's per-source limits count it ([`SourceKey`]): one
//! IPv4 address, or one IPv6 /64 — a host can hold a whole /64, so counting /128s would let
//! it rotate addresses past any per-source limit and grow the tables that keep them.

use std::net::IpAddr;

/// A source as the per-source limits count it: an IPv4 address (IPv4-mapped IPv6 included), or
/// an IPv6 /64 — one host's worth of IPv6 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SourceKey(IpAddr);

impl SourceKey {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(prefix.into()))
            }
        }
    }
}
