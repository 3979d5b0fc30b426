//! The ingest thread: reads the consumer's events, hands valid values to
//! the shards as updates, and keeps every partition moving.
//!
//! Owns the consume loop and what it does about a partition in trouble:
//! - a position outside the retained log (offset out of range:
//!   `auto.offset.reset=error`, so librdkafka reports it instead of jumping
//!   silently) moves to the earliest retained offset for a private topic
//!   (deliver what is left) and to the end for prices (a live feed), logged
//!   with the skipped range and counted per partition;
//! - a batch that cannot be decoded is stepped over (`skip.rs`) while every
//!   other partition keeps flowing: counted, logged at error with its
//!   offsets, and `/health` degraded until the partition moves again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::assign::{Assignment, METADATA_TIMEOUT};
use super::readback::{Lookback, Readback};
use super::skip::{BatchEnd, Next, Seen};
use super::validate::Validator;
use super::{Ctx, IngestStats, PartitionStat, Refusals};
use crate::clock::Clock;
use crate::protocol::message::Channel;
use crate::shard::inbox::{Publisher, Update};
use crate::sys::kafka::{Event, EventQueue, Message};
use crate::telemetry::LogLimiter;

/// What the loop needs besides the consumer.
pub(super) struct Settings {
    /// The read-back of the prices topic on start, unless turned off.
    pub lookback: Option<Lookback>,
    pub topics: [(String, Channel); 4],
    pub batch_size: usize,
    /// How often metadata is re-read for new topics and partitions.
    pub refresh: Duration,
    /// Stamps each update's envelope.
    pub clock: Clock,
    /// Where a broker's refusal of this client is recorded and logged.
    pub refusals: Arc<Refusals>,
}

/// How long a probe of an undecodable batch waits for the partition to
/// answer before it is sent again (a slow broker, not an answer).
const PROBE_WAIT: Duration = Duration::from_secs(3);
/// Probes sent again before one without an answer counts as past the batch.
const PROBE_RETRIES: u8 = 3;

/// Runs until `stop` is set.
pub(super) fn run(
    consumer: BaseConsumer<Ctx>,
    publisher: Publisher,
    stats: Arc<IngestStats>,
    settings: Settings,
    stop: Arc<AtomicBool>,
) {
    let Some(mut events) = EventQueue::of(&consumer) else {
        tracing::error!("kafka: the consumer has no event queue; nothing will be consumed");
        return;
    };
    let mut assignment = Assignment::new(settings.topics.iter().map(|(t, _)| t.clone()));
    let mut state = State::new(&settings, stats.clone());
    let mut batch: Vec<Update> = Vec::with_capacity(settings.batch_size);
    let mut next_refresh = Instant::now();
    // The prices topic is the one whose tail is read back.
    let prices = settings.topics.iter().position(|(_, c)| *c == Channel::Prices);
    while !stop.load(Ordering::Acquire) {
        if Instant::now() >= next_refresh {
            let readback = prices.zip(state.readback.as_mut());
            let complete = assignment.refresh(&consumer, &stop, readback);
            for (t, (_, channel)) in settings.topics.iter().enumerate() {
                stats.partitions_of[*channel as usize].store(assignment.partitions_of(t), Ordering::Relaxed);
            }
            if complete {
                stats.assigned.store(true, Ordering::Release);
            }
            next_refresh = Instant::now() + if complete { settings.refresh } else { Duration::from_millis(500) };
        }
        let mut timeout = Duration::from_millis(100);
        while batch.len() < settings.batch_size {
            if !events.poll(timeout, |ev| state.on_event(ev, &publisher, &mut batch)) {
                break;
            }
            timeout = Duration::ZERO;
        }
        if !batch.is_empty() {
            publisher.publish_batch(batch.drain(..));
        }
        state.act(&consumer);
        state.read_back(&consumer, &publisher);
    }
    tracing::info!("kafka consumer stopped");
}

/// A partition by topic index and number.
type Part = (usize, i32);

