//! Micro-benchmarks of the sans-IO hot paths: the upgrade parser, frame
//! decode/encode, client message parsing, Kafka value validation and the
//! update envelope. Run: `cargo bench --bench protocol`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use moonx_ws::ingest::validate::Validator;
use moonx_ws::protocol::frame::{decode_frame, encode_frame, Assembler, Limits, OP_TEXT};
use moonx_ws::protocol::handshake::parse_head;
use moonx_ws::protocol::message::{parse_client, Channel};
use moonx_ws::shard::inbox::{Route, Update};
use std::hint::black_box;

const PRICE: &[u8] = br#"{"token":"ETH","chainId":8453,"price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","timestamp":1701234567890,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
const LIMITS: Limits = Limits { max_message_bytes: 16384, max_fragments: 64, accept_binary: false };

fn masked(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![0x81, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn benches(c: &mut Criterion) {
    let head = b"GET /ws HTTP/1.1\r\nHost: ws.moonx.farm\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.moonx.farm\r\nUser-Agent: Mozilla/5.0\r\nAccept-Encoding: gzip\r\n\r\n";
    c.bench_function("upgrade/parse_head", |b| b.iter(|| parse_head(black_box(head))));

    let sub = br#"{"id":"msg_123","type":"subscribe","timestamp":1701234567890,"data":{"channel":"prices"}}"#;
    let frame = masked(sub);
    c.bench_function("frame/decode+assemble text", |b| {
        let mut asm = Assembler::default();
        b.iter_batched_ref(
            || frame.clone(),
            |buf| {
                let f = decode_frame(buf, &LIMITS).unwrap().unwrap();
                let payload = buf[f.payload.clone()].to_vec();
                asm.push(&f, &payload, &LIMITS).map(|m| m.is_some()).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    let mut out = Vec::with_capacity(512);
    c.bench_function("frame/encode 200 B", |b| {
        b.iter(|| {
            out.clear();
            encode_frame(OP_TEXT, black_box(PRICE), &mut out);
        })
    });
    c.bench_function("message/parse subscribe", |b| b.iter(|| parse_client(black_box(sub)).is_ok()));

    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Bytes(PRICE.len() as u64));
    let mut v = Validator::default();
    g.bench_function("validate price (simd-json tape)", |b| {
        b.iter(|| v.route(Channel::Prices, black_box(PRICE)).is_ok())
    });
    g.bench_function("envelope + frame once", |b| {
        b.iter(|| Update::encode(Route::Prices, "u123456", 1701234567890, black_box(PRICE)))
    });
    g.finish();
}

criterion_group!(protocol, benches);
criterion_main!(protocol);
