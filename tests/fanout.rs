//! The fan-out engine through its publish entry point (PROTOCOL.md §5, §7
//! slow consumers): many connections over several shards, real sockets.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;
use moonx_ws::protocol::message::Channel;
use moonx_ws::shard::inbox::Route;
use serde_json::json;

#[test]
fn every_subscriber_on_every_shard_gets_identical_bytes_in_order() {
    let srv = TestServer::start(&[("WS_SHARDS", "2")]);
    let mut subs: Vec<Ws> = (0..24).map(|i| authed(srv.addr, &format!("p{i}"))).collect();
    for ws in subs.iter_mut() {
        subscribe(ws, "prices");
    }
    let mut authed_only: Vec<Ws> = (0..6).map(|i| authed(srv.addr, &format!("q{i}"))).collect();
    let mut anonymous: Vec<Ws> = (0..6).map(|_| connect(srv.addr)).collect();
    for ws in anonymous.iter_mut() {
        recv(ws);
    }
    let shards = get_json(srv.addr, "/connections")["shards"].clone();
    for s in shards.as_array().unwrap() {
        assert!(s["connections"].as_u64().unwrap() > 0, "connections on every shard: {shards}");
    }

    let publisher = srv.handle().publisher();
    let n = 200;
    for i in 0..n {
        let data = format!(r#"{{"token":"ETH","chainId":8453,"price":"{i}.5","extra":{{"kept":[1,2]}}}}"#);
        publisher.publish_data(Route::Prices, 1_700_000_000_000 + i, data.as_bytes());
    }
    let mut reference: Option<Vec<String>> = None;
    for ws in subs.iter_mut() {
        let got: Vec<String> = (0..n).map(|_| recv_text(ws)).collect();
        for (i, text) in got.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["type"], "price_update");
            assert_eq!(v["data"]["price"], format!("{i}.5"), "in publish order");
            assert!(text.ends_with(&format!(
                r#""data":{{"token":"ETH","chainId":8453,"price":"{i}.5","extra":{{"kept":[1,2]}}}}}}"#
            )));
        }
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_eq!(r, &got, "identical bytes for every subscriber"),
        }
    }
    for ws in authed_only.iter_mut().chain(anonymous.iter_mut()) {
        send(ws, json!({"id":"after","type":"ping"}));
        let next = recv(ws);
        assert_eq!(next["type"], "pong", "non-subscribers got nothing before: {next}");
    }
    assert_eq!(metric(srv.addr, "moonx_ws_deliveries_total"), (24 * n) as f64);
}

#[test]
fn private_updates_never_reach_another_user() {
    let srv = TestServer::start(&[("WS_SHARDS", "2")]);
    let users = ["alice", "bob", "carol"];
    let mut conns: Vec<(usize, Ws)> = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for _ in 0..3 {
            let mut ws = authed(srv.addr, user);
            for ch in ["orders", "portfolio", "trades", "prices"] {
                subscribe(&mut ws, ch);
            }
            conns.push((u, ws));
        }
    }
    let publisher = srv.handle().publisher();
    let per_user = 100;
    for i in 0..per_user {
        for (u, user) in users.iter().enumerate() {
            let channel = [Channel::Orders, Channel::Portfolio, Channel::Trades][i % 3];
            let data = format!(r#"{{"userId":"{user}","seq":{i},"owner":{u}}}"#);
            publisher.publish_data(Route::User { channel, user: (*user).into() }, 0, data.as_bytes());
        }
    }
    for (u, ws) in conns.iter_mut() {
        for i in 0..per_user {
            let m = recv(ws);
            assert_eq!(m["data"]["owner"], *u, "a private update crossed users: {m}");
            assert_eq!(m["data"]["seq"], i);
            let want = ["order_update", "portfolio_update", "trade_update"][i % 3];
            assert_eq!(m["type"], want);
        }
        send(ws, json!({"type":"ping"}));
        assert_eq!(recv(ws)["type"], "pong", "and nothing more");
    }
}

#[test]
fn slow_consumer_is_closed_4009_and_others_keep_receiving() {
    let srv = TestServer::start(&[("WS_SHARDS", "1"), ("WS_MAX_BUFFERED_BYTES", "262144")]);
    // The slow one: authenticated, subscribed, then never reads again.
    let mut slow = raw_authed(srv.addr, "slow");
    slow.send_text(r#"{"type":"subscribe","data":{"channel":"prices"}}"#);
    assert_eq!(slow.recv()["type"], "subscribed");
    slow.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bystander = authed(srv.addr, "fast");
    subscribe(&mut bystander, "prices");

    let total: i64 = 2000; // 30 MB: far past what socket buffers and the limit hold
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let seen = progress.clone();
    let reader = std::thread::spawn(move || {
        for i in 0..total {
            let m = recv(&mut bystander);
            assert_eq!(m["data"]["i"], i, "bystander sees every update in order");
            seen.store(i + 1, std::sync::atomic::Ordering::Release);
        }
        bystander
    });
    let publisher = srv.handle().publisher();
    let pad = "x".repeat(15_000);
    for i in 0..total {
        // Publish at the pace the bystander reads (at most 8 frames ahead),
        // so only the one that stopped reading falls behind.
        while i - progress.load(std::sync::atomic::Ordering::Acquire) > 8 {
            std::thread::yield_now();
        }
        publisher.publish_data(
            Route::Prices,
            0,
            // A market per update: nothing to conflate, so the backlog
            // passes the limit (PROTOCOL.md §7).
            format!(r#"{{"token":"T{i}","chainId":1,"i":{i},"pad":"{pad}"}}"#).as_bytes(),
        );
    }
    let _bystander = reader.join().expect("bystander received everything");
    // Now drain the slow one: whole frames, then close 4009, then EOF.
    let (last_i, code) = drain_numbered_until_close(&mut slow);
    assert_eq!(code, 4009);
    assert!(last_i < total - 1, "the backlog was dropped");
    let mut rest = Vec::new();
    let _ = slow.s.read_to_end(&mut rest);
    assert!(metric(srv.addr, "moonx_ws_slow_consumer_closes_total") >= 1.0);
}
