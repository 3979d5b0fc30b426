//! Kafka -> shards: the real ingest path (PROTOCOL.md §6).
//!
//! Owns: starting and stopping the consumer thread (`consume.rs`: the
//! loop, offsets out of range, undecodable batches) and, when
//! `KAFKA_BROKERS` is unset, the embedded broker (`embedded.rs`); which
//! partitions are read from where (`assign.rs`); value validation
//! (`validate.rs`, sans-IO); stepping over a bad batch (`skip.rs`,
//! sans-IO); and the ingest statistics `/metrics` and `/health` read.
//!
//! Every instance reads every partition of the four topics by manual
//! assignment (no group rebalances; the group id is instance-unique and
//! nothing is committed). Broker trouble never stops the server:
//! librdkafka reconnects by itself, and the statistics keep `/health`
//! truthful meanwhile.

mod assign;
mod consume;
mod embedded;
mod skip;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext};

use crate::clock::Clock;
use crate::config::Config;
use crate::protocol::message::Channel;
use crate::shard::inbox::Publisher;
use crate::telemetry::{Exposition, Kind};
use validate::Invalid;

/// Why ingest could not start (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka consumer: {0}")]
    Consumer(#[from] KafkaError),
    #[error("embedded kafka broker: {0}")]
    Embedded(String),
}

/// What happened to one partition, for `/metrics` (a table bounded by the
/// partitions assigned).
#[derive(Debug, Default, Clone, Copy)]
pub struct PartitionStat {
    /// Consumer lag from librdkafka's statistics.
    pub lag: Option<i64>,
    /// Positions found outside the retained log and moved.
    pub resets: u64,
    /// Offsets passed over by those moves (retention had removed them).
    pub skipped_out_of_range: u64,
    /// Batches that could not be decoded.
    pub undecodable: u64,
    /// Offsets those batches covered, stepped over.
    pub skipped_undecodable: u64,
}

/// Ingest counters and state, read by `/metrics` and `/health`.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Valid messages consumed, per channel.
    pub consumed: [AtomicU64; 4],
    /// Skipped messages, per channel and [`Invalid`] reason.
    pub invalid: [[AtomicU64; 4]; 4],
    /// Per (topic, partition).
    pub partitions: Mutex<BTreeMap<(String, i32), PartitionStat>>,
    /// Partitions held up by an undecodable batch right now.
    pub stuck: AtomicU32,
    /// At least one broker connection is up.
    pub broker_up: AtomicBool,
    /// Every topic's partitions are assigned at known offsets: consuming.
    pub assigned: AtomicBool,
    pub embedded: AtomicBool,
}

impl IngestStats {
    /// Updates one partition's entry.
    fn partition(&self, topic: &str, partition: i32, f: impl FnOnce(&mut PartitionStat)) {
        let mut parts = self.partitions.lock();
        match parts.get_mut(&(topic.to_owned(), partition)) {
            Some(s) => f(s),
            None => f(parts.entry((topic.to_owned(), partition)).or_default()),
        }
    }

    /// Reads librdkafka's statistics (JSON): broker reachability and lag.
    fn apply_statistics(&self, json: &str) {
        let Ok(s) = serde_json::from_str::<Statistics>(json) else { return };
        let up = s.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        let was = self.broker_up.swap(up, Ordering::Relaxed);
        if was != up {
            tracing::warn!(up, "kafka broker connectivity changed");
        }
        let mut parts = self.partitions.lock();
        for (topic, t) in &s.topics {
            for (id, p) in &t.partitions {
                // librdkafka's own figure, or high watermark minus fetch position.
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.hi_offset >= 0 && p.next_offset >= 0 {
                    (p.hi_offset - p.next_offset).max(0)
                } else {
                    continue;
                };
                if *id >= 0 {
                    parts.entry((topic.clone(), *id)).or_default().lag = Some(lag);
                }
            }
        }
    }
}

