//! Per-shard runtime: the shard's main task, the accept loop, and what every
//! connection driver on the shard shares ([`ShardCtx`]).
//!
//! Owns: binding this shard's SO_REUSEPORT listener and accepting from it
//! (`accept4` until empty, then a one-shot poll on a small io_uring of its
//! own; see `accept_loop`), spawning one task per accepted socket
//! (`upgrade.rs` for the HTTP phase and TLS via `stream.rs`; `driver.rs`
//! and `messages.rs` for the WebSocket phase),
//! the coarse deadline tick (which also hands memory freed by parked
//! connections back to the kernel), the parker task (`park.rs`), and the
//! shard's part of the
//! shutdown sequence (stop accepting, close every connection with 1001, wait
//! up to `SHUTDOWN_GRACE_MS`).

mod driver;
mod messages;
mod park;
mod upgrade;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::spawn_local;

use crate::protocol::frame;
use crate::protocol::message::{encode_outgoing, Outgoing};
use crate::protocol::session::SessionTimers;
use crate::server::Global;
use crate::shard::{run_fanout, Pacing, Shard};
use crate::telemetry::{sent_index, LogBudget, LogLimiter, ShardStats};

/// Everything a connection task on this shard shares.
pub struct ShardCtx {
    pub id: usize,
    pub global: Arc<Global>,
    pub shard: Rc<RefCell<Shard>>,
    pub stats: Arc<ShardStats>,
    pub frame_limits: frame::Limits,
    pub timers: SessionTimers,
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
}

/// Per-connection log lines a shard writes: this many at once, then
/// [`CONN_LOG_PER_SEC`] a second; the rest are counted.
const CONN_LOG_BURST: u32 = 200;
const CONN_LOG_PER_SEC: u32 = 20;

