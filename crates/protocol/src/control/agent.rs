//! The agent's side of the control conversation.

use std::collections::HashSet;
use std::time::Instant;

use super::{Common, ControlError, ControlMachine, Timers};
use crate::message::{
    Control, EndpointAssignment, EndpointVerdict, FleetView, Hello, MAX_ENDPOINTS_PER_CONNECTOR,
    PROTOCOL_VERSION, Verdict, in_pieces,
};

/// What happened on the agent's side of a control conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The relay introduced itself (its hello is answered with ours).
    RelayHello {
        /// The relay's software version, for logs.
        software_version: String,
    },
    /// The relay admitted the agent: judge each endpoint, then call
    /// [`AgentControl::send_verdicts`].
    Welcome(Vec<EndpointAssignment>),
    /// The relay refused the agent; the conversation is over.
    Refused {
        /// The relay's reason.
        reason: String,
    },
    /// The relay's heartbeat.
    Heartbeat {
        /// Streams the relay has open on this agent.
        active_streams: u32,
    },
    /// The connector's endpoints changed (a relay reload): judge the added ones and answer
    /// with [`AgentControl::send_verdict_update`]; open nothing more for the removed ones.
    EndpointsChanged {
        /// Endpoints assigned from now on.
        added: Vec<EndpointAssignment>,
        /// Names no longer assigned.
        removed: Vec<String>,
    },
    /// The relay is shutting down.
    RelayDraining {
        /// Why, as the relay put it.
        reason: String,
    },
    /// The relay belongs to a fleet: which relay this is and every member. Comes before the
    /// welcome (a link that reached a relay another link holds can close before judging) and
    /// again when the fleet changes.
    Fleet(FleetView),
    /// The conversation failed: close the connection with a protocol error.
    Failed(ControlError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitRelayHello,
    AwaitWelcome,
    /// The welcome is with the driver, which judges the endpoints.
    Judging,
    Established,
    Closed,
}

/// The agent's control-conversation state machine (see the [module docs](super)).
#[derive(Debug)]
pub struct AgentControl {
    state: State,
    /// Sent once the relay's hello shows it speaks our version.
    hello: Option<Hello>,
    common: Common<AgentEvent>,
    /// Endpoints received in pieces before the welcome.
    pieces: Vec<EndpointAssignment>,
    /// The endpoints assigned to this agent: the welcome's, then as reloads change them.
    assigned: Vec<EndpointAssignment>,
    /// The verdict this agent last sent on each assigned endpoint.
    verdicts: Vec<EndpointVerdict>,
}

