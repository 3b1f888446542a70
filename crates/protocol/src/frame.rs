//! Frame codec: `[version: u8][body length: u32 big-endian][body]`, the body a postcard-encoded
//! message.
//!
//! The codec is sans-IO: it turns messages into bytes and bytes into messages and never
//! touches a socket. The declared length is checked against a maximum *before* anything is
//! allocated, and an unknown version byte is refused with a message that says which version
//! was seen, so an old and a new peer fail loudly instead of misreading each other.
//!
//! [`FrameDecoder`] is the one incremental decoder every reader of frames uses (the frame I/O
//! of the transport and the relay's open-reply gate): it works on whatever bytes the caller
//! has buffered so far, says how many more the frame at their head needs
//! ([`FrameDecoder::missing`], so a reader that must not take the bytes behind a frame reads
//! exactly that many), and splits a whole frame off the front, leaving what follows.

use bytes::{Buf as _, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

/// The frame format version this build speaks.
pub const FRAME_VERSION: u8 = 1;
/// Bytes in a frame header: one version byte and a 32-bit body length.
pub const HEADER_LEN: usize = 5;
/// Largest body any privlink frame may carry. Control messages are small; the largest is a
/// hello listing the agent's allowlist, which stays far below this.
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// Why bytes could not be turned into a frame, or a message into bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The peer speaks another frame version.
    #[error("unsupported frame version {found} (this build speaks version {FRAME_VERSION})")]
    UnsupportedVersion {
        /// The version byte that was received.
        found: u8,
    },
    /// The declared body length exceeds the bound the reader accepts.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared body length.
        len: usize,
        /// The bound in force.
        max: usize,
    },
    /// The body is not a valid encoding of the expected message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The body was valid but bytes were left over after the message.
    #[error("{0} unexpected bytes after the message in a frame body")]
    TrailingBytes(usize),
}

/// Encodes `message` as one complete frame (header and body).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    // Reserve the header, serialize the body after it, then fill the header in: one
    // allocation, no copy.
    let mut out = postcard::to_extend(message, vec![0u8; HEADER_LEN])
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let body_len = out.len() - HEADER_LEN;
    if body_len > MAX_BODY_LEN {
        return Err(FrameError::TooLarge { len: body_len, max: MAX_BODY_LEN });
    }
    let declared = u32::try_from(body_len)
        .map_err(|_| FrameError::TooLarge { len: body_len, max: MAX_BODY_LEN })?;
    out[0] = FRAME_VERSION;
    out[1..HEADER_LEN].copy_from_slice(&declared.to_be_bytes());
    Ok(out)
}

/// Parses a frame header and returns the body length it announces, refusing versions other
/// than [`FRAME_VERSION`] and lengths above `max_body` (itself capped at [`MAX_BODY_LEN`]).
pub fn decode_header(header: &[u8; HEADER_LEN], max_body: usize) -> Result<usize, FrameError> {
    if header[0] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion { found: header[0] });
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let max = max_body.min(MAX_BODY_LEN);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body into a message; every byte of the body must belong to it.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

/// Decodes the first frame in `buf` (the slice form of [`FrameDecoder::decode`]).
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (the caller reads more),
/// or the message and the number of bytes it took, so the caller can hand the rest on.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    max_body: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    match FrameDecoder::new(max_body).whole_frame(buf)? {
        None => Ok(None),
        Some((body, used)) => Ok(Some((decode_body(body)?, used))),
    }
}

/// The incremental frame decoder: fed the bytes a reader has buffered so far, it asks for
/// what the frame at their head still lacks and splits whole frames off the front. It holds
/// no bytes itself, only the body bound, so a caller keeps one buffer and can drop a pending
/// read at any point without losing anything (the buffer has every byte read).
///
/// Bounded: the header's length is checked against the bound as soon as the header is
/// complete, so a buffer fed only what [`missing`](Self::missing) asks for never holds more
/// than one header and one bounded body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDecoder {
    max_body: usize,
}

impl FrameDecoder {
    /// A decoder for frames whose body is at most `max_body` bytes (itself capped at
    /// [`MAX_BODY_LEN`]).
    pub fn new(max_body: usize) -> Self {
        Self { max_body: max_body.min(MAX_BODY_LEN) }
    }

    /// The body bound in force.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// How many more bytes the frame at the head of `buf` needs to be whole: 0 when `buf`
    /// holds it. Reading at most this many never takes a byte that follows the frame. Fails
    /// as soon as the header is complete and names another version or too long a body.
    pub fn missing(&self, buf: &[u8]) -> Result<usize, FrameError> {
        match buf.first_chunk::<HEADER_LEN>() {
            None => Ok(HEADER_LEN - buf.len()),
            Some(header) => Ok(self.frame_len(header)?.saturating_sub(buf.len())),
        }
    }

