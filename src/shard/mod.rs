//! One shard: the connections a core owns, who subscribes to what, and the
//! fan-out that turns one update into bytes queued for every subscriber.
//!
//! Owns: the connection slots (outbox, waker, user, subscriptions, next
//! deadline), the subscription registry (a dense list for `prices`, an index
//! from user to the first of that user's connections, the rest linked
//! through their slots, for the private channels), the
//! shard's price log, the slow-consumer rule, and the shard's background
//! tasks (inbox fan-out and the coarse deadline tick). State is
//! `Rc<RefCell<_>>`, touched only by this core; the only cross-thread input
//! is the [`inbox`].
//!
//! Price frames are queued once per shard, not once per subscriber: they go
//! to the `PriceLog`, and each subscriber keeps a cursor into it. A sweep
//! writes each subscriber's outbox (replies, private updates) and its part
//! of the log with one `sendmsg`, straight from the shared bytes. Only when
//! a socket cannot take everything now (or its driver is mid-write, or it
//! is TLS) are the log bytes copied into that connection's outbox.
//!
//! Slow consumers: when a connection's unsent output (queued + in flight)
//! would pass `WS_MAX_BUFFERED_BYTES`, its queued backlog is dropped, it is
//! flagged, and its driver closes it with 4009 after the write in progress.
//! Appending never waits on a socket, so one slow reader cannot slow others.

pub mod inbox;

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use slab::Slab;

use crate::clock::Clock;
use crate::protocol::frame::server_frame_len;
use crate::protocol::message::Channel;
pub use crate::sys::DirectSocket;
use crate::sys::SendBatch;
use crate::telemetry::{update_index, ShardStats};
use inbox::{Inbox, Route, Update};

/// Updates a fan-out pass takes from the inbox before yielding.
const FANOUT_BUDGET: usize = 256;
/// Sockets a flush writes before it looks at the inbox again.
const FLUSH_CHUNK: usize = 64;
/// Capacity reserved when an empty outbox first receives bytes.
const OUTBOX_INITIAL: usize = 1024;
/// Outbox buffers kept for reuse per shard, and the largest kept.
const SPARE_BUFFERS: usize = 1024;
const SPARE_MAX_CAPACITY: usize = 64 * 1024;
const NOT_LISTED: u32 = u32::MAX;

/// A connection's state as the shard sees it.
#[derive(Debug, Default)]
pub struct Slot {
    /// Whole frames not yet handed to the socket.
    pub pending: Vec<u8>,
    /// Bytes handed to the socket and not yet written (kept by the driver).
    /// (32 bits: `WS_MAX_BUFFERED_BYTES` is at most 1 GiB.)
    pub inflight: u32,
    waker: Option<Waker>,
    wake_pending: bool,
    user: Option<Arc<str>>,
    subs: u8,
    prices_pos: u32,
    /// The next of this user's connections on the shard (`NOT_LISTED` ends
    /// the list; the head is in the shard's user index).
    next_user: u32,
    /// Backlog dropped: the driver must close with 4009.
    pub slow: bool,
    /// No more updates: the connection is closing.
    closing: bool,
    /// How far into the shard's price log this connection has been served
    /// (sent or copied into `pending`); meaningful while it is subscribed.
    cursor: u64,
    /// The server is shutting down: the driver must close with 1001.
    pub shutdown: bool,
    /// Monotonic ms at which the tick must wake the driver.
    pub deadline_ms: u64,
    /// The connection's socket, for direct writes by the fan-out (holding
    /// it keeps the descriptor open); None when its bytes must go through
    /// its driver (TLS), and while a parked connection is being resumed.
    sock: Option<DirectSocket>,
    /// Bytes at the front of `pending` already written by a direct write
    /// that stopped part-way (the driver continues from there).
    pub pre_sent: u32,
    /// Listed in the shard's dirty list (bytes queued since the last flush).
    dirty: bool,
    /// In the sweep step's batch of direct writes (a sweep can list a
    /// connection twice: dirty, and a price subscriber).
    batched: bool,
    /// Parked (no task; see `conn::park`): its record's index + 1, else 0.
    /// Its `waker` is then the parker's, and waking it asks for an unpark.
    parked: u32,
    /// The first recipient of a private update whose latency sample waits
    /// for this connection's next write (see [`Stamps`]).
    stamped: bool,
}

/// The price frames a shard has queued since its last completed sweep, one
/// copy for all subscribers. Offsets are absolute: bytes since the shard
/// started, `base` being the offset of `buf[0]`.
#[derive(Debug, Default)]
struct PriceLog {
    buf: Vec<u8>,
    base: u64,
}

impl PriceLog {
    fn head(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// The bytes from `cursor` to the head. Every cursor is at or past
    /// `base` (a sweep trims only what every subscriber has passed).
    fn since(&self, cursor: u64) -> &[u8] {
        debug_assert!(cursor >= self.base && cursor <= self.head());
        let start = (cursor.saturating_sub(self.base) as usize).min(self.buf.len());
        &self.buf[start..]
    }

    /// Forgets everything before `offset`: every subscriber is past it.
    fn trim_to(&mut self, offset: u64) {
        let n = (offset - self.base) as usize;
        self.buf.drain(..n);
        self.base = offset;
        if self.buf.is_empty() && self.buf.capacity() > SPARE_MAX_CAPACITY {
            self.buf = Vec::new();
        }
    }
}

pub struct Shard {
    pub id: usize,
    conns: Slab<Slot>,
    prices: Vec<usize>,
    log: PriceLog,
    /// The log's head when the sweep in progress began: once it ends, every
    /// subscriber is past it.
    sweep_head: u64,
    /// Private routing: each user's first connection (the rest follow
    /// `Slot::next_user`). Holding slot keys only (the id is in the slot)
    /// keeps this to 5 bytes per bucket instead of a map entry with its own
    /// copy of the id.
    users: HashTable<u32>,
    hasher: RandomState,
    /// Spare outboxes, parked connections to resume, the buffer limit.
    out: Outboxes,
    /// Connections the fan-out queued bytes for that no sweep has reached.
    dirty: Vec<usize>,
    /// The flush sweep in progress (`sweep[sweep_pos..]` still to write).
    sweep: Vec<usize>,
    sweep_pos: usize,
    /// The current sweep step's connections that are written directly.
    direct: Vec<usize>,
    /// Writes those in one batch (io_uring unless `WS_FANOUT_IO=syscalls`).
    writer: SendBatch,
    pub stats: Arc<ShardStats>,
    shutting_down: bool,
    /// Latency samples of updates queued and not yet written to any socket.
    stamps: Stamps,
    /// Reads the wall clock for those samples.
    clock: Clock,
}

/// Latency samples waiting for their update's first socket write, for
/// `moonx_ws_kafka_to_socket_latency_seconds`. An update is sampled only
/// when it was queued for at least one connection, and recorded when the
/// first of them is written (or handed to its task, for a connection the
/// fan-out cannot write directly). Each queue is bounded: past
/// [`MAX_STAMPS`] an update goes unsampled, counted in
/// `moonx_ws_latency_samples_skipped_total`.
#[derive(Debug, Default)]
struct Stamps {
    /// Price frames: the log offset where the frame ends, and its Kafka
    /// timestamp (ms). Written once any subscriber's write passes the end.
    log: std::collections::VecDeque<(u64, i64)>,
    /// Private frames: the first recipient's key (its slot is `stamped`)
    /// and the Kafka timestamp.
    private: std::collections::VecDeque<(u32, i64)>,
    /// Stamped slots written (or handed over) in the current sweep step.
    written: Vec<u32>,
    /// How far into the price log a write of this step reached.
    log_written: u64,
}

/// Samples each [`Stamps`] queue holds at most.
const MAX_STAMPS: usize = 4096;

impl Shard {
    pub fn new(id: usize, max_buffered: usize, stats: Arc<ShardStats>) -> Self {
        Self {
            id,
            conns: Slab::new(),
            prices: Vec::new(),
            log: PriceLog::default(),
            sweep_head: 0,
            users: HashTable::new(),
            hasher: RandomState::new(),
            out: Outboxes { spare: Spares::default(), unpark: Vec::new(), max_buffered },
            dirty: Vec::new(),
            sweep: Vec::new(),
            sweep_pos: 0,
            direct: Vec::with_capacity(FLUSH_CHUNK),
            writer: SendBatch::new(true),
            stats,
            shutting_down: false,
            stamps: Stamps::default(),
            clock: Clock::system(),
        }
    }

