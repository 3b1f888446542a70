//! The relay's side of the control conversation.

use std::collections::HashSet;
use std::time::Instant;

use super::{Common, ControlError, ControlMachine, Timers};
use crate::message::{
    Control, EndpointAssignment, EndpointVerdict, FleetView, Hello, PROTOCOL_VERSION, in_pieces,
};

/// What happened on the relay's side of a control conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// The agent introduced itself and speaks this protocol version: authenticate it, then
    /// call [`RelayControl::accept`] or [`RelayControl::refuse`].
    Hello(Hello),
    /// The agent's verdicts: the first set after the welcome, or a later update.
    Verdicts(Vec<EndpointVerdict>),
    /// Verdicts for endpoints not assigned to this agent were dropped (an agent cannot grow
    /// the relay's state with made-up names): how many.
    VerdictsIgnored(usize),
    /// The agent's heartbeat.
    Heartbeat {
        /// Data streams the agent carries.
        active_streams: u32,
    },
    /// The agent is shutting down or moving to another transport: send it no new streams.
    AgentDraining {
        /// Why, as the agent put it.
        reason: String,
    },
    /// A refusal is queued: send it, give the agent a moment to read it, then close the
    /// connection as refused.
    Refused {
        /// What the agent is told.
        reason: String,
    },
    /// The conversation failed: close the connection with a protocol error.
    Failed(ControlError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    /// The hello is with the driver, which decides on the token.
    Authenticating,
    AwaitVerdicts,
    Established,
    Closed,
}

/// The relay's control-conversation state machine (see the [module docs](super)).
#[derive(Debug)]
pub struct RelayControl {
    state: State,
    common: Common<RelayEvent>,
    /// The endpoints assigned to the agent (the welcome's, then as reloads change them): the
    /// first set of verdicts may not hold more, and verdicts for others are dropped.
    assigned: HashSet<String>,
    /// Verdicts received in the first set so far.
    judged: usize,
}

impl RelayControl {
    /// A conversation on a freshly opened control stream; the relay's hello is queued (a QUIC
    /// stream becomes visible to the peer only once bytes are sent on it). It carries the
    /// protocol version only: the software version would tell an unauthenticated peer which
    /// release to attack.
    pub fn new(now: Instant, timers: Timers) -> Self {
        let mut common = Common::new(now, timers, "Hello");
        common.transmits.push_back(Control::RelayHello {
            protocol_version: PROTOCOL_VERSION,
            software_version: String::new(),
        });
        Self { state: State::AwaitHello, common, assigned: HashSet::new(), judged: 0 }
    }

    /// The agent authenticated: welcome it with its connector's endpoints — after the fleet
    /// this relay belongs to, if it belongs to one.
    pub fn accept(
        &mut self,
        endpoints: Vec<EndpointAssignment>,
        fleet: Option<FleetView>,
        now: Instant,
    ) {
        if self.state != State::Authenticating {
            return;
        }
        self.state = State::AwaitVerdicts;
        if let Some(fleet) = fleet {
            self.common.transmits.push_back(Control::Fleet(fleet));
        }
        self.assigned = endpoints.iter().map(|e| e.name.clone()).collect();
        let mut pieces = in_pieces(endpoints, EndpointAssignment::encoded_size_bound);
        let last = pieces.pop().unwrap_or_default();
        for piece in pieces {
            self.common.transmits.push_back(Control::EndpointsPart(piece));
        }
        self.common.transmits.push_back(Control::Welcome { endpoints: last });
        self.common.await_step(now, "Verdicts");
    }

    /// The connector's endpoints changed (a reload): tells the agent, in pieces that each fit
    /// a frame. Its verdicts on the added ones come back as [`RelayEvent::Verdicts`]. Does
    /// nothing before the conversation is established (the welcome still to come carries
    /// the current list).
    pub fn update_endpoints(&mut self, added: Vec<EndpointAssignment>, removed: Vec<String>) {
        if self.state != State::Established || (added.is_empty() && removed.is_empty()) {
            return;
        }
        for name in &removed {
            self.assigned.remove(name);
        }
        self.assigned.extend(added.iter().map(|e| e.name.clone()));
        let mut removed_pieces = in_pieces(removed, |name| name.len() + 10).into_iter();
        for added in in_pieces(added, EndpointAssignment::encoded_size_bound) {
            let removed = removed_pieces.next().unwrap_or_default();
            self.common.transmits.push_back(Control::EndpointsChanged { added, removed });
        }
        for removed in removed_pieces {
            self.common.transmits.push_back(Control::EndpointsChanged { added: vec![], removed });
        }
    }

