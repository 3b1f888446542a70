//! The control conversation, as two sans-IO state machines: [`RelayControl`] for the relay's
//! side and [`AgentControl`] for the agent's, both driven through [`ControlMachine`]. A driver
//! feeds each one the messages it reads ([`handle_message`](ControlMachine::handle_message))
//! and the passing of time ([`handle_timeout`](ControlMachine::handle_timeout) at the instant
//! [`poll_timeout`](ControlMachine::poll_timeout) asked for), and takes out what the machine
//! wants sent ([`poll_transmit`](ControlMachine::poll_transmit)) and what happened
//! ([`poll_event`](ControlMachine::poll_event)). Decisions that need policy — whether a token is
//! right, which endpoints an agent approves — come back as events and are answered with a call
//! ([`RelayControl::accept`], [`AgentControl::send_verdicts`]). The machines never read a clock:
//! every method that needs the time takes it, as quinn-proto's do.
//!
//! The conversation: relay `RelayHello` → agent `Hello` → relay `Welcome` or `Refused` → agent
//! `Verdicts`; then heartbeats both ways, each answered at once with a `HeartbeatAck`, verdict
//! updates, and `Drain` notices either way. Each handshake step has a deadline
//! ([`Timers::handshake`]); once established, a side whose heartbeat goes unanswered for
//! [`Timers::answer`] — nothing at all heard from the peer since it was sent — declares the
//! conversation dead, so a frozen or partitioned peer is found within a heartbeat interval
//! and an answer deadline whatever the transport's own keep-alive says; and a driver that
//! suspects its peer (an open went unanswered) can ask for a heartbeat at once
//! ([`ControlMachine::probe`]). A peer
//! that sends messages faster than [`MESSAGE_BURST`] at once and one per [`MESSAGE_INTERVAL`]
//! after that ends it too: a real one sends a handful per minute.

mod agent;
mod relay;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use agent::{AgentControl, AgentEvent};
pub use relay::{RelayControl, RelayEvent};

#[cfg(doc)]
use crate::message::FleetView;
use crate::message::{Control, PROTOCOL_VERSION};

/// The deadlines and intervals of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Deadline for each handshake step (the peer's hello, the welcome, the verdicts).
    pub handshake: Duration,
    /// Interval between the heartbeats this side sends once established.
    pub heartbeat: Duration,
    /// How long a heartbeat may go unanswered (nothing heard from the peer since it was sent)
    /// before the peer is declared gone.
    pub answer: Duration,
    /// Silence from the peer after which an established conversation is dead. The transports'
    /// own keep-alives notice a dead connection much sooner; this catches a peer whose
    /// connection lives but whose control loop does not.
    pub peer_silence: Duration,
}

impl Timers {
    /// Deadline of each handshake step.
    pub const HANDSHAKE: Duration = Duration::from_secs(10);
    /// Heartbeat interval.
    pub const HEARTBEAT: Duration = Duration::from_secs(3);
    /// Answer deadline of a heartbeat. With the interval, a frozen peer is declared gone
    /// within 6 s — before the QUIC idle timeout (8 s), and on TLS/TCP, where a frozen
    /// process's kernel keeps acknowledging, at all. It must cover the round trip plus
    /// whatever data is queued ahead of the heartbeat on the connection. On TLS/TCP the
    /// transport keeps that queue short (`TCP_NOTSENT_LOWAT`; at 2 Mbit/s a download delays
    /// an answer by about half a second), but one HTTP/2 frame of up to 256 KiB still goes
    /// first: on a link well under 1 Mbit/s a full-speed transfer can outlast this.
    pub const ANSWER: Duration = Duration::from_secs(3);
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            handshake: Self::HANDSHAKE,
            heartbeat: Self::HEARTBEAT,
            answer: Self::ANSWER,
            peer_silence: Self::HEARTBEAT * 5,
        }
    }
}

