//! One connection's check of what it receives (each live update of its
//! markets once, in each market's order; snapshots told apart from
//! repeats and leaks), and the deliveries the connections expect, for the
//! lost figure.

use std::sync::Arc;

use super::catalog::{Expect, Markets};
use crate::plan::{Check, Delivery, Expectation};
use crate::ws::{field_u64, MSEQ};

/// No update of the market yet.
const NONE: u64 = u64::MAX;
/// Its snapshot, and no live update yet.
const SNAPSHOT: u64 = u64::MAX - 1;

/// One connection's check: per market it expects, the last market
/// sequence number (`mseq`) seen. Memory: one u64 per expected market
/// (one per market on `prices`).
pub(crate) struct MarketCheck {
    markets: Arc<Markets>,
    expect: Expect,
    /// By market when `expect.all`, else aligned with `expect.expected`.
    last: Box<[u64]>,
    subscribed_ns: u64,
}

impl MarketCheck {
    pub(crate) fn new(markets: Arc<Markets>, expect: Expect, subscribed_ns: u64) -> MarketCheck {
        let slots = if expect.all { markets.len() } else { expect.expected.len() };
        MarketCheck { markets, expect, last: vec![NONE; slots].into_boxed_slice(), subscribed_ns }
    }

    fn slot(&mut self, m: u32) -> Option<&mut u64> {
        let k = if self.expect.all { m as usize } else { self.expect.expected.binary_search(&m).ok()? };
        self.last.get_mut(k)
    }
}

impl Check for MarketCheck {
    fn see(&mut self, p: &[u8], seq: u64, sent_ns: u64) -> Delivery {
        if sent_ns < self.subscribed_ns {
            // Produced before this connection subscribed (this run's
            // producer starts after every set-up): only a snapshot of one
            // of its market channels, before any live update of it.
            let Some(m) = self.markets.market_in(p).filter(|m| self.expect.explicit.binary_search(m).is_ok()) else {
                return Delivery::Leaked;
            };
            let slot = self.slot(m).expect("an explicit market is expected");
            if *slot == NONE {
                *slot = SNAPSHOT;
                return Delivery::Snapshot;
            }
            // A second snapshot, or an old update after a newer one.
            return Delivery::Update { skipped: 0, repeat: true };
        }
        let (m, _) = self.markets.update(seq);
        let Some(mseq) = field_u64(p, &MSEQ) else {
            // Not an update of this run's producer.
            return Delivery::Leaked;
        };
        if !self.expect.expects(m) {
            return Delivery::Leaked;
        }
        let slot = self.slot(m).expect("an expected market has a slot");
        match *slot {
            NONE | SNAPSHOT => {
                *slot = mseq;
                Delivery::Update { skipped: 0, repeat: false }
            }
            last if mseq <= last => Delivery::Update { skipped: 0, repeat: true },
            last => {
                *slot = mseq;
                Delivery::Update { skipped: mseq - last - 1, repeat: false }
            }
        }
    }
}

/// The measured deliveries the connections set up expect: every measured
/// update once at each connection on `prices`, and at each other
/// connection expecting its market. Counted incrementally as the producer
/// advances (per market, and the sum over connections).
pub(crate) struct MarketExpectation {
    markets: Arc<Markets>,
    /// Connections set up on `prices`.
    everything: u64,
    /// Per market: the other connections set up that expect it.
    weight: Vec<u64>,
    /// Measured updates per market among `warm..upto`.
    counts: Vec<u64>,
    upto: u64,
    total: u64,
}

impl MarketExpectation {
    pub(crate) fn new(markets: Arc<Markets>, connected: &[usize], warm: u64) -> MarketExpectation {
        let mut everything = 0;
        let mut weight = vec![0; markets.len()];
        for i in connected {
            let e = markets.expect(&markets.channels_of(*i));
            if e.all {
                everything += 1;
            } else {
                for m in e.expected {
                    weight[m as usize] += 1;
                }
            }
        }
        let counts = vec![0; markets.len()];
        MarketExpectation { markets, everything, weight, counts, upto: warm, total: 0 }
    }

    fn advance(&mut self, produced: u64) {
        while self.upto < produced {
            let (m, _) = self.markets.update(self.upto);
            self.counts[m as usize] += 1;
            self.total += self.everything + self.weight[m as usize];
            self.upto += 1;
        }
    }

    /// Measured updates (so far) of market `m`.
    #[cfg(test)]
    fn count(&self, m: u32) -> u64 {
        self.counts[m as usize]
    }
}

impl Expectation for MarketExpectation {
    fn of(&mut self, i: usize, produced: u64) -> u64 {
        self.advance(produced);
        let e = self.markets.expect(&self.markets.channels_of(i));
        if e.all {
            self.counts.iter().sum()
        } else {
            e.expected.iter().map(|m| self.counts[*m as usize]).sum()
        }
    }

    fn total(&mut self, produced: u64) -> u64 {
        self.advance(produced);
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_deliveries_are_counted_per_market_as_the_producer_advances() {
        let m = Markets::small();
        // Over a run: the connection on prices (3) gets every measured
        // update once, the others what their markets got.
        let produced = 5000;
        let warm = 1000;
        let mut counts = vec![0u64; 16];
        for seq in warm..produced {
            counts[m.update(seq).0 as usize] += 1;
        }
        let markets = Arc::new(Markets::small());
        let mut x = MarketExpectation::new(markets.clone(), &[0, 1, 2, 3], warm);
        let total = x.total(produced);
        let each: Vec<u64> = (0..4).map(|i| x.of(i, produced)).collect();
        assert_eq!(each.iter().sum::<u64>(), total);
        assert!(m.on_prices(3) && !m.on_prices(0));
        assert_eq!(each[3], produced - warm, "on prices: every update once");
        let e0 = m.expect(&m.channels_of(0));
        assert_eq!(each[0], e0.expected.iter().map(|k| counts[*k as usize]).sum::<u64>());
        assert_eq!((0..16).map(|k| x.count(k)).collect::<Vec<_>>(), counts);
    }
}
