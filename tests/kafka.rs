//! PROTOCOL.md §6: Kafka -> shards -> subscribers through the real Kafka
//! protocol (librdkafka's mock cluster, owned by each test) and real sockets.

mod common;

use std::time::Duration;

use common::kafka::Kafka;
use common::*;
use serde_json::json;

fn server(kafka: &Kafka, shards: &str) -> TestServer {
    let srv = TestServer::start(&[("KAFKA_BROKERS", &kafka.bootstrap()), ("WS_SHARDS", shards)]);
    srv.wait_ready();
    srv
}

#[test]
fn a_produced_price_reaches_every_subscriber_verbatim() {
    let kafka = Kafka::new(4);
    let srv = server(&kafka, "2");
    let mut subs: Vec<Ws> = (0..12).map(|i| authed(srv.addr, &format!("k{i}"))).collect();
    for ws in subs.iter_mut() {
        subscribe(ws, "prices");
    }
    let shards = get_json(srv.addr, "/connections")["shards"].clone();
    assert!(shards.as_array().unwrap().iter().all(|s| s["connections"].as_u64().unwrap() > 0), "{shards}");
    let value =
        br#"{"token":"ETH","chainId":8453,"price":"2150.45","nested":{"unknown":[true,null,1.5e3]},"s":"\u00e9\"q"}"#;
    kafka.produce("price.updates", None, value);
    kafka.flush();
    for ws in subs.iter_mut() {
        let text = recv_text(ws);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "price_update");
        assert!(v["id"].is_string() && v["timestamp"].is_u64());
        let data_start = text.find(r#""data":"#).unwrap() + 7;
        assert_eq!(&text.as_bytes()[data_start..text.len() - 1], value, "data is the produced value, byte for byte");
    }
    assert_eq!(metric(srv.addr, "moonx_ws_kafka_messages_consumed_total{channel=\"prices\"}"), 1.0);
}

#[test]
fn private_updates_reach_only_their_user() {
    let kafka = Kafka::new(3);
    let srv = server(&kafka, "2");
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let mut conns: Vec<(usize, Ws)> = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for _ in 0..2 {
            let mut ws = authed(srv.addr, user);
            for ch in ["orders", "portfolio", "trades"] {
                subscribe(&mut ws, ch);
            }
            conns.push((u, ws));
        }
    }
    // Bystanders: authenticated but unsubscribed, and not authenticated.
    let mut quiet = authed(srv.addr, "user-0");
    let mut anon = connect(srv.addr);
    recv(&mut anon);
    let per_user = 150; // 8 users x 150 x 3 topics = 3600 messages
    let topics = ["order.updates", "portfolio.updates", "trade.updates"];
    for i in 0..per_user {
        for (u, user) in users.iter().enumerate() {
            let topic = topics[i % 3];
            // userId as a string for some users and as an integer-like string for others.
            let value = json!({"userId": user, "owner": u, "seq": i, "topic": topic}).to_string();
            kafka.produce(topic, Some(0), value.as_bytes());
        }
    }
    kafka.flush();
    for (u, ws) in conns.iter_mut() {
        let mut last_seq_per_topic = std::collections::HashMap::new();
        for _ in 0..per_user {
            let m = recv(ws);
            assert_eq!(m["data"]["owner"], *u, "a private update reached another user: {m}");
            let topic = m["data"]["topic"].as_str().unwrap().to_owned();
            let want_type = match topic.as_str() {
                "order.updates" => "order_update",
                "portfolio.updates" => "portfolio_update",
                _ => "trade_update",
            };
            assert_eq!(m["type"], want_type);
            let seq = m["data"]["seq"].as_i64().unwrap();
            let last = last_seq_per_topic.insert(topic, seq);
            assert!(last.is_none_or(|l| l < seq), "partition order kept");
        }
        send(ws, json!({"type":"ping"}));
        assert_eq!(recv(ws)["type"], "pong", "exactly their own updates");
    }
    for ws in [&mut quiet, &mut anon] {
        send(ws, json!({"type":"ping"}));
        assert_eq!(recv(ws)["type"], "pong", "unsubscribed and unauthenticated receive nothing");
    }
}

#[test]
fn integer_user_ids_match_by_decimal_text() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, "1");
    let mut ws = authed(srv.addr, "12345");
    subscribe(&mut ws, "orders");
    kafka.produce("order.updates", None, br#"{"userId":12345,"orderId":"o1","status":"filled"}"#);
    kafka.flush();
    let m = recv(&mut ws);
    assert_eq!(m["type"], "order_update");
    assert_eq!(m["data"]["orderId"], "o1");
}

