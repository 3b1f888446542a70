//! The open exchange of one data stream, the relay's side: the [`OpenReplyGate`] that reads
//! the agent's [`OpenReply`] before any destination byte reaches the client, the [`Replay`]
//! copy of the client's bytes kept until that answer, and the decision, when an attempt ends
//! unanswered, whether another agent may be tried ([`retry_elsewhere`]).
//!
//! Until the answer nothing has reached the client, so a failure another agent might not
//! repeat (a destination this agent could not reach, a lost stream, no answer in time) is
//! safe to replay elsewhere; a policy refusal is not (every agent would say the same).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use privlink_protocol::frame::FrameDecoder;
use privlink_protocol::message::{MAX_OPEN_BODY, OpenFailure, OpenReply};
use privlink_transport::copy::{CopyEnd, Side};
use privlink_transport::io::{ReadFrameError, poll_read_missing};
use privlink_transport::splice::{Origin, Outcome, SpliceStream};
use privlink_transport::tunnel::ResetCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An attempt that ended before the agent answered, in a way another agent might not repeat:
/// nothing reached the client.
#[derive(Debug)]
pub(crate) struct Unanswered {
    /// What went wrong (the flow log's outcome if no other agent is tried).
    pub(crate) failure: Outcome,
    /// The agent did not answer in time (it becomes suspect).
    pub(crate) timed_out: bool,
}

impl Unanswered {
    /// A failure at `origin`, before any answer.
    pub(crate) fn new(origin: Origin, message: impl std::fmt::Display, timed_out: bool) -> Self {
        Self { failure: Outcome::failed(origin, message, true), timed_out }
    }
}

/// Whether a copy that ended with `end`, on a stream whose agent had not answered `Opened`,
/// may be replayed on another agent: an open failure this agent's network explains, or the
/// tunnel side failing (a lost stream or connection, the answer's deadline). The agent's
/// refusal, when it sent one, decides — whichever error the copy saw first (the agent resets
/// the stream right after its answer, which a write may hit before the read). `None`: the
/// attempt's outcome stands.
pub(crate) fn retry_elsewhere(
    refusal: Option<&OpenFailure>,
    end: &CopyEnd,
    timed_out: bool,
) -> Option<Unanswered> {
    match (refusal, end) {
        (Some(failure), _) if failure.code.retry_elsewhere() => {
            Some(Unanswered { failure: Outcome::OpenFailed(failure.clone()), timed_out: false })
        }
        (Some(_), _) => None, // a policy refusal: every agent would say the same
        (None, CopyEnd::Failed { side: Side::Tunnel, error }) => {
            Some(Unanswered::new(Origin::Agent, error, timed_out))
        }
        (None, _) => None,
    }
}

/// The client bytes read before the agent answered, kept to be written again behind a new
/// open header if this agent fails before answering. Bounded: past the limit the copy is
/// dropped and the connection is no longer retried.
#[derive(Debug)]
pub(crate) struct Replay {
    /// `None` once the limit was passed.
    bytes: Option<Vec<u8>>,
    limit: usize,
    /// The client's first byte, kept whatever the limit: whether it spoke TLS decides how it is
    /// turned away if no agent serves it.
    first_byte: Option<u8>,
}

impl Replay {
    pub(crate) fn new(limit: usize) -> Self {
        Self { bytes: Some(Vec::new()), limit, first_byte: None }
    }

    /// The first byte the client sent, once it sent one.
    pub(crate) fn first_byte(&self) -> Option<u8> {
        self.first_byte
    }

    pub(crate) fn record(&mut self, data: &[u8]) {
        if self.first_byte.is_none() {
            self.first_byte = data.first().copied();
        }
        if let Some(bytes) = &mut self.bytes {
            if bytes.len() + data.len() > self.limit {
                self.bytes = None;
            } else {
                bytes.extend_from_slice(data);
            }
        }
    }

    /// Whether every byte the client sent so far is kept.
    pub(crate) fn intact(&self) -> bool {
        self.bytes.is_some()
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.bytes.as_deref().unwrap_or_default()
    }

    /// The agent answered: nothing will be replayed.
    fn release(&mut self) {
        if self.bytes.as_ref().is_some_and(|b| b.capacity() > 0) {
            self.bytes = Some(Vec::new());
        }
    }
}

