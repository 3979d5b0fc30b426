//! One partition's shared scan for replays, sans-IO.
//!
//! Owns: which requests a scan serves and what each gets. A scan reads a
//! partition once, from the lowest first offset its requests want to the
//! partition's end as it was when the last of them joined, and hands each
//! request its user's updates past its position. Requests that arrive
//! while the scan runs join it if it has not passed their first offset;
//! the others wait for the next scan. Requests gather for a moment before
//! a scan starts ([`Waiting`]), so a reconnect storm's requests share one.
//!
//! The worker (`worker.rs`) does the reading; this only decides.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Outcome, Request};
use crate::shard::inbox::Update;

/// A scan starts once no request for its partition arrived for this long
/// (or the oldest has waited a quarter of `WS_RECOVERY_TIMEOUT_MS`). A
/// reconnect storm arrives in bursts (clients connect a few hundred at a
/// time): at 20 ms the bursts' gaps started a scan each, and the 5,000-client
/// storm of `perf/resume.sh` read its range 28 times over; at 200 ms, 1.8.
/// A lone resume waits this long more for its answer.
pub const GATHER: Duration = Duration::from_millis(200);

/// Requests waiting for a partition's next scan.
#[derive(Debug, Default)]
pub struct Waiting {
    pub requests: Vec<Request>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Waiting {
    pub fn push(&mut self, req: Request, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.requests.push(req);
    }

    /// Whether a scan should start: quiet for [`GATHER`], or the oldest has
    /// waited `max_wait` (a storm that goes on).
    pub fn due(&self, now: Instant, max_wait: Duration) -> bool {
        match (self.first, self.last) {
            (Some(first), Some(last)) => now >= last + GATHER || now >= first + max_wait,
            _ => false,
        }
    }

    pub fn take(&mut self) -> Vec<Request> {
        self.first = None;
        self.last = None;
        std::mem::take(&mut self.requests)
    }

    /// Settles the requests past their deadline.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(Request, Outcome)>) {
        let mut i = 0;
        while i < self.requests.len() {
            if self.requests[i].deadline <= now {
                out.push((self.requests.swap_remove(i), Outcome::Timeout));
            } else {
                i += 1;
            }
        }
        if self.requests.is_empty() {
            self.first = None;
            self.last = None;
        }
    }
}

/// The first offset a request wants.
fn first(req: &Request) -> i64 {
    req.since.1.saturating_add(1)
}

struct Member {
    req: Request,
    updates: Vec<Arc<Update>>,
}

/// A scan in progress over `[next, end)`.
pub struct Scan {
    /// The next offset to read.
    pub next: i64,
    /// Where the scan ends (exclusive): the partition's end when read.
    pub end: i64,
    /// The first retained offset when the scan started.
    low: i64,
    /// A request joined after `end` was read: read it again before ending.
    pub requery: bool,
    /// The end was read again once: no more joiners (a scan must not chase
    /// the partition's head while a storm keeps joining it).
    closed: bool,
    /// By user: every replay in the scan of that user's updates.
    members: HashMap<Arc<str>, Vec<Member>>,
    count: usize,
    max_messages: usize,
}

impl Scan {
    /// A scan of `reqs` over the partition's retained `[low, high)`; the
    /// requests that need no read are settled into `out`. None when none
    /// is left to read for.
    pub fn start(
        reqs: Vec<Request>,
        low: i64,
        high: i64,
        max_messages: usize,
        out: &mut Vec<(Request, Outcome)>,
    ) -> Option<Scan> {
        let mut scan = Scan {
            next: i64::MAX,
            end: high,
            low,
            requery: false,
            closed: false,
            members: HashMap::new(),
            count: 0,
            max_messages,
        };
        for req in reqs {
            let f = first(&req);
            if f < low {
                out.push((req, Outcome::Trimmed));
            } else if f > high {
                out.push((req, Outcome::BeyondEnd));
            } else if f == high {
                out.push((req, Outcome::Replayed { updates: Vec::new(), end: high }));
            } else {
                scan.next = scan.next.min(f);
                scan.add(req);
            }
        }
        (scan.count > 0).then_some(scan)
    }

    fn add(&mut self, req: Request) {
        self.count += 1;
        self.members.entry(req.user.clone()).or_default().push(Member { req, updates: Vec::new() });
    }

