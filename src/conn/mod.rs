//! The connections of a shard, from accept to close: `accept.rs` (taking
//! sockets off the shard's listener), `upgrade.rs` (the HTTP phase: the
//! endpoints, refusals and the upgrade), `driver.rs` (the WebSocket phase's
//! I/O around the sans-IO link), `client.rs` (messages and authentication)
//! `park.rs` (the shard's poll ring, which watches plain sockets for input,
//! and idle connections held without a task), `recover.rs`
//! (resumes of private channels, PROTOCOL.md §12), and [`ShardCtx`],
//! what every connection task on a shard shares.

pub(crate) mod accept;
mod client;
mod driver;
mod park;
mod recover;
mod upgrade;

pub(crate) use park::run as run_parker;
pub(crate) use recover::run as run_recoveries;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::global::Global;
use crate::protocol::frame;
use crate::protocol::link::LinkTimers;
use crate::protocol::message::{encode_outgoing, Outgoing};
use crate::protocol::session::SessionTimers;
use crate::shard::{Precedence, Shard, StepAside};
use crate::telemetry::{LogBudget, LogLimiter, Sent, ShardStats};

/// Room for a server message id: "s", the shard (a usize, at most 64 bits)
/// and the sequence (a u64), each at most 20 digits, and a dash.
const MSG_ID_LEN: usize = 42;
const _: () = assert!(usize::BITS <= 64);
type MsgId = [u8; MSG_ID_LEN];

/// Everything a connection task on this shard shares.
pub struct ShardCtx {
    pub id: usize,
    pub global: Arc<Global>,
    pub shard: Rc<RefCell<Shard>>,
    pub stats: Arc<ShardStats>,
    pub frame_limits: frame::Limits,
    pub timers: SessionTimers,
    pub link_timers: LinkTimers,
    msg_seq: Cell<u64>,
    conn_seq: Cell<u64>,
    json: RefCell<Vec<u8>>,
    frame: RefCell<Vec<u8>>,
    pub(crate) accept_log: LogLimiter,
    /// Per-connection log lines (refusals, failed authentications, server
    /// closes) on this shard: a burst, then a steady rate.
    pub(crate) conn_log: LogBudget,
    /// Monotonic ms by which every close handshake of a shutdown must end.
    shutdown_deadline_ms: Cell<u64>,
    parker: park::Parker,
    /// Resumes in flight on this shard (`recover.rs`).
    resumes: RefCell<recover::Resumes>,
    /// Lets the fan-out go first (`shard::Precedence`); shared with it.
    pub(crate) precedence: Rc<Precedence>,
}

/// How long our close frame waits for the peer's.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Per-connection log lines a shard writes: this many at once, then
/// [`CONN_LOG_PER_SEC`] a second; the rest are counted.
const CONN_LOG_BURST: u32 = 200;
const CONN_LOG_PER_SEC: u32 = 20;

impl ShardCtx {
    pub(crate) fn new(id: usize, global: Arc<Global>) -> Self {
        let cfg = &global.config;
        let stats = global.stats[id].clone();
        let mut shard = Shard::new(id, cfg.ws_max_buffered_bytes.get(), stats.clone());
        shard.set_clock(global.clock.clone());
        shard.set_max_markets(cfg.ws_max_markets.get());
        let uring = shard.use_io_uring(true);
        let share = cfg.ws_max_connections.get().div_ceil(global.stats.len().max(1));
        shard.reserve(share);
        tracing::debug!(shard = id, io_uring = uring, "fan-out writes");
        Self {
            id,
            shard: Rc::new(RefCell::new(shard)),
            stats,
            frame_limits: frame::Limits {
                max_message_bytes: cfg.ws_max_message_bytes.get(),
                max_fragments: cfg.ws_max_fragments.get(),
                accept_binary: false,
            },
            link_timers: LinkTimers {
                ping_interval_ms: cfg.ws_ping_interval.as_millis() as u64,
                pong_timeout_ms: cfg.ws_pong_timeout.as_millis() as u64,
                close_grace_ms: CLOSE_GRACE.as_millis() as u64,
            },
            timers: SessionTimers {
                auth_timeout_ms: cfg.auth_timeout_ms.as_millis() as u64,
                leeway_ms: cfg.jwt_leeway_seconds.as_millis() as u64,
                max_subscriptions: cfg.ws_max_subscriptions.get(),
            },
            msg_seq: Cell::new(0),
            conn_seq: Cell::new(0),
            json: RefCell::new(Vec::with_capacity(512)),
            frame: RefCell::new(Vec::with_capacity(512)),
            accept_log: LogLimiter::new(Duration::from_secs(5)),
            conn_log: LogBudget::new(CONN_LOG_PER_SEC, CONN_LOG_BURST),
            shutdown_deadline_ms: Cell::new(0),
            parker: park::Parker::new(id, cfg.ws_park_idle_ms.as_millis() as u64, share),
            resumes: RefCell::default(),
            precedence: Rc::default(),
            global,
        }
    }

