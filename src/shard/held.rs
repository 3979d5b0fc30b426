//! Live updates held aside while a connection's channel is being resumed
//! (PROTOCOL.md §12).
//!
//! Owns: one entry per (connection, private channel) whose replay is in
//! flight: the live updates that arrived since the subscribe, in order,
//! bounded by `WS_MAX_BUFFERED_BYTES` (past it the connection is a slow
//! consumer, 4009, and resumes again), and the ticket that tells the
//! replay's result from a stale one. Then, once answered, a *floor*: the
//! replay read its partition up to an end the shard's own live feed may
//! not have reached yet, so live updates of that partition below it are
//! skipped (they were replayed) until one at or past it comes. A
//! connection with an entry or a floor carries `Marks::HOLDING`, so the
//! fan-out looks here only for those. And how far the shard's feed has
//! reached in each private partition ([`Holds::fed`]): a replay need read
//! only below that, since everything after is held.

use std::collections::HashMap;
use std::sync::Arc;

use super::inbox::Update;
use crate::protocol::message::{Channel, Pos};

/// Partitions per private topic whose feed position is tracked (beyond,
/// replays read to the partition's end instead).
const TRACKED_PARTITIONS: usize = 4096;

/// One resume in flight.
#[derive(Debug)]
pub struct Held {
    pub ticket: u64,
    /// Live updates since the subscribe, oldest first.
    pub updates: Vec<Arc<Update>>,
    bytes: usize,
}

/// What [`Holds::hold`] did with an update.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hold {
    /// No resume of that channel on the connection: deliver as usual.
    NotHeld,
    Held,
    /// Below the floor: the replay delivered it already.
    Covered,
    /// Past the limit: the entry is gone; the connection is a slow consumer.
    Overflow,
}

#[derive(Debug, Default)]
pub(super) struct Holds {
    entries: HashMap<(usize, Channel), Held>,
    /// After a complete replay: (partition, end) below which live updates
    /// were replayed.
    floors: HashMap<(usize, Channel), (i32, i64)>,
    next_ticket: u64,
    /// By channel, then partition: the offset past the newest live update
    /// the shard took (-1: none yet, or not since its inbox dropped one).
    fed: [Vec<i64>; Channel::ALL.len()],
    /// The inbox's drop count `fed` is good for.
    fed_drops: u64,
}