/// The client's socket as the copy loop reads it: until the agent answers, every byte read is
/// also kept in the [`Replay`].
#[derive(Debug)]
pub(crate) struct Recording<'a, S> {
    pub(crate) socket: &'a mut S,
    pub(crate) replay: &'a mut Replay,
    /// Set by the open-reply gate when the agent answered.
    pub(crate) answered: &'a AtomicBool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Freed at the first poll after the answer, read or not: an idle connection keeps no
        // copy of its first bytes.
        let answered = this.answered.load(Ordering::Relaxed);
        if answered {
            this.replay.release();
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.socket).poll_read(cx, buf))?;
        if !answered {
            this.replay.record(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().socket).poll_shutdown(cx)
    }
}

/// Reads the agent's [`OpenReply`] at the head of a data stream before passing the
/// destination's bytes through. Writes (the client's bytes) pass straight through from the
/// start. An open failure surfaces as a `ConnectionRefused` error carrying the
/// [`OpenFailure`], so the copy loop ends on the tunnel side with the agent's reason; no
/// answer by the deadline, as a `TimedOut` error; a malformed answer, as `InvalidData`.
#[derive(Debug)]
pub(crate) struct OpenReplyGate<'a, S> {
    stream: &'a mut S,
    /// The answer's bytes so far, read exactly (no destination byte behind it is taken);
    /// `None` once `Opened` was read.
    reply: Option<BytesMut>,
    /// When the agent's answer was read.
    pub(crate) opened_at: Option<Instant>,
    /// The answer's deadline; dropped (freed) once it has come.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Whether the deadline passed first.
    pub(crate) timed_out: bool,
    /// Set when the agent answered `Opened` (the [`Recording`] stops keeping bytes).
    answered: &'a AtomicBool,
    /// The agent's refusal, when it answered `OpenFailed`.
    pub(crate) refusal: Option<OpenFailure>,
    /// What the client reads first once the agent has opened, before the destination's bytes
    /// (a CONNECT client's `200`); empty once given.
    greeting: &'static [u8],
}

impl<'a, S> OpenReplyGate<'a, S> {
    /// `greeting`: what the client reads once the agent has opened, ahead of the destination's
    /// first byte (empty: nothing).
    pub(crate) fn new(
        stream: &'a mut S,
        deadline: Instant,
        answered: &'a AtomicBool,
        greeting: &'static [u8],
    ) -> Self {
        Self {
            stream,
            reply: Some(BytesMut::new()),
            opened_at: None,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            timed_out: false,
            answered,
            refusal: None,
            greeting,
        }
    }

    /// Whether the agent answered `Opened`.
    pub(crate) fn is_open(&self) -> bool {
        self.reply.is_none()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OpenReplyGate<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                this.timed_out = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the agent did not answer the open request in time",
                )));
            }
        }
        let decoder = FrameDecoder::new(MAX_OPEN_BODY);
        while let Some(reply) = &mut this.reply {
            let decoded = decoder.decode::<OpenReply>(reply).map_err(invalid_answer)?;
            let Some(answer) = decoded else {
                let read =
                    ready!(poll_read_missing(Pin::new(&mut *this.stream), cx, reply, decoder));
                if read.map_err(|e| match e {
                    ReadFrameError::Io(e) => e,
                    other => invalid_answer(other),
                })? == 0
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "agent closed the stream before answering the open request",
                    )));
                }
                continue;
            };
            this.deadline = None;
            match answer {
                OpenReply::Opened => {
                    this.reply = None;
                    this.opened_at = Some(Instant::now());
                    this.answered.store(true, Ordering::Relaxed);
                }
                OpenReply::Failed(failure) => {
                    this.refusal = Some(failure.clone());
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        failure,
                    )));
                }
            }
        }
        if !this.greeting.is_empty() && out.remaining() > 0 {
            let n = this.greeting.len().min(out.remaining());
            out.put_slice(&this.greeting[..n]);
            this.greeting = &this.greeting[n..];
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *this.stream).poll_read(cx, out)
    }
}

/// A reply that is not a valid answer, as the copy loop's error.
fn invalid_answer(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OpenReplyGate<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_shutdown(cx)
    }
}

