//! What `resume` checks, sans-IO: each user's private stream over both of
//! its connections (every update once, in order, only its own), and the
//! Kafka range the replays had to cover, per partition.

use std::collections::BTreeMap;

use crate::private::updates_for;
use crate::ws::{field_u64, Sequence, POS, SEQ};

/// A Kafka position: (partition, offset).
pub(crate) type Pos = (u32, u64);

/// The `pos` of an update frame (`"pos":"3:1042"`), when it has one.
pub(crate) fn pos_of(payload: &[u8]) -> Option<Pos> {
    let rest = &payload[POS.value_at(payload)?..];
    let text = std::str::from_utf8(&rest[..memchr::memchr(b'"', rest)?]).ok()?;
    let (partition, offset) = text.split_once(':')?;
    Some((partition.parse().ok()?, offset.parse().ok()?))
}

/// `"3:1042"`, as a resume's `since`.
pub(crate) fn pos_text((partition, offset): Pos) -> String {
    format!("{partition}:{offset}")
}

/// One user's stream, over both its connections.
#[derive(Default)]
struct Stream {
    /// Whether its first connection was set up (else nothing is expected).
    followed: bool,
    order: Sequence,
    received: u64,
    /// The position of the newest update it processed: its `since`.
    last_pos: Option<Pos>,
}

/// What a frame on a private connection was.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// An `order_update` (its own user's or not), with its position.
    Update(Option<Pos>),
    /// Anything else (a pong, an error).
    Other,
}

/// Every user's stream (user `u` is `lt-<u>`, update `k` of the producer
/// goes to user `k % users` with number `k / users`), and the counts over
/// all of them.
pub(crate) struct Streams {
    users: Vec<Stream>,
    /// Distinct updates received, over all users.
    pub(crate) received: u64,
    /// Numbers skipped within a user's stream.
    pub(crate) gaps: u64,
    /// Updates received again (or after a newer one).
    pub(crate) dups: u64,
    /// Another user's updates.
    pub(crate) misrouted: u64,
}

impl Streams {
    pub(crate) fn new(users: usize) -> Streams {
        Streams { users: (0..users).map(|_| Stream::default()).collect(), received: 0, gaps: 0, dups: 0, misrouted: 0 }
    }

    /// User `u`'s first connection is set up: it expects all its updates.
    pub(crate) fn follow(&mut self, u: usize) {
        self.users[u].followed = true;
    }

    /// A frame at user `u`'s connection; `me` is `"userId":"lt-<u>"`.
    pub(crate) fn see(&mut self, u: usize, me: &[u8], p: &[u8]) -> Seen {
        let (true, Some(seq)) = (memchr::memmem::find(p, b"\"order_update\"").is_some(), field_u64(p, &SEQ)) else {
            return Seen::Other;
        };
        let pos = pos_of(p);
        if memchr::memmem::find(p, me).is_none() {
            self.misrouted += 1;
            return Seen::Update(pos);
        }
        let s = &mut self.users[u];
        let (skipped, repeat) = s.order.see(seq, true);
        self.gaps += skipped;
        if repeat {
            self.dups += 1;
        } else {
            s.received += 1;
            self.received += 1;
            s.last_pos = pos.or(s.last_pos);
        }
        Seen::Update(pos)
    }

    /// Each followed user and the position it resumes from (None: it has
    /// not processed any update).
    pub(crate) fn positions(&self) -> Vec<(usize, Option<Pos>)> {
        self.users.iter().enumerate().filter(|(_, s)| s.followed).map(|(u, s)| (u, s.last_pos)).collect()
    }

    /// Followed users that have not processed any update yet.
    pub(crate) fn without_position(&self) -> usize {
        self.users.iter().filter(|s| s.followed && s.last_pos.is_none()).count()
    }

    /// The updates the followed users should have once `produced` were sent.
    pub(crate) fn expected(&self, produced: u64) -> u64 {
        let n = self.users.len();
        self.users.iter().enumerate().filter(|(_, s)| s.followed).map(|(u, _)| updates_for(u, n, produced)).sum()
    }

    /// Expected updates that did not arrive, and at how many users.
    pub(crate) fn lost(&self, produced: u64) -> (u64, u64) {
        let n = self.users.len();
        let short = self
            .users
            .iter()
            .enumerate()
            .filter(|(_, s)| s.followed)
            .map(|(u, s)| updates_for(u, n, produced).saturating_sub(s.received));
        short.fold((0, 0), |(lost, users), l| (lost + l, users + u64::from(l > 0)))
    }
}

