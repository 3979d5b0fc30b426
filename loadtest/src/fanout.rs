//! The fan-out engine and its scenarios: subscribers on price channels and
//! an open-loop Kafka producer stamping each update with its intended send
//! time and a sequence number. `fanout` puts every subscriber on `prices`;
//! `churn` adds connections opened and dropped at a steady rate; `markets`
//! (markets.rs) routes updates per market. A scenario plugs into the
//! engine through [`Plan`] (plan.rs).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::plan::{Check, Delivery, Expectation, Plan, Stamper, Totals};
use crate::run::Run;
use crate::verdict::{Figures, Verdict};
use crate::ws::{field_u64, Sequence, SENT_NS, SEQ};
use crate::{
    brief, causes, hdr, now_ns, open_all, per, percentiles, print_table, procstat, same_channels, set_up, Channels,
    Common, Recorder, Setup,
};

/// The settings every fan-out scenario shares (the rate is each
/// scenario's own: their defaults differ).
#[derive(Args, Serialize)]
pub struct LoadOpts {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) common: Common,
    /// Kafka bootstrap servers the server under test consumes from.
    #[arg(long)]
    pub(crate) brokers: String,
    /// Kafka topic the server reads price updates from.
    #[arg(long, default_value = "price.updates")]
    pub(crate) topic: String,
    /// Seconds of measured load.
    #[arg(long, short = 'd', default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) duration: u64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// Bytes per Kafka value (padded; values are never shorter than their
    /// fixed fields, about 160 bytes).
    #[arg(long, default_value_t = 200)]
    pub(crate) size: usize,
    /// Seconds to wait for stragglers after the producer stops.
    #[arg(long, default_value_t = 5)]
    pub(crate) drain: u64,
    /// Idempotent producer: in order and exactly once across broker
    /// outages (for runs against `broker --down-every`); adds latency.
    #[arg(long)]
    pub(crate) idempotent: bool,
    /// Ask the kernel to stamp data as it reaches each subscriber's socket
    /// (`SO_TIMESTAMPNS`): each latency is then also split into the
    /// server's part (publish → bytes in the client's socket, which this
    /// client's own lag does not inflate) and the client's (socket →
    /// parsed). A diagnostic: the stamps cost the client ~15% more CPU and
    /// the server a clock read per packet, so headline runs leave it off.
    #[arg(long)]
    pub(crate) arrival_stamps: bool,
}

#[derive(Args, Serialize)]
pub struct FanoutArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) opts: LoadOpts,
    /// Updates per second (open loop: the schedule never waits for the server).
    #[arg(long, short = 'r', default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) rate: u64,
}

#[derive(Args, Serialize)]
pub struct ChurnArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) opts: LoadOpts,
    /// Updates per second (open loop: the schedule never waits for the server).
    #[arg(long, short = 'r', default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) rate: u64,
    /// Extra connections opened (auth + subscribe), held and dropped per
    /// second during the measured window.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) churn_rate: u64,
    /// How long each churned connection stays open, in ms.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) churn_hold_ms: u64,
}

/// `fanout` and `churn`: every subscriber on `prices`, one stream in order.
struct InOrder(Sequence);

impl Check for InOrder {
    fn see(&mut self, _: &[u8], seq: u64, _: u64) -> Delivery {
        let (skipped, repeat) = self.0.see(seq, false);
        Delivery::Update { skipped, repeat }
    }
}

/// Every measured update at every subscriber.
struct All {
    subscribers: u64,
    warm: u64,
}

impl Expectation for All {
    fn of(&mut self, _: usize, produced: u64) -> u64 {
        produced.saturating_sub(self.warm)
    }

    fn total(&mut self, produced: u64) -> u64 {
        produced.saturating_sub(self.warm) * self.subscribers
    }
}

struct FanoutPlan {
    churn: bool,
}

impl Plan for FanoutPlan {
    type Check = InOrder;

