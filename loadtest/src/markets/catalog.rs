//! The markets of a run: their names, their popularity (Zipf), every
//! seeded draw (a connection's markets, an update's market, letter cases)
//! and what a set of channels expects. No IO, no clock.
//!
//! Markets are fixed by their index (market `k` is the `k`-th most
//! popular): chains in turn, and per chain a symbol, its lower-case twin
//! (another market: symbols compare exactly), then two `0x` addresses.
//! Addresses are produced and subscribed in mixed, lower or upper case
//! (they compare case-insensitively). Every draw is a function of
//! `--seed` and an index, so a connection's markets and an update's market
//! can be recomputed anywhere without storing them.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::ws::{field_u64, Key};

/// The letter case an address is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Case {
    /// As named (mixed, like an EIP-55 checksum).
    Mixed,
    Lower,
    Upper,
}

impl Case {
    fn of(bits: u64) -> Case {
        [Case::Mixed, Case::Lower, Case::Upper][(bits % 3) as usize]
    }
}

/// Symbols the markets are named after (each with an upper-case letter, so
/// its lower-case twin differs; no two equal ignoring case).
const SYMBOLS: &[&str] = &[
    "ETH", "WBTC", "USDC", "USDT", "DAI", "LINK", "UNI", "AAVE", "ARB", "OP", "POL", "BNB", "CAKE", "PEPE", "SHIB",
    "USDC.e", "cbETH", "wstETH", "rETH", "GMX", "crvUSD", "sUSD", "FRAX", "LDO", "MKR", "SNX", "COMP", "YFI", "SUSHI",
    "BAL",
];

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic generator (splitmix64), one stream per
/// (seed, purpose, index): draws never depend on the order they are made in.
struct Rng(u64);

const CONNECTIONS: u64 = 1;
const UPDATES: u64 = 2;
const ADDRESSES: u64 = 3;