    /// The connector's endpoints are now `endpoints` (a reload): tells the agent what was added
    /// and removed since it was last told (see [`update_endpoints`](Self::update_endpoints))
    /// and returns the names removed, whose verdicts the driver forgets. Nothing before the
    /// conversation is established, or when nothing changed.
    pub fn reassign(&mut self, endpoints: Vec<EndpointAssignment>) -> Vec<String> {
        if self.state != State::Established {
            return Vec::new();
        }
        let now: HashSet<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
        let mut removed: Vec<String> =
            self.assigned.iter().filter(|name| !now.contains(name.as_str())).cloned().collect();
        removed.sort();
        let added: Vec<EndpointAssignment> =
            endpoints.into_iter().filter(|e| !self.assigned.contains(&e.name)).collect();
        self.update_endpoints(added, removed.clone());
        removed
    }

    /// The fleet changed: tells the agent (once it has been welcomed; the welcome carries the
    /// fleet as it is then).
    pub fn announce_fleet(&mut self, fleet: FleetView) {
        if matches!(self.state, State::AwaitVerdicts | State::Established) {
            self.common.transmits.push_back(Control::Fleet(fleet));
        }
    }

    /// Whether `endpoint` is assigned to the agent now.
    pub fn is_assigned(&self, endpoint: &str) -> bool {
        self.assigned.contains(endpoint)
    }

    /// Keeps the verdicts on assigned endpoints and reports them, with a count of the rest.
    fn report_verdicts(&mut self, mut verdicts: Vec<EndpointVerdict>) {
        let sent = verdicts.len();
        verdicts.retain(|v| self.assigned.contains(&v.endpoint));
        if verdicts.len() < sent {
            self.common.events.push_back(RelayEvent::VerdictsIgnored(sent - verdicts.len()));
        }
        self.common.events.push_back(RelayEvent::Verdicts(verdicts));
    }

    /// Refuses the agent with a reason it is shown (never a secret).
    pub fn refuse(&mut self, reason: String) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.common.close();
        self.common.transmits.push_back(Control::Refused { reason: reason.clone() });
        self.common.events.push_back(RelayEvent::Refused { reason });
    }

    /// Counts verdicts of the first set; fails the conversation past one per endpoint (the
    /// pieces are not rate-limited, so their total is what bounds them).
    fn count_judged(&mut self, more: usize) -> bool {
        self.judged = self.judged.saturating_add(more);
        if self.judged > self.assigned.len() {
            self.fail(ControlError::TooMany { what: "verdicts", max: self.assigned.len() });
            return false;
        }
        true
    }

    /// Whether the agent's verdicts have arrived (it can be given streams).
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the conversation is over (refused or failed).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
}

impl ControlMachine for RelayControl {
    type Event = RelayEvent;

