//! A connection's unsent output, as the shard's fan-out and the
//! connection's driver share it.
//!
//! Owns: [`Outbox`] (what the shard holds for a connection: whole frames
//! queued, how far into the shard's price log it has been served, how much
//! its driver still holds, and whether it still takes updates),
//! [`InFlight`] (the buffer the driver is writing), and [`Buffers`] (the
//! shard's spare buffers and the per-connection limit).
//!
//! The contract, which the property test in `shard/mod.rs` checks over
//! random interleavings:
//! - **Whole frames.** The bytes on the wire, then the driver's unwritten
//!   rest, then the queue after what a direct write already sent, then the
//!   connection's unsent part of the price log, are whole frames in order.
//!   No frame is ever cut, sent twice, or dropped in part.
//! - **Bounded.** Queued plus in the driver's hands never passes the limit
//!   (`WS_MAX_BUFFERED_BYTES`), except by the one frame a write stopped
//!   inside. Going over conflates the queued price updates first (the
//!   newest per market stays, in the order of those newest; nothing else
//!   is touched); if that is not enough, the backlog after that frame
//!   goes, and the outbox then owes its connection close 4009
//!   ([`Lifecycle::Slow`]).
//! - **One writer at a time.** The fan-out writes a connection directly
//!   only when its driver holds nothing and no direct write stopped part-way
//!   ([`Outbox::writable_directly`]); otherwise the driver writes, and the
//!   fan-out only appends.
//! - **Ends once.** Once it stops taking updates (slow, or its close frame
//!   queued) an outbox never takes one again; a close frame is the last
//!   thing queued.

use std::collections::HashMap;

use crate::protocol::channel::{market_of_envelope, Market};
use crate::protocol::frame::{server_frame_len, server_header_len};
use crate::protocol::CloseCode;

use super::price_log::PriceLog;

/// Capacity reserved when an empty outbox first receives bytes.
const OUTBOX_INITIAL: usize = 1024;
/// Spare buffers kept for reuse per shard, and the largest kept.
const SPARE_BUFFERS: usize = 1024;
const SPARE_MAX_CAPACITY: usize = 64 * 1024;
/// `cursor` of an outbox that does not follow the price log.
const NOT_FOLLOWING: u64 = u64::MAX;

/// Where a connection's output stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Takes updates.
    #[default]
    Open,
    /// Takes updates; its driver owes it close 1001 (shutdown).
    ShuttingDown,
    /// Its backlog was dropped: no more updates; its driver owes it close
    /// 4009 (slow consumer).
    Slow,
    /// Its close frame is queued, or it is going away: no more updates.
    Closing,
}

/// Queueing would have passed the limit: the backlog was dropped and the
/// outbox is now [`Lifecycle::Slow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slow;

/// What became of a direct write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// The socket took everything.
    Done,
    /// The socket took part or nothing: the driver finishes (wake it).
    ToDriver,
}

/// A connection's unsent output (see the module's contract).
#[derive(Debug)]
pub struct Outbox {
    /// Whole frames not yet handed to the socket.
    queued: Buf,
    /// How far into the price log this connection has been served (sent,
    /// or copied into `queued`); [`NOT_FOLLOWING`] when not subscribed.
    cursor: u64,
    /// Bytes at the front of `queued` a direct write already sent.
    sent: u32,
    /// Bytes the driver holds and has not written. (32 bits:
    /// `WS_MAX_BUFFERED_BYTES` is at most 1 GiB.)
    in_driver: u32,
    lifecycle: Lifecycle,
}

impl Outbox {
    /// A new connection's outbox; its driver holds `in_driver` bytes
    /// already (the 101 response), so direct writes wait for them.
    pub fn new(in_driver: usize) -> Self {
        Self {
            queued: Buf(None),
            cursor: NOT_FOLLOWING,
            sent: 0,
            in_driver: in_driver as u32,
            lifecycle: Lifecycle::Open,
        }
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Whether updates may still be queued.
    pub fn takes_updates(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Open | Lifecycle::ShuttingDown)
    }

