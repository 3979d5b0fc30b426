//! One partition's shared scan for replays, and what scans read, sans-IO.
//!
//! Owns: which requests a scan serves and what each gets, and the
//! partition's [`Window`]: every private update of the offsets scans
//! already read, kept (bounded) so that no resume makes the partition be
//! read twice. A scan reads a partition once, from the lowest first offset
//! its requests want to the furthest end one of them wants (where its
//! shard's feed stood, `Request::until`, else the partition's end read for
//! it), and hands each request its user's updates in its range.
//! A request whose position the window covers is served from it and reads
//! only past it; a scan that starts below the window skips over it
//! ([`Scan::seek`]) when it gets there. Requests that arrive while a scan
//! runs join it if the window covers their first offset or the scan has not
//! passed it; the others wait for the next scan. Requests gather for a
//! moment before a scan starts ([`Waiting`]), so a reconnect storm's
//! requests share one.
//!
//! The worker (`worker.rs`) does the reading and bounds the windows'
//! memory; this only decides.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Outcome, Request};
use crate::shard::inbox::{Route, Update};

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

/// The offset of an update the replay thread framed (it always has one).
fn offset(u: &Update) -> i64 {
    u.pos.map_or(i64::MIN, |p| p.1)
}

fn user_of(u: &Update) -> Option<&str> {
    match &u.route {
        Route::User { user, .. } => Some(user),
        _ => None,
    }
}

/// What a window keeps per update: the frame, the update, and the two
/// queue slots and the user key that point at it.
fn cost(u: &Update) -> usize {
    std::mem::size_of::<Update>() + u.frame.len() + user_of(u).map_or(0, str::len) + 64
}

/// What scans of one partition read: every offset in `[start, end)` was
/// read, and its private updates are here, framed, by offset and by user.
/// A resume whose first offset lies in `[start, end]` is served from it.
#[derive(Debug)]
pub struct Window {
    start: i64,
    end: i64,
    updates: VecDeque<Arc<Update>>,
    by_user: HashMap<Box<str>, VecDeque<Arc<Update>>>,
    bytes: usize,
    /// When it last served a resume or took a read (idle ones are dropped).
    pub used: Instant,
}

impl Window {
    fn new(at: i64, now: Instant) -> Window {
        Window { start: at, end: at, updates: VecDeque::new(), by_user: HashMap::new(), bytes: 0, used: now }
    }

    /// Memory held, by [`cost`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn covers(&self, first: i64) -> bool {
        self.start <= first && first <= self.end
    }

    /// Where what it holds ends (exclusive).
    pub fn end(&self) -> i64 {
        self.end
    }

    /// Answers `req` from what it holds, when it holds all of it (the
    /// request has `until`, and the window covers `[first, until)`);
    /// else gives it back.
    pub fn serve(&mut self, req: Request, max_messages: usize, now: Instant) -> Result<(Request, Outcome), Request> {
        let f = first(&req);
        match req.until {
            Some(until) if self.covers(f) && until <= self.end => {
                self.used = now;
                let updates = self.of_user(&req.user, f, until).cloned().collect();
                Ok(Member::new(req, updates, until, until, max_messages).err().expect("nothing left to read: settled"))
            }
            _ => Err(req),
        }
    }

    /// Records the message at `offset`, the next one read past the end
    /// (`update`: None when it is not a private update).
    fn push(&mut self, offset: i64, update: Option<&Arc<Update>>) {
        debug_assert!(offset >= self.end, "a window grows at its end");
        self.end = offset + 1;
        let Some(u) = update else { return };
        let Some(user) = user_of(u) else { return };
        self.bytes += cost(u);
        self.updates.push_back(u.clone());
        match self.by_user.get_mut(user) {
            Some(q) => q.push_back(u.clone()),
            None => {
                self.by_user.insert(user.into(), VecDeque::from([u.clone()]));
            }
        }
    }

    /// Offsets below `next` that never came as messages were passed.
    fn reach(&mut self, next: i64) {
        self.end = self.end.max(next);
    }

    /// `later` continues this window (it starts at or past the end; the
    /// offsets between were passed).
    fn append(&mut self, later: Window) {
        debug_assert!(later.start >= self.end);
        for u in later.updates {
            self.push(offset(&u), Some(&u));
        }
        self.end = self.end.max(later.end);
    }

    /// `user`'s updates with offsets in `[from, until)`, in order.
    fn of_user<'a>(&'a self, user: &str, from: i64, until: i64) -> impl Iterator<Item = &'a Arc<Update>> + Clone + 'a {
        let q = self.by_user.get(user);
        let i = q.map_or(0, |q| q.partition_point(|u| offset(u) < from));
        q.into_iter().flat_map(move |q| q.range(i..)).take_while(move |u| offset(u) < until)
    }

    /// Drops the oldest updates until at most `bytes` are held; the window
    /// then starts past the last one dropped.
    pub fn trim(&mut self, bytes: usize) {
        while self.bytes > bytes {
            let Some(u) = self.updates.pop_front() else { break };
            self.bytes -= cost(&u);
            self.start = offset(&u) + 1;
            let user = user_of(&u).expect("kept updates are private");
            let q = self.by_user.get_mut(user).expect("indexed by user");
            q.pop_front();
            if q.is_empty() {
                self.by_user.remove(user);
            }
        }
    }
}

