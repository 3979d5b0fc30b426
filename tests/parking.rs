//! The shard's poll ring and parked connections (docs/tuning.md, "Reading
//! and idle connections"): every plain socket is watched by the ring, and an
//! idle connection gives up its task and keeps its watch, and must behave
//! exactly as before: updates, requests, pings, deadlines, slow-consumer
//! closes, peer closes and shutdown, over real sockets.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use moonx_ws::protocol::message::Channel;
use moonx_ws::shard::inbox::Route;
use serde_json::json;

/// Parking after 1 ms idle: connections park on the next tick (≤ 250 ms).
const PARK_FAST: (&str, &str) = ("WS_PARK_IDLE_MS", "1");

/// Waits (bounded) until `metric` reaches `want`; returns what it read last.
fn wait_metric(addr: SocketAddr, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(addr, name);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_metric_down(addr: SocketAddr, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(addr, name);
        if v <= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn price(i: usize) -> String {
    format!(r#"{{"token":"ETH","chainId":1,"i":{i}}}"#)
}

#[test]
fn parked_connections_receive_updates_and_answer_requests() {
    let srv = TestServer::start(&[("WS_SHARDS", "1"), PARK_FAST]);
    let n = 20;
    let mut clients: Vec<Ws> = (0..n).map(|i| authed(srv.addr, &format!("pk{i}"))).collect();
    for ws in clients.iter_mut() {
        subscribe(ws, "prices");
    }
    assert_eq!(wait_metric(srv.addr, "moonx_ws_connections_parked", n as f64), n as f64, "all idle: parked");
    let unparks_before = metric(srv.addr, "moonx_ws_unparks_total");

    // Price updates reach parked sockets directly; nobody needs a task.
    let publisher = srv.handle().publisher();
    for i in 0..50 {
        publisher.publish_data(Route::Prices, 0, price(i).as_bytes());
    }
    for ws in clients.iter_mut() {
        for i in 0..50 {
            let m = recv(ws);
            assert_eq!(m["type"], "price_update");
            assert_eq!(m["data"]["i"], i, "in order, none missing");
        }
    }
    assert_eq!(metric(srv.addr, "moonx_ws_unparks_total"), unparks_before, "fan-out writes do not unpark");

    // Input resumes the connection: requests are answered as before.
    for (i, ws) in clients.iter_mut().enumerate() {
        send(ws, json!({"id": format!("r{i}"), "type": "ping"}));
        let pong = recv(ws);
        assert_eq!(pong["type"], "pong");
        assert_eq!(pong["data"]["requestId"], format!("r{i}"));
        send(ws, json!({"type":"subscribe","data":{"channel":"orders"}}));
        assert_eq!(recv(ws)["type"], "subscribed");
    }
    assert!(metric(srv.addr, "moonx_ws_unparks_total") >= unparks_before + n as f64);

    // Parked again, private updates still route to their user only.
    assert_eq!(wait_metric(srv.addr, "moonx_ws_connections_parked", n as f64), n as f64, "idle again: parked");
    assert!(metric(srv.addr, "moonx_ws_parks_total") >= 2.0 * n as f64);
    for i in 0..n {
        let data = format!(r#"{{"userId":"pk{i}","orderId":"o{i}"}}"#);
        publisher.publish_data(
            Route::User { channel: Channel::Orders, user: format!("pk{i}").into() },
            0,
            data.as_bytes(),
        );
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let m = recv(ws);
        assert_eq!(m["type"], "order_update");
        assert_eq!(m["data"]["orderId"], format!("o{i}"), "each user gets their own order");
    }
}

#[test]
fn a_parked_connection_closed_by_its_peer_is_released() {
    let srv = TestServer::start(&[("WS_SHARDS", "1"), PARK_FAST]);
    let mut polite = authed(srv.addr, "polite");
    subscribe(&mut polite, "prices");
    let rude = raw_authed(srv.addr, "rude");
    let mut bystander = authed(srv.addr, "bystander");
    subscribe(&mut bystander, "prices");
    assert_eq!(wait_metric(srv.addr, "moonx_ws_connections_parked", 3.0), 3.0);

    // A close frame: echoed with the same code, then the socket is closed.
    polite.close(Some(tungstenite::protocol::CloseFrame { code: 1000.into(), reason: "".into() })).unwrap();
    let code = loop {
        match polite.read() {
            Ok(tungstenite::Message::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("no close echo: {e}"),
        }
    };
    assert_eq!(code, 1000);
    // A dropped socket (no close frame): the hang-up resumes and ends it.
    drop(rude);
    assert_eq!(wait_metric_down(srv.addr, "moonx_ws_connections_active", 1.0), 1.0, "both released");
    assert_eq!(wait_metric_down(srv.addr, "moonx_ws_connections_parked", 1.0), 1.0, "the bystander stays parked");
    srv.handle().publisher().publish_data(Route::Prices, 0, price(7).as_bytes());
    assert_eq!(recv(&mut bystander)["data"]["i"], 7, "others undisturbed");
}

#[test]
fn parked_connections_are_pinged_and_silent_ones_dropped() {
    let srv =
        TestServer::start(&[("WS_SHARDS", "1"), PARK_FAST, ("WS_PING_INTERVAL", "600"), ("WS_PONG_TIMEOUT", "400")]);
    let mut live = authed(srv.addr, "live");
    let mut silent = raw_authed(srv.addr, "silent");
    assert_eq!(wait_metric(srv.addr, "moonx_ws_connections_parked", 2.0), 2.0);
    // The ping deadline resumes each; tungstenite answers on read.
    let mut pings = 0;
    while pings < 2 {
        if let tungstenite::Message::Ping(_) = live.read().unwrap() {
            pings += 1;
            live.flush().unwrap();
        }
    }
    // The silent one sees the ping, does not answer, and is dropped.
    assert_eq!(silent.read_frame().map(|f| f.0), Some(9), "a ping");
    assert!(silent.expect_eof(), "dropped after the pong timeout");
    assert!(metric(srv.addr, "moonx_ws_pong_timeouts_total") >= 1.0);
    send(&mut live, json!({"type":"ping"}));
    assert_eq!(recv(&mut live)["type"], "pong", "the live one is still served");
    assert!(metric(srv.addr, "moonx_ws_unparks_total") >= 3.0);
}

#[test]
fn an_unauthenticated_parked_connection_still_times_out() {
    let srv = TestServer::start(&[("WS_SHARDS", "1"), PARK_FAST, ("AUTH_TIMEOUT_MS", "700")]);
    let mut ws = connect(srv.addr);
    assert_eq!(recv(&mut ws)["type"], "auth_required");
    assert_eq!(wait_metric(srv.addr, "moonx_ws_connections_parked", 1.0), 1.0);
    let failed = recv(&mut ws);
    assert_eq!(failed["type"], "auth_failed", "{failed}");
    assert_eq!(expect_close(&mut ws), 4002);
}

#[test]
fn a_parked_slow_consumer_is_closed_4009_mid_stream() {
    let srv = TestServer::start(&[("WS_SHARDS", "1"), PARK_FAST, ("WS_MAX_BUFFERED_BYTES", "262144")]);
    let mut slow = raw_authed(srv.addr, "slow");
    slow.send_text(r#"{"type":"subscribe","data":{"channel":"prices"}}"#);
    assert_eq!(slow.recv()["type"], "subscribed");
    slow.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(wait_metric(srv.addr, "moonx_ws_connections_parked", 1.0), 1.0);
    // Far more than the socket buffers and the limit hold, never read: the
    // fan-out's writes stop short, the connection is resumed, then flagged.
    let publisher = srv.handle().publisher();
    let pad = "x".repeat(15_000);
    let total = 600;
    for i in 0..total {
        publisher.publish_data(
            Route::Prices,
            0,
            // A market per update: nothing to conflate, so the backlog
            // passes the limit (PROTOCOL.md §7).
            format!(r#"{{"token":"T{i}","chainId":1,"i":{i},"pad":"{pad}"}}"#).as_bytes(),
        );
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (last_i, code) = drain_numbered_until_close(&mut slow);
    assert_eq!(code, 4009);
    assert!(last_i < total - 1, "the backlog was dropped");
    assert!(metric(srv.addr, "moonx_ws_slow_consumer_closes_total") >= 1.0);
}

#[test]
fn shutdown_resumes_parked_connections_and_closes_them_1001() {
    let mut srv = TestServer::start(&[("WS_SHARDS", "2"), PARK_FAST]);
    let mut clients: Vec<Ws> = (0..16).map(|i| authed(srv.addr, &format!("sd{i}"))).collect();
    assert_eq!(wait_metric(srv.addr, "moonx_ws_connections_parked", 16.0), 16.0);
    let handle = srv.handle.take().unwrap();
    handle.shutdown();
    for ws in clients.iter_mut() {
        assert_eq!(expect_close(ws), 1001);
    }
    handle.join();
}

/// Sockets are watched on the shard's poll ring whether or not idle ones
/// park: a message that arrives in pieces is read whole (each piece fires
/// the watch), and a connection the server ends is let go at once (the
/// kernel holds a watched socket open until its watch is withdrawn).
#[test]
fn a_watched_connection_is_read_in_pieces_and_released_when_the_server_ends_it() {
    use std::io::Write;
    let srv = TestServer::start(&[("WS_SHARDS", "1"), ("WS_PARK_IDLE_MS", "0")]);
    let mut raw = raw_authed(srv.addr, "pieces");
    let frame = Raw::frame(true, 1, json!({"id":"p","type":"ping"}).to_string().as_bytes());
    for part in frame.chunks(frame.len() / 3 + 1) {
        raw.s.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(raw.recv()["type"], "pong");
    // A binary frame is refused with 1003; the client's close frame answers.
    raw.send_frame(true, 2, b"x");
    assert_eq!(raw.expect_close(), 1003);
    raw.send_frame(true, 8, &1000u16.to_be_bytes());
    assert!(raw.expect_eof(), "the server closed the socket");
    assert_eq!(wait_metric_down(srv.addr, "moonx_ws_connections_active", 0.0), 0.0);
    assert_eq!(metric(srv.addr, "moonx_ws_watch_failures_total"), 0.0);
    assert_eq!(metric(srv.addr, "moonx_ws_parks_total"), 0.0, "parking is off");
}
