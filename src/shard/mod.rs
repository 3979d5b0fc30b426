//! One shard: the connections a core owns, who subscribes to what, and the
//! fan-out that turns one update into bytes queued for every subscriber.
//!
//! The files, each owning one thing: [`Shard`] here (the slots and the
//! operations on them); `slot.rs` (what the shard holds per connection);
//! `registry.rs` (the `prices` list and the user index); `outbox.rs` (a
//! connection's unsent output and its contract); `price_log.rs` (price
//! frames queued once for all subscribers); `sweep.rs` (writing queued
//! frames to sockets); `stamps.rs` (Kafka-to-socket latency samples);
//! `pacing.rs` (how far apart sweeps start, pure); and the two tasks that
//! touch glommio or time: `fanout.rs` (inbox -> fan-out -> sweeps) and
//! `tick.rs` (deadlines, memory hand-back). `inbox.rs` is the only
//! cross-thread input. Shard state is `Rc<RefCell<_>>`, touched only by its
//! core.
//!
//! Price frames are queued once per shard, not once per subscriber: they go
//! to the price log, and each subscriber keeps a cursor into it. A sweep
//! writes each connection's queue (replies, private updates) and its part
//! of the log with one `sendmsg`, straight from the shared bytes. Only when
//! a socket cannot take everything now (or its driver is mid-write, or it
//! is TLS) are the log bytes copied into that connection's queue.
//!
//! Slow consumers: when a connection's unsent output would pass
//! `WS_MAX_BUFFERED_BYTES`, its backlog is dropped and its driver closes it
//! with 4009 (`outbox.rs`). Queueing never waits on a socket, so one slow
//! reader cannot slow others.

mod fanout;
mod held;
pub mod inbox;
mod markets;
mod outbox;
pub mod pacing;
mod price_log;
mod registry;
mod slot;
mod stamps;
mod sweep;
mod tick;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::task::Waker;

use slab::Slab;

use crate::clock::Clock;
use crate::protocol::channel::ChannelName;
use crate::protocol::message::Channel;
use crate::protocol::CloseCode;
use crate::telemetry::{Sent, ShardStats};
use held::{Hold, Holds};
use inbox::{Route, Update};
use markets::{Markets, TopicKey};
use outbox::Buffers;
use price_log::PriceLog;
use registry::Registry;
use slot::{Marks, Slot, NOT_LISTED};
use stamps::Stamps;
use sweep::Sweep;

pub use crate::sys::DirectSocket;
pub use fanout::{run_fanout, Precedence, StepAside};
pub use outbox::InFlight;
pub use pacing::Pacing;
pub use tick::{run_tick, tick_for};

/// Markets whose last update a shard keeps unless told otherwise
/// (`WS_MAX_MARKETS`).
pub const DEFAULT_MAX_MARKETS: usize = 100_000;

pub struct Shard {
    pub id: usize,
    conns: Slab<Slot>,
    registry: Registry,
    /// Market and chain channels, and each market's last update.
    markets: Markets,
    /// Private channels being resumed, and their held live updates.
    holds: Holds,
    /// Connections an update with overlapping routes reached (scratch).
    reached: Vec<usize>,
    log: PriceLog,
    /// Spare buffers and the per-connection limit.
    bufs: Buffers,
    /// Parked connections woken since the parker last looked.
    unpark: Vec<usize>,
    sweep: Sweep,
    stamps: Stamps,
    pub stats: Arc<ShardStats>,
    /// Reads the wall clock for latency samples.
    clock: Clock,
    shutting_down: bool,
}

/// What a completion of a socket watch did ([`Shard::on_watch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// Of an earlier watch (a closed connection that had the same key).
    Stale,
    /// Its driver was woken (or was already).
    Woken,
    /// The connection is parked: its parker resumes it.
    Parked,
}