    fn scenario(&self) -> &'static str {
        if self.churn {
            "churn"
        } else {
            "fanout"
        }
    }

    fn channels(&self) -> Channels {
        same_channels(&["prices"])
    }

    fn check(&self, _: usize, _: &Setup) -> InOrder {
        InOrder(Sequence::default())
    }

    fn expectation(&self, connected: &[usize], warm: u64) -> Box<dyn Expectation> {
        Box::new(All { subscribers: connected.len() as u64, warm })
    }

    fn stamper(&self) -> Stamper {
        Box::new(|_, v: &mut String| v.push_str(r#""token":"ETH","chainId":8453,"#))
    }

    fn headline(&self, subscribers: usize, rate: u64, o: &LoadOpts) -> String {
        format!(
            "{}: {subscribers} subscribers x {rate} updates/s for {} s ({} B values)",
            self.scenario(),
            o.duration,
            o.size
        )
    }
}

/// What the subscribers share (one runtime thread: no locking).
struct Tally {
    /// Intended send time → parsed (the headline latency).
    latency: Recorder,
    /// Deliveries are routed per market: leaks are counted and shown.
    routed: bool,
    /// Intended send time → kernel receive stamp (the server's part).
    to_socket: Recorder,
    /// Kernel receive stamp → parsed (this client's part).
    client_lag: Recorder,
    received: u64,
    /// Distinct measured updates received, over all subscribers.
    measured: u64,
    /// The same per subscriber (by its place in the readers).
    measured_by: Vec<u64>,
    gaps: u64,
    dups: u64,
    leaked: u64,
    snapshots: u64,
    /// Subscribers the server closed (or lost) before the run ended, by cause.
    closed: BTreeMap<String, u64>,
}

pub async fn run_fanout(a: FanoutArgs) -> anyhow::Result<u8> {
    let settings = serde_json::to_value(&a)?;
    run(&a.opts, a.rate, None, settings, FanoutPlan { churn: false }).await
}

pub async fn run_churn(a: ChurnArgs) -> anyhow::Result<u8> {
    let settings = serde_json::to_value(&a)?;
    run(&a.opts, a.rate, Some((a.churn_rate, a.churn_hold_ms)), settings, FanoutPlan { churn: true }).await
}

/// Per-second figures of the warm-up, measure and drain phases.
#[derive(Default, Clone, Copy)]
struct Seen {
    received: u64,
    gaps: u64,
    dups: u64,
    leaked: u64,
    closed: u64,
}

fn tick(run: &mut Run, tally: &RefCell<Tally>, churn: Option<&RefCell<ChurnTally>>, prev: &mut Seen, extra: &str) {
    let mut t = tally.borrow_mut();
    let closed: u64 = t.closed.values().sum();
    let now = Seen { received: t.received, gaps: t.gaps, dups: t.dups, leaked: t.leaked, closed };
    let secs = run.interval().as_secs_f64().max(1e-3);
    let latency = if run.phase() == "warm-up" { "not measured in warm-up".into() } else { brief(&t.latency.interval) };
    let leaked = if t.routed { format!(", +{} leaked", now.leaked - prev.leaked) } else { String::new() };
    let mut line = format!(
        "{:.0} deliveries/s; latency {latency}; +{} gaps, +{} duplicates{leaked}, +{} closed",
        (now.received - prev.received) as f64 / secs,
        now.gaps - prev.gaps,
        now.dups - prev.dups,
        now.closed - prev.closed
    );
    if let Some(c) = churn {
        let c = c.borrow();
        line.push_str(&format!(
            "; churn +{} set up, {} failed, set-up {}",
            c.setup.interval.len(),
            c.failed(),
            brief(&c.setup.interval)
        ));
    }
    line.push_str(extra);
    run.progress(&line);
    *prev = now;
    let t = &mut *t;
    let mut recorders: Vec<&mut Recorder> = vec![&mut t.latency, &mut t.to_socket, &mut t.client_lag];
    let mut churn_ref = churn.map(|c| c.borrow_mut());
    if let Some(c) = churn_ref.as_mut() {
        recorders.push(&mut c.setup);
    }
    if let Err(e) = run.end_interval(&mut recorders) {
        eprintln!("{e:#}");
    }
}

/// Runs phases until `end` (or the stop), a progress line a second.
async fn phase_until(
    run: &mut Run,
    end: Instant,
    tally: &RefCell<Tally>,
    churn: Option<&RefCell<ChurnTally>>,
    prev: &mut Seen,
    done: impl Fn() -> bool,
    extra: impl Fn() -> String,
) {
    let mut ticked = false;
    while Instant::now() < end && !done() {
        let stopped = run.stop.sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now()))).await;
        if stopped {
            break;
        }
        if run.interval() >= Duration::from_millis(999) || Instant::now() >= end || done() {
            tick(run, tally, churn, prev, &extra());
            ticked = true;
        }
    }
    // Every phase shows at least one line, however short.
    if !ticked {
        tick(run, tally, churn, prev, &extra());
    }
}