#[test]
fn invalid_values_are_counted_and_skipped() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, "1");
    let mut ws = authed(srv.addr, "inv");
    subscribe(&mut ws, "prices");
    subscribe(&mut ws, "orders");
    for bad in [&b"not json"[..], b"[1,2]", b"", b"{\"chainId\":1}", b"{\"token\":\"ETH\",\"chainId\":\"1\"}"] {
        kafka.produce("price.updates", None, bad);
    }
    kafka.produce("order.updates", None, br#"{"status":"filled"}"#);
    kafka.produce("price.updates", None, br#"{"token":"OK","chainId":1}"#);
    kafka.flush();
    let m = recv(&mut ws);
    assert_eq!(m["data"]["token"], "OK", "valid values after invalid ones still arrive");
    let invalid = metric(srv.addr, "moonx_ws_kafka_messages_invalid_total");
    assert_eq!(invalid, 6.0);
    assert_eq!(metric(srv.addr, "moonx_ws_kafka_messages_invalid_total{channel=\"prices\",reason=\"not_json\"}"), 1.0);
    assert_eq!(
        metric(srv.addr, "moonx_ws_kafka_messages_invalid_total{channel=\"orders\",reason=\"missing_routing_fields\"}"),
        1.0
    );
}

#[test]
fn partition_order_holds_over_a_thousand_messages() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, "2");
    let mut subs: Vec<Ws> = (0..4).map(|i| authed(srv.addr, &format!("o{i}"))).collect();
    for ws in subs.iter_mut() {
        subscribe(ws, "prices");
    }
    for i in 0..1000 {
        kafka.produce("price.updates", Some(1), format!(r#"{{"token":"T","chainId":1,"seq":{i}}}"#).as_bytes());
    }
    kafka.flush();
    for ws in subs.iter_mut() {
        for i in 0..1000 {
            assert_eq!(recv(ws)["data"]["seq"], i);
        }
    }
    // librdkafka reports statistics every second: wait (bounded) for them.
    let lag = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        get(srv.addr, "/metrics").1.contains("moonx_ws_kafka_consumer_lag{topic=\"price.updates\",partition=\"1\"} 0")
    });
    assert!(lag, "lag exported per partition, caught up");
    // Recorded where the frames are written: once per update on each shard
    // that holds subscribers (the kernel may have put all four on one).
    let writing_shards =
        (0..2).filter(|i| metric(srv.addr, &format!("moonx_ws_connections_active{{shard=\"{i}\"}}")) > 0.0).count();
    assert_eq!(
        metric(srv.addr, "moonx_ws_kafka_to_socket_latency_seconds_count"),
        1000.0 * writing_shards as f64,
        "1000 updates x each shard that wrote them"
    );
}

#[test]
fn delivery_resumes_after_the_broker_comes_back() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, "2");
    let mut ws = authed(srv.addr, "bk");
    subscribe(&mut ws, "prices");
    kafka.produce("price.updates", None, br#"{"token":"before","chainId":1}"#);
    kafka.flush();
    assert_eq!(recv(&mut ws)["data"]["token"], "before");

    kafka.cluster.broker_down(1).unwrap();
    let degraded = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        let h = get_json(srv.addr, "/health");
        h["services"]["kafka"] == false && h["status"] == "degraded"
    });
    assert!(degraded, "health reports the broker outage");
    // The service keeps serving clients meanwhile.
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong");

    kafka.cluster.broker_up(1).unwrap();
    kafka.produce("price.updates", None, br#"{"token":"after","chainId":1}"#);
    kafka.flush();
    assert_eq!(recv(&mut ws)["data"]["token"], "after", "delivery resumed without a restart");
    let healthy = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        get_json(srv.addr, "/health")["services"]["kafka"] == true
    });
    assert!(healthy);
}

#[test]
fn embedded_mode_demo_feed_reaches_a_subscriber() {
    let srv = TestServer::start(&[("DEMO_FEED", "true"), ("WS_SHARDS", "1")]);
    srv.wait_ready();
    let mut ws = authed(srv.addr, "newcomer");
    subscribe(&mut ws, "prices");
    let m = recv(&mut ws);
    assert_eq!(m["type"], "price_update");
    assert!(m["data"]["token"].is_string() && m["data"]["chainId"].is_number() && m["data"]["price"].is_string());
    let h = get_json(srv.addr, "/health");
    assert_eq!(h["services"]["kafka"], true);
}