    /// A whole frame's length (header and body), from its header.
    fn frame_len(&self, header: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
        Ok(HEADER_LEN + decode_header(header, self.max_body)?)
    }

    /// Takes the frame at the head of `buf` off and decodes it. `Ok(None)`: not whole yet,
    /// and `buf` is untouched; the bytes behind a decoded frame stay in `buf`. A whole frame
    /// whose body fails to decode is taken off too, so the error is not met again.
    pub fn decode<T: DeserializeOwned>(&self, buf: &mut BytesMut) -> Result<Option<T>, FrameError> {
        let Some((body, used)) = self.whole_frame(buf)? else {
            return Ok(None);
        };
        let message = decode_body(body);
        buf.advance(used);
        message.map(Some)
    }

    /// The body of the frame at the head of `buf` and the bytes the whole frame spans, or
    /// `None` while it is not whole.
    fn whole_frame<'b>(&self, buf: &'b [u8]) -> Result<Option<(&'b [u8], usize)>, FrameError> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = self.frame_len(header)?;
        Ok(buf.get(HEADER_LEN..len).map(|body| (body, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Control, OpenReply};
    use proptest::prelude::*;

    #[test]
    fn round_trip_leaves_following_bytes_alone() {
        let reply = OpenReply::Opened;
        let mut buf = encode(&reply).expect("encode");
        let frame_len = buf.len();
        buf.extend_from_slice(b"client bytes");
        let (decoded, used) =
            decode::<OpenReply>(&buf, MAX_BODY_LEN).expect("decode").expect("whole");
        assert_eq!(decoded, reply);
        assert_eq!(used, frame_len);
        assert_eq!(&buf[used..], b"client bytes");
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let buf = encode(&Control::Heartbeat { active_streams: 7 }).expect("encode");
        for cut in 0..buf.len() {
            assert_eq!(decode::<Control>(&buf[..cut], MAX_BODY_LEN), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn unknown_version_is_refused_by_name() {
        let mut buf = encode(&OpenReply::Opened).expect("encode");
        buf[0] = 9;
        let err = decode::<OpenReply>(&buf, MAX_BODY_LEN).expect_err("version 9");
        assert_eq!(err, FrameError::UnsupportedVersion { found: 9 });
        assert!(err.to_string().contains("version 9"));
    }

    #[test]
    fn length_is_checked_before_the_body_arrives() {
        // Only the header: a 4 GiB claim must fail now, not wait for (or allocate) the body.
        let header = [FRAME_VERSION, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode::<Control>(&header, MAX_BODY_LEN),
            Err(FrameError::TooLarge { max: MAX_BODY_LEN, .. })
        ));
        // A caller's tighter bound wins over the global one.
        let buf = encode(&Control::Refused { reason: "x".repeat(100) }).expect("encode");
        assert!(matches!(decode::<Control>(&buf, 16), Err(FrameError::TooLarge { max: 16, .. })));
    }

    #[test]
    fn trailing_bytes_inside_a_body_are_malformed() {
        let mut buf = encode(&OpenReply::Opened).expect("encode");
        buf.push(0);
        let len = u32::try_from(buf.len() - HEADER_LEN).expect("small");
        buf[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode::<OpenReply>(&buf, MAX_BODY_LEN), Err(FrameError::TrailingBytes(1)));
    }

    #[test]
    fn oversized_messages_are_not_encoded() {
        let huge = Control::Refused { reason: "x".repeat(MAX_BODY_LEN + 1) };
        assert!(matches!(encode(&huge), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn decoder_asks_for_exactly_the_missing_bytes() {
        let frame = encode(&Control::Drain { reason: "maintenance".into() }).expect("encode");
        let decoder = FrameDecoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::new();
        // Fed only what it asks for, one byte at a time, it never takes a byte of what follows.
        let stream = [&frame[..], b"destination bytes"].concat();
        let mut fed = 0;
        loop {
            let missing = decoder.missing(&buf).expect("valid so far");
            if missing == 0 {
                break;
            }
            // Until the header is whole only the header's rest is asked for; then the body's.
            let expected = if fed < HEADER_LEN { HEADER_LEN - fed } else { frame.len() - fed };
            assert_eq!(missing, expected, "after {fed} bytes");
            buf.extend_from_slice(&stream[fed..=fed]);
            fed += 1;
        }
        assert_eq!(fed, frame.len());
        let message: Control = decoder.decode(&mut buf).expect("decode").expect("whole");
        assert_eq!(message, Control::Drain { reason: "maintenance".into() });
        assert!(buf.is_empty());
    }

    #[test]
    fn decoder_leaves_what_follows_a_frame_in_the_buffer() {
        let decoder = FrameDecoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::from(&encode(&OpenReply::Opened).expect("encode")[..]);
        buf.extend_from_slice(b"GET /");
        assert_eq!(decoder.decode::<OpenReply>(&mut buf), Ok(Some(OpenReply::Opened)));
        assert_eq!(&buf[..], b"GET /");
        // An incomplete frame leaves the buffer as it was.
        let mut partial = BytesMut::from(&[FRAME_VERSION, 0, 0][..]);
        assert_eq!(decoder.decode::<OpenReply>(&mut partial), Ok(None));
        assert_eq!(partial.len(), 3);
    }

    #[test]
    fn decoder_refuses_a_bad_header_before_any_body_arrives() {
        let decoder = FrameDecoder::new(1024);
        assert_eq!(decoder.max_body(), 1024);
        assert_eq!(decoder.missing(&[FRAME_VERSION, 0, 0, 0x10]), Ok(1));
        assert_eq!(
            decoder.missing(&[FRAME_VERSION, 0, 0, 0x10, 0]),
            Err(FrameError::TooLarge { len: 0x1000, max: 1024 })
        );
        assert_eq!(
            decoder.missing(&[7, 0, 0, 0, 1]),
            Err(FrameError::UnsupportedVersion { found: 7 })
        );
        // The bound can be tightened, never loosened past the global one.
        assert_eq!(FrameDecoder::new(usize::MAX).max_body(), MAX_BODY_LEN);
    }

    #[test]
    fn decoder_takes_a_malformed_frame_off_with_its_error() {
        let decoder = FrameDecoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::from(&[FRAME_VERSION, 0, 0, 0, 1, 0xff][..]);
        buf.extend_from_slice(&encode(&OpenReply::Opened).expect("encode"));
        assert!(matches!(decoder.decode::<OpenReply>(&mut buf), Err(FrameError::Malformed(_))));
        assert_eq!(decoder.decode::<OpenReply>(&mut buf), Ok(Some(OpenReply::Opened)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Control>(&bytes, MAX_BODY_LEN);
            let _ = decode::<crate::message::Open>(&bytes, MAX_BODY_LEN);
            let _ = decode::<OpenReply>(&bytes, MAX_BODY_LEN);
        }

        #[test]
        fn incremental_decoding_matches_whole_decoding(
            beats in proptest::collection::vec(any::<u32>(), 1..8),
            cuts in proptest::collection::vec(1usize..40, 1..64),
        ) {
            // Frames cut into arbitrary pieces decode to the same messages, in order.
            let messages: Vec<Control> =
                beats.iter().map(|&n| Control::Heartbeat { active_streams: n }).collect();
            let stream: Vec<u8> =
                messages.iter().flat_map(|m| encode(m).expect("encode")).collect();
            let decoder = FrameDecoder::new(MAX_BODY_LEN);
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at >= stream.len() {
                    break;
                }
                let end = (at + cut).min(stream.len());
                buf.extend_from_slice(&stream[at..end]);
                at = end;
                while let Some(message) = decoder.decode::<Control>(&mut buf).expect("valid") {
                    decoded.push(message);
                }
            }
            prop_assert_eq!(decoded, messages);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn a_decoder_fed_what_it_asks_for_stays_bounded(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            max_body in 0usize..256,
        ) {
            // Whatever arrives, a reader that reads only `missing` bytes holds at most one
            // header and one bounded body, and each error is a clean value.
            let decoder = FrameDecoder::new(max_body);
            let mut buf = BytesMut::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let Ok(missing) = decoder.missing(&buf) else { break };
                if missing == 0 {
                    // A malformed body is an error value, and the frame is taken off either way.
                    let _ = decoder.decode::<OpenReply>(&mut buf);
                    prop_assert!(buf.is_empty());
                    continue;
                }
                let take = missing.min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                prop_assert!(buf.len() <= HEADER_LEN + max_body);
            }
        }

        #[test]
        fn random_bodies_behind_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = vec![FRAME_VERSION];
            buf.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
            buf.extend_from_slice(&body);
            let _ = decode::<Control>(&buf, MAX_BODY_LEN);
            let _ = decode::<crate::message::Open>(&buf, MAX_BODY_LEN);
        }
    }
}
