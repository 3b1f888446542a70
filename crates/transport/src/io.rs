//! Reading and writing frames on an async byte stream, every read through the protocol's
//! [`FrameDecoder`].
//!
//! [`read_frame`] and [`poll_read_missing`] take exactly the frame's bytes (what the decoder
//! says is missing, no more), so nothing that follows — the destination's bytes behind an
//! open reply — is consumed; [`FrameReader`] reads ahead on streams that carry only frames.
//! Every read has a size bound (checked before the body is buffered) and a deadline or a
//! liveness check around it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut as _, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use privlink_protocol::frame::{self, FrameDecoder, FrameError};

/// Bytes a [`FrameReader`] asks the stream for at a time.
const READ_AHEAD: usize = 4096;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The stream ended cleanly before a frame started.
    #[error("stream closed before a frame arrived")]
    Closed,
    /// The deadline passed before the whole frame arrived.
    #[error("no complete frame within {0:?}")]
    Timeout(Duration),
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("stream error while reading a frame: {0}")]
    Io(#[source] io::Error),
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteFrameError {
    /// The message could not be encoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("stream error while writing a frame: {0}")]
    Io(#[from] io::Error),
}

/// Reads one frame whose body is at most `max_body` bytes, within `deadline`.
pub async fn read_frame<T, R>(
    reader: &mut R,
    max_body: usize,
    deadline: Duration,
) -> Result<T, ReadFrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    tokio::time::timeout(deadline, read_exact_frame(reader, FrameDecoder::new(max_body)))
        .await
        .map_err(|_| ReadFrameError::Timeout(deadline))?
}

async fn read_exact_frame<T, R>(reader: &mut R, decoder: FrameDecoder) -> Result<T, ReadFrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::new();
    loop {
        if let Some(message) = decoder.decode(&mut buf)? {
            return Ok(message);
        }
        let n =
            std::future::poll_fn(|cx| poll_read_missing(Pin::new(reader), cx, &mut buf, decoder))
                .await?;
        if n == 0 {
            return Err(end_of_stream(&buf));
        }
    }
}

/// Reads into `buf` at most the bytes the frame at its head still lacks (see
/// [`FrameDecoder::missing`]), so no byte behind the frame is taken from `reader`. Ready with
/// the count read: 0 when the stream ended, or when the frame is already whole. A header
/// that cannot start a valid frame fails here, before its body is read.
pub fn poll_read_missing<R: AsyncRead + ?Sized>(
    reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    decoder: FrameDecoder,
) -> Poll<Result<usize, ReadFrameError>> {
    let missing = decoder.missing(buf)?;
    if missing == 0 {
        return Poll::Ready(Ok(0));
    }
    buf.reserve(missing);
    let n = ready!(tokio_util::io::poll_read_buf(reader, cx, &mut buf.limit(missing)))
        .map_err(ReadFrameError::Io)?;
    Poll::Ready(Ok(n))
}

/// What an end of stream means to a reader holding `buf`: clean between frames, a truncation
/// inside one.
fn end_of_stream(buf: &[u8]) -> ReadFrameError {
    if buf.is_empty() {
        ReadFrameError::Closed
    } else {
        ReadFrameError::Io(io::ErrorKind::UnexpectedEof.into())
    }
}

/// Reads frame after frame from a long-lived stream (the control stream), keeping partial
/// frames in its own buffer so that [`FrameReader::next`] is cancel-safe: it can sit in a
/// `select!` next to timers and other events without losing bytes when another branch wins.
///
/// It may read past the end of a frame (the surplus stays buffered for the next call), so use
/// it only on streams that carry nothing but frames; [`read_frame`] reads exactly one frame.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next frame (body at most `max_body` bytes). No deadline: silence on a control stream
    /// is normal; liveness is the transport's keep-alive and the heartbeats' business.
    pub async fn next<T, R>(&mut self, reader: &mut R, max_body: usize) -> Result<T, ReadFrameError>
    where
        T: DeserializeOwned,
        R: AsyncRead + Unpin,
    {
        let decoder = FrameDecoder::new(max_body);
        loop {
            // The decoder checks the declared length before the body is buffered, so the
            // buffer never grows beyond one header, one bounded body and one read's surplus.
            if let Some(message) = decoder.decode(&mut self.buf)? {
                return Ok(message);
            }
            decoder.missing(&self.buf)?;
            self.buf.reserve(READ_AHEAD);
            // `read_buf` is cancel-safe: if this future is dropped, no byte has been taken.
            let n = reader.read_buf(&mut self.buf).await.map_err(ReadFrameError::Io)?;
            if n == 0 {
                return Err(end_of_stream(&self.buf));
            }
        }
    }
}

