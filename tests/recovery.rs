//! PROTOCOL.md §12: resuming a private channel from a Kafka position, on
//! another instance than the one the client was on, through the real Kafka
//! protocol (librdkafka's mock cluster) and real sockets.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::kafka::{producer, Kafka};
use common::*;
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::{json, Value};

fn server(kafka: &Kafka, extra: &[(&str, &str)]) -> TestServer {
    let bootstrap = kafka.bootstrap();
    let mut env = vec![("KAFKA_BROKERS", bootstrap.as_str()), ("WS_SHARDS", "2")];
    env.extend_from_slice(extra);
    let srv = TestServer::start(&env);
    srv.wait_ready();
    srv
}

fn order(user: &str, n: u32) -> Vec<u8> {
    format!(r#"{{"userId":"{user}","orderId":"o-{n}","n":{n}}}"#).into_bytes()
}

/// Reads `order_update`s until one with `n == last`; returns (n, pos) of each.
fn orders_until(ws: &mut Ws, last: u64) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    loop {
        let v = recv(ws);
        assert_eq!(v["type"], "order_update", "{v}");
        let n = v["data"]["n"].as_u64().unwrap();
        got.push((n, v["pos"].as_str().unwrap().to_owned()));
        if n == last {
            return got;
        }
    }
}

fn resume(addr: SocketAddr, user: &str, since: &str) -> (Ws, Value) {
    let mut ws = authed(addr, user);
    send(&mut ws, json!({"id": "r1", "type": "subscribe", "data": {"channel": "orders", "since": since}}));
    let reply = recv(&mut ws);
    (ws, reply)
}

