//! One HTTP/2 tunnel stream as a byte stream ([`H2Stream`]): request or response headers held
//! back until the first bytes, DATA frames read with capacity released as the copy loop
//! consumes them, END_STREAM as FIN and RST_STREAM as a reset.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::codes::ResetCode;

/// Most bytes one write hands h2, and so the largest DATA frame it sends: h2 sends each write
/// as a frame of its own, and a frame is what other streams' next bytes wait behind on the
/// one TCP connection. The copy loop reads 64 KiB at a time (fewer reads of the client's
/// socket); handed over whole, those reads made 64 KiB frames, and a 1 KiB exchange beside a
/// download on a 4 Mbit/s link waited longer (p99 652–830 ms against 520–559 ms with 32 KiB).
/// 32 KiB frames keep the wait where it was (553–594 ms) and cost a second `send_data` per
/// read, no bulk throughput (`docs/benchmarks.md`, "Round 2, third part").
const MAX_DATA_FRAME: usize = 32 * 1024;

/// The sending half of an h2 tunnel stream.
///
/// Headers are held back until the stream's first bytes (or its end, or a reset), so that
/// HEADERS and the first DATA frame are queued together and leave in one TLS record and one
/// write instead of two: on the relay, the request headers go with the open header; on the
/// agent, the response headers go with its `Opened` answer, which it sends only once the
/// destination has answered.
#[derive(Debug)]
pub(super) enum SendState {
    Unsent(Unsent),
    Open(h2::SendStream<Bytes>),
    /// Headers could not be sent (the connection is gone); writes fail.
    Failed,
}

/// Headers not sent yet, and the handle that sends them.
#[derive(Debug)]
pub(super) enum Unsent {
    /// Relay side: a request slot the connection has granted.
    Request(h2::client::SendRequest<Bytes>),
    /// Agent side: the answer to the relay's request.
    Response(h2::server::SendResponse<Bytes>),
}

/// The receiving half of an h2 tunnel stream.
#[derive(Debug)]
pub(super) enum RecvState {
    /// Relay side: the agent's response headers have not arrived yet (`None` until the
    /// request itself has been sent).
    Waiting(Option<h2::client::ResponseFuture>),
    /// A body being read, with the unread rest of the last DATA frame.
    Body(h2::RecvStream, Bytes),
    /// End of stream.
    Done,
}

/// One h2 tunnel stream as a byte stream.
#[derive(Debug)]
pub struct H2Stream {
    pub(super) send: SendState,
    pub(super) recv: RecvState,
}

fn to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error.into_io().unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    let kind = if error.is_reset() || error.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, error)
}

impl H2Stream {
    pub(crate) fn reset(&mut self, code: ResetCode) {
        let reason = h2::Reason::from(code as u32);
        match &mut self.send {
            SendState::Open(send) => send.send_reset(reason),
            SendState::Unsent(Unsent::Response(respond)) => respond.send_reset(reason),
            // A request never sent has nothing to reset: dropping the slot releases it.
            SendState::Unsent(Unsent::Request(_)) | SendState::Failed => {}
        }
        self.send = SendState::Failed;
        self.recv = RecvState::Done;
    }

    /// Sends the held-back headers (once) and returns the stream's DATA sender.
    fn sender(&mut self) -> io::Result<&mut h2::SendStream<Bytes>> {
        // Taken out and put back; if sending the headers fails the stream stays `Failed`.
        self.send = match std::mem::replace(&mut self.send, SendState::Failed) {
            SendState::Unsent(Unsent::Request(mut ready)) => {
                let request = http::Request::post("https://privlink/stream")
                    .body(())
                    .map_err(io::Error::other)?;
                let (response, send) = ready.send_request(request, false).map_err(to_io)?;
                self.recv = RecvState::Waiting(Some(response));
                SendState::Open(send)
            }
            SendState::Unsent(Unsent::Response(mut respond)) => SendState::Open(
                respond.send_response(http::Response::new(()), false).map_err(to_io)?,
            ),
            already => already,
        };
        match &mut self.send {
            SendState::Open(send) => Ok(send),
            _ => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.recv {
                RecvState::Done => return Poll::Ready(Ok(())),
                RecvState::Waiting(None) => {
                    // Reading before writing: the request has to go out for an answer to come.
                    self.sender()?;
                }
                RecvState::Waiting(Some(response)) => {
                    let response = ready!(Pin::new(response).poll(cx)).map_err(to_io)?;
                    if response.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::other(format!(
                            "agent answered the stream with HTTP status {}",
                            response.status()
                        ))));
                    }
                    self.recv = RecvState::Body(response.into_body(), Bytes::new());
                }
                RecvState::Body(body, rest) => {
                    if !rest.is_empty() {
                        let n = rest.len().min(out.remaining());
                        out.put_slice(&rest.split_to(n));
                        // Capacity goes back to the sender only as data is consumed.
                        body.flow_control().release_capacity(n).map_err(to_io)?;
                        return Poll::Ready(Ok(()));
                    }
                    match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => *rest = data,
                        Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                        None => {
                            self.recv = RecvState::Done;
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = self.sender()?;
        send.reserve_capacity(buf.len());
        loop {
            // `poll_capacity` reports *changes* of capacity: capacity granted synchronously by
            // `reserve_capacity` never wakes it, so look at what is already there first.
            let available = send.capacity();
            if available > 0 {
                let n = available.min(buf.len()).min(MAX_DATA_FRAME);
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends as soon as its connection task runs; there is nothing to flush here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // END_STREAM on an empty DATA frame: the peer reads EOF (FIN).
        Poll::Ready(self.sender()?.send_data(Bytes::new(), true).map_err(to_io))
    }
}
