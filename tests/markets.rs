//! PROTOCOL.md §5 and §11: market and chain channels, multi-subscribe,
//! snapshots and `GET /snapshot`, through the real Kafka protocol
//! (librdkafka's mock cluster) and real sockets.

mod common;

use common::kafka::Kafka;
use common::*;
use serde_json::{json, Value};

const USDC: &str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";

fn server(kafka: &Kafka, env: &[(&str, &str)]) -> TestServer {
    let mut all = vec![("KAFKA_BROKERS", kafka.bootstrap())];
    all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let env: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let srv = TestServer::start(&env);
    srv.wait_ready();
    srv
}

/// A price value; `chain` is written as given (a number, or not).
fn price(token: &str, chain: &str, n: u32) -> String {
    format!(r#"{{"token":"{token}","chainId":{chain},"price":"{n}"}}"#)
}

/// Subscribes with `data`; returns the `subscribed` reply.
fn subscribe_with(ws: &mut Ws, data: Value) -> Value {
    send(ws, json!({"id": "s", "type": "subscribe", "data": data}));
    recv(ws)
}

/// The `price` of each update until the pong that ends what was queued
/// before it: everything the connection was sent, in order.
fn prices_until_pong(ws: &mut Ws) -> Vec<String> {
    send(ws, json!({"id": "end", "type": "ping"}));
    let mut got = Vec::new();
    loop {
        let v = recv(ws);
        match v["type"].as_str() {
            Some("pong") => return got,
            Some("price_update") => got.push(v["data"]["price"].as_str().unwrap().to_owned()),
            _ => panic!("unexpected {v}"),
        }
    }
}

/// Reads `n` price updates (for a watcher that knows how many are coming).
fn take_prices(ws: &mut Ws, n: usize) -> Vec<String> {
    (0..n).map(|_| recv_text(ws)).collect()
}

#[test]
fn each_channel_form_routes_by_section_11_and_delivers_once() {
    // One shard: the watcher's updates prove every connection's were
    // fanned out (across shards there is no such order).
    let kafka = Kafka::new(2);
    let srv = server(&kafka, &[("WS_SHARDS", "1")]);
    let sub = |channels: &[&str]| {
        let mut ws = authed(srv.addr, "u");
        for c in channels {
            subscribe(&mut ws, c);
        }
        ws
    };
    let mut eth = sub(&["prices:8453:ETH"]);
    let mut chain = sub(&["prices:8453"]);
    let mut overlap = sub(&["prices:8453", "prices:8453:ETH"]);
    let mut all = sub(&["prices", "prices:8453:ETH", "prices:8453"]);
    let mut other_chain = sub(&["prices:1:ETH"]);
    let mut lower = sub(&[&format!("prices:8453:{}", USDC.to_lowercase())]);
    let mut checksummed = sub(&[&format!("prices:8453:{USDC}")]);
    let mut exact_case = sub(&["prices:8453:eth"]);

    let values = [
        price("ETH", "8453", 1),
        price("BTC", "8453", 2),
        price("ETH", "1", 3),
        price(USDC, "8453", 4),
        price("ETH/USD", "8453", 5), // outside the token grammar: prices and its chain
        price("ETH", "1.5", 6),      // not a chain id: prices only
        price(&USDC.to_uppercase().replace("0X", "0x"), "8453", 7),
    ];
    for v in &values {
        kafka.produce("price.updates", Some(0), v.as_bytes());
    }
    kafka.flush();
    assert_eq!(take_prices(&mut all, 7).len(), 7);
    assert_eq!(prices_until_pong(&mut all), Vec::<String>::new(), "prices + overlaps: each update once");
    assert_eq!(prices_until_pong(&mut eth), ["1"]);
    assert_eq!(prices_until_pong(&mut chain), ["1", "2", "4", "5", "7"]);
    assert_eq!(prices_until_pong(&mut overlap), ["1", "2", "4", "5", "7"], "ETH once for two channels");
    assert_eq!(prices_until_pong(&mut other_chain), ["3"]);
    assert_eq!(prices_until_pong(&mut lower), ["4", "7"], "an address matches in any case");
    assert_eq!(prices_until_pong(&mut checksummed), ["4", "7"]);
    assert_eq!(prices_until_pong(&mut exact_case), Vec::<String>::new(), "other tokens match exactly");

    // Unsubscribing one of two overlapping channels leaves the other.
    send(&mut overlap, json!({"id": "u", "type": "unsubscribe", "data": {"channel": "prices:8453"}}));
    assert_eq!(recv(&mut overlap)["data"], json!({"channel": "prices:8453", "requestId": "u"}));
    kafka.produce("price.updates", Some(0), price("ETH", "8453", 8).as_bytes());
    kafka.produce("price.updates", Some(0), price("BTC", "8453", 9).as_bytes());
    kafka.flush();
    assert_eq!(take_prices(&mut all, 2).len(), 2);
    assert_eq!(prices_until_pong(&mut overlap), ["8"]);
    assert_eq!(metric(srv.addr, "moonx_ws_market_subscriptions"), 9.0);
}

#[test]
fn multi_subscribe_is_all_or_nothing_within_the_limit() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, &[("WS_MAX_SUBSCRIPTIONS", "3"), ("WS_SHARDS", "1")]);
    let mut watcher = authed(srv.addr, "w");
    subscribe(&mut watcher, "prices");
    let mut ws = authed(srv.addr, "u");
    // One bad name: nothing changes, and the error names it.
    let reply = subscribe_with(&mut ws, json!({"channels": ["prices:1:A", "prices:01", "orders"]}));
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["data"]["code"], "unknown_channel");
    assert_eq!(reply["data"]["channel"], "prices:01");
    let reply = subscribe_with(&mut ws, json!({"channel": "prices:1:A:B"}));
    assert_eq!(
        (reply["data"]["code"].as_str(), reply["data"]["channel"].as_str()),
        (Some("unknown_channel"), Some("prices:1:A:B"))
    );
    kafka.produce("price.updates", Some(0), price("A", "1", 1).as_bytes());
    kafka.flush();
    take_prices(&mut watcher, 1);
    assert_eq!(prices_until_pong(&mut ws), Vec::<String>::new(), "the refused subscribe added nothing");
    // Then three at once, one reply naming them all.
    let reply = subscribe_with(&mut ws, json!({"channels": ["prices:1:A", "prices:1:B", "orders"]}));
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["data"]["channels"], json!(["prices:1:A", "prices:1:B", "orders"]));
    assert_eq!(reply["data"]["snapshot"], 1, "A ticked before: its snapshot follows");
    assert_eq!(recv(&mut ws)["data"]["price"], "1");
    // A fourth passes the limit: refused, naming it; repeats are free.
    let reply = subscribe_with(&mut ws, json!({"channels": ["prices:1:A", "prices:1:C"]}));
    assert_eq!(
        (reply["data"]["code"].as_str(), reply["data"]["channel"].as_str()),
        (Some("too_many_subscriptions"), Some("prices:1:C"))
    );
    let reply = subscribe_with(&mut ws, json!({"channels": ["prices:1:B", "orders"], "snapshot": false}));
    assert_eq!(reply["type"], "subscribed");
    // An unsubscribe with a bad name changes nothing either.
    send(&mut ws, json!({"id": "u1", "type": "unsubscribe", "data": {"channels": ["prices:1:A", "nope"]}}));
    assert_eq!(recv(&mut ws)["data"]["channel"], "nope");
    kafka.produce("price.updates", Some(0), price("A", "1", 2).as_bytes());
    kafka.produce("price.updates", Some(0), price("C", "1", 3).as_bytes());
    kafka.flush();
    assert_eq!(take_prices(&mut watcher, 2).len(), 2);
    assert_eq!(prices_until_pong(&mut ws), ["2"]);
    send(&mut ws, json!({"id": "u2", "type": "unsubscribe", "data": {"channels": ["prices:1:A", "prices:1:B"]}}));
    assert_eq!(recv(&mut ws)["data"], json!({"channels": ["prices:1:A", "prices:1:B"], "requestId": "u2"}));
    kafka.produce("price.updates", Some(0), price("A", "1", 4).as_bytes());
    kafka.flush();
    assert_eq!(take_prices(&mut watcher, 1).len(), 1);
    assert_eq!(prices_until_pong(&mut ws), Vec::<String>::new());
    // Private channels still need no market: `orders` is held.
    assert_eq!(metric(srv.addr, "moonx_ws_subscriptions{channel=\"orders\"}"), 1.0);
}