    /// Whether the calling task should let the fan-out run first
    /// (`shard::Precedence`): it then wakes itself and returns `Pending`.
    fn fanout_first(&self, mine: &mut StepAside) -> bool {
        self.precedence.step_aside(self.global.publisher.inbox(self.id), mine)
    }

    /// Lets the fan-out run first when it is ready (`shard::Precedence`).
    pub(crate) async fn after_fanout(&self, mine: &mut StepAside) {
        if self.fanout_first(mine) {
            futures_lite::future::yield_now().await;
        }
    }

    /// A server message id unique within the instance: "s{shard}-{n}",
    /// written into `id` (no allocation per message).
    fn next_msg_id<'a>(&self, id: &'a mut MsgId) -> &'a str {
        let n = self.msg_seq.get() + 1;
        self.msg_seq.set(n);
        let (mut shard, mut seq) = (itoa::Buffer::new(), itoa::Buffer::new());
        let mut len = 0;
        for part in ["s", shard.format(self.id), "-", seq.format(n)] {
            id[len..len + part.len()].copy_from_slice(part.as_bytes());
            len += part.len();
        }
        std::str::from_utf8(&id[..len]).expect("ASCII digits")
    }

    /// When a client told to go away should come back: random below
    /// `SHUTDOWN_RECONNECT_SPREAD_MS`, so they do not all return at once.
    fn reconnect_after_ms(&self) -> u64 {
        let spread = self.global.config.shutdown_reconnect_spread_ms.as_millis() as u64;
        if spread == 0 {
            0
        } else {
            rand::random_range(0..spread)
        }
    }

    /// When a shutdown's close handshakes must end (monotonic ms).
    pub(crate) fn set_shutdown_deadline(&self, mono_ms: u64) {
        self.shutdown_deadline_ms.set(mono_ms);
    }

    fn shutdown_deadline_ms(&self) -> u64 {
        self.shutdown_deadline_ms.get()
    }

    /// A connection id unique within the instance.
    fn next_conn_id(&self) -> u64 {
        let n = self.conn_seq.get() + 1;
        self.conn_seq.set(n);
        n * self.global.stats.len() as u64 + self.id as u64
    }

    /// Appends `msg` as a frame to `out`, with a fresh id, and counts it.
    fn encode(&self, msg: &Outgoing, out: &mut Vec<u8>) {
        let mut id = [0; MSG_ID_LEN];
        let id = self.next_msg_id(&mut id);
        let now = self.global.clock.epoch_ms();
        encode_outgoing(msg, id, now, &mut self.json.borrow_mut(), out);
        self.stats.sent[Sent::of(msg).index()].inc();
    }

    /// Encodes `msg` and queues it on connection `key`'s outbox.
    /// Returns false when that made the connection a slow consumer.
    fn queue(&self, key: usize, msg: &Outgoing) -> bool {
        let mut frame = self.frame.borrow_mut();
        frame.clear();
        self.encode(msg, &mut frame);
        self.shard.borrow_mut().queue(key, &frame)
    }
}
