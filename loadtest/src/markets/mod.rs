//! The `markets` scenario: connections on a few markets each
//! (`prices:<chainId>:<token>`), drawn by popularity (Zipf), some also on
//! `prices`, and an open-loop producer whose updates go to markets with
//! the same popularity. Every connection checks that it gets exactly the
//! updates of its markets (or all, on `prices`), each once: nothing lost,
//! leaked or repeated. It runs on the fan-out engine (fanout.rs);
//! `catalog` names the markets and makes the seeded draws, `check` checks
//! each connection.

mod catalog;
mod check;

use std::cell::Cell;
use std::sync::Arc;

use anyhow::bail;
use clap::Args;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::fanout::LoadOpts;
use crate::plan::{Expectation, Plan, Stamper, Totals};
use crate::{per, Channels, Setup};
use catalog::{write_cased, Markets};
use check::{MarketCheck, MarketExpectation};

#[derive(Args, Serialize)]
#[command(mut_arg("connections", |a| a.default_value("10000")))]
pub struct MarketsArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) opts: LoadOpts,
    /// Updates per second over all markets (open loop), each to one market
    /// drawn with the markets' popularity.
    #[arg(long, short = 'r', default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) rate: u64,
    /// Markets, over the chains in turn; market k is the k-th most popular.
    #[arg(long, default_value_t = 1000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub(crate) markets: usize,
    /// Chain ids the markets are spread over, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,56,137,8453")]
    pub(crate) chains: Vec<u64>,
    /// Markets each connection subscribes to (distinct, drawn by popularity).
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=255))]
    pub(crate) per_connection: usize,
    /// Zipf exponent of the markets' popularity: market k is drawn with
    /// weight 1/k^s (0: all equally).
    #[arg(long, default_value_t = 1.1)]
    pub(crate) zipf_s: f64,
    /// Share of the connections also subscribed to `prices` (every update),
    /// spread evenly over them.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) prices_share: f64,
    /// Seed of every draw (connections' markets, updates' markets, letter
    /// cases): the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
}

pub async fn run(a: MarketsArgs) -> anyhow::Result<u8> {
    if a.chains.is_empty() {
        bail!("--chains: at least one chain id");
    }
    let mut chains = a.chains.clone();
    chains.sort_unstable();
    chains.dedup();
    if chains.len() != a.chains.len() {
        bail!("--chains {:?}: a chain id appears twice", a.chains);
    }
    if a.per_connection > a.markets {
        bail!(
            "--per-connection {} is more than --markets {}: each connection's markets are distinct",
            a.per_connection,
            a.markets
        );
    }
    if !(0.0..=10.0).contains(&a.zipf_s) {
        bail!("--zipf-s {}: expected 0 (uniform) to 10", a.zipf_s);
    }
    if !(0.0..=1.0).contains(&a.prices_share) {
        bail!("--prices-share {}: expected a share from 0 to 1", a.prices_share);
    }
    let settings = serde_json::to_value(&a)?;
    let markets = Arc::new(Markets::with(a.markets, &a.chains, a.zipf_s, a.seed, a.per_connection, a.prices_share));
    let plan = MarketsPlan { markets, on_prices: Cell::new(0), subscriptions: Cell::new(0), subscribed: Cell::new(0) };
    crate::fanout::run(&a.opts, a.rate, None, settings, plan).await
}

struct MarketsPlan {
    markets: Arc<Markets>,
    /// Of the connections set up: on `prices`, market subscriptions made,
    /// distinct markets subscribed.
    on_prices: Cell<u64>,
    subscriptions: Cell<u64>,
    subscribed: Cell<u64>,
}

impl Plan for MarketsPlan {
    type Check = MarketCheck;

