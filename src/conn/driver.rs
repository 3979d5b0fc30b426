//! The WebSocket phase of one connection: a thin driver around the
//! sans-IO link (`protocol::link`: frames, liveness, the close handshake)
//! and the client (`client.rs`: messages, authentication).
//!
//! Owns the connection's I/O: reading into the shard's scratch buffer (so
//! an idle connection holds no read buffer), writing what the shard queued
//! for it ([`InFlight`], the driver's side of the outbox contract), closing
//! (the close frame through the shard, the log line), its deadlines with
//! the shard's tick, and handing an idle connection to the parker.
//!
//! One task per connection, polled by hand: each wake-up reads what is
//! there, acts on it, checks deadlines, and writes. It is woken by the
//! socket, by the shard when bytes are queued for it, by the tick when its
//! deadline passes, and by the auth worker when a remote verification
//! returns. Idle for `WS_PARK_IDLE_MS`, it parks: the task ends and
//! `park.rs` holds what resuming needs.

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};

use super::client::{Client, Close, Who};
use super::park::Parked;
use super::ShardCtx;
use crate::auth::Identity;
use crate::cluster::RegistryEvent;
use crate::limits::Admission;
use crate::protocol::link::{CloseCause, Data, Due, Link};
use crate::protocol::message::Outgoing;
use crate::protocol::session::Session;
use crate::protocol::CloseCode;
use crate::shard::{DirectSocket, InFlight, StepAside};
use crate::stream::Stream;
use crate::sys::SharedStream;

/// Shared read buffer per shard thread: borrowed only inside one poll.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Reads per wake-up before yielding to other connections.
const READ_BUDGET: usize = 8;

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

pub(super) struct Conn {
    ctx: Rc<ShardCtx>,
    key: usize,
    id: u64,
    /// Shared with the shard slot's [`DirectSocket`]: the socket stays
    /// open while either holds it.
    stream: SharedStream,
    /// What the driver is writing (the outbox contract, `shard::outbox`).
    inflight: InFlight,
    link: Link,
    client: Client,
    /// The connection's place in the per-IP count; released after it.
    admission: Option<Admission>,
    /// Monotonic ms of the last input (or of the task's start): parking
    /// waits for `WS_PARK_IDLE_MS` of quiet.
    last_input_ms: u64,
    close_code: Option<CloseCode>,
    /// Handed to the parker: dropping this task leaves the connection open.
    parked: bool,
    /// Whether its last poll let the fan-out go first (`shard::Precedence`).
    aside: StepAside,
    /// Reads its socket directly when the shard's poll ring says so
    /// (`park.rs`); false for TLS, and when the kernel refused the watch:
    /// glommio's reads then.
    ring_reads: bool,
}

