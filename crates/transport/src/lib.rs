//! The tokio side of privlink: everything that moves the protocol's bytes. It reads and writes
//! frames on async streams, drives the control state machines of `privlink-protocol` over a
//! tunnel stream, runs the copy loop and maps how a copy ended to resets and an outcome, and
//! provides the two tunnel transports — QUIC (quinn) and TLS 1.3 over TCP carrying HTTP/2 (h2)
//! — each with a matching `dial` (agent) and `accept` (relay). The relay's side of a tunnel
//! connection is [`tunnel::RelayConnection`], which opens streams; the agent's is
//! [`tunnel::AgentConnection`], which accepts them: a call on the wrong side does not compile.
//! It decides no policy: which agent, which destination and which ACL is the relay's and the
//! agent's business.
//!
//! # Layout
//!
//! * [`io`] — one frame on an async stream, with a size bound and a deadline; a cancel-safe
//!   frame reader for long-lived streams.
//! * [`session`] — the one session driver: a control stream and either side's state machine,
//!   bytes and time moved, events handed to the role; the session error both roles share.
//! * [`copy`] — the bidirectional copy loop with inactivity and stall timeouts and byte
//!   counts (`copy::watch`: what watches it from outside the loop).
//! * [`audit`] — the audit trail's file writer: a bounded queue, batched appends and fsync,
//!   rotation by size, the chain continued across restarts.
//! * [`budget`] — the process-wide budget of bytes held for streams whose receiver is not
//!   keeping up, charged by the copy loop, asked before a new stream starts.
//! * [`live`] — the connections open now, with bytes each way as they move, for the admin API.
//! * [`splice`] — how one forwarded connection's copy ended: resets, aborts and an outcome
//!   tagged by where it came from, with a retry-safety flag.
//! * [`tunnel`] — the connection and stream types both transports share; the codes and
//!   errors both report (`codes`, re-exported there).
//! * [`limits`] — stream and connection windows and the stream limit both transports use.
//! * [`quic`], [`h2`] — the two transports; `quic_session` the agent's QUIC TLS session,
//!   which reads what the relay chose from its ServerHello (quinn does not tell).
//! * [`listener`] — the relay's tunnel listener: QUIC and TLS/TCP on one port, both accept
//!   loops, the identity replaced on reload.
//! * [`dialer`] — the agent's dialler: one QUIC endpoint and the TLS settings for every relay.
//! * [`http_proxy`] — crossing an HTTP proxy (CONNECT) on the way to a relay.
//! * [`tcp`] — listening with a large backlog, the accept loop, closing with a reset.
//! * [`throttle`] — log lines a flood could repeat, written at most once per interval.
//! * [`crypto`] — the one place every crypto provider is built (aws-lc-rs, the key exchange).
//! * [`tls`] — PEM loading and the tunnel's rustls configurations.
//! * [`drain`] — letting tracked tasks finish within a grace period, then forcing them.
//! * `pki` (feature `pki`) — a private CA and server certificates for first deployments, the
//!   demo and tests.
#![forbid(unsafe_code)]

pub mod audit;
pub mod budget;
mod codes;
pub mod copy;
pub mod crypto;
pub mod dialer;
pub mod drain;
pub mod h2;
pub mod http_proxy;
pub mod io;
pub mod limits;
pub mod listener;
pub mod live;
#[cfg(feature = "pki")]
pub mod pki;
pub mod quic;
mod quic_session;
pub mod session;
pub mod splice;
pub mod tcp;
pub mod throttle;
pub mod tls;
pub mod tunnel;
