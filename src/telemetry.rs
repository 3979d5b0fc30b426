//! Counters, histograms and logs.
//!
//! Owns: the per-shard statistics block ([`ShardStats`]), written only by its
//! own shard with plain relaxed load+store (no locked read-modify-write, no
//! cache line shared between writers) and summed by whichever shard serves a
//! scrape; the Prometheus text rendering; log set-up; and [`LogLimiter`],
//! which keeps warnings on hot paths to a bounded rate.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::protocol::message::Channel;

/// A counter written by one thread (its shard) and read by any.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning shard calls this, so a plain load+store is
    /// exact and avoids a locked instruction on the hot path.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_sub(n), Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Client message types counted in `messages_received_total`.
pub const RECEIVED_TYPES: [&str; 6] = ["authenticate", "subscribe", "unsubscribe", "ping", "invalid", "unknown"];
/// Server message types counted in `messages_sent_total`.
pub const SENT_TYPES: [&str; 11] = [
    "auth_required",
    "auth_success",
    "auth_failed",
    "subscribed",
    "unsubscribed",
    "pong",
    "error",
    "price_update",
    "order_update",
    "portfolio_update",
    "trade_update",
];

/// Index of a sent type in [`SENT_TYPES`].
pub fn sent_index(ty: &str) -> usize {
    SENT_TYPES.iter().position(|t| *t == ty).unwrap_or(6)
}

/// Index of an update channel's type in [`SENT_TYPES`].
pub fn update_index(channel: Channel) -> usize {
    7 + channel as usize
}

/// One shard's statistics. Cache-line aligned so shards never share a line.
#[repr(align(128))]
#[derive(Debug)]
pub struct ShardStats {
    pub connections_accepted: Counter,
    pub connections_active: Counter,
    pub connections_authenticated: Counter,
    pub http_requests: Counter,
    pub handshake_refusals: [Counter; 8],
    pub auth_success: Counter,
    pub auth_failure: Counter,
    pub received: [Counter; RECEIVED_TYPES.len()],
    pub sent: [Counter; SENT_TYPES.len()],
    pub rate_limited: Counter,
    pub rate_limit_closes: Counter,
    pub slow_consumer_closes: Counter,
    pub pong_timeouts: Counter,
    pub protocol_closes: Counter,
    pub updates_processed: Counter,
    pub deliveries: Counter,
    /// Socket writes done by the fan-out itself (no connection wake-up).
    pub direct_writes: Counter,
    /// Idle connections held without a task (gauge), and the transitions.
    pub connections_parked: Counter,
    pub parks: Counter,
    pub unparks: Counter,
    /// Parks refused by the kernel (the connection keeps its task).
    pub park_failures: Counter,
    /// Failed accepts (typically out of descriptors: the connection waits
    /// in the listen backlog while the shard backs off).
    pub accept_failures: Counter,
    pub subscribers: [Counter; 4],
    /// Publish -> queued for every subscriber on the shard (the price log
    /// or the private subscribers' outboxes), in µs.
    pub fanout_latency_us: Mutex<Histogram<u64>>,
    /// Kafka message timestamp -> the first write of the update's frame to
    /// a subscriber's socket on this shard, in µs (see `shard::Stamps`).
    pub e2e_latency_us: Mutex<Histogram<u64>>,
    /// Updates not sampled for `e2e_latency_us` (the sample queue was full).
    pub latency_samples_skipped: Counter,
    /// Per-connection log lines held back by the shard's [`LogBudget`].
    pub log_lines_suppressed: Counter,
}

/// Statuses counted in `handshake_refusals` (index = position).
pub const REFUSAL_STATUSES: [u16; 8] = [400, 401, 403, 404, 426, 429, 431, 503];

impl Default for ShardStats {
    fn default() -> Self {
        Self {
            connections_accepted: Counter::default(),
            connections_active: Counter::default(),
            connections_authenticated: Counter::default(),
            http_requests: Counter::default(),
            handshake_refusals: Default::default(),
            auth_success: Counter::default(),
            auth_failure: Counter::default(),
            received: Default::default(),
            sent: Default::default(),
            rate_limited: Counter::default(),
            rate_limit_closes: Counter::default(),
            slow_consumer_closes: Counter::default(),
            pong_timeouts: Counter::default(),
            protocol_closes: Counter::default(),
            updates_processed: Counter::default(),
            deliveries: Counter::default(),
            direct_writes: Counter::default(),
            connections_parked: Counter::default(),
            parks: Counter::default(),
            unparks: Counter::default(),
            park_failures: Counter::default(),
            accept_failures: Counter::default(),
            subscribers: Default::default(),
            // 1 µs .. 60 s at 3 significant figures; these bounds are valid.
            fanout_latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
            e2e_latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
            latency_samples_skipped: Counter::default(),
            log_lines_suppressed: Counter::default(),
        }
    }
}

