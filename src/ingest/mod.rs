//! Kafka -> shards: the real ingest path (PROTOCOL.md §6).
//!
//! Owns: one consumer thread (rdkafka `BaseConsumer`) reading every
//! partition of the four topics by manual assignment (every instance reads
//! every partition; no group rebalances; the group id is instance-unique and
//! nothing is committed). On start each partition is assigned at its high
//! watermark, read before `/health/ready` says ready, so anything produced
//! after readiness is delivered and nothing from before is replayed;
//! partitions or topics that appear later are assigned from their beginning
//! (all of their messages are new to us). Then: validating each value
//! (`validate.rs`), encoding its frame once, and handing batches to the
//! shards through [`Publisher::publish_batch`]. Also the ingest statistics
//! (consumed, invalid by reason, lag per partition, broker reachability) and
//! the embedded broker of `embedded.rs` when `KAFKA_BROKERS` is unset.
//!
//! Broker trouble never stops the server: librdkafka reconnects by itself;
//! the statistics callback keeps `/health` truthful meanwhile.

mod embedded;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message as _, Timestamp};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::Config;
use crate::protocol::message::Channel;
use crate::shard::inbox::{Publisher, Update};
use crate::telemetry::LogLimiter;
use validate::{Invalid, Validator};

/// Why ingest could not start (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka consumer: {0}")]
    Consumer(#[from] KafkaError),
    #[error("embedded kafka broker: {0}")]
    Embedded(String),
}

/// Ingest counters and state, read by `/metrics` and `/health`.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Valid messages consumed, per channel.
    pub consumed: [AtomicU64; 4],
    /// Skipped messages, per channel and [`Invalid`] reason.
    pub invalid: [[AtomicU64; 4]; 4],
    /// Consumer lag per (topic, partition), from librdkafka statistics.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// At least one broker connection is up.
    pub broker_up: AtomicBool,
    /// Every topic's partitions are assigned at known offsets: consuming.
    pub assigned: AtomicBool,
    /// The bootstrap address in use (the embedded broker's when embedded).
    pub bootstrap: Mutex<String>,
    pub embedded: AtomicBool,
}

