//! The WebSocket phase of one connection: a thin driver around the sans-IO
//! codec and session.
//!
//! Owns: reading (into the shard's scratch buffer, so an idle connection
//! holds no read buffer), writing everything queued in one `write` per
//! wake-up, ping/pong liveness, close handshakes and deadlines. What a
//! decoded client message leads to is `messages.rs`.
//!
//! One task per connection, polled by hand: each wake-up reads what is
//! there, acts on it, checks deadlines, and flushes the outbox. It is woken
//! by the socket, by the shard when bytes are queued for it, by the shard's
//! tick when its deadline passes, and by the auth worker when a remote
//! verification returns. Idle for `WS_PARK_IDLE_MS`, it parks: the task
//! ends and `park.rs` holds what resuming needs.

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};

use super::messages::PendingAuth;
use super::park::Parked;
use super::ShardCtx;
use crate::auth::Identity;
use crate::cluster::RegistryEvent;
use crate::limits::{Admission, RateCounter, UserRate};
use crate::protocol::frame::{
    decode_frame, encode_close, encode_frame, server_frame_len, Assembler, Message, OP_PING, OP_PONG,
};
use crate::protocol::message::Outgoing;
use crate::protocol::session::Session;
use crate::protocol::CloseCode;
use crate::shard::DirectSocket;
use crate::stream::Stream;
use crate::sys::SharedStream;

/// Shared read buffer per shard thread: borrowed only inside one poll.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Reads per wake-up before yielding to other connections.
const READ_BUDGET: usize = 8;
/// Time to wait for the peer's close frame after sending ours, in ms.
const CLOSE_GRACE_MS: u64 = 3_000;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// What `upgrade.rs` hands over.
pub struct Start {
    pub stream: Stream,
    pub ctx: Rc<ShardCtx>,
    /// The connection's id, given at accept (logs, `connectionId`).
    pub id: u64,
    pub ip: IpAddr,
    pub admission: Admission,
    /// Set when the upgrade request carried a valid bearer token.
    pub identity: Option<Identity>,
    /// The 101 response, written before anything else.
    pub greeting: Vec<u8>,
    /// Bytes that arrived after the request head.
    pub leftover: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Open,
    /// Our close frame is queued; waiting for the peer's until the deadline.
    Closing {
        deadline_ms: u64,
    },
    /// Finished: drop the socket.
    Done,
}

pub(super) struct Conn {
    pub(super) ctx: Rc<ShardCtx>,
    pub(super) key: usize,
    pub(super) id: u64,
    /// Shared with the shard slot's [`DirectSocket`]: the socket stays
    /// open while either holds it.
    pub(super) stream: SharedStream,
    pub(super) rbuf: Vec<u8>,
    pub(super) asm: Assembler,
    pub(super) session: Session,
    pub(super) sending: Vec<u8>,
    pub(super) sent: usize,
    /// Where frames start in `sending` (after the 101 response at first).
    pub(super) frames_from: usize,
    pub(super) pre_auth: RateCounter,
    /// The user's shared message counter, once authenticated.
    pub(super) user_rate: Option<Arc<UserRate>>,
    pub(super) pending_auth: Option<Box<PendingAuth>>,
    pub(super) pong: Option<Box<[u8]>>,
    pub(super) next_ping_ms: u64,
    pub(super) ping_sent_ms: Option<u64>,
    pub(super) peer_closed: bool,
    pub(super) phase: Phase,
    pub(super) close_code: Option<CloseCode>,
    /// The connection's place in the per-IP count; released after it.
    admission: Option<Admission>,
    /// Monotonic ms of the last input (or of the task's start): parking
    /// waits for `WS_PARK_IDLE_MS` of quiet.
    last_input_ms: u64,
    /// Handed to the parker: dropping this task leaves the connection open.
    parked: bool,
}

