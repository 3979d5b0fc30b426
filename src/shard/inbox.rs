//! The only cross-thread path for updates: producer -> per-shard inbox.
//!
//! Owns: [`Update`] (one update with its complete frame, encoded once for
//! the whole process), [`Publisher`] (the publish entry point, `Send + Sync`,
//! used by Kafka ingest, tests and benches) and [`Inbox`] (a bounded
//! lock-free queue per shard plus an [`AtomicWaker`]).
//!
//! Overflow policy: an inbox holds `WS_SHARD_QUEUE_CAPACITY` updates; when a
//! shard falls that far behind, the *oldest* queued update is dropped to make
//! room (a live feed values the newest data), the drop is counted in
//! `moonx_ws_shard_queue_dropped_total{shard}` and logged at a bounded rate.
//!
//! Wake-up: the producer pushes, then calls `AtomicWaker::wake`, which only
//! does work when the shard's fan-out task is parked; a busy shard is never
//! signalled and an idle one is woken at once (no timer in the path).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use crossbeam::queue::ArrayQueue;

use crate::protocol::channel::Market;
use crate::protocol::frame::{encode_header, server_header_len, MAX_HEADER_LEN, OP_TEXT};
use crate::protocol::message::{write_update_json, Channel, Pos};
use crate::telemetry::LogLimiter;

/// Who receives an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A price without a chain: every `prices` subscriber.
    Prices,
    /// A price of a chain whose token does not name a market: `prices`
    /// and `prices:<chainId>` subscribers.
    Chain(u64),
    /// A market's price: `prices`, `prices:<chainId>` and
    /// `prices:<chainId>:<token>` subscribers; it becomes the market's
    /// snapshot.
    Market(Market),
    /// Connections of `user` subscribed to `channel` (a private channel).
    User { channel: Channel, user: Box<str> },
}

impl Route {
    pub fn channel(&self) -> Channel {
        match self {
            Route::Prices | Route::Chain(_) | Route::Market(_) => Channel::Prices,
            Route::User { channel, .. } => *channel,
        }
    }
}

/// One update, ready to be written: `frame` is a complete WebSocket text
/// frame, shared by every subscriber on every shard.
#[derive(Debug)]
pub struct Update {
    pub route: Route,
    pub frame: Box<[u8]>,
    pub published_at: Instant,
    /// The Kafka message timestamp (ms since the epoch), 0 when unknown.
    pub kafka_ts_ms: i64,
    /// Read back on start for snapshots: recorded as its market's last
    /// value, delivered to no one.
    pub replay: bool,
    /// Its Kafka position (also in the frame), when it came from Kafka.
    pub pos: Option<Pos>,
}

impl Update {
    /// Builds the envelope around `data` (kept verbatim) and frames it once.
    /// `id` must be unique within the instance. No `pos`: for updates that
    /// did not come from Kafka (tests, benches).
    pub fn encode(route: Route, id: &str, now_ms: u64, data: &[u8]) -> Update {
        Self::encode_at(route, id, now_ms, None, data)
    }

    /// [`Update::encode`] with the update's Kafka position in the envelope.
    pub fn encode_at(route: Route, id: &str, now_ms: u64, pos: Option<Pos>, data: &[u8]) -> Update {
        // One allocation: the JSON is written after room for the longest
        // header, then the header goes right before it.
        let mut frame = Vec::with_capacity(MAX_HEADER_LEN + data.len() + 96);
        frame.resize(MAX_HEADER_LEN, 0);
        write_update_json(id, route.channel().update_type(), now_ms, pos, data, &mut frame);
        let mut header = [0u8; MAX_HEADER_LEN];
        let n = encode_header(OP_TEXT, frame.len() - MAX_HEADER_LEN, &mut header);
        let start = MAX_HEADER_LEN - n;
        frame[start..MAX_HEADER_LEN].copy_from_slice(&header[..n]);
        frame.drain(..start);
        Update {
            route,
            frame: frame.into_boxed_slice(),
            published_at: Instant::now(),
            kafka_ts_ms: 0,
            replay: false,
            pos,
        }
    }
}

impl Update {
    /// The envelope JSON inside the frame (the payload after the header).
    pub fn json(&self) -> &[u8] {
        &self.frame[server_header_len(&self.frame)..]
    }
}