/// What the event callback found that needs the consumer (a seek, a
/// watermark query): done after the poll, outside the callback.
enum Todo {
    OutOfRange { part: Part, at: i64 },
    Undecodable { part: Part, base: i64, code: RDKafkaErrorCode, reason: String },
}

/// A partition stepping over an undecodable batch.
struct Stuck {
    search: BatchEnd,
    /// The probe in flight and when it was sent.
    probe: i64,
    sent: Instant,
    retries: u8,
}

struct State {
    topics: Vec<String>,
    channels: Vec<Channel>,
    stats: Arc<IngestStats>,
    validator: Validator,
    clock: Clock,
    ids: itoa::Buffer,
    /// Next offset to read, per topic and partition (grown as partitions
    /// show up; bounded by the partitions assigned).
    next: Vec<Vec<i64>>,
    stuck: HashMap<Part, Stuck>,
    /// What a probe of a stuck partition saw during the last poll, with
    /// the probe it answers.
    probe_seen: Vec<(Part, i64, Seen)>,
    todo: Vec<Todo>,
    invalid_log: LogLimiter,
    error_log: LogLimiter,
    librdkafka_log: LogLimiter,
    refusals: Arc<Refusals>,
    /// The prices read-back on start, until it is handed over.
    readback: Option<Readback>,
}

impl State {
    fn new(settings: &Settings, stats: Arc<IngestStats>) -> Self {
        Self {
            topics: settings.topics.iter().map(|(t, _)| t.clone()).collect(),
            channels: settings.topics.iter().map(|(_, c)| *c).collect(),
            stats,
            validator: Validator::default(),
            clock: settings.clock.clone(),
            ids: itoa::Buffer::new(),
            next: vec![Vec::new(); settings.topics.len()],
            stuck: HashMap::new(),
            probe_seen: Vec::new(),
            todo: Vec::new(),
            invalid_log: LogLimiter::new(Duration::from_secs(5)),
            error_log: LogLimiter::new(Duration::from_secs(5)),
            librdkafka_log: LogLimiter::new(Duration::from_secs(10)),
            refusals: settings.refusals.clone(),
            readback: settings.lookback.map(|l| Readback::new(l, settings.clock.epoch_ms())),
        }
    }

    /// Moves the read-back on: partitions whose consumer position passed
    /// their end (over control records or compacted gaps) are done; once
    /// all are, the values go to the shards and the instance may be ready.
    fn read_back(&mut self, consumer: &BaseConsumer<Ctx>, publisher: &Publisher) {
        let Some(rb) = self.readback.as_mut() else { return };
        let Some(t) = self.channels.iter().position(|c| *c == Channel::Prices) else { return };
        let pending: Vec<i32> = rb.pending().collect();
        // Positions only matter where messages stop short of the end (a
        // control record, a compacted gap): looked at now and then.
        if !pending.is_empty() && rb.position_check_due() {
            if let Ok(positions) = consumer.position() {
                for p in pending {
                    if let Some(Offset::Offset(next)) = positions.find_partition(&self.topics[t], p).map(|e| e.offset())
                    {
                        rb.reached(p, next);
                    }
                }
            }
        }
        self.stats.readback_messages.store(rb.messages, Ordering::Relaxed);
        self.stats.readback_dropped.store(rb.dropped, Ordering::Relaxed);
        if let Some(markets) = rb.finish_if_done(publisher) {
            self.stats.readback_markets.store(markets as u64, Ordering::Relaxed);
            self.stats.readback_dropped.store(rb.dropped, Ordering::Relaxed);
            self.stats.readback_done.store(true, Ordering::Release);
            self.readback = None;
        }
    }

    fn topic(&self, name: &str) -> Option<usize> {
        self.topics.iter().position(|t| t == name)
    }

