//! The shard's fan-out task: the only code of the shard that touches
//! glommio or time. It drains the inbox in budgeted batches (each update
//! queued for its subscribers by [`Shard::fanout`]), starts sweeps as
//! [`Pacing`] allows, writes them a step at a time with the inbox drained
//! between steps (so a frame waits about one sweep at most), and sleeps on
//! the inbox's waker when there is nothing to do.
//!
//! Also [`Precedence`]: how the shard's other tasks let the fan-out go
//! first when it is ready to run.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::inbox::Inbox;
use super::pacing::{self, Pacing};
use super::sweep::FLUSH_CHUNK;
use super::Shard;

/// Updates a fan-out pass takes from the inbox before yielding.
const FANOUT_BUDGET: usize = 256;

/// The fan-out goes first. A shard's tasks share one glommio queue and
/// run in the order they were woken, so in a connect or resume storm a
/// woken fan-out would wait behind every set-up, message and close queued
/// before it: hundreds of milliseconds of a saturated core. Instead, a
/// connection task (and the accept loop, and the recovery task) asks
/// [`Precedence::step_aside`] before it works; while the fan-out is ready
/// to run, it wakes itself and returns, which queues it behind the
/// fan-out. A task steps aside at most once in a row, so it always
/// advances: the fan-out runs before the work that was queued ahead of
/// it, then that work runs. Stepping aside costs a poll.
///
/// A fan-out waiting on its inbox or its sweep timer is not queued: the
/// ingest thread's wake reaches glommio's queue only at the executor's
/// next I/O poll, which a busy queue puts off, and a timer fires only
/// then too. So the first task that finds updates in the inbox while it
/// waits wakes it from this thread, which queues it at once, ahead of
/// that task (a wait for the sweep timer ends then too: the updates are
/// taken, the sweep still waits for its time).
pub struct Precedence {
    /// The fan-out's waker while it waits (on its inbox or its timer).
    waiting: RefCell<Option<std::task::Waker>>,
    /// The fan-out yielded with work left (mid-sweep, or over its budget).
    yielded: Cell<bool>,
    /// When the paced sweep it sleeps for is due (coarse monotonic ms;
    /// `u64::MAX` when it is not sleeping for one).
    sweep_due_ms: Cell<u64>,
}

/// A task's record for [`Precedence::step_aside`]: whether it stepped
/// aside when it last asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepAside(bool);

impl Default for Precedence {
    fn default() -> Self {
        Self { waiting: RefCell::new(None), yielded: Cell::new(false), sweep_due_ms: Cell::new(u64::MAX) }
    }
}

impl Precedence {
    /// Whether the calling task should let the fan-out run first: it is
    /// ready (updates in the inbox, a sweep under way or due), and the
    /// task did not step aside when it last asked. The caller then wakes
    /// itself and returns `Pending`.
    pub fn step_aside(&self, inbox: &Inbox, mine: &mut StepAside) -> bool {
        if std::mem::take(&mut mine.0) {
            return false;
        }
        let due = self.sweep_due_ms.get();
        let updates = !inbox.queue.is_empty();
        mine.0 = self.yielded.get() || updates || (due != u64::MAX && crate::sys::coarse_monotonic_ms() >= due);
        if updates {
            // Its waits end when the inbox has updates (a timer ends by itself).
            if let Some(fanout) = self.waiting.borrow_mut().take() {
                fanout.wake();
            }
        }
        mine.0
    }

    fn begin_pass(&self) {
        self.waiting.borrow_mut().take();
        self.yielded.set(false);
        self.sweep_due_ms.set(u64::MAX);
    }

    /// The fan-out waits (not queued) until `cx` is woken.
    fn wait(&self, cx: &std::task::Context<'_>) {
        let mut waiting = self.waiting.borrow_mut();
        match &*waiting {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waiting = Some(cx.waker().clone()),
        }
    }
}

