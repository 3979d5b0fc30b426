//! The shard's poll ring: every plain-TCP connection's socket watched for
//! input, and parking, idle connections held without a task.
//!
//! Owns: the shard's poll ring ([`crate::sys::PollRing`]), the records of
//! parked connections, and the parker task that submits the ring's
//! requests, reads its completions, and gives a parked connection its task
//! back.
//!
//! Watching: a plain-TCP connection's driver reads its socket directly and
//! waits for input on one multishot poll on this ring, armed when the
//! connection starts and kept until it closes (withdrawn then). Each
//! completion marks the slot readable and wakes the driver. A watch costs
//! a submission per connection instead of a glommio source per wait, and
//! it outlives the task, so parking arms and cancels nothing. TLS
//! connections read through glommio, and so does a connection whose watch
//! the kernel refused (counted, logged).
//!
//! Parking: most of an open connection's memory is its task, so an idle
//! one gives it up (what that saves: `perf/RESULTS.md`). Once a connection
//! has been idle for `WS_PARK_IDLE_MS` (nothing read, nothing to write, no
//! message half assembled, no verification in flight, plain TCP, watched),
//! its driver parks it: the socket is duplicated (the shard slot holds the
//! duplicate), the state a driver needs to resume goes into a compact
//! [`Parked`] record, and the task ends. The shard slot stays, so the
//! fan-out keeps writing to the socket directly as before, and so does the
//! watch.
//!
//! A parked connection is resumed (a new task, the same state) when its
//! watch fires, or when anything wakes it: its deadline (auth, ping, pong),
//! a write the fan-out could not finish, the slow-consumer rule, shutdown.
//! Completions carry the slot's key and the watch's generation, so a late
//! completion of a closed connection's watch is recognised and ignored.

use std::cell::{Cell, RefCell};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use slab::Slab;

use super::client::StoredClient;
use super::driver::{Conn, Pump};
use super::ShardCtx;
use crate::limits::ParkedAdmission;
use crate::shard::Watched;
use crate::sys::{Completion, PollRing};
use crate::telemetry::LogLimiter;

/// Poll-ring submission entries (queued ones go to the kernel together
/// once per pass of the parker, or at once when the queue fills);
/// completions, eight times as many, are drained on every wake-up, and the
/// kernel keeps any overflow (a multishot watch whose completion found the
/// queue full ends; its driver reads and arms it again).
const RING_ENTRIES: u32 = 2048;

/// What a driver needs to resume a parked connection (besides its socket,
/// which its shard slot holds while it is parked).
pub(super) struct Parked {
    pub id: u64,
    /// The session and its message counters.
    pub client: StoredClient,
    pub next_ping_ms: u64,
    /// When the unanswered ping went out; `u64::MAX` when none is (an
    /// `Option` would take 8 bytes more on every parked connection).
    pub ping_sent_ms: u64,
    pub admission: ParkedAdmission,
}

/// A shard's poll ring and parking. Without a ring (the kernel refused
/// one) every connection reads through glommio and none parks; with
/// `WS_PARK_IDLE_MS=0` sockets are watched but none parks.
pub(super) struct Parker {
    after_ms: u64,
    ring: RefCell<Option<PollRing>>,
    /// The eventfd the ring signals, until the parker task takes it.
    signal: RefCell<Option<glommio::io::BufferedFile>>,
    records: RefCell<Slab<Parked>>,
    /// The last watch generation given (never 0).
    generation: Cell<u16>,
    /// False once the kernel refused a multishot poll (before Linux
    /// 5.13): connections then read through glommio and none parks.
    multishot: Cell<bool>,
    /// Requests are queued on the ring that the parker task has not
    /// submitted yet (it was woken for them).
    queued: Cell<bool>,
    /// The parker task's waker: parked slots hold it.
    waker: RefCell<Option<Waker>>,
    log: LogLimiter,
    /// Parks that did not happen ([`Parker::refused`]).
    park_log: LogLimiter,
}

impl Parker {
    /// Must run on the shard's executor. `capacity`: connections to reserve
    /// record room for (address space only).
    pub fn new(shard: usize, after_ms: u64, capacity: usize) -> Self {
        let (ring, signal) = match PollRing::new(RING_ENTRIES) {
            Ok((ring, signal)) => (Some(ring), Some(signal)),
            Err(e) => {
                tracing::warn!(shard, error = %e, "no poll ring: connections read through glommio, idle ones keep their tasks");
                (None, None)
            }
        };
        Self {
            after_ms,
            ring: RefCell::new(ring),
            signal: RefCell::new(signal),
            records: RefCell::new(if after_ms == 0 { Slab::new() } else { Slab::with_capacity(capacity) }),
            generation: Cell::new(0),
            multishot: Cell::new(true),
            queued: Cell::new(false),
            waker: RefCell::new(None),
            log: LogLimiter::new(Duration::from_secs(5)),
            park_log: LogLimiter::new(Duration::from_secs(5)),
        }
    }

