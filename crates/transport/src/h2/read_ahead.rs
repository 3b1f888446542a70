//! The TCP side of an HTTP/2 tunnel connection, read ahead once its peer is trusted
//! ([`ReadAhead`]): rustls asks the socket for about one TLS record (≤ 16 KiB) per read, so a
//! bulk transfer made one `recvfrom` per record; through a [`READ_AHEAD`] buffer it makes one
//! per four. Measured over TLS/TCP one-stream bulk on loopback (docs/benchmarks.md, "Round 2,
//! third part"): half the `recvfrom` calls, a third fewer system calls in all.
//!
//! Written here rather than taken from `tokio::io::BufReader` because of when the buffer is
//! taken: tokio's allocates it when the reader is built, before the TLS handshake, so every
//! unauthenticated connection the relay keeps pending (up to its pending cap) would hold one.
//! Here nothing is allocated until the connection is [`enabled`](ReadAheadSwitch::enable)
//! (the relay, once the agent's hello is admitted; the agent, once the relay's certificate
//! has been verified) and a read smaller than the buffer comes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at once, once read-ahead is on: four full TLS records.
pub(crate) const READ_AHEAD: usize = 64 * 1024;

/// Turns read-ahead on for one connection (shared with its [`ReadAhead`]).
#[derive(Debug, Default)]
pub(crate) struct ReadAheadSwitch(AtomicBool);

impl ReadAheadSwitch {
    /// From the next read on, reads smaller than [`READ_AHEAD`] fill the buffer first.
    pub(crate) fn enable(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A byte stream whose reads, once its switch is on, are served from a [`READ_AHEAD`] buffer
/// filled by one read of the stream; writes pass straight through.
#[derive(Debug)]
pub(crate) struct ReadAhead<S> {
    inner: S,
    switch: Arc<ReadAheadSwitch>,
    /// Taken at the first small read after the switch is on, kept for the connection's life
    /// (one per tunnel connection, not per client connection).
    buf: Option<Box<[u8]>>,
    /// Start of the bytes in `buf` not yet handed out.
    pos: usize,
    /// End of the bytes in `buf`.
    cap: usize,
}

impl<S> ReadAhead<S> {
    pub(crate) fn new(inner: S, switch: Arc<ReadAheadSwitch>) -> Self {
        Self { inner, switch, buf: None, pos: 0, cap: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.cap {
            // Nothing held: read straight into the caller's buffer when read-ahead is off or
            // would not read more than the caller asks for anyway.
            if !this.switch.is_on() || out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let buf = this.buf.get_or_insert_with(|| vec![0; READ_AHEAD].into_boxed_slice());
            let mut fill = ReadBuf::new(buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut fill))?;
            (this.pos, this.cap) = (0, fill.filled().len());
        }
        let Some(buf) = this.buf.as_deref() else { return Poll::Ready(Ok(())) };
        let n = (this.cap - this.pos).min(out.remaining());
        out.put_slice(&buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A reader over `data` that counts the reads it serves.
    struct Counting<'a> {
        data: &'a [u8],
        reads: usize,
    }

    impl AsyncRead for Counting<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            let n = self.data.len().min(out.remaining());
            out.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Poll::Ready(Ok(()))
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..251u8).cycle().take(len).collect()
    }

    /// Reads everything in `chunk`-byte reads, as rustls does (one record at a time).
    async fn read_all(reader: &mut ReadAhead<Counting<'_>>, chunk: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut part = vec![0; chunk];
        for _ in 0..100_000 {
            let n = reader.read(&mut part).await.expect("read");
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&part[..n]);
        }
        panic!("no EOF");
    }

    #[tokio::test]
    async fn until_enabled_every_read_goes_to_the_socket_and_nothing_is_allocated() {
        let data = pattern(256 * 1024);
        let switch = Arc::new(ReadAheadSwitch::default());
        let mut reader = ReadAhead::new(Counting { data: &data, reads: 0 }, switch);
        assert_eq!(read_all(&mut reader, 4096).await, data);
        assert_eq!(reader.inner.reads, 256 / 4 + 1); // the last one reads EOF
        assert!(reader.buf.is_none());
    }

    #[tokio::test]
    async fn enabled_small_reads_are_served_from_one_large_read() {
        let data = pattern(256 * 1024 + 100);
        let switch = Arc::new(ReadAheadSwitch::default());
        switch.enable();
        let mut reader = ReadAhead::new(Counting { data: &data, reads: 0 }, switch);
        assert_eq!(read_all(&mut reader, 16 * 1024 + 29).await, data);
        // Five buffer fills (the last one partial) and the EOF.
        assert_eq!(reader.inner.reads, 6);
    }

    #[tokio::test]
    async fn a_read_as_large_as_the_buffer_bypasses_it() {
        let data = pattern(3 * READ_AHEAD);
        let switch = Arc::new(ReadAheadSwitch::default());
        switch.enable();
        let mut reader = ReadAhead::new(Counting { data: &data, reads: 0 }, switch);
        assert_eq!(read_all(&mut reader, READ_AHEAD).await, data);
        assert!(reader.buf.is_none());
    }

    #[tokio::test]
    async fn switching_on_midway_loses_nothing() {
        let data = pattern(100_000);
        let switch = Arc::new(ReadAheadSwitch::default());
        let mut reader = ReadAhead::new(Counting { data: &data, reads: 0 }, Arc::clone(&switch));
        let mut first = vec![0; 1000];
        reader.read_exact(&mut first).await.expect("read");
        switch.enable();
        let mut got = first;
        got.extend(read_all(&mut reader, 700).await);
        assert_eq!(got, data);
    }
}