/// Waits until each of the instance's two shards took `n` updates from
/// Kafka. A replay ends where the shard's feed stood when the resume began
/// (the rest reaches the client live), so a test that counts what is
/// replayed resumes only once the feed has everything produced.
fn taken(addr: SocketAddr, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(addr, "moonx_ws_updates_processed_total") < (2 * n) as f64 {
        assert!(std::time::Instant::now() < deadline, "the shards never took {n} updates");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn offset(pos: &str) -> i64 {
    pos.split_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn a_resume_on_another_instance_replays_exactly_what_was_missed_then_goes_live() {
    let kafka = Kafka::new(2);
    let a = server(&kafka, &[]);
    let b = server(&kafka, &[]);
    let mut ws = authed(a.addr, "alice");
    subscribe(&mut ws, "orders");
    for n in 1..=3 {
        kafka.produce("order.updates", Some(1), &order("bob", 100 + n));
        kafka.produce("order.updates", Some(1), &order("alice", n));
    }
    kafka.flush();
    let seen = orders_until(&mut ws, 3);
    let last = seen.last().unwrap().1.clone();
    drop(ws);

    // Missed while away: five of alice's, with bob's between them.
    for n in 4..=8 {
        kafka.produce("order.updates", Some(1), &order("alice", n));
        kafka.produce("order.updates", Some(1), &order("bob", 100 + n));
    }
    kafka.flush();
    taken(b.addr, 16);
    let (mut ws, reply) = resume(b.addr, "alice", &last);
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["data"]["channel"], "orders");
    assert_eq!(reply["data"]["requestId"], "r1");
    assert_eq!(reply["data"]["recovered"], true, "{reply}");
    assert_eq!(reply["data"]["missed"], 5, "{reply}");
    let replayed = orders_until(&mut ws, 8);
    assert_eq!(replayed.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [4, 5, 6, 7, 8], "exactly the missed, in order");
    assert!(replayed.iter().all(|(_, pos)| pos.starts_with("1:") && offset(pos) > offset(&last)));
    // Then live.
    kafka.produce("order.updates", Some(1), &order("bob", 109));
    kafka.produce("order.updates", Some(1), &order("alice", 9));
    kafka.flush();
    assert_eq!(orders_until(&mut ws, 9).iter().map(|(n, _)| *n).collect::<Vec<_>>(), [9], "bob's never reach alice");
    assert_eq!(metric(b.addr, "moonx_ws_recoveries_total{outcome=\"recovered\"}"), 1.0);
    assert_eq!(metric(b.addr, "moonx_ws_recovery_replayed_total"), 5.0);
    assert!(metric(b.addr, "moonx_ws_recovery_read_total") >= 10.0, "alice's and bob's were read");
}

#[test]
fn production_through_the_seam_loses_and_doubles_nothing() {
    let kafka = Kafka::new(2);
    let a = server(&kafka, &[]);
    let b = server(&kafka, &[]);
    let mut ws = authed(a.addr, "carol");
    subscribe(&mut ws, "orders");
    kafka.produce("order.updates", Some(0), &order("carol", 1));
    kafka.flush();
    let last = orders_until(&mut ws, 1)[0].1.clone();
    drop(ws);

    const LAST: u32 = 400;
    let bootstrap = kafka.bootstrap();
    let feed = std::thread::spawn(move || {
        let p = producer(&bootstrap, &[("linger.ms", "0")]);
        for n in 2..=LAST {
            for (user, n) in [("carol", n), ("dave", 1000 + n)] {
                let value = order(user, n);
                let rec = BaseRecord::<(), [u8]>::to("order.updates").partition(0).payload(&value[..]);
                p.send(rec).expect("queued");
            }
            p.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_millis(2));
        }
        p.flush(Duration::from_secs(30)).unwrap();
    });
    // Resume while the feed runs (some missed, some live, some both).
    std::thread::sleep(Duration::from_millis(150));
    let (mut ws, reply) = resume(b.addr, "carol", &last);
    assert_eq!(reply["data"]["recovered"], true, "{reply}");
    feed.join().unwrap();
    let got = orders_until(&mut ws, u64::from(LAST));
    let ns: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(ns, (2..=u64::from(LAST)).collect::<Vec<_>>(), "every update once, in order: {got:?} {reply}");
    let missed = reply["data"]["missed"].as_u64().unwrap();
    assert!(missed < u64::from(LAST) - 1, "the feed was still running at the resume ({missed} missed)");
}

#[test]
fn a_resume_that_cannot_be_complete_says_so_and_goes_live() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, &[("WS_RECOVERY_MAX_MESSAGES", "3")]);
    for n in 1..=5 {
        kafka.produce("order.updates", Some(1), &order("erin", n));
    }
    kafka.flush();
    taken(srv.addr, 5);
    // More than WS_RECOVERY_MAX_MESSAGES of erin's after 1:0.
    let (mut ws, reply) = resume(srv.addr, "erin", "1:0");
    assert_eq!((reply["data"]["recovered"].clone(), reply["data"]["missed"].clone()), (json!(false), json!(0)));
    kafka.produce("order.updates", Some(1), &order("erin", 6));
    kafka.flush();
    // Live from the subscribe on: what this instance's feed takes from
    // then (it may still be behind the resume point), never at or before
    // the client's position, never twice.
    let live = orders_until(&mut ws, 6);
    assert!(live.iter().all(|(_, pos)| offset(pos) > 0), "{live:?}");
    assert!(live.windows(2).all(|w| offset(&w[0].1) < offset(&w[1].1)), "{live:?}");
    // Beyond the partition's end (a recreated topic).
    let (_ws, reply) = resume(srv.addr, "erin", "1:1000000");
    assert_eq!(reply["data"]["recovered"], false, "{reply}");
    // Up to date: nothing to replay is a complete replay.
    let (_ws, reply) = resume(srv.addr, "erin", "1:5");
    assert_eq!((reply["data"]["recovered"].clone(), reply["data"]["missed"].clone()), (json!(true), json!(0)));
    assert_eq!(metric(srv.addr, "moonx_ws_recoveries_total{outcome=\"too_many\"}"), 1.0);
    assert_eq!(metric(srv.addr, "moonx_ws_recoveries_total{outcome=\"beyond_end\"}"), 1.0);
}

#[test]
fn a_position_older_than_the_retained_log_is_not_recovered() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, &[]);
    kafka.produce("order.updates", Some(0), &order("frank", 1));
    // The mock broker keeps about 5 MB per partition: push offset 0 out.
    let pad = "x".repeat(100_000);
    for _ in 0..70 {
        kafka.produce("order.updates", Some(0), format!(r#"{{"userId":"filler","pad":"{pad}"}}"#).as_bytes());
        kafka.flush();
    }
    let (mut ws, reply) = resume(srv.addr, "frank", "0:0");
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["data"]["recovered"], false, "offset 1 is gone: {reply}");
    kafka.produce("order.updates", Some(0), &order("frank", 2));
    kafka.flush();
    assert_eq!(orders_until(&mut ws, 2).iter().map(|(n, _)| *n).collect::<Vec<_>>(), [2]);
    assert_eq!(metric(srv.addr, "moonx_ws_recoveries_total{outcome=\"trimmed\"}"), 1.0);
}

