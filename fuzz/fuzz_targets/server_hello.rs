//! Any bytes, in pieces of any size, fed to the ServerHello reader the agent's QUIC sessions
//! use: never a panic, the same answer however the bytes are cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_protocol::server_hello::ServerHelloReader;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let mut whole = ServerHelloReader::default();
    whole.feed(bytes);
    let mut reader = ServerHelloReader::default();
    for piece in bytes.chunks(usize::from(cut).max(1)) {
        reader.feed(piece);
    }
    assert_eq!(reader.negotiated(), whole.negotiated(), "cut into pieces of {cut}");
});