    fn on_event(&mut self, ev: Event<'_>, publisher: &Publisher, batch: &mut Vec<Update>) {
        match ev {
            Event::Message(m) => self.on_message(m, publisher, batch),
            Event::PartitionError { topic, partition, offset, code, reason } => {
                let Some(t) = self.topic(topic) else { return };
                self.on_partition_error((t, partition), offset, code, reason);
            }
            Event::Error { code, reason, fatal } => {
                if code == RDKafkaErrorCode::AllBrokersDown {
                    self.stats.broker_up.store(false, Ordering::Relaxed);
                }
                if is_refusal(code, reason) {
                    self.refusals.refused(&code.to_string(), reason);
                } else if let Some(suppressed) = self.error_log.allow() {
                    let reason = self.refusals.redact(reason);
                    tracing::warn!(error = %code, reason, fatal, suppressed, "kafka client error");
                }
            }
            Event::Stats(json) => self.stats.apply_statistics(json),
            Event::Log { level, facility, message } => {
                // librdkafka's warnings and errors (a refused login, an
                // unreachable broker); its chatter below that stays out.
                if level <= 4 {
                    if let Some(suppressed) = self.librdkafka_log.allow() {
                        let message = self.refusals.redact(message);
                        tracing::warn!(facility, suppressed, "librdkafka: {message}");
                    }
                }
            }
        }
    }

