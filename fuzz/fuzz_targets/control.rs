//! Any frames fed to either side's control state machine, interleaved with time passing:
//! never a panic, and a closed conversation stays closed.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use privlink_protocol::control::{AgentControl, ControlMachine, RelayControl, Timers};
use privlink_protocol::frame::{MAX_BODY_LEN, decode};
use privlink_protocol::message::{Control, Hello};
use privlink_protocol::token::Token;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let hello = Hello {
        protocol_version: 1,
        connector: "c".into(),
        token: Token::new("t"),
        agent_name: "a".into(),
        agent_id: "i".into(),
        software_version: "0".into(),
        allowed: vec![],
    };
    let mut relay = RelayControl::new(start, Timers::default());
    let mut agent = AgentControl::new(hello, start, Timers::default());
    let mut rest = data;
    let mut now = start;
    while let Ok(Some((message, used))) = decode::<Control>(rest, MAX_BODY_LEN) {
        rest = &rest[used..];
        now += Duration::from_secs(u64::try_from(used % 20).unwrap_or(0));
        relay.handle_message(message.clone(), now);
        agent.handle_message(message, now);
        relay.handle_timeout(now);
        agent.handle_timeout(now);
        while relay.poll_transmit().is_some() || relay.poll_event().is_some() {}
        while agent.poll_transmit().is_some() || agent.poll_event().is_some() {}
        if relay.is_closed() {
            assert_eq!(relay.poll_timeout(), None);
        }
    }
});