/// Registers the upgraded connection with its shard, queues its greeting,
/// and returns the task that drives it until it closes.
///
/// The task is the [`Conn`] itself polled in place ([`Pump`]): an `async`
/// body here kept both its argument and the connection in the task, 992
/// bytes instead of 472, on every idle connection.
pub fn run(start: Start) -> Pump {
    let Start { stream, ctx, id, ip, admission, identity, greeting, leftover } = start;
    let stream = Rc::new(RefCell::new(stream));
    let key = ctx.shard.borrow_mut().insert(DirectSocket::shared(&stream), greeting.len());
    ctx.stats.connections_accepted.inc();
    ctx.stats.connections_active.inc();
    let mono = ctx.global.clock.mono_ms();
    let now = ctx.global.clock.epoch_ms();
    let session = Session::new(now, ctx.timers);
    let next_ping_ms = mono + ctx.global.config.ws_ping_interval.as_millis() as u64;
    let mut conn = Conn::open(ctx, key, id, stream, session, admission, next_ping_ms);
    conn.rbuf = leftover;
    conn.frames_from = greeting.len();
    conn.sending = greeting;
    tracing::debug!(conn = conn.id, %ip, "connection upgraded");
    if let Some(cluster) = &conn.ctx.global.cluster {
        cluster.event(RegistryEvent::Open { id: conn.id, ip, at_ms: now });
    }
    match identity {
        Some(identity) => conn.on_verified(Ok(identity), None, now),
        None => {
            let timeout_ms = conn.ctx.timers.auth_timeout_ms;
            let mut first = std::mem::take(&mut conn.sending);
            let connection_id = conn.public_id();
            conn.ctx.encode(&Outgoing::AuthRequired { timeout_ms, connection_id: &connection_id }, &mut first);
            conn.sending = first;
        }
    }
    if !conn.rbuf.is_empty() {
        let mut bytes = std::mem::take(&mut conn.rbuf);
        conn.on_bytes(&mut bytes, now);
    }
    Pump { conn }
}

/// A connection's task: polls the connection until it is done or parked.
pub struct Pump {
    conn: Conn,
}

impl Pump {
    pub(super) fn new(conn: Conn) -> Self {
        Self { conn }
    }
}

impl std::future::Future for Pump {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().conn.poll_pump(cx)
    }
}

impl Conn {
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let ctx = self.ctx.clone();
        let now = ctx.global.clock.epoch_ms();
        let mono = ctx.global.clock.mono_ms();
        ctx.shard.borrow_mut().set_waker(self.key, cx.waker());