/// The offset ranges of one partition this instance has read for
/// replays, to count what is read again (a window dropped or trimmed for
/// memory: `moonx_ws_recovery_reread_total`). At most [`RANGES`] ranges;
/// beyond, the two nearest merge (the gap between then counts as read).
#[derive(Debug, Default)]
pub struct ReadOffsets {
    /// Sorted, disjoint, not adjacent: `[start, end)` each.
    ranges: Vec<(i64, i64)>,
}

/// Ranges kept per partition.
const RANGES: usize = 64;

impl ReadOffsets {
    /// Records that `offset` was read; true if it had been before.
    pub fn read(&mut self, offset: i64) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end < offset);
        match self.ranges.get_mut(i) {
            Some((start, end)) if *start <= offset && offset < *end => return true,
            Some((_, end)) if *end == offset => {
                *end += 1;
                if self.ranges.get(i + 1).is_some_and(|&(next, _)| next == offset + 1) {
                    let (_, e) = self.ranges.remove(i + 1);
                    self.ranges[i].1 = e;
                }
            }
            Some((start, _)) if *start == offset + 1 => *start = offset,
            _ => self.ranges.insert(i, (offset, offset + 1)),
        }
        if self.ranges.len() > RANGES {
            let j = (1..self.ranges.len()).min_by_key(|&j| self.ranges[j].0 - self.ranges[j - 1].1).expect("two");
            let (_, e) = self.ranges.remove(j);
            self.ranges[j - 1].1 = e;
        }
        false
    }
}

struct Member {
    req: Request,
    updates: Vec<Arc<Update>>,
    /// The scan's reads give this member the offsets from here on (below
    /// it, a window served it).
    from: i64,
    /// ...and below this: the request's `until`, else the partition's end
    /// once read ([`PENDING`] until then).
    until: i64,
}

impl Member {
    /// `req`'s replay with `updates` so far (from a window), to be read on
    /// over `[from, until)`; or its outcome when it is settled already
    /// (past the cap, or nothing left to read).
    fn new(
        req: Request,
        updates: Vec<Arc<Update>>,
        from: i64,
        until: i64,
        max_messages: usize,
    ) -> Result<Member, (Request, Outcome)> {
        if updates.len() > max_messages {
            Err((req, Outcome::TooMany))
        } else if from >= until {
            Err((req, Outcome::Replayed { updates, end: until }))
        } else {
            Ok(Member { req, updates, from, until })
        }
    }
}

/// A joiner's end while the partition's end is read again for it.
const PENDING: i64 = i64::MAX;

/// A scan that starts past its partition's window by at most this many
/// offsets reads the gap too, so the window stays one range.
const GAP_READ: i64 = 4096;

/// A scan in progress over `[next, end)`.
pub struct Scan {
    /// Where the scan ends (exclusive): the furthest its requests want.
    pub end: i64,
    /// The first retained offset when the scan started.
    low: i64,
    /// The partition's end when the scan started.
    high: i64,
    /// Joiners are taken until then (later ones wait for the next scan, so
    /// a storm that goes on cannot keep one scan, and who waits behind
    /// it, going).
    pub joinable_until: Option<Instant>,
    /// A request without `until` joined: read the partition's end again
    /// before ending.
    pub requery: bool,
    /// The end was read again once: no more joiners without `until` (a
    /// scan must not chase the partition's head while a storm keeps
    /// joining it).
    closed: bool,
    /// By user: every replay in the scan of that user's updates.
    members: HashMap<Arc<str>, Vec<Member>>,
    count: usize,
    max_messages: usize,
    /// What was read up to the scan's position (it may have begun as an
    /// earlier scan's window): it ends where the scan goes on.
    window: Window,
    /// An earlier window above the scan's position: reaching it, the scan
    /// serves its members from it and goes on past it.
    ahead: Option<Window>,
    /// Where the reader must move to (past a window reached); taken by it.
    pub seek: Option<i64>,
}

