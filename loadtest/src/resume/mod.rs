//! The `resume` scenario: private connections (one user each) drop
//! together while their updates keep flowing, stay away, then all
//! reconnect at once and resume `orders` with `since` (PROTOCOL.md
//! "Resuming after a reconnect"), while observers on `prices` stay up. It
//! reports how long until every client recovered, the Kafka messages the
//! server read for the replays against the range they covered, whether any
//! private update was lost, repeated or misrouted over a user's two
//! connections, and the observers' price latency during the storm against
//! the baseline before it. `clients` runs the connections (the observers on
//! a thread of their own, so this tool's storm work does not delay their
//! reads), `check` checks what they receive (sans-IO), `metrics` reads the
//! server's counters.

mod check;
mod clients;
mod metrics;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;

use crate::procstat::Sample;
use crate::run::Run;
use crate::verdict::{fmt_us, Figures, Verdict};
use crate::{brief, causes, hdr, now_ns, open_all, per, percentiles, print_table, procstat, Channels, Common, Opened};
use check::Pos;
use clients::{follow_first, resume_all, Observers, Shared};
use metrics::Counters;

/// The private updates' topic.
const ORDERS: &str = "order.updates";
/// The observers' topic, and the bytes of each price value.
const PRICES: &str = "price.updates";
const PRICE_BYTES: usize = 200;
/// The storm waits this long at most for every resume to be over.
const RECOVER_WAIT: Duration = Duration::from_secs(60);
/// How often a phase looks whether it is over.
const POLL: Duration = Duration::from_millis(20);
/// A phase's last progress interval shorter than this joins the next phase's first.
const SHORTEST_LINE: Duration = Duration::from_millis(100);

#[derive(Args, Serialize)]
#[command(mut_arg("connections", |a| a
    .default_value("5000")
    .help("Private connections, one user each: they drop together, then resume")))]
pub struct ResumeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) common: Common,
    /// Kafka bootstrap servers the server under test consumes from.
    #[arg(long)]
    pub(crate) brokers: String,
    /// Connections on `prices` that stay up through the storm (whose
    /// latency is the storm's cost to everyone else).
    #[arg(long, default_value_t = 1000, value_parser = crate::positive_usize())]
    pub(crate) observers: usize,
    /// Private updates per second over all users (open loop), to
    /// `order.updates` keyed by user.
    #[arg(long, short = 'r', default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) rate: u64,
    /// The private producer's `linger.ms`. librdkafka's mock broker (the
    /// `broker` scenario) answers a fetch with one record batch per
    /// partition where a real broker sends up to `max.partition.fetch.bytes`:
    /// against it a replay reads one batch per round trip, so batches of
    /// one message make replays crawl in a way no real broker does. A
    /// linger of 100 ms gives batches of dozens at 2000/s.
    #[arg(long, default_value_t = 1)]
    pub(crate) linger_ms: u32,
    /// Price updates per second (open loop), to `price.updates`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) price_rate: u64,
    /// Seconds of load first, not measured.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: u64,
    /// Seconds of measured load before the drop: the baseline of price latency.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) baseline: u64,
    /// Seconds the private connections stay away.
    #[arg(long, default_value_t = 2)]
    pub(crate) away: u64,
    /// Seconds measured after the last resume is over.
    #[arg(long, default_value_t = 3)]
    pub(crate) after: u64,
    /// The nice value of this tool's thread that drives the storm: above
    /// the observers' and the price producer's threads (0), so that on a
    /// core shared with them the tool's own storm work does not delay the
    /// reads and sends it measures. 0 leaves it as it is (with cores to
    /// spare for the tool).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub(crate) storm_nice: i32,
    /// Seconds to wait for stragglers once the producers stop; also the
    /// longest the baseline is stretched for users without an update yet.
    #[arg(long, default_value_t = 5)]
    pub(crate) drain: u64,
}

/// Settings that cannot make sense (exit 2).
fn check_settings(a: &ResumeArgs) -> anyhow::Result<()> {
    let before_drop = a.rate.saturating_mul(a.warmup + a.baseline);
    if before_drop < a.common.connections as u64 {
        bail!(
            "--rate {} x (--warmup {} + --baseline {}) s is {before_drop} private updates before the drop, fewer than \
             the {} users: each needs one to resume from",
            a.rate,
            a.warmup,
            a.baseline,
            a.common.connections
        );
    }
    let phases = a.warmup + a.baseline + a.away + a.after;
    if a.common.deadline <= phases {
        bail!(
            "--deadline {} s is not longer than --warmup + --baseline + --away + --after ({phases} s): the run could \
             never complete",
            a.common.deadline
        );
    }
    Ok(())
}