/// Messages a peer may send at once before the rate limit applies.
pub const MESSAGE_BURST: u32 = 32;
/// Sustained rate a peer may send messages at: one per interval (4 a second). Heartbeats come
/// every [`Timers::HEARTBEAT`] (3 s) from each side, with an answer to each; verdicts and
/// drains rarely.
pub const MESSAGE_INTERVAL: Duration = Duration::from_millis(250);

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
    /// The peer sent more of a list than the conversation allows.
    #[error("the peer sent more than {max} {what}")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The most allowed.
        max: usize,
    },
    /// A heartbeat went unanswered.
    #[error("the peer did not answer a heartbeat within {0:?}")]
    Unanswered(Duration),
    /// The peer sent messages faster than the conversation allows.
    #[error(
        "the peer sent control messages too fast (more than {MESSAGE_BURST} at once or one per \
         {MESSAGE_INTERVAL:?})"
    )]
    TooFast,
    /// The relay's fleet view cannot be taken (see [`FleetView::problem`]).
    #[error("the relay's fleet view: {0}")]
    Fleet(String),
}

/// What a driver does with either side's machine. The queues, timers and heartbeats are the
/// same on both sides and live here; each side adds its own transitions and decisions.
pub trait ControlMachine {
    /// What the machine reports to its driver.
    type Event;

    /// Feeds a message read from the peer.
    fn handle_message(&mut self, message: Control, now: Instant);

    /// The shared part of the machine.
    #[doc(hidden)]
    fn common(&mut self) -> &mut Common<Self::Event>;

    /// The shared part of the machine, read-only.
    #[doc(hidden)]
    fn common_ref(&self) -> &Common<Self::Event>;

    /// Ends the conversation with `error`, reported as this side's failure event.
    #[doc(hidden)]
    fn fail(&mut self, error: ControlError);

