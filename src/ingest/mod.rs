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
pub mod client;
mod consume;
mod embedded;
mod readback;
mod skip;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use crate::clock::Clock;
use crate::config::Config;
use crate::protocol::message::Channel;
use crate::recovery::{self, Hub};
use crate::shard::inbox::Publisher;
use crate::telemetry::{Exposition, Kind, LogLimiter};
use validate::Invalid;

/// Why ingest could not start (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka consumer: {0}")]
    Consumer(String),
    #[error("kafka settings: {0}")]
    Settings(#[from] client::ClientError),
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
    /// Partitions of each channel's topic, as the consumer last saw them
    /// (0: not known yet); a resume naming another partition is refused.
    pub partitions_of: [AtomicU32; 4],
    /// Partitions held up by an undecodable batch right now.
    pub stuck: AtomicU32,
    /// At least one broker connection is up.
    pub broker_up: AtomicBool,
    /// Every topic's partitions are assigned at known offsets: consuming.
    pub assigned: AtomicBool,
    /// The prices topic's tail was read back for snapshots (or needs not
    /// be): with `assigned`, the instance is ready.
    pub readback_done: AtomicBool,
    /// Messages read back on start, and the markets they left a value for.
    pub readback_messages: AtomicU64,
    pub readback_markets: AtomicU64,
    /// Markets read back but left out for the `WS_MAX_MARKETS` bound.
    pub readback_dropped: AtomicU64,
    /// How the clients reach the brokers (`SASL_SSL/SCRAM-SHA-512`, ...).
    pub security: Mutex<String>,
    /// Why the brokers refuse this client right now (a failed SASL login,
    /// an untrusted certificate, a refused TLS handshake), in librdkafka's
    /// words with any secret scrubbed; cleared once a broker connection is up.
    pub refused: Mutex<Option<String>>,
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
        if up {
            if let Some(reason) = self.refused.lock().take() {
                tracing::info!(was = %reason, "kafka: a broker accepted this client again");
            }
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
    /// The replay thread of resumes (`recovery::worker`).
    recovery: Option<JoinHandle<()>>,
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
        if let Some(t) = self.recovery.take() {
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

/// How long the consumer waits to fetch a partition whose local queue is
/// full (librdkafka's `fetch.queue.backoff.ms`, 1000 by default).
const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

/// The consumers' settings a `KAFKA_CONFIG_*` property may replace.
/// librdkafka waits `fetch.queue.backoff.ms` (1 s by default) before
/// fetching a partition again whenever its local queue passed a threshold:
/// a read-back of the prices topic on start passes one after every fetch
/// and crawled at a second per round (about 6 s for 1M messages instead of
/// under 2), and so would a replay.
fn set_defaults(config: &mut rdkafka::ClientConfig, client: &client::ClientSettings, client_id: &str) {
    let defaults = [
        ("client.id", client_id.to_owned()),
        ("log_level", "4".to_owned()),
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string()),
    ];
    for (name, value) in defaults {
        if client.get(name).is_none() {
            config.set(name, value);
        }
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
    recovery: Arc<Hub>,
) -> Result<Ingest, IngestError> {
    let mut ingest = Ingest { stop: Arc::new(AtomicBool::new(false)), consumer: None, recovery: None, broker: None };
    let topics = topics(cfg);
    let private: Vec<(String, Channel)> = topics.iter().filter(|(_, c)| c.is_private()).cloned().collect();
    // One set of properties for every client (the consumer, the demo feed).
    let client = client::ClientSettings::from_config(cfg)?;
    let (bootstrap, fetch_wait_ms) = match &cfg.kafka_brokers {
        Some(b) => (b.clone(), cfg.kafka_fetch_wait_max_ms.as_millis() as u64),
        None => {
            let names: Vec<String> = topics.iter().map(|(t, _)| t.clone()).collect();
            let demo = cfg.demo_feed.unwrap_or(true).then(|| cfg.kafka_topic_prices.clone());
            let stop = Arc::new(AtomicBool::new(false));
            if client.security() != "PLAINTEXT" {
                tracing::warn!(security = client.security(), "KAFKA_SECURITY_PROTOCOL applies to the embedded broker too, which speaks PLAINTEXT only: its clients will not connect");
            }
            let (addr, thread) = embedded::start(&names, demo, client.clone(), stop.clone())?;
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
    let refusals = Arc::new(Refusals::new(stats.clone(), client.clone()));
    let mut config = client.client_config(&bootstrap);
    set_defaults(&mut config, &client, &format!("moonx-ws-{instance_id}"));
    let consumer: BaseConsumer<Ctx> = config
        .set("group.id", &group)
        // Out of range is reported, not resolved silently: `consume.rs`
        // decides per topic where to go on, and says so.
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.max.bytes", cfg.kafka_consumer_fetch_max_bytes.to_string())
        .set("max.partition.fetch.bytes", cfg.kafka_consumer_max_partition_fetch_bytes.to_string())
        .set("statistics.interval.ms", "1000")
        .create_with_context(Ctx { refusals: refusals.clone(), log: LogLimiter::new(Duration::from_secs(10)) })
        .map_err(|e| IngestError::Consumer(client.redact(&e.to_string())))?;
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    // Property names only: values may be secrets. The security mode as
    // librdkafka holds it, read back from the client.
    let passthrough: Vec<&str> = cfg.kafka_config.iter().map(|(k, _)| k.as_str()).collect();
    let effective = |name| crate::sys::kafka::effective_property(consumer.client(), name).unwrap_or_default();
    let mut security = effective("security.protocol").to_ascii_uppercase();
    if security.starts_with("SASL_") {
        security = format!("{security}/{}", effective("sasl.mechanisms"));
    }
    tracing::info!(%bootstrap, group = %group, topics = ?names, security, properties = ?passthrough, "kafka consumer created");
    *stats.security.lock() = client.security().to_owned();
    let lookback = (!cfg.kafka_snapshot_lookback_ms.is_zero()).then(|| readback::Lookback {
        window: cfg.kafka_snapshot_lookback_ms,
        max_messages: i64::from(cfg.kafka_snapshot_max_messages),
        max_markets: cfg.ws_max_markets.get(),
    });
    if lookback.is_none() {
        stats.readback_done.store(true, Ordering::Release);
    }
    let settings = consume::Settings {
        lookback,
        topics,
        batch_size: cfg.kafka_consumer_batch_size.get(),
        refresh: cfg.kafka_topic_refresh_ms,
        clock: clock.clone(),
        refusals,
    };
    if let Some(incoming) = recovery.take_incoming() {
        let mut config = client.client_config(&bootstrap);
        set_defaults(&mut config, &client, &format!("moonx-ws-{instance_id}-recovery"));
        // Assigned partitions only: the group is never joined, nothing is
        // committed. A position gone from the log is an error (the resume
        // then answers recovered:false), never a silent jump.
        let replays: BaseConsumer = config
            .set("group.id", format!("{group}-recovery"))
            .set("auto.offset.reset", "error")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
            .create()
            .map_err(|e| IngestError::Consumer(client.redact(&e.to_string())))?;
        let settings = recovery::worker::Settings {
            topics: private,
            concurrency: cfg.ws_recovery_concurrency.get(),
            max_messages: cfg.ws_recovery_max_messages.get(),
            window_bytes: cfg.ws_recovery_window_bytes,
            clock: clock.clone(),
        };
        let (publisher, stop) = (publisher.clone(), ingest.stop.clone());
        let thread = std::thread::Builder::new()
            .name("kafka-recovery".into())
            .spawn(move || recovery::worker::run(replays, recovery, incoming, publisher, settings, stop))
            .map_err(|e| IngestError::Embedded(e.to_string()))?;
        ingest.recovery = Some(thread);
    }
    let stop = ingest.stop.clone();
    let thread = std::thread::Builder::new()
        .name("kafka-ingest".into())
        .spawn(move || consume::run(consumer, publisher, stats, settings, stop))
        .map_err(|e| IngestError::Embedded(e.to_string()))?;
    ingest.consumer = Some(thread);
    Ok(ingest)
}

/// The consumer's context: statistics and errors arrive as events on its
/// queue, read by `consume.rs`; librdkafka's log lines arrive here, on
/// librdkafka's threads.
struct Ctx {
    refusals: Arc<Refusals>,
    log: LogLimiter,
}

impl ClientContext for Ctx {
    /// Warnings and errors go to the service's log (scrubbed, at most one
    /// every 10 s); a refusal it reports only here (a TLS 1.3 server that
    /// rejects the client certificate after the handshake: the client
    /// learns it on its first read) is recorded as any other.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel::*;
        if !matches!(level, Emerg | Alert | Critical | Error | Warning) {
            return;
        }
        if matches!(level, Emerg | Alert | Critical | Error) && looks_refused(message) {
            self.refusals.refused(facility, message);
        } else if let Some(suppressed) = self.log.allow() {
            let message = self.refusals.redact(message);
            tracing::warn!(facility, suppressed, "librdkafka: {message}");
        }
    }
}

/// librdkafka's words for a broker refusing this client as configured
/// (its error codes say less: a TLS handshake on a plaintext listener is
/// a transport failure).
fn looks_refused(text: &str) -> bool {
    ["SSL handshake failed", "SSL transport error", "SASL authentication error", "in state AUTH"]
        .iter()
        .any(|w| text.contains(w))
}

/// The brokers refusing this client (a failed SASL login, an untrusted
/// certificate, a refused TLS handshake): `/health` shows why until a
/// broker connection is up (`IngestStats::refused`); logged at error when
/// it starts, then at most every
/// [`REFUSED_LOG_EVERY`] with the count held back. librdkafka keeps
/// retrying by itself.
pub(crate) struct Refusals {
    stats: Arc<IngestStats>,
    client: client::ClientSettings,
    log: LogLimiter,
}

/// How often a refusal that goes on is logged again after its first line.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

impl Refusals {
    fn new(stats: Arc<IngestStats>, client: client::ClientSettings) -> Self {
        Self { stats, client, log: LogLimiter::new(REFUSED_LOG_EVERY) }
    }

    /// `text` without any secret.
    pub(crate) fn redact(&self, text: &str) -> String {
        self.client.redact(text)
    }

    pub(crate) fn refused(&self, what: &str, reason: &str) {
        let reason = self.client.redact(reason);
        // One refusal shows as an error event and as log lines, with
        // different texts: a new one is one that starts, not a new text.
        let mut refused = self.stats.refused.lock();
        let new = refused.is_none();
        *refused = Some(reason.clone());
        drop(refused);
        self.stats.broker_up.store(false, Ordering::Relaxed);
        let security = self.client.security();
        if new {
            let _ = self.log.allow();
            tracing::error!(error = what, reason, security, "kafka: the broker refused this client; retrying (check the KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and KAFKA_SSL_* settings)");
        } else if let Some(suppressed) = self.log.allow() {
            tracing::error!(error = what, reason, security, suppressed, "kafka: the broker still refuses this client");
        }
    }
}

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
            Kind::Counter,
            "moonx_ws_kafka_readback_messages_total",
            "Prices messages read back on start for the markets' last values (KAFKA_SNAPSHOT_LOOKBACK_MS), not delivered.",
            self.readback_messages.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Gauge,
            "moonx_ws_kafka_readback_markets",
            "Markets given a last value by the read-back on start.",
            self.readback_markets.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Counter,
            "moonx_ws_kafka_readback_markets_dropped_total",
            "Markets read back on start but left out for the WS_MAX_MARKETS bound (the least recently updated).",
            self.readback_dropped.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Gauge,
            "moonx_ws_kafka_readback_done",
            "Whether the read-back on start is complete (until then the instance is not ready).",
            self.readback_done.load(Ordering::Relaxed) as u8,
        );
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