    /// The close its driver owes the connection, if any.
    pub fn owed_close(&self) -> Option<CloseCode> {
        match self.lifecycle {
            Lifecycle::ShuttingDown => Some(CloseCode::GOING_AWAY),
            Lifecycle::Slow => Some(CloseCode::SLOW_CONSUMER),
            Lifecycle::Open | Lifecycle::Closing => None,
        }
    }

    /// Shutdown: the driver is to close with 1001 (an outbox that already
    /// ends keeps its own ending).
    pub fn shut_down(&mut self) {
        if self.lifecycle == Lifecycle::Open {
            self.lifecycle = Lifecycle::ShuttingDown;
        }
    }

    /// No more updates (the connection is closing or going away).
    pub fn stop_updates(&mut self) {
        if self.takes_updates() {
            self.lifecycle = Lifecycle::Closing;
        }
    }

    /// Nothing queued, in the driver's hands or owed: only the fan-out's
    /// direct writes (and the socket) can need this connection now.
    pub fn is_quiet(&self) -> bool {
        self.queued.is_empty() && self.in_driver == 0 && self.sent == 0 && self.lifecycle == Lifecycle::Open
    }

    /// Nothing queued or in the driver's hands (a closing driver is done
    /// once its close frame is out).
    pub fn is_flushed(&self) -> bool {
        self.queued.is_empty() && self.in_driver == 0
    }

    /// Starts following the price log from its head (a `prices` subscribe).
    pub fn follow_log(&mut self, log: &PriceLog) {
        self.cursor = log.head();
    }

    /// Stops following the price log: what it had not been served yet is
    /// copied into the queue first (past the limit: [`Slow`]).
    pub fn unfollow_log(&mut self, log: &PriceLog, bufs: &mut Buffers) -> Result<(), Slow> {
        let result = self.materialize(log, bufs);
        self.cursor = NOT_FOLLOWING;
        result
    }

    /// Price-log bytes not served yet.
    pub fn lag(&self, log: &PriceLog) -> usize {
        if self.cursor == NOT_FOLLOWING {
            0
        } else {
            (log.head() - self.cursor) as usize
        }
    }

    /// Appends whole frames (an update, a reply, a control frame),
    /// counting what the log still owes it. Past the limit the price
    /// updates are conflated first (the log's part brought in, so order
    /// holds); [`Slow`] only when what remains still passes it.
    pub fn push(&mut self, frames: &[u8], log: &PriceLog, bufs: &mut Buffers) -> Result<(), Slow> {
        if self.fits(frames.len() + self.lag(log), bufs) {
            self.queued.extend(frames, bufs);
            return Ok(());
        }
        if self.lag(log) > 0 {
            self.queued.extend(log.since(self.cursor), bufs);
            self.cursor = log.head();
        }
        self.queued.extend(frames, bufs);
        self.relieve(bufs)
    }

    /// Whether `more` bytes fit under the limit beside what is queued and
    /// in the driver's hands.
    fn fits(&self, more: usize, bufs: &Buffers) -> bool {
        self.queued.len() + self.in_driver as usize + more <= bufs.limit
    }

    /// Over the limit: conflate, and go slow if that was not enough.
    fn relieve(&mut self, bufs: &mut Buffers) -> Result<(), Slow> {
        if self.fits(0, bufs) {
            return Ok(());
        }
        bufs.conflated += self.conflate(bufs) as u64;
        if self.fits(0, bufs) {
            return Ok(());
        }
        self.go_slow();
        Err(Slow)
    }

