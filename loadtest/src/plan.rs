//! How a fan-out scenario plugs into the engine (fanout.rs): its channels,
//! the check each connection runs on what it receives, what the
//! connections should get (for the lost figure), the routing fields of
//! each update, and what it adds to the result. Nothing here does IO.

use serde_json::{Map, Value};

use crate::fanout::LoadOpts;
use crate::{Channels, Setup};

/// What one update frame was to the connection that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// A live update it expects: `skipped` numbers missing in its stream
    /// before it, `repeat` when it had it (or a newer one) already.
    Update { skipped: u64, repeat: bool },
    /// The last update of a market it subscribed, produced before the
    /// subscribe and sent ahead of that market's live updates.
    Snapshot,
    /// An update it should not have had (another market's).
    Leaked,
}

/// Checks the frames one connection receives.
pub(crate) trait Check: 'static {
    /// `payload` is the frame, `seq` and `sent_ns` the stamps read from it.
    fn see(&mut self, payload: &[u8], seq: u64, sent_ns: u64) -> Delivery;
}

/// What a connection should get, for the lost figure.
pub(crate) trait Expectation {
    /// Measured deliveries connection `i` should have had once updates
    /// `0..produced` were sent.
    fn of(&mut self, i: usize, produced: u64) -> u64;
    /// The same, summed over the connections set up.
    fn total(&mut self, produced: u64) -> u64;
}

/// Writes the routing fields of update `seq` into a value (on the
/// producer's thread).
pub(crate) type Stamper = Box<dyn FnMut(u64, &mut String) + Send>;

/// A fan-out scenario: what the engine needs beyond the shared settings.
pub(crate) trait Plan {
    type Check: Check;
    /// `fanout`, `churn`, `markets`.
    fn scenario(&self) -> &'static str;
    /// Whether deliveries are routed (checked for leaks and snapshots):
    /// adds the `leaked` and `snapshots` figures, their verdict rules and
    /// the progress count of leaks.
    fn routed(&self) -> bool {
        false
    }
    /// The channels of connection `i`.
    fn channels(&self) -> Channels;
    /// The check of connection `i`, once set up.
    fn check(&self, i: usize, setup: &Setup) -> Self::Check;
    /// What the connections set up (by index) should get; updates from
    /// `warm` on are measured.
    fn expectation(&self, connected: &[usize], warm: u64) -> Box<dyn Expectation>;
    /// Writes the routing fields of update `seq` (`"token":...,"chainId":...,`)
    /// into a value; runs on the producer's thread.
    fn stamper(&self) -> Stamper;
    /// The first line of the human summary.
    fn headline(&self, subscribers: usize, rate: u64, o: &LoadOpts) -> String;
    /// Fields the scenario adds to the JSON result.
    fn report(&self, _r: &mut Map<String, Value>, _t: &Totals) {}
    /// Lines the scenario adds to the human summary.
    fn describe(&self, _t: &Totals) {}
}

/// The counts a scenario may add to its result.
pub(crate) struct Totals {
    /// Updates produced in the measured window (from the end of warm-up).
    pub(crate) measured_updates: u64,
    pub(crate) expected_measured: u64,
    pub(crate) leaked: u64,
    pub(crate) snapshots: u64,
    pub(crate) snapshots_announced: u64,
    /// Connections that missed at least one expected delivery.
    pub(crate) connections_short: u64,
}
