//! Any bytes as an HTTP CONNECT request head (a client of a CONNECT endpoint) and as a proxy's
//! answer (the agent's view of a corporate proxy): never a panic, a head never longer than the
//! bound or than what was read, and every prefix of a complete head is "need more" or the same
//! early refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_protocol::http_connect::{MAX_HEAD, parse_request, parse_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(request)) = parse_request(data) {
        assert!(request.head_len <= data.len() && request.head_len <= MAX_HEAD);
        for end in 0..request.head_len {
            assert!(
                matches!(parse_request(&data[..end]), Ok(None)),
                "a prefix ({end} bytes) of a complete CONNECT head of {} bytes",
                request.head_len
            );
        }
    }
    if let Ok(Some(response)) = parse_response(data) {
        assert!(response.head_len <= data.len() && response.head_len <= MAX_HEAD);
    }
});