impl Rng {
    fn new(seed: u64, purpose: u64, i: u64) -> Rng {
        Rng(mix(mix(seed ^ purpose.rotate_left(48)) ^ i))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Tokens compare exactly, except addresses (`0x` + 40 hex digits), which
/// compare case-insensitively: lower-cased here.
pub(crate) fn normalize(token: &str) -> Cow<'_, str> {
    let b = token.as_bytes();
    let address = b.len() == 42 && b.starts_with(b"0x") && b[2..].iter().all(u8::is_ascii_hexdigit);
    if address && b.iter().any(u8::is_ascii_uppercase) {
        Cow::Owned(token.to_ascii_lowercase())
    } else {
        Cow::Borrowed(token)
    }
}

fn is_address(token: &str) -> bool {
    token.len() == 42 && token.starts_with("0x")
}

/// Writes `token` in `case` (only addresses change).
pub(super) fn write_cased(out: &mut String, token: &str, case: Case) {
    if !is_address(token) || case == Case::Mixed {
        out.push_str(token);
        return;
    }
    out.push_str("0x");
    for c in token[2..].chars() {
        out.push(if case == Case::Lower { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() });
    }
}

/// The markets of a run, their popularity, and every seeded draw.
pub(crate) struct Markets {
    /// Chain id and token (addresses in mixed case) of market k.
    pub(super) names: Vec<(u64, String)>,
    /// Market by chain id and normalized token.
    index: HashMap<(u64, String), u32>,
    /// cdf[k]: the probability of drawing a market at most k (Zipf).
    cdf: Vec<f64>,
    seed: u64,
    pub(super) per_connection: usize,
    prices_share: f64,
}

/// The name of the market `j`-th on its chain (`i` overall).
fn token_name(i: usize, j: usize) -> String {
    let symbol = |g: usize| {
        let base = SYMBOLS[g % SYMBOLS.len()];
        match g / SYMBOLS.len() {
            0 => base.to_string(),
            n => format!("{base}_{n}"),
        }
    };
    match j % 4 {
        0 => symbol(j / 4),
        1 => symbol(j / 4).to_ascii_lowercase(),
        _ => {
            let mut r = Rng::new(0, ADDRESSES, i as u64);
            let (hex, upper) = (r.next() as u128 | (r.next() as u128) << 64, r.next());
            let mut s = String::from("0x");
            for d in 0..40 {
                let nibble = if d < 32 { (hex >> (4 * d)) & 0xF } else { ((upper >> (4 * (d - 32))) & 0xF) as u128 };
                let c = char::from_digit(nibble as u32, 16).unwrap();
                // Mixed case, as a checksum would have it.
                s.push(if (upper >> (d + 24)) & 1 == 1 { c.to_ascii_uppercase() } else { c });
            }
            s
        }
    }
}

impl Markets {
    pub(crate) fn with(
        markets: usize,
        chains: &[u64],
        s: f64,
        seed: u64,
        per_connection: usize,
        prices_share: f64,
    ) -> Markets {
        let names: Vec<(u64, String)> =
            (0..markets).map(|i| (chains[i % chains.len()], token_name(i, i / chains.len()))).collect();
        let index = names.iter().enumerate().map(|(k, (c, t))| ((*c, normalize(t).into_owned()), k as u32)).collect();
        let weights: Vec<f64> = (1..=markets).map(|k| (k as f64).powf(-s)).collect();
        let sum: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / sum;
                acc
            })
            .collect();
        *cdf.last_mut().unwrap() = 1.0;
        Markets { names, index, cdf, seed, per_connection, prices_share }
    }

    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// A market drawn by popularity from `u` in [0, 1).
    fn draw(&self, u: f64) -> u32 {
        (self.cdf.partition_point(|c| *c <= u).min(self.cdf.len() - 1)) as u32
    }

    /// A market drawn by popularity with the generator of `purpose`/`i`.
    #[cfg(test)]
    fn draw_with(&self, purpose: u64, i: u64) -> u32 {
        self.draw(Rng::new(self.seed, purpose, i).unit())
    }

    /// The market of update `seq`, and the case its address is written in.
    pub(crate) fn update(&self, seq: u64) -> (u32, Case) {
        let mut r = Rng::new(self.seed, UPDATES, seq);
        let m = self.draw(r.unit());
        (m, Case::of(r.next()))
    }

    /// Whether connection `i` is also on `prices`: the first n connections
    /// hold floor(n x share) of them, spread evenly.
    pub(crate) fn on_prices(&self, i: usize) -> bool {
        ((i + 1) as f64 * self.prices_share).floor() > (i as f64 * self.prices_share).floor()
    }

    /// Connection `i`'s markets (distinct, by popularity) and the case it
    /// names each address in.
    pub(crate) fn markets_of(&self, i: usize) -> Vec<(u32, Case)> {
        let n = self.per_connection.min(self.len());
        let mut r = Rng::new(self.seed, CONNECTIONS, i as u64);
        let mut picked: Vec<(u32, Case)> = Vec::with_capacity(n);
        let mut attempts = 0;
        while picked.len() < n && attempts < 64 * n {
            let m = self.draw(r.unit());
            let case = Case::of(r.next());
            if !picked.iter().any(|(p, _)| *p == m) {
                picked.push((m, case));
            }
            attempts += 1;
        }
        // Nearly every market taken (n close to --markets): the most
        // popular ones not drawn yet.
        let mut m = 0;
        while picked.len() < n {
            if !picked.iter().any(|(p, _)| *p == m) {
                picked.push((m, Case::Mixed));
            }
            m += 1;
        }
        picked
    }

    /// The channel name of market `m`, its address in `case`.
    pub(crate) fn channel(&self, m: u32, case: Case) -> String {
        let (chain, token) = &self.names[m as usize];
        let mut s = format!("prices:{chain}:");
        write_cased(&mut s, token, case);
        s
    }

    /// The channels connection `i` subscribes to.
    pub(crate) fn channels_of(&self, i: usize) -> Vec<String> {
        let mut chs: Vec<String> = self.markets_of(i).into_iter().map(|(m, case)| self.channel(m, case)).collect();
        if self.on_prices(i) {
            chs.push("prices".into());
        }
        chs
    }

    /// The market named `token` on `chain` (addresses in any case).
    pub(crate) fn find(&self, chain: u64, token: &str) -> Option<u32> {
        self.index.get(&(chain, normalize(token).into_owned())).copied()
    }

    /// The market of a frame, from its `chainId` and `token`.
    pub(super) fn market_in(&self, p: &[u8]) -> Option<u32> {
        let chain = field_u64(p, &CHAIN_ID)?;
        let at = TOKEN.value_at(p)?;
        let len = memchr::memchr(b'"', &p[at..])?;
        self.find(chain, std::str::from_utf8(&p[at..at + len]).ok()?)
    }

    /// What a connection subscribed to `channels` expects: every update on
    /// `prices`; else the updates of its markets and of every market of
    /// its chains; each once however many of its channels match. Names
    /// that are no market of this run (`prices:1:Eth` when the market is
    /// `ETH`) expect nothing.
    pub(crate) fn expect<S: AsRef<str>>(&self, channels: &[S]) -> Expect {
        let (mut all, mut explicit, mut chains) = (false, Vec::new(), Vec::new());
        for ch in channels {
            let ch = ch.as_ref();
            if ch == "prices" {
                all = true;
                continue;
            }
            let Some(rest) = ch.strip_prefix("prices:") else { continue };
            let (chain, token) = match rest.split_once(':') {
                Some((c, t)) => (c, Some(t)),
                None => (rest, None),
            };
            let canonical = !chain.is_empty()
                && chain.bytes().all(|b| b.is_ascii_digit())
                && (chain == "0" || !chain.starts_with('0'));
            let Some(chain) = chain.parse::<u64>().ok().filter(|_| canonical) else { continue };
            match token {
                None => chains.push(chain),
                Some(t) => explicit.extend(self.find(chain, t)),
            }
        }
        explicit.sort_unstable();
        explicit.dedup();
        let mut expected = Vec::new();
        if !all {
            expected = explicit.clone();
            if !chains.is_empty() {
                expected.extend((0..self.len() as u32).filter(|m| chains.contains(&self.names[*m as usize].0)));
            }
            expected.sort_unstable();
            expected.dedup();
        }
        Expect { all, explicit, expected }
    }
}

