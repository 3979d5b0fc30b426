//! Bad input from hostile clients: each gets the specified error or close
//! code, and a bystander connection keeps receiving updates throughout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use moonx_ws::shard::inbox::Route;
use serde_json::json;

/// A subscribed client that must keep getting every update.
struct Bystander {
    ws: Ws,
    seq: u64,
}

impl Bystander {
    fn new(srv: &TestServer) -> Bystander {
        let mut ws = authed(srv.addr, "bystander");
        subscribe(&mut ws, "prices");
        Bystander { ws, seq: 0 }
    }

    fn still_receives(&mut self, srv: &TestServer) {
        self.seq += 1;
        let data = format!(r#"{{"token":"B","chainId":1,"seq":{}}}"#, self.seq);
        srv.handle().publisher().publish_data(Route::Prices, 0, data.as_bytes());
        let m = recv(&mut self.ws);
        assert_eq!(m["data"]["seq"], self.seq, "bystander got the update");
    }
}

#[test]
fn slowloris_headers_are_cut_off_by_the_handshake_timeout() {
    let srv = TestServer::start(&[("WS_HANDSHAKE_TIMEOUT_MS", "400")]);
    let mut by = Bystander::new(&srv);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let request = upgrade_request("");
    let mut closed = false;
    for b in request.as_bytes() {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        by.still_receives(&srv);
        let mut buf = [0u8; 512];
        s.set_nonblocking(true).unwrap();
        let r = s.read(&mut buf);
        s.set_nonblocking(false).unwrap();
        match r {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => {
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the server closed the slow request before it completed");
    by.still_receives(&srv);
}

#[test]
fn floods_and_oversized_input() {
    let srv = TestServer::start(&[]);
    let mut by = Bystander::new(&srv);

    // Ping flood: thousands of pings; the connection answers (coalesced pongs).
    let mut flood = raw_authed(srv.addr, "pinger");
    let mut burst = Vec::new();
    for i in 0..5000u32 {
        burst.extend(Raw::frame(true, 9, &i.to_be_bytes()));
    }
    flood.s.write_all(&burst).unwrap();
    flood.send_text(r#"{"id":"after-flood","type":"ping"}"#);
    loop {
        let (op, payload) = flood.read_frame().expect("still open");
        if op == 1 {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(v["data"]["requestId"], "after-flood");
            break;
        }
        assert_eq!(op, 10, "only pongs before the reply");
    }
    by.still_receives(&srv);

    // A message id of 1 MiB: far over the message limit.
    let mut big = raw_authed(srv.addr, "big-id");
    let huge = format!(r#"{{"id":"{}","type":"ping"}}"#, "x".repeat(1 << 20));
    let _ = big.s.write_all(&Raw::frame(true, 1, huge.as_bytes()));
    assert_eq!(big.expect_close(), 1009);
    by.still_receives(&srv);

    // JSON nested ten thousand deep (within the size limit): invalid_message.
    let mut deep = raw_authed(srv.addr, "deep");
    let nested = format!("{}{}", "[".repeat(8000), "]".repeat(8000));
    deep.send_text(&nested);
    assert_eq!(deep.recv()["data"]["code"], "invalid_message");
    deep.send_text(&format!(r#"{{"type":"ping","data":{nested}}}"#));
    assert_eq!(deep.recv()["type"], "pong", "deep data of a ping is accepted as any JSON");
    by.still_receives(&srv);

    // Thousands of empty continuation frames.
    let mut frags = raw_authed(srv.addr, "frags");
    let mut f = Raw::frame(false, 1, b"");
    for _ in 0..5000 {
        f.extend(Raw::frame(false, 0, b""));
    }
    let _ = frags.s.write_all(&f);
    assert_eq!(frags.expect_close(), 1009);
    by.still_receives(&srv);
}

#[test]
fn spoofed_and_repeated_forwarded_for_headers() {
    let srv = TestServer::start(&[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "1"), ("TRUSTED_PROXIES", "127.0.0.1")]);
    let mut by = Bystander::new(&srv); // counted for 127.0.0.1 (no header)
                                       // Repeated headers: the right-most untrusted hop across all of them counts.
    let first = connect_with(srv.addr, &[("X-Forwarded-For", "9.9.9.9, 5.5.5.5")]);
    assert!(first.is_ok());
    let (status, _, _) =
        http(srv.addr, &upgrade_request("X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 5.5.5.5, 127.0.0.1\r\n"));
    assert_eq!(status, 429, "5.5.5.5 (behind the trusted proxy) already has its one connection");
    // Spoofing the left part does not change who the client is.
    let (status, _, _) = http(srv.addr, &upgrade_request("X-Forwarded-For: 7.7.7.7, 5.5.5.5\r\n"));
    assert_eq!(status, 429);
    by.still_receives(&srv);

    // Without trust, the header is ignored entirely.
    let untrusting = TestServer::start(&[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "1")]);
    let _one = connect(untrusting.addr);
    let (status, _, _) = http(untrusting.addr, &upgrade_request("X-Forwarded-For: 8.8.4.4\r\n"));
    assert_eq!(status, 429, "spoofed header from an untrusted peer");
    send(&mut by.ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut by.ws)["type"], "pong");
}
