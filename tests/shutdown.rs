//! PROTOCOL.md §10: SIGTERM/SIGINT closes every connection with 1001 and
//! exits 0; the in-process handle does the same.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use moonx_ws::shard::inbox::Route;

#[test]
fn shutdown_closes_every_connection_with_1001_after_queued_updates() {
    let mut srv = TestServer::start(&[]);
    let mut clients: Vec<Ws> = (0..20).map(|i| authed(srv.addr, &format!("s{i}"))).collect();
    for ws in clients.iter_mut() {
        subscribe(ws, "prices");
    }
    let publisher = srv.handle().publisher();
    for i in 0..50 {
        publisher.publish_data(Route::Prices, 0, format!(r#"{{"token":"T","chainId":1,"i":{i}}}"#).as_bytes());
    }
    // Let the fan-out queue everything before shutdown begins.
    for ws in clients.iter_mut().take(1) {
        for _ in 0..50 {
            recv(ws);
        }
    }
    let handle = srv.handle.take().unwrap();
    handle.shutdown();
    for (n, ws) in clients.iter_mut().enumerate() {
        let mut updates = if n == 0 { 50 } else { 0 };
        let code = loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(_)) => updates += 1,
                Ok(tungstenite::Message::Close(Some(f))) => break u16::from(f.code),
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        assert_eq!(code, 1001);
        assert_eq!(updates, 50, "updates queued before the close are delivered whole");
    }
    handle.join();
    assert!(std::net::TcpStream::connect(srv.addr).is_err(), "no longer listening");
}

#[test]
fn sigterm_exits_zero_after_closing_clients() {
    // The embedded broker and its demo feed run too: the real default binary.
    let (mut child, addr) = spawn_server(&[("JWT_SECRET", SECRET), ("WS_SHARDS", "2"), ("LOG_LEVEL", "warn")]);
    let mut ws = authed(addr, "term");
    // The `kill` command sends the signal (no unsafe libc call in tests).
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    assert_eq!(expect_close(&mut ws), 1001);
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn shutdown_under_load_closes_thousands_with_1001_and_no_cut_frames() {
    let mut srv = TestServer::start(&[
        ("WS_SHARDS", "2"),
        ("SHUTDOWN_GRACE_MS", "3000"),
        ("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "5000"),
    ]);
    let n = 2000;
    let mut clients: Vec<Raw> = (0..n).map(|i| raw_authed(srv.addr, &format!("load{i}"))).collect();
    for c in clients.iter_mut() {
        c.send_text(r#"{"type":"subscribe","data":{"channel":"prices"}}"#);
    }
    for c in clients.iter_mut() {
        assert_eq!(c.recv()["type"], "subscribed");
    }
    let publisher = srv.handle().publisher();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 400 {
                publisher.publish_data(Route::Prices, 0, format!(r#"{{"token":"T","chainId":1,"i":{i}}}"#).as_bytes());
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100)); // fan-out in progress
    let handle = srv.handle.take().unwrap();
    handle.shutdown();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.join().unwrap();
    for (k, c) in clients.iter_mut().enumerate() {
        let mut last: Option<u64> = None;
        let code = loop {
            match c.read_frame() {
                Some((1, payload)) => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).expect("whole frames only");
                    let i = v["data"]["i"].as_u64().unwrap();
                    assert!(last.is_none_or(|l| i == l + 1), "client {k}: in order, no gap");
                    last = Some(i);
                }
                Some((8, payload)) => break u16::from_be_bytes([payload[0], payload[1]]),
                Some(_) => {}
                None => panic!("client {k}: connection ended without a close frame (or mid-frame)"),
            }
        };
        assert_eq!(code, 1001, "client {k}");
        // Updates were flowing when the shutdown began (they started 100 ms
        // before it): a run in which nobody received one proves nothing.
        assert!(last.is_some(), "client {k} received updates before its close");
    }
    handle.join();
}

/// §10: the 1001 close reason tells each client when to reconnect, spread
/// at random over SHUTDOWN_RECONNECT_SPREAD_MS; a request that arrives
/// while the server drains gets 503 with Retry-After.
#[test]
fn shutdown_spreads_reconnects_and_refuses_with_retry_after() {
    let mut srv = TestServer::start(&[
        ("WS_SHARDS", "1"),
        ("SHUTDOWN_GRACE_MS", "4000"),
        ("SHUTDOWN_RECONNECT_SPREAD_MS", "3000"),
    ]);
    let mut clients: Vec<Raw> = (0..40).map(|i| raw_authed(srv.addr, &format!("r{i}"))).collect();
    // A connection accepted but still sending its request head when the
    // shutdown begins (one shard: the /health below is served after it).
    let mut late = std::net::TcpStream::connect(srv.addr).unwrap();
    late.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    std::io::Write::write_all(&mut late, b"GET /ws HTTP/1.1\r\n").unwrap();
    assert_eq!(get(srv.addr, "/health/live").0, 200);
    let handle = srv.handle.take().unwrap();
    handle.shutdown();
    let mut delays = std::collections::BTreeSet::new();
    for (k, c) in clients.iter_mut().enumerate() {
        let payload = loop {
            match c.read_frame() {
                Some((8, payload)) => break payload,
                Some(_) => {}
                None => panic!("client {k}: no close frame"),
            }
        };
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
        let reason: serde_json::Value = serde_json::from_slice(&payload[2..]).expect("the reason is JSON");
        assert_eq!(reason["reconnect"], true, "{reason}");
        let after = reason["retryAfterMs"].as_u64().expect("retryAfterMs");
        assert!(after < 3000, "within the spread: {after}");
        delays.insert(after);
    }
    assert!(delays.len() > 1, "spread at random, not one value for all: {delays:?}");
    // Still draining (no client answered its close): the late request is refused.
    let rest = upgrade_request("").replacen("GET /ws HTTP/1.1\r\n", "", 1);
    std::io::Write::write_all(&mut late, rest.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = std::io::Read::read_to_string(&mut late, &mut response);
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    let retry: u64 = response
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .expect("Retry-After header")
        .trim()
        .parse()
        .unwrap();
    assert!(retry <= 3, "seconds, within the spread: {retry}");
    drop(clients);
    handle.join();
}

/// A second instance on a port in use is refused unless `WS_SHARE_PORT` is
/// set. With it the two share the port, and once the first has shut down the
/// second takes every new connection: a restart that refuses nobody.
#[test]
fn a_restart_on_the_same_port_is_not_refused_for_the_old_instances_closing_connections() {
    let mut old = TestServer::start(&[]);
    let port = old.addr.port().to_string();
    // Clients that stay open and never answer the close: the old instance's
    // side of each is left bound to the port (FIN_WAIT2) after it exits.
    let held: Vec<_> = (0..5).map(|i| authed(old.addr, &format!("held{i}"))).collect();
    let handle = old.handle.take().unwrap();
    handle.shutdown();
    handle.join();
    let new = TestServer::try_start(&[("WEBSOCKET_SERVICE_PORT", &port)])
        .unwrap_or_else(|e| panic!("restart on the old instance's port refused: {e}"));
    let mut ws = authed(new.addr, "after");
    subscribe(&mut ws, "prices");
    drop(held);
}

#[test]
fn a_port_in_use_is_refused_unless_shared_and_the_sharer_outlives_the_old_instance() {
    let mut old = TestServer::start(&[]);
    let port = old.addr.port().to_string();
    let refused = match TestServer::try_start(&[("WEBSOCKET_SERVICE_PORT", &port)]) {
        Ok(_) => panic!("a second instance started on a port in use"),
        Err(e) => e,
    };
    assert!(refused.contains("another process is listening") && refused.contains("WS_SHARE_PORT"), "{refused}");
    // The refused start left the first instance serving.
    let mut ws = authed(old.addr, "first");
    subscribe(&mut ws, "prices");
    drop(ws);

    let new = TestServer::start(&[("WEBSOCKET_SERVICE_PORT", &port), ("WS_SHARE_PORT", "true")]);
    assert_eq!(new.addr, old.addr);
    let handle = old.handle.take().unwrap();
    handle.shutdown();
    handle.join();
    // Every connection now lands on the new instance (the old one's
    // listeners are closed, so none is refused).
    for i in 0..20 {
        let mut ws = authed(new.addr, &format!("after{i}"));
        subscribe(&mut ws, "prices");
    }
    let (status, body) = get(new.addr, "/health/live");
    assert_eq!(status, 200, "{body}");
}