/// Per partition, the offsets the replays had to cover: from the lowest
/// offset a recovered resume wanted (its `since` + 1) to the highest one
/// replayed. What a server that reads each message once for all the
/// resumes of a storm reads, at least.
#[derive(Debug, Default)]
pub(crate) struct ReplayRange {
    /// By partition: (lowest offset wanted, highest offset replayed).
    partitions: BTreeMap<u32, (u64, Option<u64>)>,
}

impl ReplayRange {
    /// A resume from `since` was recovered.
    pub(crate) fn wanted_after(&mut self, (partition, offset): Pos) {
        let e = self.partitions.entry(partition).or_insert((u64::MAX, None));
        e.0 = e.0.min(offset + 1);
    }

    /// An update at `pos` was replayed.
    pub(crate) fn replayed(&mut self, (partition, offset): Pos) {
        let e = self.partitions.entry(partition).or_insert((u64::MAX, None));
        e.1 = Some(e.1.map_or(offset, |h| h.max(offset)));
    }

    /// Messages in the range, over the partitions.
    pub(crate) fn len(&self) -> u64 {
        self.partitions.values().map(|(low, high)| high.map_or(0, |h| (h + 1).saturating_sub(*low))).sum()
    }

    /// Partitions with a replayed update.
    pub(crate) fn partitions(&self) -> usize {
        self.partitions.values().filter(|(_, high)| high.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(user: usize, seq: u64, pos: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"u1","type":"order_update","timestamp":1,"pos":"{pos}","data":{{"userId":"lt-{user}","seq":{seq},"sentNs":5}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn reads_positions() {
        assert_eq!(pos_of(&order(0, 0, "3:1042")), Some((3, 1042)));
        assert_eq!(pos_of(br#"{"type":"order_update","data":{}}"#), None);
        assert_eq!(pos_of(br#"{"pos":"3-1042"}"#), None);
        assert_eq!(pos_text((3, 1042)), "3:1042");
    }

    #[test]
    fn a_users_stream_is_checked_across_its_two_connections() {
        let mut s = Streams::new(3);
        s.follow(0);
        s.follow(2);
        let me = br#""userId":"lt-0""#;
        assert_eq!(s.see(0, me, &order(0, 0, "1:10")), Seen::Update(Some((1, 10))));
        assert_eq!(s.see(0, me, br#"{"type":"pong"}"#), Seen::Other);
        assert_eq!(s.see(0, me, &order(0, 1, "1:13")), Seen::Update(Some((1, 13))));
        // Dropped here; the resume replays from 1:13 on.
        assert_eq!(s.positions(), [(0, Some((1, 13))), (2, None)]);
        assert_eq!(s.without_position(), 1);
        s.see(0, me, &order(0, 2, "1:16"));
        // A repeat does not move the position; another user's update is misrouted.
        s.see(0, me, &order(0, 1, "1:13"));
        s.see(0, me, &order(2, 0, "2:4"));
        assert_eq!((s.received, s.dups, s.misrouted, s.gaps), (3, 1, 1, 0));
        assert_eq!(s.positions()[0], (0, Some((1, 16))));
        // User 0 should have updates 0, 3, 6 of 7 (3 of them), user 2 two.
        assert_eq!(s.expected(7), 5);
        assert_eq!(s.lost(7), (2, 1));
        // A skipped number is a gap.
        s.see(0, me, &order(0, 4, "1:22"));
        assert_eq!(s.gaps, 1);
    }

    #[test]
    fn the_replayed_range_spans_the_lowest_position_to_the_last_replayed_offset() {
        let mut r = ReplayRange::default();
        assert_eq!(r.len(), 0);
        r.wanted_after((0, 99));
        r.wanted_after((0, 120));
        r.replayed((0, 130));
        r.replayed((0, 104));
        // Partition 1: recovered with nothing missed, nothing to read.
        r.wanted_after((1, 50));
        r.wanted_after((2, 7));
        r.replayed((2, 8));
        assert_eq!(r.len(), (130 - 100 + 1) + 1);
        assert_eq!(r.partitions(), 2);
    }
}