/// A running ingest: the consumer thread and, if embedded, the broker.
pub struct Ingest {
    stop: Arc<AtomicBool>,
    consumer: Option<JoinHandle<()>>,
    broker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Ingest {
    /// Stops consuming, then the embedded broker (in that order, so the
    /// consumer never sees its broker vanish), and waits for both.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.consumer.take() {
            let _ = t.join();
        }
        if let Some((stop, t)) = self.broker.take() {
            stop.store(true, Ordering::Release);
            let _ = t.join();
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The topic name -> channel map of the configuration.
fn topics(cfg: &Config) -> [(String, Channel); 4] {
    [
        (cfg.kafka_topic_prices.clone(), Channel::Prices),
        (cfg.kafka_topic_orders.clone(), Channel::Orders),
        (cfg.kafka_topic_portfolio.clone(), Channel::Portfolio),
        (cfg.kafka_topic_trades.clone(), Channel::Trades),
    ]
}

/// Starts the consumer (and the embedded broker when no brokers are set).
pub fn start(
    cfg: &Config,
    publisher: Publisher,
    instance_id: &str,
    stats: Arc<IngestStats>,
    clock: Clock,
) -> Result<Ingest, IngestError> {
    let mut ingest = Ingest { stop: Arc::new(AtomicBool::new(false)), consumer: None, broker: None };
    let topics = topics(cfg);
    let (bootstrap, fetch_wait_ms) = match &cfg.kafka_brokers {
        Some(b) => (b.clone(), cfg.kafka_fetch_wait_max_ms.as_millis() as u64),
        None => {
            let names: Vec<String> = topics.iter().map(|(t, _)| t.clone()).collect();
            let demo = cfg.demo_feed.unwrap_or(true).then(|| cfg.kafka_topic_prices.clone());
            let stop = Arc::new(AtomicBool::new(false));
            let (addr, thread) = embedded::start(&names, demo, stop.clone())?;
            ingest.broker = Some((stop, thread));
            stats.embedded.store(true, Ordering::Relaxed);
            if cfg.auth_mode() == "dev" {
                tracing::warn!(bootstrap = %addr, "KAFKA_BROKERS is not set: serving updates from an embedded Kafka-protocol broker on loopback (the quick start; produce to it with any Kafka client). Set KAFKA_BROKERS in production");
            } else {
                tracing::warn!(bootstrap = %addr, "KAFKA_BROKERS is not set although authentication is configured: serving from an embedded broker on loopback, so no update from your Kafka can ever arrive. Set KAFKA_BROKERS");
            }
            // The mock broker holds an empty fetch for the whole wait.
            (addr, 5)
        }
    };
    stats.broker_up.store(true, Ordering::Relaxed);
    let group = format!("{}-{}", cfg.kafka_consumer_group_id, instance_id);
    let consumer: BaseConsumer<Ctx> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("client.id", format!("moonx-ws-{instance_id}"))
        // Out of range is reported, not resolved silently: `consume.rs`
        // decides per topic where to go on, and says so.
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.max.bytes", cfg.kafka_consumer_fetch_max_bytes.to_string())
        .set("max.partition.fetch.bytes", cfg.kafka_consumer_max_partition_fetch_bytes.to_string())
        .set("statistics.interval.ms", "1000")
        .set("log_level", "4")
        .create_with_context(Ctx)?;
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    tracing::info!(%bootstrap, group = %group, topics = ?names, "kafka consumer created");
    let settings = consume::Settings {
        topics,
        batch_size: cfg.kafka_consumer_batch_size.get(),
        refresh: cfg.kafka_topic_refresh_ms,
        clock,
    };
    let stop = ingest.stop.clone();
    let thread = std::thread::Builder::new()
        .name("kafka-ingest".into())
        .spawn(move || consume::run(consumer, publisher, stats, settings, stop))
        .map_err(|e| IngestError::Embedded(e.to_string()))?;
    ingest.consumer = Some(thread);
    Ok(ingest)
}

/// The consumer's context: everything it reports (statistics, errors,
/// librdkafka's log) arrives as events on its queue, read by `consume.rs`.
struct Ctx;

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {}

impl IngestStats {
    /// Describes the ingest metrics.
    pub fn describe(&self, e: &mut Exposition) {
        let mut f = e.family(
            Kind::Counter,
            "moonx_ws_kafka_messages_consumed_total",
            "Valid Kafka messages consumed, by channel.",
        );
        for ch in Channel::ALL {
            f.sample(&[("channel", &ch.name())], self.consumed[ch as usize].load(Ordering::Relaxed));
        }
        let mut f = e.family(
            Kind::Counter,
            "moonx_ws_kafka_messages_invalid_total",
            "Kafka messages skipped, by channel and reason.",
        );
        for ch in Channel::ALL {
            for reason in Invalid::ALL {
                let n = self.invalid[ch as usize][reason as usize].load(Ordering::Relaxed);
                f.sample(&[("channel", &ch.name()), ("reason", &reason.as_str())], n);
            }
        }
        let parts = self.partitions.lock();
        let mut f =
            e.family(Kind::Gauge, "moonx_ws_kafka_consumer_lag", "Messages behind the partition's high watermark.");
        for ((topic, partition), s) in parts.iter() {
            if let Some(lag) = s.lag {
                f.sample(&[("topic", topic), ("partition", partition)], lag);
            }
        }
        type Get = fn(&PartitionStat) -> u64;
        let counters: [(&str, &str, Get); 2] = [
            (
                "moonx_ws_kafka_offset_resets_total",
                "Positions found outside the partition's retained log (offset out of range) and moved: private topics to the earliest retained offset, prices to the end.",
                |s| s.resets,
            ),
            (
                "moonx_ws_kafka_undecodable_batches_total",
                "Record batches that could not be decoded (corrupt, or an unknown compression) and were stepped over.",
                |s| s.undecodable,
            ),
        ];
        for (name, help, get) in counters {
            let mut f = e.family(Kind::Counter, name, help);
            for ((topic, partition), s) in parts.iter() {
                f.sample(&[("topic", topic), ("partition", partition)], get(s));
            }
        }
        let mut f = e.family(
            Kind::Counter,
            "moonx_ws_kafka_offsets_skipped_total",
            "Offsets passed over, by reason: out_of_range (retention removed them before they were read), undecodable (a batch that could not be decoded).",
        );
        for ((topic, partition), s) in parts.iter() {
            for (reason, n) in [("out_of_range", s.skipped_out_of_range), ("undecodable", s.skipped_undecodable)] {
                f.sample(&[("topic", topic), ("partition", partition), ("reason", &reason)], n);
            }
        }
        drop(parts);
        e.single(
            Kind::Gauge,
            "moonx_ws_kafka_partitions_stuck",
            "Partitions held up by an undecodable batch right now.",
            self.stuck.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Gauge,
            "moonx_ws_kafka_up",
            "Whether a Kafka broker connection is up.",
            self.broker_up.load(Ordering::Relaxed) as u8,
        );
    }
}