impl Scan {
    /// A scan of `reqs` over the partition's retained `[low, high)`, with
    /// what earlier scans read (`prior`); the requests that need no read
    /// are settled into `out` (those `prior` has whole served from it).
    /// Err (with `prior` back) when no request is left.
    pub fn start(
        reqs: Vec<Request>,
        (low, high): (i64, i64),
        mut prior: Option<Window>,
        max_messages: usize,
        now: Instant,
        out: &mut Vec<(Request, Outcome)>,
    ) -> Result<Scan, Option<Window>> {
        let mut members = Vec::new();
        let (mut next, mut end) = (i64::MAX, i64::MIN);
        for req in reqs {
            let f = first(&req);
            let until = req.until.map_or(high, |u| u.min(high));
            if f < low {
                out.push((req, Outcome::Trimmed));
            } else if f > high {
                out.push((req, Outcome::BeyondEnd));
            } else if f >= until {
                out.push((req, Outcome::Replayed { updates: Vec::new(), end: until }));
            } else {
                let (updates, from) = match &prior {
                    Some(w) if w.covers(f) => (w.of_user(&req.user, f, until).cloned().collect(), w.end),
                    _ => (Vec::new(), f),
                };
                match Member::new(req, updates, from, until, max_messages) {
                    Ok(m) => {
                        next = next.min(from);
                        end = end.max(until);
                        members.push(m);
                    }
                    Err(done) => out.push(done),
                }
            }
        }
        if let Some(w) = prior.as_mut() {
            w.used = now;
        }
        if members.is_empty() {
            return Err(prior);
        }
        let (window, ahead) = match prior {
            Some(w) if next < w.start => (Window::new(next, now), Some(w)),
            // Past it by a little (a gap no request wants, read all the
            // same): it grows, and later resumes in the gap find it whole.
            Some(w) if next - w.end <= GAP_READ => (w, None),
            // Far past it: not worth reading the gap for.
            _ => (Window::new(next, now), None),
        };
        let mut scan = Scan {
            end,
            low,
            high,
            joinable_until: None,
            requery: false,
            closed: false,
            members: HashMap::new(),
            count: 0,
            max_messages,
            window,
            ahead,
            seek: None,
        };
        for m in members {
            scan.add(m);
        }
        Ok(scan)
    }

    /// The next offset to read.
    pub fn next(&self) -> i64 {
        self.window.end
    }

    fn add(&mut self, m: Member) {
        self.count += 1;
        self.members.entry(m.req.user.clone()).or_default().push(m);
    }

    /// Takes `req` into the running scan when the window covers its first
    /// offset or the scan has not passed it, while the scan still takes
    /// joiners (`joinable_until`); else gives it back (for the next scan).
    /// A request with nothing to replay (its shard's feed is not past its
    /// position), or that the window serves whole, is answered at once. A
    /// request without `until` joins only if its first offset is within
    /// the end known and the end was not read again yet.
    pub fn join(&mut self, req: Request, now: Instant, out: &mut Vec<(Request, Outcome)>) -> Result<(), Request> {
        let f = first(&req);
        let until = match req.until {
            // Nothing to replay: the shard's feed is not past the position.
            Some(u) if f >= u && f >= self.low && f <= self.high => {
                out.push((req, Outcome::Replayed { updates: Vec::new(), end: u }));
                return Ok(());
            }
            _ if f < self.low || f < self.window.start => return Err(req),
            _ if self.joinable_until.is_some_and(|t| now >= t) => return Err(req),
            Some(u) if f < u => u,
            Some(_) => return Err(req), // beyond the end known: the next scan tells
            None if self.closed || f > self.end => return Err(req),
            None => PENDING,
        };
        let next = self.next();
        let (updates, from) = if f < next {
            self.window.used = now;
            (self.window.of_user(&req.user, f, until).cloned().collect(), next)
        } else {
            (Vec::new(), f)
        };
        match Member::new(req, updates, from, until, self.max_messages) {
            Ok(m) => {
                if until == PENDING {
                    self.requery = true;
                } else {
                    self.end = self.end.max(until);
                }
                self.add(m);
            }
            Err(done) => out.push(done),
        }
        Ok(())
    }

