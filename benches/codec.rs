//! Criterion benchmarks of the sans-IO frame codec: encoding and decoding the data-stream
//! open header every tunnelled connection starts with, and a heartbeat, the most frequent
//! control message. Run with `cargo bench --bench codec`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use privlink_protocol::frame::{self, HEADER_LEN, MAX_BODY_LEN};
use privlink_protocol::message::{Control, Open};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `encode` and `decode` (header check, then body) of one message, as group `codec/NAME`.
fn encode_and_decode<T: Serialize + DeserializeOwned>(c: &mut Criterion, name: &str, message: &T) {
    let encoded = frame::encode(message).expect("encode");
    let mut group = c.benchmark_group(format!("codec/{name}"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| {
        b.iter(|| frame::encode(black_box(message)).expect("encode"))
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            let header: &[u8; HEADER_LEN] =
                black_box(&encoded[..HEADER_LEN]).try_into().expect("header");
            let len = frame::decode_header(header, MAX_BODY_LEN).expect("header");
            frame::decode_body::<T>(&encoded[HEADER_LEN..HEADER_LEN + len]).expect("body")
        });
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let open = Open {
        endpoint: "contoso-kv".to_owned(),
        destination: "contoso-kv.privatelink.vaultcore.azure.net:443".to_owned(),
        client_addr: "203.0.113.7:51234".parse().expect("addr"),
        inactivity_timeout_ms: 60_000,
    };
    encode_and_decode(c, "open", &open);
    encode_and_decode(c, "heartbeat", &Control::Heartbeat { active_streams: 42 });
}

criterion_group!(benches, codec);
criterion_main!(benches);
