//! The privlink wire protocol, sans-IO: bytes in, values out. It holds what the relay and the
//! agent must agree on — the frame codec, the messages and their size bounds, the control
//! conversation as two state machines (one per side), destinations, source-IP ACLs, connector
//! tokens and their digests, and the configuration syntax both config files share. It is not a
//! transport: it touches no socket, timer or async runtime (its manifest has no tokio, quinn,
//! h2 or rustls), so every decoder and transition is unit-tested and fuzzed directly.
//! `privlink-transport` moves its bytes; `privlink-relay` and `privlink-agent` drive it.
//!
//! # Layout
//!
//! * [`frame`] — length-prefixed, versioned frames; the size bound is checked before any
//!   allocation.
//! * [`message`] — control-stream messages and data-stream headers, with their bounds.
//! * [`control`] — the control conversation: [`control::RelayControl`] and
//!   [`control::AgentControl`], each fed messages and timer ticks, each yielding messages to
//!   send and events for its driver.
//! * [`destination`] — `host:port` destinations and the name syntax rules share.
//! * [`pattern`] — destination patterns (`*.vault.azure.net:443`): an agent's allowlist, a
//!   CONNECT endpoint's `destinations`.
//! * [`http_connect`] — HTTP CONNECT: the request head a client sends a CONNECT endpoint, the
//!   answers it gets, and the agent's side of a proxy it must cross.
//! * [`client_hello`] — the server name a TLS ClientHello asks for, read as bytes arrive, and
//!   the names endpoints claim on a shared port.
//! * [`server_hello`] — what a TLS 1.3 server chose, from its ServerHello as a QUIC client
//!   receives it (quinn does not tell).
//! * [`proxy_header`] — the PROXY protocol header (v1 and v2) a load balancer puts before a
//!   connection, read and written.
//! * [`acl`] — per-endpoint source-IP allow/deny lists.
//! * [`audit`] — the audit trail's records and hash chain: sealing a record, checking a trail.
//! * [`token`] — connector tokens (redacted in `Debug`), SHA-256 digests, hex.
//! * [`text`] — peer-supplied strings made safe to log: strict names, escaped free text.
//! * [`config`] — TOML loading with errors that name file, line and key; durations with units.
#![forbid(unsafe_code)]

pub mod acl;
pub mod audit;
pub mod client_hello;
pub mod config;
pub mod control;
pub mod destination;
pub mod frame;
pub mod http_connect;
pub mod message;
pub mod pattern;
pub mod proxy_header;
pub mod server_hello;
pub mod text;
pub mod token;

/// Version of this software, sent in hellos so each side can log who it talks to.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
