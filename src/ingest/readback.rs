//! Last values on start (PROTOCOL.md §11): before `/health/ready`, the
//! tail of the prices topic is read back into the shards' last-value
//! tables without being delivered, so a market has a snapshot right after a
//! restart.
//!
//! Owns: where each prices partition starts (the first offset inside
//! `KAFKA_SNAPSHOT_LOOKBACK_MS`, found with offsets-for-times, and never
//! more than `KAFKA_SNAPSHOT_MAX_MESSAGES` before the end), where it ends
//! (the high watermark read at start: from there on updates are live), and
//! the newest value per market read in between. When every partition has
//! reached its end, those values go to the shards as replayed updates,
//! oldest first, and the instance may turn ready.
//!
//! A live update of a market that arrives while others are still being read
//! back wins: the market's read-back value is dropped, so a shard's table
//! never goes back to an older value.
//!
//! Offsets-for-times may answer "none" either because every message is
//! older than the lookback or because the broker cannot say (librdkafka's
//! mock cluster); both read the last `KAFKA_SNAPSHOT_MAX_MESSAGES` and keep
//! only what is inside the lookback by each message's timestamp, so the
//! answer is the same and the cost bounded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::assign::METADATA_TIMEOUT;
use crate::protocol::channel::Market;
use crate::protocol::message::Pos;
use crate::shard::inbox::{Publisher, Route, Update};

/// What to read back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lookback {
    /// Messages older than this (by their timestamp) are left out.
    pub window: Duration,
    /// At most this many messages per partition are read back.
    pub max_messages: i64,
    /// Markets kept (`WS_MAX_MARKETS`): the most recently updated.
    pub max_markets: usize,
}

/// A market's newest value read back: encoded only when handed over, so
/// the many values a busy market had before it cost a copy each, no more.
struct Kept {
    seq: u64,
    /// Its Kafka position (the envelope's `pos`).
    pos: Pos,
    /// The envelope's timestamp: the Kafka message's.
    timestamp_ms: u64,
    value: Vec<u8>,
}

/// The read-back in progress.
pub(super) struct Readback {
    lookback: Lookback,
    /// Messages older than this (ms since the epoch) are not kept.
    cutoff_ms: i64,
    /// Prices partitions still being read, and the offset live starts at.
    until: HashMap<i32, i64>,
    /// Every prices partition has been given its range.
    assigned: bool,
    /// The newest value read per market, with the order it came in.
    values: HashMap<Market, Kept>,
    seq: u64,
    pub messages: u64,
    /// Markets whose read-back value was dropped for the `max_markets`
    /// bound (the least recently updated).
    pub dropped: u64,
    started: Instant,
    next_position_check: Instant,
    finished: bool,
}

impl Readback {
    pub fn new(lookback: Lookback, now_ms: u64) -> Self {
        Self {
            lookback,
            cutoff_ms: now_ms.saturating_sub(lookback.window.as_millis() as u64) as i64,
            until: HashMap::new(),
            assigned: false,
            values: HashMap::new(),
            seq: 0,
            messages: 0,
            dropped: 0,
            started: Instant::now(),
            next_position_check: Instant::now(),
            finished: false,
        }
    }

