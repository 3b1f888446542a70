//! Any bytes fed to the frame decoder, as each message type, and — as text — to the parser of
//! the destinations a relay sends in an open request: never a panic, never an allocation
//! beyond the declared bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_protocol::destination::Destination;
use privlink_protocol::frame::{MAX_BODY_LEN, decode};
use privlink_protocol::message::{Control, Open, OpenReply};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Control>(data, MAX_BODY_LEN);
    let _ = decode::<Open>(data, MAX_BODY_LEN);
    let _ = decode::<OpenReply>(data, MAX_BODY_LEN);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(destination) = text.parse::<Destination>() {
            // What parses prints back to something that parses to the same destination.
            assert_eq!(destination.to_string().parse::<Destination>(), Ok(destination));
        }
    }
});
