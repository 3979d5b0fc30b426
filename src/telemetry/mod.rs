//! Counters, histograms and logs.
//!
//! Owns: the per-shard statistics block ([`ShardStats`]), written only by its
//! own shard with plain relaxed load+store (no locked read-modify-write, no
//! cache line shared between writers) and summed by whichever shard serves a
//! scrape; the message kinds they are counted by ([`Sent`], [`Received`]);
//! the one Prometheus writer every exporter uses (`exposition.rs`); and
//! logging (`logs.rs`).

mod exposition;
mod logs;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::protocol::message::{Channel, Outgoing};
pub use exposition::{Exposition, Kind};
pub use logs::{init_logging, LogBudget, LogLimiter};

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
    /// Sets a gauge.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// Client messages, as counted in `moonx_ws_messages_received_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Authenticate,
    Subscribe,
    Unsubscribe,
    Ping,
    /// Refused as `invalid_message`.
    Invalid,
    /// Refused as `unknown_type`.
    Unknown,
}

impl Received {
    pub const ALL: [Received; 6] = [
        Received::Authenticate,
        Received::Subscribe,
        Received::Unsubscribe,
        Received::Ping,
        Received::Invalid,
        Received::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Received::Authenticate => "authenticate",
            Received::Subscribe => "subscribe",
            Received::Unsubscribe => "unsubscribe",
            Received::Ping => "ping",
            Received::Invalid => "invalid",
            Received::Unknown => "unknown",
        }
    }
}

/// Server messages, as counted in `moonx_ws_messages_sent_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    AuthRequired,
    AuthSuccess,
    AuthFailed,
    Subscribed,
    Unsubscribed,
    Pong,
    Error,
    /// An update of this channel.
    Update(Channel),
}

impl Sent {
    pub const ALL: [Sent; 11] = [
        Sent::AuthRequired,
        Sent::AuthSuccess,
        Sent::AuthFailed,
        Sent::Subscribed,
        Sent::Unsubscribed,
        Sent::Pong,
        Sent::Error,
        Sent::Update(Channel::Prices),
        Sent::Update(Channel::Orders),
        Sent::Update(Channel::Portfolio),
        Sent::Update(Channel::Trades),
    ];

    /// The kind of a reply or control message.
    pub fn of(msg: &Outgoing) -> Sent {
        match msg {
            Outgoing::AuthRequired { .. } => Sent::AuthRequired,
            Outgoing::AuthSuccess { .. } => Sent::AuthSuccess,
            Outgoing::AuthFailed { .. } => Sent::AuthFailed,
            Outgoing::Subscribed { .. } => Sent::Subscribed,
            Outgoing::Unsubscribed { .. } => Sent::Unsubscribed,
            Outgoing::Pong { .. } => Sent::Pong,
            Outgoing::Error { .. } => Sent::Error,
        }
    }

