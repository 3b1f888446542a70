//! Limits both tunnel transports share, so that a stream or a connection holds the same on
//! QUIC and on TLS/TCP: concurrent streams per connection, the stream receive window, and the
//! connection receive window of each end.

/// Concurrent streams the relay may open on one agent connection (plus the control stream).
pub const MAX_CONCURRENT_STREAMS: u32 = 16_384;
/// Per-stream receive window: above the 6.25 MB bandwidth-delay product of 1 Gbit/s × 50 ms.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// What the relay may buffer per agent connection (what the agent sends: downloads): the
/// largest window HTTP/2 can express, 2 GiB − 1, used on both transports. It takes 255 stalled
/// streams, each holding its full stream window, before the others slow down; what the relay
/// buffers is at most its open streams × [`STREAM_RECEIVE_WINDOW`], and the open streams are
/// bounded by the endpoints' `max_connections`.
pub const RELAY_RECEIVE_WINDOW: u32 = (1 << 31) - 1;
/// What the agent may buffer per relay connection (uploads): 1 GiB, room for 128 stalled
/// streams, and the most any relay — a compromised one too — can make an agent hold.
pub const AGENT_RECEIVE_WINDOW: u32 = 1 << 30;

/// Which end of the tunnel a transport's settings are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Listens for agents and opens streams.
    Relay,
    /// Dials relays and accepts streams.
    Agent,
}

/// The connection-level receive window of `role`.
///
/// A window only as large as a few stream windows (64 MiB, eight streams, until this was
/// measured) lets a few clients that stop reading — or destinations that stop reading
/// uploads — take all of it: credit returns only as data is consumed, so every other stream
/// on the connection stops. Ten stalled downloads gave a new client on the same endpoint no
/// byte in 12 s. With a connection window of hundreds of stream windows a stalled stream holds
/// only its own window (`tests/bad_input.rs`, `stalled_clients_hold_only_their_own_windows`).
pub fn connection_receive_window(role: Role) -> u32 {
    match role {
        Role::Relay => RELAY_RECEIVE_WINDOW,
        Role::Agent => AGENT_RECEIVE_WINDOW,
    }
}