#[test]
fn a_market_snapshot_is_its_last_frame_byte_for_byte_before_any_live_update() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, &[("WS_SHARDS", "1")]);
    let mut watcher = authed(srv.addr, "w");
    subscribe(&mut watcher, "prices");
    for (token, n) in [("ETH", 1), ("ETH", 2), ("BTC", 3), ("SOL", 4)] {
        let chain = if token == "SOL" { "1" } else { "8453" };
        kafka.produce("price.updates", Some(0), price(token, chain, n).as_bytes());
    }
    kafka.flush();
    let seen = take_prices(&mut watcher, 4);

    let mut ws = authed(srv.addr, "u");
    let reply = subscribe_with(&mut ws, json!({"channel": "prices:8453:ETH"}));
    assert_eq!(reply["data"], json!({"channel": "prices:8453:ETH", "snapshot": 1, "requestId": "s"}));
    assert_eq!(recv_text(&mut ws), seen[1], "the last ETH frame, byte for byte (id, timestamp and all)");
    let reply = subscribe_with(&mut ws, json!({"channel": "prices:8453:DOGE"}));
    assert_eq!(reply["data"]["snapshot"], 0, "never ticked: subscribed, no snapshot");
    let reply = subscribe_with(&mut ws, json!({"channel": "prices:8453"}));
    assert_eq!(reply["data"]["snapshot"], 0, "opt-in for a chain");
    let reply = subscribe_with(&mut ws, json!({"channels": ["prices:8453", "prices:8453:ETH"], "snapshot": true}));
    assert_eq!(reply["data"]["snapshot"], 2, "each market once, newest first");
    assert_eq!([recv_text(&mut ws), recv_text(&mut ws)], [seen[2].clone(), seen[1].clone()]);
    let reply = subscribe_with(&mut ws, json!({"channel": "prices", "snapshot": true}));
    assert_eq!(reply["data"]["snapshot"], 3);
    assert_eq!(
        [recv_text(&mut ws), recv_text(&mut ws), recv_text(&mut ws)],
        [seen[3].clone(), seen[2].clone(), seen[1].clone()]
    );
    let reply = subscribe_with(&mut ws, json!({"channel": "orders", "snapshot": true}));
    assert!(reply["data"].get("snapshot").is_none(), "no snapshot count on a private channel: {reply}");
    // Live updates follow, newer than every snapshot.
    kafka.produce("price.updates", Some(0), price("ETH", "8453", 5).as_bytes());
    kafka.flush();
    take_prices(&mut watcher, 1);
    assert_eq!(prices_until_pong(&mut ws), ["5"]);

    // The same over HTTP.
    let body = |path: &str| serde_json::from_str::<Value>(&get(srv.addr, path).1).unwrap();
    let eth = body("/snapshot/prices:8453:ETH");
    assert_eq!(eth.as_array().unwrap().len(), 1);
    assert_eq!(eth[0]["data"]["price"], "5");
    let chain = body("/snapshot/prices%3A8453");
    let prices: Vec<&str> = chain.as_array().unwrap().iter().map(|v| v["data"]["price"].as_str().unwrap()).collect();
    assert_eq!(prices, ["5", "3"]);
    assert_eq!(body("/snapshot/prices:8453:DOGE"), json!([]));
    for bad in ["/snapshot/prices", "/snapshot/orders", "/snapshot/prices:01", "/snapshot/"] {
        let (status, text) = get(srv.addr, bad);
        assert_eq!(status, 404, "{bad}");
        assert!(serde_json::from_str::<Value>(&text).is_ok(), "a JSON body: {text}");
    }
}

