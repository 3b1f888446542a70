//! Any bytes fed to the frame decoder, as each message type: never a panic, never an
//! allocation beyond the declared bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_protocol::frame::{MAX_BODY_LEN, decode};
use privlink_protocol::message::{Control, Open, OpenReply};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Control>(data, MAX_BODY_LEN);
    let _ = decode::<Open>(data, MAX_BODY_LEN);
    let _ = decode::<OpenReply>(data, MAX_BODY_LEN);
});
