//! Any bytes as the start of a connection that may carry a PROXY header: never a panic, a
//! header never longer than what was read, and every prefix of a header is "need more".
#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_protocol::proxy_header::{ProxyParse, parse};

fuzz_target!(|data: &[u8]| {
    if let ProxyParse::Header(header) = parse(data) {
        assert!(header.len <= data.len());
        for end in 0..header.len {
            assert!(
                matches!(parse(&data[..end]), ProxyParse::NeedMore | ProxyParse::Header(_)),
                "a prefix of a header of {} bytes, {end} bytes long",
                header.len
            );
        }
    }
});