impl<S: SpliceStream> SpliceStream for OpenReplyGate<'_, S> {
    fn reset(&mut self, code: ResetCode) {
        self.stream.reset(code);
    }

    fn answered(&self) -> bool {
        self.is_open()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use privlink_protocol::frame;
    use privlink_protocol::message::OpenFailCode;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;

    /// What the agent sends on the stream, then whether it closes it.
    async fn gate_reads(agent_sends: &[u8], close: bool, wait: Duration) -> Gated {
        gate_greets(agent_sends, close, wait, b"").await
    }

    /// [`gate_reads`], the gate giving `greeting` once the agent has opened.
    async fn gate_greets(
        agent_sends: &[u8],
        close: bool,
        wait: Duration,
        greeting: &'static [u8],
    ) -> Gated {
        let (mut relay_side, mut agent_side) = tokio::io::duplex(64 * 1024);
        agent_side.write_all(agent_sends).await.expect("agent writes");
        if close {
            drop(agent_side);
        } else {
            // Kept open (silent) until the test ends.
            std::mem::forget(agent_side);
        }
        let answered = AtomicBool::new(false);
        let mut gate =
            OpenReplyGate::new(&mut relay_side, Instant::now() + wait, &answered, greeting);
        let mut passed = Vec::new();
        let read = gate.read_to_end(&mut passed).await;
        Gated {
            passed,
            error: read.err(),
            answered: answered.load(Ordering::Relaxed),
            open: gate.is_open(),
            refusal: gate.refusal.take(),
            timed_out: gate.timed_out,
        }
    }

    #[derive(Debug)]
    struct Gated {
        passed: Vec<u8>,
        error: Option<io::Error>,
        answered: bool,
        open: bool,
        refusal: Option<OpenFailure>,
        timed_out: bool,
    }

    impl Gated {
        /// The retry decision the dispatcher would take after this copy.
        fn decision(mut self) -> Option<Unanswered> {
            let end = match self.error.take() {
                Some(error) => CopyEnd::Failed { side: Side::Tunnel, error },
                None => CopyEnd::Finished,
            };
            retry_elsewhere(self.refusal.as_ref(), &end, self.timed_out)
        }
    }

    fn failed(code: OpenFailCode) -> Vec<u8> {
        let failure = OpenFailure { code, message: format!("{code} at the agent") };
        frame::encode(&OpenReply::Failed(failure)).expect("encode")
    }

    #[tokio::test]
    async fn opened_passes_the_destination_bytes_behind_it_and_nothing_else() {
        let mut sent = frame::encode(&OpenReply::Opened).expect("encode");
        sent.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let gated = gate_reads(&sent, true, Duration::from_secs(5)).await;
        assert_eq!(gated.passed, b"HTTP/1.1 200 OK\r\n");
        assert!(gated.error.is_none());
        assert!(gated.answered && gated.open);
        assert!(gated.decision().is_none(), "an answered stream is never replayed");
    }

    #[tokio::test]
    async fn a_greeting_comes_after_opened_and_before_the_destinations_bytes_and_never_before() {
        let greeting = b"HTTP/1.1 200 Connection established\r\n\r\n";
        let mut sent = frame::encode(&OpenReply::Opened).expect("encode");
        sent.extend_from_slice(b"\x16\x03\x03 ServerHello");
        let gated = gate_greets(&sent, true, Duration::from_secs(5), greeting).await;
        assert_eq!(gated.passed, [&greeting[..], b"\x16\x03\x03 ServerHello"].concat());

        let refusal = failed(OpenFailCode::Refused);
        let refused = gate_greets(&refusal, true, Duration::from_secs(5), greeting).await;
        assert!(refused.passed.is_empty(), "a refused open greets nobody: {:?}", refused.passed);
        assert!(refused.refusal.is_some());
    }

    #[tokio::test]
    async fn failures_another_agent_might_not_repeat_are_retried() {
        for code in [
            OpenFailCode::DnsFailure,
            OpenFailCode::Refused,
            OpenFailCode::Timeout,
            OpenFailCode::Unreachable,
        ] {
            let gated = gate_reads(&failed(code), true, Duration::from_secs(5)).await;
            assert!(gated.passed.is_empty() && !gated.answered, "{code}");
            let retry = gated.decision().unwrap_or_else(|| panic!("{code} is retried"));
            assert!(matches!(retry.failure, Outcome::OpenFailed(ref f) if f.code == code));
            assert!(!retry.timed_out);
        }
    }

    #[tokio::test]
    async fn policy_refusals_are_not_retried() {
        for code in [OpenFailCode::NotAllowed, OpenFailCode::BadRequest] {
            let gated = gate_reads(&failed(code), true, Duration::from_secs(5)).await;
            let refusal = gated.refusal.clone().expect("the refusal is kept for the flow log");
            assert_eq!(refusal.code, code);
            assert!(gated.decision().is_none(), "{code} is final");
        }
    }

    #[tokio::test]
    async fn a_refusal_decides_even_when_the_copy_saw_another_error_first() {
        // The agent resets right after its answer; a write may fail before the read.
        let refusal = OpenFailure { code: OpenFailCode::NotAllowed, message: "no".into() };
        let end = CopyEnd::Failed { side: Side::Tunnel, error: io::ErrorKind::BrokenPipe.into() };
        assert!(retry_elsewhere(Some(&refusal), &end, false).is_none());
        let refusal = OpenFailure { code: OpenFailCode::Refused, message: "closed".into() };
        let end = CopyEnd::Failed { side: Side::Socket, error: io::ErrorKind::BrokenPipe.into() };
        assert!(retry_elsewhere(Some(&refusal), &end, false).is_some());
    }

    #[tokio::test]
    async fn a_stream_lost_before_the_answer_is_retried() {
        // Closed after half a header.
        let gated = gate_reads(&[frame::FRAME_VERSION, 0], true, Duration::from_secs(5)).await;
        let kind = gated.error.as_ref().map(io::Error::kind);
        assert_eq!(kind, Some(io::ErrorKind::UnexpectedEof));
        let retry = gated.decision().expect("retried");
        assert!(retry.failure.retry_safe() && !retry.timed_out);
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_in_time_is_retried_and_marks_the_agent() {
        let gated = gate_reads(&[], false, Duration::from_secs(3)).await;
        assert!(gated.timed_out);
        let retry = gated.decision().expect("retried");
        assert!(retry.timed_out, "the silent agent becomes suspect");
    }

    #[tokio::test]
    async fn a_malformed_answer_is_invalid_data() {
        let gated = gate_reads(&[9, 0, 0, 0, 1, 0], true, Duration::from_secs(5)).await;
        assert_eq!(gated.error.as_ref().map(io::Error::kind), Some(io::ErrorKind::InvalidData));
        // An oversized one is refused from its header, before a body is read.
        let gated =
            gate_reads(&[frame::FRAME_VERSION, 0xff, 0xff, 0, 0], false, Duration::from_secs(5))
                .await;
        assert_eq!(gated.error.as_ref().map(io::Error::kind), Some(io::ErrorKind::InvalidData));
    }

    #[tokio::test]
    async fn the_copy_of_the_client_bytes_is_bounded_and_freed_on_answer() {
        let mut replay = Replay::new(8);
        replay.record(b"hello");
        assert!(replay.intact());
        assert_eq!(replay.bytes(), b"hello");
        replay.record(b"world");
        assert!(!replay.intact(), "over the limit: no longer replayable");
        assert!(replay.bytes().is_empty());

        // Through the recording reader: kept until answered, released at the next poll after.
        let (mut client, mut socket) = tokio::io::duplex(1024);
        let answered = AtomicBool::new(false);
        let mut replay = Replay::new(1024);
        let mut recording =
            Recording { socket: &mut socket, replay: &mut replay, answered: &answered };
        let mut buf = [0u8; 64];
        client.write_all(b"ClientHello").await.expect("write");
        let n = recording.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"ClientHello");
        answered.store(true, Ordering::Relaxed);
        client.write_all(b"more").await.expect("write");
        let n = recording.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"more");
        assert!(replay.bytes().is_empty(), "released once answered");
        assert!(replay.intact());
    }

    /// An in-memory stream standing for a tunnel stream in [`SpliceStream`] checks.
    #[derive(Debug)]
    struct MemoryStream(DuplexStream, Vec<ResetCode>);

    impl AsyncRead for MemoryStream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for MemoryStream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    impl SpliceStream for MemoryStream {
        fn reset(&mut self, code: ResetCode) {
            self.1.push(code);
        }
    }

    #[tokio::test]
    async fn the_gate_says_answered_only_after_opened_and_passes_resets_on() {
        let (relay_side, mut agent_side) = tokio::io::duplex(1024);
        let mut stream = MemoryStream(relay_side, Vec::new());
        let answered = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut gate = OpenReplyGate::new(&mut stream, deadline, &answered, b"");
        assert!(!SpliceStream::answered(&gate));
        agent_side
            .write_all(&frame::encode(&OpenReply::Opened).expect("encode"))
            .await
            .expect("write");
        agent_side.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        gate.read_exact(&mut one).await.expect("read");
        assert!(SpliceStream::answered(&gate));
        gate.reset(ResetCode::IdleTimeout);
        assert_eq!(stream.1, [ResetCode::IdleTimeout]);
    }
}
