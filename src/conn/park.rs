//! Parking: idle connections held without a task.
//!
//! Owns: the shard's poll ring ([`crate::sys::PollRing`]), the records of
//! parked connections, and the parker task that gives a connection its
//! task back.
//!
//! Most of an open connection's memory is its task and glommio's armed
//! read, so an idle one gives both up (what that saves:
//! `perf/RESULTS.md`). Once a connection has been idle for
//! `WS_PARK_IDLE_MS` (nothing read, nothing to write, no message half
//! assembled, no verification in flight, plain TCP), its driver parks it:
//! the socket is duplicated (the shard slot holds the duplicate), watched
//! by a one-shot poll on the shard's poll ring, the state a driver needs to
//! resume goes into a
//! compact [`Parked`] record, and the task ends. The shard slot stays, so
//! the fan-out keeps writing to the socket directly as before.
//!
//! A parked connection is resumed (a new task, the same state) when its
//! socket becomes readable or hangs up, or when anything wakes it: its
//! deadline (auth, ping, pong), a write the fan-out could not finish, the
//! slow-consumer rule, shutdown. A resume for any reason but the poll
//! cancels the poll, so the kernel never keeps a closed socket alive.
//! Completions carry the record's index and a generation, so a late
//! completion of an earlier parking is recognised and ignored.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use slab::Slab;

use super::client::StoredClient;
use super::driver::{Conn, Pump};
use super::ShardCtx;
use crate::limits::ParkedAdmission;
use crate::sys::PollRing;
use crate::telemetry::LogLimiter;

/// Poll-ring entries (submissions go one at a time; completions, twice as
/// many, are drained on every wake-up, and the kernel keeps any overflow).
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

struct Record {
    key: u32,
    generation: u32,
    parked: Parked,
}

/// A shard's parking: disabled (`WS_PARK_IDLE_MS=0`, or the kernel refused
/// a ring) when `ring` is None.
pub(super) struct Parker {
    after_ms: u64,
    ring: RefCell<Option<PollRing>>,
    /// The eventfd the ring signals, until the parker task takes it.
    signal: RefCell<Option<glommio::io::BufferedFile>>,
    records: RefCell<Slab<Record>>,
    generation: Cell<u32>,
    /// The parker task's waker: parked slots hold it.
    waker: RefCell<Option<Waker>>,
    log: LogLimiter,
}

impl Parker {
    /// Must run on the shard's executor. `capacity`: connections to reserve
    /// record room for (address space only).
    pub fn new(shard: usize, after_ms: u64, capacity: usize) -> Self {
        let (ring, signal) = if after_ms == 0 {
            (None, None)
        } else {
            match PollRing::new(RING_ENTRIES) {
                Ok((ring, signal)) => (Some(ring), Some(signal)),
                Err(e) => {
                    tracing::warn!(shard, error = %e, "no poll ring: idle connections keep their tasks");
                    (None, None)
                }
            }
        };
        Self {
            after_ms,
            ring: RefCell::new(ring),
            signal: RefCell::new(signal),
            records: RefCell::new(if after_ms == 0 { Slab::new() } else { Slab::with_capacity(capacity) }),
            generation: Cell::new(0),
            waker: RefCell::new(None),
            log: LogLimiter::new(Duration::from_secs(5)),
        }
    }

    /// Idle time before parking, in ms, when parking is on.
    pub fn idle_ms(&self) -> Option<u64> {
        (self.ring.borrow().is_some() && self.waker.borrow().is_some()).then_some(self.after_ms)
    }

    /// Parks the connection `key` of `ctx`'s shard on `fd`, its own
    /// duplicate of the socket. Gives the record back if the kernel refused
    /// the poll (the connection keeps its task, and `fd` is closed).
    pub fn park(&self, ctx: &ShardCtx, key: usize, parked: Parked, fd: OwnedFd) -> Option<Parked> {
        let waker = self.waker.borrow();
        let mut ring = self.ring.borrow_mut();
        let (Some(waker), Some(ring)) = (waker.as_ref(), ring.as_mut()) else {
            return Some(parked);
        };
        let mut records = self.records.borrow_mut();
        let entry = records.vacant_entry();
        let index = entry.key() as u32;
        let generation = self.generation.get().wrapping_add(1);
        if let Err(e) = ring.poll_add(fd.as_fd(), user_data(index, generation)) {
            ctx.stats.park_failures.inc();
            if let Some(suppressed) = self.log.allow() {
                tracing::warn!(shard = ctx.id, error = %e, suppressed, "could not park an idle connection");
            }
            return Some(parked);
        }
        self.generation.set(generation);
        ctx.shard.borrow_mut().park(key, fd, index, waker);
        entry.insert(Record { key: key as u32, generation, parked });
        ctx.stats.parks.inc();
        ctx.stats.connections_parked.inc();
        None
    }