    /// Reduces the queued price updates to the newest per market, in the
    /// order of those newest (PROTOCOL.md §11); every other frame (replies,
    /// private updates, prices without a market) stays where it was, and
    /// so does the frame a direct write stopped inside. Returns how many
    /// frames went.
    fn conflate(&mut self, bufs: &mut Buffers) -> usize {
        let buf = self.queued.as_slice();
        let protect = whole_frames_covering(buf, self.sent as usize);
        let mut frames = Vec::new();
        let mut pos = protect;
        while pos < buf.len() {
            let Some(len) = server_frame_len(&buf[pos..]).filter(|&n| pos + n <= buf.len()) else {
                return 0; // not whole frames (cannot happen): leave it
            };
            let frame = &buf[pos..pos + len];
            frames.push((pos, len, market_of_envelope(&frame[server_header_len(frame)..])));
            pos += len;
        }
        let mut newest: HashMap<&Market, usize> = HashMap::new();
        for (i, (_, _, market)) in frames.iter().enumerate() {
            if let Some(m) = market {
                newest.insert(m, i);
            }
        }
        let keep = |i: usize, market: &Option<Market>| market.as_ref().is_none_or(|m| newest[m] == i);
        let dropped = frames.iter().enumerate().filter(|(i, (_, _, m))| !keep(*i, m)).count();
        if dropped == 0 {
            return 0;
        }
        let mut out = Buf(Some(bufs.take()));
        out.extend(&buf[..protect], bufs);
        for (i, (start, len, market)) in frames.iter().enumerate() {
            if keep(i, market) {
                out.extend(&buf[*start..start + len], bufs);
            }
        }
        bufs.recycle(std::mem::replace(&mut self.queued, out));
        dropped
    }

    /// Queues the close frame: the last bytes this outbox takes.
    pub fn queue_close(&mut self, frame: &[u8], bufs: &mut Buffers) {
        self.queued.extend(frame, bufs);
        self.lifecycle = Lifecycle::Closing;
    }

    /// Whether the fan-out may write this connection itself now: its
    /// driver holds nothing, no direct write stopped part-way, and it is
    /// not closing (a closing connection's driver writes, to see its close
    /// frame out).
    pub fn writable_directly(&self) -> bool {
        self.in_driver == 0 && self.sent == 0 && self.takes_updates()
    }

    /// Whether anything is queued or owed from the log.
    pub fn has_unsent(&self, log: &PriceLog) -> bool {
        self.queued.len() > self.sent as usize || self.lag(log) > 0
    }

    /// How far into the price log a direct write that took `taken` bytes
    /// reached; a write that took nothing (or failed: negative) counts as
    /// reaching the head, all of it being handed to the driver right after.
    pub fn log_reached(&self, taken: isize, log: &PriceLog) -> u64 {
        if taken > 0 && self.cursor != NOT_FOLLOWING {
            self.cursor + (taken as usize).saturating_sub(self.queued.len()) as u64
        } else {
            log.head()
        }
    }

