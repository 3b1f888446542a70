//! Criterion benchmarks of the sans-IO frame codec: encoding and decoding the data-stream
//! open header every tunnelled connection starts with, and a heartbeat, the most frequent
//! control message. Run with `cargo bench --bench codec`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use privlink_protocol::frame::{self, HEADER_LEN, MAX_BODY_LEN};
use privlink_protocol::message::{Control, Open};

fn open_header() -> Open {
    Open {
        endpoint: "contoso-kv".to_owned(),
        destination: "contoso-kv.privatelink.vaultcore.azure.net:443".to_owned(),
        client_addr: "203.0.113.7:51234".parse().expect("addr"),
        inactivity_timeout_ms: 60_000,
    }
}

fn codec(c: &mut Criterion) {
    let open = open_header();
    let encoded = frame::encode(&open).expect("encode");
    let mut group = c.benchmark_group("codec/open");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| b.iter(|| frame::encode(black_box(&open)).expect("encode")));
    group.bench_function("decode", |b| {
        b.iter(|| {
            let header: &[u8; HEADER_LEN] =
                black_box(&encoded[..HEADER_LEN]).try_into().expect("header");
            let len = frame::decode_header(header, MAX_BODY_LEN).expect("header");
            frame::decode_body::<Open>(&encoded[HEADER_LEN..HEADER_LEN + len]).expect("body")
        });
    });
    group.finish();

    let heartbeat = Control::Heartbeat { active_streams: 42 };
    let encoded = frame::encode(&heartbeat).expect("encode");
    let mut group = c.benchmark_group("codec/heartbeat");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| {
        b.iter(|| frame::encode(black_box(&heartbeat)).expect("encode"));
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            let header: &[u8; HEADER_LEN] =
                black_box(&encoded[..HEADER_LEN]).try_into().expect("header");
            let len = frame::decode_header(header, MAX_BODY_LEN).expect("header");
            frame::decode_body::<Control>(&encoded[HEADER_LEN..HEADER_LEN + len]).expect("body")
        });
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