    /// Where a prices partition whose end is `high` starts: inside the
    /// lookback and at most `max_messages` before the end. Records the
    /// range when there is one to read.
    pub fn start<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
        (low, high): (i64, i64),
    ) -> i64 {
        if self.finished || high <= low {
            return high;
        }
        let floor = low.max(high - self.lookback.max_messages);
        let mut tpl = TopicPartitionList::new();
        let by_time = tpl
            .add_partition_offset(topic, partition, Offset::Offset(self.cutoff_ms))
            .ok()
            .and_then(|()| consumer.offsets_for_times(tpl, METADATA_TIMEOUT).ok())
            .and_then(|found| match found.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(n)) => Some(n),
                _ => None,
            });
        let start = by_time.unwrap_or(floor).max(floor);
        if start < high {
            self.until.insert(partition, high);
        }
        tracing::info!(topic, partition, from = start, to = high, "kafka: reading prices back for snapshots");
        start
    }

    /// Every prices partition has its range now.
    pub fn all_assigned(&mut self) {
        self.assigned = true;
    }

    /// Whether the message at `offset` of a prices partition is read back
    /// (not delivered).
    pub fn wants(&self, partition: i32, offset: i64) -> bool {
        !self.finished && self.until.get(&partition).is_some_and(|&until| offset < until)
    }

    /// Keeps a read-back value (its route from validation, None when it
    /// was invalid) as its market's newest, inside the lookback only; then
    /// notes how far the partition got. `now_ms` stamps a value whose
    /// message has no timestamp.
    pub fn take(&mut self, pos: Pos, timestamp_ms: i64, route: Option<Route>, value: &[u8], now_ms: u64) {
        let (partition, offset) = pos;
        self.messages += 1;
        if let Some(Route::Market(m)) = route {
            if timestamp_ms <= 0 || timestamp_ms >= self.cutoff_ms {
                self.seq += 1;
                let ts = if timestamp_ms > 0 { timestamp_ms as u64 } else { now_ms };
                match self.values.get_mut(&m) {
                    Some(kept) => {
                        kept.seq = self.seq;
                        kept.pos = pos;
                        kept.timestamp_ms = ts;
                        kept.value.clear();
                        kept.value.extend_from_slice(value);
                    }
                    None => {
                        self.values.insert(m, Kept { seq: self.seq, pos, timestamp_ms: ts, value: value.to_vec() });
                        self.bound();
                    }
                }
            }
        }
        self.reached(partition, offset + 1);
    }

    /// Keeps the table within twice `max_markets` while reading: past that,
    /// only the `max_markets` most recently updated stay (the rest could
    /// not be handed over anyway).
    fn bound(&mut self) {
        let max = self.lookback.max_markets;
        if self.values.len() <= 2 * max {
            return;
        }
        let mut seqs: Vec<u64> = self.values.values().map(|k| k.seq).collect();
        let drop = seqs.len() - max;
        let (_, &mut oldest_kept, _) = seqs.select_nth_unstable(drop);
        self.values.retain(|_, k| k.seq >= oldest_kept);
        self.dropped += drop as u64;
    }

    /// A live price update arrived while others are still read back: the
    /// market's read-back value is older, and goes.
    pub fn live(&mut self, route: &Route) {
        if let (false, Route::Market(m)) = (self.finished, route) {
            self.values.remove(m);
        }
    }

    /// The partition's next offset is `next` (a message, or the consumer's
    /// position past control records and compacted gaps).
    pub fn reached(&mut self, partition: i32, next: i64) {
        if self.until.get(&partition).is_some_and(|&until| next >= until) {
            self.until.remove(&partition);
        }
    }

    /// Whether to look at the consumer's positions now (every 100 ms).
    pub fn position_check_due(&mut self) -> bool {
        let now = Instant::now();
        if now >= self.next_position_check {
            self.next_position_check = now + Duration::from_millis(100);
            return true;
        }
        false
    }

    /// The partitions still being read (for the consumer's positions).
    pub fn pending(&self) -> impl Iterator<Item = i32> + '_ {
        self.until.keys().copied()
    }

    /// When every partition is read back: hands the values to the shards
    /// (oldest first, the most recent `max_markets`) and returns how many
    /// markets; None while reading goes on.
    pub fn finish_if_done(&mut self, publisher: &Publisher) -> Option<usize> {
        if self.finished || !self.assigned || !self.until.is_empty() {
            return None;
        }
        self.finished = true;
        let mut values: Vec<(Market, Kept)> = std::mem::take(&mut self.values).into_iter().collect();
        values.sort_unstable_by_key(|(_, kept)| kept.seq);
        let skip = values.len().saturating_sub(self.lookback.max_markets);
        let markets = values.len() - skip;
        self.dropped += skip as u64;
        // In chunks that leave room in the inboxes: a read-back must not
        // push live updates out.
        let mut chunk = Vec::with_capacity(1024);
        let mut ids = itoa::Buffer::new();
        for (market, kept) in values.into_iter().skip(skip) {
            let id = publisher.next_id(&mut ids);
            let mut update =
                Update::encode_at(Route::Market(market), &id, kept.timestamp_ms, Some(kept.pos), &kept.value);
            update.replay = true;
            chunk.push(update);
            if chunk.len() == 1024 {
                publisher.publish_when_room(chunk.drain(..));
            }
        }
        publisher.publish_when_room(chunk.drain(..));
        tracing::info!(
            markets,
            messages = self.messages,
            dropped = self.dropped,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "kafka: last prices read back for snapshots"
        );
        Some(markets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn market(token: &str) -> Option<Route> {
        Some(Route::Market(Market { chain: 1, token: token.into() }))
    }

    /// The newest value per market, the most recent `max_markets` of them,
    /// handed over oldest first as replayed updates; the table never holds
    /// more than twice that while reading.
    #[test]
    fn keeps_the_newest_value_of_the_most_recent_markets_within_its_bound() {
        let lookback = Lookback { window: Duration::from_secs(3600), max_messages: 1_000_000, max_markets: 3 };
        let mut rb = Readback::new(lookback, 10_000_000);
        let mut offset = 0;
        let mut take = |rb: &mut Readback, token: &str, value: &str| {
            rb.take((0, offset), 9_999_000, market(token), value.as_bytes(), 10_000_000);
            offset += 1;
        };
        for i in 0..100 {
            take(&mut rb, &format!("M{i}"), "{}");
            assert!(rb.values.len() <= 6, "bounded while reading: {}", rb.values.len());
        }
        take(&mut rb, "M97", r#"{"n":2}"#);
        take(&mut rb, "M42", r#"{"n":3}"#); // evicted before: back as the newest
        rb.take((0, offset), 1, market("OLD"), b"{}", 10_000_000); // outside the lookback
        rb.all_assigned();
        let publisher = Publisher::new(1, 64);
        assert_eq!(rb.finish_if_done(&publisher), Some(3));
        let inbox = publisher.inbox(0);
        let handed: Vec<String> = std::iter::from_fn(|| inbox.queue.pop())
            .map(|u| {
                assert!(u.replay, "replayed, delivered to no one");
                String::from_utf8_lossy(u.json()).into_owned()
            })
            .collect();
        assert_eq!(handed.len(), 3);
        assert!(handed[0].contains(r#""pos":"0:99""#) && handed[0].contains(r#""data":{}"#), "{}", handed[0]);
        assert!(handed[1].contains(r#""pos":"0:100""#) && handed[1].contains(r#"{"n":2}"#), "{}", handed[1]);
        assert!(handed[2].contains(r#""pos":"0:101""#) && handed[2].contains(r#"{"n":3}"#), "{}", handed[2]);
        assert_eq!(rb.messages, 103);
        assert_eq!(rb.dropped, 98, "101 markets kept a value, 3 handed over");
    }
}
