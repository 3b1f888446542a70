//! Limits both tunnel transports share, so that a stream or a connection holds the same on
//! QUIC and on TLS/TCP: concurrent streams per connection, the stream receive window, and the
//! connection receive windows, chosen so that streams whose receivers stall hold only their
//! own windows and leave credit for the others and for control.
//!
//! A connection window only as large as a few stream windows (64 MiB, eight streams, until
//! this was measured) lets a few clients that stop reading take all of it: credit returns
//! only as data is consumed, so every other stream on the connection stops. Ten stalled
//! downloads gave a new client on the same endpoint no byte in 12 s
//! (`tests/bad_input.rs`, `stalled_clients_hold_only_their_own_windows`).

/// The copy loop's largest read per direction. It lives on the stack while a read is in
/// hand; heap memory of this size is taken only while a writer is not keeping up. 64 KiB
/// rather than 32: half the reads of a client's or destination's socket in a bulk transfer,
/// measured as 8–18 % less CPU per GB on both transports and one-stream upload 0.74 → 0.91×
/// (TLS/TCP) and 0.44 → 0.53× (QUIC) of 2 × HAProxy (`docs/benchmarks.md`, "Round 2, third
/// part"), for 32 KiB more per direction whose writer is blocked.
pub const DEFAULT_BUFFER_SIZE: usize = 64 * 1024;
/// Concurrent streams the relay may open on one agent connection (plus the control stream).
pub const MAX_CONCURRENT_STREAMS: u32 = 16_384;
/// Per-stream receive window by default (`stream_window` sets it, on each side for the streams
/// it receives): what one stream may have in flight, and so the most its transport buffers
/// when the socket it is copied to stops reading. 2 MiB carries about 330 Mbit/s per stream at
/// 50 ms RTT (8 MiB did until the byte budget: 140 stalled uploads then took 1.1 GB of an
/// agent's memory and the whole connection window, heartbeats included). Measured before and
/// after in `docs/benchmarks.md`, "Stream window".
pub const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;
pub use privlink_protocol::config::{MAX_STREAM_WINDOW, MIN_STREAM_WINDOW};
/// What a stream whose socket stopped taking bytes is charged on the buffer budget
/// ([`crate::budget`]) besides the copy loop's buffer: its window, and the allocation the
/// transport may keep around it — quinn keeps received data in the buffers it arrived in and
/// compacts only past 1.5 × the buffered bytes of overhead, so a full window can hold 2.5
/// windows of memory (140 stalled uploads held about 4.2 MB each in an agent; HTTP/2 measured
/// nearer 1.1 windows).
pub const STALLED_STREAM_COST: u64 = stalled_stream_cost(STREAM_RECEIVE_WINDOW);

/// [`STALLED_STREAM_COST`] for a stream window of `window` bytes.
pub const fn stalled_stream_cost(window: u32) -> u64 {
    window as u64 * 5 / 2
}
/// The QUIC connection receive window: every stream the limit allows holding its whole window
/// still leaves a whole window of credit for the control stream, so heartbeats and control
/// messages never wait behind data credit. QUIC windows are 62-bit credits, not memory: what
/// is held is bounded by the buffer budget ([`crate::budget`]) and the stall timeout.
pub const QUIC_CONNECTION_WINDOW: u64 = quic_connection_window(STREAM_RECEIVE_WINDOW);

/// [`QUIC_CONNECTION_WINDOW`] for a stream window of `window` bytes.
pub const fn quic_connection_window(window: u32) -> u64 {
    (MAX_CONCURRENT_STREAMS as u64 + 1) * window as u64
}
/// The HTTP/2 connection receive window (TLS/TCP): the largest HTTP/2 can express,
/// 2 GiB − 1, room for 1,023 streams each holding its whole (default) window before the control
/// stream would wait for credit. On this transport the invariant is the buffer budget's: no
/// more streams are charged at once than its ceiling allows (1.25 × the budget, at most 4 GiB:
/// 1,017 streams of the default window), and a stream that backs up past the ceiling is cut.
/// A stream is charged 2.5 windows (and the copy's buffer) whatever the window, so the streams
/// a ceiling of at most 5 GiB admits hold less than 5 GiB ÷ 2.5 = 2 GiB of window: within
/// this one for any `stream_window` (with 64 MiB windows, about 400 KiB to spare).
pub const H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Which end of the tunnel a transport's settings are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Listens for agents and opens streams.
    Relay,
    /// Dials relays and accepts streams.
    Agent,
}
