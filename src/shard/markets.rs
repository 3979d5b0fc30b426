//! Market and chain channels on a shard (PROTOCOL.md §11): who subscribes
//! to each market (`prices:<chainId>:<token>`) and each chain
//! (`prices:<chainId>`), and each market's last frame (the snapshot).
//!
//! A *topic* is one market or one chain. Each topic keeps a dense list of
//! its subscribers' slot keys, so an update costs the lookup of its market
//! and its chain plus one step per subscriber, and nothing else: a shard
//! where nobody holds the market or the chain pays two hash lookups and the
//! last-value write. Each connection's topics (and its place in each list)
//! are kept beside, so an unsubscribe or a disconnect is a swap-remove.
//!
//! Last values: every market's newest `price_update` (the shared
//! [`Update`], not a copy), in a list ordered by update time. At most
//! `WS_MAX_MARKETS` markets keep one; past that the least recently updated
//! loses its value (counted). A topic disappears when it has neither
//! subscribers nor a value. Every shard takes every update in the same
//! order, so each shard's table is the same, and it is exactly what that
//! shard has fanned out: a snapshot read here is never newer or older
//! than what its connections were sent.

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use super::inbox::Update;
use crate::protocol::channel::{ChannelName, Market};

/// Ends the last-value list.
const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum TopicKey {
    Market(Market),
    Chain(u64),
}

#[derive(Debug)]
struct Topic {
    key: TopicKey,
    /// Subscribers' slot keys.
    subs: Vec<u32>,
    /// The market's newest update (markets only).
    last: Option<Arc<Update>>,
    /// Neighbours in the last-value list (older, newer).
    older: u32,
    newer: u32,
}

#[derive(Debug)]
pub(super) struct Markets {
    topics: Slab<Topic>,
    markets: HashMap<Market, u32>,
    chains: HashMap<u64, u32>,
    /// Each connection's topics, with its place in each topic's list.
    held: HashMap<u32, Vec<(u32, u32)>>,
    /// The last-value list: oldest and newest market with a value.
    oldest: u32,
    newest: u32,
    with_value: usize,
    max_markets: usize,
}

/// Whom one price update reaches through market and chain channels.
pub(super) struct Reach<'a> {
    pub chain: &'a [u32],
    pub market: &'a [u32],
}

impl Markets {
    pub fn new(max_markets: usize) -> Self {
        Self {
            topics: Slab::new(),
            markets: HashMap::new(),
            chains: HashMap::new(),
            held: HashMap::new(),
            oldest: NONE,
            newest: NONE,
            with_value: 0,
            max_markets: max_markets.max(1),
        }
    }

    /// The topic's index, if it exists.
    fn find(&self, topic: &TopicKey) -> Option<u32> {
        match topic {
            TopicKey::Market(m) => self.markets.get(m).copied(),
            TopicKey::Chain(c) => self.chains.get(c).copied(),
        }
    }

    /// The topic a market or chain channel names, if it exists.
    fn find_name(&self, name: &ChannelName) -> Option<u32> {
        match name {
            ChannelName::Market(m) => self.markets.get(m).copied(),
            ChannelName::Chain(c) => self.chains.get(c).copied(),
            ChannelName::Fixed(_) => None,
        }
    }

    /// Whether the connection holds topic `t`.
    fn holds_topic(&self, key: usize, t: u32) -> bool {
        self.held.get(&(key as u32)).is_some_and(|list| list.iter().any(|&(held, _)| held == t))
    }

    /// Whether the connection holds the market or chain channel.
    pub fn holds(&self, key: usize, name: &ChannelName) -> bool {
        self.find_name(name).is_some_and(|t| self.holds_topic(key, t))
    }

    /// How many market and chain channels the connection holds.
    pub fn count(&self, key: usize) -> usize {
        self.held.get(&(key as u32)).map_or(0, Vec::len)
    }

    /// Adds the connection to the topic; false if it held it already.
    pub fn subscribe(&mut self, key: usize, topic: TopicKey) -> bool {
        if self.find(&topic).is_some_and(|t| self.holds_topic(key, t)) {
            return false;
        }
        let t = self.topic(topic);
        let subs = &mut self.topics[t as usize].subs;
        subs.push(key as u32);
        self.held.entry(key as u32).or_default().push((t, subs.len() as u32 - 1));
        true
    }

    /// Takes the connection off the topic; false if it did not hold it.
    pub fn unsubscribe(&mut self, key: usize, name: &ChannelName) -> bool {
        let Some(t) = self.find_name(name) else { return false };
        let Some(list) = self.held.get_mut(&(key as u32)) else { return false };
        let Some(i) = list.iter().position(|&(held, _)| held == t) else { return false };
        let (_, pos) = list.swap_remove(i);
        if list.is_empty() {
            self.held.remove(&(key as u32));
        }
        self.leave(t, pos);
        true
    }

