//! The WebSocket phase of one connection: a thin driver around the sans-IO
//! codec and session.
//!
//! Owns: reading (into the shard's scratch buffer, so an idle connection
//! holds no read buffer), writing everything queued in one `write` per
//! wake-up, ping/pong liveness, close handshakes, and the glue that turns
//! session decisions into replies and registry changes.
//!
//! One task per connection, polled by hand: each wake-up reads what is
//! there, acts on it, checks deadlines, and flushes the outbox. It is woken
//! by the socket, by the shard when bytes are queued for it, by the shard's
//! tick when its deadline passes, and by the auth worker when a remote
//! verification returns.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_channel::oneshot;
use futures_lite::io::{AsyncRead, AsyncWrite};

use super::stream::Stream;
use super::ShardCtx;
use crate::auth::{AuthFailure, Identity, Verification};
use crate::cluster::RegistryEvent;
use crate::limits::{Admission, RateCounter, RateDecision};
use crate::protocol::frame::{
    decode_frame, encode_close, encode_frame, server_frame_len, Assembler, Message, OP_PING, OP_PONG,
};
use crate::protocol::message::{parse_client, ClientKind, ErrorCode, Outgoing, ParseError, UserView};
use crate::protocol::session::{Decision, Session, Verified};
use crate::protocol::CloseCode;

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
    pub ip: IpAddr,
    pub admission: Admission,
    /// Set when the upgrade request carried a valid bearer token.
    pub identity: Option<Identity>,
    /// The 101 response, written before anything else.
    pub greeting: Vec<u8>,
    /// Bytes that arrived after the request head.
    pub leftover: Vec<u8>,
}

struct PendingAuth {
    rx: oneshot::Receiver<Result<Identity, AuthFailure>>,
    request_id: Option<Box<str>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Open,
    /// Our close frame is queued; waiting for the peer's until the deadline.
    Closing {
        deadline_ms: u64,
    },
    /// Finished: drop the socket.
    Done,
}

struct Conn {
    ctx: Rc<ShardCtx>,
    key: usize,
    id: u64,
    stream: Stream,
    rbuf: Vec<u8>,
    asm: Assembler,
    session: Session,
    sending: Vec<u8>,
    sent: usize,
    /// Where frames start in `sending` (after the 101 response at first).
    frames_from: usize,
    pre_auth: RateCounter,
    /// The user's shared message counter, once authenticated.
    user_rate: Option<(Arc<str>, Arc<RateCounter>)>,
    pending_auth: Option<Box<PendingAuth>>,
    pong: Option<Box<[u8]>>,
    next_ping_ms: u64,
    ping_sent_ms: Option<u64>,
    peer_closed: bool,
    phase: Phase,
    close_code: Option<CloseCode>,
}

pub async fn run(start: Start) {
    let Start { stream, ctx, ip, admission, identity, greeting, leftover } = start;
    let key = ctx.shard.borrow_mut().insert(stream.direct_fd(), greeting.len());
    ctx.stats.connections_accepted.inc();
    ctx.stats.connections_active.inc();
    let mono = ctx.global.clock.mono_ms();
    let now = ctx.global.clock.epoch_ms();
    let mut conn = Conn {
        id: ctx.next_conn_id(),
        key,
        stream,
        rbuf: leftover,
        asm: Assembler::default(),
        session: Session::new(now, ctx.timers),
        frames_from: greeting.len(),
        sending: greeting,
        sent: 0,
        pre_auth: RateCounter::default(),
        user_rate: None,
        pending_auth: None,
        pong: None,
        next_ping_ms: mono + ctx.global.config.ws_ping_interval.as_millis() as u64,
        ping_sent_ms: None,
        peer_closed: false,
        phase: Phase::Open,
        close_code: None,
        ctx,
    };
    tracing::debug!(conn = conn.id, %ip, "connection upgraded");
    if let Some(cluster) = &conn.ctx.global.cluster {
        cluster.event(RegistryEvent::Open { id: conn.id, ip, at_ms: now });
    }
    match identity {
        Some(identity) => conn.on_verified(Ok(identity), None, now),
        None => {
            let timeout_ms = conn.ctx.timers.auth_timeout_ms;
            let mut first = std::mem::take(&mut conn.sending);
            conn.ctx.encode(&Outgoing::AuthRequired { timeout_ms }, &mut first);
            conn.sending = first;
        }
    }
    if !conn.rbuf.is_empty() {
        let mut bytes = std::mem::take(&mut conn.rbuf);
        conn.on_bytes(&mut bytes, now);
    }
    std::future::poll_fn(|cx| conn.poll_pump(cx)).await;
    drop(conn); // see `Drop for Conn`
    drop(admission);
}