    /// Gives a parked connection its task back; `cancel` withdraws its poll
    /// (when it is resumed for another reason than the poll firing).
    fn resume(&self, ctx: &Rc<ShardCtx>, key: usize, cancel: bool) {
        let Some((index, fd)) = ctx.shard.borrow_mut().unpark(key) else {
            return; // resumed already
        };
        let record = self.records.borrow_mut().remove(index as usize);
        if cancel {
            if let Some(ring) = self.ring.borrow_mut().as_mut() {
                if let Err(e) = ring.poll_remove(user_data(index, record.generation)) {
                    // The poll then ends when the socket is next readable or
                    // hung up; until then the kernel keeps the socket.
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(shard = ctx.id, error = %e, suppressed, "could not cancel a parked poll");
                    }
                }
            }
        }
        ctx.stats.unparks.inc();
        ctx.stats.connections_parked.sub(1);
        let conn = Conn::resume(ctx.clone(), key, record.parked, fd);
        glommio::spawn_local(Pump::new(conn)).detach();
    }
}

fn user_data(index: u32, generation: u32) -> u64 {
    (generation as u64) << 32 | index as u64
}

/// Parked connections the parker resumes at most per pass (of each kind)
/// before it lets other tasks run if they wait.
const RESUME_BUDGET: usize = 64;

/// The shard's parker task: resumes parked connections whose socket became
/// ready or that something woke.
pub(crate) async fn run(ctx: Rc<ShardCtx>) {
    let parker = &ctx.parker;
    let Some(signal) = parker.signal.borrow_mut().take() else {
        return; // parking is off
    };
    let mut completions = Vec::new();
    let mut woken = Vec::new();
    loop {
        if let Some(ring) = parker.ring.borrow_mut().as_mut() {
            ring.drain(&mut completions);
        }
        // A budget per pass: thousands of parked clients that hang up
        // together must not hold the core (and the fan-out) in one poll.
        let n = completions.len().min(RESUME_BUDGET);
        for (data, _) in completions.drain(..n) {
            if data == PollRing::REMOVED {
                continue;
            }
            let (index, generation) = (data as u32 as usize, (data >> 32) as u32);
            let key = match parker.records.borrow().get(index) {
                Some(r) if r.generation == generation => r.key as usize,
                _ => continue, // an earlier parking's late completion
            };
            parker.resume(&ctx, key, false);
        }
        ctx.shard.borrow_mut().take_unparks(&mut woken);
        let n = woken.len().min(RESUME_BUDGET);
        for key in woken.drain(..n) {
            parker.resume(&ctx, key, true);
        }
        if !completions.is_empty() || !woken.is_empty() {
            glommio::yield_if_needed().await;
            continue;
        }
        let ready = async {
            if let Err(e) = signal.read_at(0, 8).await {
                // Not expected; back off rather than spin on it.
                if let Some(suppressed) = parker.log.allow() {
                    tracing::warn!(shard = ctx.id, error = %e, suppressed, "parker: reading the poll ring's eventfd failed");
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        };
        let woken_up = std::future::poll_fn(|cx| {
            let mut waker = parker.waker.borrow_mut();
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            if ctx.shard.borrow().has_unparks() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        futures_lite::future::or(woken_up, ready).await;
    }
}

#[cfg(test)]
mod size {
    /// A parked connection's record is most of what it costs in memory
    /// (perf/RESULTS.md): a field that makes it grow should be a decision.
    #[test]
    fn a_parked_record_stays_at_88_bytes() {
        assert_eq!(std::mem::size_of::<super::Record>(), 88);
    }
}