    /// The clock latency samples are read from (the server's).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// Reserves room for `connections` (address space only: the pages are
    /// touched as connections arrive), so the slot table never grows by
    /// copying itself while thousands connect.
    pub fn reserve(&mut self, connections: usize) {
        self.conns.reserve(connections);
        self.prices.reserve(connections);
    }

    /// Chooses how sweeps write to sockets: batches of io_uring
    /// submissions (`true`, the default) or one system call per socket.
    /// Returns whether io_uring is in use (false when the kernel refused it).
    pub fn use_io_uring(&mut self, on: bool) -> bool {
        self.writer = SendBatch::new(on);
        self.writer.uses_ring()
    }

    /// Adds a connection; returns its key. `sock` is its socket for
    /// direct writes (None: TLS). `inflight` is what its driver has yet to
    /// write (the 101 response), so direct writes wait for it.
    pub fn insert(&mut self, sock: Option<DirectSocket>, inflight: usize) -> usize {
        self.conns.insert(Slot {
            prices_pos: NOT_LISTED,
            next_user: NOT_LISTED,
            shutdown: self.shutting_down,
            deadline_ms: u64::MAX,
            sock,
            inflight: inflight as u32,
            ..Slot::default()
        })
    }

    /// Removes a connection and every registration it had.
    pub fn remove(&mut self, key: usize) {
        self.stop_updates(key);
        if let Some(slot) = self.conns.try_remove(key) {
            if slot.stamped {
                // Its samples were never written: they are not latencies.
                self.stamps.private.retain(|&(k, _)| k as usize != key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn slot(&mut self, key: usize) -> &mut Slot {
        &mut self.conns[key]
    }

    /// Records the driver's waker and clears the "already woken" mark.
    pub fn set_waker(&mut self, key: usize, waker: &Waker) {
        let slot = &mut self.conns[key];
        slot.wake_pending = false;
        match &slot.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => slot.waker = Some(waker.clone()),
        }
    }

    /// Binds an authenticated user to the connection (private routing).
    pub fn set_user(&mut self, key: usize, user: Arc<str>) {
        let slot = &mut self.conns[key];
        if slot.user.is_some() || slot.closing {
            return;
        }
        let hash = self.hasher.hash_one(&*user);
        slot.user = Some(user);
        let conns = &self.conns;
        let same_user = |&k: &u32| conns[k as usize].user == conns[key].user;
        match self.users.find_mut(hash, same_user) {
            // Prepended: the order of a user's connections does not matter.
            Some(head) => self.conns[key].next_user = std::mem::replace(head, key as u32),
            None => {
                let hasher = &self.hasher;
                let rehash = |&k: &u32| hasher.hash_one(conns[k as usize].user.as_deref().unwrap_or_default());
                self.users.insert_unique(hash, key as u32, rehash);
            }
        }
        self.stats.connections_authenticated.inc();
    }

    pub fn subscribe(&mut self, key: usize, channel: Channel) {
        let slot = &mut self.conns[key];
        if slot.subs & channel.bit() != 0 || slot.closing {
            return;
        }
        slot.subs |= channel.bit();
        if channel == Channel::Prices {
            slot.prices_pos = self.prices.len() as u32;
            slot.cursor = self.log.head();
            self.prices.push(key);
        }
        self.stats.subscribers[channel as usize].inc();
    }

    pub fn unsubscribe(&mut self, key: usize, channel: Channel) {
        let slot = &mut self.conns[key];
        if slot.subs & channel.bit() == 0 {
            return;
        }
        if channel == Channel::Prices {
            // Frames queued before the unsubscribe are still delivered. Past
            // the buffer limit the slot is flagged slow (4009) instead.
            self.out.materialize(slot, key, &self.log);
            if !slot.pending.is_empty() {
                mark_dirty(slot, key, &mut self.dirty);
            }
        }
        slot.subs &= !channel.bit();
        if channel == Channel::Prices {
            let pos = std::mem::replace(&mut slot.prices_pos, NOT_LISTED) as usize;
            self.prices.swap_remove(pos);
            if let Some(&moved) = self.prices.get(pos) {
                self.conns[moved].prices_pos = pos as u32;
            }
        }
        self.stats.subscribers[channel as usize].sub(1);
    }

    /// Takes the connection out of every route: nothing more is queued for
    /// it except by its own driver (replies, the close frame).
    pub fn stop_updates(&mut self, key: usize) {
        let Some(slot) = self.conns.get(key) else {
            return;
        };
        if slot.closing {
            return;
        }
        for ch in Channel::ALL {
            self.unsubscribe(key, ch);
        }
        self.conns[key].closing = true;
        if self.conns[key].user.is_some() {
            self.unlink_user(key);
            self.stats.connections_authenticated.sub(1);
        }
    }

    /// Takes the connection out of its user's list (and the user out of the
    /// index with their last connection).
    fn unlink_user(&mut self, key: usize) {
        let next = std::mem::replace(&mut self.conns[key].next_user, NOT_LISTED);
        let Some(user) = self.conns[key].user.take() else { return };
        let hash = self.hasher.hash_one(&*user);
        let conns = &self.conns;
        // The head is this connection (its id is already taken) or another
        // of the user's.
        let found =
            self.users.find_entry(hash, |&k| k as usize == key || conns[k as usize].user.as_deref() == Some(&*user));
        let Ok(head) = found else { return }; // impossible: set_user listed it
        let mut k = *head.get() as usize;
        if k == key {
            if next == NOT_LISTED {
                head.remove();
            } else {
                *head.into_mut() = next;
            }
            return;
        }
        while self.conns[k].next_user != NOT_LISTED {
            if self.conns[k].next_user as usize == key {
                self.conns[k].next_user = next;
                return;
            }
            k = self.conns[k].next_user as usize;
        }
    }

    /// The first of `user`'s connections on this shard, if any.
    fn first_of(&self, user: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(user);
        let conns = &self.conns;
        self.users.find(hash, |&k| conns[k as usize].user.as_deref() == Some(user)).map(|&k| k as usize)
    }

    /// Takes back a written-out buffer for reuse by any connection.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        recycle(&mut self.out.spare, buf);
    }

    /// Queues bytes for one connection (a reply or control frame),
    /// applying the slow-consumer rule. Returns false if they were dropped.
    pub fn queue(&mut self, key: usize, bytes: &[u8]) -> bool {
        let slot = &mut self.conns[key];
        let lagging = lag(slot, &self.log);
        let ok = self.out.append(slot, key, bytes, lagging);
        if ok {
            wake(slot, key, &mut self.out.unpark);
        }
        if !ok {
            self.stop_updates(key);
        }
        ok
    }

    /// Queues `update` for every matching subscriber; returns how many.
    pub fn fanout(&mut self, update: &Update) -> usize {
        let mut delivered = 0;
        let mut slow = Vec::new();
        match &update.route {
            Route::Prices => {
                // Once for the shard; each subscriber's sweep visit sends it.
                if !self.prices.is_empty() {
                    self.log.buf.extend_from_slice(&update.frame);
                    delivered = self.prices.len();
                    if update.kafka_ts_ms > 0 {
                        let (head, ts) = (self.log.head(), update.kafka_ts_ms);
                        push_stamp(&mut self.stamps.log, (head, ts), &self.stats);
                    }
                }
            }
            Route::User { channel, user } => {
                let mut first = None;
                let mut next = self.first_of(user).unwrap_or(NOT_LISTED as usize);
                while next != NOT_LISTED as usize {
                    let key = next;
                    let slot = &mut self.conns[key];
                    next = slot.next_user as usize;
                    if slot.subs & channel.bit() == 0 {
                        continue;
                    }
                    let lagging = lag(slot, &self.log);
                    if self.out.append(slot, key, &update.frame, lagging) {
                        mark_dirty(slot, key, &mut self.dirty);
                        delivered += 1;
                        first.get_or_insert(key);
                    } else {
                        slow.push(key);
                    }
                }
                if let (Some(key), true) = (first, update.kafka_ts_ms > 0) {
                    if push_stamp(&mut self.stamps.private, (key as u32, update.kafka_ts_ms), &self.stats) {
                        self.conns[key].stamped = true;
                    }
                }
            }
        }
        for key in slow {
            self.stop_updates(key);
        }
        let idx = update_index(update.route.channel());
        self.stats.sent[idx].add(delivered as u64);
        self.stats.deliveries.add(delivered as u64);
        delivered
    }

    /// Whether a flush sweep is under way.
    pub fn sweeping(&self) -> bool {
        self.sweep_pos < self.sweep.len()
    }

    /// Whether frames are queued that no sweep has reached yet.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.log.buf.is_empty()
    }

    /// Starts a sweep over every connection with queued frames: those with
    /// private frames or replies, and every price subscriber when the log
    /// holds frames.
    pub fn begin_sweep(&mut self) {
        debug_assert!(!self.sweeping());
        self.sweep.clear();
        self.sweep_pos = 0;
        std::mem::swap(&mut self.sweep, &mut self.dirty);
        if !self.log.buf.is_empty() {
            self.sweep.extend_from_slice(&self.prices);
        }
        self.sweep_head = self.log.head();
    }

    /// Copies the connection's unsent price frames into its outbox (for its
    /// driver to write). Returns false, and takes it out of every route, if
    /// that made it a slow consumer.
    pub fn materialize(&mut self, key: usize) -> bool {
        let ok = self.out.materialize(&mut self.conns[key], key, &self.log);
        if !ok {
            self.stop_updates(key);
        }
        ok
    }

    /// Writes what the fan-out queued for the next `max` connections of the
    /// sweep, straight to each socket: one non-blocking `sendmsg` per
    /// connection for its outbox and its unsent part of the price log, with
    /// no task wake-up when the
    /// socket takes it all (the common case). A connection whose driver is
    /// mid-write, whose socket is full or short, or that is closing is left
    /// to its driver, which is woken. Returns true when the sweep is done.
    ///
    /// The sweep is written in steps so that updates arriving meanwhile are
    /// fanned out between them: a connection the sweep has not reached yet
    /// sends the new frame in this sweep (its log cursor is behind it, or it
    /// is still marked dirty), one it has passed gets it in the next. A
    /// frame therefore waits at most about one sweep, not the rest of this
    /// one plus the next. The log is trimmed when the sweep ends.
    pub fn flush_step(&mut self, max: usize) -> bool {
        let end = (self.sweep_pos + max).min(self.sweep.len());
        let mut slow = Vec::new();
        // First the connections whose driver must write (woken now), then
        // one batch of direct writes for all the others.
        self.direct.clear();
        for i in self.sweep_pos..end {
            let key = self.sweep[i];
            let Some(slot) = self.conns.get_mut(key) else { continue };
            slot.dirty = false;
            if slot.batched || (slot.pending.is_empty() && lag(slot, &self.log) == 0) {
                continue;
            }
            if slot.inflight == 0 && !slot.closing && slot.pre_sent == 0 && slot.sock.is_some() {
                slot.batched = true;
                self.direct.push(key);
                continue;
            }
            // Handed to its task, which writes it within its next poll.
            self.stamps.log_written = self.stamps.log_written.max(self.log.head());
            take_stamp(slot, key, &mut self.stamps.written);
            if !self.out.hand_to_driver(slot, key, &self.log) {
                slow.push(key);
            }
        }
        let (conns, log) = (&self.conns, &self.log);
        let sent = self.writer.send_all(self.direct.iter().map(|&key| {
            let slot = &conns[key];
            let sock = slot.sock.as_ref().expect("listed for a direct write only with a socket");
            (sock.as_fd(), &slot.pending[..], unsent_log(slot, log))
        }));
        for (&key, &n) in self.direct.iter().zip(sent) {
            let slot = &mut self.conns[key];
            slot.batched = false;
            let total = slot.pending.len() + lag(slot, &self.log);
            // What the write took of the log is on the wire (the outbox goes
            // first); the rest, and all of it when the socket took nothing,
            // is handed to the driver below, which is woken now.
            let reached = if n > 0 {
                slot.cursor + (n as usize).saturating_sub(slot.pending.len()) as u64
            } else {
                self.log.head()
            };
            self.stamps.log_written = self.stamps.log_written.max(reached);
            take_stamp(slot, key, &mut self.stamps.written);
            if n >= 0 && n as usize == total {
                slot.cursor = self.log.head();
                self.stats.direct_writes.inc();
                if !slot.pending.is_empty() {
                    let buf = std::mem::take(&mut slot.pending);
                    recycle(&mut self.out.spare, buf);
                }
                continue;
            }
            let ok = if n > 0 {
                // Short: the outbox becomes everything this write offered;
                // the driver finishes it from byte `n`.
                slot.pre_sent = n as u32;
                self.out.keep_offered(slot, key, &self.log)
            } else {
                // Full (EAGAIN) or broken: the driver handles it.
                self.out.hand_to_driver(slot, key, &self.log)
            };
            if !ok {
                slow.push(key);
            }
        }
        self.sweep_pos = end;
        for key in slow {
            self.stop_updates(key);
        }
        if self.sweeping() {
            self.record_written();
            return false;
        }
        // Every subscriber is past the sweep's head now: written, or handed
        // to its task (an unsubscribe copies what it had not been sent).
        self.stamps.log_written = self.stamps.log_written.max(self.sweep_head);
        self.record_written();
        self.log.trim_to(self.sweep_head);
        true
    }

    /// Records the samples of updates this sweep step wrote to a socket.
    fn record_written(&mut self) {
        let stamps = &mut self.stamps;
        let log_done = stamps.log.front().is_some_and(|&(end, _)| end <= stamps.log_written);
        if !log_done && stamps.written.is_empty() {
            return;
        }
        let now = self.clock.epoch_ms() as i64;
        let mut hist = self.stats.e2e_latency_us.lock();
        let mut record = |ts: i64| hist.saturating_record(((now - ts).max(0) as u64 * 1000).max(1));
        while let Some(&(end, ts)) = stamps.log.front() {
            if end > stamps.log_written {
                break;
            }
            record(ts);
            stamps.log.pop_front();
        }
        if !stamps.written.is_empty() {
            stamps.written.sort_unstable();
            let written = &stamps.written;
            stamps.private.retain(|&(key, ts)| {
                let done = written.binary_search(&key).is_ok();
                if done {
                    record(ts);
                }
                !done
            });
            stamps.written.clear();
        }
    }

    /// Wakes every connection whose deadline has passed.
    pub fn wake_due(&mut self, now_ms: u64) {
        for (key, slot) in self.conns.iter_mut() {
            if slot.deadline_ms <= now_ms {
                slot.deadline_ms = u64::MAX;
                wake(slot, key, &mut self.out.unpark);
            }
        }
    }

    /// Marks the shard as shutting down (a connection inserted from now on
    /// is flagged for its 1001 close at once) and lists the open ones, for
    /// [`Shard::shut_down`] to close in batches.
    pub fn begin_shutdown(&mut self) -> Vec<usize> {
        self.shutting_down = true;
        self.conns.iter().map(|(key, _)| key).collect()
    }

    /// Flags a connection for a 1001 close and wakes it (none: it is gone).
    pub fn shut_down(&mut self, key: usize) {
        if let Some(slot) = self.conns.get_mut(key) {
            slot.shutdown = true;
            wake(slot, key, &mut self.out.unpark);
        }
    }

    /// Frees spare outbox buffers the shard has not needed since the last
    /// call (half of them each time); returns how many.
    pub fn trim_spares(&mut self) -> usize {
        self.out.spare.trim_idle()
    }

    /// Marks a connection parked: `record` + 1 is its parker record's
    /// index, `fd` the connection's own duplicate of its socket (the slot
    /// holds it while parked), and `parker` the waker that any later
    /// wake-up of the connection goes to.
    pub fn park(&mut self, key: usize, fd: OwnedFd, record: u32, parker: &Waker) {
        let slot = &mut self.conns[key];
        slot.sock = Some(DirectSocket::owned(fd));
        slot.parked = record + 1;
        slot.waker = Some(parker.clone());
        slot.wake_pending = false;
    }

    /// Ends a connection's parking; returns its record's index and its
    /// socket (for the resumed driver, which hands it back with
    /// [`Shard::set_socket`]), or None if it was not parked.
    pub fn unpark(&mut self, key: usize) -> Option<(u32, OwnedFd)> {
        let slot = self.conns.get_mut(key)?;
        let record = slot.parked.checked_sub(1)?;
        let fd = slot.sock.take()?.into_owned()?;
        slot.parked = 0;
        slot.waker = None;
        slot.wake_pending = false;
        Some((record, fd))
    }

    /// The connection's socket for direct writes (a resumed connection's).
    pub fn set_socket(&mut self, key: usize, sock: Option<DirectSocket>) {
        self.conns[key].sock = sock;
    }

    /// The connection's socket, as the fan-out writes to it.
    pub fn socket(&self, key: usize) -> Option<&DirectSocket> {
        self.conns.get(key)?.sock.as_ref()
    }

    /// The parked connections woken since the last call, oldest first.
    pub fn take_unparks(&mut self, into: &mut Vec<usize>) {
        into.append(&mut self.out.unpark);
    }

    /// Whether any parked connection was woken.
    pub fn has_unparks(&self) -> bool {
        !self.out.unpark.is_empty()
    }
}

/// Queues a latency sample unless its queue is full (then counted).
fn push_stamp<T>(queue: &mut std::collections::VecDeque<T>, stamp: T, stats: &ShardStats) -> bool {
    if queue.len() >= MAX_STAMPS {
        stats.latency_samples_skipped.inc();
        return false;
    }
    queue.push_back(stamp);
    true
}

/// Notes that a stamped slot's queued frames were written (or handed over).
fn take_stamp(slot: &mut Slot, key: usize, written: &mut Vec<u32>) {
    if std::mem::take(&mut slot.stamped) {
        written.push(key as u32);
    }
}

/// Price-log bytes the slot has not been served yet.
fn lag(slot: &Slot, log: &PriceLog) -> usize {
    if slot.prices_pos == NOT_LISTED {
        0
    } else {
        (log.head() - slot.cursor) as usize
    }
}

/// The part of the price log the slot has not been served yet.
fn unsent_log<'a>(slot: &Slot, log: &'a PriceLog) -> &'a [u8] {
    if lag(slot, log) == 0 {
        &[]
    } else {
        log.since(slot.cursor)
    }
}