#[test]
fn private_updates_survive_a_broker_outage_exactly_once_in_order() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, "2");
    let mut ws = authed(srv.addr, "ledger");
    subscribe(&mut ws, "orders");
    let total = 300u64;
    let produce =
        |i: u64| kafka.produce("order.updates", Some(0), format!(r#"{{"userId":"ledger","seq":{i}}}"#).as_bytes());
    for i in 0..100 {
        produce(i);
    }
    kafka.flush();
    // Broker down mid-stream: the producer buffers, the consumer reconnects.
    kafka.cluster.broker_down(1).unwrap();
    for i in 100..200 {
        produce(i);
    }
    std::thread::sleep(Duration::from_millis(500));
    // Requests failing with a retriable error while it comes back.
    kafka.cluster.broker_up(1).unwrap();
    kafka.cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Fetch,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 3],
    );
    for i in 200..total {
        produce(i);
    }
    kafka.flush();
    for i in 0..total {
        let m = recv(&mut ws);
        assert_eq!(m["data"]["seq"], i, "every private update once, in order");
    }
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong", "and no duplicate after them");
}

/// `moonx_ws_kafka_to_socket_latency_seconds` counts updates written to a
/// socket, not every update a shard took: none while nobody subscribes,
/// then one per delivered update.
#[test]
fn kafka_to_socket_latency_counts_only_updates_that_reached_a_socket() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, "2");
    let count = || metric(srv.addr, "moonx_ws_kafka_to_socket_latency_seconds_count");
    for i in 0..20 {
        kafka.produce("price.updates", None, format!(r#"{{"token":"T","chainId":1,"i":{i}}}"#).as_bytes());
        kafka.produce("order.updates", None, format!(r#"{{"userId":"nobody","i":{i}}}"#).as_bytes());
    }
    kafka.flush();
    let consumed = || metric(srv.addr, "moonx_ws_kafka_messages_consumed_total");
    let started = std::time::Instant::now();
    while consumed() < 40.0 {
        assert!(started.elapsed() < IO_TIMEOUT, "ingest consumed {}", consumed());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count(), 0.0, "nothing was written to a socket");
    let mut ws = authed(srv.addr, "alice");
    subscribe(&mut ws, "prices");
    subscribe(&mut ws, "orders");
    kafka.produce("price.updates", None, br#"{"token":"T","chainId":1,"i":"live"}"#);
    kafka.produce("order.updates", None, br#"{"userId":"alice","i":"live"}"#);
    kafka.flush();
    let mut types = [recv(&mut ws)["type"].clone(), recv(&mut ws)["type"].clone()];
    types.sort_by_key(|t| t.to_string());
    assert_eq!(types, [json!("order_update"), json!("price_update")]);
    // Recorded right after the write (the same sweep step): wait for it.
    let started = std::time::Instant::now();
    while count() < 2.0 && started.elapsed() < IO_TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count(), 2.0, "one sample per update that reached a socket");
}

/// PROTOCOL.md §2: every update carries its Kafka position,
/// `"pos": "<partition>:<offset>"`, beside `data`.
#[test]
fn every_update_carries_its_kafka_position() {
    let kafka = Kafka::new(2);
    let srv = server(&kafka, "1");
    let mut ws = authed(srv.addr, "pos-user");
    subscribe(&mut ws, "prices");
    subscribe(&mut ws, "orders");
    kafka.produce("order.updates", Some(1), br#"{"userId":"other","n":0}"#);
    for n in 1..=3 {
        kafka.produce("order.updates", Some(1), format!(r#"{{"userId":"pos-user","n":{n}}}"#).as_bytes());
    }
    kafka.produce("price.updates", Some(0), br#"{"token":"ETH","chainId":1}"#);
    kafka.flush();
    let mut orders = Vec::new();
    let mut price_pos = None;
    while orders.len() < 3 || price_pos.is_none() {
        let v = recv(&mut ws);
        match v["type"].as_str().unwrap() {
            "order_update" => orders.push(v["pos"].as_str().unwrap().to_owned()),
            "price_update" => price_pos = Some(v["pos"].as_str().unwrap().to_owned()),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(orders, ["1:1", "1:2", "1:3"], "offset 0 was another user's");
    assert_eq!(price_pos.as_deref(), Some("0:0"));
}
