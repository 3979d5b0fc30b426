//! How far apart sweeps start: pure arithmetic on durations, no clock.
//!
//! Below saturation a sweep starts as soon as frames are queued (no added
//! latency). When a sweep took most of the time it was given and frames
//! were already waiting when it ended (a saturated core), the next one
//! starts no sooner than the interval after it began: each socket write
//! then carries more frames, which is what brings CPU per delivery down.
//! The interval stretches when sweeps cost more than a share of it (a
//! slower or busier machine, more connections), so CPU per delivery holds
//! and latency gives instead.

use std::time::Duration;

/// How sweeps are spaced: `WS_COALESCE_MAX_MS` sets `adaptive` (a quarter
/// of it; it stretches up to `MAX_STRETCH` times), the bench switches
/// `WS_BENCH_FLUSH_INTERVAL_US` and `WS_BENCH_SWEEP_SHARE_PCT` the others.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Always applies; zero: none.
    pub fixed: Duration,
    /// Applies after a saturated sweep; zero: never.
    pub adaptive: Duration,
    /// The share of the core (1–100) saturated sweeps may take.
    pub busy_pct: u8,
}

/// The adaptive interval stretches to at most this many times its setting.
pub const MAX_STRETCH: u32 = 4;

impl Pacing {
    /// The least time between sweep starts: the fixed interval, or the
    /// saturated one after a saturated sweep.
    pub fn interval(&self, saturated: bool, sweep_avg: Duration) -> Duration {
        if saturated {
            self.fixed.max(self.saturated_interval(sweep_avg))
        } else {
            self.fixed
        }
    }

    /// Whether a sweep that took `took` and left frames waiting
    /// (`backlog`) was saturated.
    pub fn saturated(&self, took: Duration, backlog: bool) -> bool {
        took * 2 >= self.adaptive && backlog
    }

    /// `adaptive`, or longer when sweeps (`sweep_avg` each) would otherwise
    /// take more than `busy_pct` of the core: then sweep time over that
    /// share, capped at `MAX_STRETCH` × `adaptive`.
    fn saturated_interval(&self, sweep_avg: Duration) -> Duration {
        if self.adaptive.is_zero() || self.busy_pct >= 100 {
            return self.adaptive;
        }
        let share = sweep_avg * 100 / u32::from(self.busy_pct.max(1));
        self.adaptive.max(share).min(self.adaptive * MAX_STRETCH)
    }
}

/// The running average of sweep durations (weights 3:1, old:new).
pub fn average(avg: Duration, took: Duration) -> Duration {
    if avg.is_zero() {
        took
    } else {
        (avg * 3 + took) / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_are_spaced_only_after_a_saturated_sweep() {
        let ms = Duration::from_millis;
        let p = |fixed, adaptive| Pacing { fixed: ms(fixed), adaptive: ms(adaptive), busy_pct: 100 };
        let short = ms(5);
        assert_eq!(p(0, 40).interval(false, short), ms(0), "not saturated: start at once");
        assert_eq!(p(0, 40).interval(true, short), ms(40), "saturated: space sweeps");
        assert_eq!(p(0, 0).interval(true, short), ms(0), "adaptive off");
        assert_eq!(p(60, 40).interval(true, short), ms(60), "a longer fixed interval wins");
        assert_eq!(p(10, 40).interval(false, short), ms(10), "the fixed interval always applies");
        assert!(p(0, 40).saturated(ms(20), true));
        assert!(!p(0, 40).saturated(ms(19), true), "under half the interval: not saturated");
        assert!(!p(0, 40).saturated(ms(30), false), "nothing waiting: not saturated");
    }

    #[test]
    fn saturated_sweeps_keep_to_their_share_of_the_core() {
        let ms = Duration::from_millis;
        let p = |adaptive, busy_pct| Pacing { fixed: ms(0), adaptive: ms(adaptive), busy_pct };
        assert_eq!(p(40, 65).interval(true, ms(26)), ms(40), "26 ms is 65% of 40: no stretch");
        assert_eq!(p(40, 65).interval(true, ms(39)), ms(60), "39 ms sweeps: 65% of 60 ms");
        assert_eq!(p(40, 50).interval(true, ms(30)), ms(60));
        assert_eq!(p(40, 65).interval(true, ms(500)), ms(160), "capped at 4x");
        assert_eq!(p(40, 100).interval(true, ms(55)), ms(40), "100: never stretched");
        assert_eq!(p(40, 65).interval(false, ms(39)), ms(0), "only when saturated");
        assert_eq!(p(0, 65).interval(true, ms(39)), ms(0), "adaptive off: no stretch either");
    }

    #[test]
    fn the_average_weighs_the_past_three_to_one() {
        let ms = Duration::from_millis;
        assert_eq!(average(Duration::ZERO, ms(8)), ms(8));
        assert_eq!(average(ms(8), ms(16)), ms(10));
    }
}
