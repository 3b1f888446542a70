//! Any bytes, in pieces of any size, fed to the ClientHello server-name reader: never a panic,
//! never more than the bound kept, the same answer however the bytes are cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_protocol::client_hello::{Preread, ServerNameReader};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let whole = ServerNameReader::new().feed(bytes);
    let mut reader = ServerNameReader::new();
    let mut answer = Preread::NeedMore;
    for piece in bytes.chunks(usize::from(cut).max(1)) {
        answer = reader.feed(piece);
        if answer != Preread::NeedMore {
            break;
        }
    }
    assert_eq!(answer, whole, "cut into pieces of {cut}");
});