    /// The message at `offset` was read (`update`: None when it is not a
    /// valid private update). Requests past `WS_RECOVERY_MAX_MESSAGES`
    /// are settled into `out`.
    pub fn message(&mut self, offset: i64, update: Option<Arc<Update>>, out: &mut Vec<(Request, Outcome)>) {
        if self.ahead.as_ref().is_some_and(|a| offset >= a.start) {
            self.reach_ahead(out);
        }
        if offset < self.next() {
            return; // read before the skip took effect, or a window has it
        }
        self.window.push(offset, update.as_ref());
        if let Some(user) = update.as_deref().and_then(user_of) {
            if let Some(members) = self.members.get_mut(user) {
                let u = update.as_ref().expect("has a user");
                Self::deliver(members, &mut self.count, self.max_messages, [u].into_iter(), out);
            }
        }
        if self.ahead.as_ref().is_some_and(|a| self.next() >= a.start) {
            // Right below the window: skip before reading any of it.
            self.reach_ahead(out);
        }
    }

    /// Gives `members` (one user's) the `updates` in their `[from, until)`,
    /// settling those past the cap.
    fn deliver<'a>(
        members: &mut Vec<Member>,
        count: &mut usize,
        max: usize,
        updates: impl Iterator<Item = &'a Arc<Update>> + Clone,
        out: &mut Vec<(Request, Outcome)>,
    ) {
        let mut i = 0;
        'members: while i < members.len() {
            let (from, until) = (members[i].from, members[i].until);
            for u in updates.clone().filter(|u| (from..until).contains(&offset(u))) {
                if members[i].updates.len() >= max {
                    let m = members.swap_remove(i);
                    *count -= 1;
                    out.push((m.req, Outcome::TooMany));
                    continue 'members;
                }
                members[i].updates.push(u.clone());
            }
            i += 1;
        }
    }

    /// The reads reached the window above: its updates go to the members,
    /// it continues the scan's own, and the reader skips past it.
    fn reach_ahead(&mut self, out: &mut Vec<(Request, Outcome)>) {
        let Some(ahead) = self.ahead.take() else { return };
        for (user, members) in self.members.iter_mut() {
            let first = members.iter().map(|m| m.from).min().unwrap_or(i64::MAX);
            let updates = ahead.of_user(user, first, i64::MAX);
            Self::deliver(members, &mut self.count, self.max_messages, updates, out);
            for m in members.iter_mut() {
                m.from = m.from.max(ahead.end);
            }
        }
        self.members.retain(|_, v| !v.is_empty());
        self.window.reach(ahead.start);
        self.window.append(ahead);
        self.seek = Some(self.next());
    }

    /// The reader's position moved to `next` (offsets below it that never
    /// came were not messages: transaction markers, compacted away).
    pub fn reached(&mut self, next: i64, out: &mut Vec<(Request, Outcome)>) {
        if self.ahead.as_ref().is_some_and(|a| next >= a.start) {
            self.reach_ahead(out);
        }
        self.window.reach(next);
        if self.seek.is_some_and(|s| next >= s) {
            self.seek = None;
        }
    }

    /// Read to its end, and no request without `until` joined since the
    /// end was read.
    pub fn complete(&self) -> bool {
        self.next() >= self.end && !self.requery
    }

    /// The partition's end read again for the requests that joined without
    /// `until`; the scan takes no more of those.
    pub fn extend(&mut self, high: i64) {
        for m in self.members.values_mut().flatten() {
            if m.until == PENDING {
                m.until = high;
            }
        }
        self.end = self.end.max(high);
        self.requery = false;
        self.closed = true;
    }

    /// Settles the requests the reads have taken to their end (the scan
    /// goes on for the others).
    pub fn settle_passed(&mut self, out: &mut Vec<(Request, Outcome)>) {
        let next = self.next();
        for members in self.members.values_mut() {
            let mut i = 0;
            while i < members.len() {
                if members[i].until <= next {
                    let m = members.swap_remove(i);
                    out.push((m.req, Outcome::Replayed { updates: m.updates, end: m.until }));
                    self.count -= 1;
                } else {
                    i += 1;
                }
            }
        }
        self.members.retain(|_, v| !v.is_empty());
    }

    /// No request left to serve.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Memory held by what the scan read and the window above it.
    pub fn window_bytes(&self) -> usize {
        self.window.bytes + self.ahead.as_ref().map_or(0, |a| a.bytes)
    }

    /// Holds the windows to `bytes` at most, the oldest updates first.
    pub fn trim_window(&mut self, bytes: usize) {
        let ahead = self.ahead.as_ref().map_or(0, |a| a.bytes);
        self.window.trim(bytes.saturating_sub(ahead));
        if let Some(a) = &mut self.ahead {
            a.trim(bytes.saturating_sub(self.window.bytes));
        }
    }

    /// What was read, for the scans after (the window above, when the
    /// reads never reached it).
    pub fn into_window(self) -> Window {
        self.ahead.unwrap_or(self.window)
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
    pub fn abandon(self, outcome: impl Fn() -> Outcome, out: &mut Vec<(Request, Outcome)>) -> Window {
        let Scan { members, window, ahead, .. } = self;
        for m in members.into_values().flatten() {
            out.push((m.req, outcome()));
        }
        ahead.unwrap_or(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::Channel;

    fn req(user: &str, since: i64, ticket: u64) -> Request {
        Request {
            shard: 0,
            ticket,
            channel: Channel::Orders,
            user: user.into(),
            since: (0, since),
            until: None,
            deadline: Instant::now() + Duration::from_secs(60),
        }
    }

    fn update(user: &str, offset: i64) -> Arc<Update> {
        let route = Route::User { channel: Channel::Orders, user: user.into() };
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

    /// Reads `[scan.next(), to)` of a partition whose offset `o` belongs
    /// to `users[o % users.len()]`, as the worker does (skips included);
    /// the offsets actually read.
    fn read(scan: &mut Scan, to: i64, users: &[&str], out: &mut Vec<(Request, Outcome)>) -> Vec<i64> {
        let mut read = Vec::new();
        let mut offset = scan.next();
        while offset < to {
            read.push(offset);
            scan.message(offset, Some(update(users[offset as usize % users.len()], offset)), out);
            offset = scan.seek.take().unwrap_or(offset + 1);
        }
        read
    }

    fn start(
        reqs: Vec<Request>,
        low: i64,
        high: i64,
        prior: Option<Window>,
        out: &mut Vec<(Request, Outcome)>,
    ) -> Scan {
        Scan::start(reqs, (low, high), prior, 100, Instant::now(), out).expect("something to read")
    }

    /// Ends a scan read to its end, as the worker does.
    fn finish(mut scan: Scan, out: &mut Vec<(Request, Outcome)>) -> Window {
        assert!(scan.complete());
        scan.settle_passed(out);
        assert!(scan.is_empty());
        scan.into_window()
    }

    fn until(mut r: Request, until: i64) -> Request {
        r.until = Some(until);
        r
    }

    #[test]
    fn one_read_serves_every_request_from_its_own_position() {
        let mut out = Vec::new();
        // Partition retains [10, 20); a: after 12, b: after 15, c: other user after 9.
        let reqs = vec![req("a", 12, 1), req("b", 15, 2), req("c", 9, 3)];
        let mut scan = start(reqs, 10, 20, None, &mut out);
        assert_eq!(scan.next(), 10, "from the lowest first offset");
        let users = ["a", "b", "c", "a", "b", "a", "z", "b", "a", "c"];
        for (i, user) in users.iter().enumerate() {
            let offset = 10 + i as i64;
            scan.message(offset, Some(update(user, offset)), &mut out);
        }
        assert!(scan.complete());
        finish(scan, &mut out);
        let out = by_key(out);
        assert_eq!(offsets(&out[0].1), [13, 15, 18], "a: its updates after 12");
        assert_eq!(offsets(&out[1].1), [17], "b: after 15 only");
        assert_eq!(offsets(&out[2].1), [12, 19], "c: everything of its own");
    }

    #[test]
    fn positions_outside_the_retained_log_are_settled_without_a_read() {
        let mut out = Vec::new();
        let reqs = vec![req("a", 5, 1), req("b", 21, 2), req("c", 19, 3), req("d", 9, 4)];
        let scan = start(reqs, 10, 20, None, &mut out);
        assert_eq!(scan.next(), 10);
        let out = by_key(out);
        assert!(matches!(out[0], (1, Outcome::Trimmed)), "first wanted 6 < 10: trimmed");
        assert!(matches!(out[1], (2, Outcome::BeyondEnd)), "first wanted 22 > end 20");
        assert!(matches!(&out[2], (3, Outcome::Replayed { updates, end: 20 }) if updates.is_empty()), "up to date");
        let mut out = Vec::new();
        let behind = until(req("e", 12, 5), 12);
        assert!(Scan::start(vec![behind], (10, 20), None, 100, Instant::now(), &mut out).is_err());
        assert!(
            matches!(&out[0].1, Outcome::Replayed { updates, end: 12 } if updates.is_empty()),
            "the shard's feed is behind the position: nothing to replay, live past it"
        );
        assert!(Scan::start(vec![req("a", 19, 1)], (10, 20), None, 100, Instant::now(), &mut Vec::new()).is_err());
    }

    #[test]
    fn the_cap_counts_the_users_updates_and_ends_only_that_replay() {
        let mut out = Vec::new();
        let mut scan = Scan::start(vec![req("a", 0, 1), req("b", 0, 2)], (0, 100), None, 3, Instant::now(), &mut out)
            .ok()
            .unwrap();
        read(&mut scan, 10, &["b", "a"], &mut out);
        // a had 1, 3, 5 then 7 passed the cap; b had 2, 4, 6 then 8.
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|(_, o)| matches!(o, Outcome::TooMany)));
        assert!(scan.is_empty());
    }

    #[test]
    fn a_late_request_joins_while_the_window_covers_it() {
        let mut out = Vec::new();
        let now = Instant::now();
        let users = ["a", "b", "d", "e"];
        let mut scan = start(vec![req("a", 9, 1)], 0, 20, None, &mut out);
        assert_eq!(read(&mut scan, 14, &users, &mut out), (10..14).collect::<Vec<_>>());
        assert!(scan.join(req("x", 8, 9), now, &mut out).is_err(), "wants 9, below what the scan read");
        assert!(scan.join(req("c", 25, 3), now, &mut out).is_err(), "beyond the end known");
        scan.join(req("b", 10, 2), now, &mut out).expect("wants 11, read already: from the window");
        scan.join(req("d", 13, 4), now, &mut out).expect("wants 14, next");
        assert_eq!(read(&mut scan, 20, &users, &mut out), (14..20).collect::<Vec<_>>());
        assert!(!scan.complete(), "the end is read again for the joiners");
        scan.extend(22);
        assert!(!scan.complete());
        assert_eq!(read(&mut scan, 22, &users, &mut out), [20, 21], "each offset read once");
        assert!(scan.complete());
        assert!(
            scan.join(req("e", 21, 5), now, &mut out).is_err(),
            "extended once: the next joiner waits for the next scan"
        );
        finish(scan, &mut out);
        let out = by_key(out);
        assert!(matches!(out[0].1, Outcome::Replayed { end: 20, .. }), "a: to the end read for it");
        assert_eq!(offsets(&out[0].1), [12, 16]);
        assert_eq!(offsets(&out[1].1), [13, 17, 21], "b: the window's 13, then the scan's, to the end read again");
        assert_eq!(offsets(&out[2].1), [14, 18]);
    }

    #[test]
    fn a_later_scan_is_served_from_the_window_and_reads_only_past_it() {
        let mut out = Vec::new();
        let users = ["a", "b"];
        let mut scan = start(vec![req("a", 4, 1)], 0, 10, None, &mut out);
        read(&mut scan, 10, &users, &mut out);
        let window = finish(scan, &mut out);
        // b resumes after 5; the partition grew to 14.
        let mut scan = start(vec![req("b", 5, 2)], 0, 14, Some(window), &mut out);
        assert_eq!(scan.next(), 10, "the window has [5, 10)");
        assert_eq!(read(&mut scan, 14, &users, &mut out), [10, 11, 12, 13]);
        let window = finish(scan, &mut out);
        // Served whole from the window: no scan.
        let back = Scan::start(vec![req("a", 5, 3)], (0, 14), Some(window), 100, Instant::now(), &mut out);
        assert!(matches!(back, Err(Some(_))), "nothing to read; the window is given back");
        let out = by_key(out);
        assert_eq!(offsets(&out[0].1), [6, 8]);
        assert_eq!(offsets(&out[1].1), [7, 9, 11, 13]);
        assert_eq!(offsets(&out[2].1), [6, 8, 10, 12], "the window kept both scans' reads");
    }

    #[test]
    fn a_scan_below_the_window_skips_over_it() {
        let mut out = Vec::new();
        let users = ["a", "b", "c"];
        let mut scan = start(vec![req("a", 9, 1)], 0, 15, None, &mut out);
        read(&mut scan, 15, &users, &mut out);
        let window = finish(scan, &mut out); // [10, 15)
                                             // b wants from 3, c from 12; the partition grew to 20.
        let mut scan = start(vec![req("b", 2, 2), req("c", 11, 3)], 0, 20, Some(window), &mut out);
        assert_eq!(scan.next(), 3);
        let got = read(&mut scan, 20, &users, &mut out);
        assert_eq!(got, [3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 18, 19], "at the window's start, on at its end");
        finish(scan, &mut out);
        let out = by_key(out);
        assert_eq!(offsets(&out[0].1), [12]);
        assert_eq!(offsets(&out[1].1), [4, 7, 10, 13, 16, 19], "b: read, window, read, in order");
        assert_eq!(offsets(&out[2].1), [14, 17], "c: from the window, then read");
    }

    #[test]
    fn a_trimmed_window_serves_only_what_it_still_has() {
        let mut out = Vec::new();
        let mut scan = start(vec![req("a", 0, 1)], 0, 10, None, &mut out);
        read(&mut scan, 10, &["a"], &mut out);
        let mut window = finish(scan, &mut out);
        let each = window.bytes() / 9;
        window.trim(each * 4);
        assert_eq!(window.bytes(), each * 4);
        assert_eq!((window.start, window.end), (6, 10), "the oldest went first");
        let scan = start(vec![req("a", 2, 2)], 0, 10, Some(window), &mut out);
        assert_eq!(scan.next(), 3, "3.. is read again");
    }

    #[test]
    fn a_replay_ends_where_the_shard_feed_stood_and_the_scan_where_the_last_wants() {
        let mut out = Vec::new();
        let users = ["a", "b"];
        // The partition's end is 30; a's shard had taken up to 14, b's up to 19.
        let mut scan = start(vec![until(req("a", 9, 1), 15), until(req("b", 9, 2), 20)], 0, 30, None, &mut out);
        assert_eq!(scan.end, 20, "no further than anyone wants");
        assert_eq!(read(&mut scan, 16, &users, &mut out), (10..16).collect::<Vec<_>>());
        scan.settle_passed(&mut out);
        assert_eq!(out.len(), 1, "a is answered while b's replay goes on");
        // c's shard is behind c's position: nothing to replay, answered now.
        scan.join(until(req("c", 17, 3), 17), Instant::now(), &mut out).expect("answered");
        assert_eq!(out.len(), 2);
        // d joins with an end past the scan's: the scan goes on for it, no end read again.
        // a on another connection, from 12, its shard up to 23: the scan
        // goes on for it without reading the partition's end again.
        scan.join(until(req("a", 11, 4), 24), Instant::now(), &mut out).expect("in the window");
        assert_eq!(scan.end, 24);
        read(&mut scan, 24, &users, &mut out);
        assert!(!scan.requery);
        finish(scan, &mut out);
        let out = by_key(out);
        assert!(matches!(out[0].1, Outcome::Replayed { end: 15, .. }));
        assert_eq!(offsets(&out[0].1), [10, 12, 14]);
        assert!(matches!(out[1].1, Outcome::Replayed { end: 20, .. }));
        assert_eq!(offsets(&out[1].1), [11, 13, 15, 17, 19]);
        assert!(matches!(&out[2].1, Outcome::Replayed { updates, end: 17 } if updates.is_empty()));
        assert!(matches!(out[3].1, Outcome::Replayed { end: 24, .. }));
        assert_eq!(offsets(&out[3].1), [12, 14, 16, 18, 20, 22], "from the window, then read");
    }

    #[test]
    fn a_request_the_window_has_whole_needs_no_scan() {
        let mut out = Vec::new();
        let mut scan = start(vec![req("a", 0, 1)], 0, 10, None, &mut out);
        read(&mut scan, 10, &["a", "b"], &mut out);
        let window = finish(scan, &mut out);
        out.clear();
        let prior = Scan::start(vec![until(req("b", 2, 2), 8)], (0, 12), Some(window), 100, Instant::now(), &mut out)
            .err()
            .expect("nothing to read");
        assert!(prior.is_some(), "the window is given back");
        assert!(matches!(out[0].1, Outcome::Replayed { end: 8, .. }));
        assert_eq!(offsets(&out[0].1), [3, 5, 7]);
    }

    #[test]
    fn a_scan_past_the_window_reads_on_from_its_end() {
        let mut out = Vec::new();
        let mut scan = start(vec![req("a", 4, 1)], 0, 10, None, &mut out);
        read(&mut scan, 10, &["a", "b"], &mut out);
        let window = finish(scan, &mut out);
        // b wants from 13: 10..13 is read too, so the window stays whole.
        let mut scan = start(vec![req("b", 12, 2)], 0, 16, Some(window), &mut out);
        assert_eq!(scan.next(), 10);
        read(&mut scan, 16, &["a", "b"], &mut out);
        let window = finish(scan, &mut out);
        out.clear();
        let back = Scan::start(vec![req("a", 9, 3)], (0, 16), Some(window), 100, Instant::now(), &mut out);
        assert!(back.is_err(), "the window has 10..16 as well");
        assert_eq!(offsets(&out[0].1), [10, 12, 14]);
    }

    #[test]
    fn offsets_read_again_are_told_apart() {
        let mut r = ReadOffsets::default();
        assert!((10..20).all(|o| !r.read(o)));
        assert!((30..35).all(|o| !r.read(o)));
        assert!(r.read(15) && r.read(19) && r.read(30));
        assert!(!r.read(20) && !r.read(29), "next to a range: new");
        assert!((21..29).all(|o| !r.read(o)), "the gap between");
        assert_eq!(r.ranges, [(10, 35)], "merged into one");
        assert!(!r.read(9) && !r.read(35));
        for k in 0..100 {
            r.read(100 + 3 * k);
        }
        assert!(r.ranges.len() <= RANGES, "bounded");
        assert!(r.read(12), "still known after merging");
    }

    #[test]
    fn a_window_answers_what_it_holds_whole_without_a_scan() {
        let mut out = Vec::new();
        let mut scan = start(vec![req("a", 4, 1)], 0, 10, None, &mut out);
        read(&mut scan, 10, &["a", "b"], &mut out);
        let mut window = finish(scan, &mut out);
        let now = Instant::now();
        let (_, o) = window.serve(until(req("b", 6, 2), 10), 100, now).expect("held whole");
        assert_eq!(offsets(&o), [7, 9]);
        assert!(matches!(o, Outcome::Replayed { end: 10, .. }));
        assert!(window.serve(until(req("b", 6, 3), 11), 100, now).is_err(), "wants past it");
        assert!(window.serve(req("b", 6, 4), 100, now).is_err(), "no until: the partition's end decides");
        assert!(window.serve(until(req("b", 2, 5), 8), 100, now).is_err(), "wants below it");
        let (_, o) = window.serve(until(req("b", 4, 6), 10), 1, now).expect("held whole");
        assert!(matches!(o, Outcome::TooMany), "three of b's past the cap of one");
    }

    #[test]
    fn a_joiner_with_nothing_to_replay_is_answered_at_once_and_joining_ends() {
        let mut out = Vec::new();
        let now = Instant::now();
        let mut scan = start(vec![req("a", 0, 1)], 0, 20, None, &mut out);
        read(&mut scan, 5, &["a"], &mut out);
        // The client is at 12, its shard's feed at 10: up to date.
        scan.join(until(req("b", 11, 2), 10), now, &mut out).expect("answered");
        assert!(matches!(&out[0].1, Outcome::Replayed { updates, end: 10 } if updates.is_empty()));
        assert!(scan.join(until(req("c", 30, 3), 10), now, &mut out).is_err(), "beyond the end: the next scan tells");
        scan.joinable_until = Some(now);
        assert!(scan.join(until(req("d", 3, 4), 15), now, &mut out).is_err(), "too late to join");
    }

    #[test]
    fn a_scan_far_past_the_window_starts_a_new_one() {
        let mut out = Vec::new();
        let mut scan = start(vec![req("a", 4, 1)], 0, 10, None, &mut out);
        read(&mut scan, 10, &["a"], &mut out);
        let window = finish(scan, &mut out);
        let far = 10 + GAP_READ + 1;
        let scan = start(vec![req("a", far, 2)], 0, far + 10, Some(window), &mut out);
        assert_eq!(scan.next(), far + 1, "the gap is not read");
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