/// Runs a fan-out scenario: connect, warm-up, measure, drain; the verdict
/// and the result. Shared by `fanout`, `churn` and `markets`.
pub(crate) async fn run<P: Plan>(
    a: &LoadOpts,
    rate: u64,
    churn_settings: Option<(u64, u64)>,
    settings: Value,
    plan: P,
) -> anyhow::Result<u8> {
    let c = &a.common;
    let scenario = plan.scenario();
    let routed = plan.routed();
    if c.deadline <= a.warmup + a.duration {
        bail!(
            "--deadline {} s is not longer than --warmup {} s + --duration {} s: the run could never complete",
            c.deadline,
            a.warmup,
            a.duration
        );
    }
    let mut run = Run::start(c, scenario)?;
    let mut v = Verdict::default();
    // Kafka first: without it nothing can be measured.
    let brokers = a.brokers.clone();
    let kafka_error = tokio::task::spawn_blocking(move || crate::kafka::check(&brokers))
        .await
        .map_err(|e| anyhow::anyhow!("kafka check: {e}"))?
        .err();
    if let Some(e) = &kafka_error {
        v.fail(format!("Kafka unreachable at --brokers {}: {e}; nothing was produced", a.brokers));
    }
    let tally = Rc::new(RefCell::new(Tally {
        latency: Recorder::new("latency"),
        to_socket: Recorder::new("to_socket"),
        client_lag: Recorder::new("client_lag"),
        routed,
        received: 0,
        measured: 0,
        measured_by: Vec::new(),
        gaps: 0,
        dups: 0,
        leaked: 0,
        snapshots: 0,
        closed: BTreeMap::new(),
    }));
    let churn_tally = Rc::new(RefCell::new(ChurnTally::default()));
    let churn_ref = churn_settings.map(|_| &*churn_tally);
    let mut o = if kafka_error.is_none() { Some(open_all(&mut run, c, plan.channels(), 1).await) } else { None };
    let setups = o.as_mut().map(|o| std::mem::take(&mut o.setups)).unwrap_or_default();
    let subscribers = setups.len();
    let connected: Vec<usize> = setups.iter().map(|(i, _)| *i).collect();
    let snapshots_announced: u64 = setups.iter().map(|(_, s)| s.snapshots_announced).sum();
    tally.borrow_mut().measured_by = vec![0; subscribers];
    // Updates with a seq at or past this are measured (set when warm-up ends).
    let measure_from = Rc::new(Cell::new(u64::MAX));
    // False once the run is over: closes after that are expected.
    let running = Rc::new(Cell::new(true));
    let mut readers = Vec::with_capacity(subscribers);
    for (k, (i, s)) in setups.into_iter().enumerate() {
        let (tally, measure_from, running) = (tally.clone(), measure_from.clone(), running.clone());
        let mut check = plan.check(i, &s);
        let stamps = a.arrival_stamps;
        readers.push(tokio::task::spawn_local(async move {
            let mut ws = s.ws;
            if stamps {
                // Without stamps the run still measures publish -> receive.
                let _ = ws.stamp_arrivals();
            }
            // What arrived while subscribing (snapshots) comes first.
            for p in &s.early {
                see(&tally, &mut check, k, measure_from.get(), p, None);
            }
            drop(s.early);
            loop {
                let f = match ws.next_text_or_close().await {
                    Ok(f) => f,
                    Err(why) => {
                        if running.get() {
                            *tally.borrow_mut().closed.entry(why).or_insert(0) += 1;
                        }
                        return;
                    }
                };
                see(&tally, &mut check, k, measure_from.get(), ws.payload(&f), ws.arrived_ns());
            }
        }));
    }

    let total = rate * (a.warmup + a.duration);
    let warm = rate * a.warmup;
    let expectation = Rc::new(RefCell::new(plan.expectation(&connected, warm)));
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    let server_start = run.sample();
    let mut prev = Seen::default();
    let mut window = Duration::ZERO;
    let (mut server_before, mut server_after, mut broker_cpu) = (None, None, None);
    let (mut delivered, mut mine) = (0u64, Duration::ZERO);
    let mut drain_s = 0.0;
    let mut producer = None;
    let go = kafka_error.is_none() && subscribers > 0 && !run.stop.stopped();
    if go {
        producer = Some({
            let (brokers, topic, size) = (a.brokers.clone(), a.topic.clone(), a.size);
            let (stop, produced, late) = (stop.clone(), produced.clone(), late.clone());
            let idempotent = a.idempotent;
            let mut stamp = plan.stamper();
            std::thread::spawn(move || {
                let producer = crate::kafka::producer(&brokers, 0, idempotent);
                let pace = Pace { rate, total, stop: &stop, produced: &produced, late: &late };
                produce(&producer, &topic, size, &pace, &mut *stamp)
            })
        });
        let start = Instant::now();
        run.enter("warm-up");
        run.end_interval(&mut [])?;
        phase_until(&mut run, start + Duration::from_secs(a.warmup), &tally, None, &mut prev, || false, String::new)
            .await;
    }
    if go && !run.stop.stopped() {
        // The measured window: from the end of warm-up to the end of the
        // production schedule (the drain is not in it).
        measure_from.set(warm);
        run.enter("measure");
        let broker_cpu_before = run.probe.as_ref().map(|p| p.broker_cpu());
        server_before = run.sample();
        let me_before = procstat::Sample::own();
        let received_before = tally.borrow().received;
        let window_start = Instant::now();
        let end = window_start + Duration::from_secs(a.duration);
        let churn_task = churn_settings.map(|(rate, hold_ms)| {
            tokio::task::spawn_local(churn(c.clone(), run.server, rate, hold_ms, end, churn_tally.clone()))
        });
        phase_until(&mut run, end, &tally, churn_ref, &mut prev, || false, String::new).await;
        window = window_start.elapsed();
        delivered = tally.borrow().received - received_before;
        server_after = run.sample();
        broker_cpu = match (broker_cpu_before, run.probe.as_ref()) {
            (Some(b), Some(p)) => Some(p.broker_cpu().saturating_sub(b)),
            _ => None,
        };
        mine = procstat::Sample::own().cpu_since(&me_before);
        if !run.stop.stopped() {
            // Stragglers: until every subscriber has every measured update
            // the producer sent, or the drain time.
            run.enter("drain");
            let drain_start = Instant::now();
            let (t2, p2, e2) = (tally.clone(), produced.clone(), expectation.clone());
            let done = move || {
                let p = p2.load(Ordering::Relaxed);
                p >= total && t2.borrow().measured >= e2.borrow_mut().total(p)
            };
            let (t3, p3, e3) = (tally.clone(), produced.clone(), expectation.clone());
            let extra = move || {
                let expected = e3.borrow_mut().total(p3.load(Ordering::Relaxed));
                format!("; measured {}/{expected}", t3.borrow().measured)
            };
            phase_until(
                &mut run,
                drain_start + Duration::from_secs(a.drain),
                &tally,
                churn_ref,
                &mut prev,
                done,
                extra,
            )
            .await;
            if let Some(task) = churn_task {
                let abort = task.abort_handle();
                tokio::select! {
                    _ = task => {}
                    _ = run.stop.wait() => abort.abort(),
                }
            }
            drain_s = drain_start.elapsed().as_secs_f64();
        } else if let Some(task) = churn_task {
            task.abort();
        }
    }
    running.set(false);
    stop.store(true, Ordering::Release);
    if let Some(p) = producer {
        let _ = tokio::task::spawn_blocking(move || p.join()).await;
    }
    for r in readers {
        r.abort();
    }
    let server_end = run.sample();

    let t = tally.borrow();
    let churn = churn_tally.borrow();
    let produced = produced.load(Ordering::Relaxed);
    let mut expectation = expectation.borrow_mut();
    let expected_measured = expectation.total(produced);
    let lost = expected_measured.saturating_sub(t.measured);
    let connections_short =
        connected.iter().zip(&t.measured_by).filter(|(i, got)| **got < expectation.of(**i, produced)).count() as u64;
    let totals = Totals {
        measured_updates: produced.saturating_sub(warm),
        expected_measured,
        leaked: t.leaked,
        snapshots: t.snapshots,
        snapshots_announced,
        connections_short,
    };
    let n_closed: u64 = t.closed.values().sum();
    let throughput = per(delivered as f64, window.as_secs_f64());
    let exited = run.probe.is_some() && server_end.is_none();
    let server = match (&run.probe, server_before, server_after) {
        (Some(p), Some(b), Some(af)) => {
            let cpu = af.cpu_since(&b);
            let mut m = p.base_json(exited);
            m.insert("cpu_ms".into(), json!(cpu.as_secs_f64() * 1e3));
            m.insert("cpu_us_per_delivery".into(), per(cpu.as_secs_f64() * 1e6, delivered as f64));
            m.insert("cpu_utilisation".into(), per(cpu.as_secs_f64(), window.as_secs_f64()));
            m.insert("rss_before_kb".into(), json!(server_start.map(|s| s.rss_kb)));
            m.insert("rss_kb".into(), json!(af.rss_kb));
            m.insert("embedded_broker_cpu_ms".into(), json!(broker_cpu.map(|d| d.as_secs_f64() * 1e3)));
            Value::Object(m)
        }
        (Some(p), ..) => {
            let mut m = p.base_json(exited);
            m.insert("rss_before_kb".into(), json!(server_start.map(|s| s.rss_kb)));
            m.insert("rss_kb".into(), json!(server_end.map(|s| s.rss_kb)));
            Value::Object(m)
        }
        _ => Value::Null,
    };

    let failed_setups = o.as_ref().map_or(0, |o| o.failed());
    if let Some(r) = o.as_ref().and_then(|o| o.failure_reason()) {
        v.fail(r);
    }
    if o.is_some() && subscribers == 0 && !run.stop.stopped() {
        v.fail("no subscriber could be set up");
    }
    if churn.failed() > 0 {
        v.fail(format!(
            "{} of {} churned connections failed to set up: {}",
            churn.failed(),
            churn.opened + churn.failed(),
            causes(&churn.failures)
        ));
    }
    if n_closed > 0 {
        v.fail(format!("{n_closed} of {subscribers} subscribers closed unexpectedly: {}", causes(&t.closed)));
    }
    let churn_closed: u64 = churn.closed.values().sum();
    if churn_closed > 0 {
        v.fail(format!("{churn_closed} churned connections closed unexpectedly: {}", causes(&churn.closed)));
    }
    if lost > 0 {
        let mut r = format!(
            "lost {lost} of {expected_measured} expected deliveries ({:.2}%)",
            lost as f64 * 100.0 / expected_measured as f64
        );
        if routed {
            r.push_str(&format!(" at {connections_short} of {subscribers} connections"));
        }
        if t.measured == 0 {
            r.push_str(&format!(
                ": nothing was delivered; does the server consume topic {} from the Kafka at --brokers {}?",
                a.topic, a.brokers
            ));
        }
        v.fail(r);
    }
    if t.leaked > 0 {
        v.fail(format!("{} leaked deliveries (updates of a market the connection is not subscribed to)", t.leaked));
    }
    if t.dups > 0 {
        v.fail(format!("{} duplicate deliveries", t.dups));
    }
    // Snapshot frames precede live updates, so by the end of the drain
    // every one announced has been read (unless the run was cut short).
    if routed && !run.stop.stopped() && t.snapshots != snapshots_announced {
        v.fail(format!(
            "the subscribe replies announced {snapshots_announced} snapshot frames and {} arrived",
            t.snapshots
        ));
    }
    if t.latency.total.is_empty() {
        v.fail("no samples: no measured update was delivered");
    }
    if exited {
        v.fail("the server process exited during the run");
    }
    let mut values = BTreeMap::from([
        ("lost", lost as f64),
        ("duplicates", t.dups as f64),
        ("gaps", t.gaps as f64),
        ("failed", (failed_setups + churn.failed()) as f64),
        ("closed", (n_closed + churn_closed) as f64),
        ("delivered", t.measured as f64),
        ("connections", subscribers as f64),
    ]);
    if routed {
        values.insert("leaked", t.leaked as f64);
        values.insert("snapshots", t.snapshots as f64);
    }
    if let Some(r) = throughput.as_f64() {
        values.insert("throughput", r);
    }
    if let Some(x) = server["cpu_us_per_delivery"].as_f64() {
        values.insert("server_cpu_us", x);
    }
    let figures = Figures { latency: &t.latency.total, values };

    let mut hdrs = Map::new();
    hdrs.insert("latency".into(), json!(hdr::encode(&t.latency.total)));
    if !t.to_socket.total.is_empty() {
        hdrs.insert("to_socket".into(), json!(hdr::encode(&t.to_socket.total)));
        hdrs.insert("client_lag".into(), json!(hdr::encode(&t.client_lag.total)));
    }
    if churn_settings.is_some() {
        hdrs.insert("churn_setup".into(), json!(hdr::encode(&churn.setup.total)));
    }
    let mut report = Map::new();
    for (k, val) in [
        ("subscribers", json!(subscribers)),
        ("connections_attempted", json!(o.as_ref().map_or(0, |o| o.attempted))),
        ("connect_failures", json!(o.as_ref().map(|o| o.failures.clone()).unwrap_or_default())),
        ("setup", percentiles(&o.as_ref().map_or_else(hdr::histogram, |o| o.total.total.clone()))),
        ("kafka_error", json!(kafka_error)),
        ("rate_per_s", json!(rate)),
        ("warmup_s", json!(a.warmup)),
        ("duration_s", json!(a.duration)),
        ("value_bytes", json!(a.size)),
        ("produced", json!(produced)),
        ("producer_late", json!(late.load(Ordering::Relaxed))),
        ("expected_measured", json!(expected_measured)),
        ("measured", json!(t.measured)),
        ("lost", json!(lost)),
        ("delivered_in_window", json!(delivered)),
        ("window_s", json!(window.as_secs_f64())),
        ("drain_s", json!(drain_s)),
        ("deliveries_per_s", throughput.clone()),
        ("gaps", json!(t.gaps)),
        ("duplicates", json!(t.dups)),
        ("closed_unexpectedly", json!(t.closed)),
        ("latency", percentiles(&t.latency.total)),
        ("latency_to_socket", percentiles(&t.to_socket.total)),
        ("client_lag", percentiles(&t.client_lag.total)),
        ("server", server.clone()),
        ("client_cpu_ms", json!(mine.as_secs_f64() * 1e3)),
        ("client_cpu_utilisation", per(mine.as_secs_f64(), window.as_secs_f64())),
        (
            "churn",
            json!({
                "opened": churn.opened, "failed": churn.failed(), "failures": churn.failures,
                "closed_unexpectedly": churn.closed, "setup": percentiles(&churn.setup.total),
            }),
        ),
        ("hdr", Value::Object(hdrs)),
        (
            "coordinated_omission",
            json!("corrected: latency counts from each update's scheduled send time (stamped in it), churn set-up from each attempt's scheduled time"),
        ),
    ] {
        report.insert(k.into(), val);
    }
    plan.report(&mut report, &totals);
    let probe = run.probe.take();
    let human = || {
        let mut head = plan.headline(subscribers, rate, a);
        if let Some((r, h)) = churn_settings {
            head.push_str(&format!(", churn {r}/s held {h} ms"));
        }
        out!("{head}");
        if let Some(o) = &o {
            for (cause, n) in &o.failures {
                out!("  connect failure x{n}: {cause}");
            }
        }
        if let Some(e) = &kafka_error {
            out!("  Kafka unreachable at {}: {e}", a.brokers);
        }
        out!(
            "  delivered {delivered} in the {:.2} s window = {}; measured {}/{} expected (lost {lost}); gaps {}, duplicates {}{}",
            window.as_secs_f64(),
            throughput.as_f64().map_or("no deliveries/s figure".into(), |r| format!("{r:.0} deliveries/s")),
            t.measured,
            expected_measured,
            t.gaps,
            t.dups,
            if routed { format!(", leaked {}", t.leaked) } else { String::new() }
        );
        plan.describe(&totals);
        for (cause, n) in &t.closed {
            out!("  subscriber closed x{n}: {cause}");
        }
        print_table("publish -> receive (from intended send time)", &t.latency.total);
        if !t.to_socket.total.is_empty() {
            print_table("publish -> in the client's socket (kernel receive stamp)", &t.to_socket.total);
            out!("  client lag (socket -> parsed): {}", brief(&t.client_lag.total));
        }
        if churn_settings.is_some() {
            out!(
                "  churn: {} connections opened and dropped ({} failed), set-up (from scheduled time) {}",
                churn.opened,
                churn.failed(),
                brief(&churn.setup.total)
            );
        }
        if let Some(p) = &probe {
            p.describe(exited);
            let mb = |kb: Option<u64>| kb.map_or("-".to_string(), |k| format!("{:.1} MB", k as f64 / 1024.0));
            out!(
                "  server: {} CPU per delivery ({} of a core); RSS {} at start, {} at the end of the window",
                server["cpu_us_per_delivery"].as_f64().map_or("no deliveries: no".into(), |x| format!("{x:.3} µs")),
                server["cpu_utilisation"].as_f64().map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
                mb(server_start.map(|s| s.rss_kb)),
                mb(server_after.or(server_end).map(|s| s.rss_kb)),
            );
            if let Some(b) = broker_cpu.filter(|_| !p.broker_threads.is_empty()) {
                out!("  of which the embedded broker's threads: {:.1} ms of CPU", b.as_secs_f64() * 1e3);
            }
        }
        if let Some(u) = per(mine.as_secs_f64(), window.as_secs_f64()).as_f64() {
            out!("  client: {:.0}% of a core", u * 100.0);
        }
    };
    Ok(run.finish(scenario, settings, report, &mut v, &figures, human))
}