#[test]
fn a_malformed_or_foreign_since_subscribes_nothing_and_public_channels_ignore_it() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, &[]);
    let mut ws = authed(srv.addr, "gina");
    for (i, since) in [json!("1"), json!("-1:4"), json!("1:x"), json!(12), json!("7:0")].into_iter().enumerate() {
        send(
            &mut ws,
            json!({"id": format!("m{i}"), "type": "subscribe", "data": {"channel": "trades", "since": since}}),
        );
        let reply = recv(&mut ws);
        assert_eq!(reply["type"], "error", "{since}: {reply}");
        assert_eq!(reply["data"]["code"], "invalid_message", "{since}: {reply}");
        assert_eq!(reply["data"]["requestId"], format!("m{i}"));
    }
    assert_eq!(metric(srv.addr, "moonx_ws_subscriptions{channel=\"trades\"}"), 0.0, "nothing subscribed");
    for channel in ["prices", "prices:1:ETH"] {
        send(&mut ws, json!({"id": "p", "type": "subscribe", "data": {"channel": channel, "since": "nonsense"}}));
        let reply = recv(&mut ws);
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert!(reply["data"].get("recovered").is_none(), "{reply}");
    }
    send(&mut ws, json!({"type": "subscribe", "data": {"channels": ["orders"], "since": "1:2"}}));
    assert_eq!(recv(&mut ws)["data"]["code"], "invalid_message", "since only with a single channel");
}

#[test]
fn a_resume_with_nothing_missed_on_an_empty_topic_is_complete_and_unsubscribe_ends_it() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, &[]);
    // Offset 0 is the first message; "0:-" is not a position, "1:0" on an
    // empty partition is beyond its end.
    kafka.produce("portfolio.updates", Some(0), br#"{"userId":"hal","v":1}"#);
    kafka.flush();
    let mut ws = authed(srv.addr, "hal");
    send(&mut ws, json!({"id": "r", "type": "subscribe", "data": {"channel": "portfolio", "since": "0:0"}}));
    let reply = recv(&mut ws);
    assert_eq!((reply["data"]["recovered"].clone(), reply["data"]["missed"].clone()), (json!(true), json!(0)));
    send(&mut ws, json!({"id": "u", "type": "unsubscribe", "data": {"channel": "portfolio"}}));
    assert_eq!(recv(&mut ws)["type"], "unsubscribed");
    assert_eq!(metric(srv.addr, "moonx_ws_subscriptions{channel=\"portfolio\"}"), 0.0);
}

#[test]
fn what_a_scan_read_serves_later_resumes_and_no_message_is_read_twice() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, &[]);
    // Partition 1: ivy's n at offsets 0, 2, 4, 6; jay's at 1, 3, 5, 7.
    for n in 1..=4 {
        kafka.produce("order.updates", Some(1), &order("ivy", n));
        kafka.produce("order.updates", Some(1), &order("jay", n));
    }
    kafka.flush();
    taken(srv.addr, 8);
    let rounds: [(&str, &str, &[u64], f64, f64); 3] = [
        // A scan reads 3..8.
        ("ivy", "1:2", &[3, 4], 5.0, 1.0),
        // All of it in what that scan read: no scan, no read.
        ("jay", "1:2", &[2, 3, 4], 5.0, 1.0),
        // Reads 1 and 2, then what it has for 3..8.
        ("ivy", "1:0", &[2, 3, 4], 7.0, 2.0),
    ];
    let check = |user: &str, since: &str, expected: &[u64], read: f64, scans: f64| {
        let (mut ws, reply) = resume(srv.addr, user, since);
        assert_eq!(reply["data"]["recovered"], true, "{user} since {since}: {reply}");
        assert_eq!(reply["data"]["missed"], expected.len(), "{user} since {since}: {reply}");
        let got = orders_until(&mut ws, *expected.last().unwrap());
        assert_eq!(got.iter().map(|(n, _)| *n).collect::<Vec<_>>(), expected, "{user} since {since}");
        assert_eq!(metric(srv.addr, "moonx_ws_recovery_read_total"), read, "{user} since {since}: messages read");
        assert_eq!(metric(srv.addr, "moonx_ws_recovery_scans_total"), scans, "{user} since {since}: scans");
    };
    for (user, since, expected, read, scans) in rounds {
        check(user, since, expected, read, scans);
    }
    assert!(metric(srv.addr, "moonx_ws_recovery_window_bytes") > 0.0, "what was read is kept");
    assert_eq!(metric(srv.addr, "moonx_ws_recovery_reread_total"), 0.0);
    // The partition grows: only 8 and 9 are read for jay's whole history.
    kafka.produce("order.updates", Some(1), &order("ivy", 5));
    kafka.produce("order.updates", Some(1), &order("jay", 5));
    kafka.flush();
    taken(srv.addr, 10);
    check("jay", "1:0", &[1, 2, 3, 4, 5], 9.0, 3.0);
}