    /// What a direct write sends: the queue, then the unsent log bytes.
    pub fn unsent<'a>(&'a self, log: &'a PriceLog) -> (&'a [u8], &'a [u8]) {
        let log_part = if self.lag(log) == 0 { &[][..] } else { log.since(self.cursor) };
        (&self.queued.as_slice()[self.sent as usize..], log_part)
    }

    /// Records a direct write's result (`taken` bytes, or a negative errno)
    /// of what [`Outbox::unsent`] offered. The log offset the socket has
    /// now reached is returned with it (for latency samples).
    pub fn direct_written(&mut self, taken: isize, log: &PriceLog, bufs: &mut Buffers) -> Result<Direct, Slow> {
        let total = self.queued.len() + self.lag(log);
        if taken >= 0 && taken as usize == total {
            if self.cursor != NOT_FOLLOWING {
                self.cursor = log.head();
            }
            bufs.recycle(self.queued.take());
            return Ok(Direct::Done);
        }
        if taken > 0 {
            // Short: a prefix is on the wire. The queue becomes everything
            // this write offered, whatever its size (the frame it stopped
            // in must be completed), then the limit applies.
            self.sent = taken as u32;
            let offered = if self.lag(log) == 0 { &[][..] } else { log.since(self.cursor) };
            if !offered.is_empty() {
                self.queued.extend(offered, bufs);
                self.cursor = log.head();
            }
            return self.relieve(bufs).map(|()| Direct::ToDriver);
        }
        // Full (EAGAIN) or broken: the driver finds out and finishes.
        self.materialize(log, bufs).map(|()| Direct::ToDriver)
    }

    /// Copies the unsent part of the price log into the queue (for the
    /// driver to write).
    pub fn materialize(&mut self, log: &PriceLog, bufs: &mut Buffers) -> Result<(), Slow> {
        if self.lag(log) == 0 {
            return Ok(());
        }
        self.queued.extend(log.since(self.cursor), bufs);
        self.cursor = log.head();
        self.relieve(bufs)
    }

    /// The driver has written all it held: hands it everything queued
    /// (the log's part included) in `into`, to write from where a direct
    /// write stopped. False when there is nothing left to write. (Past the
    /// limit the outbox goes [`Lifecycle::Slow`] and hands over only the
    /// frame a write stopped inside, if any.)
    pub fn take_for_driver(&mut self, log: &PriceLog, bufs: &mut Buffers, into: &mut InFlight) -> bool {
        let _ = self.materialize(log, bufs);
        if self.queued.is_empty() {
            self.in_driver = 0;
            bufs.recycle(into.buf.take());
            into.sent = 0;
            into.frames_from = 0;
            return false;
        }
        let next = self.queued.take();
        // A direct write may have sent a prefix already.
        into.sent = std::mem::take(&mut self.sent) as usize;
        into.frames_from = 0;
        self.in_driver = (next.len() - into.sent) as u32;
        bufs.recycle(std::mem::replace(&mut into.buf, next));
        true
    }

    /// The driver still holds `unwritten` bytes (its socket is full).
    pub fn driver_holds(&mut self, unwritten: usize) {
        self.in_driver = unwritten as u32;
    }

    /// A slow consumer for what it was owed beside the outbox (a resume's
    /// held updates passed the limit): as if a push had failed.
    pub fn overflowed(&mut self) {
        if self.takes_updates() {
            self.go_slow();
        }
    }

    /// Over the limit: the backlog goes, except the frame a direct write
    /// stopped inside (its driver completes it: no frame is cut), and the
    /// log stops owing it anything.
    fn go_slow(&mut self) {
        self.lifecycle = Lifecycle::Slow;
        if self.cursor != NOT_FOLLOWING {
            self.cursor = NOT_FOLLOWING;
        }
        let keep = whole_frames_covering(self.queued.as_slice(), self.sent as usize);
        self.queued.truncate(keep);
    }

    #[cfg(test)]
    pub(super) fn queued(&self) -> &[u8] {
        self.queued.as_slice()
    }

    #[cfg(test)]
    pub(super) fn set_in_driver(&mut self, n: u32) {
        self.in_driver = n;
    }

    #[cfg(test)]
    pub(super) fn set_sent(&mut self, queued: Vec<u8>, sent: u32) {
        self.queued = Buf(Some(Box::new(queued)));
        self.sent = sent;
    }

    #[cfg(test)]
    pub(super) fn sent(&self) -> u32 {
        self.sent
    }
}

/// The end of the whole frames at the front of `buf` that cover its first
/// `len` bytes (0 when `len` is 0); all of `buf` if it is not frames.
fn whole_frames_covering(buf: &[u8], len: usize) -> usize {
    let mut end = 0;
    while end < len {
        match server_frame_len(&buf[end..]) {
            Some(n) => end += n,
            None => return buf.len(), // not frames (cannot happen): keep it all
        }
    }
    end
}

/// The buffer a connection's driver is writing, after the greeting (the
/// 101 response) at first: part of the outbox contract, held by the driver
/// so an idle connection's slot carries none of it.
#[derive(Debug, Default)]
pub struct InFlight {
    buf: Buf,
    /// Bytes of `buf` written.
    sent: usize,
    /// Where frames start in `buf` (after the greeting, at first).
    frames_from: usize,
}

impl InFlight {
    /// The greeting (the 101 response), then `first` (frames).
    pub fn with_greeting(greeting: Vec<u8>) -> Self {
        let frames_from = greeting.len();
        Self { buf: Buf(Some(Box::new(greeting))), sent: 0, frames_from }
    }

    /// Appends frames the driver writes before anything queued (its first
    /// message, right after the greeting).
    pub fn push_first(&mut self, frames: &[u8]) {
        self.buf.0.get_or_insert_with(Default::default).extend_from_slice(frames);
    }

    pub fn unwritten(&self) -> &[u8] {
        &self.buf.as_slice()[self.sent..]
    }