    /// Takes the connection off every topic; returns how many it held.
    pub fn remove(&mut self, key: usize) -> usize {
        let Some(list) = self.held.remove(&(key as u32)) else { return 0 };
        for &(t, pos) in &list {
            self.leave(t, pos);
        }
        list.len()
    }

    /// The subscribers of the update's chain and market.
    pub fn reach(&self, chain: u64, market: Option<&Market>) -> Reach<'_> {
        let subs = |t: Option<&u32>| t.map_or(&[][..], |&t| &self.topics[t as usize].subs[..]);
        let chain_subs = if self.chains.is_empty() { &[][..] } else { subs(self.chains.get(&chain)) };
        Reach { chain: chain_subs, market: subs(market.and_then(|m| self.markets.get(m))) }
    }

    /// Keeps `update` as its market's last value; returns true when another
    /// market lost its value to make room.
    pub fn record(&mut self, market: &Market, update: &Arc<Update>) -> bool {
        let t = match self.markets.get(market) {
            Some(&t) => t,
            None => self.topic(TopicKey::Market(market.clone())),
        };
        let had = self.topics[t as usize].last.replace(update.clone()).is_some();
        if had {
            self.unlink(t);
        } else {
            self.with_value += 1;
        }
        self.link_newest(t);
        if self.with_value > self.max_markets {
            let victim = self.oldest;
            self.unlink(victim);
            self.topics[victim as usize].last = None;
            self.with_value -= 1;
            self.drop_if_unused(victim);
            return true;
        }
        false
    }

    /// The market's last update.
    pub fn last(&self, market: &Market) -> Option<&Arc<Update>> {
        let &t = self.markets.get(market)?;
        self.topics[t as usize].last.as_ref()
    }

    /// Last updates, newest first, of the markets on `chain` (every market
    /// when None), at most `max`.
    pub fn latest(&self, chain: Option<u64>, max: usize) -> Vec<Arc<Update>> {
        let mut out = Vec::new();
        let mut t = self.newest;
        while t != NONE && out.len() < max {
            let topic = &self.topics[t as usize];
            let on_chain = match (&topic.key, chain) {
                (TopicKey::Market(m), Some(c)) => m.chain == c,
                _ => true,
            };
            if on_chain {
                out.extend(topic.last.clone());
            }
            t = topic.older;
        }
        out
    }

    /// Markets holding a last value.
    pub fn with_value(&self) -> usize {
        self.with_value
    }

    /// The topic's index, created when new.
    fn topic(&mut self, key: TopicKey) -> u32 {
        if let Some(t) = self.find(&key) {
            return t;
        }
        let t = self.topics.insert(Topic { key: key.clone(), subs: Vec::new(), last: None, older: NONE, newer: NONE })
            as u32;
        match key {
            TopicKey::Market(m) => self.markets.insert(m, t),
            TopicKey::Chain(c) => self.chains.insert(c, t),
        };
        t
    }

    /// Removes the subscriber at `pos` of topic `t`; the one moved into its
    /// place learns its new position.
    fn leave(&mut self, t: u32, pos: u32) {
        let subs = &mut self.topics[t as usize].subs;
        subs.swap_remove(pos as usize);
        if let Some(&moved) = subs.get(pos as usize) {
            if let Some(entry) = self.held.get_mut(&moved).and_then(|l| l.iter_mut().find(|(held, _)| *held == t)) {
                entry.1 = pos;
            }
        }
        self.drop_if_unused(t);
    }

    fn drop_if_unused(&mut self, t: u32) {
        let topic = &self.topics[t as usize];
        if topic.subs.is_empty() && topic.last.is_none() {
            match self.topics.remove(t as usize).key {
                TopicKey::Market(m) => self.markets.remove(&m),
                TopicKey::Chain(c) => self.chains.remove(&c),
            };
        }
    }

    fn unlink(&mut self, t: u32) {
        let (older, newer) = {
            let topic = &self.topics[t as usize];
            (topic.older, topic.newer)
        };
        match older {
            NONE => self.oldest = newer,
            o => self.topics[o as usize].newer = newer,
        }
        match newer {
            NONE => self.newest = older,
            n => self.topics[n as usize].older = older,
        }
    }

    fn link_newest(&mut self, t: u32) {
        let prev = self.newest;
        {
            let topic = &mut self.topics[t as usize];
            topic.older = prev;
            topic.newer = NONE;
        }
        match prev {
            NONE => self.oldest = t,
            p => self.topics[p as usize].newer = t,
        }
        self.newest = t;
    }
}