/// What queueing bytes for a connection needs besides its slot: spare
/// outboxes to reuse, the parked connections woken (for their parker), and
/// the slow-consumer limit.
#[derive(Debug)]
struct Outboxes {
    /// Empty outbox buffers for reuse: idle connections hold none.
    spare: Spares,
    /// Parked connections woken since the parker last looked.
    unpark: Vec<usize>,
    max_buffered: usize,
}

impl Outboxes {
    /// Hands a connection's queued bytes to its driver: the unsent log
    /// bytes join its outbox and it is woken. False when that made it a
    /// slow consumer (the caller takes it out of every route).
    fn hand_to_driver(&mut self, slot: &mut Slot, key: usize, log: &PriceLog) -> bool {
        let ok = self.materialize(slot, key, log);
        wake(slot, key, &mut self.unpark);
        ok
    }

    /// After a short direct write: the log bytes it offered join the outbox
    /// whatever their size (a prefix is on the wire, so the frame it stopped
    /// in must be completed), then the slow-consumer rule applies; the
    /// driver is woken. False when the connection became a slow consumer.
    fn keep_offered(&mut self, slot: &mut Slot, key: usize, log: &PriceLog) -> bool {
        let offered = unsent_log(slot, log);
        if !offered.is_empty() {
            if slot.pending.capacity() == 0 {
                slot.pending = self.spare.take();
            }
            slot.pending.extend_from_slice(offered);
            slot.cursor = log.head();
        }
        let ok = slot.pending.len() + slot.inflight as usize <= self.max_buffered;
        if !ok {
            slot.slow = true;
            drop_backlog(slot);
        }
        wake(slot, key, &mut self.unpark);
        ok
    }