impl Shard {
    pub fn new(id: usize, max_buffered: usize, stats: Arc<ShardStats>) -> Self {
        Self {
            id,
            conns: Slab::new(),
            registry: Registry::default(),
            markets: Markets::new(DEFAULT_MAX_MARKETS),
            holds: Holds::default(),
            reached: Vec::new(),
            log: PriceLog::default(),
            bufs: Buffers::new(max_buffered),
            unpark: Vec::new(),
            sweep: Sweep::new(),
            stamps: Stamps::default(),
            stats,
            clock: Clock::system(),
            shutting_down: false,
        }
    }

    /// How many markets keep their last update (`WS_MAX_MARKETS`); set
    /// before any update is taken.
    pub fn set_max_markets(&mut self, max: usize) {
        self.markets = Markets::new(max);
    }

    /// The clock latency samples are read from (the server's).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// Reserves room for `connections` (address space, but for the user
    /// index's control bytes: the pages are touched as connections arrive),
    /// so neither the slot table nor the registry grows while thousands
    /// connect.
    pub fn reserve(&mut self, connections: usize) {
        self.conns.reserve(connections);
        self.registry.reserve(connections);
    }

    /// Adds a connection; returns its key. `sock` is its socket for direct
    /// writes (None: TLS); `in_driver` is what its driver has yet to write
    /// (the 101 response), so direct writes wait for it.
    pub fn insert(&mut self, sock: Option<DirectSocket>, in_driver: usize) -> usize {
        let mut out = outbox::Outbox::new(in_driver);
        if self.shutting_down {
            out.shut_down();
        }
        self.conns.insert(Slot::new(out, sock))
    }

