//! Who receives what on a shard: the `prices` subscribers and each user's
//! connections (the private channels).
//!
//! The `prices` list is dense (a sweep walks it when the price log holds
//! frames); each subscriber's slot knows its place, so removal is a swap.
//! The user index holds one slot key per user, the first of that user's
//! connections; the rest are linked through their slots (`next_user`).
//! Holding keys only (the id is in the slot) keeps the index to 5 bytes
//! per bucket.
//! User ids are hashed with aHash, keyed randomly per process: it resists
//! hash flooding (not with SipHash's cryptographic margin) at a fraction
//! of SipHash's cost on short keys.

use ahash::RandomState;

use hashbrown::HashTable;
use slab::Slab;

use super::slot::{Slot, NOT_LISTED};

#[derive(Debug, Default)]
pub(super) struct Registry {
    prices: Vec<usize>,
    users: HashTable<u32>,
    hasher: RandomState,
}

impl Registry {
    /// Room for `connections` (the shard's share of `WS_MAX_CONNECTIONS`),
    /// reserved at start, so that neither the list nor the index grows
    /// during a connection storm (each growth of the index rehashed every
    /// user id through its slot). The index's 4-byte keys are
    /// address space until used; its control bytes (one per bucket) are
    /// written now.
    pub fn reserve(&mut self, connections: usize) {
        self.prices.reserve(connections);
        if self.users.is_empty() {
            // An empty index rehashes nothing: the closure is never called.
            self.users.reserve(connections, |_| 0);
        }
    }

    /// The `prices` subscribers.
    pub fn prices(&self) -> &[usize] {
        &self.prices
    }

    pub fn add_price(&mut self, conns: &mut Slab<Slot>, key: usize) {
        conns[key].prices_pos = self.prices.len() as u32;
        self.prices.push(key);
    }

    pub fn remove_price(&mut self, conns: &mut Slab<Slot>, key: usize) {
        let pos = std::mem::replace(&mut conns[key].prices_pos, NOT_LISTED) as usize;
        self.prices.swap_remove(pos);
        if let Some(&moved) = self.prices.get(pos) {
            conns[moved].prices_pos = pos as u32;
        }
    }

    /// Lists the slot under its user (already set in the slot).
    pub fn link_user(&mut self, conns: &mut Slab<Slot>, key: usize) {
        let Some(user) = conns[key].user.clone() else { return };
        let hash = self.hasher.hash_one(&*user);
        let found = self.users.find_mut(hash, |&k| conns[k as usize].user.as_deref() == Some(&*user));
        match found {
            // Prepended: the order of a user's connections does not matter.
            Some(head) => conns[key].next_user = std::mem::replace(head, key as u32),
            None => {
                let hasher = &self.hasher;
                let rehash = |&k: &u32| hasher.hash_one(conns[k as usize].user.as_deref().unwrap_or_default());
                self.users.insert_unique(hash, key as u32, rehash);
            }
        }
    }

    /// Takes the slot out of its user's list (and the user out of the
    /// index with their last connection); clears the slot's user.
    pub fn unlink_user(&mut self, conns: &mut Slab<Slot>, key: usize) {
        let next = std::mem::replace(&mut conns[key].next_user, NOT_LISTED);
        let Some(user) = conns[key].user.take() else { return };
        let hash = self.hasher.hash_one(&*user);
        // The head is this connection (its id is already taken) or another
        // of the user's.
        let found =
            self.users.find_entry(hash, |&k| k as usize == key || conns[k as usize].user.as_deref() == Some(&*user));
        let Ok(head) = found else { return }; // impossible: link_user listed it
        let mut k = *head.get() as usize;
        if k == key {
            if next == NOT_LISTED {
                head.remove();
            } else {
                *head.into_mut() = next;
            }
            return;
        }
        while conns[k].next_user != NOT_LISTED {
            if conns[k].next_user as usize == key {
                conns[k].next_user = next;
                return;
            }
            k = conns[k].next_user as usize;
        }
    }

    /// The first of `user`'s connections on this shard, if any.
    pub fn first_of(&self, conns: &Slab<Slot>, user: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(user);
        self.users.find(hash, |&k| conns[k as usize].user.as_deref() == Some(user)).map(|&k| k as usize)
    }

    #[cfg(test)]
    pub fn users(&self) -> usize {
        self.users.len()
    }
}