#[test]
fn with_no_memory_for_windows_each_resume_reads_its_own_range() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, &[("WS_RECOVERY_WINDOW_BYTES", "0")]);
    for n in 1..=4 {
        kafka.produce("order.updates", Some(1), &order("ivy", n));
        kafka.produce("order.updates", Some(1), &order("jay", n));
    }
    kafka.flush();
    taken(srv.addr, 8);
    for (round, user) in ["ivy", "jay", "ivy"].into_iter().enumerate() {
        let (mut ws, reply) = resume(srv.addr, user, "1:0");
        assert_eq!(reply["data"]["recovered"], true, "round {round}: {reply}");
        let expected: Vec<u64> = if user == "ivy" { vec![2, 3, 4] } else { vec![1, 2, 3, 4] };
        assert_eq!(reply["data"]["missed"], expected.len(), "round {round}: {reply}");
        let got = orders_until(&mut ws, 4);
        assert_eq!(got.iter().map(|(n, _)| *n).collect::<Vec<_>>(), expected, "round {round}");
    }
    assert_eq!(metric(srv.addr, "moonx_ws_recovery_scans_total"), 3.0, "one scan each, one after the other");
    assert_eq!(metric(srv.addr, "moonx_ws_recovery_window_bytes"), 0.0);
    assert_eq!(metric(srv.addr, "moonx_ws_recovery_reread_total"), 14.0, "1..8 read again twice, and counted");
}

#[test]
fn unsubscribing_while_the_replay_runs_answers_the_resume_then_unsubscribes() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, &[]);
    for n in 1..=3 {
        kafka.produce("order.updates", Some(1), &order("kim", n));
    }
    kafka.flush();
    taken(srv.addr, 3);
    let mut ws = authed(srv.addr, "kim");
    // Both frames at once: a replay cannot answer before the unsubscribe
    // (its requests gather 200 ms before a scan starts).
    send(&mut ws, json!({"id": "r", "type": "subscribe", "data": {"channel": "orders", "since": "1:0"}}));
    send(&mut ws, json!({"id": "u", "type": "unsubscribe", "data": {"channel": "orders"}}));
    let reply = recv(&mut ws);
    assert_eq!(
        (reply["type"].clone(), reply["data"]["recovered"].clone()),
        (json!("subscribed"), json!(false)),
        "{reply}"
    );
    assert_eq!(reply["data"]["missed"], 0);
    assert_eq!(recv(&mut ws)["type"], "unsubscribed");
    assert_eq!(metric(srv.addr, "moonx_ws_recoveries_total{outcome=\"cancelled\"}"), 1.0);
    assert_eq!(metric(srv.addr, "moonx_ws_subscriptions{channel=\"orders\"}"), 0.0);
    // The replay still runs and its result comes back to no one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(srv.addr, "moonx_ws_recovery_read_total") < 2.0 {
        assert!(std::time::Instant::now() < deadline, "the scan never read");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(&mut ws, json!({"id": "p", "type": "ping"}));
    let next = recv(&mut ws);
    assert_eq!(next["type"], "pong", "nothing of the cancelled replay: {next}");
    assert_eq!(metric(srv.addr, "moonx_ws_recoveries_total{outcome=\"recovered\"}"), 0.0);
}