    /// Removes a connection and every registration it had (its share of
    /// the socket goes with it).
    pub fn remove(&mut self, key: usize) {
        self.stop_updates(key);
        if let Some(mut slot) = self.conns.try_remove(key) {
            if slot.marks.take(Marks::STAMPED) {
                self.stamps.forget(key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The driver of `key` is polled: records its waker, and queuing for
    /// the connection wakes nothing until [`Shard::poll_ended`].
    pub fn poll_began(&mut self, key: usize, waker: &Waker) {
        self.conns[key].poll_began(waker);
    }

    /// The driver of `key` returned pending: it took what was queued, and
    /// what is queued from now on wakes it.
    pub fn poll_ended(&mut self, key: usize) {
        self.conns[key].poll_ended();
    }

    /// Binds an authenticated user to the connection (private routing).
    pub fn set_user(&mut self, key: usize, user: Arc<str>) {
        let slot = &mut self.conns[key];
        if slot.user.is_some() || !slot.out.takes_updates() {
            return;
        }
        slot.user = Some(user);
        self.registry.link_user(&mut self.conns, key);
        self.stats.connections_authenticated.inc();
    }

    pub fn subscribe(&mut self, key: usize, channel: Channel) {
        let slot = &mut self.conns[key];
        if slot.subs & channel.bit() != 0 || !slot.out.takes_updates() {
            return;
        }
        slot.subs |= channel.bit();
        if channel == Channel::Prices {
            slot.out.follow_log(&self.log);
            self.registry.add_price(&mut self.conns, key);
        }
        self.stats.subscribers[channel as usize].inc();
    }

    pub fn unsubscribe(&mut self, key: usize, channel: Channel) {
        let slot = &mut self.conns[key];
        if slot.subs & channel.bit() == 0 {
            return;
        }
        slot.subs &= !channel.bit();
        if channel == Channel::Prices {
            // Frames queued before the unsubscribe are still delivered
            // (past the limit: a slow consumer, 4009).
            match slot.out.unfollow_log(&self.log, &mut self.bufs) {
                Ok(()) => slot.mark_dirty(key, &mut self.sweep.dirty),
                Err(outbox::Slow) => slot.wake(key, &mut self.unpark),
            }
            self.registry.remove_price(&mut self.conns, key);
        }
        self.stats.subscribers[channel as usize].sub(1);
    }

    /// Whether the connection holds a market or chain channel (the fixed
    /// channels are the session's bits).
    pub fn holds(&self, key: usize, name: &ChannelName) -> bool {
        self.markets.holds(key, name)
    }

    /// How many market and chain channels the connection holds.
    pub fn topics_held(&self, key: usize) -> usize {
        self.markets.count(key)
    }

    /// Subscribes the connection to any channel (idempotent).
    pub fn subscribe_to(&mut self, key: usize, name: ChannelName) {
        match name {
            ChannelName::Fixed(channel) => self.subscribe(key, channel),
            ChannelName::Chain(c) => self.subscribe_topic(key, TopicKey::Chain(c)),
            ChannelName::Market(m) => self.subscribe_topic(key, TopicKey::Market(m)),
        }
    }

    /// Unsubscribes the connection from any channel (idempotent).
    pub fn unsubscribe_from(&mut self, key: usize, name: &ChannelName) {
        match name {
            ChannelName::Fixed(channel) => self.unsubscribe(key, *channel),
            other => {
                if self.markets.unsubscribe(key, other) {
                    self.stats.market_subscriptions.sub(1);
                }
            }
        }
    }

    fn subscribe_topic(&mut self, key: usize, topic: TopicKey) {
        if self.conns[key].out.takes_updates() && self.markets.subscribe(key, topic) {
            self.stats.market_subscriptions.inc();
        }
    }

    /// Subscribes the connection to private `channel` for a resume
    /// (PROTOCOL.md §12): live updates of the channel are held aside from
    /// now until [`Shard::end_resume`]. Returns the resume's ticket and
    /// where the shard's feed stands in the partition `since` names (the
    /// replay may end there: every later update is held; None: the shard
    /// took none of it yet, or `inbox_drops`, the inbox's drop count now,
    /// says it lost one since); None when one of that channel is already
    /// in flight on the connection, or it takes no updates any more.
    pub fn begin_resume(
        &mut self,
        key: usize,
        channel: Channel,
        since: crate::protocol::message::Pos,
        inbox_drops: u64,
    ) -> Option<(u64, Option<i64>)> {
        if !self.conns[key].out.takes_updates() {
            return None;
        }
        let ticket = self.holds.begin(key, channel)?;
        self.subscribe(key, channel);
        self.conns[key].marks.set(Marks::HOLDING, true);
        self.stats.recoveries_in_flight.set(self.holds.len() as u64);
        Some((ticket, self.holds.fed_to(channel, since.0, inbox_drops)))
    }

    /// The shard's inbox has dropped `drops` updates so far (the fan-out
    /// tells before each batch it takes).
    pub fn note_inbox_drops(&mut self, drops: u64) {
        self.holds.inbox_drops(drops);
    }

    /// The ticket of the connection's resume of `channel`, if in flight.
    pub fn resume_ticket(&self, key: usize, channel: Channel) -> Option<u64> {
        self.holds.ticket(key, channel)
    }

    /// Ends the resume with `ticket` and returns the live updates held
    /// meanwhile, oldest first; None when it is no longer in flight (the
    /// connection left, or it overflowed). The caller queues the reply,
    /// the replay, then what it keeps of these ([`Shard::deliver`]).
    /// `floor`: the partition and end of a complete replay; live updates
    /// of that partition below it, should the shard's feed not have reached
    /// it yet, are skipped.
    pub fn end_resume(
        &mut self,
        key: usize,
        channel: Channel,
        ticket: u64,
        floor: Option<(i32, i64)>,
    ) -> Option<Vec<Arc<Update>>> {
        let held = self.holds.end(key, channel, ticket, floor)?;
        if !self.holds.holds_any(key) {
            self.conns[key].marks.set(Marks::HOLDING, false);
        }
        self.stats.recoveries_in_flight.set(self.holds.len() as u64);
        Some(held.updates)
    }

    /// Queues updates for one connection, in order (a resume's replay and
    /// what was held); past the limit, a slow consumer. Returns how many
    /// were queued.
    pub fn deliver<'a>(&mut self, key: usize, updates: impl IntoIterator<Item = &'a Arc<Update>>) -> usize {
        let mut queued = 0;
        let slot = &mut self.conns[key];
        for update in updates {
            if !slot.out.takes_updates() {
                break;
            }
            if slot.out.push(&update.frame, &self.log, &mut self.bufs).is_err() {
                break;
            }
            self.stats.sent[Sent::Update(update.route.channel()).index()].inc();
            queued += 1;
        }
        slot.mark_dirty(key, &mut self.sweep.dirty);
        slot.wake(key, &mut self.unpark);
        if slot.out.lifecycle() == outbox::Lifecycle::Slow {
            self.stop_updates(key);
        }
        queued
    }

    /// The snapshot of a price channel (PROTOCOL.md §11): a market's last
    /// update unless `wanted` is `Some(false)`; for `prices:<chainId>` and
    /// `prices` only when `wanted` is `Some(true)`, the last update of each
    /// matching market, newest first, at most `max`.
    pub fn snapshot(&self, name: &ChannelName, wanted: Option<bool>, max: usize) -> Vec<Arc<Update>> {
        match (name, wanted) {
            (ChannelName::Market(m), None | Some(true)) => self.markets.last(m).cloned().into_iter().collect(),
            (ChannelName::Chain(c), Some(true)) => self.markets.latest(Some(*c), max),
            (ChannelName::Fixed(Channel::Prices), Some(true)) => self.markets.latest(None, max),
            _ => Vec::new(),
        }
    }

    /// Takes the connection out of every route: nothing more is queued for
    /// it except by its own driver (replies, the close frame).
    pub fn stop_updates(&mut self, key: usize) {
        let Some(slot) = self.conns.get(key) else {
            return;
        };
        if slot.subs == 0 && slot.user.is_none() && !slot.out.takes_updates() && self.markets.count(key) == 0 {
            return;
        }
        if self.conns[key].marks.take(Marks::HOLDING) {
            // Its resumes end unanswered: it will send nothing more.
            let n = self.holds.drop_all(key);
            self.stats.recoveries_abandoned.add(n as u64);
            self.stats.recoveries_in_flight.set(self.holds.len() as u64);
        }
        // Every topic list lets go of the key before the slot can be reused.
        let topics = self.markets.remove(key);
        self.stats.market_subscriptions.sub(topics as u64);
        for ch in Channel::ALL {
            self.unsubscribe(key, ch);
        }
        self.conns[key].out.stop_updates();
        if self.conns[key].user.is_some() {
            self.registry.unlink_user(&mut self.conns, key);
            self.stats.connections_authenticated.sub(1);
        }
    }

    /// Queues frames for one connection (a reply or control frame), past
    /// the limit: a slow consumer. Returns false if they were dropped.
    pub fn queue(&mut self, key: usize, frames: &[u8]) -> bool {
        let slot = &mut self.conns[key];
        let ok = slot.out.push(frames, &self.log, &mut self.bufs).is_ok();
        slot.wake(key, &mut self.unpark);
        if !ok {
            self.stop_updates(key);
        }
        ok
    }

    /// Queues a snapshot frame: after what the price log still owes the
    /// connection (a `prices` subscriber may have older frames of the same
    /// market there), so no older update follows it. False if dropped.
    pub fn queue_snapshot(&mut self, key: usize, frame: &[u8]) -> bool {
        let slot = &mut self.conns[key];
        let ok = slot.out.materialize(&self.log, &mut self.bufs).is_ok()
            && slot.out.push(frame, &self.log, &mut self.bufs).is_ok();
        slot.wake(key, &mut self.unpark);
        self.stats.conflated.set(self.bufs.conflated);
        if !ok {
            self.stop_updates(key);
        }
        ok
    }

    /// Queues the connection's close frame (after everything queued; the
    /// last thing it will send) and takes it out of every route.
    pub fn queue_close(&mut self, key: usize, frame: &[u8]) {
        self.stop_updates(key);
        self.conns[key].out.queue_close(frame, &mut self.bufs);
    }

    /// The close the connection's driver owes it (slow consumer, shutdown).
    pub fn owed_close(&self, key: usize) -> Option<CloseCode> {
        self.conns[key].out.owed_close()
    }

    /// Whether the connection has nothing queued, in its driver's hands or
    /// owed (its driver may park).
    pub fn is_quiet(&self, key: usize) -> bool {
        self.conns[key].out.is_quiet()
    }

    /// Whether everything queued for the connection was written.
    pub fn is_flushed(&self, key: usize) -> bool {
        self.conns[key].out.is_flushed()
    }

    /// For the driver, which has written all it held: everything queued
    /// (price frames included) moves into `into`. False when nothing is
    /// left to write.
    pub fn take_for_driver(&mut self, key: usize, into: &mut InFlight) -> bool {
        let slot = &mut self.conns[key];
        let more = slot.out.take_for_driver(&self.log, &mut self.bufs, into);
        if slot.out.lifecycle() == outbox::Lifecycle::Slow {
            self.stop_updates(key);
        }
        more
    }

    /// The driver still holds `unwritten` bytes (its socket is full).
    pub fn driver_holds(&mut self, key: usize, unwritten: usize) {
        self.conns[key].out.driver_holds(unwritten);
    }

    /// Monotonic ms at which the tick must wake the connection's driver.
    pub fn set_deadline(&mut self, key: usize, deadline_ms: u64) {
        self.conns[key].deadline_ms = deadline_ms;
    }

    pub fn deadline(&self, key: usize) -> u64 {
        self.conns[key].deadline_ms
    }

    /// Queues `update` for every matching subscriber; returns how many.
    /// A market's update also becomes its snapshot.
    pub fn fanout(&mut self, update: &Arc<Update>) -> usize {
        if update.replay {
            if let Route::Market(m) = &update.route {
                if self.markets.record(m, update) {
                    self.stats.markets_evicted.inc();
                }
                self.stats.markets_known.set(self.markets.with_value() as u64);
            }
            return 0;
        }
        let mut delivered = 0;
        let mut slow = Vec::new();
        match &update.route {
            Route::Prices | Route::Chain(_) | Route::Market(_) => {
                // Once for the shard; each subscriber's sweep visit sends it.
                if !self.registry.prices().is_empty() {
                    self.log.append(&update.frame);
                    delivered = self.registry.prices().len();
                    if update.kafka_ts_ms > 0 {
                        self.stamps.price(self.log.head(), update.kafka_ts_ms, &self.stats);
                    }
                }
                let logged = delivered > 0;
                delivered += self.fanout_markets(update, logged, &mut slow);
                if let Route::Market(m) = &update.route {
                    if self.markets.record(m, update) {
                        self.stats.markets_evicted.inc();
                    }
                    self.stats.markets_known.set(self.markets.with_value() as u64);
                }
            }
            Route::User { channel, user } => {
                if let Some(pos) = update.pos {
                    self.holds.fed(*channel, pos);
                }
                let mut first = None;
                let mut next = self.registry.first_of(&self.conns, user).unwrap_or(NOT_LISTED as usize);
                while next != NOT_LISTED as usize {
                    let key = next;
                    let slot = &mut self.conns[key];
                    next = slot.next_user as usize;
                    if slot.subs & channel.bit() == 0 || !slot.out.takes_updates() {
                        continue;
                    }
                    if slot.marks.get(Marks::HOLDING) {
                        match self.holds.hold(key, *channel, update, self.bufs.limit) {
                            Hold::NotHeld => {
                                if !self.holds.holds_any(key) {
                                    slot.marks.set(Marks::HOLDING, false);
                                }
                            }
                            Hold::Held | Hold::Covered => continue,
                            Hold::Overflow => {
                                self.stats.recoveries_overflowed.inc();
                                self.stats.recoveries_in_flight.set(self.holds.len() as u64);
                                slot.out.overflowed();
                                slot.wake(key, &mut self.unpark);
                                slow.push(key);
                                continue;
                            }
                        }
                    }
                    match slot.out.push(&update.frame, &self.log, &mut self.bufs) {
                        Ok(()) => {
                            slot.mark_dirty(key, &mut self.sweep.dirty);
                            delivered += 1;
                            first.get_or_insert(key);
                        }
                        Err(outbox::Slow) => {
                            slot.wake(key, &mut self.unpark);
                            slow.push(key);
                        }
                    }
                }
                if let (Some(key), true) = (first, update.kafka_ts_ms > 0) {
                    if self.stamps.private(key, update.kafka_ts_ms, &self.stats) {
                        self.conns[key].marks.set(Marks::STAMPED, true);
                    }
                }
            }
        }
        for key in slow {
            self.stop_updates(key);
        }
        self.stats.conflated.set(self.bufs.conflated);
        self.stats.sent[Sent::Update(update.route.channel()).index()].add(delivered as u64);
        self.stats.deliveries.add(delivered as u64);
        delivered
    }

    /// Queues a price update for its chain's and its market's subscribers
    /// that do not take it through `prices` already; each connection once,
    /// however many of its channels match. `logged`: the update went to
    /// the price log (and its latency sample with it).
    fn fanout_markets(&mut self, update: &Update, logged: bool, slow: &mut Vec<usize>) -> usize {
        let (chain, market) = match &update.route {
            Route::Chain(c) => (*c, None),
            Route::Market(m) => (m.chain, Some(m)),
            _ => return 0,
        };
        let Shard { conns, markets, reached, log, bufs, sweep, unpark, .. } = self;
        let reach = markets.reach(chain, market);
        // A connection can be on both lists only when both have someone.
        let overlap = !reach.chain.is_empty() && !reach.market.is_empty();
        let mut delivered = 0;
        let mut first = None;
        for &k in reach.market.iter().chain(reach.chain) {
            let key = k as usize;
            let slot = &mut conns[key];
            if slot.subs & Channel::Prices.bit() != 0 || !slot.out.takes_updates() {
                continue;
            }
            if overlap {
                if slot.marks.get(Marks::REACHED) {
                    continue;
                }
                slot.marks.set(Marks::REACHED, true);
                reached.push(key);
            }
            match slot.out.push(&update.frame, log, bufs) {
                Ok(()) => {
                    slot.mark_dirty(key, &mut sweep.dirty);
                    delivered += 1;
                    first.get_or_insert(key);
                }
                Err(outbox::Slow) => {
                    slot.wake(key, unpark);
                    slow.push(key);
                }
            }
        }
        for key in reached.drain(..) {
            conns[key].marks.set(Marks::REACHED, false);
        }
        if let (Some(key), false, true) = (first, logged, update.kafka_ts_ms > 0) {
            if self.stamps.private(key, update.kafka_ts_ms, &self.stats) {
                self.conns[key].marks.set(Marks::STAMPED, true);
            }
        }
        delivered
    }

    /// Wakes every connection whose deadline has passed.
    pub fn wake_due(&mut self, now_ms: u64) {
        for (key, slot) in self.conns.iter_mut() {
            if slot.deadline_ms <= now_ms {
                slot.deadline_ms = u64::MAX;
                slot.wake(key, &mut self.unpark);
            }
        }
    }

    /// Marks the shard as shutting down (a connection inserted from now on
    /// owes its 1001 close at once) and lists the open ones, for
    /// [`Shard::shut_down`] to close in batches.
    pub fn begin_shutdown(&mut self) -> Vec<usize> {
        self.shutting_down = true;
        self.conns.iter().map(|(key, _)| key).collect()
    }

    /// Has a connection's driver close it with 1001, and wakes it (none: it
    /// is gone).
    pub fn shut_down(&mut self, key: usize) {
        if let Some(slot) = self.conns.get_mut(key) {
            slot.out.shut_down();
            slot.wake(key, &mut self.unpark);
        }
    }

    /// Frees spare buffers the shard has not needed since the last call
    /// (half of them each time); returns how many.
    pub fn trim_spares(&mut self) -> usize {
        self.bufs.trim_idle()
    }

    /// Marks a connection parked: `record` + 1 is its parker record's
    /// index, `fd` the connection's own duplicate of its socket (the slot
    /// holds it while parked), and `parker` the waker that any later
    /// wake-up of the connection goes to.
    pub fn park(&mut self, key: usize, fd: OwnedFd, record: u32, parker: &Waker) {
        let slot = &mut self.conns[key];
        slot.sock = Some(DirectSocket::owned(fd));
        slot.parked = record + 1;
        slot.set_waker(parker);
    }

    /// Ends a connection's parking; returns its record's index and its
    /// socket (for the resumed driver, which hands it back with
    /// [`Shard::set_socket`]), or None if it was not parked.
    pub fn unpark(&mut self, key: usize) -> Option<(u32, OwnedFd)> {
        let slot = self.conns.get_mut(key)?;
        let record = slot.parked.checked_sub(1)?;
        let fd = slot.sock.take()?.into_owned()?;
        slot.parked = 0;
        slot.clear_waker();
        Some((record, fd))
    }

    /// Records that the socket of `key` is watched on the poll ring by
    /// the watch of generation `watch` (not 0).
    pub fn set_watch(&mut self, key: usize, watch: u16) {
        let slot = &mut self.conns[key];
        slot.watch = watch;
        slot.marks.set(Marks::READABLE, false);
    }

    /// The generation of the socket's watch, 0 when none is armed.
    pub fn watch(&self, key: usize) -> u16 {
        self.conns.get(key).map_or(0, |s| s.watch)
    }

    /// Whether the driver of `key` should read its socket now: no watch is
    /// armed (so none will tell), or the watch fired since the last read.
    /// Clears the mark: bytes that arrive after the read fire the watch
    /// again (the kernel posts a completion for each arrival), and a read
    /// that fills the buffer marks the socket again
    /// ([`Shard::mark_readable`]).
    pub fn take_readable(&mut self, key: usize) -> bool {
        let slot = &mut self.conns[key];
        slot.marks.take(Marks::READABLE) || slot.watch == 0
    }

    /// Marks `key`'s socket readable: its driver's next read tries it
    /// (bytes may be left after a read that filled its buffer).
    pub fn mark_readable(&mut self, key: usize) {
        self.conns[key].marks.set(Marks::READABLE, true);
    }

    /// A completion of the watch `watch` on `key`'s socket (`more`: the
    /// watch goes on; `failed`: the kernel ended it with an error): marks
    /// the socket readable and wakes its driver, or tells the parker to
    /// resume it. A completion of an earlier watch changes nothing.
    pub fn on_watch(&mut self, key: usize, watch: u16, more: bool, failed: bool) -> Watched {
        let Some(slot) = self.conns.get_mut(key) else { return Watched::Stale };
        if slot.watch != watch || watch == 0 {
            return Watched::Stale;
        }
        if !more {
            slot.watch = 0;
        }
        slot.marks.set(Marks::WATCH_FAILED, failed);
        slot.marks.set(Marks::READABLE, true);
        if slot.parked != 0 {
            return Watched::Parked;
        }
        slot.wake(key, &mut self.unpark);
        Watched::Woken
    }

    /// Whether the kernel ended `key`'s last watch with an error (its
    /// driver then reads through glommio); clears the mark.
    pub fn take_watch_failed(&mut self, key: usize) -> bool {
        self.conns[key].marks.take(Marks::WATCH_FAILED)
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
        into.append(&mut self.unpark);
    }

    /// Whether any parked connection was woken.
    pub fn has_unparks(&self) -> bool {
        !self.unpark.is_empty()
    }
}

#[cfg(test)]
mod tests;