/// One update frame at subscriber `k`: checked, counted, and (when
/// measured and expected) its latency recorded. `arrived_ns` is the
/// kernel's receive stamp, with `--arrival-stamps`.
fn see<C: Check>(
    tally: &RefCell<Tally>,
    check: &mut C,
    k: usize,
    measure_from: u64,
    p: &[u8],
    arrived_ns: Option<u64>,
) {
    let (Some(seq), Some(sent)) = (field_u64(p, &SEQ), field_u64(p, &SENT_NS)) else {
        return;
    };
    let now = now_ns();
    let delivery = check.see(p, seq, sent);
    let mut t = tally.borrow_mut();
    t.received += 1;
    match delivery {
        Delivery::Update { skipped, repeat } => {
            t.gaps += skipped;
            t.dups += repeat as u64;
            if seq >= measure_from && !repeat {
                t.measured += 1;
                t.measured_by[k] += 1;
                t.latency.record(now.saturating_sub(sent) / 1000);
                if let Some(at) = arrived_ns {
                    t.to_socket.record(at.saturating_sub(sent) / 1000);
                    t.client_lag.record(now.saturating_sub(at) / 1000);
                }
            }
        }
        Delivery::Snapshot => t.snapshots += 1,
        Delivery::Leaked => t.leaked += 1,
    }
}

