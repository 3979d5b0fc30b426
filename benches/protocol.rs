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
    let sub_text = std::str::from_utf8(sub).unwrap();
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
    c.bench_function("message/parse subscribe", |b| b.iter(|| parse_client(black_box(sub_text)).is_ok()));

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

/// What one connection's set-up costs in user space beside the system
/// calls: the 101's accept key, the token, the client's two messages and
/// the server's three replies (`moonx-loadtest connect` does exactly these).
fn setup(c: &mut Criterion) {
    use moonx_ws::auth::{Auth, Verification};
    use moonx_ws::protocol::handshake::write_switching_protocols;
    use moonx_ws::protocol::message::{encode_outgoing, Names, Outgoing, UserView};
    let env = |k: &str| (k == "JWT_SECRET").then(|| "loadtest-secret".to_string());
    let cfg = moonx_ws::config::Config::from_sources_with(["moonx-ws"], env, ["JWT_SECRET".to_string()]).unwrap();
    let (auth, _) = Auth::from_config(&cfg).unwrap();
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = serde_json::json!({"sub": "lt-u1234", "exp": exp});
    let key = jsonwebtoken::EncodingKey::from_secret(b"loadtest-secret");
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
    let mut g = c.benchmark_group("setup");
    g.bench_function("verify HS256 token", |b| {
        b.iter(|| matches!(auth.verify(black_box(&token)), Verification::Done(Ok(_))))
    });
    let authenticate = format!(r#"{{"id":"a1","type":"authenticate","data":{{"token":"{token}"}}}}"#);
    g.bench_function("parse authenticate", |b| b.iter(|| parse_client(black_box(&authenticate)).is_ok()));
    let (mut json, mut out) = (Vec::with_capacity(512), Vec::with_capacity(512));
    let replies = [
        Outgoing::AuthRequired { timeout_ms: 10_000, connection_id: "host-1234-8f3a2c11/4242" },
        Outgoing::AuthSuccess {
            user: UserView { id: "lt-u1234", email: None },
            connection_id: "host-1234-8f3a2c11/4242",
            request_id: Some("a1"),
        },
        Outgoing::Subscribed { names: Names::One("prices"), snapshot: Some(0), recovery: None, request_id: Some("s1") },
    ];
    g.bench_function("encode the three replies", |b| {
        b.iter(|| {
            out.clear();
            for r in &replies {
                encode_outgoing(black_box(r), "s0-12345", 1701234567890, &mut json, &mut out);
            }
        })
    });
    g.bench_function("101 with accept key", |b| {
        b.iter(|| {
            out.clear();
            write_switching_protocols(black_box("dGhlIHNhbXBsZSBub25jZQ=="), &mut out);
        })
    });
    g.finish();
}

criterion_group!(protocol, benches, setup);
criterion_main!(protocol);
