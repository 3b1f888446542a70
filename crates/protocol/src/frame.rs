//! Frame codec: `[version: u8][body length: u32 big-endian][body]`, the body a postcard-encoded
//! message.
//!
//! The codec is sans-IO: it turns messages into bytes and bytes into messages and never
//! touches a socket. The declared length is checked against a maximum *before* anything is
//! allocated, and an unknown version byte is refused with a message that says which version
//! was seen, so an old and a new peer fail loudly instead of misreading each other.

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

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (the caller reads more),
/// or the message and the number of bytes it took, so the caller can hand the rest on.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    max_body: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = decode_header(header, max_body)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, HEADER_LEN + len)))
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

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Control>(&bytes, MAX_BODY_LEN);
            let _ = decode::<crate::message::Open>(&bytes, MAX_BODY_LEN);
            let _ = decode::<OpenReply>(&bytes, MAX_BODY_LEN);
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