impl ShardStats {
    pub fn refused(&self, status: u16) {
        if let Some(i) = REFUSAL_STATUSES.iter().position(|s| *s == status) {
            self.handshake_refusals[i].inc();
        }
    }
}

/// Sum of one counter over every shard.
pub fn total(shards: &[std::sync::Arc<ShardStats>], f: impl Fn(&ShardStats) -> u64) -> u64 {
    shards.iter().map(|s| f(s)).sum()
}

/// Latency buckets exported for the fan-out histogram, in seconds.
const BUCKETS_S: [f64; 15] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Extra lines a caller adds to the exposition (e.g. queue drops).
pub struct Extra<'a> {
    pub queue_dropped: &'a [u64],
}

/// Renders every shard's statistics in the Prometheus text format.
pub fn render_prometheus(shards: &[std::sync::Arc<ShardStats>], extra: &Extra) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let sum = |f: &dyn Fn(&ShardStats) -> u64| -> u64 { shards.iter().map(|s| f(s)).sum() };
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(
        &mut out,
        "moonx_ws_connections_accepted_total",
        "WebSocket upgrades accepted.",
        sum(&|s| s.connections_accepted.get()),
    );
    counter(&mut out, "moonx_ws_http_requests_total", "Plain HTTP requests served.", sum(&|s| s.http_requests.get()));
    counter(
        &mut out,
        "moonx_ws_rate_limited_total",
        "Client messages refused by the message limit.",
        sum(&|s| s.rate_limited.get()),
    );
    counter(
        &mut out,
        "moonx_ws_rate_limit_closes_total",
        "Connections closed with 4008.",
        sum(&|s| s.rate_limit_closes.get()),
    );
    counter(
        &mut out,
        "moonx_ws_slow_consumer_closes_total",
        "Connections closed with 4009 (output backlog over WS_MAX_BUFFERED_BYTES).",
        sum(&|s| s.slow_consumer_closes.get()),
    );
    counter(
        &mut out,
        "moonx_ws_pong_timeouts_total",
        "Connections dropped for silence after a ping.",
        sum(&|s| s.pong_timeouts.get()),
    );
    counter(
        &mut out,
        "moonx_ws_protocol_closes_total",
        "Connections closed for a frame-level violation (1002/1003/1007/1009).",
        sum(&|s| s.protocol_closes.get()),
    );
    counter(
        &mut out,
        "moonx_ws_updates_processed_total",
        "Updates taken from shard inboxes (counted once per shard).",
        sum(&|s| s.updates_processed.get()),
    );
    counter(
        &mut out,
        "moonx_ws_deliveries_total",
        "Update frames queued to subscribers.",
        sum(&|s| s.deliveries.get()),
    );
    counter(
        &mut out,
        "moonx_ws_log_lines_suppressed_total",
        "Per-connection log lines (refused upgrades, failed authentications, server closes) held back by the rate limit; the next line written says how many.",
        sum(&|s| s.log_lines_suppressed.get()),
    );
    counter(
        &mut out,
        "moonx_ws_latency_samples_skipped_total",
        "Updates left out of moonx_ws_kafka_to_socket_latency_seconds because a shard's sample queue was full.",
        sum(&|s| s.latency_samples_skipped.get()),
    );
    counter(
        &mut out,
        "moonx_ws_direct_writes_total",
        "Socket writes made by the shard fan-out directly, without waking the connection's task.",
        sum(&|s| s.direct_writes.get()),
    );
    counter(
        &mut out,
        "moonx_ws_parks_total",
        "Idle connections parked: their task and read state freed, the socket watched by the shard's poll ring.",
        sum(&|s| s.parks.get()),
    );
    counter(
        &mut out,
        "moonx_ws_unparks_total",
        "Parked connections given a task again (input, a deadline, a write the fan-out could not finish, shutdown).",
        sum(&|s| s.unparks.get()),
    );
    counter(
        &mut out,
        "moonx_ws_park_failures_total",
        "Parks the kernel refused (the connection kept its task); logged, rate-limited.",
        sum(&|s| s.park_failures.get()),
    );
    counter(
        &mut out,
        "moonx_ws_accept_failures_total",
        "Failed accepts, typically out of file descriptors (the connection waits in the backlog); logged, rate-limited.",
        sum(&|s| s.accept_failures.get()),
    );
    let _ = writeln!(
        out,
        "# HELP moonx_ws_connections_parked Open connections parked without a task.\n# TYPE moonx_ws_connections_parked gauge\nmoonx_ws_connections_parked {}",
        sum(&|s| s.connections_parked.get())
    );

    let _ = writeln!(
        out,
        "# HELP moonx_ws_connections_active Open WebSocket connections.\n# TYPE moonx_ws_connections_active gauge"
    );
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(out, "moonx_ws_connections_active{{shard=\"{i}\"}} {}", s.connections_active.get());
    }
    let _ = writeln!(out, "# HELP moonx_ws_connections_authenticated Open authenticated connections.\n# TYPE moonx_ws_connections_authenticated gauge\nmoonx_ws_connections_authenticated {}", sum(&|s| s.connections_authenticated.get()));
    let _ =
        writeln!(out, "# HELP moonx_ws_subscriptions Subscriptions per channel.\n# TYPE moonx_ws_subscriptions gauge");
    for ch in Channel::ALL {
        let _ = writeln!(
            out,
            "moonx_ws_subscriptions{{channel=\"{}\"}} {}",
            ch.name(),
            sum(&|s| s.subscribers[ch as usize].get())
        );
    }
    let _ = writeln!(
        out,
        "# HELP moonx_ws_auth_total Authentication attempts by result.\n# TYPE moonx_ws_auth_total counter"
    );
    let _ = writeln!(out, "moonx_ws_auth_total{{result=\"success\"}} {}", sum(&|s| s.auth_success.get()));
    let _ = writeln!(out, "moonx_ws_auth_total{{result=\"failure\"}} {}", sum(&|s| s.auth_failure.get()));
    let _ = writeln!(out, "# HELP moonx_ws_handshake_refusals_total Upgrade requests refused, by HTTP status.\n# TYPE moonx_ws_handshake_refusals_total counter");
    for (i, status) in REFUSAL_STATUSES.iter().enumerate() {
        let _ = writeln!(
            out,
            "moonx_ws_handshake_refusals_total{{status=\"{status}\"}} {}",
            sum(&|s| s.handshake_refusals[i].get())
        );
    }
    let _ = writeln!(out, "# HELP moonx_ws_messages_received_total Client text messages by type.\n# TYPE moonx_ws_messages_received_total counter");
    for (i, ty) in RECEIVED_TYPES.iter().enumerate() {
        let _ = writeln!(out, "moonx_ws_messages_received_total{{type=\"{ty}\"}} {}", sum(&|s| s.received[i].get()));
    }
    let _ = writeln!(
        out,
        "# HELP moonx_ws_messages_sent_total Server messages by type.\n# TYPE moonx_ws_messages_sent_total counter"
    );
    for (i, ty) in SENT_TYPES.iter().enumerate() {
        let _ = writeln!(out, "moonx_ws_messages_sent_total{{type=\"{ty}\"}} {}", sum(&|s| s.sent[i].get()));
    }
    let _ = writeln!(out, "# HELP moonx_ws_shard_queue_dropped_total Updates dropped because a shard inbox was full (oldest first).\n# TYPE moonx_ws_shard_queue_dropped_total counter");
    for (i, d) in extra.queue_dropped.iter().enumerate() {
        let _ = writeln!(out, "moonx_ws_shard_queue_dropped_total{{shard=\"{i}\"}} {d}");
    }

    histogram(
        &mut out,
        "moonx_ws_fanout_latency_seconds",
        "Time from an update's publish by Kafka ingest to a shard's fan-out queueing it for that shard's subscribers; recorded once per shard for every update it takes, subscribed or not.",
        shards.iter().map(|s| &s.fanout_latency_us),
    );
    histogram(
        &mut out,
        "moonx_ws_kafka_to_socket_latency_seconds",
        "Time from the Kafka message timestamp to the first write of the update's frame to a subscriber's socket (or its hand-over to the connection's own task, for TLS and full sockets), once per shard that had a subscriber for it; updates no connection was subscribed to are not recorded.",
        shards.iter().map(|s| &s.e2e_latency_us),
    );
    out
}

