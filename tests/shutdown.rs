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
        let mut last = None;
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
    }
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