        let mut exhausted = false;
        if !self.peer_closed && self.phase != Phase::Done {
            exhausted = self.poll_reads(cx, now, mono);
        }
        // After reading, so a verification started just now registers its waker.
        self.poll_auth(cx, now);
        self.check_flags(mono);
        self.check_deadlines(now, mono);
        if let Some(payload) = self.pong.take() {
            let mut frame = Vec::with_capacity(payload.len() + 2);
            encode_frame(OP_PONG, &payload, &mut frame);
            ctx.shard.borrow_mut().queue(self.key, &frame);
        }
        if self.phase != Phase::Done {
            if let Err(e) = self.poll_flush(cx) {
                tracing::debug!(conn = self.id, error = %e, "write failed");
                self.phase = Phase::Done;
            }
        }
        if self.peer_closed && matches!(self.phase, Phase::Closing { .. }) && self.flushed() {
            self.phase = Phase::Done;
        }
        if self.phase == Phase::Done {
            return Poll::Ready(());
        }
        self.schedule_deadline(now, mono);
        if exhausted {
            cx.waker().wake_by_ref(); // more to read: come back after others ran
            return Poll::Pending;
        }
        if let Some(idle_ms) = self.ctx.parker.idle_ms() {
            if self.parkable() {
                let due = self.last_input_ms + idle_ms;
                if mono >= due {
                    if self.park() {
                        return Poll::Ready(());
                    }
                } else {
                    let mut shard = self.ctx.shard.borrow_mut();
                    let slot = shard.slot(self.key);
                    slot.deadline_ms = slot.deadline_ms.min(due);
                }
            }
        }
        Poll::Pending
    }

    /// Whether only the socket, the deadlines and the fan-out can need this
    /// connection now: open, plain TCP, nothing read but not handled,
    /// nothing to write, no verification or pong owed.
    fn parkable(&self) -> bool {
        if self.phase != Phase::Open
            || self.peer_closed
            || !matches!(*self.stream.borrow(), Stream::Plain(_))
            || self.pending_auth.is_some()
            || self.pong.is_some()
            || !self.rbuf.is_empty()
            || !self.asm.is_idle()
            || !self.sending.is_empty()
        {
            return false;
        }
        let mut shard = self.ctx.shard.borrow_mut();
        let slot = shard.slot(self.key);
        slot.pending.is_empty() && slot.inflight == 0 && slot.pre_sent == 0 && !slot.slow && !slot.shutdown
    }

    /// Hands the connection to the shard's parker; true when it took it
    /// (this task then ends without closing the socket).
    fn park(&mut self) -> bool {
        // The parked connection's own descriptor: the stream's (and its
        // task's) goes once this task ends.
        let dup = self.ctx.shard.borrow().socket(self.key).map(|s| s.as_fd().try_clone_to_owned());
        let fd = match dup {
            None => return false, // TLS: no direct socket, never parked
            Some(Ok(fd)) => fd,
            Some(Err(e)) => {
                self.ctx.stats.park_failures.inc();
                tracing::debug!(conn = self.id, error = %e, "could not park: no descriptor");
                return false;
            }
        };
        let Some(admission) = self.admission.take() else {
            return false; // not reached: only a parked connection has none
        };
        let parked = Parked {
            id: self.id,
            pre_auth: (!self.session.is_authenticated()).then(|| Box::new(std::mem::take(&mut self.pre_auth))),
            session: std::mem::replace(&mut self.session, Session::new(0, self.ctx.timers)).store(),
            user_rate: self.user_rate.take(),
            next_ping_ms: self.next_ping_ms,
            ping_sent_ms: self.ping_sent_ms.unwrap_or(u64::MAX),
            admission: admission.park(),
        };
        match self.ctx.parker.park(&self.ctx, self.key, parked, fd) {
            None => {
                self.parked = true;
                true
            }
            Some(parked) => {
                let user = parked.user_rate.as_ref().map(|r| r.user());
                self.session = Session::resume(parked.session, user, self.ctx.timers);
                if let Some(counter) = parked.pre_auth {
                    self.pre_auth = *counter;
                }
                self.user_rate = parked.user_rate;
                self.admission = Some(Admission::resume(&self.ctx.global.limits, parked.admission));
                false
            }
        }
    }

    /// An open connection's driver with nothing read, queued or owed.
    fn open(
        ctx: Rc<ShardCtx>,
        key: usize,
        id: u64,
        stream: SharedStream,
        session: Session,
        admission: Admission,
        next_ping_ms: u64,
    ) -> Conn {
        Conn {
            key,
            id,
            stream,
            rbuf: Vec::new(),
            asm: Assembler::default(),
            session,
            sending: Vec::new(),
            sent: 0,
            frames_from: 0,
            pre_auth: RateCounter::default(),
            user_rate: None,
            pending_auth: None,
            pong: None,
            next_ping_ms,
            ping_sent_ms: None,
            peer_closed: false,
            phase: Phase::Open,
            close_code: None,
            admission: Some(admission),
            last_input_ms: ctx.global.clock.mono_ms(),
            parked: false,
            ctx,
        }
    }

    /// A parked connection's driver, resumed where it parked, on its socket
    /// `fd` (which the slot held while it was parked).
    pub(super) fn resume(ctx: Rc<ShardCtx>, key: usize, parked: Parked, fd: std::os::fd::OwnedFd) -> Conn {
        let stream = Rc::new(RefCell::new(Stream::Plain(crate::sys::tcp_stream(fd))));
        ctx.shard.borrow_mut().set_socket(key, DirectSocket::shared(&stream));
        let session = Session::resume(parked.session, parked.user_rate.as_ref().map(|r| r.user()), ctx.timers);
        let admission = Admission::resume(&ctx.global.limits, parked.admission);
        let mut conn = Conn::open(ctx, key, parked.id, stream, session, admission, parked.next_ping_ms);
        conn.pre_auth = parked.pre_auth.map(|b| *b).unwrap_or_default();
        conn.user_rate = parked.user_rate;
        conn.ping_sent_ms = (parked.ping_sent_ms != u64::MAX).then_some(parked.ping_sent_ms);
        conn
    }

    /// Reads and handles input; returns true when the budget ran out.
    fn poll_reads(&mut self, cx: &mut Context<'_>, now: u64, mono: u64) -> bool {
        for _ in 0..READ_BUDGET {
            let outcome = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let read = Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, &mut s[..]);
                match read {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Some(false),
                    Poll::Ready(Ok(n)) => {
                        self.last_input_ms = mono;
                        self.ping_sent_ms = None; // any frame proves liveness
                        self.on_bytes(&mut s[..n], now);
                        Some(true)
                    }
                    Poll::Pending => None,
                }
            });
            match outcome {
                None => return false,
                Some(false) => {
                    // EOF or reset: nobody to write to any more.
                    self.phase = Phase::Done;
                    return false;
                }
                Some(true) if self.peer_closed || self.phase == Phase::Done => return false,
                Some(true) => {}
            }
        }
        true
    }

    /// Feeds received bytes through the codec and acts on each message.
    fn on_bytes(&mut self, data: &mut [u8], now: u64) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let result = if rbuf.is_empty() {
            self.decode(data, now).map(|used| rbuf.extend_from_slice(&data[used..]))
        } else {
            rbuf.extend_from_slice(data);
            self.decode(&mut rbuf, now).map(|used| {
                rbuf.drain(..used);
            })
        };
        if rbuf.is_empty() {
            rbuf = Vec::new(); // an idle connection keeps no read buffer
        }
        self.rbuf = rbuf;
        if let Err(code) = result {
            self.ctx.stats.protocol_closes.inc();
            self.rbuf = Vec::new();
            self.close_for(code, "frame-level protocol violation");
        }
    }

    /// Decodes every complete frame in `buf`; returns the bytes used.
    fn decode(&mut self, buf: &mut [u8], now: u64) -> Result<usize, CloseCode> {
        let limits = self.ctx.frame_limits;
        let mut asm = std::mem::take(&mut self.asm);
        let mut pos = 0;
        let result = loop {
            if self.peer_closed {
                break Ok(pos);
            }
            let frame = match decode_frame(&mut buf[pos..], &limits) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(pos),
                Err(code) => break Err(code),
            };
            let payload = &buf[pos + frame.payload.start..pos + frame.payload.end];
            match asm.push(&frame, payload, &limits) {
                Ok(Some(msg)) => self.on_message(msg, now),
                Ok(None) => {}
                Err(code) => break Err(code),
            }
            pos += frame.consumed;
        };
        asm.release();
        self.asm = asm;
        result
    }

    fn on_message(&mut self, msg: Message<'_>, now: u64) {
        match msg {
            Message::Text(text) if self.phase == Phase::Open => self.on_text(text, now),
            Message::Text(_) | Message::Pong | Message::Binary(_) => {}
            Message::Ping(payload) => {
                if self.phase == Phase::Open {
                    // Answer only the latest ping of a burst (RFC 6455 §5.5.3).
                    self.pong = Some(payload.into());
                }
            }
            Message::Close(code) => {
                self.peer_closed = true;
                if self.phase == Phase::Open {
                    let echo = code.map_or(CloseCode::NORMAL, CloseCode);
                    self.begin_close(echo);
                }
            }
        }
    }

    /// Reacts to what the shard flagged: slow consumer, shutdown.
    fn check_flags(&mut self, mono: u64) {
        let (slow, shutdown) = {
            let mut shard = self.ctx.shard.borrow_mut();
            let slot = shard.slot(self.key);
            (slot.slow, slot.shutdown)
        };
        if self.phase != Phase::Open {
            return;
        }
        if slow {
            self.ctx.stats.slow_consumer_closes.inc();
            self.drop_unwritten_frames();
            self.close_for(CloseCode::SLOW_CONSUMER, "unsent output over WS_MAX_BUFFERED_BYTES: backlog dropped");
        } else if shutdown {
            // Tells the client when to come back, spread at random so that
            // thousands of clients do not all reconnect at once.
            let reason = format!(r#"{{"reconnect":true,"retryAfterMs":{}}}"#, self.ctx.reconnect_after_ms());
            self.begin_close_with(CloseCode::GOING_AWAY, &reason);
            self.phase = Phase::Closing { deadline_ms: self.ctx.shutdown_deadline_ms().max(mono) };
        }
    }

    fn check_deadlines(&mut self, now: u64, mono: u64) {
        match self.phase {
            Phase::Done => return,
            Phase::Closing { deadline_ms } => {
                if mono >= deadline_ms {
                    self.phase = Phase::Done;
                }
                return;
            }
            Phase::Open => {}
        }
        if let Some((reason, code)) = self.session.on_deadline(now) {
            if code == CloseCode::AUTH_FAILED {
                self.ctx.stats.auth_failure.inc();
            }
            self.log_auth_failure(reason);
            self.reply(&Outgoing::AuthFailed { error: reason, request_id: None });
            self.close_for(code, reason);
            return;
        }
        let cfg = &self.ctx.global.config;
        match self.ping_sent_ms {
            Some(sent) if mono >= sent + cfg.ws_pong_timeout.as_millis() as u64 => {
                self.ctx.stats.pong_timeouts.inc();
                self.log_close(None, "no frame within WS_PONG_TIMEOUT of a ping: TCP connection dropped");
                self.phase = Phase::Done;
            }
            None if mono >= self.next_ping_ms => {
                let mut frame = Vec::with_capacity(2);
                encode_frame(OP_PING, &[], &mut frame);
                self.ctx.shard.borrow_mut().queue(self.key, &frame);
                self.ping_sent_ms = Some(mono);
                self.next_ping_ms = mono + cfg.ws_ping_interval.as_millis() as u64;
            }
            _ => {}
        }
    }

    /// This connection's id as clients see it (`connectionId`): the
    /// instance and the id its log lines carry, `<instance>/<conn>`.
    pub(super) fn public_id(&self) -> String {
        format!("{}/{}", self.ctx.global.instance_id, self.id)
    }

    /// The client's IP (the unspecified address only while handing the
    /// connection to the parker, when it has no admission).
    fn ip(&self) -> IpAddr {
        self.admission.as_ref().map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), Admission::ip)
    }

    /// Closes with `code` on the server's initiative, with one log line
    /// (within the shard's log budget) saying why.
    pub(super) fn close_for(&mut self, code: CloseCode, why: &str) {
        if self.phase == Phase::Open {
            self.log_close(Some(code), why);
        }
        self.begin_close(code);
    }

    /// The log line of a close by the server (`code` None: the TCP
    /// connection is dropped without a close frame).
    fn log_close(&self, code: Option<CloseCode>, why: &str) {
        if let Some(suppressed) = self.ctx.conn_log.allow(std::time::Instant::now(), &self.ctx.stats) {
            tracing::info!(
                conn = self.id,
                ip = %self.ip(),
                instance = %self.ctx.global.instance_id,
                user = self.session.identity().map(|i| &*i.user_id),
                code = code.map(|c| c.0),
                reason = why,
                suppressed,
                "connection closed by the server"
            );
        }
    }

    /// The log line of a refused token (the user when the session knew it).
    pub(super) fn log_auth_failure(&self, reason: &str) {
        if let Some(suppressed) = self.ctx.conn_log.allow(std::time::Instant::now(), &self.ctx.stats) {
            tracing::info!(
                conn = self.id,
                ip = %self.ip(),
                instance = %self.ctx.global.instance_id,
                user = self.session.identity().map(|i| &*i.user_id),
                reason,
                suppressed,
                "authentication failed"
            );
        }
    }

    /// Queues our close frame after everything already queued and stops
    /// further updates.
    pub(super) fn begin_close(&mut self, code: CloseCode) {
        self.begin_close_with(code, code.reason());
    }

    /// [`Conn::begin_close`] with a reason text of the caller's.
    fn begin_close_with(&mut self, code: CloseCode, reason: &str) {
        if self.phase != Phase::Open {
            return;
        }
        self.session.close();
        self.pending_auth = None;
        self.pong = None;
        self.close_code = Some(code);
        let mut frame = Vec::with_capacity(32 + reason.len());
        encode_close(code, reason, &mut frame);
        let mut shard = self.ctx.shard.borrow_mut();
        shard.stop_updates(self.key);
        shard.slot(self.key).pending.extend_from_slice(&frame);
        self.phase = Phase::Closing { deadline_ms: self.ctx.global.clock.mono_ms() + CLOSE_GRACE_MS };
    }

    /// Cuts the buffer in flight after the frame being written, so that
    /// frame completes and nothing queued behind it is sent.
    fn drop_unwritten_frames(&mut self) {
        let mut pos = self.frames_from;
        while pos < self.sending.len() {
            if pos >= self.sent {
                self.sending.truncate(pos.max(self.sent));
                return;
            }
            let Some(len) = server_frame_len(&self.sending[pos..]) else {
                return;
            };
            let end = pos + len;
            if end >= self.sent {
                self.sending.truncate(end);
                return;
            }
            pos = end;
        }
    }

    fn flushed(&self) -> bool {
        self.sent == self.sending.len() && self.ctx.shard.borrow_mut().slot(self.key).pending.is_empty()
    }

    /// Writes what is queued: the buffer in flight first, then everything
    /// the shard appended since, swapped out in one piece.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.sent == self.sending.len() {
                let mut shard = self.ctx.shard.borrow_mut();
                // Price frames queued since the last sweep go out with the rest.
                shard.materialize(self.key);
                let slot = shard.slot(self.key);
                if slot.pending.is_empty() {
                    slot.inflight = 0;
                    // Fully written: an idle connection keeps no write buffer.
                    shard.recycle(std::mem::take(&mut self.sending));
                    self.sent = 0;
                    drop(shard);
                    // TLS may hold encrypted bytes the socket did not take yet.
                    return match Pin::new(&mut *self.stream.borrow_mut()).poll_flush(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => Ok(()),
                    };
                }
                let next = std::mem::take(&mut slot.pending);
                // A direct write by the fan-out may have sent a prefix already.
                self.sent = std::mem::take(&mut slot.pre_sent) as usize;
                slot.inflight = (next.len() - self.sent) as u32;
                shard.recycle(std::mem::replace(&mut self.sending, next));
                self.frames_from = 0;
            }
            let written = Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, &self.sending[self.sent..]);
            match written {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    let left = self.sending.len() - self.sent;
                    self.ctx.shard.borrow_mut().slot(self.key).inflight = left as u32;
                    return Ok(());
                }
            }
        }
    }

    /// Tells the shard's tick when this connection next has timed work.
    fn schedule_deadline(&mut self, now: u64, mono: u64) {
        let cfg = &self.ctx.global.config;
        let next = match self.phase {
            Phase::Closing { deadline_ms } => deadline_ms,
            _ => {
                let session = self.session.deadline_ms().map_or(u64::MAX, |d| mono + d.saturating_sub(now));
                let ping = match self.ping_sent_ms {
                    Some(sent) => sent + cfg.ws_pong_timeout.as_millis() as u64,
                    None => self.next_ping_ms,
                };
                session.min(ping)
            }
        };
        self.ctx.shard.borrow_mut().slot(self.key).deadline_ms = next;
    }
}

impl Drop for Conn {
    /// Unregisters the connection (the slot's share of the socket goes with
    /// it); runs on every exit, also when the executor drops the task at
    /// shutdown.
    fn drop(&mut self) {
        if self.parked {
            return; // the parker holds the connection now
        }
        self.ctx.shard.borrow_mut().remove(self.key);
        self.ctx.stats.connections_active.sub(1);
        if let Some(counter) = self.user_rate.take() {
            self.ctx.global.limits.release_user(counter);
        }
        self.registry(RegistryEvent::Close { id: self.id });
        tracing::debug!(conn = self.id, code = self.close_code.map(|c| c.0), "connection closed");
    }
}