    fn on_message(&mut self, m: Message<'_>, publisher: &Publisher, batch: &mut Vec<Update>) {
        let Some(t) = self.topic(m.topic) else { return };
        let part = (t, m.partition);
        if let Some(stuck) = self.stuck.get(&part) {
            // Read while probing for a bad batch's end: not delivered now
            // (the partition resumes at that end, before this record).
            if m.offset >= stuck.probe {
                self.probe_seen.push((part, stuck.probe, Seen::Past));
            }
            return;
        }
        let Ok(p) = usize::try_from(m.partition) else { return };
        let next = &mut self.next[t];
        if next.len() <= p {
            next.resize(p + 1, -1);
        }
        next[p] = m.offset + 1;
        let channel = self.channels[t];
        if channel == Channel::Prices {
            if let Some(rb) = self.readback.as_mut().filter(|rb| rb.wants(m.partition, m.offset)) {
                // Read back for its market's last value, not delivered; its
                // envelope will carry the Kafka timestamp, so it shows its age.
                let route = self.validator.route(channel, m.payload).ok();
                rb.take((m.partition, m.offset), m.timestamp_ms, route, m.payload, self.clock.epoch_ms());
                return;
            }
        }
        match self.validator.route(channel, m.payload) {
            Ok(route) => {
                if let Some(rb) = self.readback.as_mut() {
                    rb.live(&route);
                }
                self.stats.consumed[channel as usize].fetch_add(1, Ordering::Relaxed);
                let id = publisher.next_id(&mut self.ids);
                let pos = Some((m.partition, m.offset));
                let mut update = Update::encode_at(route, &id, self.clock.epoch_ms(), pos, m.payload);
                update.kafka_ts_ms = m.timestamp_ms;
                batch.push(update);
            }
            Err(reason) => {
                self.stats.invalid[channel as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.invalid_log.allow() {
                    tracing::warn!(
                        topic = m.topic,
                        partition = m.partition,
                        offset = m.offset,
                        reason = reason.as_str(),
                        suppressed,
                        "skipping invalid Kafka value"
                    );
                }
            }
        }
    }

    fn on_partition_error(&mut self, part: Part, offset: i64, code: RDKafkaErrorCode, reason: &str) {
        match code {
            RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange => {
                self.todo.push(Todo::OutOfRange { part, at: offset });
            }
            RDKafkaErrorCode::BadCompression
            | RDKafkaErrorCode::NotImplemented
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::MessageSizeTooLarge => match self.stuck.get(&part) {
                Some(stuck) => {
                    // The same batch again: the probe is inside it; another
                    // batch's error: the probe got past this one.
                    let seen = if offset == stuck.search.base { Seen::Stuck } else { Seen::Past };
                    self.probe_seen.push((part, stuck.probe, seen));
                }
                None => self.todo.push(Todo::Undecodable { part, base: offset, code, reason: reason.to_owned() }),
            },
            RDKafkaErrorCode::PartitionEOF => {}
            _ => {
                if let Some(suppressed) = self.error_log.allow() {
                    tracing::warn!(
                        topic = %self.topics[part.0],
                        partition = part.1,
                        offset,
                        error = %code,
                        reason,
                        suppressed,
                        "kafka consume error"
                    );
                }
            }
        }
    }

    /// Does what the last poll found needed, and sends probes again.
    fn act(&mut self, consumer: &BaseConsumer<Ctx>) {
        for todo in std::mem::take(&mut self.todo) {
            match todo {
                Todo::OutOfRange { part, at } => self.out_of_range(consumer, part, at),
                Todo::Undecodable { part, base, code, reason } => {
                    if !self.stuck.contains_key(&part) {
                        self.undecodable(consumer, part, base, code, &reason);
                    }
                }
            }
        }
        for (part, probe, seen) in std::mem::take(&mut self.probe_seen) {
            // The first answer to the probe in flight counts; the rest of
            // the same fetch (and anything older) says nothing more.
            let Some(stuck) = self.stuck.get_mut(&part) else { continue };
            if stuck.probe != probe {
                continue;
            }
            stuck.search.seen(probe, seen);
            self.step(consumer, part);
        }
        let now = Instant::now();
        let late: Vec<Part> = self.stuck.iter().filter(|(_, s)| now - s.sent >= PROBE_WAIT).map(|(p, _)| *p).collect();
        for part in late {
            let Some(stuck) = self.stuck.get_mut(&part) else { continue };
            stuck.retries += 1;
            if stuck.retries > PROBE_RETRIES {
                // Records exist past the probe (it is below the end), yet
                // none came: count it as past rather than wait forever.
                let probe = stuck.probe;
                stuck.search.seen(probe, Seen::Past);
                stuck.retries = 0;
                self.step(consumer, part);
            } else {
                let probe = stuck.probe;
                stuck.sent = now;
                self.seek(consumer, part, probe);
            }
        }
    }

    /// A position outside the retained log: move to where delivery can go on.
    fn out_of_range(&mut self, consumer: &BaseConsumer<Ctx>, part: Part, at: i64) {
        let (t, p) = part;
        let topic = self.topics[t].clone();
        let at = if at >= 0 { at } else { self.next[t].get(p as usize).copied().unwrap_or(-1) };
        let (low, high) = match consumer.fetch_watermarks(&topic, p, METADATA_TIMEOUT) {
            Ok(w) => w,
            Err(e) => {
                // Retried when librdkafka reports the partition again.
                if let Some(suppressed) = self.error_log.allow() {
                    tracing::warn!(topic, partition = p, error = %e, suppressed, "kafka: offset out of range, and the watermarks are unavailable");
                }
                self.todo.push(Todo::OutOfRange { part, at });
                return;
            }
        };
        let private = self.channels[t].is_private();
        let to = reset_target(private, at, low, high);
        let skipped = if at >= 0 { (to - at).max(0) as u64 } else { 0 };
        if self.stuck.remove(&part).is_some() {
            self.stats.stuck.fetch_sub(1, Ordering::Relaxed);
        }
        self.seek(consumer, part, to);
        self.stats.partition(&topic, p, |s: &mut PartitionStat| {
            s.resets += 1;
            s.skipped_out_of_range += skipped;
        });
        let what = if to == at {
            "the position is still retained: nothing skipped"
        } else if private {
            "resuming at the earliest retained offset (retention passed the consumer, or the topic was recreated)"
        } else {
            "prices resume at the end"
        };
        tracing::warn!(topic, partition = p, from = at, to, skipped, low, high, "kafka: offset out of range; {what}");
    }

    /// The first error of a batch that cannot be decoded: start stepping over it.
    fn undecodable(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        part: Part,
        base: i64,
        code: RDKafkaErrorCode,
        reason: &str,
    ) {
        let (t, p) = part;
        let topic = self.topics[t].clone();
        let end = match consumer.fetch_watermarks(&topic, p, METADATA_TIMEOUT) {
            Ok((_, high)) => high,
            Err(_) => base + 1, // probes then start at the next offset; corrected as they go
        };
        self.stats.partition(&topic, p, |s| s.undecodable += 1);
        self.stats.stuck.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            topic,
            partition = p,
            offset = base,
            error = %code,
            reason,
            "kafka: a batch of this partition cannot be decoded; stepping over it (other partitions are not held up)"
        );
        self.stuck
            .insert(part, Stuck { search: BatchEnd::new(base, end), probe: base, sent: Instant::now(), retries: 0 });
        self.step(consumer, part);
    }

