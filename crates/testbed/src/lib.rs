//! Test and benchmark support for privlink, shared by the end-to-end tests in `tests/` and the
//! harness in `benches/` (never published, never linked into the product): network namespaces
//! joined by veth pairs or by a userspace link emulator ([`netns`]), the emulator itself — two
//! TUN interfaces and a forwarder that adds delay, jitter, loss and a bandwidth cap to every IP
//! packet ([`linkemu`]) — helpers to run code inside a namespace, the load tool the
//! benchmark harness measures with ([`load`]), and real relay and agent processes brought up
//! from config files ([`process`]).
#![forbid(unsafe_code)]

pub mod admin_probe;
pub mod linkemu;
pub mod load;
pub mod netns;
pub mod process;

pub use linkemu::{LinkEmulator, LinkProfile, LinkStats};
pub use netns::{Link, Topology};