    /// Moves the slot's unsent part of the price log into its outbox.
    fn materialize(&mut self, slot: &mut Slot, key: usize, log: &PriceLog) -> bool {
        if lag(slot, log) == 0 {
            return true;
        }
        let ok = self.append(slot, key, log.since(slot.cursor), 0);
        slot.cursor = log.head();
        ok
    }

    /// Appends `bytes` to a slot's outbox unless that would make it a slow
    /// consumer (counting `also_queued` bytes waiting elsewhere), in which
    /// case the backlog is dropped and the slot flagged.
    fn append(&mut self, slot: &mut Slot, key: usize, bytes: &[u8], also_queued: usize) -> bool {
        if slot.pending.len() + slot.inflight as usize + also_queued + bytes.len() > self.max_buffered {
            slot.slow = true;
            drop_backlog(slot);
            wake(slot, key, &mut self.unpark);
            return false;
        }
        if slot.pending.capacity() == 0 {
            slot.pending = self.spare.take();
            slot.pending.reserve(OUTBOX_INITIAL.max(bytes.len()));
        }
        slot.pending.extend_from_slice(bytes);
        true
    }
}

/// Drops a slow consumer's backlog, except the frame a direct write
/// stopped inside (the driver completes it: no frame is cut mid-way).
fn drop_backlog(slot: &mut Slot) {
    if slot.pre_sent == 0 {
        slot.pending = Vec::new();
        return;
    }
    let mut end = 0;
    while end < slot.pre_sent as usize {
        match server_frame_len(&slot.pending[end..]) {
            Some(len) => end += len,
            None => return, // not frames (cannot happen): keep it all
        }
    }
    slot.pending.truncate(end);
}

