//! The control conversation, as two sans-IO state machines: [`RelayControl`] for the relay's
//! side and [`AgentControl`] for the agent's. A driver feeds each one the messages it reads
//! ([`handle_message`](RelayControl::handle_message)) and the passing of time
//! ([`handle_timeout`](RelayControl::handle_timeout) at the instant
//! [`poll_timeout`](RelayControl::poll_timeout) asked for), and takes out what the machine
//! wants sent ([`poll_transmit`](RelayControl::poll_transmit)) and what happened
//! ([`poll_event`](RelayControl::poll_event)). Decisions that need policy — whether a token is
//! right, which endpoints an agent approves — come back as events and are answered with a call
//! ([`RelayControl::accept`], [`AgentControl::send_verdicts`]). The machines never read a clock:
//! every method that needs the time takes it, as quinn-proto's do.
//!
//! The conversation: relay `RelayHello` → agent `Hello` → relay `Welcome` or `Refused` → agent
//! `Verdicts`; then heartbeats both ways, verdict updates, and `Drain` notices either way. Each
//! handshake step has a deadline ([`Timers::handshake`]); once established, a side that hears
//! nothing from its peer for [`Timers::peer_silence`] declares the conversation dead.

mod agent;
mod relay;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use agent::{AgentControl, AgentEvent};
pub use relay::{RelayControl, RelayEvent};

use crate::message::{Control, PROTOCOL_VERSION};

/// The deadlines and intervals of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Deadline for each handshake step (the peer's hello, the welcome, the verdicts).
    pub handshake: Duration,
    /// Interval between the heartbeats this side sends once established.
    pub heartbeat: Duration,
    /// Silence from the peer after which an established conversation is dead. The transports'
    /// own keep-alives notice a dead connection much sooner; this catches a peer whose
    /// connection lives but whose control loop does not.
    pub peer_silence: Duration,
}

impl Timers {
    /// Deadline of each handshake step.
    pub const HANDSHAKE: Duration = Duration::from_secs(10);
    /// Heartbeat interval.
    pub const HEARTBEAT: Duration = Duration::from_secs(15);
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            handshake: Self::HANDSHAKE,
            heartbeat: Self::HEARTBEAT,
            peer_silence: Self::HEARTBEAT * 3,
        }
    }
}

/// Why a conversation failed. The driver closes the tunnel connection with a protocol error
/// carrying this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The peer sent a message the conversation does not allow at this point.
    #[error("protocol error: expected {expected}, got {got}")]
    Unexpected {
        /// What this side was waiting for.
        expected: &'static str,
        /// The kind of message that came instead.
        got: &'static str,
    },
    /// The peer speaks another protocol version.
    #[error("the peer speaks protocol version {peer}, this side speaks {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        peer: u16,
    },
    /// A handshake step did not complete in time.
    #[error("no {awaiting} within {after:?}")]
    Timeout {
        /// The message that did not come.
        awaiting: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// Nothing was heard from an established peer for too long.
    #[error("nothing heard from the peer for {0:?}")]
    PeerSilent(Duration),
}

/// What both machines keep: the queues their driver drains, the heartbeat schedule and the
/// peer's last sign of life.
#[derive(Debug)]
struct Common<E> {
    timers: Timers,
    transmits: VecDeque<Control>,
    events: VecDeque<E>,
    /// Deadline of the current handshake step, and what it waits for.
    handshake_deadline: Option<(Instant, &'static str)>,
    /// When the next heartbeat is due (established only).
    next_heartbeat: Option<Instant>,
    /// When the peer was last heard from.
    last_heard: Instant,
    /// Streams the sender carries, for heartbeats.
    active_streams: u32,
    /// Whether this side's drain notice has been queued.
    drain_sent: bool,
    closed: bool,
}

impl<E> Common<E> {
    fn new(now: Instant, timers: Timers, awaiting: &'static str) -> Self {
        Self {
            timers,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            handshake_deadline: Some((now + timers.handshake, awaiting)),
            next_heartbeat: None,
            last_heard: now,
            active_streams: 0,
            drain_sent: false,
            closed: false,
        }
    }

    fn await_step(&mut self, now: Instant, awaiting: &'static str) {
        self.handshake_deadline = Some((now + self.timers.handshake, awaiting));
    }

    fn establish(&mut self, now: Instant) {
        self.handshake_deadline = None;
        self.next_heartbeat = Some(now + self.timers.heartbeat);
        self.last_heard = now;
    }

    fn close(&mut self) {
        self.closed = true;
        self.handshake_deadline = None;
        self.next_heartbeat = None;
    }

    fn drain(&mut self, reason: String) {
        if !self.closed && !self.drain_sent {
            self.drain_sent = true;
            self.transmits.push_back(Control::Drain { reason });
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let silence = self.next_heartbeat.map(|_| self.last_heard + self.timers.peer_silence);
        [self.handshake_deadline.map(|(at, _)| at), self.next_heartbeat, silence]
            .into_iter()
            .flatten()
            .min()
    }

    /// Advances the timers; returns the failure when one fired.
    fn handle_timeout(&mut self, now: Instant) -> Option<ControlError> {
        if self.closed {
            return None;
        }
        if let Some((at, awaiting)) = self.handshake_deadline {
            if now >= at {
                self.close();
                return Some(ControlError::Timeout { awaiting, after: self.timers.handshake });
            }
        }
        let due = self.next_heartbeat?;
        if now >= self.last_heard + self.timers.peer_silence {
            self.close();
            return Some(ControlError::PeerSilent(self.timers.peer_silence));
        }
        if now >= due {
            self.transmits.push_back(Control::Heartbeat { active_streams: self.active_streams });
            // The next one is an interval after this one was due, not after `now`, so a late
            // tick does not shift the schedule; a tick far behind sends one, not a burst.
            let mut next = due + self.timers.heartbeat;
            if next <= now {
                next = now + self.timers.heartbeat;
            }
            self.next_heartbeat = Some(next);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use crate::message::{EndpointVerdict, Hello, Verdict};
    use crate::token::Token;

    pub(super) fn hello(protocol_version: u16) -> Hello {
        Hello {
            protocol_version,
            connector: "east".into(),
            token: Token::new("secret"),
            agent_name: "agent-1".into(),
            agent_id: "a1".into(),
            software_version: "0.1.0".into(),
            allowed: vec!["*.example:443".into()],
        }
    }

    pub(super) fn verdicts() -> Vec<EndpointVerdict> {
        vec![EndpointVerdict { endpoint: "kv".into(), verdict: Verdict::Approved }]
    }
}
