//! What the shard holds for each connection, and waking its driver.

use std::sync::Arc;
use std::task::Waker;

use super::outbox::Outbox;
use crate::sys::DirectSocket;

/// Ends a list of slot keys (the user list, the `prices` list position).
pub(super) const NOT_LISTED: u32 = u32::MAX;

/// A connection as the shard sees it: its output, its routes, its socket
/// for direct writes, its driver's waker and next deadline.
#[derive(Debug)]
pub struct Slot {
    pub(super) out: Outbox,
    waker: Option<Waker>,
    /// The authenticated user (private routing).
    pub(super) user: Option<Arc<str>>,
    /// The next of this user's connections on the shard ([`NOT_LISTED`]
    /// ends the list; its head is in the user index).
    pub(super) next_user: u32,
    /// Subscribed channels, one bit each.
    pub(super) subs: u8,
    /// Place in the `prices` list, or [`NOT_LISTED`].
    pub(super) prices_pos: u32,
    /// Monotonic ms at which the tick must wake the driver.
    pub(super) deadline_ms: u64,
    /// The socket for direct writes (holding it keeps the descriptor open);
    /// None when its bytes go through its driver (TLS), and while a parked
    /// connection is being resumed.
    pub(super) sock: Option<DirectSocket>,
    /// Parked (no task; see `conn::park`): its record's index + 1, else 0.
    /// Its waker is then the parker's, and waking it asks for an unpark.
    pub(super) parked: u32,
    /// The generation of the socket's watch on the shard's poll ring
    /// (`conn::park`), 0 when none is armed; a completion of an earlier
    /// watch (of a connection that had this key before) carries another.
    pub(super) watch: u16,
    pub(super) marks: Marks,
}

impl Slot {
    pub(super) fn new(out: Outbox, sock: Option<DirectSocket>) -> Self {
        Self {
            out,
            waker: None,
            user: None,
            next_user: NOT_LISTED,
            subs: 0,
            prices_pos: NOT_LISTED,
            deadline_ms: u64::MAX,
            sock,
            parked: 0,
            watch: 0,
            marks: Marks::default(),
        }
    }

    /// Records the waker to wake (a parked connection's parker) and clears
    /// the "already woken" mark.
    pub(super) fn set_waker(&mut self, waker: &Waker) {
        self.marks.set(Marks::WAKE_PENDING, false);
        self.store_waker(waker);
    }

    /// Records the driver's waker as its poll begins. Until the poll ends
    /// ([`Slot::poll_ended`]) what is queued for the connection wakes
    /// nothing: the driver writes it before it returns, and a wake-up would
    /// only poll it once more for nothing (each reply it queues did).
    pub(super) fn poll_began(&mut self, waker: &Waker) {
        self.marks.set(Marks::WAKE_PENDING, true);
        self.store_waker(waker);
    }

    /// The driver's poll returned pending: the next queued byte wakes it.
    pub(super) fn poll_ended(&mut self) {
        self.marks.set(Marks::WAKE_PENDING, false);
    }

    fn store_waker(&mut self, waker: &Waker) {
        match &self.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => self.waker = Some(waker.clone()),
        }
    }

    pub(super) fn clear_waker(&mut self) {
        self.waker = None;
        self.marks.set(Marks::WAKE_PENDING, false);
    }

    /// Wakes the connection's driver once until it runs again; a parked
    /// connection is listed in `unpark` for its parker to resume instead.
    pub(super) fn wake(&mut self, key: usize, unpark: &mut Vec<usize>) {
        if !self.marks.get(Marks::WAKE_PENDING) {
            if let Some(w) = &self.waker {
                self.marks.set(Marks::WAKE_PENDING, true);
                if self.parked != 0 {
                    unpark.push(key);
                }
                w.wake_by_ref();
            }
        }
    }

    /// Lists the connection for the next sweep (once).
    pub(super) fn mark_dirty(&mut self, key: usize, dirty: &mut Vec<usize>) {
        if !self.marks.get(Marks::DIRTY) {
            self.marks.set(Marks::DIRTY, true);
            dirty.push(key);
        }
    }
}

/// A slot's small marks, one bit each (a byte instead of four bools keeps
/// the slot, reserved for every possible connection, 8 bytes smaller).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Marks(u8);

impl Marks {
    /// The driver was woken and has not run since, or is running now.
    pub const WAKE_PENDING: u8 = 1;
    /// Listed in the shard's dirty list (bytes queued since the last sweep).
    pub const DIRTY: u8 = 2;
    /// In the sweep step's batch of direct writes (a sweep can list a
    /// connection twice: dirty, and a price subscriber).
    pub const BATCHED: u8 = 4;
    /// The first recipient of a private update whose latency sample waits
    /// for this connection's next write (see `stamps.rs`).
    pub const STAMPED: u8 = 8;
    /// Reached by the update being fanned out (it matched two of the
    /// connection's channels; cleared before the next update).
    pub const REACHED: u8 = 16;
    /// A private channel of the connection is being resumed: its live
    /// updates are held aside (see `held.rs`).
    pub const HOLDING: u8 = 32;
    /// The socket's watch fired since the driver last read it.
    pub const READABLE: u8 = 64;
    /// The kernel ended the socket's watch with an error: its driver reads
    /// through glommio instead of arming another.
    pub const WATCH_FAILED: u8 = 128;

    pub fn get(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    pub fn set(&mut self, bit: u8, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }

    /// Clears `bit`; returns whether it was set.
    pub fn take(&mut self, bit: u8) -> bool {
        let was = self.get(bit);
        self.set(bit, false);
        was
    }
}
