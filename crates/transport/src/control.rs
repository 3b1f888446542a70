//! A control stream driving one of the protocol's control state machines
//! ([`privlink_protocol::control`]). The machine decides; this only moves its messages and its
//! time: [`ControlStream::send_queued`] writes what the machine queued,
//! [`ControlStream::advance`] waits for the next message or the machine's next deadline and
//! feeds it in. `advance` is cancel-safe, so a driver can `select!` it against its own events
//! (a new stream, a shutdown) without losing a byte. It works for either side: the machines share
//! the [`ControlMachine`] interface.

use std::time::Instant;

use privlink_protocol::control::ControlMachine;
use privlink_protocol::frame::MAX_BODY_LEN;
use privlink_protocol::message::Control;
use tokio::io::AsyncWriteExt as _;

use crate::io::{FrameReader, ReadFrameError, WriteFrameError, write_frame};
use crate::tunnel::TunnelStream;

/// The current time as the protocol's machines take it. Read through tokio's clock, so tests
/// with paused time drive the machines' deadlines too.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What [`ControlStream::advance`] fed the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advanced {
    /// A message from the peer: it is alive.
    Heard,
    /// The passing of time.
    Timer,
}

/// The control stream of one tunnel connection.
#[derive(Debug)]
pub struct ControlStream {
    stream: TunnelStream,
    /// Keeps partial frames across cancelled reads.
    frames: FrameReader,
}

impl ControlStream {
    /// Wraps the tunnel connection's first stream.
    pub fn new(stream: TunnelStream) -> Self {
        Self { stream, frames: FrameReader::new() }
    }

    /// Writes every message the machine has queued.
    pub async fn send_queued(
        &mut self,
        machine: &mut impl ControlMachine,
    ) -> Result<(), WriteFrameError> {
        while let Some(message) = machine.poll_transmit() {
            write_frame(&mut self.stream, &message).await?;
        }
        Ok(())
    }

    /// Waits for the peer's next message or the machine's next deadline, whichever comes
    /// first, and feeds it to the machine; says which it was. Cancel-safe.
    pub async fn advance(
        &mut self,
        machine: &mut impl ControlMachine,
    ) -> Result<Advanced, ReadFrameError> {
        let deadline = machine.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = self.frames.next::<Control, _>(&mut self.stream, MAX_BODY_LEN) => {
                machine.handle_message(frame?, now());
                Ok(Advanced::Heard)
            }
            () = timer => {
                machine.handle_timeout(now());
                Ok(Advanced::Timer)
            }
        }
    }

    /// Ends this side of the stream with FIN (dropping it would reset it, which the peer takes
    /// for a broken connection). Best effort: the connection may be gone already.
    pub async fn finish(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