    /// Sends the next probe, or resumes after the bad batch.
    fn step(&mut self, consumer: &BaseConsumer<Ctx>, part: Part) {
        let Some(stuck) = self.stuck.get_mut(&part) else { return };
        match stuck.search.next() {
            Next::Probe(at) => {
                stuck.probe = at;
                stuck.sent = Instant::now();
                stuck.retries = 0;
                self.seek(consumer, part, at);
            }
            Next::Resume(at) => {
                let base = stuck.search.base;
                self.stuck.remove(&part);
                self.stats.stuck.fetch_sub(1, Ordering::Relaxed);
                let (t, p) = part;
                let topic = self.topics[t].clone();
                self.stats.partition(&topic, p, |s| s.skipped_undecodable += (at - base) as u64);
                self.seek(consumer, part, at);
                tracing::error!(
                    topic,
                    partition = p,
                    from = base,
                    to = at,
                    skipped = at - base,
                    "kafka: skipped an undecodable batch; the partition is consumed again from the offset after it"
                );
            }
        }
    }

    /// Moves the partition's position to `at`. A seek needs a partition
    /// that is fetching; one stopped by an offset-out-of-range report
    /// (`auto.offset.reset=error` leaves it idle) is assigned again there.
    fn seek(&mut self, consumer: &BaseConsumer<Ctx>, (t, p): Part, at: i64) {
        let topic = &self.topics[t];
        let result = match consumer.seek(topic, p, Offset::Offset(at), METADATA_TIMEOUT) {
            Err(KafkaError::Seek(_)) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, p);
                consumer.incremental_unassign(&tpl).and_then(|()| {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(topic, p, Offset::Offset(at))?;
                    consumer.incremental_assign(&tpl)
                })
            }
            other => other,
        };
        if let Err(e) = result {
            if let Some(suppressed) = self.error_log.allow() {
                tracing::warn!(topic, partition = p, offset = at, error = %e, suppressed, "kafka: moving a partition's position failed");
            }
        }
    }
}

/// Errors that say the brokers refuse this client as configured: a failed
/// SASL login, a TLS handshake that failed (an untrusted or expired
/// certificate, a TLS client on a plaintext listener, which librdkafka
/// reports as a transport error), a connection dropped while logging in, a
/// mechanism or access the broker does not grant.
fn is_refusal(code: RDKafkaErrorCode, reason: &str) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SSL
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::UnsupportedSASLMechanism
            | RDKafkaErrorCode::IllegalSASLState
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
    ) || (code == RDKafkaErrorCode::BrokerTransportFailure && super::looks_refused(reason))
}

/// Where a partition whose position `at` fell outside `low..=high` (or
/// was reported so) goes on: a private topic delivers what is left (from
/// the earliest retained offset, or from `at` if it is still there);
/// prices go live (the end), unless `at` is still there.
fn reset_target(private: bool, at: i64, low: i64, high: i64) -> i64 {
    let retained = at >= low && at <= high;
    match (retained, private) {
        (true, _) => at,
        (false, true) => low,
        (false, false) => high,
    }
}

#[cfg(test)]
mod tests {
    use super::reset_target;

    #[test]
    fn private_topics_resume_at_what_is_left_and_prices_at_the_end() {
        // Retention passed the position: private deliver from the oldest left.
        assert_eq!(reset_target(true, 10, 500, 900), 500);
        assert_eq!(reset_target(false, 10, 500, 900), 900);
        // The topic was recreated (position past its end): all of it is new.
        assert_eq!(reset_target(true, 5_000, 0, 30), 0);
        assert_eq!(reset_target(false, 5_000, 0, 30), 30);
        // Reported out of range but still retained: nothing is skipped.
        assert_eq!(reset_target(true, 600, 500, 900), 600);
        assert_eq!(reset_target(false, 600, 500, 900), 600);
    }
}