    /// Takes `req` into the running scan when it has not passed the
    /// request's first offset (nor is that beyond the end it knows) and
    /// its end was not read again yet; else gives it back (for the next
    /// scan).
    pub fn join(&mut self, req: Request) -> Result<(), Request> {
        let f = first(&req);
        if self.closed || f < self.next || f < self.low || f > self.end {
            return Err(req);
        }
        self.requery = true;
        self.add(req);
        Ok(())
    }

    /// The message at `offset` belongs to `user` (None: not a valid private
    /// update); `update` encodes it, once for all who take it. Requests
    /// past `WS_RECOVERY_MAX_MESSAGES` are settled into `out`.
    pub fn message(
        &mut self,
        offset: i64,
        user: Option<&str>,
        update: impl FnOnce() -> Arc<Update>,
        out: &mut Vec<(Request, Outcome)>,
    ) {
        self.next = self.next.max(offset + 1);
        let Some(members) = user.and_then(|u| self.members.get_mut(u)) else {
            return;
        };
        let mut update = Some(update);
        let mut encoded: Option<Arc<Update>> = None;
        let mut i = 0;
        while i < members.len() {
            let m = &mut members[i];
            if offset < first(&m.req) || offset >= self.end {
                i += 1;
                continue;
            }
            if m.updates.len() >= self.max_messages {
                let m = members.swap_remove(i);
                self.count -= 1;
                out.push((m.req, Outcome::TooMany));
                continue;
            }
            let u = encoded.get_or_insert_with(|| (update.take().expect("encoded once"))()).clone();
            m.updates.push(u);
            i += 1;
        }
        if members.is_empty() {
            self.members.retain(|_, v| !v.is_empty());
        }
    }

    /// The consumer's position moved to `next` (offsets below it that never
    /// came were not messages: transaction markers, compacted away).
    pub fn reached(&mut self, next: i64) {
        self.next = self.next.max(next);
    }

    /// Read to its end, and no request joined since the end was read.
    pub fn complete(&self) -> bool {
        self.next >= self.end && !self.requery
    }

    /// The partition's end read again for the requests that joined; the
    /// scan takes no more.
    pub fn extend(&mut self, high: i64) {
        self.end = self.end.max(high);
        self.requery = false;
        self.closed = true;
    }

    /// No request left to serve.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Settles every request: complete replays.
    pub fn finish(self, out: &mut Vec<(Request, Outcome)>) {
        let end = self.end;
        for m in self.members.into_values().flatten() {
            out.push((m.req, Outcome::Replayed { updates: m.updates, end }));
        }
    }

