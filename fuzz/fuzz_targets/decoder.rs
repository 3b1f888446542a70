//! Any bytes fed to the incremental frame decoder in the pieces the data's first byte chooses,
//! read the way the open-reply gate reads (only what the decoder says is missing): never a
//! panic, never a buffer beyond one header and one bounded body, and every frame it decodes
//! is the frame the whole-buffer decoder finds at the same place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_protocol::frame::{FrameDecoder, HEADER_LEN, MAX_BODY_LEN, decode};
use privlink_protocol::message::Control;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, data)) = data.split_first() else { return };
    let piece = usize::from(piece).max(1);
    let max_body = MAX_BODY_LEN.min(data.len() * 2);
    let decoder = FrameDecoder::new(max_body);
    let mut buf = bytes::BytesMut::new();
    let mut at = 0;
    while at < data.len() {
        let Ok(missing) = decoder.missing(&buf) else { return };
        if missing == 0 {
            let whole = decode::<Control>(&buf, max_body);
            let incremental = decoder.decode::<Control>(&mut buf);
            match (whole, incremental) {
                (Ok(Some((a, _))), Ok(Some(b))) => assert_eq!(a, b),
                (Err(a), Err(b)) => assert_eq!(a, b),
                (whole, incremental) => panic!("{whole:?} but {incremental:?}"),
            }
            assert!(buf.is_empty(), "a decoded frame is taken off whole");
            continue;
        }
        let take = missing.min(piece).min(data.len() - at);
        buf.extend_from_slice(&data[at..at + take]);
        at += take;
        assert!(buf.len() <= HEADER_LEN + max_body);
    }
});
