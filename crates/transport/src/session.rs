//! One driver for either side of the control conversation: [`Session`] owns a tunnel
//! connection's control stream and one of the protocol's state machines
//! ([`privlink_protocol::control`]), and moves only bytes and time — the machine decides.
//! [`Session::flush`] writes what the machine queued; [`Session::next`] hands over the
//! machine's next event, or reads the peer's next message or waits for the machine's next
//! deadline and feeds it in. `next` is cancel-safe, so a role can `select!` it against its own
//! events (a new stream, a reload, a shutdown) without losing a byte; the role answers events
//! with calls on [`Session::machine_mut`]. The endings are here too: a drained side that
//! keeps answering heartbeats until its streams are done ([`Session::linger`]), a refusal
//! that is given time to arrive ([`Session::refuse`]), and a protocol failure that closes the
//! connection ([`Session::fail`]). Either side's failures are one [`SessionError`], which
//! names the peer they came from.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use privlink_protocol::control::{ControlError, ControlMachine};
use privlink_protocol::frame::MAX_BODY_LEN;
use privlink_protocol::message::Control;
use tokio::io::AsyncWriteExt as _;

use crate::codes::{CloseCode, DialError, StreamError};
use crate::io::{FrameReader, ReadFrameError, WriteFrameError, write_frame};
use crate::tunnel::TunnelStream;
use crate::tunnel::{AgentConnection, AgentSide, Connection, RelayConnection, RelaySide, Role};

/// The current time as the protocol's machines take it. Read through tokio's clock, so tests
/// with paused time drive the machines' deadlines too.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The far end of a session, as its errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The relay (the agent's sessions).
    Relay,
    /// An agent (the relay's sessions).
    Agent,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Relay => "relay",
            Self::Agent => "agent",
        })
    }
}

/// Why a session ended, on either side.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No tunnel connection (the transport handshake failed).
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The control stream could not be opened or accepted.
    #[error("control stream: {0}")]
    ControlStream(#[from] StreamError),
    /// The relay refused the agent (token, connector, version, limits).
    #[error("{}", refusal(*.peer, .reason))]
    Refused {
        /// Who holds the session's other end.
        peer: Peer,
        /// The reason the agent was told.
        reason: String,
    },
    /// The peer broke the control conversation, or went silent.
    #[error("{peer} {error}")]
    Protocol {
        /// Who broke it.
        peer: Peer,
        /// How.
        error: ControlError,
    },
    /// A control frame could not be read.
    #[error("reading from {peer}: {error}")]
    Read {
        /// Who was read from.
        peer: Peer,
        /// Why it failed.
        error: ReadFrameError,
    },
    /// A control frame could not be written.
    #[error("writing to {peer}: {error}")]
    Write {
        /// Who was written to.
        peer: Peer,
        /// Why it failed.
        error: WriteFrameError,
    },
    /// The established connection was closed, with the reason its closer gave.
    #[error("connection lost: {0}")]
    Lost(String),
}

fn refusal(peer: Peer, reason: &str) -> String {
    match peer {
        Peer::Relay => format!("relay refused this agent: {reason}"),
        Peer::Agent => format!("agent refused: {reason}"),
    }
}

/// What [`Session::next`] brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<E> {
    /// The machine's event, for the role to act on.
    Event(E),
    /// A message from the peer was fed in: it is alive.
    Heard,
    /// The passing of time was fed in.
    Timer,
}

/// A control conversation on one tunnel connection, from side `R`.
#[derive(Debug)]
pub struct Session<M, R: Role> {
    stream: TunnelStream,
    /// Keeps partial frames across cancelled reads.
    frames: FrameReader,
    machine: M,
    connection: Connection<R>,
    peer: Peer,
}

impl<M: ControlMachine> Session<M, RelaySide> {
    /// The relay's side: opens the connection's first stream, the control stream, within
    /// `wait`.
    pub async fn open(
        connection: &RelayConnection,
        machine: M,
        wait: Duration,
    ) -> Result<Self, SessionError> {
        let stream = connection.open_stream(wait).await?;
        Ok(Self::new(stream, machine, connection.clone(), Peer::Agent))
    }
}

