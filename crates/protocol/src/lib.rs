//! The privlink wire protocol and the pieces both ends of a tunnel share.
//!
//! This crate is what the relay and the agent have in common: the frame codec and message
//! types (sans-IO: bytes in, values out, no sockets or clocks), the shared configuration
//! vocabulary (destinations, allowlist patterns, source-IP ACLs, durations, TOML errors that
//! name file, line and key), the copy loop that moves bytes between a TCP socket and a tunnel
//! stream, and the tunnel transport (QUIC today) behind one "multiplexed connection of byte
//! streams" interface. It is not a relay or an agent: it never listens, dials or decides
//! policy on its own; `privlink-relay` and `privlink-agent` drive it.
//!
//! # Layout
//!
//! * [`frame`] — length-prefixed, versioned frames; the size bound is checked before any
//!   allocation. Sans-IO.
//! * [`message`] — control-stream messages and data-stream headers carried in frames.
//! * [`destination`] — `host:port` destinations and the agent's allowlist patterns.
//! * [`acl`] — per-endpoint source-IP allow/deny lists.
//! * [`config`] — TOML loading with errors that name file, line and key; durations with units.
//! * [`io`] — reading and writing one frame on an async stream, with a size bound and deadline.
//! * [`copy`] — the bidirectional copy loop with inactivity timeout and byte counts.
//! * `pki` (feature `pki`) — a private CA and server certificates for first deployments,
//!   the demo and tests.
//! * [`tcp`] — TCP helpers (closing with a reset).
//! * [`tls`] — PEM loading and the rustls configurations of the tunnel.
//! * [`transport`] — the tunnel connection and stream types (QUIC via quinn).
#![forbid(unsafe_code)]

pub mod acl;
pub mod config;
pub mod copy;
pub mod destination;
pub mod frame;
pub mod io;
pub mod message;
#[cfg(feature = "pki")]
pub mod pki;
pub mod tcp;
pub mod tls;
pub mod transport;

/// Version of this software, sent in hellos so each side can log who it talks to.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