    /// Feeds a message read from the agent.
    fn handle_message(&mut self, message: Control, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if let Some(error) = self.common.heard(now, self.state == State::Established) {
            self.fail(error);
            return;
        }
        match (self.state, message) {
            (State::AwaitHello, Control::Hello(hello)) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    let reason = format!(
                        "protocol version {} is not supported by this relay (it speaks \
                         {PROTOCOL_VERSION})",
                        hello.protocol_version
                    );
                    self.refuse(reason);
                    return;
                }
                self.state = State::Authenticating;
                self.common.handshake_deadline = None;
                self.common.events.push_back(RelayEvent::Hello(hello));
            }
            (State::AwaitVerdicts, Control::VerdictsPart(verdicts)) => {
                if self.count_judged(verdicts.len()) {
                    self.report_verdicts(verdicts);
                }
            }
            (State::AwaitVerdicts, Control::Verdicts(verdicts)) => {
                if self.count_judged(verdicts.len()) {
                    self.state = State::Established;
                    self.common.establish(now);
                    self.report_verdicts(verdicts);
                }
            }
            (State::Established, Control::Verdicts(verdicts) | Control::VerdictsPart(verdicts)) => {
                self.report_verdicts(verdicts);
            }
            (State::Established, Control::Heartbeat { active_streams }) => {
                self.common.answer_heartbeat();
                self.common.events.push_back(RelayEvent::Heartbeat { active_streams });
            }
            // Its work is done by `heard`: the answer deadline is over.
            (State::Established, Control::HeartbeatAck) => {}
            (State::Established, Control::Drain { reason }) => {
                self.common.events.push_back(RelayEvent::AgentDraining { reason });
            }
            (state, other) => self.fail(ControlError::Unexpected {
                expected: match state {
                    State::AwaitHello => "Hello",
                    State::Authenticating => "nothing before the welcome",
                    State::AwaitVerdicts => "Verdicts or VerdictsPart",
                    State::Established | State::Closed => {
                        "Heartbeat, HeartbeatAck, Verdicts or Drain"
                    }
                },
                got: other.kind(),
            }),
        }
    }

    fn common(&mut self) -> &mut Common<RelayEvent> {
        &mut self.common
    }

    fn common_ref(&self) -> &Common<RelayEvent> {
        &self.common
    }

    fn fail(&mut self, error: ControlError) {
        self.state = State::Closed;
        self.common.close();
        self.common.events.push_back(RelayEvent::Failed(error));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::tests::{hello, verdicts};

    fn started() -> (RelayControl, Instant) {
        let now = Instant::now();
        let mut relay = RelayControl::new(now, Timers::default());
        assert_eq!(
            relay.poll_transmit(),
            Some(Control::RelayHello {
                protocol_version: PROTOCOL_VERSION,
                software_version: String::new()
            }),
            "the relay's first message discloses no software version"
        );
        (relay, now)
    }

    /// The one endpoint the tests' agent judges.
    fn kv() -> Vec<EndpointAssignment> {
        vec![EndpointAssignment { name: "kv".into(), destination: "kv.example:443".into() }]
    }

    fn established() -> (RelayControl, Instant) {
        let (mut relay, now) = started();
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        assert!(matches!(relay.poll_event(), Some(RelayEvent::Hello(_))));
        relay.accept(kv(), None, now);
        assert!(matches!(relay.poll_transmit(), Some(Control::Welcome { .. })));
        relay.handle_message(Control::Verdicts(verdicts()), now);
        assert_eq!(relay.poll_event(), Some(RelayEvent::Verdicts(verdicts())));
        assert!(relay.is_established());
        (relay, now)
    }

    #[test]
    fn hello_then_welcome_then_verdicts() {
        let (mut relay, now) = started();
        assert_eq!(relay.poll_timeout(), Some(now + Timers::HANDSHAKE));
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        assert_eq!(relay.poll_event(), Some(RelayEvent::Hello(hello(PROTOCOL_VERSION))));
        // While the driver authenticates, no deadline runs and nothing is sent.
        assert_eq!(relay.poll_timeout(), None);
        assert_eq!(relay.poll_transmit(), None);
        let later = now + Duration::from_secs(1);
        relay.accept(kv(), None, later);
        assert_eq!(relay.poll_transmit(), Some(Control::Welcome { endpoints: kv() }));
        assert_eq!(relay.poll_timeout(), Some(later + Timers::HANDSHAKE));
        relay.handle_message(Control::Verdicts(verdicts()), later);
        assert!(relay.is_established());
        assert_eq!(relay.poll_event(), Some(RelayEvent::Verdicts(verdicts())));
    }

    #[test]
    fn the_fleet_goes_before_the_welcome_and_changes_once_welcomed() {
        use crate::message::FleetView;
        let (mut relay, now) = started();
        let view = FleetView { relay: "a:1".into(), members: vec!["a:1".into(), "b:1".into()] };
        relay.announce_fleet(view.clone());
        assert_eq!(relay.poll_transmit(), None, "nothing before the agent is welcomed");
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        relay.poll_event();
        relay.accept(kv(), Some(view.clone()), now);
        assert_eq!(relay.poll_transmit(), Some(Control::Fleet(view.clone())));
        assert_eq!(relay.poll_transmit(), Some(Control::Welcome { endpoints: kv() }));
        relay.announce_fleet(view.clone());
        assert_eq!(relay.poll_transmit(), Some(Control::Fleet(view)));
    }

    #[test]
    fn a_peer_over_its_message_rate_ends_the_conversation() {
        use crate::control::{MESSAGE_BURST, MESSAGE_INTERVAL};
        let (mut relay, start) = established();
        // A steady message per interval is fine for as long as it lasts, burst or no burst.
        let mut now = start;
        for _ in 0..10 * MESSAGE_BURST {
            now += MESSAGE_INTERVAL;
            relay.handle_message(Control::Heartbeat { active_streams: 0 }, now);
        }
        while relay.poll_event().is_some() {}
        assert!(relay.is_established());
        // After a quiet spell, a full burst at one instant is fine, and one more is too many.
        now += MESSAGE_INTERVAL * MESSAGE_BURST;
        for _ in 0..MESSAGE_BURST {
            relay.handle_message(Control::Heartbeat { active_streams: 0 }, now);
        }
        assert!(relay.is_established(), "a burst within the limit is fine");
        relay.handle_message(Control::Heartbeat { active_streams: 0 }, now);
        let events: Vec<_> = std::iter::from_fn(|| relay.poll_event()).collect();
        assert_eq!(events.last(), Some(&RelayEvent::Failed(ControlError::TooFast)), "{events:?}");
        assert!(relay.is_closed());
    }

    #[test]
    fn an_unknown_version_is_refused_with_its_number() {
        let (mut relay, now) = started();
        relay.handle_message(Control::Hello(hello(99)), now);
        let Some(Control::Refused { reason }) = relay.poll_transmit() else {
            panic!("a refusal is sent");
        };
        assert!(reason.contains("protocol version 99"), "{reason}");
        assert_eq!(relay.poll_event(), Some(RelayEvent::Refused { reason }));
        assert!(relay.is_closed());
        assert_eq!(relay.poll_timeout(), None);
    }

    #[test]
    fn a_refused_agent_gets_the_reason_and_nothing_else() {
        let (mut relay, now) = started();
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        relay.poll_event();
        relay.refuse("authentication failed".into());
        assert_eq!(
            relay.poll_transmit(),
            Some(Control::Refused { reason: "authentication failed".into() })
        );
        relay.accept(kv(), None, now);
        relay.handle_message(Control::Verdicts(verdicts()), now);
        assert_eq!(relay.poll_transmit(), None, "a closed conversation sends nothing more");
        assert!(matches!(relay.poll_event(), Some(RelayEvent::Refused { .. })));
        assert_eq!(relay.poll_event(), None);
    }

    #[test]
    fn out_of_order_messages_fail_by_kind() {
        let (mut relay, now) = started();
        relay.handle_message(Control::Verdicts(verdicts()), now);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::Unexpected {
                expected: "Hello",
                got: "Verdicts"
            }))
        );
        assert!(relay.is_closed());

        let (mut relay, now) = started();
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        relay.poll_event();
        relay.accept(kv(), None, now);
        relay.handle_message(Control::Heartbeat { active_streams: 0 }, now);
        assert!(matches!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::Unexpected {
                expected: "Verdicts or VerdictsPart",
                ..
            }))
        ));

        let (mut relay, now) = established();
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        assert!(matches!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::Unexpected { got: "Hello", .. }))
        ));
    }

    #[test]
    fn a_silent_agent_times_out_at_each_handshake_step() {
        let (mut relay, now) = started();
        relay.handle_timeout(now + Timers::HANDSHAKE - Duration::from_millis(1));
        assert_eq!(relay.poll_event(), None);
        relay.handle_timeout(now + Timers::HANDSHAKE);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::Timeout {
                awaiting: "Hello",
                after: Timers::HANDSHAKE
            }))
        );

        let (mut relay, now) = started();
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        relay.poll_event();
        relay.accept(kv(), None, now);
        relay.handle_timeout(now + Timers::HANDSHAKE);
        assert!(matches!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::Timeout { awaiting: "Verdicts", .. }))
        ));
    }

    #[test]
    fn heartbeats_carry_the_load_are_answered_and_an_unanswered_one_kills() {
        let ms = Duration::from_millis;
        let (mut relay, now) = established();
        relay.set_active_streams(7);
        assert_eq!(relay.poll_timeout(), Some(now + Timers::HEARTBEAT));
        let sent = now + Timers::HEARTBEAT;
        relay.handle_timeout(sent);
        assert_eq!(relay.poll_transmit(), Some(Control::Heartbeat { active_streams: 7 }));
        assert_eq!(relay.poll_timeout(), Some(sent + Timers::ANSWER.min(Timers::HEARTBEAT)));
        // The agent answers; its own heartbeat is answered at once.
        relay.handle_message(Control::HeartbeatAck, sent + ms(40));
        relay.handle_message(Control::Heartbeat { active_streams: 2 }, sent + ms(50));
        assert_eq!(relay.poll_event(), Some(RelayEvent::Heartbeat { active_streams: 2 }));
        assert_eq!(relay.poll_transmit(), Some(Control::HeartbeatAck));
        relay.handle_timeout(sent + Timers::ANSWER);
        assert!(!relay.is_closed(), "answered in time");
        // The next heartbeat goes unanswered: the agent is gone at its deadline, not before.
        let next = sent + Timers::HEARTBEAT;
        relay.handle_timeout(next);
        assert_eq!(relay.poll_transmit(), Some(Control::Heartbeat { active_streams: 7 }));
        relay.handle_timeout(next + Timers::ANSWER - ms(1));
        assert!(!relay.is_closed());
        relay.handle_timeout(next + Timers::ANSWER);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::Unanswered(Timers::ANSWER)))
        );
        assert!(relay.is_closed());
    }

    #[test]
    fn a_probe_sends_a_heartbeat_at_once_that_must_be_answered() {
        let ms = Duration::from_millis;
        let (mut fresh, now) = started();
        while fresh.poll_transmit().is_some() {}
        fresh.probe(now);
        assert_eq!(fresh.poll_transmit(), None, "no heartbeat before the handshake");

        let (mut relay, now) = established();
        let at = now + ms(500);
        relay.probe(at);
        assert_eq!(relay.poll_transmit(), Some(Control::Heartbeat { active_streams: 0 }));
        relay.probe(at + ms(10));
        assert_eq!(relay.poll_transmit(), None, "one probe at a time");
        relay.handle_message(Control::HeartbeatAck, at + ms(20));
        relay.handle_timeout(at + Timers::ANSWER);
        assert!(!relay.is_closed(), "the probe was answered");
        let at = at + Timers::ANSWER;
        relay.probe(at);
        relay.handle_timeout(at + Timers::ANSWER);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::Unanswered(Timers::ANSWER)))
        );
    }

    #[test]
    fn drains_are_sent_once_and_received_as_events() {
        let (mut relay, now) = established();
        relay.drain("relay shutting down");
        relay.drain("again");
        assert_eq!(
            relay.poll_transmit(),
            Some(Control::Drain { reason: "relay shutting down".into() })
        );
        assert_eq!(relay.poll_transmit(), None);
        relay.handle_message(Control::Drain { reason: "agent leaving".into() }, now);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::AgentDraining { reason: "agent leaving".into() })
        );
        relay.handle_message(Control::Verdicts(verdicts()), now);
        assert_eq!(relay.poll_event(), Some(RelayEvent::Verdicts(verdicts())));
    }

    #[test]
    fn long_lists_travel_in_pieces_that_each_fit_a_frame() {
        let endpoints: Vec<EndpointAssignment> = (0..10_000)
            .map(|i| EndpointAssignment {
                name: format!("endpoint-{i:05}"),
                destination: format!("vault-{i:05}.privatelink.vaultcore.azure.net:443"),
            })
            .collect();
        let (mut relay, now) = started();
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        relay.poll_event();
        relay.accept(endpoints.clone(), None, now);
        let mut sent = Vec::new();
        while let Some(message) = relay.poll_transmit() {
            let body = crate::frame::encode(&message).expect("every piece fits a frame");
            assert!(body.len() <= crate::frame::MAX_BODY_LEN + crate::frame::HEADER_LEN);
            sent.push(message);
        }
        assert!(sent.len() > 1, "10,000 endpoints do not fit one frame");
        let (last, parts) = sent.split_last().expect("a welcome");
        assert!(matches!(last, Control::Welcome { .. }), "the welcome ends the list");
        assert!(parts.iter().all(|m| matches!(m, Control::EndpointsPart(_))));

        // The agent's machine puts them back together, whole and in order.
        let mut agent =
            crate::control::AgentControl::new(hello(PROTOCOL_VERSION), now, Timers::default());
        agent.handle_message(
            Control::RelayHello {
                protocol_version: PROTOCOL_VERSION,
                software_version: String::new(),
            },
            now,
        );
        agent.poll_event();
        assert!(matches!(agent.poll_transmit(), Some(Control::Hello(_))));
        for message in sent {
            agent.handle_message(message, now);
        }
        assert_eq!(
            agent.poll_event(),
            Some(crate::control::AgentEvent::Welcome(endpoints.clone()))
        );

        // Its verdicts come back in pieces too, every one recorded, and only the last
        // establishes the conversation.
        let verdicts: Vec<EndpointVerdict> = endpoints
            .iter()
            .map(|e| EndpointVerdict {
                endpoint: e.name.clone(),
                verdict: crate::message::Verdict::Rejected {
                    reason: format!("{} is not in this agent's allowlist", e.destination),
                },
            })
            .collect();
        agent.send_verdicts(verdicts.clone(), now);
        let mut received = Vec::new();
        let mut pieces = 0;
        while let Some(message) = agent.poll_transmit() {
            crate::frame::encode(&message).expect("every piece fits a frame");
            assert!(!relay.is_established(), "established before the last piece");
            relay.handle_message(message, now);
            pieces += 1;
            while let Some(event) = relay.poll_event() {
                let RelayEvent::Verdicts(v) = event else { panic!("{event:?}") };
                received.extend(v);
            }
        }
        assert!(pieces > 1);
        assert!(relay.is_established());
        assert_eq!(received.len(), verdicts.len());
        assert!(received == verdicts, "the verdicts came back changed or out of order");
    }

    #[test]
    fn more_verdicts_than_endpoints_end_the_handshake() {
        let (mut relay, now) = started();
        relay.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        relay.poll_event();
        relay.accept(kv(), None, now);
        relay.handle_message(Control::VerdictsPart(verdicts()), now);
        assert_eq!(relay.poll_event(), Some(RelayEvent::Verdicts(verdicts())));
        relay.handle_message(Control::VerdictsPart(verdicts()), now);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Failed(ControlError::TooMany { what: "verdicts", max: 1 }))
        );
    }

    #[test]
    fn endpoint_changes_go_out_in_pieces_once_established_only() {
        let (mut fresh, now) = started();
        fresh.handle_message(Control::Hello(hello(PROTOCOL_VERSION)), now);
        fresh.poll_event();
        fresh.update_endpoints(kv(), vec![]);
        assert_eq!(fresh.poll_transmit(), None, "before the welcome, nothing");

        let (mut relay, _) = established();
        while relay.poll_transmit().is_some() {}
        let added: Vec<EndpointAssignment> = (0..5000)
            .map(|i| EndpointAssignment {
                name: format!("added-{i:05}"),
                destination: format!("vault-{i:05}.privatelink.vaultcore.azure.net:443"),
            })
            .collect();
        relay.update_endpoints(added.clone(), vec!["kv".into()]);
        let mut got_added = Vec::new();
        let mut got_removed = Vec::new();
        while let Some(message) = relay.poll_transmit() {
            crate::frame::encode(&message).expect("every piece fits a frame");
            let Control::EndpointsChanged { added, removed } = message else {
                panic!("{message:?}")
            };
            got_added.extend(added);
            got_removed.extend(removed);
        }
        assert!(got_added == added);
        assert_eq!(got_removed, vec!["kv".to_owned()]);
    }

    #[test]
    fn verdicts_for_endpoints_not_assigned_are_dropped_and_counted() {
        // Once established (before, the first set is bounded by the welcome's length).
        let (mut relay, now) = established();
        let mut sent = verdicts();
        let made_up = crate::message::Verdict::Approved;
        sent.push(EndpointVerdict { endpoint: "made-up".into(), verdict: made_up });
        relay.handle_message(Control::Verdicts(sent), now);
        assert_eq!(relay.poll_event(), Some(RelayEvent::VerdictsIgnored(1)));
        assert_eq!(relay.poll_event(), Some(RelayEvent::Verdicts(verdicts())));
    }

    #[test]
    fn a_reassignment_tells_the_agent_the_difference_and_names_what_was_removed() {
        let (mut relay, _) = established();
        while relay.poll_transmit().is_some() {}
        let vault = EndpointAssignment {
            name: "vault".into(),
            destination: "vault.privatelink.vaultcore.azure.net:443".into(),
        };
        assert_eq!(relay.reassign(vec![vault.clone()]), vec!["kv".to_owned()]);
        assert_eq!(
            relay.poll_transmit(),
            Some(Control::EndpointsChanged {
                added: vec![vault.clone()],
                removed: vec!["kv".into()]
            })
        );
        assert!(relay.is_assigned("vault") && !relay.is_assigned("kv"));
        // The same list again changes nothing and sends nothing.
        assert!(relay.reassign(vec![vault]).is_empty());
        assert_eq!(relay.poll_transmit(), None);
        // Verdicts on the removed endpoint are dropped from now on.
        relay.handle_message(Control::Verdicts(verdicts()), Instant::now());
        assert_eq!(relay.poll_event(), Some(RelayEvent::VerdictsIgnored(1)));
    }
}
