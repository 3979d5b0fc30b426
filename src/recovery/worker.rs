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

use super::scan::{ReadOffsets, Scan, Waiting, Window};
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
/// A window no resume used for this long is dropped (a storm's stragglers
/// come within seconds).
const WINDOW_IDLE: Duration = Duration::from_secs(30);
/// How long a seek past a window may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Settings {
    /// The private channels' topics.
    pub topics: Vec<(String, Channel)>,
    pub concurrency: usize,
    pub max_messages: usize,
    /// `WS_RECOVERY_WINDOW_BYTES`: what the partitions' windows may hold,
    /// together.
    pub window_bytes: usize,
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
    /// What earlier scans read, by partition (a running scan holds its own).
    windows: HashMap<Part, Window>,
    /// Every offset read for replays, by partition (to count re-reads).
    read_offsets: HashMap<Part, ReadOffsets>,
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
        windows: HashMap::new(),
        read_offsets: HashMap::new(),
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
        w.bound_windows(now);
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
            let req = match (self.scans.get_mut(&part), self.windows.get_mut(&part)) {
                (Some(scan), _) => match scan.join(req, now, &mut self.out) {
                    Ok(()) => continue,
                    Err(req) => req,
                },
                // All of it in what earlier scans read: answered now.
                (None, Some(window)) => match window.serve(req, self.settings.max_messages, now) {
                    Ok(done) => {
                        self.out.push(done);
                        continue;
                    }
                    Err(req) => req,
                },
                (None, None) => req,
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
            self.end_scan(part);
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
            // A window past the partition's end is of a recreated topic.
            let prior = self.windows.remove(&part).filter(|w| w.end() <= high);
            let mut scan = match Scan::start(reqs, (low, high), prior, self.settings.max_messages, now, &mut self.out) {
                Ok(scan) => scan,
                Err(prior) => {
                    // Each was settled without a read (what earlier scans
                    // read may have served it whole).
                    self.windows.extend(prior.map(|w| (part, w)));
                    continue;
                }
            };
            let mut tpl = TopicPartitionList::new();
            if tpl.add_partition_offset(&topic, part.1, Offset::Offset(scan.next())).is_err()
                || self.consumer.incremental_assign(&tpl).is_err()
            {
                if let Some(suppressed) = self.log.allow() {
                    tracing::warn!(topic, partition = part.1, suppressed, "recovery: kafka assignment failed");
                }
                let window = scan.abandon(|| Outcome::Unavailable, &mut self.out);
                self.windows.insert(part, window);
                continue;
            }
            scan.joinable_until = Some(now + self.hub.timeout / 2);
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
            if offset < scan.next() {
                continue;
            }
            self.hub.stats.read.fetch_add(1, Ordering::Relaxed);
            if self.read_offsets.entry((channel, partition)).or_default().read(offset) {
                self.hub.stats.reread.fetch_add(1, Ordering::Relaxed);
            }
            let value = m.payload().unwrap_or_default();
            // Every private update is framed, wanted now or not: the
            // window keeps it for the resumes still to come.
            let update = match self.validator.route(channel, value) {
                Ok(route @ Route::User { .. }) => {
                    let id = self.publisher.next_id(&mut itoa::Buffer::new());
                    let now_ms = self.settings.clock.epoch_ms();
                    Some(Arc::new(Update::encode_at(route, &id, now_ms, Some((partition, offset)), value)))
                }
                _ => None,
            };
            scan.message(offset, update, &mut self.out);
            let complete = scan.complete();
            self.seek_past_window((channel, partition));
            if complete {
                // Now, not after the batch: what the consumer fetched
                // past the end is not read, and the window ends where the
                // consumer stands (the next scan may start there).
                self.end_scan((channel, partition));
            }
        }
    }

    /// Settles a scan's requests, keeps what it read, frees its partition.
    fn end_scan(&mut self, part: Part) {
        let Some(mut scan) = self.scans.remove(&part) else { return };
        scan.settle_passed(&mut self.out);
        debug_assert!(scan.is_empty(), "ended complete or empty");
        self.windows.insert(part, scan.into_window());
        self.unassign(part);
    }

    /// Moves the reader past a window the scan of `part` reached.
    fn seek_past_window(&mut self, part: Part) {
        let Some(to) = self.scans.get_mut(&part).and_then(|s| s.seek.take()) else { return };
        let Some(topic) = self.topic(part.0) else { return };
        if let Err(e) = self.consumer.seek(topic, part.1, Offset::Offset(to), SEEK_TIMEOUT) {
            // The reads go on through the window instead; the scan skips them.
            if let Some(suppressed) = self.log.allow() {
                tracing::warn!(topic, partition = part.1, error = %e, suppressed, "recovery: kafka seek failed");
            }
        }
    }

    /// Drops the windows idle for [`WINDOW_IDLE`], then holds all of them
    /// to `WS_RECOVERY_WINDOW_BYTES`: the least recently used idle ones go
    /// first, then the running scans' oldest reads.
    fn bound_windows(&mut self, now: Instant) {
        self.windows.retain(|_, w| now.saturating_duration_since(w.used) < WINDOW_IDLE);
        let budget = self.settings.window_bytes;
        let running: usize = self.scans.values().map(Scan::window_bytes).sum();
        let mut total = running + self.windows.values().map(Window::bytes).sum::<usize>();
        while total > budget {
            let Some(part) = self.windows.iter().min_by_key(|(_, w)| w.used).map(|(p, _)| *p) else { break };
            total -= self.windows.remove(&part).map_or(0, |w| w.bytes());
        }
        if total > budget {
            let share = budget / self.scans.len().max(1);
            for scan in self.scans.values_mut() {
                scan.trim_window(share);
            }
            total = self.scans.values().map(Scan::window_bytes).sum();
        }
        self.hub.stats.window_bytes.store(total as u64, Ordering::Relaxed);
    }

    /// Where the consumer stands on each scan's partition: offsets below
    /// that never came as messages (transaction markers) are passed.
    fn positions(&mut self) {
        let Ok(tpl) = self.consumer.position() else { return };
        for e in tpl.elements() {
            let (Some(channel), Offset::Offset(next)) = (self.channel_of(e.topic()), e.offset()) else { continue };
            let part = (channel, e.partition());
            if let Some(scan) = self.scans.get_mut(&part) {
                scan.reached(next, &mut self.out);
                self.seek_past_window(part);
            }
        }
    }

    /// Settles the requests read to their end, and ends the scans with
    /// none left or read to their end (read again first when a request
    /// without `until` joined after it was read).
    fn finish_complete(&mut self) {
        let parts: Vec<Part> = self.scans.keys().copied().collect();
        for part in parts {
            let topic = self.topic(part.0).map(str::to_owned);
            let scan = self.scans.get_mut(&part).expect("listed");
            if scan.next() >= scan.end && scan.requery {
                let Some(topic) = topic else { continue };
                match self.consumer.fetch_watermarks(&topic, part.1, WATERMARKS_TIMEOUT) {
                    Ok((_, high)) => scan.extend(high),
                    Err(_) => continue, // again next round, until the deadlines
                }
            }
            scan.settle_passed(&mut self.out);
            if scan.complete() || scan.is_empty() {
                self.end_scan(part);
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