    pub fn wrote(&mut self, n: usize) {
        self.sent += n;
    }

    pub fn is_done(&self) -> bool {
        self.sent == self.buf.len()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Slow consumer: keeps the frame being written (so it completes) and
    /// drops every frame after it.
    pub fn drop_unwritten_frames(&mut self) {
        let mut pos = self.frames_from;
        while pos < self.buf.len() {
            if pos >= self.sent {
                self.buf.truncate(pos.max(self.sent));
                return;
            }
            let Some(len) = server_frame_len(&self.buf.as_slice()[pos..]) else {
                return;
            };
            let end = pos + len;
            if end >= self.sent {
                self.buf.truncate(end);
                return;
            }
            pos = end;
        }
    }
}

/// A byte buffer that holds nothing while empty: 8 bytes in the slot of
/// every connection instead of a `Vec`'s 24, the vector itself coming from
/// [`Buffers`] when bytes are queued and going back when they are written.
// The box is the point: a thin pointer in every slot, the vector's own
// header only where bytes are queued.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
pub struct Buf(Option<Box<Vec<u8>>>);

impl Buf {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |v| v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Appends `bytes`, taking a vector from `bufs` first if it has none.
    fn extend(&mut self, bytes: &[u8], bufs: &mut Buffers) {
        let v = self.0.get_or_insert_with(|| bufs.take());
        v.extend_from_slice(bytes);
    }

    /// Keeps the first `len` bytes (none: the vector goes).
    fn truncate(&mut self, len: usize) {
        if len == 0 {
            self.0 = None;
        } else if let Some(v) = &mut self.0 {
            v.truncate(len);
        }
    }

    /// The contents, leaving this empty.
    fn take(&mut self) -> Buf {
        Buf(self.0.take())
    }
}

/// What queueing needs beside an outbox: spare buffers to reuse (idle
/// connections hold none) and the limit.
#[derive(Debug)]
#[allow(clippy::vec_box)] // spares keep their box: a `Buf` takes one as is
pub struct Buffers {
    spare: Vec<Box<Vec<u8>>>,
    /// The pool's low-water mark since the last trim: buffers below it
    /// were never needed meanwhile.
    low: usize,
    /// `WS_MAX_BUFFERED_BYTES`.
    pub limit: usize,
    /// Price updates conflated away, ever (the shard publishes it).
    pub conflated: u64,
}

impl Buffers {
    pub fn new(limit: usize) -> Self {
        Self { spare: Vec::new(), low: 0, limit, conflated: 0 }
    }

    #[allow(clippy::box_collection)]
    fn take(&mut self) -> Box<Vec<u8>> {
        let buf = self.spare.pop().unwrap_or_else(|| Box::new(Vec::with_capacity(OUTBOX_INITIAL)));
        self.low = self.low.min(self.spare.len());
        buf
    }

