//! The shard's fan-out task: the only code of the shard that touches
//! glommio or time. It drains the inbox in budgeted batches (each update
//! queued for its subscribers by [`Shard::fanout`]), starts sweeps as
//! [`Pacing`] allows, writes them a step at a time with the inbox drained
//! between steps (so a frame waits about one sweep at most), and sleeps on
//! the inbox's waker when there is nothing to do.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::inbox::Inbox;
use super::pacing::{self, Pacing};
use super::sweep::FLUSH_CHUNK;
use super::Shard;

/// Updates a fan-out pass takes from the inbox before yielding.
const FANOUT_BUDGET: usize = 256;

/// Runs until dropped.
pub async fn run_fanout(shard: Rc<RefCell<Shard>>, inbox: &Inbox, pacing: Pacing) {
    let mut last_sweep = Instant::now();
    let mut saturated = false;
    // Running average of how long sweeps take: this task's own time from
    // the start to the last write.
    let mut sweep_avg = Duration::ZERO;
    // This task's time in the sweep under way, over the passes before this.
    let mut sweep_busy = Duration::ZERO;
    loop {
        let mut taken = 0;
        let pass = Instant::now();
        let sweeping = {
            let mut shard = shard.borrow_mut();
            let stats = shard.stats.clone();
            let mut hist = stats.fanout_latency_us.lock();
            shard.note_inbox_drops(inbox.dropped());
            while taken < FANOUT_BUDGET {
                let Some(update) = inbox.queue.pop() else {
                    break;
                };
                shard.fanout(&update);
                taken += 1;
                let us = update.published_at.elapsed().as_micros() as u64;
                hist.saturating_record(us.max(1));
            }
            stats.updates_processed.add(taken as u64);
            drop(hist);
            let interval = pacing.interval(saturated, sweep_avg);
            if !shard.sweeping() && shard.has_dirty() && (interval.is_zero() || last_sweep.elapsed() >= interval) {
                shard.begin_sweep();
                last_sweep = Instant::now();
                sweep_busy = Duration::ZERO;
            }
            let done = shard.sweeping() && shard.flush_step(FLUSH_CHUNK);
            if done {
                // Not the wall time: the tasks that ran between its steps
                // (a connect storm's) would make it look saturated, and the
                // pacing would hold every frame back for them.
                let took = sweep_busy + pass.elapsed();
                saturated = pacing.saturated(took, shard.has_dirty());
                sweep_avg = pacing::average(sweep_avg, took);
            }
            shard.sweeping()
        };
        if sweeping {
            sweep_busy += pass.elapsed();
        }
        if sweeping || taken == FANOUT_BUDGET {
            glommio::yield_if_needed().await;
            continue;
        }
        if shard.borrow().has_dirty() {
            // Frames are waiting for the next sweep: sleep until it is due
            // (updates arriving meanwhile join the same writes).
            let due = pacing.interval(saturated, sweep_avg).saturating_sub(last_sweep.elapsed());
            glommio::timer::sleep(due).await;
            continue;
        }
        std::future::poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            if inbox.queue.is_empty() {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
    }
}
