//! The `fanout` and `churn` scenarios: N subscribers on `prices` and an
//! open-loop Kafka producer stamping each update with its intended send
//! time and a sequence number; optionally, connections opened and dropped
//! at a steady rate meanwhile.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::ws::{field_u64, Sequence, SENT_NS, SEQ};
use crate::{histogram, now_ns, open_all, percentiles, print_table, procstat, set_up, Common};

#[derive(Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Kafka bootstrap servers the server under test consumes from.
    #[arg(long)]
    pub(crate) brokers: String,
    #[arg(long, default_value = "price.updates")]
    pub(crate) topic: String,
    /// Updates per second (open loop: the schedule never waits for the server).
    #[arg(long, short = 'r', default_value_t = 200)]
    pub(crate) rate: u64,
    /// Seconds of measured load.
    #[arg(long, short = 'd', default_value_t = 10)]
    pub(crate) duration: u64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// Bytes per Kafka value (padded).
    #[arg(long, default_value_t = 200)]
    pub(crate) size: usize,
    /// Seconds to wait for stragglers after the producer stops.
    #[arg(long, default_value_t = 5)]
    pub(crate) drain: u64,
    /// Extra connections opened (auth + subscribe) and dropped per second
    /// during the run (`churn` defaults to 100).
    #[arg(long, default_value_t = 0)]
    pub(crate) churn_rate: u64,
    /// How long each churned connection stays open, in ms.
    #[arg(long, default_value_t = 500)]
    pub(crate) churn_hold_ms: u64,
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

/// What the subscribers share (one runtime thread: no locking).
struct Tally {
    latency: Histogram<u64>,
    /// Intended send time → kernel receive stamp (the server's part).
    to_socket: Histogram<u64>,
    /// Kernel receive stamp → parsed (this client's part).
    client_lag: Histogram<u64>,
    received: u64,
    measured: u64,
    gaps: u64,
    dups: u64,
}