struct ChurnTally {
    opened: u64,
    failures: BTreeMap<String, u64>,
    closed: BTreeMap<String, u64>,
    setup: Recorder,
}

impl ChurnTally {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

impl Default for ChurnTally {
    fn default() -> Self {
        ChurnTally {
            opened: 0,
            failures: BTreeMap::new(),
            closed: BTreeMap::new(),
            setup: Recorder::new("churn_setup"),
        }
    }
}

/// Opens `rate` connections per second until `end`, each authenticated,
/// subscribed to prices, held for `hold_ms` (answering pings) and dropped.
/// Set-up latency counts from each attempt's scheduled time.
async fn churn(
    common: Common,
    server: std::net::SocketAddr,
    rate: u64,
    hold_ms: u64,
    end: Instant,
    tally: Rc<RefCell<ChurnTally>>,
) {
    let start = Instant::now();
    let mut k = 0u64;
    let mut tasks = Vec::new();
    loop {
        let at = start + Duration::from_secs_f64(k as f64 / rate as f64);
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let (c, tally) = (common.clone(), tally.clone());
        let i = 10_000_000 + k as usize;
        tasks.push(tokio::task::spawn_local(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                set_up(&c, server, i, &format!("lt-churn-{i}"), &["prices"], at),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("set-up timed out after 10 s")));
            match r {
                Ok(s) => {
                    {
                        let mut t = tally.borrow_mut();
                        t.opened += 1;
                        t.setup.record(at.elapsed().as_micros() as u64);
                    }
                    let mut ws = s.ws;
                    if let Ok(why) = tokio::time::timeout(Duration::from_millis(hold_ms), ws.run_until_closed()).await {
                        *tally.borrow_mut().closed.entry(why).or_insert(0) += 1;
                    }
                }
                Err(e) => *tally.borrow_mut().failures.entry(format!("{e:#}")).or_insert(0) += 1,
            }
        }));
        k += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The producer's schedule and counters.