    /// Idle time before parking, in ms, when parking is on.
    pub fn idle_ms(&self) -> Option<u64> {
        let on = self.after_ms > 0 && self.multishot.get() && self.ring.borrow().is_some();
        (on && self.waker.borrow().is_some()).then_some(self.after_ms)
    }

    /// Watches the socket `fd` of connection `key` on the ring; false when
    /// there is no ring, the kernel has no multishot polls, or the request
    /// could not be queued (counted, logged). The kernel may still refuse
    /// it: its completion then says so ([`Shard::take_watch_failed`]).
    ///
    /// [`Shard::take_watch_failed`]: crate::shard::Shard::take_watch_failed
    pub fn watch(&self, ctx: &ShardCtx, key: usize, fd: BorrowedFd<'_>) -> bool {
        if !self.multishot.get() {
            return false;
        }
        let mut ring = self.ring.borrow_mut();
        let Some(ring) = ring.as_mut() else { return false };
        let generation = match self.generation.get().wrapping_add(1) {
            0 => 1,
            g => g,
        };
        if let Err(e) = ring.poll_add(fd, user_data(key, generation)) {
            self.failed(ctx, &e);
            return false;
        }
        self.generation.set(generation);
        ctx.shard.borrow_mut().set_watch(key, generation);
        self.queued();
        true
    }

    /// Withdraws the watch of connection `key`, if it has one (before its
    /// slot goes: the kernel holds the socket open while it is watched).
    pub fn unwatch(&self, ctx: &ShardCtx, key: usize) {
        let generation = ctx.shard.borrow().watch(key);
        if generation == 0 {
            return;
        }
        if let Some(ring) = self.ring.borrow_mut().as_mut() {
            if let Err(e) = ring.poll_remove(user_data(key, generation)) {
                // The watch then ends when the socket next hangs up or errs;
                // until then the kernel keeps the socket.
                if let Some(suppressed) = self.log.allow() {
                    tracing::warn!(shard = ctx.id, error = %e, suppressed, "could not withdraw a socket watch");
                }
            }
        }
        self.queued();
    }

