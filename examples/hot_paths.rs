//! A fixed amount of work on each hot path, for instruction counts under
//! callgrind (`perf/callgrind.sh`); hardware counters are not available on
//! the measurement machines, and instruction counts are deterministic where
//! wall time is not.
//!
//! `cargo run --release --example hot_paths -- <path> <iterations>`, with
//! `<path>` one of: `upgrade` (parse a 9-header upgrade request), `frame`
//! (decode and assemble a masked client text frame), `message` (parse a
//! subscribe), `ingest` (validate a price value and build its frame once),
//! `fanout` (one price update to 1000 subscribers, then the sweep that
//! writes it to their sockets: Unix socket pairs, drained after each sweep).
//! Kernel work is not counted by callgrind: `fanout` shows what user space
//! spends per delivery around each `send`.

use std::hint::black_box;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use moonx_ws::ingest::validate::Validator;
use moonx_ws::protocol::frame::{decode_frame, Assembler, Limits};
use moonx_ws::protocol::handshake::parse_head;
use moonx_ws::protocol::message::{parse_client, Channel};
use moonx_ws::shard::inbox::{Route, Update};
use moonx_ws::shard::{DirectSocket, Shard};
use moonx_ws::telemetry::ShardStats;

const PRICE: &[u8] = br#"{"token":"ETH","chainId":8453,"price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","timestamp":1701234567890,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
const HEAD: &[u8] = b"GET /ws HTTP/1.1\r\nHost: ws.moonx.farm\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.moonx.farm\r\nUser-Agent: Mozilla/5.0\r\nAccept-Encoding: gzip\r\n\r\n";
const SUB: &str = r#"{"id":"msg_123","type":"subscribe","timestamp":1701234567890,"data":{"channel":"prices"}}"#;
const LIMITS: Limits = Limits { max_message_bytes: 16384, max_fragments: 64, accept_binary: false };
const SUBSCRIBERS: usize = 1000;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "fanout".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    match path.as_str() {
        "upgrade" => (0..n).for_each(|_| {
            black_box(matches!(parse_head(black_box(HEAD)), moonx_ws::protocol::handshake::Parsed::Complete(..)));
        }),
        "frame" => {
            let mask = [0x12, 0x34, 0x56, 0x78];
            let mut frame = vec![0x81, 0x80 | SUB.len() as u8];
            frame.extend_from_slice(&mask);
            frame.extend(SUB.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            let mut asm = Assembler::default();
            let mut buf = frame.clone();
            for _ in 0..n {
                buf.copy_from_slice(&frame);
                let f = decode_frame(&mut buf, &LIMITS).unwrap().unwrap();
                let payload = &buf[f.payload.clone()];
                black_box(asm.push(&f, payload, &LIMITS).unwrap().is_some());
            }
        }
        "message" => (0..n).for_each(|_| {
            black_box(parse_client(black_box(SUB)).is_ok());
        }),
        "ingest" => {
            let mut v = Validator::default();
            for _ in 0..n {
                let route = v.route(Channel::Prices, black_box(PRICE)).unwrap();
                black_box(Update::encode(route, "u123456", 1701234567890, PRICE));
            }
        }
        "fanout" => fanout(n),
        other => {
            eprintln!("unknown path {other}: upgrade | frame | message | ingest | fanout");
            std::process::exit(2);
        }
    }
}

/// `rounds` x (one update to every subscriber, one sweep, drain).
fn fanout(rounds: usize) {
    let update = Arc::new(Update::encode(Route::Prices, "u1", 1701234567890, PRICE));
    let mut shard = Shard::new(0, 1 << 20, Arc::new(ShardStats::default()));
    let mut pairs = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let (srv, cli) = UnixStream::pair().expect("socket pair");
        cli.set_nonblocking(true).expect("non-blocking");
        let key = shard.insert(Some(DirectSocket::owned(srv.into())), 0);
        shard.subscribe(key, Channel::Prices);
        pairs.push(cli);
    }
    let mut buf = vec![0u8; 4096];
    for _ in 0..rounds {
        shard.fanout(&update);
        shard.begin_sweep();
        while !shard.flush_step(64) {}
        for cli in pairs.iter_mut() {
            let got = cli.read(&mut buf).expect("frame written");
            assert_eq!(got, update.frame.len());
        }
    }
}
