//! Logging: set-up, and the limiters that keep warnings on hot paths and
//! per-connection lines to a bounded rate (what they hold back is counted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ShardStats;

/// Lets a warning through at most once per interval (per call site).
#[derive(Debug)]
pub struct LogLimiter {
    start: Instant,
    interval_ms: u64,
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            start: Instant::now(),
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event may be logged, with how many were
    /// suppressed since the last one; `None` when it must stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64 + self.interval_ms;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.interval_ms
            && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// A token bucket for per-connection log lines on one shard (refused
/// upgrades, failed authentications, server closes): up to `burst` lines
/// at once and `per_sec` a second after that, so a flood of bad clients
/// cannot fill the disk. What it holds back is counted: the next line
/// carries the count (`suppressed`), and the shard's
/// `log_lines_suppressed` total is exported.
#[derive(Debug)]
pub struct LogBudget {
    per_sec: u32,
    burst: u32,
    state: std::cell::Cell<(u32, Instant)>,
    suppressed: std::cell::Cell<u64>,
}

impl LogBudget {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec,
            burst,
            state: std::cell::Cell::new((burst, Instant::now())),
            suppressed: std::cell::Cell::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were
    /// held back since the last one; `None` (and counted in `stats`) when
    /// the budget is spent.
    pub fn allow(&self, now: Instant, stats: &ShardStats) -> Option<u64> {
        let (mut tokens, since) = self.state.get();
        let earned = (now.saturating_duration_since(since).as_millis() as u64 * self.per_sec as u64 / 1000) as u32;
        let mut since = since;
        if earned > 0 {
            tokens = tokens.saturating_add(earned).min(self.burst);
            since = now;
        }
        if tokens == 0 {
            self.state.set((0, since));
            self.suppressed.set(self.suppressed.get() + 1);
            stats.log_lines_suppressed.inc();
            return None;
        }
        self.state.set((tokens - 1, since));
        Some(self.suppressed.replace(0))
    }
}

/// Installs the global tracing subscriber (`LOG_FORMAT`, `LOG_LEVEL`).
pub fn init_logging(format: crate::config::LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a file or pipe break grep.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if format == crate::config::LogFormat::Json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_budget_allows_a_burst_then_a_rate_and_counts_the_rest() {
        let stats = ShardStats::default();
        let budget = LogBudget::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(budget.allow(t0, &stats), Some(0));
        }
        assert_eq!(budget.allow(t0, &stats), None);
        assert_eq!(budget.allow(t0, &stats), None);
        assert_eq!(stats.log_lines_suppressed.get(), 2);
        // 100 ms later one token (10 a second) has been earned.
        assert_eq!(budget.allow(t0 + Duration::from_millis(100), &stats), Some(2), "reports what it held back");
        assert_eq!(budget.allow(t0 + Duration::from_millis(100), &stats), None);
        // A long quiet refills the burst, no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(budget.allow(later, &stats).is_some());
        }
        assert_eq!(budget.allow(later, &stats), None);
    }

    #[test]
    fn log_limiter_lets_one_through_per_interval() {
        let l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
    }
}