/// One shard's bounded inbox.
pub struct Inbox {
    pub(crate) queue: ArrayQueue<Arc<Update>>,
    pub(crate) waker: AtomicWaker,
    dropped: AtomicU64,
}

impl Inbox {
    pub fn new(capacity: usize) -> Self {
        Self { queue: ArrayQueue::new(capacity), waker: AtomicWaker::new(), dropped: AtomicU64::new(0) }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The publish entry point: hands one update to every shard.
#[derive(Clone)]
pub struct Publisher {
    inboxes: Arc<[Inbox]>,
    seq: Arc<AtomicU64>,
    overflow_log: Arc<LogLimiter>,
}

impl Publisher {
    pub fn new(shards: usize, capacity: usize) -> Self {
        Self {
            inboxes: (0..shards).map(|_| Inbox::new(capacity)).collect(),
            seq: Arc::new(AtomicU64::new(1)),
            overflow_log: Arc::new(LogLimiter::new(Duration::from_secs(5))),
        }
    }

    pub fn inbox(&self, shard: usize) -> &Inbox {
        &self.inboxes[shard]
    }

    pub fn shard_count(&self) -> usize {
        self.inboxes.len()
    }

    /// A fresh update id, unique within the instance ("u" + sequence).
    pub fn next_id(&self, buf: &mut itoa::Buffer) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(12);
        id.push('u');
        id.push_str(buf.format(n));
        id
    }

    /// Encodes `data` for `route` with a fresh id and publishes it.
    pub fn publish_data(&self, route: Route, now_ms: u64, data: &[u8]) {
        let id = self.next_id(&mut itoa::Buffer::new());
        self.publish(Update::encode(route, &id, now_ms, data));
    }

    /// Hands `update` to every shard and wakes the parked ones.
    pub fn publish(&self, update: Update) {
        let update = Arc::new(update);
        for (shard, inbox) in self.inboxes.iter().enumerate() {
            self.push(shard, inbox, update.clone());
            inbox.waker.wake();
        }
    }

    /// Publishes a batch, waking each shard once at the end.
    pub fn publish_batch(&self, updates: impl IntoIterator<Item = Update>) {
        for update in updates {
            let update = Arc::new(update);
            for (shard, inbox) in self.inboxes.iter().enumerate() {
                self.push(shard, inbox, update.clone());
            }
        }
        for inbox in self.inboxes.iter() {
            inbox.waker.wake();
        }
    }

    /// Publishes a batch without pushing anything out of a full inbox: waits
    /// while any inbox is over half full (for updates that may wait, such
    /// as a start-up read-back).
    pub fn publish_when_room(&self, updates: impl IntoIterator<Item = Update>) {
        for update in updates {
            while self.inboxes.iter().any(|i| i.queue.len() > i.queue.capacity() / 2) {
                for inbox in self.inboxes.iter() {
                    inbox.waker.wake();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let update = Arc::new(update);
            for (shard, inbox) in self.inboxes.iter().enumerate() {
                self.push(shard, inbox, update.clone());
            }
        }
        for inbox in self.inboxes.iter() {
            inbox.waker.wake();
        }
    }

    fn push(&self, shard: usize, inbox: &Inbox, update: Arc<Update>) {
        if inbox.queue.force_push(update).is_some() {
            inbox.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.overflow_log.allow() {
                tracing::warn!(shard, suppressed, "shard inbox full: dropped its oldest update");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_complete_frame_once() {
        let u = Update::encode(Route::Prices, "u1", 5, br#"{"token":"ETH","chainId":1}"#);
        let body = br#"{"id":"u1","type":"price_update","timestamp":5,"data":{"token":"ETH","chainId":1}}"#;
        assert_eq!(u.frame[0], 0x81);
        assert_eq!(u.frame[1] as usize, body.len());
        assert_eq!(&u.frame[2..], body);
    }

    #[test]
    fn full_inbox_drops_oldest_and_counts() {
        let p = Publisher::new(2, 2);
        for i in 0..3 {
            p.publish_data(Route::Prices, i, b"{}");
        }
        for shard in 0..2 {
            assert_eq!(p.inbox(shard).dropped(), 1);
            let first = p.inbox(shard).queue.pop().unwrap();
            assert!(std::str::from_utf8(&first.frame[2..]).unwrap().contains("\"timestamp\":1"));
        }
    }
}