impl AgentControl {
    /// A conversation on the control stream the relay opened; `hello` is sent once the relay
    /// has introduced itself.
    pub fn new(hello: Hello, now: Instant, timers: Timers) -> Self {
        Self {
            state: State::AwaitRelayHello,
            hello: Some(hello),
            common: Common::new(now, timers, "RelayHello"),
            pieces: Vec::new(),
            assigned: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    /// Answers the welcome with a verdict for each endpoint; the conversation is then
    /// established (the agent can carry streams).
    pub fn send_verdicts(&mut self, verdicts: Vec<EndpointVerdict>, now: Instant) {
        if self.state != State::Judging {
            return;
        }
        self.state = State::Established;
        self.verdicts.clone_from(&verdicts);
        let mut pieces = in_pieces(verdicts, EndpointVerdict::encoded_size_bound);
        let last = pieces.pop().unwrap_or_default();
        for piece in pieces {
            self.common.transmits.push_back(Control::VerdictsPart(piece));
        }
        self.common.transmits.push_back(Control::Verdicts(last));
        self.common.establish(now);
    }

    /// Adds a piece of the welcome's endpoints; fails the conversation past
    /// [`MAX_ENDPOINTS_PER_CONNECTOR`].
    fn receive_endpoints(&mut self, piece: Vec<EndpointAssignment>) -> bool {
        if self.pieces.len() + piece.len() > MAX_ENDPOINTS_PER_CONNECTOR {
            self.fail(ControlError::TooMany {
                what: "endpoints",
                max: MAX_ENDPOINTS_PER_CONNECTOR,
            });
            self.pieces = Vec::new();
            return false;
        }
        self.pieces.extend(piece);
        true
    }

    /// Answers an [`AgentEvent::EndpointsChanged`] with verdicts on the added endpoints, or
    /// tells the relay verdicts that changed (in pieces when long). Does nothing before the
    /// conversation is established.
    pub fn send_verdict_update(&mut self, verdicts: Vec<EndpointVerdict>) {
        if self.state != State::Established || verdicts.is_empty() {
            return;
        }
        for verdict in &verdicts {
            match self.verdicts.iter_mut().find(|v| v.endpoint == verdict.endpoint) {
                Some(sent) => sent.clone_from(verdict),
                None => self.verdicts.push(verdict.clone()),
            }
        }
        let mut pieces = in_pieces(verdicts, EndpointVerdict::encoded_size_bound);
        let last = pieces.pop().unwrap_or_default();
        for piece in pieces {
            self.common.transmits.push_back(Control::VerdictsPart(piece));
        }
        self.common.transmits.push_back(Control::Verdicts(last));
    }

    /// Whether this agent's hello has gone out (the relay introduced itself first).
    pub fn hello_sent(&self) -> bool {
        self.hello.is_none()
    }

    /// The endpoints assigned to this agent now.
    pub fn endpoints(&self) -> &[EndpointAssignment] {
        &self.assigned
    }

    /// The verdicts this agent sent, one per assigned endpoint it has judged.
    pub fn verdicts(&self) -> &[EndpointVerdict] {
        &self.verdicts
    }

    /// The endpoints this agent approved: the relay may open streams for these only.
    pub fn approved(&self) -> HashSet<String> {
        self.verdicts
            .iter()
            .filter(|v| v.verdict == Verdict::Approved)
            .map(|v| v.endpoint.clone())
            .collect()
    }

    /// Whether the verdicts have been sent (the relay may now open streams).
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the conversation is over (refused or failed).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
}

impl ControlMachine for AgentControl {
    type Event = AgentEvent;

    /// Feeds a message read from the relay.
    fn handle_message(&mut self, message: Control, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if let Some(error) = self.common.heard(now, self.state == State::Established) {
            self.fail(error);
            return;
        }
        match (self.state, message) {
            (
                State::AwaitRelayHello,
                Control::RelayHello { protocol_version, software_version },
            ) => {
                if protocol_version != PROTOCOL_VERSION {
                    self.fail(ControlError::Version { peer: protocol_version });
                    return;
                }
                self.common.events.push_back(AgentEvent::RelayHello { software_version });
                if let Some(hello) = self.hello.take() {
                    self.common.transmits.push_back(Control::Hello(hello));
                }
                self.state = State::AwaitWelcome;
                self.common.await_step(now, "Welcome");
            }
            (State::AwaitWelcome, Control::EndpointsPart(piece)) => {
                // The welcome's deadline keeps running: pieces do not buy time.
                self.receive_endpoints(piece);
            }
            (State::AwaitWelcome, Control::Welcome { endpoints }) => {
                if self.receive_endpoints(endpoints) {
                    self.state = State::Judging;
                    self.common.handshake_deadline = None;
                    self.assigned = std::mem::take(&mut self.pieces);
                    self.common.events.push_back(AgentEvent::Welcome(self.assigned.clone()));
                }
            }
            (State::AwaitWelcome, Control::Refused { reason }) => {
                self.state = State::Closed;
                self.common.close();
                self.common.events.push_back(AgentEvent::Refused { reason });
            }
            (State::Established, Control::EndpointsChanged { added, removed }) => {
                self.assigned.retain(|e| !removed.contains(&e.name));
                self.verdicts.retain(|v| !removed.contains(&v.endpoint));
                self.assigned.extend(added.iter().cloned());
                // One update is bounded by the frame size; the total by the connector's limit.
                if self.assigned.len() > MAX_ENDPOINTS_PER_CONNECTOR {
                    self.fail(ControlError::TooMany {
                        what: "endpoints",
                        max: MAX_ENDPOINTS_PER_CONNECTOR,
                    });
                    return;
                }
                self.common.events.push_back(AgentEvent::EndpointsChanged { added, removed });
            }
            (State::Established, Control::Heartbeat { active_streams }) => {
                self.common.answer_heartbeat();
                self.common.events.push_back(AgentEvent::Heartbeat { active_streams });
            }
            // Its work is done by `heard`: the answer deadline is over.
            (State::Established, Control::HeartbeatAck) => {}
            (State::AwaitWelcome | State::Judging | State::Established, Control::Fleet(view)) => {
                match view.problem() {
                    Some(problem) => self.fail(ControlError::Fleet(problem)),
                    None => self.common.events.push_back(AgentEvent::Fleet(view)),
                }
            }
            (State::Established, Control::Drain { reason }) => {
                self.common.events.push_back(AgentEvent::RelayDraining { reason });
            }
            (state, other) => self.fail(ControlError::Unexpected {
                expected: match state {
                    State::AwaitRelayHello => "RelayHello",
                    State::AwaitWelcome => "Welcome, EndpointsPart, Fleet or Refused",
                    State::Judging => "nothing before the verdicts",
                    State::Established | State::Closed => {
                        "Heartbeat, HeartbeatAck, EndpointsChanged, Fleet or Drain"
                    }
                },
                got: other.kind(),
            }),
        }
    }

    fn common(&mut self) -> &mut Common<AgentEvent> {
        &mut self.common
    }

    fn common_ref(&self) -> &Common<AgentEvent> {
        &self.common
    }

    fn fail(&mut self, error: ControlError) {
        self.state = State::Closed;
        self.common.close();
        self.common.events.push_back(AgentEvent::Failed(error));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::tests::{hello, verdicts};
    use crate::message::{EndpointAssignment, Verdict};

    fn relay_hello(version: u16) -> Control {
        Control::RelayHello { protocol_version: version, software_version: "9.9.9".into() }
    }

    fn assignment() -> Vec<EndpointAssignment> {
        vec![EndpointAssignment { name: "kv".into(), destination: "kv.example:443".into() }]
    }

    fn welcomed() -> (AgentControl, Instant) {
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_message(relay_hello(PROTOCOL_VERSION), now);
        agent.poll_event();
        agent.poll_transmit();
        agent.handle_message(Control::Welcome { endpoints: assignment() }, now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Welcome(assignment())));
        (agent, now)
    }

    #[test]
    fn the_hello_waits_for_the_relays_and_verdicts_establish() {
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        assert_eq!(agent.poll_transmit(), None, "the relay speaks first");
        assert_eq!(agent.poll_timeout(), Some(now + Timers::HANDSHAKE));
        agent.handle_message(relay_hello(PROTOCOL_VERSION), now);
        assert_eq!(
            agent.poll_event(),
            Some(AgentEvent::RelayHello { software_version: "9.9.9".into() })
        );
        assert_eq!(agent.poll_transmit(), Some(Control::Hello(hello(PROTOCOL_VERSION))));
        agent.handle_message(Control::Welcome { endpoints: assignment() }, now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Welcome(assignment())));
        assert_eq!(agent.poll_timeout(), None, "judging has no deadline of its own");
        assert!(!agent.is_established());
        agent.send_verdicts(verdicts(), now);
        assert_eq!(agent.poll_transmit(), Some(Control::Verdicts(verdicts())));
        assert!(agent.is_established());
        assert_eq!(agent.poll_timeout(), Some(now + Timers::HEARTBEAT));
    }

    #[test]
    fn a_fleet_view_comes_before_the_welcome_and_a_bad_one_fails() {
        use crate::message::{FleetView, MAX_FLEET_MEMBERS};
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_message(relay_hello(PROTOCOL_VERSION), now);
        agent.poll_event();
        agent.poll_transmit();
        let view = FleetView { relay: "b:1".into(), members: vec!["a:1".into(), "b:1".into()] };
        agent.handle_message(Control::Fleet(view.clone()), now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Fleet(view.clone())));
        agent.handle_message(Control::Welcome { endpoints: assignment() }, now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Welcome(assignment())));
        agent.send_verdicts(verdicts(), now);
        // A change once established.
        agent.handle_message(Control::Fleet(view.clone()), now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Fleet(view)));
        // A relay missing from its own fleet, or a fleet over the limit, ends the conversation.
        for bad in [
            FleetView { relay: "c:1".into(), members: vec!["a:1".into()] },
            FleetView {
                relay: "a:1".into(),
                members: (0..=MAX_FLEET_MEMBERS).map(|i| format!("a:{i}")).collect(),
            },
        ] {
            let (mut agent, now) = welcomed();
            agent.handle_message(Control::Fleet(bad), now);
            assert!(
                matches!(agent.poll_event(), Some(AgentEvent::Failed(ControlError::Fleet(_)))),
                "a bad view fails"
            );
            assert!(agent.is_closed());
        }
    }

    #[test]
    fn another_protocol_version_fails_without_sending_the_token() {
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_message(relay_hello(2), now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Failed(ControlError::Version { peer: 2 })));
        assert_eq!(agent.poll_transmit(), None);
        assert!(agent.is_closed());
    }

    #[test]
    fn refusals_end_the_conversation_with_the_reason() {
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_message(relay_hello(PROTOCOL_VERSION), now);
        agent.poll_event();
        agent.handle_message(Control::Refused { reason: "wrong token".into() }, now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Refused { reason: "wrong token".into() }));
        assert!(agent.is_closed());
        agent.handle_message(Control::Welcome { endpoints: vec![] }, now);
        assert_eq!(agent.poll_event(), None, "nothing after the end");
    }

    #[test]
    fn out_of_order_messages_fail_by_kind() {
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_message(Control::Welcome { endpoints: vec![] }, now);
        assert_eq!(
            agent.poll_event(),
            Some(AgentEvent::Failed(ControlError::Unexpected {
                expected: "RelayHello",
                got: "Welcome"
            }))
        );
        assert_eq!(agent.poll_transmit(), None, "no hello, so no token, to a confused relay");

        let (mut agent, now) = welcomed();
        agent.send_verdicts(verdicts(), now);
        agent.poll_transmit();
        agent.handle_message(Control::Welcome { endpoints: vec![] }, now);
        assert!(matches!(
            agent.poll_event(),
            Some(AgentEvent::Failed(ControlError::Unexpected { got: "Welcome", .. }))
        ));
    }

    #[test]
    fn deadlines_heartbeats_and_silence() {
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_timeout(now + Timers::HANDSHAKE);
        assert!(matches!(
            agent.poll_event(),
            Some(AgentEvent::Failed(ControlError::Timeout { awaiting: "RelayHello", .. }))
        ));

        let (mut agent, now) = welcomed();
        agent.send_verdicts(verdicts(), now);
        agent.poll_transmit();
        agent.set_active_streams(3);
        // A tick far behind schedule sends one heartbeat, not a burst.
        agent.handle_timeout(now + Timers::HEARTBEAT * 2 + Duration::from_secs(1));
        assert_eq!(agent.poll_transmit(), Some(Control::Heartbeat { active_streams: 3 }));
        assert_eq!(agent.poll_transmit(), None);
        agent.handle_message(Control::Drain { reason: "relay shutting down".into() }, now);
        assert_eq!(
            agent.poll_event(),
            Some(AgentEvent::RelayDraining { reason: "relay shutting down".into() })
        );
        // The relay's heartbeat is answered at once.
        agent.handle_message(Control::Heartbeat { active_streams: 9 }, now);
        assert_eq!(agent.poll_event(), Some(AgentEvent::Heartbeat { active_streams: 9 }));
        assert_eq!(agent.poll_transmit(), Some(Control::HeartbeatAck));
        // The next heartbeat (one interval after the late tick) goes unanswered.
        let next = now + Timers::HEARTBEAT * 3 + Duration::from_secs(1);
        agent.handle_timeout(next);
        assert_eq!(agent.poll_transmit(), Some(Control::Heartbeat { active_streams: 3 }));
        agent.handle_timeout(next + Timers::ANSWER);
        assert_eq!(
            agent.poll_event(),
            Some(AgentEvent::Failed(ControlError::Unanswered(Timers::ANSWER)))
        );
    }

    #[test]
    fn a_drain_is_queued_once() {
        let (mut agent, now) = welcomed();
        agent.send_verdicts(verdicts(), now);
        agent.poll_transmit();
        agent.drain("agent shutting down");
        agent.drain("agent shutting down");
        assert_eq!(
            agent.poll_transmit(),
            Some(Control::Drain { reason: "agent shutting down".into() })
        );
        assert_eq!(agent.poll_transmit(), None);
    }

    #[test]
    fn a_welcome_longer_than_any_connector_may_have_ends_the_handshake() {
        let now = Instant::now();
        let mut agent = AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_message(relay_hello(PROTOCOL_VERSION), now);
        agent.poll_event();
        let piece: Vec<EndpointAssignment> = (0..1000)
            .map(|i| EndpointAssignment { name: format!("e{i}"), destination: "d:1".into() })
            .collect();
        // Pieces are not rate-limited during the handshake; their total is bounded.
        for _ in 0..MAX_ENDPOINTS_PER_CONNECTOR / 1000 {
            agent.handle_message(Control::EndpointsPart(piece.clone()), now);
        }
        assert_eq!(agent.poll_event(), None, "up to the limit, pieces are taken");
        agent.handle_message(Control::EndpointsPart(piece), now);
        assert_eq!(
            agent.poll_event(),
            Some(AgentEvent::Failed(ControlError::TooMany {
                what: "endpoints",
                max: MAX_ENDPOINTS_PER_CONNECTOR
            }))
        );
        assert!(agent.is_closed());
    }

    #[test]
    fn endpoint_changes_are_judged_and_answered_once_established() {
        let (mut agent, now) = welcomed();
        agent.send_verdicts(verdicts(), now);
        agent.poll_transmit();
        let added = vec![EndpointAssignment { name: "new".into(), destination: "n:1".into() }];
        let change = Control::EndpointsChanged { added: added.clone(), removed: vec!["kv".into()] };
        agent.handle_message(change, now);
        assert_eq!(
            agent.poll_event(),
            Some(AgentEvent::EndpointsChanged { added, removed: vec!["kv".into()] })
        );
        let verdict = EndpointVerdict { endpoint: "new".into(), verdict: Verdict::Approved };
        agent.send_verdict_update(vec![verdict.clone()]);
        assert_eq!(agent.poll_transmit(), Some(Control::Verdicts(vec![verdict])));
    }

    #[test]
    fn the_machine_keeps_the_assigned_endpoints_and_the_verdicts_it_sent() {
        let (mut agent, now) = welcomed();
        assert_eq!(agent.endpoints(), assignment().as_slice());
        agent.send_verdicts(verdicts(), now);
        assert_eq!(agent.verdicts(), verdicts().as_slice());
        assert_eq!(agent.approved(), HashSet::from(["kv".to_owned()]));
        while agent.poll_transmit().is_some() {}

        // A reload on the relay: `kv` goes, `db` comes; the driver judges `db`.
        let db = EndpointAssignment { name: "db".into(), destination: "db.example:5432".into() };
        agent.handle_message(
            Control::EndpointsChanged { added: vec![db.clone()], removed: vec!["kv".into()] },
            now,
        );
        assert!(matches!(agent.poll_event(), Some(AgentEvent::EndpointsChanged { .. })));
        assert_eq!(agent.endpoints(), [db].as_slice());
        assert!(agent.verdicts().is_empty() && agent.approved().is_empty(), "kv's verdict goes");
        let rejected = Verdict::Rejected { reason: "not allowed".into() };
        agent.send_verdict_update(vec![EndpointVerdict {
            endpoint: "db".into(),
            verdict: rejected,
        }]);
        assert!(agent.approved().is_empty());
        // A changed allowlist approves it: the verdict is replaced, not added.
        let approved = EndpointVerdict { endpoint: "db".into(), verdict: Verdict::Approved };
        agent.send_verdict_update(vec![approved.clone()]);
        assert_eq!(agent.verdicts(), [approved].as_slice());
        assert_eq!(agent.approved(), HashSet::from(["db".to_owned()]));
    }
}