#[test]
fn the_last_value_table_keeps_the_most_recently_updated_markets() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, &[("WS_SHARDS", "1"), ("WS_MAX_MARKETS", "2")]);
    let mut watcher = authed(srv.addr, "w");
    subscribe(&mut watcher, "prices");
    for (token, n) in [("A", 1), ("B", 2), ("A", 3), ("C", 4)] {
        kafka.produce("price.updates", Some(0), price(token, "1", n).as_bytes());
    }
    kafka.flush();
    take_prices(&mut watcher, 4);
    let body = |path: &str| serde_json::from_str::<Value>(&get(srv.addr, path).1).unwrap();
    assert_eq!(body("/snapshot/prices:1:B"), json!([]), "B was the least recently updated");
    assert_eq!(body("/snapshot/prices:1:A")[0]["data"]["price"], "3");
    assert_eq!(body("/snapshot/prices:1:C")[0]["data"]["price"], "4");
    assert_eq!(metric(srv.addr, "moonx_ws_markets_evicted_total"), 1.0);
    assert_eq!(metric(srv.addr, "moonx_ws_markets"), 2.0);
}

/// A reader that stalls under a burst keeps the newest update of each of
/// its markets, in order, never a stale one after a fresh one, and every
/// private update; it is not closed while that fits the limit.
#[test]
fn a_stalled_reader_is_conflated_to_the_newest_per_market_and_keeps_its_private_updates() {
    use moonx_ws::protocol::channel::Market;
    use moonx_ws::protocol::message::Channel;
    use moonx_ws::shard::inbox::Route;

    let srv = TestServer::start(&[("WS_SHARDS", "1"), ("WS_MAX_BUFFERED_BYTES", "65536")]);
    let mut ws = authed(srv.addr, "trader");
    let reply = subscribe_with(&mut ws, json!({"channels": ["prices:77:A", "prices:77:B", "prices:77:C", "orders"]}));
    assert_eq!(reply["type"], "subscribed");
    // Stop reading: the burst fills the socket buffers, then the outbox.
    let publisher = srv.handle().publisher();
    let pad = "x".repeat(500);
    let (n, markets) = (20_000u32, ["A", "B", "C"]);
    let mut orders = 0;
    for i in 0..n {
        let token = markets[(i % 3) as usize];
        let route = Route::Market(Market { chain: 77, token: token.into() });
        let data = format!(r#"{{"token":"{token}","chainId":77,"seq":{i},"pad":"{pad}"}}"#);
        publisher.publish_data(route, 1, data.as_bytes());
        if i % 400 == 0 {
            let route = Route::User { channel: Channel::Orders, user: "trader".into() };
            publisher.publish_data(route, 1, format!(r#"{{"userId":"trader","n":{orders}}}"#).as_bytes());
            orders += 1;
        }
    }
    // Wait until the shard took the whole burst (the last order is queued).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(srv.addr, "moonx_ws_updates_processed_total") < f64::from(n + orders) {
        assert!(std::time::Instant::now() < deadline, "the shard never took the burst");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Resume reading: everything queued, then the pong.
    send(&mut ws, json!({"id": "end", "type": "ping"}));
    let mut last_seq = std::collections::HashMap::new();
    let mut got_orders = Vec::new();
    let mut prices = 0;
    loop {
        let v = recv(&mut ws);
        match v["type"].as_str().unwrap() {
            "pong" => break,
            "order_update" => got_orders.push(v["data"]["n"].as_u64().unwrap()),
            "price_update" => {
                prices += 1;
                let token = v["data"]["token"].as_str().unwrap().to_owned();
                let seq = v["data"]["seq"].as_u64().unwrap();
                if let Some(prev) = last_seq.insert(token.clone(), seq) {
                    assert!(seq > prev, "{token}: {seq} after {prev}: stale after fresh");
                }
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(got_orders, (0..orders as u64).collect::<Vec<_>>(), "every private update, in order");
    for (i, token) in markets.iter().enumerate() {
        let newest = (0..n).rev().find(|s| s % 3 == i as u32).unwrap() as u64;
        assert_eq!(last_seq.get(*token), Some(&newest), "{token} ends at its newest value");
    }
    let conflated = metric(srv.addr, "moonx_ws_conflated_total");
    assert!(conflated > 0.0, "the burst did not overflow the outbox: nothing to check");
    assert_eq!(prices as f64 + conflated, f64::from(n), "every price delivered or counted as conflated");
    assert_eq!(metric(srv.addr, "moonx_ws_slow_consumer_closes_total"), 0.0);
}

/// Snapshots survive a restart through Kafka: a fresh instance reads the
/// prices topic's tail back before it is ready, keeps each market's newest
/// value inside the lookback, and delivers none of it live.
#[test]
fn a_fresh_instance_reads_last_values_back_from_kafka_before_it_is_ready() {
    use rdkafka::producer::BaseRecord;

    let kafka = Kafka::new(2);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let produce = |token: &str, n: u32, partition: i32, ts: i64| {
        let value = price(token, "8453", n);
        let rec = BaseRecord::<(), str>::to("price.updates").payload(&value).partition(partition).timestamp(ts);
        kafka.producer.send(rec).map_err(|(e, _)| e).unwrap();
    };
    produce("OLD", 1, 0, now - 3 * 3_600_000); // before the one-hour lookback
    produce("ETH", 2, 0, now - 60_000);
    produce("ETH", 3, 0, now - 30_000);
    produce("BTC", 4, 1, now - 10_000);
    kafka.flush();

    let env = [("KAFKA_SNAPSHOT_LOOKBACK_MS", "3600000"), ("WS_SHARDS", "2")];
    let srv = server(&kafka, &env);
    assert_eq!(metric(srv.addr, "moonx_ws_kafka_readback_done"), 1.0);
    assert_eq!(metric(srv.addr, "moonx_ws_kafka_readback_messages_total"), 4.0);
    assert_eq!(metric(srv.addr, "moonx_ws_kafka_readback_markets"), 2.0);
    // Nothing read back is delivered live.
    let mut all = authed(srv.addr, "all");
    let reply = subscribe_with(&mut all, json!({"channel": "prices", "snapshot": false}));
    assert_eq!(reply["data"]["snapshot"], 0);
    assert_eq!(prices_until_pong(&mut all), Vec::<String>::new());
    // Each market's newest value inside the lookback is its snapshot, on
    // every shard, with the age the Kafka timestamp gives it.
    for _ in 0..4 {
        let mut ws = authed(srv.addr, "u");
        let reply =
            subscribe_with(&mut ws, json!({"channels": ["prices:8453:ETH", "prices:8453:BTC", "prices:8453:OLD"]}));
        assert_eq!(reply["data"]["snapshot"], 2, "{reply}");
        let snapshots: Vec<Value> = (0..2).map(|_| recv(&mut ws)).collect();
        let mut got: Vec<(&str, i64)> = snapshots
            .iter()
            .map(|v| (v["data"]["price"].as_str().unwrap(), v["timestamp"].as_i64().unwrap()))
            .collect();
        got.sort();
        assert_eq!(got, [("3", now - 30_000), ("4", now - 10_000)]);
        let mut positions: Vec<&str> = snapshots.iter().map(|v| v["pos"].as_str().unwrap()).collect();
        positions.sort();
        assert_eq!(positions, ["0:2", "1:0"], "each snapshot keeps its Kafka position");
    }
    // Live from the watermark read at start.
    kafka.produce("price.updates", Some(0), price("ETH", "8453", 5).as_bytes());
    kafka.flush();
    assert_eq!(take_prices(&mut all, 1).len(), 1);
    let body = serde_json::from_str::<Value>(&get(srv.addr, "/snapshot/prices:8453:ETH").1).unwrap();
    assert_eq!(body[0]["data"]["price"], "5");
}