/// Encodes and writes one frame, then flushes.
pub async fn write_frame<T, W>(writer: &mut W, message: &T) -> Result<(), WriteFrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let bytes = frame::encode(message)?;
    write_and_flush(writer, &bytes).await?;
    Ok(())
}

/// Writes `bytes` whole, then flushes: for callers that put more than one frame's bytes in a
/// write (the relay sends the open header and the client's first bytes together).
pub async fn write_and_flush<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use privlink_protocol::message::{Control, OpenReply};

    #[tokio::test]
    async fn reads_exactly_one_frame_and_leaves_the_rest() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &OpenReply::Opened).await.expect("write");
        a.write_all(b"payload").await.expect("payload");
        drop(a);
        let reply: OpenReply =
            read_frame(&mut b, 1024, Duration::from_secs(5)).await.expect("frame");
        assert_eq!(reply, OpenReply::Opened);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"payload");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_hits_the_deadline() {
        let (_a, mut b) = tokio::io::duplex(64);
        let err = read_frame::<Control, _>(&mut b, 1024, Duration::from_secs(3))
            .await
            .expect_err("silent");
        assert!(matches!(err, ReadFrameError::Timeout(_)));
    }

    #[tokio::test]
    async fn clean_close_and_truncation_are_told_apart() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        let err = read_frame::<Control, _>(&mut b, 1024, Duration::from_secs(1)).await;
        assert!(matches!(err, Err(ReadFrameError::Closed)));

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[frame::FRAME_VERSION, 0, 0]).await.expect("write");
        drop(a);
        let err = read_frame::<Control, _>(&mut b, 1024, Duration::from_secs(1)).await;
        assert!(
            matches!(err, Err(ReadFrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        );
    }

    #[tokio::test]
    async fn frame_reader_survives_cancellation_mid_frame() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let first = frame::encode(&Control::Heartbeat { active_streams: 1 }).expect("encode");
        let second = frame::encode(&Control::Drain { reason: "bye".into() }).expect("encode");
        let mut reader = FrameReader::new();
        // Half a frame arrives, and the read is abandoned (as when another select! branch wins).
        a.write_all(&first[..3]).await.expect("write");
        let abandoned = tokio::time::timeout(
            Duration::from_millis(50),
            reader.next::<Control, _>(&mut b, 1024),
        )
        .await;
        assert!(abandoned.is_err(), "no whole frame yet");
        // The rest, and a second frame in the same write.
        a.write_all(&[&first[3..], &second[..]].concat()).await.expect("write");
        assert_eq!(
            reader.next::<Control, _>(&mut b, 1024).await.expect("first"),
            Control::Heartbeat { active_streams: 1 }
        );
        assert_eq!(
            reader.next::<Control, _>(&mut b, 1024).await.expect("second"),
            Control::Drain { reason: "bye".into() }
        );
        drop(a);
        assert!(matches!(
            reader.next::<Control, _>(&mut b, 1024).await,
            Err(ReadFrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn frame_reader_refuses_oversized_frames_before_buffering_them() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[frame::FRAME_VERSION, 0, 0x10, 0, 0]).await.expect("write");
        let err = FrameReader::new().next::<Control, _>(&mut b, 1024).await;
        assert!(matches!(err, Err(ReadFrameError::Frame(FrameError::TooLarge { .. }))));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_the_body() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // Announce 1 MiB and never send it: the bound must trip without waiting.
        a.write_all(&[frame::FRAME_VERSION, 0, 0x10, 0, 0]).await.expect("write");
        let err = read_frame::<Control, _>(&mut b, 1024, Duration::from_secs(5)).await;
        assert!(matches!(err, Err(ReadFrameError::Frame(FrameError::TooLarge { .. }))));
    }
}
