//! Gap-free resume of private channels from Kafka (PROTOCOL.md §12).
//!
//! Owns: the path between the shards and the replay thread ([`Hub`]: one
//! bounded request queue in, one bounded return queue per shard out, with
//! a waker), what a replay ends with ([`Outcome`]), the recovery metrics,
//! the shared scans and the windows of what they read (`scan.rs`,
//! sans-IO) and the thread that reads Kafka for them (`worker.rs`).
//!
//! How one resume goes: the connection's shard subscribes the channel but
//! *holds* its live updates aside (`shard/held.rs`) and sends a
//! [`Request`] with `until`, where its feed stood in that partition; the
//! replay thread reads the user's partition from the position up to
//! `until` (or, when the shard took none of it yet, to the partition's end
//! read after the request), keeping the user's updates; the shard's
//! recovery task (`conn/recover.rs`) queues `subscribed` with `recovered`
//! and `missed`, the replayed frames, then the held live frames past the
//! replay's end. Every live update after the subscribe is held, and the
//! replay reaches every offset the shard had taken before it, so the seam
//! has no gap and, by offset, no duplicate.
//!
//! Nothing here runs on a shard's hot path: a shard only pushes a request
//! and, on its recovery task, takes results.

mod scan;
pub(crate) mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use crossbeam::channel::{Receiver, Sender, TrySendError};
use crossbeam::queue::ArrayQueue;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::protocol::message::{Channel, Pos};
use crate::shard::inbox::Update;
use crate::telemetry::{Exposition, Kind};

/// Requests waiting for the replay thread, at most (beyond: `busy`).
pub const MAX_QUEUED_REQUESTS: usize = 32_768;
/// Results waiting for one shard's recovery task, at most (the replay
/// thread waits for room).
const RETURNS_PER_SHARD: usize = 4096;

/// One resume, from a shard to the replay thread.
#[derive(Debug)]
pub struct Request {
    pub shard: usize,
    /// The shard's ticket for this recovery (a result whose ticket is not
    /// in flight any more is stale).
    pub ticket: u64,
    pub channel: Channel,
    pub user: Arc<str>,
    /// Replay what comes after this position.
    pub since: Pos,
    /// ...up to this offset (exclusive): where the shard's feed stood in
    /// that partition when it began holding the channel's live updates.
    /// None: the shard took none yet; up to the partition's end then.
    pub until: Option<i64>,
    pub deadline: Instant,
}

/// How a recovery ended; each is a label of `moonx_ws_recoveries_total`.
#[derive(Debug)]
pub enum Outcome {
    /// Complete: the user's updates after the position, in offset order,
    /// and the end of the range read (exclusive).
    Replayed { updates: Vec<Arc<Update>>, end: i64 },
    /// The position is older than the partition's first retained offset.
    Trimmed,
    /// The position lies beyond the partition's end (recreated topic).
    BeyondEnd,
    /// More than `WS_RECOVERY_MAX_MESSAGES` updates would be replayed.
    TooMany,
    /// Not done within `WS_RECOVERY_TIMEOUT_MS`.
    Timeout,
    /// Kafka could not be read (no such partition, no broker).
    Unavailable,
    /// The request queue was full.
    Busy,
    /// The client unsubscribed before the replay ended.
    Cancelled,
    /// The shard's inbox was full and dropped live updates while the
    /// replay ran (set by the shard, never by the replay thread).
    Dropped,
}

impl Outcome {
    /// The labels: one per variant, then the two endings the shard
    /// counts itself (`ShardStats`): `overflow` (the live updates held
    /// meanwhile passed `WS_MAX_BUFFERED_BYTES`: closed 4009) and `gone`
    /// (the connection closed first).
    pub const LABELS: [&'static str; 11] = [
        "recovered",
        "trimmed",
        "beyond_end",
        "too_many",
        "timeout",
        "unavailable",
        "busy",
        "cancelled",
        "dropped",
        "overflow",
        "gone",
    ];

    pub fn index(&self) -> usize {
        match self {
            Outcome::Replayed { .. } => 0,
            Outcome::Trimmed => 1,
            Outcome::BeyondEnd => 2,
            Outcome::TooMany => 3,
            Outcome::Timeout => 4,
            Outcome::Unavailable => 5,
            Outcome::Busy => 6,
            Outcome::Cancelled => 7,
            Outcome::Dropped => 8,
        }
    }
}

/// A result on its way back to the connection's shard.
#[derive(Debug)]
pub struct Done {
    pub ticket: u64,
    pub outcome: Outcome,
}

/// One shard's results queue and the waker of its recovery task.
pub struct Returns {
    queue: ArrayQueue<Done>,
    pub waker: AtomicWaker,
}