static CHAIN_ID: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"chainId\":"));
static TOKEN: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"token\":\""));

/// The updates a connection expects.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Expect {
    /// On `prices`: every update.
    pub(crate) all: bool,
    /// Its market channels (sorted): the markets whose snapshot it may get.
    pub(crate) explicit: Vec<u32>,
    /// Unless `all`: every market it expects (sorted, each once).
    pub(crate) expected: Vec<u32>,
}

impl Expect {
    pub(super) fn expects(&self, m: u32) -> bool {
        self.all || self.expected.binary_search(&m).is_ok()
    }
}

#[cfg(test)]
impl Markets {
    /// 16 markets over 4 chains, 3 per connection, 1 connection in 4 on `prices`.
    pub(super) fn small() -> Markets {
        Markets::with(16, &[1, 56, 137, 8453], 1.1, 7, 3, 0.25)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_draws_are_seeded_and_favour_the_most_popular() {
        let m = Markets::with(1000, &[1, 56, 137, 8453], 1.1, 42, 5, 0.1);
        let draws = |m: &Markets| (0..20_000u64).map(|i| m.draw_with(UPDATES, i)).collect::<Vec<_>>();
        let a = draws(&m);
        assert_eq!(a, draws(&Markets::with(1000, &[1, 56, 137, 8453], 1.1, 42, 5, 0.1)), "same seed, same draws");
        assert_ne!(a, draws(&Markets::with(1000, &[1, 56, 137, 8453], 1.1, 43, 5, 0.1)), "another seed, others");
        let mut counts = vec![0u64; 1000];
        for d in &a {
            counts[*d as usize] += 1;
        }
        let top = (0..1000).max_by_key(|k| counts[*k]).unwrap();
        assert_eq!(top, 0, "market 0 is the most popular");
        assert!(counts[0] > counts[1] && counts[1] > counts[9] && counts[9] > counts[99], "{:?}", &counts[..10]);
        // 1/H(1000, 1.1) = 0.179 of the draws go to market 0.
        let share = counts[0] as f64 / a.len() as f64;
        assert!((0.16..0.20).contains(&share), "{share}");
        // A connection's markets: distinct, reproducible, from the same law.
        let c = m.markets_of(17);
        assert_eq!(c, m.markets_of(17));
        let mut ids: Vec<u32> = c.iter().map(|(k, _)| *k).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 5);
        let with_top = (0..2000).filter(|i| m.markets_of(*i).iter().any(|(k, _)| *k == 0)).count();
        assert!(with_top > 1000, "most connections hold the top market: {with_top}");
        // Every market, when a connection takes them all.
        let all = Markets::with(4, &[1], 3.0, 1, 4, 0.0);
        let mut ids: Vec<u32> = all.markets_of(0).iter().map(|(k, _)| *k).collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 1, 2, 3]);
        // s = 0: uniform.
        let u = Markets::with(10, &[1], 0.0, 1, 1, 0.0);
        let mut counts = [0u64; 10];
        for i in 0..10_000 {
            counts[u.draw_with(UPDATES, i) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[test]
    fn markets_are_named_over_the_chains_with_case_twins_and_addresses() {
        let m = Markets::small();
        assert_eq!(m.names[0], (1, "ETH".to_string()));
        assert_eq!(m.names[1], (56, "ETH".to_string()));
        assert_eq!(m.names[4], (1, "eth".to_string()), "the lower-case twin is another market");
        let addr = &m.names[8].1;
        assert!(is_address(addr) && addr.as_bytes()[2..].iter().all(u8::is_ascii_hexdigit), "{addr}");
        assert_ne!(normalize(addr), *addr, "produced in mixed case");
        assert_eq!(m.names.iter().map(|(c, t)| (c, normalize(t))).collect::<std::collections::HashSet<_>>().len(), 16);
        assert_eq!(m.channel(8, Case::Upper), format!("prices:1:0x{}", addr[2..].to_ascii_uppercase()));
        // On prices: 1 in 4, evenly.
        assert_eq!((0..8).filter(|i| m.on_prices(*i)).collect::<Vec<_>>(), [3, 7]);
    }

    #[test]
    fn the_expected_set_counts_overlaps_once_and_addresses_in_any_case() {
        let m = Markets::small();
        let addr = m.names[8].1.clone();
        let lower = format!("prices:1:{}", addr.to_ascii_lowercase());
        let upper = format!("prices:1:0x{}", addr[2..].to_ascii_uppercase());
        // The same address in two cases: one market.
        let e = m.expect(&[lower.as_str(), upper.as_str(), "prices:1:ETH", "prices:1:ETH"]);
        assert_eq!(e, Expect { all: false, explicit: vec![0, 8], expected: vec![0, 8] });
        // Symbols are exact: `eth` is its own market, `Eth` is none.
        assert_eq!(m.expect(&["prices:1:eth", "prices:1:Eth"]).expected, [4]);
        // A chain channel: every market of the chain, once with its markets.
        assert_eq!(m.expect(&["prices:1", "prices:1:ETH"]).expected, [0, 4, 8, 12]);
        assert_eq!(m.expect(&["prices:01"]).expected, Vec::<u32>::new(), "not a chain id's decimal text");
        // `prices` with markets: everything, once.
        let all = m.expect(&["prices:1:ETH", "prices"]);
        assert!(all.all && all.explicit == [0]);
    }
}