/// Runs until dropped.
pub async fn run_fanout(shard: Rc<RefCell<Shard>>, inbox: &Inbox, pacing: Pacing, precedence: &Precedence) {
    let mut last_sweep = Instant::now();
    let mut saturated = false;
    // Running average of how long sweeps take: this task's own time from
    // the start to the last write.
    let mut sweep_avg = Duration::ZERO;
    // This task's time in the sweep under way, over the passes before this.
    let mut sweep_busy = Duration::ZERO;
    loop {
        precedence.begin_pass();
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
            precedence.yielded.set(true);
            glommio::yield_if_needed().await;
            continue;
        }
        if shard.borrow().has_dirty() {
            // Frames are waiting for the next sweep: sleep until it is due
            // (updates arriving meanwhile join the same writes).
            let due = pacing.interval(saturated, sweep_avg).saturating_sub(last_sweep.elapsed());
            precedence.sweep_due_ms.set(crate::sys::coarse_monotonic_ms() + due.as_millis() as u64);
            let mut timer = glommio::timer::Timer::new(due);
            std::future::poll_fn(|cx| {
                if std::pin::Pin::new(&mut timer).poll(cx).is_ready() || !inbox.queue.is_empty() {
                    return std::task::Poll::Ready(());
                }
                precedence.wait(cx);
                std::task::Poll::Pending
            })
            .await;
            continue;
        }
        std::future::poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            if inbox.queue.is_empty() {
                precedence.wait(cx);
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::inbox::{Route, Update};
    use std::sync::Arc;

    #[test]
    fn tasks_step_aside_while_the_fanout_is_ready_but_never_twice_in_a_row() {
        let (p, inbox) = (Precedence::default(), Inbox::new(4));
        let (mut a, mut b) = (StepAside::default(), StepAside::default());
        assert!(!p.step_aside(&inbox, &mut a), "nothing for the fan-out to do");

        inbox.queue.push(Arc::new(Update::encode(Route::Prices, "u1", 0, b"{}"))).unwrap();
        assert!(p.step_aside(&inbox, &mut a), "updates waiting: the fan-out goes first");
        assert!(p.step_aside(&inbox, &mut b), "every task steps aside once");
        assert!(!p.step_aside(&inbox, &mut a), "then it works, even if the fan-out has not run");
        assert!(p.step_aside(&inbox, &mut a), "and steps aside again on its next turn");

        inbox.queue.pop();
        p.begin_pass();
        assert!(!p.step_aside(&inbox, &mut b));
        assert!(!p.step_aside(&inbox, &mut b), "inbox empty, nothing under way");
        p.yielded.set(true);
        assert!(p.step_aside(&inbox, &mut b), "a sweep under way");
        p.begin_pass();
        p.sweep_due_ms.set(crate::sys::coarse_monotonic_ms() + 60_000);
        assert!(!p.step_aside(&inbox, &mut b), "a paced sweep not yet due");
        p.sweep_due_ms.set(crate::sys::coarse_monotonic_ms());
        assert!(p.step_aside(&inbox, &mut b), "a paced sweep due");
    }

    #[test]
    fn a_waiting_fanout_is_woken_by_the_first_task_that_finds_updates() {
        let (p, inbox) = (Precedence::default(), Inbox::new(4));
        let (waker, count) = crate::shard::tests::Wakes::waker();
        let woken = || count.get();
        p.wait(&std::task::Context::from_waker(&waker));
        assert!(!p.step_aside(&inbox, &mut StepAside::default()));
        assert_eq!(woken(), 0, "no updates: it waits on");

        inbox.queue.push(Arc::new(Update::encode(Route::Prices, "u1", 0, b"{}"))).unwrap();
        assert!(p.step_aside(&inbox, &mut StepAside::default()));
        assert_eq!(woken(), 1, "updates: woken from this thread");
        assert!(p.step_aside(&inbox, &mut StepAside::default()));
        assert_eq!(woken(), 1, "once: it is queued now");

        p.begin_pass();
        p.wait(&std::task::Context::from_waker(&waker));
        p.begin_pass();
        assert!(p.step_aside(&inbox, &mut StepAside::default()));
        assert_eq!(woken(), 1, "a pass under way: it is not waiting");
    }
}