    /// Settles the requests past their deadline.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(Request, Outcome)>) {
        for members in self.members.values_mut() {
            let mut i = 0;
            while i < members.len() {
                if members[i].req.deadline <= now {
                    out.push((members.swap_remove(i).req, Outcome::Timeout));
                    self.count -= 1;
                } else {
                    i += 1;
                }
            }
        }
        self.members.retain(|_, v| !v.is_empty());
    }

    /// Settles every request with `outcome` (the partition cannot be read).
    pub fn abandon(self, outcome: impl Fn() -> Outcome, out: &mut Vec<(Request, Outcome)>) {
        for m in self.members.into_values().flatten() {
            out.push((m.req, outcome()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::Channel;
    use crate::shard::inbox::Route;

    fn req(user: &str, since: i64, ticket: u64) -> Request {
        Request {
            shard: 0,
            ticket,
            channel: Channel::Orders,
            user: user.into(),
            since: (0, since),
            deadline: Instant::now() + Duration::from_secs(60),
        }
    }

    fn update(offset: i64) -> Arc<Update> {
        let route = Route::User { channel: Channel::Orders, user: "x".into() };
        Arc::new(Update::encode_at(route, "u", 0, Some((0, offset)), b"{}"))
    }

    fn offsets(outcome: &Outcome) -> Vec<i64> {
        match outcome {
            Outcome::Replayed { updates, .. } => updates.iter().map(|u| u.pos.expect("pos").1).collect(),
            other => panic!("not replayed: {other:?}"),
        }
    }

    fn by_key(mut out: Vec<(Request, Outcome)>) -> Vec<(u64, Outcome)> {
        out.sort_by_key(|(r, _)| r.ticket);
        out.into_iter().map(|(r, o)| (r.ticket, o)).collect()
    }

    #[test]
    fn one_read_serves_every_request_from_its_own_position() {
        let mut out = Vec::new();
        // Partition retains [10, 20); a: after 12, b: after 15, c: other user after 9.
        let reqs = vec![req("a", 12, 1), req("b", 15, 2), req("c", 9, 3)];
        let mut scan = Scan::start(reqs, 10, 20, 100, &mut out).expect("something to read");
        assert_eq!(scan.next, 10, "from the lowest first offset");
        let users = ["a", "b", "c", "a", "b", "a", "z", "b", "a", "c"];
        let mut encodes = 0;
        for (i, user) in users.iter().enumerate() {
            let offset = 10 + i as i64;
            scan.message(
                offset,
                Some(user),
                || {
                    encodes += 1;
                    update(offset)
                },
                &mut out,
            );
        }
        assert!(scan.complete());
        scan.finish(&mut out);
        let out = by_key(out);
        assert_eq!(offsets(&out[0].1), [13, 15, 18], "a: its updates after 12");
        assert_eq!(offsets(&out[1].1), [17], "b: after 15 only");
        assert_eq!(offsets(&out[2].1), [12, 19], "c: everything of its own");
        assert_eq!(encodes, 6, "updates nobody wanted were not encoded");
    }

    #[test]
    fn positions_outside_the_retained_log_are_settled_without_a_read() {
        let mut out = Vec::new();
        let reqs = vec![req("a", 5, 1), req("b", 21, 2), req("c", 19, 3), req("d", 9, 4)];
        let scan = Scan::start(reqs, 10, 20, 100, &mut out).expect("d reads");
        assert_eq!(scan.next, 10);
        let out = by_key(out);
        assert!(matches!(out[0], (1, Outcome::Trimmed)), "first wanted 6 < 10: trimmed");
        assert!(matches!(out[1], (2, Outcome::BeyondEnd)), "first wanted 22 > end 20");
        assert!(matches!(&out[2], (3, Outcome::Replayed { updates, end: 20 }) if updates.is_empty()), "up to date");
        assert!(Scan::start(vec![req("a", 19, 1)], 10, 20, 100, &mut Vec::new()).is_none());
    }

    #[test]
    fn the_cap_counts_the_users_updates_and_ends_only_that_replay() {
        let mut out = Vec::new();
        let mut scan = Scan::start(vec![req("a", 0, 1), req("b", 0, 2)], 0, 100, 3, &mut out).unwrap();
        for offset in 1..10 {
            let user = if offset % 2 == 0 { "b" } else { "a" };
            scan.message(offset, Some(user), || update(offset), &mut out);
        }
        // a had 1, 3, 5 then 7 passed the cap; b had 2, 4, 6 then 8.
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|(_, o)| matches!(o, Outcome::TooMany)));
        assert!(scan.is_empty());
    }

    #[test]
    fn a_late_request_joins_only_a_scan_that_has_not_passed_it() {
        let mut out = Vec::new();
        let mut scan = Scan::start(vec![req("a", 9, 1)], 0, 20, 100, &mut out).unwrap();
        for offset in 10..14 {
            scan.message(offset, Some("x"), || update(offset), &mut out);
        }
        assert!(scan.join(req("b", 11, 2)).is_err(), "wants 12, already read");
        assert!(scan.join(req("c", 25, 3)).is_err(), "beyond the end known");
        scan.join(req("d", 13, 4)).expect("wants 14, next");
        for offset in 14..20 {
            scan.message(offset, Some("d"), || update(offset), &mut out);
        }
        assert!(!scan.complete(), "the end is read again for the joiner");
        scan.extend(22);
        assert!(!scan.complete());
        for offset in 20..22 {
            scan.message(offset, Some("d"), || update(offset), &mut out);
        }
        assert!(scan.complete());
        assert!(scan.join(req("e", 21, 5)).is_err(), "extended once: the next joiner waits for the next scan");
        scan.finish(&mut out);
        let out = by_key(out);
        assert_eq!(offsets(&out[1].1), (14..22).collect::<Vec<_>>());
    }

    #[test]
    fn waiting_requests_gather_then_go() {
        let t0 = Instant::now();
        let mut w = Waiting::default();
        assert!(!w.due(t0, Duration::from_secs(1)));
        w.push(req("a", 1, 1), t0);
        assert!(!w.due(t0 + GATHER / 2, Duration::from_secs(1)));
        w.push(req("b", 1, 2), t0 + GATHER / 2);
        assert!(!w.due(t0 + GATHER, Duration::from_secs(1)), "a new arrival restarts the wait");
        assert!(w.due(t0 + GATHER / 2 + GATHER, Duration::from_secs(1)));
        assert!(w.due(t0 + GATHER / 2, GATHER / 2), "a storm that goes on waits at most max_wait");
        assert_eq!(w.take().len(), 2);
    }
}