fn histogram<'a>(out: &mut String, name: &str, help: &str, parts: impl Iterator<Item = &'a Mutex<Histogram<u64>>>) {
    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for h in parts {
        let _ = merged.add(&*h.lock());
    }
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for le in BUCKETS_S {
        let le_us = (le * 1e6) as u64;
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", merged.count_between(0, le_us));
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", merged.len());
    let _ = writeln!(out, "{name}_sum {}", merged.mean() * merged.len() as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {}", merged.len());
}

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
    use std::sync::Arc;

    #[test]
    fn prometheus_sums_shards() {
        let a = Arc::new(ShardStats::default());
        let b = Arc::new(ShardStats::default());
        a.deliveries.add(3);
        b.deliveries.add(4);
        b.sent[sent_index("pong")].inc();
        a.fanout_latency_us.lock().record(150).unwrap();
        let text = render_prometheus(&[a, b], &Extra { queue_dropped: &[0, 2] });
        assert!(text.contains("moonx_ws_deliveries_total 7\n"));
        assert!(text.contains("moonx_ws_messages_sent_total{type=\"pong\"} 1\n"));
        assert!(text.contains("moonx_ws_shard_queue_dropped_total{shard=\"1\"} 2\n"));
        assert!(text.contains("moonx_ws_fanout_latency_seconds_bucket{le=\"0.00025\"} 1\n"));
        assert!(text.contains("moonx_ws_fanout_latency_seconds_bucket{le=\"0.0001\"} 0\n"));
    }

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
