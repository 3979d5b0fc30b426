//! The per-core runtime: what runs on each shard's core, from start to
//! shutdown.
//!
//! Owns `run_shard`, the main task of one pinned executor: it binds the
//! shard's listener, then runs the shard's tasks side by side (the accept
//! loop, the parker and the recovery task from `conn/`, the fan-out and the tick from
//! `shard/`), and on shutdown stops accepting, closes every connection with
//! 1001 in batches, and waits up to `SHUTDOWN_GRACE_MS` for the close
//! handshakes. It sits above `conn/` and `shard/` and composes them; neither
//! of those knows it.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::spawn_local;

use crate::conn::{accept, run_parker, run_recoveries, ShardCtx};
use crate::global::Global;
use crate::shard::{pacing, run_fanout, run_tick, tick_for, Pacing};

/// A shard's main task: listen, serve, and drain on shutdown.
pub async fn run_shard(
    global: Arc<Global>,
    id: usize,
    addr: SocketAddr,
    ready: crossbeam::channel::Sender<Result<(), String>>,
) {
    let listener = match accept::bind(addr) {
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
    let accepting = spawn_local(accept::accept_loop(listener, ctx.clone()));
    let publisher = global.publisher.clone();
    let shard = ctx.shard.clone();
    let pacing = Pacing {
        fixed: global.config.ws_bench_flush_interval_us,
        adaptive: global.config.ws_coalesce_max_ms / pacing::MAX_STRETCH,
        busy_pct: global.config.ws_bench_sweep_share_pct,
    };
    let precedence = ctx.precedence.clone();
    let fanout = spawn_local(async move { run_fanout(shard, publisher.inbox(id), pacing, &precedence).await });
    let cfg = &global.config;
    let every = tick_for(&[cfg.ws_ping_interval, cfg.ws_pong_timeout, cfg.auth_timeout_ms]);
    let tick = spawn_local(run_tick(ctx.shard.clone(), global.clock.clone(), every));
    let parker = spawn_local(run_parker(ctx.clone()));
    let recoveries = spawn_local(run_recoveries(ctx.clone()));

    std::future::poll_fn(|cx| {
        global.stop_wakers[id].register(cx.waker());
        if global.is_shutting_down() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;

    drop(accepting); // cancels the accept loop and closes this shard's listener
    global.listening.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    let grace = global.config.shutdown_grace_ms;
    let deadline = Instant::now() + grace;
    ctx.set_shutdown_deadline(global.clock.mono_ms() + grace.as_millis() as u64);
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
    drop(recoveries);
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