impl Holds {
    /// Starts holding `channel`'s live updates for `key`; None when a
    /// resume of that channel is already in flight there.
    pub fn begin(&mut self, key: usize, channel: Channel) -> Option<u64> {
        if self.entries.contains_key(&(key, channel)) {
            return None;
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.entries.insert((key, channel), Held { ticket, updates: Vec::new(), bytes: 0 });
        Some(ticket)
    }

    /// Holds `update` if `key` is resuming `channel`, or tells it was
    /// replayed already.
    pub fn hold(&mut self, key: usize, channel: Channel, update: &Arc<Update>, max_bytes: usize) -> Hold {
        let Some(held) = self.entries.get_mut(&(key, channel)) else {
            if let (Some(&(part, end)), Some((p, offset))) = (self.floors.get(&(key, channel)), update.pos) {
                if p == part {
                    if offset < end {
                        return Hold::Covered;
                    }
                    self.floors.remove(&(key, channel));
                }
            }
            return Hold::NotHeld;
        };
        held.bytes += update.frame.len();
        if held.bytes > max_bytes {
            self.entries.remove(&(key, channel));
            return Hold::Overflow;
        }
        held.updates.push(update.clone());
        Hold::Held
    }

    /// Ends the resume with this ticket, leaving `floor` (partition, end)
    /// when the replay was complete; None when it is not the current one
    /// (the connection left, or the entry was ended otherwise).
    pub fn end(&mut self, key: usize, channel: Channel, ticket: u64, floor: Option<(i32, i64)>) -> Option<Held> {
        match self.entries.get(&(key, channel)) {
            Some(h) if h.ticket == ticket => {
                match floor {
                    Some(f) => self.floors.insert((key, channel), f),
                    None => self.floors.remove(&(key, channel)),
                };
                self.entries.remove(&(key, channel))
            }
            _ => None,
        }
    }

    /// The ticket of `key`'s resume of `channel`, if one is in flight.
    pub fn ticket(&self, key: usize, channel: Channel) -> Option<u64> {
        self.entries.get(&(key, channel)).map(|h| h.ticket)
    }

    /// Whether `key` still holds anything (an entry or a floor).
    pub fn holds_any(&self, key: usize) -> bool {
        Channel::ALL.iter().any(|&c| self.entries.contains_key(&(key, c)) || self.floors.contains_key(&(key, c)))
    }

    /// Drops every entry and floor of `key` (it is leaving); returns how
    /// many resumes were in flight.
    pub fn drop_all(&mut self, key: usize) -> usize {
        for c in Channel::ALL {
            self.floors.remove(&(key, c));
        }
        Channel::ALL.iter().filter(|&&c| self.entries.remove(&(key, c)).is_some()).count()
    }

    /// Resumes in flight on the shard.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The shard took the live update of `channel` at `pos`.
    #[inline]
    pub fn fed(&mut self, channel: Channel, (partition, offset): Pos) {
        let Ok(p) = usize::try_from(partition) else { return };
        let fed = &mut self.fed[channel as usize];
        if p >= fed.len() {
            if p >= TRACKED_PARTITIONS {
                return;
            }
            fed.resize(p + 1, -1);
        }
        // The newest, not the highest: offsets that go back (a recreated
        // topic) must not leave a position the partition never reaches.
        fed[p] = offset.saturating_add(1);
    }

    /// The shard's inbox has dropped `drops` updates so far: after a new
    /// drop, what the shard took says nothing of the updates it never got,
    /// so every position is forgotten until the next update comes.
    pub fn inbox_drops(&mut self, drops: u64) {
        if drops != self.fed_drops {
            for fed in &mut self.fed {
                fed.fill(-1);
            }
            self.fed_drops = drops;
        }
    }

    /// The offset past the newest live update of `channel` in `partition`
    /// the shard took: every later one is held by a resume begun now, so
    /// its replay may end here. None when none came yet, or the inbox
    /// dropped one since (`drops`: its count now) so that some update past
    /// this may never come.
    pub fn fed_to(&self, channel: Channel, partition: i32, drops: u64) -> Option<i64> {
        if drops != self.fed_drops {
            return None;
        }
        let p = usize::try_from(partition).ok()?;
        self.fed[channel as usize].get(p).copied().filter(|&o| o >= 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::inbox::Route;

    fn update(partition: i32, offset: i64) -> Arc<Update> {
        let route = Route::User { channel: Channel::Orders, user: "u".into() };
        Arc::new(Update::encode_at(route, "u1", 0, Some((partition, offset)), b"{}"))
    }

    #[test]
    fn the_feed_position_is_the_newest_taken_and_forgotten_after_an_inbox_drop() {
        let mut h = Holds::default();
        assert_eq!(h.fed_to(Channel::Orders, 2, 0), None, "nothing taken yet");
        h.fed(Channel::Orders, (2, 40));
        h.fed(Channel::Orders, (2, 41));
        assert_eq!(h.fed_to(Channel::Orders, 2, 0), Some(42));
        assert_eq!(h.fed_to(Channel::Trades, 2, 0), None, "per channel");
        assert_eq!(h.fed_to(Channel::Orders, 1, 0), None, "per partition");
        h.fed(Channel::Orders, (2, 7));
        assert_eq!(h.fed_to(Channel::Orders, 2, 0), Some(8), "offsets that go back: a recreated topic");
        assert_eq!(h.fed_to(Channel::Orders, 2, 1), None, "the inbox dropped one the fan-out has not seen yet");
        h.inbox_drops(1);
        assert_eq!(h.fed_to(Channel::Orders, 2, 1), None, "forgotten: an update past it may never come");
        h.fed(Channel::Orders, (2, 9));
        assert_eq!(h.fed_to(Channel::Orders, 2, 1), Some(10));
        h.fed(Channel::Orders, (i32::MAX, 1));
        assert_eq!(h.fed_to(Channel::Orders, i32::MAX, 1), None, "beyond the partitions tracked");
    }

    #[test]
    fn holds_in_order_until_the_current_ticket_ends_it() {
        let mut h = Holds::default();
        let t = h.begin(3, Channel::Orders).unwrap();
        assert_eq!(h.begin(3, Channel::Orders), None, "one resume per channel at a time");
        assert_eq!(h.hold(3, Channel::Trades, &update(0, 1), 1 << 20), Hold::NotHeld);
        assert_eq!(h.hold(4, Channel::Orders, &update(0, 1), 1 << 20), Hold::NotHeld);
        for offset in [7, 8] {
            assert_eq!(h.hold(3, Channel::Orders, &update(1, offset), 1 << 20), Hold::Held);
        }
        assert!(h.end(3, Channel::Orders, t + 1, None).is_none(), "a stale ticket ends nothing");
        let held = h.end(3, Channel::Orders, t, Some((1, 8))).unwrap();
        assert_eq!(held.updates.iter().map(|u| u.pos).collect::<Vec<_>>(), [Some((1, 7)), Some((1, 8))]);
        assert!(h.end(3, Channel::Orders, t, None).is_none(), "ended once");
        // The floor: below it on its partition was replayed.
        assert_eq!(h.hold(3, Channel::Orders, &update(1, 7), 1 << 20), Hold::Covered);
        assert_eq!(h.hold(3, Channel::Orders, &update(0, 2), 1 << 20), Hold::NotHeld, "another partition");
        assert!(h.holds_any(3));
        assert_eq!(h.hold(3, Channel::Orders, &update(1, 8), 1 << 20), Hold::NotHeld, "at the floor: live");
        assert!(!h.holds_any(3), "the floor is gone once passed");
        assert_eq!(h.hold(3, Channel::Orders, &update(1, 5), 1 << 20), Hold::NotHeld);
    }

    #[test]
    fn past_the_byte_limit_the_resume_is_dropped_and_so_is_a_leaving_connection() {
        let mut h = Holds::default();
        h.begin(1, Channel::Orders).unwrap();
        let u = update(0, 1);
        let limit = u.frame.len() * 2;
        assert_eq!(h.hold(1, Channel::Orders, &u, limit), Hold::Held);
        assert_eq!(h.hold(1, Channel::Orders, &u, limit), Hold::Held);
        assert_eq!(h.hold(1, Channel::Orders, &u, limit), Hold::Overflow);
        assert_eq!(h.len(), 0, "its entry went with it");
        h.begin(2, Channel::Orders).unwrap();
        h.begin(2, Channel::Trades).unwrap();
        assert_eq!(h.drop_all(2), 2);
        assert!(!h.holds_any(2));
    }
}