    /// Its place in [`ShardStats::sent`].
    pub fn index(self) -> usize {
        match self {
            Sent::AuthRequired => 0,
            Sent::AuthSuccess => 1,
            Sent::AuthFailed => 2,
            Sent::Subscribed => 3,
            Sent::Unsubscribed => 4,
            Sent::Pong => 5,
            Sent::Error => 6,
            Sent::Update(channel) => 7 + channel as usize,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Sent::AuthRequired => "auth_required",
            Sent::AuthSuccess => "auth_success",
            Sent::AuthFailed => "auth_failed",
            Sent::Subscribed => "subscribed",
            Sent::Unsubscribed => "unsubscribed",
            Sent::Pong => "pong",
            Sent::Error => "error",
            Sent::Update(channel) => channel.update_type(),
        }
    }
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
    pub received: [Counter; Received::ALL.len()],
    pub sent: [Counter; Sent::ALL.len()],
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
    /// Parks that did not happen (the connection keeps its task).
    pub park_failures: Counter,
    /// Socket watches the kernel refused or ended in error (the connection
    /// reads through glommio from then on).
    pub watch_failures: Counter,
    /// Failed accepts (typically out of descriptors: the connection waits
    /// in the listen backlog while the shard backs off).
    pub accept_failures: Counter,
    pub subscribers: [Counter; 4],
    /// Market and chain channel subscriptions (gauge).
    pub market_subscriptions: Counter,
    /// Markets that lost their last value to the `WS_MAX_MARKETS` bound.
    pub markets_evicted: Counter,
    /// Markets holding a last value (gauge; the same on every shard).
    pub markets_known: Counter,
    /// Snapshot frames queued after `subscribed`.
    pub snapshots_sent: Counter,
    /// Resumes whose held live updates passed `WS_MAX_BUFFERED_BYTES`.
    pub recoveries_overflowed: Counter,
    /// Resumes whose connection closed or stopped taking updates first.
    pub recoveries_abandoned: Counter,
    /// Resumes in flight (gauge).
    pub recoveries_in_flight: Counter,
    /// Price updates conflated away from slow readers' queues.
    pub conflated: Counter,
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
            watch_failures: Counter::default(),
            accept_failures: Counter::default(),
            subscribers: Default::default(),
            market_subscriptions: Counter::default(),
            markets_evicted: Counter::default(),
            markets_known: Counter::default(),
            snapshots_sent: Counter::default(),
            recoveries_overflowed: Counter::default(),
            recoveries_abandoned: Counter::default(),
            recoveries_in_flight: Counter::default(),
            conflated: Counter::default(),
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
pub fn total(shards: &[Arc<ShardStats>], f: impl Fn(&ShardStats) -> u64) -> u64 {
    shards.iter().map(|s| f(s)).sum()
}

/// Describes every shard's statistics (summed, or per shard where the
/// shard is a label), and each shard inbox's drops (`queue_dropped`).
pub fn describe_shards(shards: &[Arc<ShardStats>], queue_dropped: &[u64], e: &mut Exposition) {
    let sum = |f: &dyn Fn(&ShardStats) -> u64| -> u64 { shards.iter().map(|s| f(s)).sum() };
    type Get = fn(&ShardStats) -> u64;
    let counters: [(&str, &str, Get); 17] = [
        ("moonx_ws_connections_accepted_total", "WebSocket upgrades accepted.", |s| s.connections_accepted.get()),
        ("moonx_ws_http_requests_total", "Plain HTTP requests served.", |s| s.http_requests.get()),
        ("moonx_ws_rate_limited_total", "Client messages refused by the message limit.", |s| s.rate_limited.get()),
        ("moonx_ws_rate_limit_closes_total", "Connections closed with 4008.", |s| s.rate_limit_closes.get()),
        ("moonx_ws_slow_consumer_closes_total", "Connections closed with 4009 (output backlog over WS_MAX_BUFFERED_BYTES).", |s| s.slow_consumer_closes.get()),
        ("moonx_ws_pong_timeouts_total", "Connections dropped for silence after a ping.", |s| s.pong_timeouts.get()),
        ("moonx_ws_protocol_closes_total", "Connections closed for a frame-level violation (1002/1003/1007/1009).", |s| s.protocol_closes.get()),
        ("moonx_ws_updates_processed_total", "Updates taken from shard inboxes (counted once per shard).", |s| s.updates_processed.get()),
        ("moonx_ws_deliveries_total", "Update frames queued to subscribers.", |s| s.deliveries.get()),
        ("moonx_ws_log_lines_suppressed_total", "Per-connection log lines (refused upgrades, failed authentications, server closes) held back by the rate limit; the next line written says how many.", |s| s.log_lines_suppressed.get()),
        ("moonx_ws_latency_samples_skipped_total", "Updates left out of moonx_ws_kafka_to_socket_latency_seconds because a shard's sample queue was full.", |s| s.latency_samples_skipped.get()),
        ("moonx_ws_direct_writes_total", "Socket writes made by the shard fan-out directly, without waking the connection's task.", |s| s.direct_writes.get()),
        ("moonx_ws_parks_total", "Idle connections parked: their task and read state freed, the socket watched by the shard's poll ring.", |s| s.parks.get()),
        ("moonx_ws_unparks_total", "Parked connections given a task again (input, a deadline, a write the fan-out could not finish, shutdown).", |s| s.unparks.get()),
        ("moonx_ws_park_failures_total", "Parks that did not happen (the connection kept its task; logged, rate-limited): its socket had no watch, the watch could not be submitted, or the socket could not be duplicated.", |s| s.park_failures.get()),
        ("moonx_ws_watch_failures_total", "Socket watches on the shard's poll ring the kernel refused or ended in error (the connection then reads through glommio and is never parked); logged, rate-limited.", |s| s.watch_failures.get()),
        ("moonx_ws_accept_failures_total", "Failed accepts, typically out of file descriptors (the connection waits in the backlog); logged, rate-limited.", |s| s.accept_failures.get()),
    ];
    for (name, help, get) in counters {
        e.single(Kind::Counter, name, help, sum(&get));
    }
    e.single(
        Kind::Gauge,
        "moonx_ws_connections_parked",
        "Open connections parked without a task.",
        sum(&|s| s.connections_parked.get()),
    );
    let mut f = e.family(Kind::Gauge, "moonx_ws_connections_active", "Open WebSocket connections.");
    for (i, s) in shards.iter().enumerate() {
        f.sample(&[("shard", &i)], s.connections_active.get());
    }
    e.single(
        Kind::Gauge,
        "moonx_ws_connections_authenticated",
        "Open authenticated connections.",
        sum(&|s| s.connections_authenticated.get()),
    );
    let mut f = e.family(Kind::Gauge, "moonx_ws_subscriptions", "Subscriptions per channel.");
    for ch in Channel::ALL {
        f.sample(&[("channel", &ch.name())], sum(&|s| s.subscribers[ch as usize].get()));
    }
    e.single(
        Kind::Gauge,
        "moonx_ws_market_subscriptions",
        "Subscriptions to market (prices:<chainId>:<token>) and chain (prices:<chainId>) channels.",
        sum(&|s| s.market_subscriptions.get()),
    );
    // Every shard takes every update, so each holds the same markets: the
    // table's size is one shard's, not their sum.
    let max = |f: &dyn Fn(&ShardStats) -> u64| shards.iter().map(|s| f(s)).max().unwrap_or(0);
    e.single(
        Kind::Gauge,
        "moonx_ws_markets",
        "Markets whose last update is kept for snapshots (bounded by WS_MAX_MARKETS).",
        max(&|s| s.markets_known.get()),
    );
    e.single(
        Kind::Counter,
        "moonx_ws_markets_evicted_total",
        "Markets that lost their last update to the WS_MAX_MARKETS bound (least recently updated first).",
        max(&|s| s.markets_evicted.get()),
    );
    e.single(
        Kind::Counter,
        "moonx_ws_snapshots_sent_total",
        "Snapshot frames sent after subscribed.",
        sum(&|s| s.snapshots_sent.get()),
    );
    e.single(
        Kind::Counter,
        "moonx_ws_conflated_total",
        "Price updates dropped from a slow reader's queue because a newer update of the same market was queued after them (conflation).",
        sum(&|s| s.conflated.get()),
    );
    e.family(Kind::Counter, "moonx_ws_auth_total", "Authentication attempts by result.")
        .sample(&[("result", &"success")], sum(&|s| s.auth_success.get()))
        .sample(&[("result", &"failure")], sum(&|s| s.auth_failure.get()));
    let mut f =
        e.family(Kind::Counter, "moonx_ws_handshake_refusals_total", "Upgrade requests refused, by HTTP status.");
    for (i, status) in REFUSAL_STATUSES.iter().enumerate() {
        f.sample(&[("status", status)], sum(&|s| s.handshake_refusals[i].get()));
    }
    let mut f = e.family(Kind::Counter, "moonx_ws_messages_received_total", "Client text messages by type.");
    for (i, kind) in Received::ALL.iter().enumerate() {
        f.sample(&[("type", &kind.name())], sum(&|s| s.received[i].get()));
    }
    let mut f = e.family(Kind::Counter, "moonx_ws_messages_sent_total", "Server messages by type.");
    for kind in Sent::ALL {
        f.sample(&[("type", &kind.name())], sum(&|s| s.sent[kind.index()].get()));
    }
    let mut f = e.family(
        Kind::Counter,
        "moonx_ws_shard_queue_dropped_total",
        "Updates dropped because a shard inbox was full (oldest first).",
    );
    for (i, d) in queue_dropped.iter().enumerate() {
        f.sample(&[("shard", &i)], d);
    }
    let merged = |part: fn(&ShardStats) -> &Mutex<Histogram<u64>>| {
        let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        for s in shards {
            let _ = merged.add(&*part(s).lock());
        }
        merged
    };
    e.histogram_us("moonx_ws_fanout_latency_seconds", "Time from an update's publish by Kafka ingest to a shard's fan-out queueing it for that shard's subscribers; recorded once per shard for every update it takes, subscribed or not.", &merged(|s| &s.fanout_latency_us));
    e.histogram_us(
        "moonx_ws_kafka_to_socket_latency_seconds",
        "Time from the Kafka message timestamp to the first write of the update's frame to a subscriber's socket (or its hand-over to the connection's own task, for TLS and full sockets), once per shard that had a subscriber for it; updates no connection was subscribed to are not recorded.",
        &merged(|s| &s.e2e_latency_us),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_sums_shards() {
        let a = Arc::new(ShardStats::default());
        let b = Arc::new(ShardStats::default());
        a.deliveries.add(3);
        b.deliveries.add(4);
        b.sent[Sent::Pong.index()].inc();
        a.fanout_latency_us.lock().record(150).unwrap();
        let mut e = Exposition::new();
        describe_shards(&[a, b], &[0, 2], &mut e);
        let text = e.finish();
        assert!(text.contains("moonx_ws_deliveries_total 7\n"));
        assert!(text.contains("moonx_ws_messages_sent_total{type=\"pong\"} 1\n"));
        assert!(text.contains("moonx_ws_shard_queue_dropped_total{shard=\"1\"} 2\n"));
        assert!(text.contains("moonx_ws_fanout_latency_seconds_bucket{le=\"0.00025\"} 1\n"));
        assert!(text.contains("moonx_ws_fanout_latency_seconds_bucket{le=\"0.0001\"} 0\n"));
    }

    #[test]
    fn every_sent_kind_has_its_own_place() {
        let mut seen: Vec<usize> = Sent::ALL.iter().map(|k| k.index()).collect();
        seen.sort();
        assert_eq!(seen, (0..Sent::ALL.len()).collect::<Vec<_>>());
    }
}