pub(crate) struct Pace<'a> {
    pub(crate) rate: u64,
    pub(crate) total: u64,
    pub(crate) stop: &'a AtomicBool,
    pub(crate) produced: &'a AtomicU64,
    pub(crate) late: &'a AtomicU64,
}

/// The open-loop producer: update `i` is due at `start + i / rate`; its
/// intended time is stamped in it whether or not the producer kept up.
/// `stamp` writes its routing fields (token, chainId, ...) first.
pub(crate) fn produce(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    size: usize,
    pace: &Pace,
    stamp: &mut dyn FnMut(u64, &mut String),
) {
    use rdkafka::producer::BaseRecord;
    let Pace { rate, total, stop, produced, late } = *pace;
    let start_ns = now_ns();
    let start = Instant::now();
    let interval_ns = 1_000_000_000 / rate.max(1);
    let mut value = String::with_capacity(size + 64);
    for i in 0..total {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if crate::kafka::wait_until_due(start, i, interval_ns, stop) {
            late.fetch_add(1, Ordering::Relaxed);
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let intended = start_ns + i * interval_ns;
        value.clear();
        value.push('{');
        stamp(i, &mut value);
        use std::fmt::Write;
        let _ = write!(
            value,
            r#""price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","seq":{i},"sentNs":{intended},"pad":""#
        );
        while value.len() + 2 < size {
            value.push('x');
        }
        value.push_str("\"}");
        if !crate::kafka::send(producer, BaseRecord::<(), str>::to(topic).payload(value.as_str()).partition(0), stop) {
            break;
        }
        produced.fetch_add(1, Ordering::Relaxed);
    }
    crate::kafka::finish(producer);
}
