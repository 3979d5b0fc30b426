//! The load producers' Kafka side: a producer tuned for an open-loop
//! schedule, and a send that waits (briefly polling) when its local queue
//! is full instead of dropping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// `idempotent` keeps the log in order and free of duplicates across broker
/// outages and retries (the gap checks downstream rely on it then); it
/// costs latency (acks from all replicas, fewer requests in flight), so
/// runs without outages leave it off.
pub fn producer(brokers: &str, linger_ms: u32, idempotent: bool) -> BaseProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("enable.idempotence", idempotent.to_string())
        .create()
        .expect("kafka producer")
}

/// Whether the brokers answer a metadata request within 5 s.
pub fn check(brokers: &str) -> Result<(), String> {
    let p: BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(|e| e.to_string())?;
    p.client().fetch_metadata(None, Duration::from_secs(5)).map(|_| ()).map_err(|e| e.to_string())
}

/// Sends `rec`, retrying while the producer's queue is full (until `stop`),
/// then serves delivery callbacks without blocking. False when it gave up.
pub fn send<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &BaseProducer,
    mut rec: BaseRecord<'_, K, P>,
    stop: &AtomicBool,
) -> bool {
    loop {
        match producer.send(rec) {
            Ok(()) => break,
            Err((_, back)) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                producer.poll(Duration::from_millis(1));
                rec = back;
            }
        }
    }
    producer.poll(Duration::ZERO);
    true
}

/// Open-loop pacing: sleeps until send number `i` is due (`i` intervals
/// after `start`, waking early when `stop` is set); returns true when it
/// is already more than 1 ms late.
pub fn wait_until_due(start: Instant, i: u64, interval_ns: u64, stop: &AtomicBool) -> bool {
    let due = Duration::from_nanos(i * interval_ns);
    let elapsed = start.elapsed();
    if elapsed < due {
        loop {
            let now = start.elapsed();
            if now >= due || stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
        false
    } else {
        elapsed > due + Duration::from_millis(1)
    }
}

/// Waits (bounded) for what is still queued.
pub fn finish(producer: &BaseProducer) {
    let _ = producer.flush(Duration::from_secs(10));
}