fn recycle(spare: &mut Spares, mut buf: Vec<u8>) {
    if buf.capacity() > 0 && buf.capacity() <= SPARE_MAX_CAPACITY && spare.bufs.len() < SPARE_BUFFERS {
        buf.clear();
        spare.bufs.push(buf);
    }
}

/// Empty outbox buffers kept for reuse, with the pool's low-water mark
/// since the last trim: buffers below it were never needed meanwhile.
#[derive(Debug, Default)]
struct Spares {
    bufs: Vec<Vec<u8>>,
    low: usize,
}

impl Spares {
    fn take(&mut self) -> Vec<u8> {
        let buf = self.bufs.pop().unwrap_or_default();
        self.low = self.low.min(self.bufs.len());
        buf
    }

    /// Frees half the buffers that went unused since the last call (an idle
    /// shard's pool drains over a few calls; a busy one keeps what it uses).
    fn trim_idle(&mut self) -> usize {
        let free = self.low.div_ceil(2);
        self.bufs.truncate(self.bufs.len() - free);
        if self.bufs.is_empty() {
            self.bufs = Vec::new();
        }
        self.low = self.bufs.len();
        free
    }
}

fn mark_dirty(slot: &mut Slot, key: usize, dirty: &mut Vec<usize>) {
    if !slot.dirty {
        slot.dirty = true;
        dirty.push(key);
    }
}

/// Wakes the connection's driver once until it runs again; a parked
/// connection is listed for its parker to resume instead.
fn wake(slot: &mut Slot, key: usize, unpark: &mut Vec<usize>) {
    if !slot.wake_pending {
        if let Some(w) = &slot.waker {
            slot.wake_pending = true;
            if slot.parked != 0 {
                unpark.push(key);
            }
            w.wake_by_ref();
        }
    }
}

/// The shard's fan-out task: drains its inbox in budgeted batches and
/// parks on the inbox's waker when it is empty.
///
/// Queued frames go out in sweeps over the connections that have any,
/// written in steps of `FLUSH_CHUNK` sockets with the inbox drained
/// between steps (see [`Shard::flush_step`]).
///
/// `pacing.fixed` is the latency/CPU trade (`WS_FLUSH_INTERVAL_US`): a
/// sweep starts at most once per interval, so under load each socket write
/// carries more frames (fewer syscalls per delivery) at the price of up to
/// one interval of added latency. Zero starts the next sweep as soon as the
/// last one ends: under saturation the batching is then set by the sweep's
/// own length.
///
/// `pacing.adaptive` (`WS_FLUSH_ADAPTIVE_MS`) applies an interval only while the
/// core is saturated: after a sweep that took at least half of it and ended
/// with new frames already queued, the next one starts no sooner than
/// `adaptive` after that sweep began. Otherwise sweeps start at once, as
/// with interval 0. `pacing.busy_pct` (`WS_FLUSH_BUSY_PCT`) stretches that
/// interval when sweeps take longer than that share of it (see
/// `Pacing::saturated_interval`).
pub async fn run_fanout(shard: Rc<RefCell<Shard>>, inbox: &Inbox, pacing: Pacing) {
    let mut last_sweep = Instant::now();
    let mut saturated = false;
    // Running average of how long sweeps take (start to last write).
    let mut sweep_avg = Duration::ZERO;
    loop {
        let mut taken = 0;
        let sweeping = {
            let mut shard = shard.borrow_mut();
            let stats = shard.stats.clone();
            let mut hist = stats.fanout_latency_us.lock();
            while taken < FANOUT_BUDGET {
                let Some(update) = inbox.queue.pop() else {
                    break;
                };
                shard.fanout(&update);
                taken += 1;
                let us = update.published_at.elapsed().as_micros() as u64;
                hist.saturating_record(us.max(1));
            }
            stats.updates_processed.add(taken as u64);
            drop(hist);
            let interval = pacing.interval(saturated, sweep_avg);
            if !shard.sweeping() && shard.has_dirty() && (interval.is_zero() || last_sweep.elapsed() >= interval) {
                shard.begin_sweep();
                last_sweep = Instant::now();
            }
            let done = shard.sweeping() && shard.flush_step(FLUSH_CHUNK);
            if done {
                let took = last_sweep.elapsed();
                saturated = took * 2 >= pacing.adaptive && shard.has_dirty();
                sweep_avg = if sweep_avg.is_zero() { took } else { (sweep_avg * 3 + took) / 4 };
            }
            shard.sweeping()
        };
        if sweeping || taken == FANOUT_BUDGET {
            glommio::yield_if_needed().await;
            continue;
        }
        if shard.borrow().has_dirty() {
            // Frames are waiting for the next sweep: sleep until it is due
            // (updates arriving meanwhile join the same writes).
            let due = pacing.interval(saturated, sweep_avg).saturating_sub(last_sweep.elapsed());
            glommio::timer::sleep(due).await;
            continue;
        }
        std::future::poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            if inbox.queue.is_empty() {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
    }
}

/// How sweeps are spaced (`WS_FLUSH_INTERVAL_US`, `WS_FLUSH_ADAPTIVE_MS`,
/// `WS_FLUSH_BUSY_PCT`).
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Always applies; zero: none.
    pub fixed: Duration,
    /// Applies after a saturated sweep; zero: never.
    pub adaptive: Duration,
    /// The share of the core (1–100) saturated sweeps may take.
    pub busy_pct: u8,
}

/// The adaptive interval stretches to at most this many times its setting.
const MAX_STRETCH: u32 = 4;

