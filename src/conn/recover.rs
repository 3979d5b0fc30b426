//! A shard's side of resumes (PROTOCOL.md §12): starting one for a
//! subscribe with `since`, and answering it when its replay comes back,
//! times out, or the client unsubscribes first.
//!
//! Owns: the shard's table of resumes in flight (who asked, with which
//! request id, since when) and the recovery task, which takes the replay
//! thread's results for this shard (`recovery::Hub`) and enforces
//! `WS_RECOVERY_TIMEOUT_MS` itself, so a client is answered in time even
//! if Kafka is stuck. Answering queues, in this order: `subscribed` with
//! `recovered` and `missed`, the replayed updates, then the live updates
//! held meanwhile (`shard/held.rs`) that the replay did not already cover.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::ShardCtx;
use crate::protocol::message::{Channel, Names, Outgoing, Pos, Recovery};
use crate::recovery::{Outcome, Request};
use crate::shard::StepAside;

/// A resume in flight, by its ticket.
pub(super) struct Pending {
    key: usize,
    channel: Channel,
    /// The position the client resumes from.
    since: Pos,
    request_id: Option<Box<str>>,
    started: Instant,
    deadline: Instant,
    /// The shard inbox's drop count when the resume began.
    drops: u64,
}

/// The shard's resumes in flight.
#[derive(Default)]
pub(super) struct Resumes {
    pending: HashMap<u64, Pending>,
}

/// Results the recovery task answers at most per pass before it lets
/// other tasks run if they wait.
const FINISH_BUDGET: usize = 64;

/// How often the recovery task looks for expired resumes while any is in
/// flight (it also wakes on every result).
const EXPIRY_CHECK: Duration = Duration::from_millis(50);

/// Starts a resume of `channel` for connection `key` (already checked:
/// authenticated as `user`, a private channel, a valid position): the
/// channel's live updates are held from now, and the replay is asked for.
/// Returns false when one of that channel is already in flight there.
pub(super) fn begin(
    ctx: &ShardCtx,
    key: usize,
    user: Arc<str>,
    channel: Channel,
    since: Pos,
    request_id: Option<&str>,
) -> bool {
    let drops = ctx.global.publisher.inbox(ctx.id).dropped();
    let Some((ticket, until)) = ctx.shard.borrow_mut().begin_resume(key, channel, since, drops) else {
        return false;
    };
    let started = Instant::now();
    let deadline = started + ctx.global.recovery.timeout;
    let pending = Pending { key, channel, since, request_id: request_id.map(Into::into), started, deadline, drops };
    ctx.resumes.borrow_mut().pending.insert(ticket, pending);
    let req = Request { shard: ctx.id, ticket, channel, user, since, until, deadline };
    if !ctx.global.recovery.request(req) {
        finish(ctx, ticket, Outcome::Busy);
    }
    true
}

/// The client unsubscribes a channel it is resuming: answered now, with
/// `recovered: false` and what was held (before its `unsubscribed`).
pub(super) fn cancel(ctx: &ShardCtx, key: usize, channel: Channel) {
    let ticket = ctx.shard.borrow().resume_ticket(key, channel);
    if let Some(ticket) = ticket {
        finish(ctx, ticket, Outcome::Cancelled);
    }
}

/// Answers the resume with `ticket`, if it is still in flight.
fn finish(ctx: &ShardCtx, ticket: u64, outcome: Outcome) {
    let Some(p) = ctx.resumes.borrow_mut().pending.remove(&ticket) else {
        return; // answered already (timed out, cancelled)
    };
    // A live update the shard's full inbox dropped meanwhile was neither
    // held nor, maybe, replayed: the client is told, not skipped over.
    let dropped = ctx.global.publisher.inbox(ctx.id).dropped() != p.drops;
    let outcome = match outcome {
        Outcome::Replayed { .. } if dropped => Outcome::Dropped,
        other => other,
    };
    let (replay, end) = match &outcome {
        Outcome::Replayed { updates, end } => (&updates[..], Some(*end)),
        _ => (&[][..], None),
    };
    // Nothing at or before what the client has, nor what the replay sent,
    // is delivered again: held updates below the floor are dropped here,
    // and live ones the shard's feed has yet to reach (it may be behind the
    // replay, or behind the client's previous instance) are skipped when
    // they come. A position beyond the partition's end is from another
    // life of the topic: no floor.
    let floor = match (&outcome, end) {
        (_, Some(end)) => Some((p.since.0, end.max(p.since.1.saturating_add(1)))),
        (Outcome::BeyondEnd, None) => None,
        (_, None) => Some((p.since.0, p.since.1.saturating_add(1))),
    };
    let Some(held) = ctx.shard.borrow_mut().end_resume(p.key, p.channel, ticket, floor) else {
        return; // the connection left, or overflowed (counted by the shard)
    };
    let missed = replay.len() as u64;
    ctx.global.recovery.finished(&outcome, missed, p.started.elapsed());
    let recovery = Recovery { recovered: end.is_some(), missed };
    let names = Names::One(p.channel.name());
    let reply =
        Outgoing::Subscribed { names, snapshot: None, recovery: Some(recovery), request_id: p.request_id.as_deref() };
    if !ctx.queue(p.key, &reply) {
        return;
    }
    let covered =
        |pos: Option<Pos>| matches!((pos, floor), (Some((part, off)), Some((fp, end))) if part == fp && off < end);
    let mut shard = ctx.shard.borrow_mut();
    shard.deliver(p.key, replay);
    shard.deliver(p.key, held.iter().filter(|u| !covered(u.pos)));
}

/// Answers the resumes past their deadline; returns whether any is still
/// in flight.
fn expire(ctx: &ShardCtx, now: Instant) -> bool {
    let due: Vec<u64> =
        ctx.resumes.borrow().pending.iter().filter(|(_, p)| p.deadline <= now).map(|(t, _)| *t).collect();
    for ticket in due {
        finish(ctx, ticket, Outcome::Timeout);
    }
    !ctx.resumes.borrow().pending.is_empty()
}

/// The shard's recovery task: runs until dropped.
pub(crate) async fn run(ctx: Rc<ShardCtx>) {
    let hub = ctx.global.recovery.clone();
    let returns = hub.returns(ctx.id);
    let mut aside = StepAside::default();
    loop {
        ctx.after_fanout(&mut aside).await;
        // A budget per pass: a scan answers thousands of resumes at once,
        // and queueing their replays must not hold the core (and the
        // fan-out) in one poll.
        for _ in 0..FINISH_BUDGET {
            let Some(done) = returns.pop() else { break };
            finish(&ctx, done.ticket, done.outcome);
        }
        if !returns.is_empty() {
            glommio::yield_if_needed().await;
            continue;
        }
        let in_flight = expire(&ctx, Instant::now());
        let mut timer = in_flight.then(|| glommio::timer::Timer::new(EXPIRY_CHECK));
        std::future::poll_fn(|cx| {
            returns.waker.register(cx.waker());
            if !returns.is_empty() {
                return Poll::Ready(());
            }
            match timer.as_mut() {
                Some(t) => Pin::new(t).poll(cx).map(|_| ()),
                None => Poll::Pending,
            }
        })
        .await;
    }
}