impl Returns {
    pub fn pop(&self) -> Option<Done> {
        self.queue.pop()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Counters and the duration histogram (`/metrics`).
pub struct RecoveryStats {
    pub outcomes: [AtomicU64; Outcome::LABELS.len()],
    /// Updates sent to clients by replays (the sum of `missed`).
    pub replayed: AtomicU64,
    /// Kafka messages the replay thread read (shared scans count once).
    pub read: AtomicU64,
    /// Of `read`, messages this instance had read for replays before.
    pub reread: AtomicU64,
    /// Scans started (a scan serves every request on its partition).
    pub scans: AtomicU64,
    /// Memory held by the windows of what scans read (a gauge).
    pub window_bytes: AtomicU64,
    /// Resume to `subscribed`, in µs.
    pub duration_us: Mutex<Histogram<u64>>,
}

impl Default for RecoveryStats {
    fn default() -> Self {
        Self {
            outcomes: Default::default(),
            replayed: AtomicU64::new(0),
            read: AtomicU64::new(0),
            reread: AtomicU64::new(0),
            scans: AtomicU64::new(0),
            window_bytes: AtomicU64::new(0),
            duration_us: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 2).expect("histogram bounds")),
        }
    }
}

/// The shards' side of recovery: what every shard shares (in `Global`).
pub struct Hub {
    requests: Sender<Request>,
    incoming: Mutex<Option<Receiver<Request>>>,
    returns: Box<[Returns]>,
    pub stats: RecoveryStats,
    /// `WS_RECOVERY_TIMEOUT_MS`.
    pub timeout: Duration,
}

impl Hub {
    pub fn new(shards: usize, timeout: Duration) -> Self {
        let (requests, incoming) = crossbeam::channel::bounded(MAX_QUEUED_REQUESTS);
        Self {
            requests,
            incoming: Mutex::new(Some(incoming)),
            returns: (0..shards)
                .map(|_| Returns { queue: ArrayQueue::new(RETURNS_PER_SHARD), waker: AtomicWaker::new() })
                .collect(),
            stats: RecoveryStats::default(),
            timeout,
        }
    }

    /// Hands a request to the replay thread; false when its queue is full.
    pub fn request(&self, req: Request) -> bool {
        match self.requests.try_send(req) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Shard `shard`'s results.
    pub fn returns(&self, shard: usize) -> &Returns {
        &self.returns[shard]
    }

    /// The request queue's receiving end (for the one replay thread).
    pub(crate) fn take_incoming(&self) -> Option<Receiver<Request>> {
        self.incoming.lock().take()
    }

    /// Hands a result to its shard, waiting while that shard's queue is
    /// full (false if `stop` was raised meanwhile).
    pub(crate) fn give_back(&self, shard: usize, mut done: Done, stop: &std::sync::atomic::AtomicBool) -> bool {
        let r = &self.returns[shard];
        loop {
            match r.queue.push(done) {
                Ok(()) => {
                    r.waker.wake();
                    return true;
                }
                Err(back) => {
                    done = back;
                    r.waker.wake();
                    if stop.load(Ordering::Acquire) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Records how a recovery ended (on the shard, once per recovery).
    pub fn finished(&self, outcome: &Outcome, missed: u64, took: Duration) {
        self.stats.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.stats.replayed.fetch_add(missed, Ordering::Relaxed);
        self.stats.duration_us.lock().saturating_record((took.as_micros() as u64).max(1));
    }

    /// Describes the recovery metrics; `shards` are the shards' own counts
    /// (overflowed, gone, in flight), summed.
    pub fn describe(&self, e: &mut Exposition, shards: [u64; 3]) {
        let s = &self.stats;
        let mut f = e.family(
            Kind::Counter,
            "moonx_ws_recoveries_total",
            "Subscribes with since (resume), by outcome: recovered (complete), or why not (the client was told recovered:false).",
        );
        for (i, label) in Outcome::LABELS.iter().enumerate() {
            let n = match *label {
                "overflow" => shards[0],
                "gone" => shards[1],
                _ => s.outcomes[i].load(Ordering::Relaxed),
            };
            f.sample(&[("outcome", label)], n);
        }
        e.single(Kind::Gauge, "moonx_ws_recoveries_in_flight", "Resumes waiting for their replay.", shards[2]);
        e.single(
            Kind::Counter,
            "moonx_ws_recovery_replayed_total",
            "Updates sent to clients by complete replays (the sum of missed).",
            s.replayed.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Counter,
            "moonx_ws_recovery_read_total",
            "Kafka messages read for replays (a shared scan reads each message once for all the clients it serves).",
            s.read.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Counter,
            "moonx_ws_recovery_reread_total",
            "Of the messages read for replays, those this instance had read for replays before (what was read is kept in WS_RECOVERY_WINDOW_BYTES; 0 means each message was read at most once).",
            s.reread.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Counter,
            "moonx_ws_recovery_scans_total",
            "Partition scans started for replays.",
            s.scans.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Gauge,
            "moonx_ws_recovery_window_bytes",
            "Memory held by what replay scans read, kept so later resumes are served without reading Kafka again (at most WS_RECOVERY_WINDOW_BYTES).",
            s.window_bytes.load(Ordering::Relaxed),
        );
        e.histogram_us(
            "moonx_ws_recovery_duration_seconds",
            "Time from a subscribe with since to its subscribed reply.",
            &s.duration_us.lock(),
        );
    }
}