impl<M: ControlMachine> Session<M, AgentSide> {
    /// The agent's side: accepts the relay's control stream, the connection's first, within
    /// `wait`.
    pub async fn accept(
        connection: &AgentConnection,
        machine: M,
        wait: Duration,
    ) -> Result<Self, SessionError> {
        let accepted =
            tokio::time::timeout(wait, connection.accept_stream()).await.map_err(|_| {
                SessionError::Protocol {
                    peer: Peer::Relay,
                    error: ControlError::Timeout { awaiting: "control stream", after: wait },
                }
            })??;
        Ok(Self::new(accepted, machine, connection.clone(), Peer::Relay))
    }
}

impl<M: ControlMachine, R: Role> Session<M, R> {
    fn new(stream: TunnelStream, machine: M, connection: Connection<R>, peer: Peer) -> Self {
        Self { stream, frames: FrameReader::new(), machine, connection, peer }
    }

    /// The state machine, to read.
    pub fn machine(&self) -> &M {
        &self.machine
    }

    /// The state machine, to answer an event or tell it something.
    pub fn machine_mut(&mut self) -> &mut M {
        &mut self.machine
    }

    /// Writes every message the machine has queued. Not cancel-safe: await it on its own,
    /// not in a `select!`.
    pub async fn flush(&mut self) -> Result<(), SessionError> {
        while let Some(message) = self.machine.poll_transmit() {
            write_frame(&mut self.stream, &message)
                .await
                .map_err(|error| SessionError::Write { peer: self.peer, error })?;
        }
        Ok(())
    }

    /// The machine's next event; when it has none, waits for the peer's next message or the
    /// machine's next deadline, whichever comes first, and feeds it in. Cancel-safe.
    pub async fn next(&mut self) -> Result<Step<M::Event>, SessionError> {
        if let Some(event) = self.machine.poll_event() {
            return Ok(Step::Event(event));
        }
        let deadline = self.machine.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = self.frames.next::<Control, _>(&mut self.stream, MAX_BODY_LEN) => {
                let frame = frame.map_err(|error| SessionError::Read { peer: self.peer, error })?;
                self.machine.handle_message(frame, now());
                Ok(Step::Heard)
            }
            () = timer => {
                self.machine.handle_timeout(now());
                Ok(Step::Timer)
            }
        }
    }

    /// After this side drained: keeps the conversation going — the peer's heartbeats answered,
    /// this side's sent — until `done` resolves, the connection closes, or the conversation
    /// fails, so that a long drain is not taken for a dead peer. Events are dropped.
    pub async fn linger(&mut self, done: impl Future<Output = ()>) {
        let mut done = std::pin::pin!(done);
        let connection = self.connection.clone();
        if self.flush().await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                () = &mut done => return,
                _ = connection.closed() => return,
                step = self.next() => {
                    while self.machine.poll_event().is_some() {}
                    if step.is_err() || self.machine.has_ended() || self.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Ends this side of the control stream with FIN (dropping it would reset it, which the
    /// peer takes for a broken connection). Best effort: the connection may be gone already.
    pub async fn finish(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Sends the queued refusal, gives the peer up to `linger` to read it and hang up itself,
    /// then closes the connection with the reason (the close carries it too).
    pub async fn refuse(&mut self, reason: &str, linger: Duration) {
        if let Err(e) = self.flush().await {
            tracing::debug!("refusal not delivered on the control stream: {e}");
        }
        self.finish().await;
        let _ = tokio::time::timeout(linger, self.connection.closed()).await;
        self.connection.close(CloseCode::Refused, reason);
    }

    /// The conversation failed with `error`: closes the connection with a protocol error and
    /// returns the session's error.
    pub fn fail(&self, error: ControlError) -> SessionError {
        self.connection.close(CloseCode::ProtocolError, &error.to_string());
        SessionError::Protocol { peer: self.peer, error }
    }
}