/// A running ingest: the consumer thread and, if embedded, the broker.
pub struct Ingest {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Ingest {
    /// Stops consuming (and the embedded broker) and waits for the threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
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
) -> Result<Ingest, IngestError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let topics = topics(cfg);
    let (bootstrap, fetch_wait_ms) = match &cfg.kafka_brokers {
        Some(b) => (b.clone(), cfg.kafka_fetch_wait_max_ms),
        None => {
            let names: Vec<String> = topics.iter().map(|(t, _)| t.clone()).collect();
            let demo = cfg.demo_feed.unwrap_or(true).then(|| cfg.kafka_topic_prices.clone());
            let (addr, thread) = embedded::start(&names, demo, stop.clone())?;
            threads.push(thread);
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
    *stats.bootstrap.lock() = bootstrap.clone();
    stats.broker_up.store(true, Ordering::Relaxed);
    let group = format!("{}-{}", cfg.kafka_consumer_group_id, instance_id);
    let consumer: BaseConsumer<Ctx> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("client.id", format!("moonx-ws-{instance_id}"))
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.max.bytes", cfg.kafka_consumer_fetch_max_bytes.to_string())
        .set("max.partition.fetch.bytes", cfg.kafka_consumer_max_partition_fetch_bytes.to_string())
        .set("statistics.interval.ms", "1000")
        .set("log_level", "4")
        .create_with_context(Ctx { stats: stats.clone(), log: LogLimiter::new(Duration::from_secs(10)) })?;
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    tracing::info!(%bootstrap, group = %group, topics = ?names, "kafka consumer created");
    let batch = cfg.kafka_consumer_batch_size.get();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("kafka-ingest".into())
        .spawn(move || consume(consumer, topics, publisher, stats, batch, stop2))
        .map_err(|e| IngestError::Embedded(e.to_string()))?;
    threads.push(thread);
    Ok(Ingest { stop, threads })
}

fn consume(
    consumer: BaseConsumer<Ctx>,
    topics: [(String, Channel); 4],
    publisher: Publisher,
    stats: Arc<IngestStats>,
    batch_size: usize,
    stop: Arc<AtomicBool>,
) {
    let mut validator = Validator::default();
    let invalid_log = LogLimiter::new(Duration::from_secs(5));
    let error_log = LogLimiter::new(Duration::from_secs(5));
    let mut batch: Vec<Update> = Vec::with_capacity(batch_size);
    let mut ids = itoa::Buffer::new();
    let mut assignment = Assignment {
        log: LogLimiter::new(Duration::from_secs(10)),
        partitions: BTreeSet::new(),
        started: BTreeSet::new(),
    };
    let mut next_refresh = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if Instant::now() >= next_refresh {
            let complete = assignment.refresh(&consumer, &topics, &stop);
            if complete {
                stats.assigned.store(true, Ordering::Release);
            }
            next_refresh = Instant::now() + if complete { ASSIGNMENT_REFRESH } else { Duration::from_millis(500) };
        }
        let mut timeout = Duration::from_millis(100);
        while batch.len() < batch_size {
            let Some(result) = consumer.poll(timeout) else { break };
            timeout = Duration::ZERO;
            let msg = match result {
                Ok(m) => m,
                Err(e) => {
                    if let Some(suppressed) = error_log.allow() {
                        tracing::warn!(error = %e, suppressed, "kafka consume error");
                    }
                    continue;
                }
            };
            let Some(channel) = topics.iter().find(|(t, _)| t == msg.topic()).map(|(_, c)| *c) else {
                continue;
            };
            let value = msg.payload().unwrap_or(&[]);
            match validator.route(channel, value) {
                Ok(route) => {
                    stats.consumed[channel as usize].fetch_add(1, Ordering::Relaxed);
                    let id = publisher.next_id(&mut ids);
                    let now = epoch_ms();
                    let mut update = Update::encode(route, &id, now, value);
                    update.kafka_ts_ms = match msg.timestamp() {
                        Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => t,
                        Timestamp::NotAvailable => 0,
                    };
                    batch.push(update);
                }
                Err(reason) => {
                    stats.invalid[channel as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = invalid_log.allow() {
                        tracing::warn!(
                            topic = msg.topic(),
                            partition = msg.partition(),
                            offset = msg.offset(),
                            reason = reason.as_str(),
                            suppressed,
                            "skipping invalid Kafka value"
                        );
                    }
                }
            }
        }
        if !batch.is_empty() {
            publisher.publish_batch(batch.drain(..));
        }
    }
    tracing::info!("kafka consumer stopped");
}

/// How often partition metadata is re-read to find new partitions.
const ASSIGNMENT_REFRESH: Duration = Duration::from_secs(10);
/// Bounds each metadata call, so a stop request waits at most this long.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// The partitions this consumer reads, grown as metadata shows new ones.
struct Assignment {
    /// Retry warnings are logged at most every 10 s.
    log: LogLimiter,
    partitions: BTreeSet<(String, i32)>,
    /// Topics whose partitions were first assigned at their high watermark.
    started: BTreeSet<String>,
}

impl Assignment {
    /// Assigns partitions not yet assigned; true when every topic exists
    /// and all its partitions are assigned.
    fn refresh(&mut self, consumer: &BaseConsumer<Ctx>, topics: &[(String, Channel); 4], stop: &AtomicBool) -> bool {
        let mut complete = true;
        let mut add = TopicPartitionList::new();
        for (topic, _) in topics {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            let md = match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                Ok(md) => md,
                Err(e) => {
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(topic, error = %e, suppressed, "kafka metadata unavailable; will retry");
                    }
                    complete = false;
                    continue;
                }
            };
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else { continue };
            if t.error().is_some() || t.partitions().is_empty() {
                if let Some(suppressed) = self.log.allow() {
                    tracing::warn!(topic, suppressed, "kafka topic not found; /health/ready waits for it; will retry");
                }
                complete = false;
                continue;
            }
            let first = !self.started.contains(topic.as_str());
            for p in t.partitions() {
                if self.partitions.contains(&(topic.clone(), p.id())) {
                    continue;
                }
                let offset = if first {
                    match consumer.fetch_watermarks(topic, p.id(), METADATA_TIMEOUT) {
                        Ok((_, high)) => Offset::Offset(high),
                        Err(e) => {
                            if let Some(suppressed) = self.log.allow() {
                                tracing::warn!(topic, partition = p.id(), error = %e, suppressed, "kafka watermarks unavailable; will retry");
                            }
                            complete = false;
                            continue;
                        }
                    }
                } else {
                    Offset::Beginning
                };
                if add.add_partition_offset(topic, p.id(), offset).is_ok() {
                    self.partitions.insert((topic.clone(), p.id()));
                }
            }
            if complete {
                self.started.insert(topic.clone());
            }
        }
        if add.count() > 0 {
            match consumer.incremental_assign(&add) {
                Ok(()) => {
                    tracing::info!(partitions = add.count(), total = self.partitions.len(), "kafka partitions assigned")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka assignment failed; will retry");
                    for el in add.elements() {
                        self.partitions.remove(&(el.topic().to_owned(), el.partition()));
                    }
                    return false;
                }
            }
        }
        complete
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// librdkafka callbacks: statistics (lag, broker state), errors, rebalances.
struct Ctx {
    stats: Arc<IngestStats>,
    log: LogLimiter,
}

impl ClientContext for Ctx {
    fn stats(&self, s: Statistics) {
        let up = s.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        let was = self.stats.broker_up.swap(up, Ordering::Relaxed);
        if was != up {
            tracing::warn!(up, "kafka broker connectivity changed");
        }
        let mut lag = self.stats.lag.lock();
        lag.clear();
        for (topic, t) in &s.topics {
            for (id, p) in &t.partitions {
                // librdkafka's own figure, or high watermark minus fetch position.
                let l = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.hi_offset >= 0 && p.next_offset >= 0 {
                    (p.hi_offset - p.next_offset).max(0)
                } else {
                    continue;
                };
                if *id >= 0 {
                    lag.insert((topic.clone(), *id), l);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)) {
            self.stats.broker_up.store(false, Ordering::Relaxed);
        }
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(error = %error, reason, suppressed, "kafka client error");
        }
    }
}

impl ConsumerContext for Ctx {}

/// Appends the ingest metrics in Prometheus text format.
pub fn render_metrics(stats: &IngestStats, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP moonx_ws_kafka_messages_consumed_total Valid Kafka messages consumed, by channel.\n# TYPE moonx_ws_kafka_messages_consumed_total counter");
    for ch in Channel::ALL {
        let _ = writeln!(
            out,
            "moonx_ws_kafka_messages_consumed_total{{channel=\"{}\"}} {}",
            ch.name(),
            stats.consumed[ch as usize].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP moonx_ws_kafka_messages_invalid_total Kafka messages skipped, by channel and reason.\n# TYPE moonx_ws_kafka_messages_invalid_total counter");
    for ch in Channel::ALL {
        for reason in Invalid::ALL {
            let _ = writeln!(
                out,
                "moonx_ws_kafka_messages_invalid_total{{channel=\"{}\",reason=\"{}\"}} {}",
                ch.name(),
                reason.as_str(),
                stats.invalid[ch as usize][reason as usize].load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(out, "# HELP moonx_ws_kafka_consumer_lag Messages behind the partition's high watermark.\n# TYPE moonx_ws_kafka_consumer_lag gauge");
    for ((topic, partition), lag) in stats.lag.lock().iter() {
        let _ = writeln!(out, "moonx_ws_kafka_consumer_lag{{topic=\"{topic}\",partition=\"{partition}\"}} {lag}");
    }
    let _ = writeln!(out, "# HELP moonx_ws_kafka_up Whether a Kafka broker connection is up.\n# TYPE moonx_ws_kafka_up gauge\nmoonx_ws_kafka_up {}", stats.broker_up.load(Ordering::Relaxed) as u8);
}