    /// Takes back a written-out buffer (bounded: [`SPARE_BUFFERS`] of at
    /// most [`SPARE_MAX_CAPACITY`]; the rest are freed).
    pub fn recycle(&mut self, buf: Buf) {
        let Some(mut buf) = buf.0 else { return };
        if buf.capacity() > 0 && buf.capacity() <= SPARE_MAX_CAPACITY && self.spare.len() < SPARE_BUFFERS {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Frees half the buffers that went unused since the last call (an idle
    /// shard's pool drains over a few calls; a busy one keeps what it uses).
    pub fn trim_idle(&mut self) -> usize {
        let free = self.low.div_ceil(2);
        self.spare.truncate(self.spare.len() - free);
        if self.spare.is_empty() {
            self.spare = Vec::new();
        }
        self.low = self.spare.len();
        free
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{encode_frame, OP_TEXT};

    fn frame(n: u8, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(OP_TEXT, &vec![b'a' + n; len], &mut out);
        out
    }

    #[test]
    fn past_the_limit_the_backlog_goes_but_the_frame_on_the_wire_stays_whole() {
        let log = PriceLog::default();
        let (a, b) = (frame(0, 100), frame(1, 100));
        let mut bufs = Buffers::new(3 * a.len());
        let mut out = Outbox::new(0);
        out.set_sent([&a[..], &b[..]].concat(), 10);
        assert_eq!(out.push(&[&a[..], &b[..]].concat(), &log, &mut bufs), Err(Slow));
        assert_eq!(out.lifecycle(), Lifecycle::Slow);
        assert_eq!(out.owed_close(), Some(CloseCode::SLOW_CONSUMER));
        assert_eq!(out.queued(), &a[..], "the frame a write stopped inside stays whole");
        assert!(!out.takes_updates());
        out.stop_updates();
        assert_eq!(out.lifecycle(), Lifecycle::Slow, "the owed 4009 is not forgotten");
    }

    fn update(ty: &str, data: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let json = format!(r#"{{"id":"u","type":"{ty}","timestamp":1,"data":{data}}}"#);
        encode_frame(OP_TEXT, json.as_bytes(), &mut out);
        out
    }

    fn price(token: &str, n: u32) -> Vec<u8> {
        update("price_update", &format!(r#"{{"token":"{token}","chainId":1,"n":{n}}}"#))
    }

    /// Past the limit a slow reader's price updates are reduced to the
    /// newest per market, in the order of those newest; private updates,
    /// replies and the frame on the wire stay; 4009 only if that is not
    /// enough.
    #[test]
    fn past_the_limit_prices_are_conflated_before_the_reader_is_dropped() {
        let log = PriceLog::default();
        let order = update("order_update", r#"{"userId":"u1","n":1}"#);
        let frames = [price("A", 1), price("B", 2), order.clone(), price("A", 3), price("A", 4), price("C", 5)];
        let mut bufs = Buffers::new(frames.iter().map(Vec::len).sum::<usize>() - 1);
        let mut out = Outbox::new(0);
        // A direct write stopped inside the first A: it stays whole.
        out.set_sent(frames[0].clone(), 3);
        for f in &frames[1..] {
            assert_eq!(out.push(f, &log, &mut bufs), Ok(()));
        }
        let expected = [&frames[0][..], &frames[1], &order, &frames[4], &frames[5]].concat();
        assert_eq!(out.queued(), &expected[..], "A3 went (A4 is newer); A1 was on the wire");
        assert_eq!(bufs.conflated, 1);
        assert!(out.takes_updates());

        // Private updates are never conflated: past the limit with no price
        // to spare, the reader is slow.
        let mut bufs = Buffers::new(3 * order.len());
        let mut out = Outbox::new(0);
        for _ in 0..3 {
            assert_eq!(out.push(&order, &log, &mut bufs), Ok(()));
        }
        assert_eq!(out.push(&order, &log, &mut bufs), Err(Slow));
        assert_eq!(bufs.conflated, 0);
    }

    #[test]
    fn lifecycle_only_moves_forward() {
        let mut out = Outbox::new(0);
        out.shut_down();
        assert_eq!(out.owed_close(), Some(CloseCode::GOING_AWAY));
        assert!(out.takes_updates(), "updates flow until the driver closes");
        out.queue_close(b"\x88\x02\x03\xe9", &mut Buffers::new(16));
        assert_eq!(out.lifecycle(), Lifecycle::Closing);
        out.shut_down();
        assert_eq!(out.lifecycle(), Lifecycle::Closing);
        assert!(!out.takes_updates());
    }

    #[test]
    fn the_driver_cut_keeps_the_frame_being_written() {
        let (a, b, c) = (frame(0, 10), frame(1, 10), frame(2, 10));
        let mut f = InFlight::with_greeting(b"HTTP/1.1 101\r\n\r\n".to_vec());
        let greeting = f.len();
        f.push_first(&[&a[..], &b[..], &c[..]].concat());
        f.wrote(greeting + a.len() + 3); // inside b
        f.drop_unwritten_frames();
        assert_eq!(f.len(), greeting + a.len() + b.len(), "b completes, c goes");
        let mut g = InFlight::with_greeting(b"HTTP/1.1 101\r\n\r\n".to_vec());
        g.push_first(&a);
        g.wrote(3); // inside the greeting: the frames were not started
        g.drop_unwritten_frames();
        assert_eq!(g.len(), greeting);
    }
}