    fn scenario(&self) -> &'static str {
        "markets"
    }

    fn routed(&self) -> bool {
        true
    }

    fn channels(&self) -> Channels {
        let markets = self.markets.clone();
        std::rc::Rc::new(move |i| markets.channels_of(i))
    }

    fn check(&self, i: usize, setup: &Setup) -> MarketCheck {
        let expect = self.markets.expect(&self.markets.channels_of(i));
        MarketCheck::new(self.markets.clone(), expect, setup.subscribed_ns)
    }

    fn expectation(&self, connected: &[usize], warm: u64) -> Box<dyn Expectation> {
        let mut subscribed = vec![false; self.markets.len()];
        let (mut on_prices, mut subscriptions) = (0, 0);
        for i in connected {
            on_prices += self.markets.on_prices(*i) as u64;
            for (m, _) in self.markets.markets_of(*i) {
                subscriptions += 1;
                subscribed[m as usize] = true;
            }
        }
        self.on_prices.set(on_prices);
        self.subscriptions.set(subscriptions);
        self.subscribed.set(subscribed.iter().filter(|s| **s).count() as u64);
        Box::new(MarketExpectation::new(self.markets.clone(), connected, warm))
    }

    fn stamper(&self) -> Stamper {
        let markets = self.markets.clone();
        let mut mseq = vec![0u64; markets.len()];
        Box::new(move |seq, v: &mut String| {
            use std::fmt::Write;
            let (m, case) = markets.update(seq);
            let (chain, token) = &markets.names[m as usize];
            v.push_str(r#""token":""#);
            write_cased(v, token, case);
            let _ = write!(v, r#"","chainId":{chain},"mseq":{},"#, mseq[m as usize]);
            mseq[m as usize] += 1;
        })
    }

    fn headline(&self, subscribers: usize, rate: u64, o: &LoadOpts) -> String {
        let chains: Vec<u64> = {
            let mut c: Vec<u64> = self.markets.names.iter().map(|(c, _)| *c).collect();
            c.sort_unstable();
            c.dedup();
            c
        };
        format!(
            "markets: {subscribers} connections ({} also on prices) x {} of {} markets on chains {chains:?}, \
             {rate} updates/s for {} s ({} B values)",
            self.on_prices.get(),
            self.markets.per_connection,
            self.markets.len(),
            o.duration,
            o.size
        )
    }

    fn report(&self, r: &mut Map<String, Value>, t: &Totals) {
        for (k, v) in [
            ("connections_on_prices", json!(self.on_prices.get())),
            ("market_subscriptions", json!(self.subscriptions.get())),
            ("markets_subscribed", json!(self.subscribed.get())),
            ("measured_updates", json!(t.measured_updates)),
            ("deliveries_per_update", per(t.expected_measured as f64, t.measured_updates as f64)),
            ("leaked", json!(t.leaked)),
            ("snapshots", json!(t.snapshots)),
            ("snapshots_announced", json!(t.snapshots_announced)),
            ("connections_short", json!(t.connections_short)),
        ] {
            r.insert(k.into(), v);
        }
    }

    fn describe(&self, t: &Totals) {
        out!(
            "  {} market subscriptions over {} markets; {} measured updates, {} deliveries each on average; \
             {} connections short of their updates",
            self.subscriptions.get(),
            self.subscribed.get(),
            t.measured_updates,
            per(t.expected_measured as f64, t.measured_updates as f64)
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}")),
            t.connections_short
        );
        out!("  snapshots: {} received, {} announced by the subscribe replies", t.snapshots, t.snapshots_announced);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Check, Delivery};

    /// The value the producer sends for update `seq` (as a server frame's data).
    fn frame(stamp: &mut dyn FnMut(u64, &mut String), seq: u64, sent_ns: u64) -> Vec<u8> {
        let mut v = String::from(r#"{"id":"m1","type":"price_update","timestamp":1,"data":{"#);
        stamp(seq, &mut v);
        v.push_str(&format!(r#""seq":{seq},"sentNs":{sent_ns}}}}}"#));
        v.into_bytes()
    }

    #[test]
    fn a_connection_gets_its_markets_once_and_snapshots_are_told_apart() {
        let markets = Arc::new(Markets::small());
        let plan = MarketsPlan {
            markets: markets.clone(),
            on_prices: Cell::new(0),
            subscriptions: Cell::new(0),
            subscribed: Cell::new(0),
        };
        let mut stamp = plan.stamper();
        // The first update of market 0 (ETH on chain 1) and one of another.
        let eth = (0..).find(|s| markets.update(*s).0 == 0).unwrap();
        let other = (0..).find(|s| markets.update(*s).0 == 5).unwrap();
        let mut frames: Vec<(u64, Vec<u8>)> = Vec::new();
        for seq in 0..=eth.max(other) {
            frames.push((seq, frame(&mut *stamp, seq, 2_000 + seq)));
        }
        // On prices and ETH: ETH once, then its repeat is a duplicate.
        let e = markets.expect(&["prices:1:ETH", "prices"]);
        let mut c = MarketCheck::new(markets.clone(), e, 1_000);
        let (seq, f) = &frames[eth as usize];
        assert_eq!(c.see(f, *seq, 2_000 + seq), Delivery::Update { skipped: 0, repeat: false });
        assert_eq!(c.see(f, *seq, 2_000 + seq), Delivery::Update { skipped: 0, repeat: true });
        let (seq, f) = &frames[other as usize];
        assert_eq!(c.see(f, *seq, 2_000 + seq), Delivery::Update { skipped: 0, repeat: false });
        // On ETH only: another market's update leaks.
        let mut c = MarketCheck::new(markets.clone(), markets.expect(&["prices:1:ETH"]), 1_000);
        assert_eq!(c.see(f, *seq, 2_000 + seq), Delivery::Leaked);
        // A snapshot: produced before the subscribe, before any live update.
        let (seq, f) = &frames[eth as usize];
        let mut c = MarketCheck::new(markets.clone(), markets.expect(&["prices:1:ETH"]), 1_000_000);
        assert_eq!(c.see(f, *seq, 2_000 + seq), Delivery::Snapshot);
        assert_eq!(c.see(f, *seq, 2_000 + seq), Delivery::Update { skipped: 0, repeat: true }, "a second one");
        // A snapshot of a market not subscribed, or on prices alone, leaks.
        let mut c = MarketCheck::new(markets.clone(), markets.expect(&["prices:1:eth", "prices"]), 1_000_000);
        assert_eq!(c.see(f, *seq, 2_000 + seq), Delivery::Leaked);
        // Gaps within a market's stream.
        let eths: Vec<u64> = (0..400).filter(|s| markets.update(*s).0 == 0).take(3).collect();
        let mut c = MarketCheck::new(markets.clone(), markets.expect(&["prices:1:ETH"]), 0);
        let mut stamp = plan.stamper();
        let fs: Vec<Vec<u8>> = (0..=eths[2]).map(|s| frame(&mut *stamp, s, 10 + s)).collect();
        assert_eq!(c.see(&fs[eths[0] as usize], eths[0], 10), Delivery::Update { skipped: 0, repeat: false });
        assert_eq!(c.see(&fs[eths[2] as usize], eths[2], 10), Delivery::Update { skipped: 1, repeat: false });
        assert_eq!(c.see(&fs[eths[1] as usize], eths[1], 10), Delivery::Update { skipped: 0, repeat: true }, "older");
    }
}