impl Conn {
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let ctx = self.ctx.clone();
        let now = ctx.global.clock.epoch_ms();
        let mono = ctx.global.clock.mono_ms();
        ctx.shard.borrow_mut().set_waker(self.key, cx.waker());

        let mut exhausted = false;
        if !self.peer_closed && self.phase != Phase::Done {
            exhausted = self.poll_reads(cx, now);
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
        }
        Poll::Pending
    }

    /// Reads and handles input; returns true when the budget ran out.
    fn poll_reads(&mut self, cx: &mut Context<'_>, now: u64) -> bool {
        for _ in 0..READ_BUDGET {
            let outcome = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                match Pin::new(&mut self.stream).poll_read(cx, &mut s[..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Some(false),
                    Poll::Ready(Ok(n)) => {
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
            self.begin_close(code);
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

    fn on_text(&mut self, text: &[u8], now: u64) {
        let parsed = parse_client(text);
        let ctx = self.ctx.clone();
        let stats = &ctx.stats;
        let (id, received_idx) = match &parsed {
            Ok(m) => (
                m.id.as_deref(),
                match m.kind {
                    ClientKind::Authenticate { .. } => 0,
                    ClientKind::Subscribe(_) => 1,
                    ClientKind::Unsubscribe(_) => 2,
                    ClientKind::Ping => 3,
                },
            ),
            Err(ParseError::Invalid { id, .. }) => (id.as_deref(), 4),
            Err(ParseError::UnknownType { id }) => (id.as_deref(), 5),
        };
        stats.received[received_idx].inc();
        let counter = self.user_rate.as_ref().map_or(&self.pre_auth, |(_, c)| &**c);
        match self.ctx.global.limits.check_message(counter, now) {
            RateDecision::Allowed => {}
            RateDecision::Limited { retry_after_ms } => {
                stats.rate_limited.inc();
                self.reply(&Outgoing::Error {
                    code: ErrorCode::RateLimited,
                    message: "message rate limit exceeded",
                    request_id: id,
                    retry_after_ms: Some(retry_after_ms),
                });
                return;
            }
            RateDecision::Close => {
                stats.rate_limited.inc();
                stats.rate_limit_closes.inc();
                self.begin_close(CloseCode::RATE_LIMITED);
                return;
            }
        }
        let msg = match &parsed {
            Ok(m) => m,
            Err(e) => {
                let message = match e {
                    ParseError::Invalid { reason, .. } => *reason,
                    ParseError::UnknownType { .. } => "unknown message type",
                };
                return self.reply(&Outgoing::Error { code: e.code(), message, request_id: id, retry_after_ms: None });
            }
        };
        let request_id = msg.id.as_deref();
        match self.session.on_message(&msg.kind) {
            Decision::Pong => self.reply(&Outgoing::Pong { now_ms: now, request_id }),
            Decision::Error(code, message) => {
                self.reply(&Outgoing::Error { code, message, request_id, retry_after_ms: None })
            }
            Decision::AuthFailed(reason) => {
                self.ctx.stats.auth_failure.inc();
                self.reply(&Outgoing::AuthFailed { error: reason, request_id });
                self.begin_close(CloseCode::AUTH_FAILED);
            }
            Decision::Verify(token) => match self.ctx.global.auth.verify(token) {
                Verification::Done(result) => self.on_verified(result, request_id, now),
                Verification::Pending(rx) => {
                    self.pending_auth = Some(Box::new(PendingAuth { rx, request_id: request_id.map(Into::into) }));
                }
            },
            Decision::Subscribed { channel, added } => {
                if added {
                    self.ctx.shard.borrow_mut().subscribe(self.key, channel);
                    self.registry(RegistryEvent::Subscriptions { id: self.id, subs: self.session.subscriptions() });
                }
                self.reply(&Outgoing::Subscribed { channel, request_id });
            }
            Decision::Unsubscribed { channel, removed } => {
                if removed {
                    self.ctx.shard.borrow_mut().unsubscribe(self.key, channel);
                    self.registry(RegistryEvent::Subscriptions { id: self.id, subs: self.session.subscriptions() });
                }
                self.reply(&Outgoing::Unsubscribed { channel, request_id });
            }
        }
    }

    fn poll_auth(&mut self, cx: &mut Context<'_>, now: u64) {
        let Some(pending) = self.pending_auth.as_mut() else {
            return;
        };
        let result = match Pin::new(&mut pending.rx).poll(cx) {
            Poll::Pending => return,
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(_)) => Err(AuthFailure("Authentication service unavailable".into())),
        };
        let pending = self.pending_auth.take().expect("checked above");
        if self.phase == Phase::Open {
            self.on_verified(result, pending.request_id.as_deref(), now);
        }
    }

    fn on_verified(&mut self, result: Result<Identity, AuthFailure>, request_id: Option<&str>, now: u64) {
        match self.session.on_verified(result) {
            Verified::Authenticated => {
                let identity = self.session.identity().expect("just authenticated").clone();
                self.ctx.shard.borrow_mut().set_user(self.key, identity.user_id.clone());
                let counter = self.ctx.global.limits.user_counter(&identity.user_id);
                counter.hit(now, self.pre_auth.current(now));
                self.user_rate = Some((identity.user_id.clone(), counter));
                self.registry(RegistryEvent::Auth { id: self.id, user: identity.user_id.clone() });
                self.auth_success(&identity, request_id);
                tracing::debug!(conn = self.id, user = %identity.user_id, "authenticated");
            }
            Verified::Refreshed => {
                let identity = self.session.identity().expect("refreshed").clone();
                self.auth_success(&identity, request_id);
            }
            Verified::Failed(reason) => {
                self.ctx.stats.auth_failure.inc();
                self.reply(&Outgoing::AuthFailed { error: &reason, request_id });
                self.begin_close(CloseCode::AUTH_FAILED);
            }
        }
    }

    fn auth_success(&mut self, identity: &Identity, request_id: Option<&str>) {
        self.ctx.stats.auth_success.inc();
        self.reply(&Outgoing::AuthSuccess {
            user: UserView { id: &identity.user_id, email: identity.email.as_deref() },
            request_id,
        });
    }

    /// Reports a registry change to Redis' sync worker (when configured).
    fn registry(&self, e: RegistryEvent) {
        if let Some(cluster) = &self.ctx.global.cluster {
            cluster.event(e);
        }
    }

    fn reply(&mut self, msg: &Outgoing) {
        self.ctx.queue(self.key, msg);
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
            tracing::debug!(conn = self.id, "slow consumer: backlog dropped, closing with 4009");
            self.drop_unwritten_frames();
            self.begin_close(CloseCode::SLOW_CONSUMER);
        } else if shutdown {
            self.begin_close(CloseCode::GOING_AWAY);
            let grace = self.ctx.global.config.shutdown_grace_ms.as_millis() as u64;
            self.phase = Phase::Closing { deadline_ms: mono + grace };
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
            self.reply(&Outgoing::AuthFailed { error: reason, request_id: None });
            self.begin_close(code);
            return;
        }
        let cfg = &self.ctx.global.config;
        match self.ping_sent_ms {
            Some(sent) if mono >= sent + cfg.ws_pong_timeout.as_millis() as u64 => {
                self.ctx.stats.pong_timeouts.inc();
                tracing::debug!(conn = self.id, "no frame after ping: dropping");
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

    /// Queues our close frame after everything already queued and stops
    /// further updates.
    fn begin_close(&mut self, code: CloseCode) {
        if self.phase != Phase::Open {
            return;
        }
        self.session.close();
        self.pending_auth = None;
        self.pong = None;
        self.close_code = Some(code);
        let mut frame = Vec::with_capacity(32);
        encode_close(code, code.reason(), &mut frame);
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
                let slot = shard.slot(self.key);
                if slot.pending.is_empty() {
                    slot.inflight = 0;
                    // Fully written: an idle connection keeps no write buffer.
                    shard.recycle(std::mem::take(&mut self.sending));
                    self.sent = 0;
                    drop(shard);
                    // TLS may hold encrypted bytes the socket did not take yet.
                    return match Pin::new(&mut self.stream).poll_flush(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => Ok(()),
                    };
                }
                let next = std::mem::take(&mut slot.pending);
                // A direct write by the fan-out may have sent a prefix already.
                self.sent = std::mem::take(&mut slot.pre_sent);
                slot.inflight = next.len() - self.sent;
                shard.recycle(std::mem::replace(&mut self.sending, next));
                self.frames_from = 0;
            }
            match Pin::new(&mut self.stream).poll_write(cx, &self.sending[self.sent..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    let left = self.sending.len() - self.sent;
                    self.ctx.shard.borrow_mut().slot(self.key).inflight = left;
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
    /// Unregisters the connection. Runs before the fields (the socket among
    /// them) are dropped, so the shard never holds the fd of a closed socket,
    /// which the fan-out's direct writes rely on; and it runs on every exit,
    /// also when the executor drops the task at shutdown.
    fn drop(&mut self) {
        self.ctx.shard.borrow_mut().remove(self.key);
        self.ctx.stats.connections_active.sub(1);
        if let Some((user, counter)) = self.user_rate.take() {
            self.ctx.global.limits.release_user(&user, counter);
        }
        self.registry(RegistryEvent::Close { id: self.id });
        tracing::debug!(conn = self.id, code = ?self.close_code.map(|c| c.0), "connection closed");
    }
}
