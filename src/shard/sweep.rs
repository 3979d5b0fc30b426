//! The sweep: writing what the fan-out queued, straight to the sockets.
//!
//! A sweep visits every connection with something queued (those the
//! fan-out marked dirty, and every `prices` subscriber when the log holds
//! frames), in steps of [`FLUSH_CHUNK`] sockets. Each visit is one
//! non-blocking `sendmsg` of the connection's queue and its unsent part of
//! the price log, from the shared bytes; a step's sends go to the kernel in
//! one batch (`sys::SendBatch`). A connection that cannot be written
//! directly (its driver is mid-write, it is TLS or closing) or whose socket
//! does not take everything is handed to its driver, which is woken.
//!
//! Updates that arrive between steps are fanned out before the next one,
//! so a connection the sweep has not reached yet sends them in this sweep
//! (its log cursor is behind them, or it is still marked dirty) and one it
//! has passed gets them in the next: a frame waits about one sweep at most.
//! When a sweep ends every subscriber is past the log's head as it was when
//! the sweep began, and the log forgets those bytes.

use super::outbox::{Direct, Slow};
use super::slot::Marks;
use super::Shard;
use crate::sys::SendBatch;

/// Sockets a sweep step writes before the inbox is looked at again.
pub(super) const FLUSH_CHUNK: usize = 64;

pub(super) struct Sweep {
    /// Connections the fan-out queued bytes for that no sweep has reached.
    pub dirty: Vec<usize>,
    /// The sweep in progress (`list[pos..]` still to visit).
    list: Vec<usize>,
    pos: usize,
    /// The log's head when the sweep began: once it ends, every subscriber
    /// is past it.
    head: u64,
    /// The current step's connections written directly.
    direct: Vec<usize>,
    /// Connections that went slow in the current step.
    slow: Vec<usize>,
    /// Writes a step's sockets in one batch (io_uring unless
    /// `WS_FANOUT_IO=syscalls`).
    writer: SendBatch,
}

impl Sweep {
    pub fn new() -> Self {
        Self {
            dirty: Vec::new(),
            list: Vec::new(),
            pos: 0,
            head: 0,
            direct: Vec::with_capacity(FLUSH_CHUNK),
            slow: Vec::new(),
            writer: SendBatch::new(true),
        }
    }
}

impl Shard {
    /// Chooses how sweeps write to sockets: batches of io_uring
    /// submissions (`true`, the default) or one system call per socket.
    /// Returns whether io_uring is in use (false when the kernel refused it).
    pub fn use_io_uring(&mut self, on: bool) -> bool {
        self.sweep.writer = SendBatch::new(on);
        self.sweep.writer.uses_ring()
    }

    /// Whether a sweep is under way.
    pub fn sweeping(&self) -> bool {
        self.sweep.pos < self.sweep.list.len()
    }

    /// Whether frames are queued that no sweep has reached yet.
    pub fn has_dirty(&self) -> bool {
        !self.sweep.dirty.is_empty() || !self.log.is_empty()
    }

    /// Starts a sweep over every connection with queued frames: those with
    /// private frames or replies, and every price subscriber when the log
    /// holds frames.
    pub fn begin_sweep(&mut self) {
        debug_assert!(!self.sweeping());
        let sw = &mut self.sweep;
        sw.list.clear();
        sw.pos = 0;
        std::mem::swap(&mut sw.list, &mut sw.dirty);
        if !self.log.is_empty() {
            sw.list.extend_from_slice(self.registry.prices());
        }
        sw.head = self.log.head();
    }

    /// Writes the next `max` connections of the sweep (see the module doc).
    /// Returns true when the sweep is done.
    pub fn flush_step(&mut self, max: usize) -> bool {
        let Shard { conns, log, bufs, unpark, sweep, stamps, stats, .. } = self;
        let Sweep { list, pos, head, direct, slow, writer, .. } = sweep;
        let end = (*pos + max).min(list.len());
        // First the connections whose driver must write (woken now), then
        // one batch of direct writes for all the others.
        direct.clear();
        for &key in &list[*pos..end] {
            let Some(slot) = conns.get_mut(key) else { continue };
            slot.marks.set(Marks::DIRTY, false);
            if slot.marks.get(Marks::BATCHED) || !slot.out.has_unsent(log) {
                continue;
            }
            if slot.out.writable_directly() && slot.sock.is_some() {
                slot.marks.set(Marks::BATCHED, true);
                direct.push(key);
                continue;
            }
            // Handed to its task, which writes it within its next poll.
            stamps.log_written = stamps.log_written.max(log.head());
            if slot.marks.take(Marks::STAMPED) {
                stamps.written.push(key as u32);
            }
            if slot.out.materialize(log, bufs).is_err() {
                slow.push(key);
            }
            slot.wake(key, unpark);
        }
        let sent = writer.send_all(direct.iter().map(|&key| {
            let slot = &conns[key];
            let sock = slot.sock.as_ref().expect("listed for a direct write only with a socket");
            let (queued, log_part) = slot.out.unsent(log);
            (sock.as_fd(), queued, log_part)
        }));
        for (&key, &taken) in direct.iter().zip(sent) {
            let slot = &mut conns[key];
            slot.marks.set(Marks::BATCHED, false);
            // What the write took of the log is on the wire; the rest, and
            // all of it when the socket took nothing, is handed to the
            // driver below.
            stamps.log_written = stamps.log_written.max(slot.out.log_reached(taken, log));
            if slot.marks.take(Marks::STAMPED) {
                stamps.written.push(key as u32);
            }
            match slot.out.direct_written(taken, log, bufs) {
                Ok(Direct::Done) => stats.direct_writes.inc(),
                Ok(Direct::ToDriver) => slot.wake(key, unpark),
                Err(Slow) => {
                    slot.wake(key, unpark);
                    slow.push(key);
                }
            }
        }
        *pos = end;
        let done = *pos >= list.len();
        if done {
            // Every subscriber is past the sweep's head now: written, or
            // handed to its task (an unsubscribe copies what it had not
            // been sent).
            stamps.log_written = stamps.log_written.max(*head);
        }
        stamps.record_written(self.clock.epoch_ms(), stats);
        stats.conflated.set(bufs.conflated);
        for key in std::mem::take(&mut self.sweep.slow) {
            self.stop_updates(key);
        }
        if done {
            let head = self.sweep.head;
            self.log.trim_to(head);
        }
        done
    }
}