/// Registers the upgraded connection with its shard, queues its greeting,
/// and returns the future that drives it until it closes (awaited by the
/// connection's task, `upgrade::serve`).
///
/// The task is the [`Conn`] itself polled in place ([`Pump`]): an `async`
/// body here would keep both its argument and the connection in the task,
/// on every idle connection.
pub fn run(start: Start) -> Pump {
    let Start { stream, ctx, id, ip, admission, identity, greeting, leftover } = start;
    let stream = Rc::new(RefCell::new(stream));
    let key = ctx.shard.borrow_mut().insert(DirectSocket::shared(&stream), greeting.len());
    ctx.stats.connections_accepted.inc();
    ctx.stats.connections_active.inc();
    let mono = ctx.global.clock.mono_ms();
    let now = ctx.global.clock.epoch_ms();
    let link = Link::new(mono, ctx.link_timers);
    let client = Client::new(Session::new(now, ctx.timers));
    let mut conn = Conn::open(ctx, key, id, stream, link, client, admission);
    conn.inflight = InFlight::with_greeting(greeting);
    conn.ring_reads = conn.watch();
    tracing::debug!(conn = id, %ip, "connection upgraded");
    if let Some(cluster) = &conn.ctx.global.cluster {
        cluster.event(RegistryEvent::Open { id, ip, at_ms: now });
    }
    match identity {
        Some(identity) => {
            let ctx = conn.ctx.clone();
            let who = Who { ctx: &ctx, key, id, ip };
            if let Some(close) = conn.client.on_verified(&who, Ok(identity), None, now) {
                conn.close_for(close);
            }
        }
        None => {
            let timeout_ms = conn.ctx.timers.auth_timeout_ms;
            let connection_id = format!("{}/{}", conn.ctx.global.instance_id, id);
            let mut first = Vec::new();
            conn.ctx.encode(&Outgoing::AuthRequired { timeout_ms, connection_id: &connection_id }, &mut first);
            conn.inflight.push_first(&first);
        }
    }
    if !leftover.is_empty() {
        let mut bytes = leftover;
        conn.on_bytes(&mut bytes, now, mono);
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
    fn open(
        ctx: Rc<ShardCtx>,
        key: usize,
        id: u64,
        stream: SharedStream,
        link: Link,
        client: Client,
        admission: Admission,
    ) -> Conn {
        Conn {
            key,
            id,
            stream,
            inflight: InFlight::default(),
            link,
            client,
            admission: Some(admission),
            last_input_ms: ctx.global.clock.mono_ms(),
            close_code: None,
            parked: false,
            aside: StepAside::default(),
            ring_reads: false,
            ctx,
        }
    }

    /// A parked connection's driver, resumed where it parked, on its socket
    /// `fd` (which the slot held while it was parked).
    pub(super) fn resume(ctx: Rc<ShardCtx>, key: usize, parked: Parked, fd: std::os::fd::OwnedFd) -> Conn {
        let stream = Rc::new(RefCell::new(Stream::Plain(crate::sys::tcp_stream(fd))));
        ctx.shard.borrow_mut().set_socket(key, DirectSocket::shared(&stream));
        let ping_sent = (parked.ping_sent_ms != u64::MAX).then_some(parked.ping_sent_ms);
        let link = Link::resume(parked.next_ping_ms, ping_sent, ctx.link_timers);
        let client = Client::resume(parked.client, &ctx);
        let admission = Admission::resume(&ctx.global.limits, parked.admission);
        let mut conn = Conn::open(ctx, key, parked.id, stream, link, client, admission);
        // Parked only while watched: the watch goes on (or, if it ended,
        // the slot is marked readable and the first read arms it again).
        conn.ring_reads = true;
        conn
    }

    /// Arms the watch of the plain socket on the shard's poll ring; false
    /// for TLS or when there is no ring or the kernel refused.
    fn watch(&self) -> bool {
        match &*self.stream.borrow() {
            Stream::Plain(tcp) => self.ctx.parker.watch(&self.ctx, self.key, crate::sys::tcp_fd(tcp)),
            Stream::Tls(_) => false,
        }
    }

    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ctx.fanout_first(&mut self.aside) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ctx.shard.borrow_mut().poll_began(self.key, cx.waker());
        let poll = self.poll_once(cx);
        if poll.is_pending() {
            let mut shard = self.ctx.shard.borrow_mut();
            shard.poll_ended(self.key);
            // A close the shard came to owe after `close_if_owed` looked (a
            // keep-alive ping that made the connection a slow consumer, a
            // take that found it one) would have woken the driver; it acts
            // on it in its next poll.
            if self.link.is_open() && shard.owed_close(self.key).is_some() {
                cx.waker().wake_by_ref();
            }
        }
        poll
    }

    /// One pass: read, act, check deadlines, write, park when idle long
    /// enough. Ready when the connection is done or parked.
    fn poll_once(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let ctx = self.ctx.clone();
        let now = ctx.global.clock.epoch_ms();
        let mono = ctx.global.clock.mono_ms();

        let mut exhausted = false;
        if !self.link.peer_closed() && !self.link.is_done() {
            exhausted = self.poll_reads(cx, now, mono);
        }
        // After reading, so a verification started just now registers its waker.
        let who = Who { ctx: &ctx, key: self.key, id: self.id, ip: self.ip() };
        if let Some(close) = self.client.poll_auth(&who, cx, now) {
            self.close_for(close);
        }
        self.close_if_owed(mono);
        self.check_deadlines(now, mono);
        if !self.link.is_done() {
            if let Err(e) = self.poll_flush(cx) {
                tracing::debug!(conn = self.id, error = %e, "write failed");
                self.link.end();
            }
        }
        if self.inflight.is_done() && ctx.shard.borrow().is_flushed(self.key) {
            self.link.flushed();
        }
        if self.link.is_done() {
            return Poll::Ready(());
        }
        self.schedule_deadline(now, mono);
        if exhausted {
            cx.waker().wake_by_ref(); // more to read: come back after others ran
            return Poll::Pending;
        }
        if let Some(idle_ms) = ctx.parker.idle_ms() {
            if self.parkable() {
                let due = self.last_input_ms + idle_ms;
                if mono >= due {
                    if self.park() {
                        return Poll::Ready(());
                    }
                } else {
                    let mut shard = ctx.shard.borrow_mut();
                    let deadline = shard.deadline(self.key).min(due);
                    shard.set_deadline(self.key, deadline);
                }
            }
        }
        Poll::Pending
    }

    /// Reads and handles input; returns true when the budget ran out.
    fn poll_reads(&mut self, cx: &mut Context<'_>, now: u64, mono: u64) -> bool {
        for _ in 0..READ_BUDGET {
            let outcome = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let read = match self.ring_reads {
                    true => self.ring_read(cx, &mut s[..]),
                    false => Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, &mut s[..]),
                };
                match read {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Some(false),
                    Poll::Ready(Ok(n)) => {
                        self.last_input_ms = mono;
                        self.on_bytes(&mut s[..n], now, mono);
                        Some(true)
                    }
                    Poll::Pending => None,
                }
            });
            match outcome {
                None => return false,
                Some(false) => {
                    // EOF or reset: nobody to write to any more.
                    self.link.end();
                    return false;
                }
                Some(true) if self.link.peer_closed() || self.link.is_done() => return false,
                Some(true) => {}
            }
        }
        true
    }

    /// Reads the plain socket when its watch fired since the last read (or
    /// none is armed); Pending until then, and when it held nothing after
    /// all. A short read took everything there: whatever arrives later
    /// fires the watch again.
    fn ring_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if !self.ctx.shard.borrow_mut().take_readable(self.key) {
            return Poll::Pending;
        }
        let read = match &*self.stream.borrow() {
            Stream::Plain(tcp) => crate::sys::recv_nonblocking(crate::sys::tcp_fd(tcp), buf),
            Stream::Tls(_) => return Poll::Pending, // not reached: TLS reads through glommio
        };
        match read {
            Ok(n) if n == buf.len() => {
                self.ctx.shard.borrow_mut().mark_readable(self.key); // there may be more
                Poll::Ready(Ok(n))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.ctx.shard.borrow_mut().mark_readable(self.key); // read again next poll
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.rearm(cx);
                Poll::Pending
            }
            r => {
                if matches!(r, Ok(n) if n > 0) {
                    self.rearm(cx);
                }
                Poll::Ready(r)
            }
        }
    }

    /// Arms the socket's watch again if it ended (the kernel ends one whose
    /// completion found the ring's queue full); after a watch the kernel
    /// failed, or without a new one, the connection reads through glommio
    /// from now on.
    fn rearm(&mut self, cx: &mut Context<'_>) {
        if self.ctx.shard.borrow().watch(self.key) != 0 {
            return;
        }
        if self.ctx.shard.borrow_mut().take_watch_failed(self.key) || !self.watch() {
            self.ring_reads = false;
            cx.waker().wake_by_ref(); // glommio's read registers the waker
        }
    }

    /// Feeds received bytes through the link; each text message goes to
    /// the client, and whatever must close the connection closes it.
    fn on_bytes(&mut self, data: &mut [u8], now: u64, mono: u64) {
        let ctx = self.ctx.clone();
        let who = Who { ctx: &ctx, key: self.key, id: self.id, ip: self.ip() };
        let client = &mut self.client;
        let mut close = None;
        let cause = self.link.receive(data, mono, &ctx.frame_limits, |msg| {
            match msg {
                Data::Text(text) => close = client.on_text(&who, text, now),
                Data::Ping(payload) => {
                    let mut pong = Vec::with_capacity(payload.len() + 2);
                    Link::pong(payload, &mut pong);
                    ctx.shard.borrow_mut().queue(who.key, &pong);
                }
                Data::Binary(_) => {} // refused by the frame limits: never handed out
            }
            close.is_none()
        });
        if let Some(close) = close {
            self.close_for(close);
        }
        match cause {
            Some(CloseCause::Violation(code)) => {
                ctx.stats.protocol_closes.inc();
                self.close_for(Close { code, why: "frame-level protocol violation".into() });
            }
            // The peer closed first: answered with its code, not logged.
            Some(CloseCause::PeerClosed(code)) => self.begin_close(code, code.reason(), None),
            None => {}
        }
    }

    /// Closes as the shard says it must: slow consumer, shutdown.
    fn close_if_owed(&mut self, mono: u64) {
        if !self.link.is_open() {
            return;
        }
        let owed = self.ctx.shard.borrow().owed_close(self.key);
        if owed == Some(CloseCode::SLOW_CONSUMER) {
            self.ctx.stats.slow_consumer_closes.inc();
            self.inflight.drop_unwritten_frames();
            let why = "unsent output over WS_MAX_BUFFERED_BYTES: backlog dropped";
            self.close_for(Close { code: CloseCode::SLOW_CONSUMER, why: why.into() });
        } else if owed == Some(CloseCode::GOING_AWAY) {
            // Tells the client when to come back, spread at random so that
            // thousands of clients do not all reconnect at once.
            let reason = format!(r#"{{"reconnect":true,"retryAfterMs":{}}}"#, self.ctx.reconnect_after_ms());
            let deadline = self.ctx.shutdown_deadline_ms().max(mono);
            self.begin_close(CloseCode::GOING_AWAY, &reason, Some(deadline));
        }
    }

    fn check_deadlines(&mut self, now: u64, mono: u64) {
        if self.link.is_open() {
            let ctx = self.ctx.clone();
            let who = Who { ctx: &ctx, key: self.key, id: self.id, ip: self.ip() };
            if let Some(close) = self.client.on_deadline(&who, now) {
                self.close_for(close);
                return;
            }
        }
        match self.link.check(mono) {
            Due::Nothing | Due::CloseTimedOut => {}
            Due::Ping(frame) => {
                self.ctx.shard.borrow_mut().queue(self.key, &frame);
            }
            Due::PeerSilent => {
                self.ctx.stats.pong_timeouts.inc();
                self.log_close(None, "no frame within WS_PONG_TIMEOUT of a ping: TCP connection dropped");
            }
        }
    }

    /// The client's IP (the unspecified address only while handing the
    /// connection to the parker, when it has no admission).
    fn ip(&self) -> IpAddr {
        self.admission.as_ref().map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), Admission::ip)
    }

    /// Closes on the server's initiative, with one log line (within the
    /// shard's log budget) saying why.
    fn close_for(&mut self, close: Close) {
        if self.link.is_open() {
            self.log_close(Some(close.code), &close.why);
        }
        self.begin_close(close.code, close.code.reason(), None);
    }

    /// The log line of a close by the server (`code` None: the TCP
    /// connection is dropped without a close frame).
    fn log_close(&self, code: Option<CloseCode>, why: &str) {
        if let Some(suppressed) = self.ctx.conn_log.allow(std::time::Instant::now(), &self.ctx.stats) {
            tracing::info!(
                conn = self.id,
                ip = %self.ip(),
                instance = %self.ctx.global.instance_id,
                user = self.client.user(),
                code = code.map(|c| c.0),
                reason = why,
                suppressed,
                "connection closed by the server"
            );
        }
    }

    /// Queues our close frame after everything already queued (with
    /// `reason`), stops further updates, and waits for the peer's until
    /// `deadline_ms` (default: the link's close grace).
    fn begin_close(&mut self, code: CloseCode, reason: &str, deadline_ms: Option<u64>) {
        let frame = match deadline_ms {
            Some(deadline) => self.link.close_by(code, reason, deadline),
            None => self.link.close(code, reason, self.ctx.global.clock.mono_ms()),
        };
        let Some(frame) = frame else { return };
        self.client.close();
        self.close_code = Some(code);
        self.ctx.shard.borrow_mut().queue_close(self.key, &frame);
    }

    /// Writes what is queued: the buffer in flight first, then everything
    /// the shard queued since, taken over in one piece.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.inflight.is_done() {
                let more = self.ctx.shard.borrow_mut().take_for_driver(self.key, &mut self.inflight);
                if !more {
                    // TLS may hold encrypted bytes the socket did not take yet.
                    return match Pin::new(&mut *self.stream.borrow_mut()).poll_flush(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => Ok(()),
                    };
                }
            }
            let written = Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, self.inflight.unwritten());
            match written {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.inflight.wrote(n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    let left = self.inflight.unwritten().len();
                    self.ctx.shard.borrow_mut().driver_holds(self.key, left);
                    return Ok(());
                }
            }
        }
    }

    /// Tells the shard's tick when this connection next has timed work.
    fn schedule_deadline(&mut self, now: u64, mono: u64) {
        let session = match self.link.is_open() {
            true => self.client.deadline_ms().map_or(u64::MAX, |d| mono + d.saturating_sub(now)),
            false => u64::MAX,
        };
        let next = session.min(self.link.deadline_ms());
        self.ctx.shard.borrow_mut().set_deadline(self.key, next);
    }

    /// Whether only the socket, the deadlines and the fan-out can need this
    /// connection now: open, plain TCP, nothing read but not handled,
    /// nothing to write, no verification or pong owed.
    fn parkable(&self) -> bool {
        self.link.is_idle()
            && self.client.is_idle()
            && self.inflight.is_empty()
            && self.ring_reads
            && self.ctx.shard.borrow().is_quiet(self.key)
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
                self.ctx.parker.refused(&self.ctx, self.id, &format_args!("duplicating its socket failed: {e}"));
                return false;
            }
        };
        let Some(admission) = self.admission.take() else {
            return false; // not reached: only a parked connection has none
        };
        let (next_ping_ms, ping_sent) = self.link.ping_state();
        let client = std::mem::replace(&mut self.client, Client::new(Session::new(0, self.ctx.timers)));
        let parked = Parked {
            id: self.id,
            client: client.store(),
            next_ping_ms,
            ping_sent_ms: ping_sent.unwrap_or(u64::MAX),
            admission: admission.park(),
        };
        match self.ctx.parker.park(&self.ctx, self.key, parked, fd) {
            None => {
                self.parked = true;
                true
            }
            Some(parked) => {
                self.client = Client::resume(parked.client, &self.ctx);
                self.admission = Some(Admission::resume(&self.ctx.global.limits, parked.admission));
                false
            }
        }
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
        self.ctx.parker.unwatch(&self.ctx, self.key);
        self.ctx.shard.borrow_mut().remove(self.key);
        self.ctx.stats.connections_active.sub(1);
        self.client.release(&self.ctx);
        if let Some(cluster) = &self.ctx.global.cluster {
            cluster.event(RegistryEvent::Close { id: self.id });
        }
        tracing::debug!(conn = self.id, code = self.close_code.map(|c| c.0), "connection closed");
    }
}
