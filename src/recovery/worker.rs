//! The replay thread: reads Kafka for resumes, off every shard's path.
//!
//! Owns: one Kafka consumer of its own (assigned partitions, no group
//! membership, no commits), at most `WS_RECOVERY_CONCURRENCY` partitions
//! assigned at a time, each for one shared scan (`scan.rs`); deadlines;
//! handing each result back to its shard. Values are validated and framed
//! as ingest frames live updates (`ingest::validate`, `Update::encode_at`),
//! so a replayed update is the live one with a fresh id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::scan::{Scan, Waiting};
use super::{Done, Hub, Outcome, Request};
use crate::clock::Clock;
use crate::ingest::validate::Validator;
use crate::protocol::message::Channel;
use crate::shard::inbox::{Publisher, Route, Update};
use crate::telemetry::LogLimiter;

/// How long a watermark query may take.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(2);
/// Most requests taken from the queue per round.
const INTAKE: usize = 4096;
/// Most messages read per round (then requests and deadlines again).
const READ_BATCH: usize = 4096;

pub struct Settings {
    /// The private channels' topics.
    pub topics: Vec<(String, Channel)>,
    pub concurrency: usize,
    pub max_messages: usize,
    pub clock: Clock,
}

type Part = (Channel, i32);

struct Worker {
    consumer: BaseConsumer,
    hub: Arc<Hub>,
    publisher: Publisher,
    settings: Settings,
    validator: Validator,
    waiting: HashMap<Part, Waiting>,
    scans: HashMap<Part, Scan>,
    out: Vec<(Request, Outcome)>,
    log: LogLimiter,
    /// How long requests may gather before their scan starts.
    max_wait: Duration,
}

