//! Kafka ingest when a partition is in trouble, through the real Kafka
//! protocol (librdkafka's mock cluster) and real sockets: every codec
//! producers use, a batch nobody can decode, positions that fall out of
//! retention, and topics created after the start.

mod common;

use std::time::{Duration, Instant};

use common::kafka::{produce_raw_batch, producer, Kafka};
use common::*;
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::json;

fn server(kafka: &Kafka, extra: &[(&str, &str)]) -> TestServer {
    let bootstrap = kafka.bootstrap();
    let mut env = vec![("KAFKA_BROKERS", bootstrap.as_str()), ("WS_SHARDS", "2")];
    env.extend_from_slice(extra);
    let srv = TestServer::start(&env);
    srv.wait_ready();
    srv
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every compression codec a Kafka producer may use is decoded: none,
/// gzip, snappy, lz4 and zstd batches all reach the subscriber whole.
#[test]
fn every_producer_codec_is_decoded() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, &[]);
    let mut ws = authed(srv.addr, "codecs");
    subscribe(&mut ws, "prices");
    subscribe(&mut ws, "orders");
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        // Batched (linger) so each batch really is compressed.
        let p = producer(&kafka.bootstrap(), &[("compression.codec", codec), ("linger.ms", "20")]);
        for i in 0..30 {
            let price = format!(r#"{{"token":"T","chainId":1,"codec":"{codec}","i":{i},"pad":"{}"}}"#, "x".repeat(100));
            p.send(BaseRecord::<(), _>::to("price.updates").payload(&price)).unwrap();
            let order = format!(r#"{{"userId":"codecs","codec":"{codec}","i":{i}}}"#);
            p.send(BaseRecord::<(), _>::to("order.updates").payload(&order)).unwrap();
        }
        p.flush(Duration::from_secs(30)).unwrap();
        let (mut prices, mut orders) = (0, 0);
        while prices + orders < 60 {
            let m = recv(&mut ws);
            assert_eq!(m["data"]["codec"], codec, "{m}");
            match m["type"].as_str() {
                Some("price_update") => {
                    assert_eq!(m["data"]["i"], prices);
                    prices += 1;
                }
                Some("order_update") => {
                    assert_eq!(m["data"]["i"], orders);
                    orders += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(metric(srv.addr, "moonx_ws_kafka_undecodable_batches_total"), 0.0);
}

/// A batch that cannot be decoded (here: zstd-flagged garbage) is counted,
/// logged, and stepped over: the updates after it in the same partition
/// arrive, none before it is lost or repeated, and the partition is not
/// left stuck.
#[test]
fn an_undecodable_batch_is_stepped_over_and_counted() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, &[]);
    let mut ws = authed(srv.addr, "fills");
    subscribe(&mut ws, "orders");
    let order = |i: u32| format!(r#"{{"userId":"fills","seq":{i}}}"#);
    for i in 0..20 {
        kafka.produce("order.updates", Some(0), order(i).as_bytes());
    }
    kafka.flush();
    let err = produce_raw_batch(&kafka.bootstrap(), "order.updates", 0, 4, 3, &[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
    assert_eq!(err, 0, "the broker took the batch");
    for i in 20..25 {
        kafka.produce("order.updates", Some(0), order(i).as_bytes());
    }
    kafka.flush();
    for i in 0..25 {
        assert_eq!(recv(&mut ws)["data"]["seq"], i, "every valid update, once, in order");
    }
    send(&mut ws, json!({"type": "ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong", "and nothing after them");
    let labels = r#"{topic="order.updates",partition="0"}"#;
    assert_eq!(metric(srv.addr, &format!("moonx_ws_kafka_undecodable_batches_total{labels}")), 1.0);
    assert_eq!(
        metric(
            srv.addr,
            r#"moonx_ws_kafka_offsets_skipped_total{topic="order.updates",partition="0",reason="undecodable"}"#
        ),
        3.0,
        "exactly the batch's three offsets"
    );
    wait_for("the partition to be moving", IO_TIMEOUT, || {
        metric(srv.addr, "moonx_ws_kafka_partitions_stuck") == 0.0
            && get_json(srv.addr, "/health")["status"] == "healthy"
    });
}

/// A topic that did not exist when the service started is read from its
/// beginning once it appears: nothing produced between its creation and
/// the next metadata refresh is lost.
#[test]
fn a_topic_created_after_the_start_is_read_from_its_beginning() {
    let kafka = Kafka::with_topics(1, &["price.updates"]);
    let bootstrap = kafka.bootstrap();
    let srv = TestServer::start(&[("KAFKA_BROKERS", &bootstrap), ("WS_SHARDS", "2")]);
    assert_eq!(get(srv.addr, "/health/ready").0, 503, "not ready while topics are missing");
    let mut ws = authed(srv.addr, "early");
    subscribe(&mut ws, "orders");
    // Let the service see the topics missing (it looks every 500 ms).
    std::thread::sleep(Duration::from_millis(700));
    for topic in ["order.updates", "portfolio.updates", "trade.updates"] {
        kafka.cluster.create_topic(topic, 1, 1).unwrap();
    }
    // Produced at once, before the service's next look at the metadata.
    for i in 0..5 {
        kafka.produce("order.updates", Some(0), format!(r#"{{"userId":"early","seq":{i}}}"#).as_bytes());
    }
    kafka.flush();
    for i in 0..5 {
        assert_eq!(recv(&mut ws)["data"]["seq"], i);
    }
    srv.wait_ready();
}

/// When retention removes records before the consumer reads them, a
/// private topic resumes at the earliest record left (delivering what
/// remains rather than jumping to the end), counted and logged.
#[test]
fn a_private_partition_out_of_retention_resumes_at_the_earliest_left() {
    let kafka = Kafka::new(1);
    let srv = server(
        &kafka,
        &[
            // Small fetches, so the consumer trails the producer.
            ("KAFKA_CONSUMER_MAX_PARTITION_FETCH_BYTES", "65536"),
            ("KAFKA_CONSUMER_FETCH_MAX_BYTES", "1048576"),
            ("WS_MAX_BUFFERED_BYTES", "67108864"),
        ],
    );
    let mut ws = authed(srv.addr, "whale");
    subscribe(&mut ws, "orders");
    // Every broker answer takes 100 ms: the producer's requests overlap,
    // the consumer's fetches do not. The mock broker keeps 5 MB per
    // partition: 8 MB produced pushes out what the consumer has not read.
    kafka.cluster.broker_round_trip_time(1, Duration::from_millis(100)).unwrap();
    let pad = "x".repeat(10_000);
    let total = 800;
    let p = producer(&kafka.bootstrap(), &[("linger.ms", "5"), ("batch.size", "1000000")]);
    for i in 0..total {
        let v = format!(r#"{{"userId":"whale","seq":{i},"pad":"{pad}"}}"#);
        let mut rec = BaseRecord::<(), _>::to("order.updates").partition(0).payload(&v);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    p.poll(Duration::from_millis(5));
                    rec = back;
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
    kafka.cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let mut seqs = Vec::new();
    while seqs.last() != Some(&(total - 1)) {
        seqs.push(recv(&mut ws)["data"]["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "in order, nothing twice");
    // What is missing is one run of offsets: the ones retention removed.
    let missing: Vec<u64> = (0..total).filter(|i| seqs.binary_search(i).is_err()).collect();
    assert!(!missing.is_empty(), "retention removed records before they were read");
    assert!(missing.windows(2).all(|w| w[1] == w[0] + 1), "one run of skipped offsets: {missing:?}");
    let labels = r#"{topic="order.updates",partition="0"}"#;
    assert!(metric(srv.addr, &format!("moonx_ws_kafka_offset_resets_total{labels}")) >= 1.0);
    let skipped = metric(
        srv.addr,
        r#"moonx_ws_kafka_offsets_skipped_total{topic="order.updates",partition="0",reason="out_of_range"}"#,
    );
    assert_eq!(skipped as usize, missing.len(), "the skip is counted exactly");
    let after = total - 1 - missing[missing.len() - 1];
    assert!(after > 100, "what retention left after the skip was delivered ({after}), not jumped over");
}

/// A fetch refused as out of range while the position is still retained
/// (a broker's spurious answer) moves nothing: no update lost or repeated.
#[test]
fn a_spurious_out_of_range_skips_nothing() {
    let kafka = Kafka::new(1);
    let srv = server(&kafka, &[]);
    let mut ws = authed(srv.addr, "steady");
    subscribe(&mut ws, "orders");
    let produce =
        |i: u32| kafka.produce("order.updates", Some(0), format!(r#"{{"userId":"steady","seq":{i}}}"#).as_bytes());
    for i in 0..25 {
        produce(i);
    }
    kafka.flush();
    for i in 0..25 {
        assert_eq!(recv(&mut ws)["data"]["seq"], i);
    }
    kafka.cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Fetch,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    for i in 25..50 {
        produce(i);
    }
    kafka.flush();
    for i in 25..50 {
        assert_eq!(recv(&mut ws)["data"]["seq"], i, "nothing skipped, nothing repeated");
    }
    assert_eq!(
        metric(
            srv.addr,
            r#"moonx_ws_kafka_offsets_skipped_total{topic="order.updates",partition="0",reason="out_of_range"}"#
        ),
        0.0
    );
}