pub async fn run(a: FanoutArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let (setups, failures) = tokio::time::timeout(Duration::from_secs(c.deadline), open_all(c, &["prices"], 1))
        .await
        .context("deadline passed while connecting")?;
    if setups.is_empty() {
        bail!("no connection could be set up: {failures:?}");
    }
    let subscribers = setups.len();
    let tally = Rc::new(RefCell::new(Tally {
        latency: histogram(),
        to_socket: histogram(),
        client_lag: histogram(),
        received: 0,
        measured: 0,
        gaps: 0,
        dups: 0,
    }));
    // Updates with a seq at or past this are measured (set when warm-up ends).
    let measure_from = Rc::new(std::cell::Cell::new(u64::MAX));
    let mut readers = Vec::with_capacity(subscribers);
    let stamps = a.arrival_stamps;
    for s in setups {
        let (tally, measure_from) = (tally.clone(), measure_from.clone());
        readers.push(tokio::task::spawn_local(async move {
            let mut ws = s.ws;
            if stamps {
                // Without stamps the run still measures publish -> receive.
                let _ = ws.stamp_arrivals();
            }
            let mut sequence = Sequence::default();
            while let Some(f) = ws.next_text_frame().await {
                let p = ws.payload(&f);
                let (Some(seq), Some(sent)) = (field_u64(p, &SEQ), field_u64(p, &SENT_NS)) else {
                    continue;
                };
                let now = now_ns();
                let mut t = tally.borrow_mut();
                t.received += 1;
                let (skipped, repeat) = sequence.see(seq, false);
                t.gaps += skipped;
                t.dups += repeat as u64;
                if seq >= measure_from.get() {
                    t.measured += 1;
                    t.latency.saturating_record((now.saturating_sub(sent) / 1000).max(1));
                    if let Some(at) = ws.arrived_ns() {
                        t.to_socket.saturating_record((at.saturating_sub(sent) / 1000).max(1));
                        t.client_lag.saturating_record((now.saturating_sub(at) / 1000).max(1));
                    }
                }
            }
        }));
    }

    let total = a.rate * (a.warmup + a.duration);
    let warm = a.rate * a.warmup;
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    let producer = {
        let (brokers, topic, size, rate) = (a.brokers.clone(), a.topic.clone(), a.size, a.rate);
        let (stop, produced, late) = (stop.clone(), produced.clone(), late.clone());
        let idempotent = a.idempotent;
        std::thread::spawn(move || {
            let producer = crate::kafka::producer(&brokers, 0, idempotent);
            produce(&producer, &topic, size, rate, total, &stop, &produced, &late)
        })
    };
    let me = procstat::Sample::own();
    // Warm-up, then the measured window.
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    measure_from.set(warm);
    let server_before = c.server_pid.map(procstat::Sample::of);
    let me_before = procstat::Sample::own();
    let received_before = tally.borrow().received;
    let window_start = Instant::now();
    let end = start + Duration::from_secs(a.warmup + a.duration);
    let churn =
        (a.churn_rate > 0).then(|| tokio::task::spawn_local(churn(c.clone(), a.churn_rate, a.churn_hold_ms, end)));
    // A live progress line on a terminal.
    let live = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !c.json;
    while Instant::now() < end {
        let before = tally.borrow().received;
        tokio::time::sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now()))).await;
        if live {
            let t = tally.borrow();
            eprint!(
                "\r  {:>4.0}s  {:>10} deliveries/s  gaps {}  p99 {:.1} ms   ",
                window_start.elapsed().as_secs_f64(),
                t.received - before,
                t.gaps,
                t.latency.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
    }
    if live {
        eprintln!();
    }
    let churn = match churn {
        Some(task) => task.await.unwrap_or_default(),
        None => ChurnTally::default(),
    };
    // Stragglers: wait until every subscriber has every measured update, or the drain time.
    let expected_measured = (total - warm) * subscribers as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(a.drain);
    while tally.borrow().measured < expected_measured && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window = window_start.elapsed();
    let server_after = c.server_pid.map(procstat::Sample::of);
    let mine = procstat::Sample::own().cpu_since(&me_before);
    let _ = me;
    stop.store(true, Ordering::Release);
    let _ = producer.join();
    for r in readers {
        r.abort();
    }
    let t = tally.borrow();
    let delivered = t.received - received_before;
    let rate = delivered as f64 / window.as_secs_f64();
    let server = match (server_before, server_after) {
        (Some(b), Some(a)) => {
            let cpu = a.cpu_since(&b);
            json!({
                "cpu_ms": cpu.as_secs_f64() * 1e3,
                "cpu_us_per_delivery": cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
                "cpu_utilisation": cpu.as_secs_f64() / window.as_secs_f64(),
                "rss_kb": a.rss_kb,
            })
        }
        _ => json!(null),
    };
    let report = json!({
        "scenario": "fanout", "subscribers": subscribers, "connect_failures": failures,
        "rate_per_s": a.rate, "duration_s": a.duration, "value_bytes": a.size,
        "produced": produced.load(Ordering::Relaxed), "producer_late": late.load(Ordering::Relaxed),
        "expected_measured": expected_measured, "measured": t.measured,
        "delivered_in_window": delivered, "window_s": window.as_secs_f64(), "deliveries_per_s": rate,
        "gaps": t.gaps, "duplicates": t.dups, "latency": percentiles(&t.latency), "server": server,
        "latency_to_socket": percentiles(&t.to_socket), "client_lag": percentiles(&t.client_lag),
        "client_cpu_ms": mine.as_secs_f64() * 1e3,
        "client_cpu_utilisation": mine.as_secs_f64() / window.as_secs_f64(),
        "churn": {"opened": churn.opened, "failed": churn.failed, "setup": percentiles(&churn.setup)},
    });
    if c.json {
        out!("{report}");
    } else {
        out!("fanout: {subscribers} subscribers x {} updates/s for {} s ({} B values)", a.rate, a.duration, a.size);
        out!(
            "  delivered {delivered} in {:.2} s = {rate:.0} deliveries/s; measured {}/{} expected; gaps {}, duplicates {}",
            window.as_secs_f64(),
            t.measured,
            expected_measured,
            t.gaps,
            t.dups
        );
        print_table("publish -> receive (from intended send time)", &t.latency);
        if !t.to_socket.is_empty() {
            print_table("publish -> in the client's socket (kernel receive stamp)", &t.to_socket);
            out!(
                "  client lag (socket -> parsed): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                t.client_lag.value_at_quantile(0.5) as f64 / 1000.0,
                t.client_lag.value_at_quantile(0.99) as f64 / 1000.0,
                t.client_lag.max() as f64 / 1000.0
            );
        }
        if churn.opened + churn.failed > 0 {
            out!(
                "  churn: {} connections opened and dropped ({} failed), set-up p50 {:.1} ms p99 {:.1} ms",
                churn.opened,
                churn.failed,
                churn.setup.value_at_quantile(0.5) as f64 / 1000.0,
                churn.setup.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
        if !server.is_null() {
            out!(
                "  server: {:.3} µs CPU per delivery ({:.0}% of a core)",
                server["cpu_us_per_delivery"].as_f64().unwrap_or(0.0),
                server["cpu_utilisation"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
        out!("  client: {:.0}% of a core", mine.as_secs_f64() / window.as_secs_f64() * 100.0);
    }
    Ok(())
}

struct ChurnTally {
    opened: u64,
    failed: u64,
    setup: Histogram<u64>,
}

impl Default for ChurnTally {
    fn default() -> Self {
        ChurnTally { opened: 0, failed: 0, setup: histogram() }
    }
}

/// Opens `rate` connections per second until `end`, each authenticated,
/// subscribed to prices, held for `hold_ms` (answering pings) and dropped.
async fn churn(common: Common, rate: u64, hold_ms: u64, end: Instant) -> ChurnTally {
    let tally = Rc::new(RefCell::new(ChurnTally::default()));
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
            let t0 = Instant::now();
            match tokio::time::timeout(Duration::from_secs(10), set_up(&c, i, &format!("lt-churn-{i}"), &["prices"]))
                .await
            {
                Ok(Ok(s)) => {
                    {
                        let mut t = tally.borrow_mut();
                        t.opened += 1;
                        t.setup.saturating_record((t0.elapsed().as_micros() as u64).max(1));
                    }
                    let mut ws = s.ws;
                    let _ = tokio::time::timeout(Duration::from_millis(hold_ms), async {
                        while let Ok(Some(_)) = ws.next_frame().await {}
                    })
                    .await;
                }
                _ => tally.borrow_mut().failed += 1,
            }
        }));
        k += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    Rc::try_unwrap(tally).map(RefCell::into_inner).unwrap_or_default()
}

/// The open-loop producer: update `i` is due at `start + i / rate`; its
/// intended time is stamped in it whether or not the producer kept up.
#[allow(clippy::too_many_arguments)]
fn produce(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    size: usize,
    rate: u64,
    total: u64,
    stop: &AtomicBool,
    produced: &AtomicU64,
    late: &AtomicU64,
) {
    use rdkafka::producer::BaseRecord;
    let start_ns = now_ns();
    let start = Instant::now();
    let interval_ns = 1_000_000_000 / rate.max(1);
    let mut value = String::with_capacity(size + 64);
    for i in 0..total {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if crate::kafka::wait_until_due(start, i, interval_ns) {
            late.fetch_add(1, Ordering::Relaxed);
        }
        let intended = start_ns + i * interval_ns;
        value.clear();
        use std::fmt::Write;
        let _ = write!(
            value,
            r#"{{"token":"ETH","chainId":8453,"price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","seq":{i},"sentNs":{intended},"pad":""#
        );
        while value.len() + 2 < size {
            value.push('x');
        }
        value.push_str("\"}");
        crate::kafka::send(producer, BaseRecord::<(), str>::to(topic).payload(value.as_str()).partition(0));
        produced.fetch_add(1, Ordering::Relaxed);
    }
    crate::kafka::finish(producer);
}