impl ShardCtx {
    fn new(id: usize, global: Arc<Global>) -> Self {
        let cfg = &global.config;
        let stats = global.stats[id].clone();
        let mut shard = Shard::new(id, cfg.ws_max_buffered_bytes.get(), stats.clone());
        shard.set_clock(global.clock.clone());
        let uring = shard.use_io_uring(cfg.ws_fanout_io == "uring");
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
            timers: SessionTimers {
                auth_timeout_ms: cfg.auth_timeout_ms.as_millis() as u64,
                leeway_ms: cfg.jwt_leeway_seconds * 1000,
                max_subscriptions: cfg.ws_max_subscriptions.get(),
            },
            msg_seq: Cell::new(0),
            conn_seq: Cell::new(0),
            json: RefCell::new(Vec::with_capacity(512)),
            frame: RefCell::new(Vec::with_capacity(512)),
            accept_log: LogLimiter::new(Duration::from_secs(5)),
            conn_log: LogBudget::new(CONN_LOG_PER_SEC, CONN_LOG_BURST),
            shutdown_deadline_ms: Cell::new(0),
            parker: park::Parker::new(id, cfg.ws_park_idle_ms, share),
            global,
        }
    }

    /// A server message id unique within the instance: "s{shard}-{n}".
    fn next_msg_id(&self, buf: &mut itoa::Buffer) -> String {
        let n = self.msg_seq.get() + 1;
        self.msg_seq.set(n);
        let mut id = String::with_capacity(16);
        id.push('s');
        id.push_str(buf.format(self.id));
        id.push('-');
        id.push_str(buf.format(n));
        id
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
        let id = self.next_msg_id(&mut itoa::Buffer::new());
        let now = self.global.clock.epoch_ms();
        encode_outgoing(msg, &id, now, &mut self.json.borrow_mut(), out);
        self.stats.sent[sent_index(msg.type_name())].inc();
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

/// A shard's main task: listen, serve, and drain on shutdown.
pub async fn run_shard(
    global: Arc<Global>,
    id: usize,
    addr: SocketAddr,
    ready: crossbeam::channel::Sender<Result<(), String>>,
) {
    let listener = match bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    global.listening.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let _ = ready.send(Ok(()));
    drop(ready);

    let ctx = Rc::new(ShardCtx::new(id, global.clone()));
    let accept = spawn_local(accept_loop(listener, ctx.clone()));
    let publisher = global.publisher.clone();
    let shard = ctx.shard.clone();
    let pacing = Pacing {
        fixed: global.config.ws_flush_interval_us,
        adaptive: Duration::from_millis(global.config.ws_flush_adaptive_ms),
        busy_pct: global.config.ws_flush_busy_pct,
    };
    let fanout = spawn_local(async move { run_fanout(shard, publisher.inbox(id), pacing).await });
    let tick = spawn_local(tick_loop(ctx.clone()));
    let parker = spawn_local(park::run(ctx.clone()));

    std::future::poll_fn(|cx| {
        global.stop_wakers[id].register(cx.waker());
        if global.is_shutting_down() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;

    drop(accept); // cancels the accept loop and closes this shard's listener
    global.listening.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    let grace = global.config.shutdown_grace_ms;
    let deadline = Instant::now() + grace;
    ctx.shutdown_deadline_ms.set(global.clock.mono_ms() + grace.as_millis() as u64);
    let open = ctx.shard.borrow_mut().begin_shutdown();
    tracing::info!(shard = id, open = open.len(), "shutting down: closing connections with 1001");
    // In batches over the first half of the grace period: a burst of
    // thousands of closes at once would be thousands of reconnects at once
    // (the close reasons spread them further) and one long stall here.
    let (batch, step) = shutdown_pacing(open.len(), grace);
    for (i, keys) in open.chunks(batch).enumerate() {
        if i > 0 {
            glommio::timer::sleep(step).await;
        }
        let mut shard = ctx.shard.borrow_mut();
        for &key in keys {
            shard.shut_down(key);
        }
    }
    while !ctx.shard.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let left = ctx.shard.borrow().len();
    if left > 0 {
        tracing::warn!(shard = id, left, "grace period over: dropping remaining connections");
    }
    drop(fanout);
    drop(tick);
    drop(parker);
}

/// Connections closed together at least, on shutdown.
const SHUTDOWN_MIN_BATCH: usize = 64;
/// Time between shutdown batches.
const SHUTDOWN_STEP: Duration = Duration::from_millis(10);

/// How `open` connections are closed on shutdown: batches of this many,
/// one every returned interval, spread over the first half of the grace
/// period (the rest is for the close handshakes).
fn shutdown_pacing(open: usize, grace: Duration) -> (usize, Duration) {
    let steps = ((grace / 2).as_millis() / SHUTDOWN_STEP.as_millis()).max(1) as usize;
    (open.div_ceil(steps).max(SHUTDOWN_MIN_BATCH), SHUTDOWN_STEP)
}

/// Connections accepted before the accept loop lets other tasks run.
const ACCEPT_BUDGET: usize = 64;

/// This shard's listening socket (`SO_REUSEPORT`, so every shard has its
/// own), non-blocking. `SO_REUSEADDR` too: connections accepted from it
/// inherit the flag, so those still closing after this process exits
/// (FIN_WAIT2, TIME_WAIT) do not fail the next instance's port check.
fn bind(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Accepts connections until the task is dropped. Each wake-up takes every
/// pending connection with one `accept4` each (the peer's address comes
/// with it); then a one-shot poll on a small io_uring of the shard's own
/// waits for the next. glommio's `accept` costs three `fcntl` calls per
/// connection (it switches the listener to non-blocking and back around
/// each call) and the address a `getpeername` more; it is the fallback
/// when the kernel refuses the ring.
async fn accept_loop(listener: socket2::Socket, ctx: Rc<ShardCtx>) {
    let (mut ring, signal) = match crate::sys::PollRing::new(4) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(shard = ctx.id, error = %e, "no poll ring for the listener: glommio accepts");
            return glommio_accept_loop(listener, ctx).await;
        }
    };
    let mut completions = Vec::new();
    loop {
        let mut accepted = 0;
        let mut backoff = false;
        while accepted < ACCEPT_BUDGET {
            match listener.accept() {
                Ok((sock, peer)) => {
                    accepted += 1;
                    let Some(peer) = peer.as_socket() else { continue };
                    let stream = crate::sys::tcp_stream(sock.into());
                    spawn_local(upgrade::serve(stream, peer, ctx.clone())).detach();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    accept_failed(&ctx, &e);
                    backoff = true;
                    break;
                }
            }
        }
        if backoff {
            // Typically EMFILE: the connection stays pending, so back off
            // instead of spinning on a listener that stays readable.
            glommio::timer::sleep(Duration::from_millis(10)).await;
            continue;
        }
        if accepted == ACCEPT_BUDGET {
            glommio::yield_if_needed().await;
            continue;
        }
        // Nothing pending: wait until the listener is readable.
        let waited = match ring.poll_add(std::os::fd::AsFd::as_fd(&listener), 0) {
            Ok(()) => signal.read_at(0, 8).await.map(drop).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        ring.drain(&mut completions);
        completions.clear();
        if let Err(e) = waited {
            accept_failed(&ctx, &e);
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn accept_failed(ctx: &ShardCtx, e: &dyn std::fmt::Display) {
    ctx.stats.accept_failures.inc();
    if let Some(suppressed) = ctx.accept_log.allow() {
        tracing::warn!(shard = ctx.id, error = %e, suppressed, "accept failed");
    }
}

/// glommio's own accept, for a kernel that gave no poll ring.
async fn glommio_accept_loop(listener: socket2::Socket, ctx: Rc<ShardCtx>) {
    if let Err(e) = listener.set_nonblocking(false) {
        accept_failed(&ctx, &e);
        return;
    }
    let listener = crate::sys::glommio_listener(listener.into());
    loop {
        match listener.accept().await {
            Ok(stream) => match stream.peer_addr() {
                Ok(peer) => {
                    spawn_local(upgrade::serve(stream, peer, ctx.clone())).detach();
                }
                Err(e) => accept_failed(&ctx, &e),
            },
            Err(e) => {
                accept_failed(&ctx, &e);
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
        glommio::yield_if_needed().await;
    }
}

/// The coarse shared timer: wakes connections whose deadline passed.
async fn tick_loop(ctx: Rc<ShardCtx>) {
    let cfg = &ctx.global.config;
    let shortest = [cfg.ws_ping_interval, cfg.ws_pong_timeout, cfg.auth_timeout_ms]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_secs(1));
    let tick = (shortest / 8).clamp(Duration::from_millis(5), Duration::from_millis(250));
    let mut parks_seen = ctx.stats.parks.get();
    let mut last_release = Instant::now();
    loop {
        glommio::timer::sleep(tick).await;
        let now = ctx.global.clock.mono_ms();
        ctx.shard.borrow_mut().wake_due(now);
        // Once a second: free the spare outbox buffers nothing needed, and
        // if that or parking freed memory, hand it back to the kernel.
        if last_release.elapsed() >= Duration::from_secs(1) {
            last_release = Instant::now();
            let trimmed = ctx.shard.borrow_mut().trim_spares();
            let parks = ctx.stats.parks.get();
            if parks != parks_seen || trimmed > 0 {
                parks_seen = parks;
                crate::sys::release_free_memory();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_closes_go_out_in_batches_over_half_the_grace_period() {
        let grace = Duration::from_millis(5000);
        // 2.5 s of 10 ms steps: 250 batches at most.
        assert_eq!(shutdown_pacing(10_000, grace), (64, SHUTDOWN_STEP), "small batches are rounded up to 64");
        assert_eq!(shutdown_pacing(50_000, grace), (200, SHUTDOWN_STEP));
        assert_eq!(shutdown_pacing(20, grace).0, 64, "a few connections close together");
        assert_eq!(shutdown_pacing(1000, Duration::from_millis(1)).0, 1000, "no time to spread: all at once");
        let (batch, step) = shutdown_pacing(50_000, grace);
        let batches = 50_000usize.div_ceil(batch) as u32;
        assert!(step * (batches - 1) <= grace / 2, "the last batch leaves half the grace for handshakes");
    }
}