impl Pacing {
    /// The least time between sweep starts: the fixed interval, or the
    /// saturated one after a saturated sweep.
    fn interval(&self, saturated: bool, sweep_avg: Duration) -> Duration {
        if saturated {
            self.fixed.max(self.saturated_interval(sweep_avg))
        } else {
            self.fixed
        }
    }

    /// `adaptive`, or longer when sweeps (`sweep_avg` each) would otherwise
    /// take more than `busy_pct` of the core: then sweep time over that
    /// share, capped at `MAX_STRETCH` × `adaptive`. The interval follows
    /// the cost of a sweep on this machine, not one tuned elsewhere.
    fn saturated_interval(&self, sweep_avg: Duration) -> Duration {
        if self.adaptive.is_zero() || self.busy_pct >= 100 {
            return self.adaptive;
        }
        let share = sweep_avg * 100 / u32::from(self.busy_pct.max(1));
        self.adaptive.max(share).min(self.adaptive * MAX_STRETCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(max: usize) -> Shard {
        Shard::new(0, max, Arc::new(ShardStats::default()))
    }

    fn price(data: &str) -> Update {
        Update::encode(Route::Prices, "u1", 0, data.as_bytes())
    }

    /// Everything queued for a connection: its outbox, then its unsent part
    /// of the price log.
    fn outbox(s: &mut Shard, key: usize) -> Vec<u8> {
        let lagging = lag(&s.conns[key], &s.log);
        let mut out = s.conns[key].pending.clone();
        if lagging > 0 {
            out.extend_from_slice(s.log.since(s.conns[key].cursor));
        }
        out
    }

    #[test]
    fn prices_reach_subscribers_only() {
        let mut s = shard(1 << 20);
        let (a, b, c) = (s.insert(None, 0), s.insert(None, 0), s.insert(None, 0));
        s.subscribe(a, Channel::Prices);
        s.subscribe(c, Channel::Prices);
        let u = price("{}");
        assert_eq!(s.fanout(&u), 2);
        assert_eq!(outbox(&mut s, a), &*u.frame);
        assert!(outbox(&mut s, b).is_empty());
        s.unsubscribe(a, Channel::Prices);
        assert_eq!(s.fanout(&u), 1);
        assert_eq!(outbox(&mut s, a), &*u.frame, "what was queued before the unsubscribe stays, nothing after");
        assert_eq!(outbox(&mut s, c).len(), 2 * u.frame.len());
    }

    #[test]
    fn private_updates_reach_only_their_user_and_channel() {
        let mut s = shard(1 << 20);
        let (a, b, a2) = (s.insert(None, 0), s.insert(None, 0), s.insert(None, 0));
        s.set_user(a, "alice".into());
        s.set_user(a2, "alice".into());
        s.set_user(b, "bob".into());
        for k in [a, b] {
            s.subscribe(k, Channel::Orders);
        }
        s.subscribe(a2, Channel::Trades);
        let u = Update::encode(Route::User { channel: Channel::Orders, user: "alice".into() }, "u1", 0, b"{}");
        assert_eq!(s.fanout(&u), 1);
        assert!(!s.slot(a).pending.is_empty());
        assert!(s.slot(b).pending.is_empty());
        assert!(s.slot(a2).pending.is_empty());
    }

    #[test]
    fn slow_consumer_is_dropped_and_others_still_served() {
        let u = price(&format!("{{\"pad\":\"{}\"}}", "x".repeat(100)));
        let mut s = shard(u.frame.len() * 3);
        // No socket (-1): the sweep hands both to their drivers.
        let (slow, fast) = (s.insert(None, 0), s.insert(None, 0));
        s.subscribe(slow, Channel::Prices);
        s.subscribe(fast, Channel::Prices);
        s.slot(slow).inflight = u.frame.len() as u32;
        for _ in 0..3 {
            s.fanout(&u);
        }
        s.begin_sweep();
        assert!(s.flush_step(64));
        assert!(s.slot(slow).slow, "one frame in flight plus three queued is over the limit");
        assert!(s.slot(slow).pending.is_empty(), "its backlog is dropped");
        assert_eq!(s.slot(fast).pending.len(), 3 * u.frame.len(), "the other one keeps all three");
        assert_eq!(s.fanout(&u), 1, "and the slow one gets nothing more");
        assert!(s.log.buf.len() == u.frame.len(), "the log keeps only what a sweep has not passed");
    }

    #[test]
    fn a_slow_consumer_keeps_the_frame_a_direct_write_stopped_inside() {
        let u = price(&format!("{{\"pad\":\"{}\"}}", "x".repeat(100)));
        let mut s = shard(u.frame.len() * 3);
        let k = s.insert(None, 0);
        let slot = s.slot(k);
        slot.pending = [&u.frame[..], &u.frame[..]].concat();
        slot.pre_sent = 10; // a direct write stopped inside the first frame
        assert!(!s.queue(k, &[&u.frame[..], &u.frame[..]].concat()), "over the limit");
        assert!(s.slot(k).slow);
        assert_eq!(s.slot(k).pending, &*u.frame, "the first frame stays whole for the driver to finish");
        assert_eq!(s.slot(k).pre_sent, 10);
    }

    #[test]
    fn sweeps_are_spaced_only_after_a_saturated_sweep() {
        let ms = Duration::from_millis;
        let p = |fixed, adaptive| Pacing { fixed: ms(fixed), adaptive: ms(adaptive), busy_pct: 100 };
        let short = ms(5);
        assert_eq!(p(0, 40).interval(false, short), ms(0), "not saturated: start at once");
        assert_eq!(p(0, 40).interval(true, short), ms(40), "saturated: space sweeps");
        assert_eq!(p(0, 0).interval(true, short), ms(0), "adaptive off");
        assert_eq!(p(60, 40).interval(true, short), ms(60), "a longer fixed interval wins");
        assert_eq!(p(10, 40).interval(false, short), ms(10), "the fixed interval always applies");
    }

    #[test]
    fn saturated_sweeps_keep_to_their_share_of_the_core() {
        let ms = Duration::from_millis;
        let p = |adaptive, busy_pct| Pacing { fixed: ms(0), adaptive: ms(adaptive), busy_pct };
        assert_eq!(p(40, 65).interval(true, ms(26)), ms(40), "26 ms is 65% of 40: no stretch");
        assert_eq!(p(40, 65).interval(true, ms(39)), ms(60), "39 ms sweeps: 65% of 60 ms");
        assert_eq!(p(40, 50).interval(true, ms(30)), ms(60));
        assert_eq!(p(40, 65).interval(true, ms(500)), ms(160), "capped at 4x");
        assert_eq!(p(40, 100).interval(true, ms(55)), ms(40), "100: never stretched");
        assert_eq!(p(40, 65).interval(false, ms(39)), ms(0), "only when saturated");
        assert_eq!(p(0, 65).interval(true, ms(39)), ms(0), "adaptive off: no stretch either");
    }

    /// A user's connections, added and removed in every position of their
    /// list, are exactly the ones a private update reaches.
    #[test]
    fn the_user_index_follows_connections_in_and_out() {
        let mut s = shard(1 << 20);
        let orders =
            |user: &str| Update::encode(Route::User { channel: Channel::Orders, user: user.into() }, "u1", 0, b"{}");
        let reached = |s: &mut Shard, user: &str, keys: &[usize]| {
            let keys: Vec<usize> = keys.iter().copied().filter(|&k| s.conns.contains(k)).collect();
            for &k in &keys {
                s.slot(k).pending.clear();
            }
            let n = s.fanout(&orders(user));
            let mut got: Vec<usize> = keys.iter().copied().filter(|&k| !s.slot(k).pending.is_empty()).collect();
            got.sort();
            (n, got)
        };
        let keys: Vec<usize> = (0..6).map(|_| s.insert(None, 0)).collect();
        // alice: 0, 2, 3, 5; bob: 1; carol: 4.
        for (i, &k) in keys.iter().enumerate() {
            let user = match i {
                1 => "bob",
                4 => "carol",
                _ => "alice",
            };
            s.set_user(k, user.into());
            s.subscribe(k, Channel::Orders);
        }
        assert_eq!(reached(&mut s, "alice", &keys), (4, vec![keys[0], keys[2], keys[3], keys[5]]));
        assert_eq!(reached(&mut s, "bob", &keys), (1, vec![keys[1]]));
        // The list is newest first: 5 is its head, 3 in the middle, 0 its tail.
        s.remove(keys[3]);
        assert_eq!(reached(&mut s, "alice", &keys), (3, vec![keys[0], keys[2], keys[5]]));
        s.remove(keys[5]);
        assert_eq!(reached(&mut s, "alice", &keys), (2, vec![keys[0], keys[2]]));
        s.remove(keys[0]);
        assert_eq!(reached(&mut s, "alice", &keys), (1, vec![keys[2]]));
        s.remove(keys[2]);
        assert_eq!(reached(&mut s, "alice", &keys), (0, vec![]));
        assert_eq!(reached(&mut s, "carol", &keys), (1, vec![keys[4]]), "other users keep their routes");
        assert_eq!(s.users.len(), 2, "alice left the index with her last connection");
        // A new connection takes a freed slot: it must not inherit a route.
        let again = s.insert(None, 0);
        s.subscribe(again, Channel::Orders);
        assert_eq!(reached(&mut s, "alice", &[again]), (0, vec![]));
        s.set_user(again, "alice".into());
        assert_eq!(reached(&mut s, "alice", &[again]), (1, vec![again]));
        s.remove(keys[1]);
        s.remove(keys[4]);
        s.remove(again);
        assert!(s.users.is_empty());
    }

    /// A sweep's write that the socket cuts short, of log bytes that are
    /// over the limit: the frame it stopped in stays whole in the outbox
    /// for the driver (wire bytes + outbox after `pre_sent` = whole frames).
    #[test]
    fn a_short_direct_write_past_the_limit_keeps_its_frame() {
        use std::os::unix::net::UnixStream;
        for uring in [true, false] {
            let u = price(&format!("{{\"pad\":\"{}\"}}", "x".repeat(100)));
            let mut s = shard(u.frame.len() * 4);
            s.use_io_uring(uring);
            let (srv, mut cli) = UnixStream::pair().unwrap();
            socket2::SockRef::from(&srv).set_send_buffer_size(4096).unwrap();
            let k = s.insert(Some(DirectSocket::owned(srv.into())), 0);
            s.subscribe(k, Channel::Prices);
            for _ in 0..400 {
                s.fanout(&u);
            }
            s.begin_sweep();
            assert!(s.flush_step(64));
            let slot = s.slot(k);
            assert!(slot.slow, "past the limit (io_uring {uring})");
            assert!(slot.pre_sent > 0, "the write was short");
            let wire = received(&mut cli);
            assert_eq!(wire.len(), slot.pre_sent as usize, "pre_sent is what the socket took");
            let mut stream = wire.clone();
            stream.extend_from_slice(&slot.pending[slot.pre_sent as usize..]);
            let mut pos = 0;
            while pos < stream.len() {
                let len = server_frame_len(&stream[pos..]).expect("whole frames");
                assert_eq!(&stream[pos..pos + len], &*u.frame);
                pos += len;
            }
            assert_eq!(pos, stream.len(), "no frame cut (io_uring {uring})");
            assert!(stream.len() < 400 * u.frame.len(), "the backlog behind it was dropped");
        }
    }

    /// Reads what a socket has received so far (non-blocking).
    fn received(sock: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
        use std::io::Read;
        sock.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn a_sweep_carries_updates_that_arrive_before_it_reaches_a_socket() {
        use std::os::unix::net::UnixStream;
        let mut s = shard(1 << 20);
        let (a_srv, mut a_cli) = UnixStream::pair().unwrap();
        let (b_srv, mut b_cli) = UnixStream::pair().unwrap();
        let a = s.insert(Some(DirectSocket::owned(a_srv.into())), 0);
        let b = s.insert(Some(DirectSocket::owned(b_srv.into())), 0);
        s.subscribe(a, Channel::Prices);
        s.subscribe(b, Channel::Prices);
        let (u1, u2) = (price("{\"n\":1}"), price("{\"n\":2}"));
        s.fanout(&u1);
        s.begin_sweep();
        assert!(!s.flush_step(1), "one socket written, one to go");
        s.fanout(&u2);
        assert!(s.flush_step(64), "the sweep is done");
        let both = [&u1.frame[..], &u2.frame[..]].concat();
        assert_eq!(received(&mut b_cli), both, "the socket not yet reached sent both in this sweep");
        assert_eq!(received(&mut a_cli), &*u1.frame, "the socket already passed got the first only");
        assert!(s.has_dirty(), "and is listed for the next sweep");
        s.begin_sweep();
        assert!(s.flush_step(64));
        assert_eq!(received(&mut a_cli), &*u2.frame);
        assert!(received(&mut b_cli).is_empty(), "nothing is sent twice");
        assert!(!s.has_dirty());
    }

    /// Splits a byte stream of whole server frames into their payloads.
    fn payloads(mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = server_frame_len(bytes).expect("whole frames only");
            let header = match bytes[1] & 0x7F {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            out.push(String::from_utf8(bytes[header..len].to_vec()).unwrap());
            bytes = &bytes[len..];
        }
        out
    }

    /// Random interleavings of subscribe, unsubscribe, price and private
    /// updates, and sweeps written in random steps: every connection gets
    /// exactly the updates published while it was subscribed, each channel
    /// in order, nothing twice, nothing lost; with the sweeps' direct writes
    /// batched through io_uring and as one system call each.
    #[test]
    fn random_interleavings_deliver_each_channel_exactly_once_in_order() {
        use rand::{Rng, SeedableRng};
        use std::os::unix::net::UnixStream;
        for (seed, uring) in (0..20u64).flat_map(|seed| [(seed, true), (seed, false)]) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut s = shard(1 << 24);
            assert_eq!(s.use_io_uring(uring), uring, "io_uring is available (glommio needs it too)");
            let mut conns = Vec::new(); // (key, client side, user, got, expected prices, expected orders)
            for i in 0..6 {
                let (srv, cli) = UnixStream::pair().unwrap();
                let key = s.insert(Some(DirectSocket::owned(srv.into())), 0);
                let user: Arc<str> = format!("user{}", i % 3).into();
                s.set_user(key, user.clone());
                s.subscribe(key, Channel::Orders);
                conns.push((key, cli, user, Vec::<u8>::new(), Vec::<String>::new(), Vec::<String>::new()));
            }
            let mut seq = 0;
            for _ in 0..400 {
                match rng.random_range(0..10) {
                    0 => {
                        let c = &conns[rng.random_range(0..conns.len())];
                        s.subscribe(c.0, Channel::Prices);
                    }
                    1 => {
                        let c = &conns[rng.random_range(0..conns.len())];
                        s.unsubscribe(c.0, Channel::Prices);
                    }
                    2..=5 => {
                        seq += 1;
                        let data = format!("p{seq}");
                        for c in conns.iter_mut() {
                            if s.slot(c.0).subs & Channel::Prices.bit() != 0 {
                                c.4.push(data.clone());
                            }
                        }
                        s.fanout(&price(&format!("\"{data}\"")));
                    }
                    6 => {
                        seq += 1;
                        let user: Arc<str> = format!("user{}", rng.random_range(0..3)).into();
                        let data = format!("o{seq}");
                        for c in conns.iter_mut().filter(|c| c.2 == user) {
                            c.5.push(data.clone());
                        }
                        let route = Route::User { channel: Channel::Orders, user: user.to_string().into() };
                        s.fanout(&Update::encode(route, "u1", 0, format!("\"{data}\"").as_bytes()));
                    }
                    _ => {
                        if !s.sweeping() {
                            s.begin_sweep();
                        }
                        s.flush_step(rng.random_range(1..8));
                    }
                }
                for c in conns.iter_mut() {
                    let got = received(&mut c.1);
                    c.3.extend_from_slice(&got);
                }
            }
            while s.sweeping() || s.has_dirty() {
                if !s.sweeping() {
                    s.begin_sweep();
                }
                s.flush_step(3);
            }
            for c in conns.iter_mut() {
                let got = received(&mut c.1);
                c.3.extend_from_slice(&got);
                assert!(
                    s.slot(c.0).pending.is_empty(),
                    "seed {seed} (io_uring {uring}): everything was written directly"
                );
                let frames = payloads(&c.3);
                let data = |prefix: &str| -> Vec<String> {
                    frames
                        .iter()
                        .filter_map(|f| {
                            let v: serde_json::Value = serde_json::from_str(f).unwrap();
                            let d = v["data"].as_str().unwrap().to_string();
                            d.starts_with(prefix).then_some(d)
                        })
                        .collect()
                };
                assert_eq!(data("p"), c.4, "seed {seed} (io_uring {uring}): prices for connection {}", c.0);
                assert_eq!(data("o"), c.5, "seed {seed} (io_uring {uring}): orders for connection {}", c.0);
            }
            assert!(s.log.buf.is_empty(), "seed {seed} (io_uring {uring}): the log is empty once every sweep is done");
        }
    }

    fn e2e_samples(s: &Shard) -> u64 {
        s.stats.e2e_latency_us.lock().len()
    }

    /// An update is sampled for the Kafka-to-socket latency only when it
    /// reaches a socket, at that write; nothing is kept for updates that
    /// no connection on the shard takes, however many arrive.
    #[test]
    fn latency_is_sampled_at_the_first_write_of_a_delivered_update() {
        use std::os::unix::net::UnixStream;
        let stamped = |mut u: Update| {
            u.kafka_ts_ms = Clock::system().epoch_ms() as i64 - 5;
            u
        };
        let mut s = shard(1 << 20);
        for _ in 0..10_000 {
            s.fanout(&stamped(price("{}")));
            let orders = Route::User { channel: Channel::Orders, user: "nobody".into() };
            s.fanout(&stamped(Update::encode(orders, "u1", 0, b"{}")));
        }
        assert!(s.stamps.log.is_empty() && s.stamps.private.is_empty(), "no subscriber: nothing kept");
        assert!(!s.has_dirty(), "and nothing to write");

        let (srv, mut cli) = UnixStream::pair().unwrap();
        let k = s.insert(Some(DirectSocket::owned(srv.into())), 0);
        s.set_user(k, "alice".into());
        s.subscribe(k, Channel::Prices);
        s.subscribe(k, Channel::Orders);
        s.fanout(&stamped(price("{}")));
        let orders = Route::User { channel: Channel::Orders, user: "alice".into() };
        s.fanout(&stamped(Update::encode(orders, "u2", 0, b"{}")));
        assert_eq!(e2e_samples(&s), 0, "queued, not yet written");
        s.begin_sweep();
        assert!(s.flush_step(64));
        assert!(!received(&mut cli).is_empty());
        assert_eq!(e2e_samples(&s), 2, "one sample per delivered update, at its write");
        let min = s.stats.e2e_latency_us.lock().min();
        assert!(min >= 5_000, "measured from the Kafka timestamp: {min} µs");
        assert!(!s.slot(k).stamped);
    }

    #[test]
    fn latency_samples_are_bounded_and_counted() {
        let mut s = shard(1 << 30);
        let k = s.insert(None, 0);
        s.subscribe(k, Channel::Prices);
        for _ in 0..MAX_STAMPS + 10 {
            let mut u = price("{}");
            u.kafka_ts_ms = 1;
            s.fanout(&u);
        }
        assert_eq!(s.stamps.log.len(), MAX_STAMPS);
        assert_eq!(s.stats.latency_samples_skipped.get(), 10);
    }

    /// The slot owns its share of the socket: the descriptor stays open
    /// while the slot holds it, whoever else let go, and closes with it.
    #[test]
    fn a_slot_keeps_its_socket_open_until_it_is_removed() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let mut s = shard(1 << 20);
        let (srv, mut cli) = UnixStream::pair().unwrap();
        let k = s.insert(Some(DirectSocket::owned(srv.into())), 0);
        s.subscribe(k, Channel::Prices);
        let u = price("{}");
        s.fanout(&u);
        s.begin_sweep();
        assert!(s.flush_step(64));
        assert_eq!(received(&mut cli), &*u.frame, "written through the slot's descriptor");
        s.remove(k);
        cli.set_nonblocking(false).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(cli.read(&mut byte).unwrap(), 0, "removing the slot closed the socket");
    }

    #[test]
    fn removal_keeps_the_price_list_consistent() {
        let mut s = shard(1 << 20);
        let keys: Vec<_> = (0..5).map(|_| s.insert(None, 0)).collect();
        for &k in &keys {
            s.subscribe(k, Channel::Prices);
        }
        s.remove(keys[1]);
        s.remove(keys[4]);
        let u = price("{}");
        assert_eq!(s.fanout(&u), 3);
        for k in [keys[0], keys[2], keys[3]] {
            assert_eq!(outbox(&mut s, k), &*u.frame);
        }
    }
}

#[cfg(test)]
mod size {
    /// Every open connection has a slot, reserved up front for
    /// `WS_MAX_CONNECTIONS`: a field that makes it grow should be a decision.
    #[test]
    fn a_slot_stays_at_120_bytes() {
        assert_eq!(std::mem::size_of::<super::Slot>(), 120);
    }
}
