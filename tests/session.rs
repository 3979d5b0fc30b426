//! PROTOCOL.md §2–§5, §7 and §9 over real sockets: bad input, auth, channels,
//! heartbeat and limits.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn still_serves(raw: &mut Raw) {
    raw.send_text(r#"{"id":"alive","type":"ping"}"#);
    let pong = raw.recv();
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["data"]["requestId"], "alive");
}

#[test]
fn frame_level_violations_close_with_the_named_codes() {
    let srv = TestServer::start(&[("WS_MAX_FRAGMENTS", "16")]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("binary", Raw::frame(true, 2, b"\x01\x02"), 1003),
        ("invalid utf-8", Raw::frame(true, 1, &[0xc3, 0x28]), 1007),
        ("too big", Raw::frame(true, 1, &vec![b' '; 16385]), 1009),
        ("unmasked", vec![0x81, 0x02, b'h', b'i'], 1002),
        (
            "reserved bits",
            {
                let mut f = Raw::frame(true, 1, b"{}");
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("bad opcode", Raw::frame(true, 0x3, b""), 1002),
        ("fragmented ping", Raw::frame(false, 9, b""), 1002),
        ("continuation first", Raw::frame(true, 0, b"x"), 1002),
        (
            "fragment flood",
            {
                let mut f = Raw::frame(false, 1, b"");
                for _ in 0..1000 {
                    f.extend(Raw::frame(false, 0, b""));
                }
                f
            },
            1009,
        ),
        (
            "reassembled too big",
            {
                let mut f = Raw::frame(false, 1, &vec![b' '; 10_000]);
                f.extend(Raw::frame(true, 0, &vec![b' '; 10_000]));
                f
            },
            1009,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut raw = Raw::connect(srv.addr);
        assert_eq!(raw.recv()["type"], "auth_required");
        raw.s.write_all(&bytes).unwrap();
        assert_eq!(raw.expect_close(), code, "{name}");
    }
    assert!(metric(srv.addr, "moonx_ws_protocol_closes_total") >= 10.0);
}

#[test]
fn message_level_errors_keep_the_connection() {
    let srv = TestServer::start(&[]);
    let mut raw = Raw::connect(srv.addr);
    assert_eq!(raw.recv()["type"], "auth_required");
    let cases = [
        ("not json", "invalid_message", Value::Null),
        ("[1,2,3]", "invalid_message", Value::Null),
        (r#"{"id":"r1","data":{}}"#, "invalid_message", json!("r1")),
        (r#"{"id":"r2","type":"subscribe"}"#, "invalid_message", json!("r2")),
        (r#"{"id":"r3","type":"teleport","data":{}}"#, "unknown_type", json!("r3")),
        (r#"{"id":"r4","type":"subscribe","data":{"channel":"prices"}}"#, "not_authenticated", json!("r4")),
    ];
    for (text, code, request_id) in cases {
        raw.send_text(text);
        let err = raw.recv();
        assert_eq!(err["type"], "error", "{text}");
        assert_eq!(err["data"]["code"], code, "{text}");
        assert!(err["data"]["message"].is_string());
        assert_eq!(err["data"].get("requestId").cloned().unwrap_or(Value::Null), request_id, "{text}");
        assert!(err["id"].is_string() && err["timestamp"].is_u64());
    }
    // Fragmented text is reassembled like any other message.
    raw.send_frame(false, 1, br#"{"id":"frag","#);
    raw.send_frame(true, 0, br#""type":"ping"}"#);
    assert_eq!(raw.recv()["data"]["requestId"], "frag");
    still_serves(&mut raw);
}

#[test]
fn server_message_ids_are_unique() {
    let srv = TestServer::start(&[]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let mut ws = authed(srv.addr, "ids");
        for _ in 0..5 {
            send(&mut ws, json!({"type": "ping"}));
            let m = recv(&mut ws);
            assert!(seen.insert(m["id"].as_str().unwrap().to_owned()), "{m}");
        }
    }
}

#[test]
fn authentication_flow_and_failure() {
    let srv = TestServer::start(&[]);
    let mut ws = connect(srv.addr);
    let first = recv(&mut ws);
    assert_eq!(first["type"], "auth_required");
    assert_eq!(first["data"]["timeout"], 10000);
    send(&mut ws, json!({"id":"a1","type":"authenticate","data":{"token": token("alice", 600)}}));
    let ok = recv(&mut ws);
    assert_eq!(ok["type"], "auth_success");
    assert_eq!(ok["data"]["user"], json!({"id":"alice","email":"alice@example.com"}));
    assert_eq!(ok["data"]["requestId"], "a1");

    let mut bad = connect(srv.addr);
    recv(&mut bad);
    send(&mut bad, json!({"id":"a2","type":"authenticate","data":{"token":"garbage"}}));
    let failed = recv(&mut bad);
    assert_eq!(failed["type"], "auth_failed");
    assert_eq!(failed["data"]["requestId"], "a2");
    assert!(failed["data"]["error"].is_string());
    assert_eq!(expect_close(&mut bad), 4001);

    let mut none = connect(srv.addr);
    recv(&mut none);
    send(&mut none, json!({"type":"authenticate","data":{}}));
    assert_eq!(recv(&mut none)["type"], "auth_failed");
    assert_eq!(expect_close(&mut none), 4001);
    assert_eq!(metric(srv.addr, "moonx_ws_auth_total{result=\"failure\"}"), 2.0);
}

#[test]
fn authentication_timeout_closes_4002() {
    let srv = TestServer::start(&[("AUTH_TIMEOUT_MS", "300")]);
    let mut ws = connect(srv.addr);
    assert_eq!(recv(&mut ws)["data"]["timeout"], 300);
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong", "ping is allowed before auth");
    let failed = recv(&mut ws);
    assert_eq!(failed["type"], "auth_failed");
    assert_eq!(failed["data"]["error"], "Authentication timeout");
    assert_eq!(expect_close(&mut ws), 4002);
}

#[test]
fn refresh_same_user_extends_other_user_fails() {
    let srv = TestServer::start(&[]);
    let mut ws = authed(srv.addr, "bob");
    send(&mut ws, json!({"id":"r","type":"authenticate","data":{"token": token("bob", 7200)}}));
    let again = recv(&mut ws);
    assert_eq!(again["type"], "auth_success");
    assert_eq!(again["data"]["requestId"], "r");
    subscribe(&mut ws, "prices");
    send(&mut ws, json!({"type":"authenticate","data":{"token": token("mallory", 7200)}}));
    assert_eq!(recv(&mut ws)["type"], "auth_failed");
    assert_eq!(expect_close(&mut ws), 4001);

    let mut ws = authed(srv.addr, "bob");
    send(&mut ws, json!({"type":"authenticate","data":{"token": "bad"}}));
    assert_eq!(recv(&mut ws)["type"], "auth_failed");
    assert_eq!(expect_close(&mut ws), 4001);
}

#[test]
fn token_expiry_while_connected_closes_4001() {
    let srv = TestServer::start(&[("JWT_LEEWAY_SECONDS", "0")]);
    let mut ws = connect(srv.addr);
    recv(&mut ws);
    send(&mut ws, json!({"type":"authenticate","data":{"token": token("eve", 1)}}));
    assert_eq!(recv(&mut ws)["type"], "auth_success");
    let expired = recv(&mut ws);
    assert_eq!(expired["type"], "auth_failed");
    assert_eq!(expired["data"]["error"], "Token expired");
    assert_eq!(expect_close(&mut ws), 4001);
}

#[test]
fn channel_rules() {
    let srv = TestServer::start(&[("WS_MAX_SUBSCRIPTIONS", "2")]);
    let mut ws = authed(srv.addr, "carol");
    for _ in 0..2 {
        send(&mut ws, json!({"id":"s","type":"subscribe","data":{"channel":"prices"}}));
        let r = recv(&mut ws);
        assert_eq!(r["type"], "subscribed");
        assert_eq!(
            r["data"],
            json!({"channel":"prices","snapshot":0,"requestId":"s"}),
            "price channels count their snapshots"
        );
    }
    subscribe(&mut ws, "orders");
    send(&mut ws, json!({"type":"subscribe","data":{"channel":"trades"}}));
    assert_eq!(recv(&mut ws)["data"]["code"], "too_many_subscriptions");
    send(&mut ws, json!({"type":"subscribe","data":{"channel":"gossip"}}));
    assert_eq!(recv(&mut ws)["data"]["code"], "unknown_channel");
    for _ in 0..2 {
        send(&mut ws, json!({"id":"u","type":"unsubscribe","data":{"channel":"orders"}}));
        let r = recv(&mut ws);
        assert_eq!(r["type"], "unsubscribed");
        assert_eq!(r["data"]["channel"], "orders");
    }
    subscribe(&mut ws, "trades");
    assert_eq!(get_json(srv.addr, "/connections")["channels"]["prices"], 1, "not counted twice");
}

#[test]
fn ping_pong_and_server_heartbeat() {
    let srv = TestServer::start(&[("WS_PING_INTERVAL", "200"), ("WS_PONG_TIMEOUT", "200")]);
    let mut ws = authed(srv.addr, "dave");
    send(&mut ws, json!({"id":"p1","type":"ping","data":{"anything":[1]}}));
    let pong = recv(&mut ws);
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["data"]["requestId"], "p1");
    assert!(pong["data"]["timestamp"].as_u64().unwrap() > 1_600_000_000_000);

    // A client that answers pings stays; tungstenite answers them on read.
    let mut live = authed(srv.addr, "live");
    let mut pings_seen = 0;
    while pings_seen < 3 {
        if let tungstenite::Message::Ping(_) = live.read().unwrap() {
            pings_seen += 1;
            live.flush().unwrap();
        }
    }
    send(&mut live, json!({"type":"ping"}));
    assert_eq!(recv(&mut live)["type"], "pong");

    // A silent peer is dropped without a close handshake.
    let mut silent = Raw::connect(srv.addr);
    assert_eq!(silent.recv()["type"], "auth_required");
    assert!(silent.expect_eof(), "server closed TCP without a close frame");
    assert!(metric(srv.addr, "moonx_ws_pong_timeouts_total") >= 1.0);
}

#[test]
fn message_rate_limit_then_4008() {
    let srv = TestServer::start(&[("RATE_LIMIT_MAX_MESSAGES_PER_MINUTE", "5")]);
    let mut ws = connect(srv.addr);
    recv(&mut ws);
    send(&mut ws, json!({"type":"authenticate","data":{"token": token("rl", 600)}}));
    recv(&mut ws);
    for _ in 0..4 {
        send(&mut ws, json!({"type":"ping"}));
        assert_eq!(recv(&mut ws)["type"], "pong", "authenticate counted as 1 of 5");
    }
    send(&mut ws, json!({"id": "x6", "type":"ping"}));
    let r = recv(&mut ws);
    assert_eq!(r["data"]["code"], "rate_limited");
    assert_eq!(r["data"]["requestId"], "x6");
    assert!(r["data"]["retryAfterMs"].as_u64().unwrap() <= 60_000);
    // The user's count is shared by their other connections; the pre-auth
    // count (the authenticate message) carries into it: 7, then 8.
    let mut other = authed(srv.addr, "rl");
    send(&mut other, json!({"type":"ping"}));
    assert_eq!(recv(&mut other)["data"]["code"], "rate_limited");
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["data"]["code"], "rate_limited", "9");
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(expect_close(&mut ws), 4008, "10 = twice the limit");
    assert!(metric(srv.addr, "moonx_ws_rate_limited_total") >= 4.0);
    assert_eq!(metric(srv.addr, "moonx_ws_rate_limit_closes_total"), 1.0);
}

#[test]
fn peer_close_is_echoed() {
    let srv = TestServer::start(&[]);
    let mut raw = raw_authed(srv.addr, "closer");
    raw.send_frame(true, 8, &[0x0f, 0xa0, b'b', b'y', b'e']); // 4000 "bye"
    assert_eq!(raw.expect_close(), 4000);
    assert!(raw.read_frame().is_none(), "then TCP closes");
}

/// A stand-in Auth Service speaking real HTTP on loopback.
fn auth_service(hits: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let hits = hits.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[len..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let req = String::from_utf8_lossy(&buf[..len]).to_string();
                assert!(req.starts_with("GET /api/v1/auth/verify "), "{req}");
                let token = req
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: Bearer ").or(l.strip_prefix("Authorization: Bearer ")))
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                let (status, body) = match token.as_str() {
                    t if t.starts_with("good-") => (
                        200,
                        json!({"success": true, "data": {"user": {"id": &t[5..], "email": "r@example.com"}}})
                            .to_string(),
                    ),
                    t if t.starts_with("flat-") => (200, json!({"user": {"id": 77}}).to_string()),
                    "slow" => {
                        std::thread::sleep(Duration::from_secs(3));
                        (200, "{}".into())
                    }
                    "boom" => (500, "{}".into()),
                    _ => (401, json!({"error": "invalid"}).to_string()),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn remote_auth_service() {
    let hits = Arc::new(AtomicUsize::new(0));
    let url = auth_service(hits.clone());
    let srv = TestServer::start(&[("JWT_SECRET", ""), ("AUTH_SERVICE_URL", &url), ("AUTH_SERVICE_TIMEOUT_MS", "500")]);
    let attempt = |token: &str| -> (Value, Option<u16>) {
        let mut ws = connect(srv.addr);
        recv(&mut ws);
        send(&mut ws, json!({"id":"q","type":"authenticate","data":{"token": token}}));
        let reply = recv(&mut ws);
        let closed = (reply["type"] == "auth_failed").then(|| expect_close(&mut ws));
        (reply, closed)
    };
    let (ok, _) = attempt("good-remote1");
    assert_eq!(ok["type"], "auth_success");
    assert_eq!(ok["data"]["user"]["id"], "remote1");
    assert_eq!(ok["data"]["requestId"], "q");
    let before = hits.load(Ordering::SeqCst);
    assert_eq!(attempt("good-remote1").0["type"], "auth_success");
    assert_eq!(hits.load(Ordering::SeqCst), before, "positive answer cached");
    assert_eq!(attempt("flat-x").0["data"]["user"]["id"], "77", "user at top level, numeric id");
    let (rejected, code) = attempt("nope");
    assert_eq!(rejected["type"], "auth_failed");
    assert_eq!(code, Some(4001));
    for broken in ["boom", "slow"] {
        let (r, code) = attempt(broken);
        assert_eq!(r["data"]["error"], "Authentication service unavailable", "{broken}");
        assert_eq!(code, Some(4001));
    }
}