    /// Lets time pass: handshake deadlines, heartbeats, the peer-silence limit.
    fn handle_timeout(&mut self, now: Instant) {
        if let Some(error) = self.common().handle_timeout(now) {
            self.fail(error);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    fn poll_timeout(&self) -> Option<Instant> {
        self.common_ref().poll_timeout()
    }

    /// The next message to send to the peer.
    fn poll_transmit(&mut self) -> Option<Control> {
        self.common().transmits.pop_front()
    }

    /// The next event for the driver.
    fn poll_event(&mut self) -> Option<Self::Event> {
        self.common().events.pop_front()
    }

    /// Whether the conversation is over (refused or failed): nothing more is sent or awaited.
    fn has_ended(&self) -> bool {
        self.common_ref().closed
    }

    /// This side is shutting down (or moving to another transport): tell the peer, once.
    fn drain(&mut self, reason: &str) {
        self.common().drain(reason.to_owned());
    }

    /// Data streams this side carries on the connection, for the next heartbeat.
    fn set_active_streams(&mut self, active_streams: u32) {
        self.common().active_streams = active_streams;
    }

    /// Sends a heartbeat now (unless one is already awaiting its answer), for a driver that
    /// suspects the peer: it is answered within [`Timers::answer`] or the conversation fails.
    /// Does nothing before the conversation is established.
    fn probe(&mut self, now: Instant) {
        self.common().probe(now);
    }
}

mod common {
    use super::*;

    /// What both machines keep: the queues their driver drains, the heartbeat schedule and the
    /// peer's last sign of life.
    #[derive(Debug)]
    pub struct Common<E> {
        pub(super) timers: Timers,
        pub(super) transmits: VecDeque<Control>,
        pub(super) events: VecDeque<E>,
        /// Deadline of the current handshake step, and what it waits for.
        pub(super) handshake_deadline: Option<(Instant, &'static str)>,
        /// When the next heartbeat is due (established only).
        pub(super) next_heartbeat: Option<Instant>,
        /// When the peer was last heard from.
        pub(super) last_heard: Instant,
        /// The answer deadline of the heartbeat this side sent last, until something is heard.
        pub(super) answer_deadline: Option<Instant>,
        /// Streams the sender carries, for heartbeats.
        pub(super) active_streams: u32,
        /// Whether this side's drain notice has been queued.
        pub(super) drain_sent: bool,
        pub(super) closed: bool,
        /// The rate limit on the peer's messages, as a generic cell rate algorithm: the instant
        /// at which the peer's allowance is used up; a message is refused when that instant is
        /// more than a burst ahead of now.
        allowance_until: Instant,
    }

    impl<E> Common<E> {
        pub(super) fn new(now: Instant, timers: Timers, awaiting: &'static str) -> Self {
            Self {
                timers,
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                handshake_deadline: Some((now + timers.handshake, awaiting)),
                next_heartbeat: None,
                last_heard: now,
                answer_deadline: None,
                active_streams: 0,
                drain_sent: false,
                closed: false,
                allowance_until: now,
            }
        }

        /// A message came from the peer at `now`: it is alive. Returns the failure when the
        /// peer is over its message rate (`limited`: once established; before, each step
        /// allows one message, or a list in pieces bounded by its length).
        pub(super) fn heard(&mut self, now: Instant, limited: bool) -> Option<ControlError> {
            self.last_heard = now;
            // Any message shows the peer's control loop alive, the answer or not.
            self.answer_deadline = None;
            if !limited {
                return None;
            }
            let next = self.allowance_until.max(now) + MESSAGE_INTERVAL;
            if next > now + MESSAGE_INTERVAL * MESSAGE_BURST {
                return Some(ControlError::TooFast);
            }
            self.allowance_until = next;
            None
        }

        pub(super) fn await_step(&mut self, now: Instant, awaiting: &'static str) {
            self.handshake_deadline = Some((now + self.timers.handshake, awaiting));
        }

        pub(super) fn establish(&mut self, now: Instant) {
            self.handshake_deadline = None;
            self.next_heartbeat = Some(now + self.timers.heartbeat);
            self.last_heard = now;
        }

        pub(super) fn close(&mut self) {
            self.closed = true;
            self.handshake_deadline = None;
            self.next_heartbeat = None;
            self.answer_deadline = None;
        }

        /// Queues a heartbeat and starts its answer deadline (unless one is running).
        fn send_heartbeat(&mut self, now: Instant) {
            self.transmits.push_back(Control::Heartbeat { active_streams: self.active_streams });
            if self.answer_deadline.is_none() {
                self.answer_deadline = Some(now + self.timers.answer);
            }
        }

        pub(super) fn probe(&mut self, now: Instant) {
            if !self.closed && self.next_heartbeat.is_some() && self.answer_deadline.is_none() {
                self.send_heartbeat(now);
            }
        }

        /// The peer's heartbeat: answer it at once.
        pub(super) fn answer_heartbeat(&mut self) {
            self.transmits.push_back(Control::HeartbeatAck);
        }

        pub(super) fn drain(&mut self, reason: String) {
            if !self.closed && !self.drain_sent {
                self.drain_sent = true;
                self.transmits.push_back(Control::Drain { reason });
            }
        }

        pub(super) fn poll_timeout(&self) -> Option<Instant> {
            if self.closed {
                return None;
            }
            let silence = self.next_heartbeat.map(|_| self.last_heard + self.timers.peer_silence);
            [
                self.handshake_deadline.map(|(at, _)| at),
                self.next_heartbeat,
                silence,
                self.answer_deadline,
            ]
            .into_iter()
            .flatten()
            .min()
        }

        /// Advances the timers; returns the failure when one fired.
        pub(super) fn handle_timeout(&mut self, now: Instant) -> Option<ControlError> {
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
            if self.answer_deadline.is_some_and(|at| now >= at) {
                self.close();
                return Some(ControlError::Unanswered(self.timers.answer));
            }
            if now >= self.last_heard + self.timers.peer_silence {
                self.close();
                return Some(ControlError::PeerSilent(self.timers.peer_silence));
            }
            if now >= due {
                self.send_heartbeat(now);
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
}

use common::Common;

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
