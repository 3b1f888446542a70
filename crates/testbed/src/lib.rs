//! Test and benchmark support for privlink, shared by the end-to-end tests in `tests/` and the
//! harness in `benches/` (never published, never linked into the product): network namespaces
//! joined by veth pairs or by a userspace link emulator ([`netns`]), the emulator itself — two
//! TUN interfaces and a forwarder that adds delay, jitter, loss and a bandwidth cap to every IP
//! packet ([`linkemu`]) — helpers to run code inside a namespace, the load tool the
//! benchmark harness measures with ([`load`]), real relay and agent processes brought up
//! from config files ([`process`]), and the balancers in front of a relay fleet: HAProxy for TCP
//! ([`haproxy`]) and a small UDP one for QUIC ([`udp_balancer`]).
#![forbid(unsafe_code)]

pub mod admin_probe;
pub mod haproxy;
pub mod linkemu;
pub mod load;
pub mod netns;
pub mod process;
pub mod udp_balancer;

pub use linkemu::{LinkEmulator, LinkProfile, LinkStats};
pub use netns::{Link, Topology};