/// The two open-loop producers, each on a thread of its own.
struct Producers {
    stop: Arc<AtomicBool>,
    private: Arc<AtomicU64>,
    prices: Arc<AtomicU64>,
    /// Price updates sent more than 1 ms late.
    prices_late: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Producers {
    fn start(a: &ResumeArgs) -> Producers {
        let p = Producers {
            stop: Arc::default(),
            private: Arc::default(),
            prices: Arc::default(),
            prices_late: Arc::default(),
            threads: Vec::new(),
        };
        let (brokers, users, rate, linger) = (a.brokers.clone(), a.common.connections, a.rate, a.linger_ms);
        let (stop, produced) = (p.stop.clone(), p.private.clone());
        let private = std::thread::spawn(move || produce_private(&brokers, users, rate, linger, &stop, &produced));
        let (brokers, rate) = (a.brokers.clone(), a.price_rate);
        let (stop, produced, late) = (p.stop.clone(), p.prices.clone(), p.prices_late.clone());
        let prices = std::thread::spawn(move || {
            let producer = crate::kafka::producer(&brokers, 0, false);
            let pace = crate::fanout::Pace { rate, total: u64::MAX, stop: &stop, produced: &produced, late: &late };
            let mut stamp = |_: u64, v: &mut String| v.push_str(r#""token":"ETH","chainId":8453,"#);
            crate::fanout::produce(&producer, PRICES, PRICE_BYTES, &pace, &mut stamp)
        });
        Producers { threads: vec![private, prices], ..p }
    }

    /// Stops both and waits for what they queued.
    async fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Private and price updates sent so far.
    fn produced(&self) -> (u64, u64) {
        (self.private.load(Ordering::Relaxed), self.prices.load(Ordering::Relaxed))
    }
}

/// The private open loop: update `k` goes to user `k % users` (`lt-<user>`,
/// its key, so a user's updates stay in one partition, in order) with the
/// number `k / users` and its scheduled send time, until `stop`.
fn produce_private(brokers: &str, users: usize, rate: u64, linger_ms: u32, stop: &AtomicBool, produced: &AtomicU64) {
    use rdkafka::producer::BaseRecord;
    let producer = crate::kafka::producer(brokers, linger_ms, false);
    let start_ns = now_ns();
    let start = Instant::now();
    let interval_ns = 1_000_000_000 / rate.max(1);
    for k in 0.. {
        crate::kafka::wait_until_due(start, k, interval_ns, stop);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("lt-{}", k % users as u64);
        let value = format!(
            r#"{{"userId":"{key}","seq":{},"sentNs":{},"status":"filled"}}"#,
            k / users as u64,
            start_ns + k * interval_ns
        );
        if !crate::kafka::send(&producer, BaseRecord::to(ORDERS).key(&key).payload(&value), stop) {
            break;
        }
        produced.fetch_add(1, Ordering::Relaxed);
    }
    crate::kafka::finish(&producer);
}

/// What the phases measured besides the connections' tallies.
#[derive(Default)]
struct Timeline {
    /// From the end of warm-up to the drop.
    baseline: Duration,
    /// Closing every private connection.
    drop: Duration,
    /// From the drop to the end of `--after`.
    storm: Duration,
    drain: Duration,
    /// Private connections dropped (each resumes).
    resumes: usize,
    /// The server's recovery counters over the storm, or why there are none.
    counters: Option<Result<Counters, String>>,
    /// The server at the start of the baseline, at the drop, at the end of the storm.
    server: [Option<Sample>; 3],
    /// This tool's CPU over the baseline and the storm.
    mine: Duration,
}

pub async fn run(a: ResumeArgs) -> anyhow::Result<u8> {
    check_settings(&a)?;
    let c = &a.common;
    let settings = serde_json::to_value(&a)?;
    let mut run = Run::start(c, "resume")?;
    let mut v = Verdict::default();
    let brokers = a.brokers.clone();
    let kafka_error = tokio::task::spawn_blocking(move || crate::kafka::check(&brokers))
        .await
        .map_err(|e| anyhow::anyhow!("kafka check: {e}"))?
        .err();
    if let Some(e) = &kafka_error {
        v.fail(format!("Kafka unreachable at --brokers {}: {e}; nothing was produced", a.brokers));
    }
    let shared = Rc::new(Shared::new(c.connections));
    let mut opened = None;
    let (mut first, mut watching) = (Vec::new(), Vec::new());
    if kafka_error.is_none() {
        let mut o = open_all(&mut run, &everyone(&a), channels(c.connections), 1).await;
        for (i, s) in std::mem::take(&mut o.setups) {
            if i < c.connections {
                first.push(follow_first(i, s, shared.clone()));
            } else {
                watching.push(s);
            }
        }
        opened = Some(o);
    }
    let mut observers = Observers::start(watching, shared.prices.clone(), shared.observers_closed.clone())?;
    let n_observers = observers.count;
    let mut t = Timeline::default();
    let mut resumed = Vec::new();
    let mut producers = None;
    let server_start = run.sample();
    if !first.is_empty() && n_observers > 0 && !run.stop.stopped() {
        let p = producers.insert(Producers::start(&a));
        let me = procstat::Sample::own();
        resumed = phases(&mut run, &a, &shared, first, &mut t).await?;
        t.mine = procstat::Sample::own().cpu_since(&me);
        p.stop().await;
        if !run.stop.stopped() {
            drain(&mut run, &a, &shared, p, n_observers as u64, &mut t).await;
        }
    }
    shared.running.set(false);
    for r in &resumed {
        r.abort();
    }
    observers.stop();
    let server_end = run.sample();
    let produced = producers.as_ref().map_or((0, 0), Producers::produced);
    let prices_late = producers.as_ref().map_or(0, |p| p.prices_late.load(Ordering::Relaxed));
    let end = End { opened, kafka_error, n_observers, produced, prices_late, timeline: t, server_start, server_end };
    Ok(finish(&mut run, &a, settings, &shared, end, &mut v))
}

/// Every connection of the run: the private ones, then the observers.
fn everyone(a: &ResumeArgs) -> Common {
    let mut all = a.common.clone();
    all.connections = a.common.connections + a.observers;
    all
}

/// Connection `i` is user `lt-<i>`'s on `orders` for `i < users`, an observer on `prices` after.
fn channels(users: usize) -> Channels {
    Rc::new(move |i| vec![if i < users { "orders" } else { "prices" }.to_string()])
}

/// Warm-up, baseline, drop, away, the reconnect storm and the time after
/// it; returns the resumed connections' tasks.
async fn phases(
    run: &mut Run,
    a: &ResumeArgs,
    shared: &Rc<Shared>,
    first: Vec<JoinHandle<()>>,
    t: &mut Timeline,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    run.enter("warm-up");
    run.end_interval(&mut [])?;
    // This thread drives the storm (5,000 closes, set-ups and replays);
    // the observers' reads and the price producer's sends, whose latency
    // is the storm's cost to everyone else, run on threads of their own.
    // On a core shared with them it yields to those (from the warm-up on,
    // so the baseline and the storm are measured alike): what the
    // observers see is then the server's delay, not this tool's. Its own
    // resumes' timings (recover times) include that yielding.
    if a.storm_nice > 0 {
        if let Err(e) = procstat::lower_thread_priority(a.storm_nice) {
            eprintln!("warning: could not lower the storm thread's priority (--storm-nice): {e}");
        }
    }
    phase_until(run, shared, Instant::now() + Duration::from_secs(a.warmup), || false).await;
    shared.prices.lock().baseline_from = now_ns();
    run.enter("baseline");
    t.server[0] = run.sample();
    let start = Instant::now();
    phase_until(run, shared, start + Duration::from_secs(a.baseline), || false).await;
    // Every user needs a position to resume from: the last ones may lag.
    let s = shared.clone();
    let all_have_one = move || s.streams.borrow().without_position() == 0;
    phase_until(run, shared, Instant::now() + Duration::from_secs(a.drain), all_have_one).await;
    t.baseline = start.elapsed();
    if run.stop.stopped() {
        for r in &first {
            r.abort();
        }
        return Ok(Vec::new());
    }
    let before = metrics::read(run.server).await;
    t.server[1] = run.sample();
    run.enter("away");
    shared.prices.lock().storm_from = now_ns();
    let dropped = Instant::now();
    // All at once: the observers read on their own thread meanwhile.
    for r in &first {
        r.abort();
    }
    for r in first {
        let _ = r.await;
    }
    t.drop = dropped.elapsed();
    let positions = shared.streams.borrow().positions();
    t.resumes = positions.len();
    phase_until(run, shared, dropped + Duration::from_secs(a.away), || false).await;
    if run.stop.stopped() {
        return Ok(Vec::new());
    }
    shared.prices.lock().reconnect_from = now_ns();
    let resumed = storm(run, a, shared, positions).await;
    let after = metrics::read(run.server).await;
    shared.prices.lock().storm_until = now_ns();
    t.storm = dropped.elapsed();
    t.server[2] = run.sample();
    t.counters = Some(before.and_then(|b| after.map(|af| af.since(&b))));
    Ok(resumed)
}

/// Every user in `positions` reconnects at once and resumes from its
/// position; then `--after` s more.
async fn storm(
    run: &mut Run,
    a: &ResumeArgs,
    shared: &Rc<Shared>,
    positions: Vec<(usize, Option<Pos>)>,
) -> Vec<JoinHandle<()>> {
    run.enter("reconnect");
    let start = Instant::now();
    let (s, n) = (shared.clone(), positions.len());
    let resumed = resume_all(&a.common, run.server, positions, shared, start);
    phase_until(run, shared, start + RECOVER_WAIT, move || s.storm.borrow().settled >= n).await;
    if !run.stop.stopped() {
        run.enter("after");
        phase_until(run, shared, Instant::now() + Duration::from_secs(a.after), || false).await;
    }
    resumed
}

/// Until every user has every private update sent to it and every
/// observer every price, or `--drain` s.
async fn drain(run: &mut Run, a: &ResumeArgs, shared: &Rc<Shared>, p: &Producers, observers: u64, t: &mut Timeline) {
    run.enter("drain");
    let start = Instant::now();
    let (private, prices) = p.produced();
    let s = shared.clone();
    let done = move || {
        let streams = s.streams.borrow();
        streams.received >= streams.expected(private) && s.prices.lock().received >= prices * observers
    };
    phase_until(run, shared, start + Duration::from_secs(a.drain), done).await;
    t.drain = start.elapsed();
}

/// Runs a phase until `end`, `done` or the stop, a progress line a second
/// (and one for the rest, unless it is too short to tell anything).
async fn phase_until(run: &mut Run, shared: &Shared, end: Instant, done: impl Fn() -> bool) {
    let mut prev = Progress::of(shared);
    let mut ticked = false;
    while Instant::now() < end && !done() {
        if run.stop.sleep(POLL.min(end.saturating_duration_since(Instant::now()))).await {
            break;
        }
        if run.interval() >= Duration::from_secs(1) {
            tick(run, shared, &mut prev);
            ticked = true;
        }
    }
    if !ticked || run.interval() >= SHORTEST_LINE {
        tick(run, shared, &mut prev);
    }
}

/// The counts a progress line shows the growth of.
#[derive(Clone, Copy, PartialEq)]
struct Progress {
    private: u64,
    prices: u64,
    broken: u64,
    closed: u64,
}

impl Progress {
    fn of(shared: &Shared) -> Progress {
        let s = shared.streams.borrow();
        let p = shared.prices.lock();
        let closed =
            shared.private_closed.lock().values().sum::<u64>() + shared.observers_closed.lock().values().sum::<u64>();
        Progress {
            private: s.received,
            prices: p.received,
            broken: s.gaps + s.dups + s.misrouted + p.gaps + p.dups,
            closed,
        }
    }
}

fn tick(run: &mut Run, shared: &Shared, prev: &mut Progress) {
    let now = Progress::of(shared);
    let secs = run.interval().as_secs_f64().max(1e-3);
    let mut prices = shared.prices.lock();
    let mut storm = shared.storm.borrow_mut();
    let latency = match run.phase() {
        "baseline" => brief(&prices.baseline.interval),
        "away" | "reconnect" | "after" => brief(&prices.storm.interval),
        _ => "not measured".into(),
    };
    let mut line = format!(
        "prices {:.0}/s, latency {latency}; private {:.0}/s; +{} gaps, duplicates or misrouted, +{} closed",
        (now.prices - prev.prices) as f64 / secs,
        (now.private - prev.private) as f64 / secs,
        now.broken - prev.broken,
        now.closed - prev.closed
    );
    if matches!(run.phase(), "reconnect" | "after") {
        line.push_str(&format!(
            "; resumes: {} over ({} recovered, {} not, {} failed), recover {}",
            storm.settled,
            storm.recovered,
            storm.not_recovered + storm.without_since,
            storm.failed(),
            brief(&storm.recover.interval)
        ));
    }
    run.progress(&line);
    *prev = now;
    let (p, s) = (&mut *prices, &mut *storm);
    if let Err(e) = run.end_interval(&mut [&mut p.baseline, &mut p.storm, &mut s.resubscribe, &mut s.recover]) {
        eprintln!("{e:#}");
    }
}

/// What the run ended with, for the verdict and the result.
struct End {
    opened: Option<Opened>,
    kafka_error: Option<String>,
    n_observers: usize,
    /// Private and price updates sent.
    produced: (u64, u64),
    prices_late: u64,
    timeline: Timeline,
    server_start: Option<Sample>,
    server_end: Option<Sample>,
}

/// The figures of the run, worked out once from the tallies.
struct Sums {
    private_expected: u64,
    private_lost: u64,
    users_short: u64,
    prices_expected: u64,
    prices_lost: u64,
    private_closed: u64,
    observers_closed: u64,
    /// Reconnect start → the last resume recovered, when every one did.
    recover_all: Option<Duration>,
    replayed_range: u64,
    counters: Result<Counters, String>,
    /// Kafka messages read for replays per message in the replayed range.
    read_ratio: Value,
    p99_baseline: Option<u64>,
    p99_storm: Option<u64>,
    /// Storm p99 of prices over the baseline's.
    p99_ratio: Value,
}

impl Sums {
    fn of(shared: &Shared, end: &End) -> Sums {
        let (streams, prices, storm) = (shared.streams.borrow(), shared.prices.lock(), shared.storm.borrow());
        let t = &end.timeline;
        let (private, price_updates) = end.produced;
        let (private_lost, users_short) = streams.lost(private);
        let prices_expected = price_updates * end.n_observers as u64;
        let counters = t.counters.clone().unwrap_or_else(|| Err("the storm did not take place".into()));
        let replayed_range = storm.range.len();
        let read_ratio = counters.as_ref().map_or(Value::Null, |c| per(c.read as f64, replayed_range as f64));
        let p99 = |h: &Histogram<u64>| (!h.is_empty()).then(|| h.value_at_quantile(0.99));
        let (p99_baseline, p99_storm) = (p99(&prices.baseline.total), p99(&prices.storm.total));
        let p99_ratio = match (p99_baseline, p99_storm) {
            (Some(b), Some(s)) => per(s as f64, b as f64),
            _ => Value::Null,
        };
        Sums {
            private_expected: streams.expected(private),
            private_lost,
            users_short,
            prices_expected,
            prices_lost: prices_expected.saturating_sub(prices.received),
            private_closed: shared.private_closed.lock().values().sum(),
            observers_closed: shared.observers_closed.lock().values().sum(),
            recover_all: (t.resumes > 0 && storm.recovered == t.resumes as u64).then_some(storm.last_recovered),
            replayed_range,
            counters,
            read_ratio,
            p99_baseline,
            p99_storm,
            p99_ratio,
        }
    }
}

/// The verdict's rules beyond the thresholds.
fn judge(v: &mut Verdict, run: &Run, a: &ResumeArgs, shared: &Shared, end: &End, s: &Sums) {
    let (streams, prices, storm) = (shared.streams.borrow(), shared.prices.lock(), shared.storm.borrow());
    let resumes = end.timeline.resumes as u64;
    if let Some(r) = end.opened.as_ref().and_then(Opened::failure_reason) {
        v.fail(r);
    }
    if storm.failed() > 0 {
        v.fail(format!("{} of {resumes} resumes failed to set up: {}", storm.failed(), causes(&storm.failures)));
    }
    if storm.not_recovered > 0 {
        v.fail(format!("{} of {resumes} resumes were answered without recovered:true", storm.not_recovered));
    }
    if storm.without_since > 0 {
        v.fail(format!(
            "{} of {resumes} users had no position to resume from (no update reached them before the drop)",
            storm.without_since
        ));
    }
    if resumes > 0 && (storm.settled as u64) < resumes && !run.stop.stopped() {
        v.fail(format!(
            "{} of {resumes} resumes were not over {} s after the reconnect began (missed updates still due)",
            resumes - storm.settled as u64,
            RECOVER_WAIT.as_secs()
        ));
    }
    if s.private_lost > 0 {
        let mut r = format!(
            "lost {} of {} private updates ({:.2}%) at {} users",
            s.private_lost,
            s.private_expected,
            s.private_lost as f64 * 100.0 / s.private_expected as f64,
            s.users_short
        );
        if streams.received == 0 {
            r.push_str(&format!(
                ": nothing was delivered; does the server consume {ORDERS} from the Kafka at --brokers {}?",
                a.brokers
            ));
        }
        v.fail(r);
    }
    if streams.dups > 0 {
        v.fail(format!("{} private updates delivered twice (or after a newer one)", streams.dups));
    }
    if streams.gaps > 0 && s.private_lost == 0 {
        v.fail(format!("{} private updates out of order", streams.gaps));
    }
    if streams.misrouted > 0 {
        v.fail(format!("{} private updates reached another user's connection", streams.misrouted));
    }
    if s.prices_lost > 0 {
        v.fail(format!("lost {} of {} price deliveries to the observers", s.prices_lost, s.prices_expected));
    }
    if prices.dups > 0 {
        v.fail(format!("{} duplicate price deliveries", prices.dups));
    }
    for (who, n, closed) in [
        ("private connections", s.private_closed, &shared.private_closed),
        ("observers", s.observers_closed, &shared.observers_closed),
    ] {
        if n > 0 {
            v.fail(format!("{n} {who} closed unexpectedly: {}", causes(&closed.lock())));
        }
    }
    for (window, h) in [("baseline", &prices.baseline.total), ("storm", &prices.storm.total)] {
        if h.is_empty() && end.kafka_error.is_none() {
            v.fail(format!("no samples: no price update was measured in the {window}"));
        }
    }
    if run.probe.is_some() && end.server_end.is_none() {
        v.fail("the server process exited during the run");
    }
}

/// The figures `--threshold` may name; the main latency is the observers'
/// during the storm.
fn values(shared: &Shared, end: &End, s: &Sums) -> BTreeMap<&'static str, f64> {
    let (streams, prices, storm) = (shared.streams.borrow(), shared.prices.lock(), shared.storm.borrow());
    let o = end.opened.as_ref();
    let mut values = BTreeMap::from([
        ("lost", (s.private_lost + s.prices_lost) as f64),
        ("duplicates", (streams.dups + prices.dups) as f64),
        ("gaps", (streams.gaps + prices.gaps) as f64),
        ("misrouted", streams.misrouted as f64),
        ("failed", (o.map_or(0, Opened::failed) + storm.failed()) as f64),
        ("closed", (s.private_closed + s.observers_closed) as f64),
        ("delivered", (streams.received + prices.received) as f64),
        ("connections", o.map_or(0, |o| o.attempted as u64 - o.failed()) as f64),
        ("not_recovered", (storm.not_recovered + storm.without_since) as f64),
    ]);
    if let Some(d) = s.recover_all {
        values.insert("recover_ms", d.as_secs_f64() * 1e3);
    }
    if let Some(r) = s.read_ratio.as_f64() {
        values.insert("read_ratio", r);
    }
    if let Ok(c) = &s.counters {
        values.insert("reread", c.reread as f64);
    }
    if let Some(r) = s.p99_ratio.as_f64() {
        values.insert("p99_ratio", r);
    }
    values
}

/// The `server` object: CPU in the baseline and in the storm, RSS.
fn server_json(run: &Run, end: &End) -> Value {
    let Some(p) = &run.probe else { return Value::Null };
    let t = &end.timeline;
    let exited = end.server_end.is_none();
    let mut m = p.base_json(exited);
    let cores = |from: Option<Sample>, to: Option<Sample>, over: Duration| match (from, to) {
        (Some(f), Some(to)) => per(to.cpu_since(&f).as_secs_f64(), over.as_secs_f64()),
        _ => Value::Null,
    };
    m.insert("cpu_utilisation_baseline".into(), cores(t.server[0], t.server[1], t.baseline));
    m.insert("cpu_utilisation_storm".into(), cores(t.server[1], t.server[2], t.storm));
    let storm_ms = match (t.server[1], t.server[2]) {
        (Some(f), Some(to)) => json!(to.cpu_since(&f).as_secs_f64() * 1e3),
        _ => Value::Null,
    };
    m.insert("cpu_ms_storm".into(), storm_ms);
    m.insert("rss_before_kb".into(), json!(end.server_start.map(|s| s.rss_kb)));
    m.insert("rss_kb".into(), json!(t.server[2].or(end.server_end).map(|s| s.rss_kb)));
    Value::Object(m)
}

/// Causes of closes on both kinds of connection, told apart.
fn closes(shared: &Shared) -> BTreeMap<String, u64> {
    let mut all = BTreeMap::new();
    for (who, closed) in [("private", &shared.private_closed), ("observer", &shared.observers_closed)] {
        for (cause, n) in closed.lock().iter() {
            all.insert(format!("{who}: {cause}"), *n);
        }
    }
    all
}

fn report(a: &ResumeArgs, shared: &Shared, end: &End, s: &Sums, server: Value) -> Map<String, Value> {
    let (streams, prices, storm) = (shared.streams.borrow(), shared.prices.lock(), shared.storm.borrow());
    let t = &end.timeline;
    let o = end.opened.as_ref();
    let counters = s.counters.as_ref().ok();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut r = Map::new();
    for (k, val) in [
        ("users", json!(a.common.connections)),
        ("observers", json!(end.n_observers)),
        ("connections", json!(o.map_or(0, |o| o.attempted as u64 - o.failed()))),
        ("connect_failures", json!(o.map(|o| o.failures.clone()).unwrap_or_default())),
        ("kafka_error", json!(end.kafka_error)),
        ("rate_per_s", json!(a.rate)),
        ("price_rate_per_s", json!(a.price_rate)),
        ("baseline_s", json!(t.baseline.as_secs_f64())),
        ("drop_ms", json!(ms(t.drop))),
        ("storm_s", json!(t.storm.as_secs_f64())),
        ("drain_s", json!(t.drain.as_secs_f64())),
        (
            "resume",
            json!({
                "resumes": t.resumes, "recovered": storm.recovered, "not_recovered": storm.not_recovered,
                "without_since": storm.without_since, "failed": storm.failed(), "failures": storm.failures,
                "over": storm.settled, "recover_all_ms": s.recover_all.map(ms),
                "resubscribe": percentiles(&storm.resubscribe.total), "recover": percentiles(&storm.recover.total),
                "missed": storm.missed, "replayed_received": storm.replayed,
            }),
        ),
        (
            "replay",
            json!({
                "read_for_replays": counters.map(|c| c.read), "read_again": counters.map(|c| c.reread),
                "replayed_range": s.replayed_range,
                "read_ratio": s.read_ratio, "range_partitions": storm.range.partitions(),
                "server_replayed": counters.map(|c| c.replayed), "scans": counters.map(|c| c.scans),
                "outcomes": counters.map(|c| c.outcomes.clone()), "metrics_error": s.counters.as_ref().err(),
            }),
        ),
        (
            "private",
            json!({
                "produced": end.produced.0, "expected": s.private_expected, "received": streams.received,
                "lost": s.private_lost, "users_short": s.users_short, "duplicates": streams.dups,
                "gaps": streams.gaps, "misrouted": streams.misrouted,
            }),
        ),
        (
            "prices",
            json!({
                "produced": end.produced.1, "producer_late": end.prices_late, "expected": s.prices_expected,
                "received": prices.received, "lost": s.prices_lost, "duplicates": prices.dups, "gaps": prices.gaps,
                "baseline": percentiles(&prices.baseline.total), "storm": percentiles(&prices.storm.total),
                "storm_away": percentiles(&prices.storm_away), "storm_reconnect": percentiles(&prices.storm_reconnect),
                "p99_ratio": s.p99_ratio,
                "server_share": {
                    "what": "from the envelope's timestamp (the server's ingest, ms) to receipt",
                    "baseline": percentiles(&prices.served[0]),
                    "storm_away": percentiles(&prices.served[1]),
                    "storm_reconnect": percentiles(&prices.served[2]),
                },
            }),
        ),
        ("produced", json!(end.produced.0 + end.produced.1)),
        ("expected", json!(s.private_expected + s.prices_expected)),
        ("received", json!(streams.received + prices.received)),
        ("lost", json!(s.private_lost + s.prices_lost)),
        ("duplicates", json!(streams.dups + prices.dups)),
        ("gaps", json!(streams.gaps + prices.gaps)),
        ("misrouted", json!(streams.misrouted)),
        ("closed_unexpectedly", json!(closes(shared))),
        ("latency", percentiles(&prices.storm.total)),
        ("server", server),
        ("client_cpu_ms", json!(ms(t.mine))),
        (
            "hdr",
            json!({
                "latency": hdr::encode(&prices.storm.total), "baseline": hdr::encode(&prices.baseline.total),
                "resubscribe": hdr::encode(&storm.resubscribe.total), "recover": hdr::encode(&storm.recover.total),
            }),
        ),
        (
            "coordinated_omission",
            json!(
                "corrected: price latency counts from each update's scheduled send time (stamped in it), resume \
                   times from the moment every user was due to reconnect"
            ),
        ),
    ] {
        r.insert(k.into(), val);
    }
    r
}

fn human(a: &ResumeArgs, shared: &Shared, end: &End, s: &Sums, run_probe: Option<&crate::run::Probe>, server: &Value) {
    let (streams, prices, storm) = (shared.streams.borrow(), shared.prices.lock(), shared.storm.borrow());
    let t = &end.timeline;
    out!(
        "resume: {} private connections (a user each) + {} observers on prices; {} private updates/s, {} prices/s; \
         baseline {:.1} s, away {} s, after {} s",
        a.common.connections,
        end.n_observers,
        a.rate,
        a.price_rate,
        t.baseline.as_secs_f64(),
        a.away,
        a.after
    );
    if let Some(o) = &end.opened {
        for (cause, n) in &o.failures {
            out!("  connect failure x{n}: {cause}");
        }
    }
    if let Some(e) = &end.kafka_error {
        out!("  Kafka unreachable at {}: {e}", a.brokers);
    }
    out!(
        "  drop: {} connections closed in {}; storm {:.2} s (drop to the end of --after)",
        t.resumes,
        fmt_us(t.drop.as_micros() as f64),
        t.storm.as_secs_f64()
    );
    out!(
        "  resumes: {} of {} recovered, {} not recovered, {} without a position, {} failed; {}",
        storm.recovered,
        t.resumes,
        storm.not_recovered,
        storm.without_since,
        storm.failed(),
        s.recover_all.map_or("not every client recovered".into(), |d| format!(
            "every client recovered {} after the reconnect began",
            fmt_us(d.as_micros() as f64)
        ))
    );
    for (cause, n) in &storm.failures {
        out!("  resume failure x{n}: {cause}");
    }
    out!("    reconnect -> subscribed: {}", brief(&storm.resubscribe.total));
    out!("    reconnect -> every missed update in hand: {}", brief(&storm.recover.total));
    let read = match &s.counters {
        Ok(c) => format!(
            "the server read {} Kafka messages for them ({} of them again) in {} scans: {} per message in the range",
            c.read,
            c.reread,
            c.scans,
            s.read_ratio.as_f64().map_or("-".into(), |r| format!("{r:.2}x"))
        ),
        Err(e) => format!("no read count ({e})"),
    };
    out!(
        "  replays: {} missed updates announced, {} received, a range of {} messages over {} partitions; {read}",
        storm.missed,
        storm.replayed,
        s.replayed_range,
        storm.range.partitions()
    );
    out!(
        "  private: received {}/{} expected (lost {} at {} users); duplicates {}, gaps {}, misrouted {}, closed {}",
        streams.received,
        s.private_expected,
        s.private_lost,
        s.users_short,
        streams.dups,
        streams.gaps,
        streams.misrouted,
        s.private_closed
    );
    out!(
        "  prices: received {}/{} expected (lost {}); duplicates {}, gaps {}, observers closed {}",
        prices.received,
        s.prices_expected,
        s.prices_lost,
        prices.dups,
        prices.gaps,
        s.observers_closed
    );
    let p99 = |x: Option<u64>| x.map_or("no samples".into(), |us| fmt_us(us as f64));
    out!(
        "  price p99: baseline {}, storm {} ({})",
        p99(s.p99_baseline),
        p99(s.p99_storm),
        s.p99_ratio.as_f64().map_or("no ratio".into(), |r| format!("{r:.2}x the baseline"))
    );
    for (cause, n) in closes(shared) {
        out!("  closed x{n}: {cause}");
    }
    print_table("prices publish -> receive, baseline (from intended send time)", &prices.baseline.total);
    print_table("prices publish -> receive, storm (from intended send time)", &prices.storm.total);
    print_table("  of which the drop and the time away", &prices.storm_away);
    print_table("  of which the reconnect and after", &prices.storm_reconnect);
    print_table("prices, the server's share (its ingest stamp -> receive), baseline", &prices.served[0]);
    print_table("  the drop and the time away", &prices.served[1]);
    print_table("  the reconnect and after", &prices.served[2]);
    if let Some(p) = run_probe {
        p.describe(end.server_end.is_none());
        let cores = |k: &str| server[k].as_f64().map_or("-".into(), |x| format!("{:.0}%", x * 100.0));
        out!(
            "  server: {} of a core in the baseline, {} in the storm; RSS {} at the end of the storm",
            cores("cpu_utilisation_baseline"),
            cores("cpu_utilisation_storm"),
            server["rss_kb"].as_u64().map_or("-".into(), |k| format!("{:.1} MB", k as f64 / 1024.0))
        );
    }
}

fn finish(run: &mut Run, a: &ResumeArgs, settings: Value, shared: &Shared, end: End, v: &mut Verdict) -> u8 {
    let s = Sums::of(shared, &end);
    judge(v, run, a, shared, &end, &s);
    let server = server_json(run, &end);
    let r = report(a, shared, &end, &s, server.clone());
    // A copy: `values` and `human` take the lock again.
    let latency = shared.prices.lock().storm.total.clone();
    let figures = Figures { latency: &latency, values: values(shared, &end, &s) };
    let probe = run.probe.take();
    run.finish("resume", settings, r, v, &figures, || human(a, shared, &end, &s, probe.as_ref(), &server))
}