/// Runs until `stop`.
pub fn run(
    consumer: BaseConsumer,
    hub: Arc<Hub>,
    incoming: Receiver<Request>,
    publisher: Publisher,
    settings: Settings,
    stop: Arc<AtomicBool>,
) {
    let max_wait = hub.timeout / 4;
    let mut w = Worker {
        consumer,
        hub,
        publisher,
        settings,
        validator: Validator::default(),
        waiting: HashMap::new(),
        scans: HashMap::new(),
        out: Vec::new(),
        log: LogLimiter::new(Duration::from_secs(10)),
        max_wait,
    };
    while !stop.load(Ordering::Acquire) {
        let idle = w.scans.is_empty() && w.waiting.values().all(|q| q.requests.is_empty());
        w.intake(&incoming, if idle { Duration::from_millis(100) } else { Duration::ZERO });
        let now = Instant::now();
        w.expire(now);
        w.start_due(now);
        w.read();
        w.finish_complete();
        for (req, outcome) in w.out.drain(..) {
            let done = Done { ticket: req.ticket, outcome };
            if !w.hub.give_back(req.shard, done, &stop) {
                break;
            }
        }
        if !idle && w.scans.is_empty() {
            // Requests gathering: wait a little rather than spin.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    tracing::debug!("recovery thread stopped");
}

impl Worker {
    fn topic(&self, channel: Channel) -> Option<&str> {
        self.settings.topics.iter().find(|(_, c)| *c == channel).map(|(t, _)| t.as_str())
    }

    fn channel_of(&self, topic: &str) -> Option<Channel> {
        self.settings.topics.iter().find(|(t, _)| t == topic).map(|(_, c)| *c)
    }

    fn intake(&mut self, incoming: &Receiver<Request>, wait: Duration) {
        let first = if wait.is_zero() { incoming.try_recv().ok() } else { incoming.recv_timeout(wait).ok() };
        let now = Instant::now();
        for req in first.into_iter().chain(incoming.try_iter().take(INTAKE)) {
            let part = (req.channel, req.since.0);
            let req = match self.scans.get_mut(&part) {
                Some(scan) => match scan.join(req) {
                    Ok(()) => continue,
                    Err(req) => req,
                },
                None => req,
            };
            self.waiting.entry(part).or_default().push(req, now);
        }
    }

    fn expire(&mut self, now: Instant) {
        for w in self.waiting.values_mut() {
            w.expire(now, &mut self.out);
        }
        self.waiting.retain(|_, w| !w.requests.is_empty());
        let mut emptied = Vec::new();
        for (part, scan) in self.scans.iter_mut() {
            scan.expire(now, &mut self.out);
            if scan.is_empty() {
                emptied.push(*part);
            }
        }
        for part in emptied {
            self.scans.remove(&part);
            self.unassign(part);
        }
    }

    /// Starts the scans whose requests have gathered, as many as allowed.
    fn start_due(&mut self, now: Instant) {
        let due: Vec<Part> = self
            .waiting
            .iter()
            .filter(|(part, w)| !self.scans.contains_key(part) && w.due(now, self.max_wait))
            .map(|(part, _)| *part)
            .collect();
        for part in due {
            if self.scans.len() >= self.settings.concurrency {
                return;
            }
            let Some(reqs) = self.waiting.remove(&part).map(|mut w| w.take()) else { continue };
            let Some(topic) = self.topic(part.0).map(str::to_owned) else {
                self.out.extend(reqs.into_iter().map(|r| (r, Outcome::Unavailable)));
                continue;
            };
            let (low, high) = match self.consumer.fetch_watermarks(&topic, part.1, WATERMARKS_TIMEOUT) {
                Ok(marks) => marks,
                Err(e) => {
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(topic, partition = part.1, error = %e, suppressed, "recovery: kafka watermarks unavailable; resumes answered recovered:false");
                    }
                    self.out.extend(reqs.into_iter().map(|r| (r, Outcome::Unavailable)));
                    continue;
                }
            };
            let Some(scan) = Scan::start(reqs, low, high, self.settings.max_messages, &mut self.out) else {
                continue;
            };
            let mut tpl = TopicPartitionList::new();
            if tpl.add_partition_offset(&topic, part.1, Offset::Offset(scan.next)).is_err()
                || self.consumer.incremental_assign(&tpl).is_err()
            {
                if let Some(suppressed) = self.log.allow() {
                    tracing::warn!(topic, partition = part.1, suppressed, "recovery: kafka assignment failed");
                }
                scan.abandon(|| Outcome::Unavailable, &mut self.out);
                continue;
            }
            self.hub.stats.scans.fetch_add(1, Ordering::Relaxed);
            self.scans.insert(part, scan);
        }
    }

    /// Reads what the assigned partitions have, up to a batch.
    fn read(&mut self) {
        if self.scans.is_empty() {
            return;
        }
        let mut timeout = Duration::from_millis(10);
        for _ in 0..READ_BATCH {
            let Some(result) = self.consumer.poll(timeout) else {
                self.positions();
                return;
            };
            timeout = Duration::ZERO;
            let m = match result {
                Ok(m) => m,
                Err(e) => {
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(error = %e, suppressed, "recovery: kafka read failed");
                    }
                    continue;
                }
            };
            let Some(channel) = self.channel_of(m.topic()) else { continue };
            let (partition, offset) = (m.partition(), m.offset());
            let Some(scan) = self.scans.get_mut(&(channel, partition)) else { continue };
            if offset < scan.next {
                continue;
            }
            self.hub.stats.read.fetch_add(1, Ordering::Relaxed);
            let value = m.payload().unwrap_or_default();
            let route = self.validator.route(channel, value).ok();
            let user: Option<Box<str>> = match &route {
                Some(Route::User { user, .. }) => Some(user.clone()),
                _ => None,
            };
            let (publisher, clock) = (&self.publisher, &self.settings.clock);
            let make = || {
                let id = publisher.next_id(&mut itoa::Buffer::new());
                let route = route.expect("a user's update has a route");
                Arc::new(Update::encode_at(route, &id, clock.epoch_ms(), Some((partition, offset)), value))
            };
            scan.message(offset, user.as_deref(), make, &mut self.out);
        }
    }

    /// Where the consumer stands on each scan's partition: offsets below
    /// that never came as messages (transaction markers) are passed.
    fn positions(&mut self) {
        let Ok(tpl) = self.consumer.position() else { return };
        for e in tpl.elements() {
            let (Some(channel), Offset::Offset(next)) = (self.channel_of(e.topic()), e.offset()) else { continue };
            if let Some(scan) = self.scans.get_mut(&(channel, e.partition())) {
                scan.reached(next);
            }
        }
    }

    /// Ends the scans read to their end (the end read again first when a
    /// request joined after it was read).
    fn finish_complete(&mut self) {
        let parts: Vec<Part> = self.scans.keys().copied().collect();
        for part in parts {
            let topic = self.topic(part.0).map(str::to_owned);
            let scan = self.scans.get_mut(&part).expect("listed");
            if scan.next >= scan.end && scan.requery {
                let Some(topic) = topic else { continue };
                match self.consumer.fetch_watermarks(&topic, part.1, WATERMARKS_TIMEOUT) {
                    Ok((_, high)) => scan.extend(high),
                    Err(_) => continue, // again next round, until the deadlines
                }
            }
            if scan.complete() {
                let scan = self.scans.remove(&part).expect("listed");
                scan.finish(&mut self.out);
                self.unassign(part);
            }
        }
    }

    fn unassign(&mut self, part: Part) {
        let Some(topic) = self.topic(part.0).map(str::to_owned) else { return };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, part.1);
        if let Err(e) = self.consumer.incremental_unassign(&tpl) {
            if let Some(suppressed) = self.log.allow() {
                tracing::warn!(topic, partition = part.1, error = %e, suppressed, "recovery: kafka unassign failed");
            }
        }
    }
}