    /// Wakes the parker task to submit what was queued (once per pass).
    fn queued(&self) {
        if !self.queued.replace(true) {
            if let Some(w) = self.waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    fn failed(&self, ctx: &ShardCtx, e: &std::io::Error) {
        ctx.stats.watch_failures.inc();
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(shard = ctx.id, error = %e, suppressed, "could not watch a socket: it reads through glommio");
        }
    }

    /// Counts a park that did not happen (the connection keeps its task:
    /// nothing is lost) and says why, at most once per log interval.
    /// (Its own log limiter: at the descriptor limit every idle connection
    /// may be refused, and that must not hide the watch failures.)
    pub fn refused(&self, ctx: &ShardCtx, conn: u64, why: &dyn std::fmt::Display) {
        ctx.stats.park_failures.inc();
        if let Some(suppressed) = self.park_log.allow() {
            tracing::warn!(shard = ctx.id, conn, reason = %why, suppressed, "could not park an idle connection: it keeps its task");
        }
    }

    /// Parks the connection `key` of `ctx`'s shard on `fd`, its own
    /// duplicate of the socket, which its watch goes on watching. Gives
    /// the record back when it is not watched (the connection keeps its
    /// task, and `fd` is closed).
    pub fn park(&self, ctx: &ShardCtx, key: usize, parked: Parked, fd: OwnedFd) -> Option<Parked> {
        let waker = self.waker.borrow();
        let Some(waker) = waker.as_ref() else { return Some(parked) };
        if ctx.shard.borrow().watch(key) == 0 {
            self.refused(ctx, parked.id, &"its socket has no watch");
            return Some(parked);
        }
        // A watch armed again in this poll names the task's descriptor,
        // which closes when the task ends: it goes to the kernel first.
        if let Some(ring) = self.ring.borrow_mut().as_mut() {
            if ring.has_queued() {
                if let Err(e) = ring.submit() {
                    self.refused(ctx, parked.id, &format_args!("submitting its watch failed: {e}"));
                    return Some(parked);
                }
            }
        }
        let index = self.records.borrow_mut().insert(parked) as u32;
        ctx.shard.borrow_mut().park(key, fd, index, waker);
        ctx.stats.parks.inc();
        ctx.stats.connections_parked.inc();
        None
    }

    /// Gives a parked connection its task back.
    fn resume(&self, ctx: &Rc<ShardCtx>, key: usize) {
        let Some((index, fd)) = ctx.shard.borrow_mut().unpark(key) else {
            return; // resumed already
        };
        let parked = self.records.borrow_mut().remove(index as usize);
        ctx.stats.unparks.inc();
        ctx.stats.connections_parked.sub(1);
        let conn = Conn::resume(ctx.clone(), key, parked, fd);
        glommio::spawn_local(Pump::new(conn)).detach();
    }

    /// Handles one completion: wakes the watched connection's driver, or
    /// resumes it when parked.
    fn complete(&self, ctx: &Rc<ShardCtx>, c: Completion) {
        if c.user_data == PollRing::REMOVED {
            return;
        }
        let (key, generation) = ((c.user_data as u32) as usize, (c.user_data >> 32) as u16);
        // An error ends the watch for good: the driver reads through
        // glommio from then on. A cancellation (not ours: ours come after
        // the slot is gone) or a full completion queue ends it too, and
        // the driver arms another.
        let failed = c.result < 0 && c.result != -libc::ECANCELED;
        let watched = ctx.shard.borrow_mut().on_watch(key, generation, c.more, failed);
        if failed && watched != Watched::Stale {
            if c.result == -libc::EINVAL && self.multishot.replace(false) {
                tracing::warn!(shard = ctx.id, "the kernel has no multishot polls (Linux 5.13+): connections read through glommio and idle ones are not parked");
            }
            self.failed(ctx, &std::io::Error::from_raw_os_error(-c.result));
        }
        if watched == Watched::Parked {
            self.resume(ctx, key);
        }
    }
}

fn user_data(key: usize, generation: u16) -> u64 {
    (generation as u64) << 32 | key as u32 as u64
}

/// Completions the parker handles at most per pass before it lets other
/// tasks run if they wait (each may resume a parked connection).
const COMPLETION_BUDGET: usize = 256;
/// Parked connections woken by something else than their watch that the
/// parker resumes at most per pass.
const RESUME_BUDGET: usize = 64;

/// The shard's parker task: submits the ring's requests, and wakes or
/// resumes the connections whose socket became ready or that something
/// woke.
pub(crate) async fn run(ctx: Rc<ShardCtx>) {
    let parker = &ctx.parker;
    let Some(signal) = parker.signal.borrow_mut().take() else {
        return; // no ring
    };
    let mut completions = Vec::new();
    let mut woken = Vec::new();
    let mut signal_read = None;
    loop {
        parker.queued.set(false);
        let mut stuck = false;
        if let Some(ring) = parker.ring.borrow_mut().as_mut() {
            if ring.has_queued() {
                if let Err(e) = ring.submit() {
                    if let Some(suppressed) = parker.log.allow() {
                        tracing::warn!(shard = ctx.id, error = %e, suppressed, "poll ring: submitting failed");
                    }
                }
                // What the kernel did not take (out of memory, its
                // completions overflowing) is tried again shortly.
                stuck = ring.has_queued();
            }
            ring.drain(&mut completions);
        }
        // A budget per pass: thousands of parked clients that hang up
        // together must not hold the core (and the fan-out) in one poll.
        let n = completions.len().min(COMPLETION_BUDGET);
        for c in completions.drain(..n) {
            parker.complete(&ctx, c);
        }
        ctx.shard.borrow_mut().take_unparks(&mut woken);
        let n = woken.len().min(RESUME_BUDGET);
        for key in woken.drain(..n) {
            parker.resume(&ctx, key);
        }
        if stuck {
            parker.queued.set(true);
            glommio::timer::sleep(Duration::from_millis(1)).await;
            continue;
        }
        if !completions.is_empty() || !woken.is_empty() || parker.queued.get() {
            glommio::yield_if_needed().await;
            continue;
        }
        // The eventfd's read stays in flight until it completes: dropped
        // when something else woke the parker, it would be cancelled, and
        // a signal it consumed on the way would be lost (the completions
        // it announced then waited for the next one).
        let read = signal_read.get_or_insert_with(|| Box::pin(signal.read_at(0, 8)));
        let signalled = std::future::poll_fn(|cx| {
            let mut waker = parker.waker.borrow_mut();
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            if let Poll::Ready(r) = std::future::Future::poll(read.as_mut(), cx) {
                return Poll::Ready(Some(r));
            }
            if ctx.shard.borrow().has_unparks() || parker.queued.get() {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await;
        if let Some(r) = signalled {
            signal_read = None;
            if let Err(e) = r {
                // Not expected; back off rather than spin on it.
                if let Some(suppressed) = parker.log.allow() {
                    tracing::warn!(shard = ctx.id, error = %e, suppressed, "parker: reading the poll ring's eventfd failed");
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod size {
    /// A parked connection's record is most of what it costs in memory
    /// (perf/RESULTS.md): a field that makes it grow should be a decision.
    #[test]
    fn a_parked_record_stays_at_80_bytes() {
        assert_eq!(std::mem::size_of::<super::Parked>(), 80);
    }
}
