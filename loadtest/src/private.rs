//! The `private` scenario: many users, each with order, portfolio and trade
//! streams on several connections. Every connection checks that it got
//! only its own user's updates, each stream in order, with no gaps or
//! duplicates, and records publish->receive latency from each update's
//! scheduled send time.

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

use crate::run::Run;
use crate::verdict::{Figures, Verdict};
use crate::ws::{field_u64, Sequence, SENT_NS, SEQ};
use crate::{brief, causes, hdr, now_ns, open_all, per, percentiles, print_table, procstat, Common, Recorder};

const TOPICS: [(&str, &[u8]); 3] = [
    ("order.updates", b"order_update"),
    ("portfolio.updates", b"portfolio_update"),
    ("trade.updates", b"trade_update"),
];

#[derive(Args, Serialize)]
pub struct PrivateArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Kafka bootstrap servers the server under test consumes from.
    #[arg(long)]
    pub brokers: String,
    /// Connections per user (`--connections` must be a multiple of it).
    #[arg(long, default_value_t = 2, value_parser = crate::positive_usize())]
    pub per_user: usize,
    /// Private updates per second, over all users and the three topics
    /// (open loop).
    #[arg(long, short = 'r', default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,
    /// Seconds of load.
    #[arg(long, short = 'd', default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: u64,
    /// Seconds to wait for stragglers.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
}

#[derive(Default)]
struct Tally {
    received: u64,
    misrouted: u64,
    gaps: u64,
    dups: u64,
    closed: BTreeMap<String, u64>,
}

/// How many of the first `produced` updates go to `user` (update `k`
/// goes to user `k % users`).
pub(crate) fn updates_for(user: usize, users: usize, produced: u64) -> u64 {
    produced / users as u64 + u64::from((user as u64) < produced % users as u64)
}

pub async fn run(a: PrivateArgs) -> anyhow::Result<u8> {
    let c = &a.common;
    let per_user = a.per_user;
    if !c.connections.is_multiple_of(per_user) {
        bail!(
            "--connections {} is not a multiple of --per-user {per_user}: every user needs all its connections",
            c.connections
        );
    }
    if c.deadline <= a.duration {
        bail!(
            "--deadline {} s is not longer than --duration {} s: the run could never complete",
            c.deadline,
            a.duration
        );
    }
    let users = c.connections / per_user;
    let settings = serde_json::to_value(&a)?;
    let mut run = Run::start(c, "private")?;
    let mut v = Verdict::default();
    let brokers = a.brokers.clone();
    let kafka_error = tokio::task::spawn_blocking(move || crate::kafka::check(&brokers))
        .await
        .map_err(|e| anyhow::anyhow!("kafka check: {e}"))?
        .err();
    if let Some(e) = &kafka_error {
        v.fail(format!("Kafka unreachable at --brokers {}: {e}; nothing was produced", a.brokers));
    }
    let mut o = if kafka_error.is_none() {
        Some(open_all(&mut run, c, crate::same_channels(&["orders", "portfolio", "trades"]), per_user).await)
    } else {
        None
    };
    let setups = o.as_mut().map(|o| std::mem::take(&mut o.setups)).unwrap_or_default();
    let tally = Rc::new(RefCell::new(Tally::default()));
    let latency = Rc::new(RefCell::new(Recorder::new("latency")));
    let running = Rc::new(Cell::new(true));
    // The users of the connections set up, for the expected count.
    let connected_users: Vec<usize> = setups.iter().map(|(i, _)| i / per_user).collect();
    let mut readers = Vec::new();
    for (i, s) in setups {
        let (tally, latency, running) = (tally.clone(), latency.clone(), running.clone());
        let me = format!("\"userId\":\"lt-u{}\"", i / per_user).into_bytes();
        readers.push(tokio::task::spawn_local(async move {
            let mut ws = s.ws;
            let mut streams = [Sequence::default(); 3];
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
                let p = ws.payload(&f);
                let Some(topic) = TOPICS.iter().position(|(_, ty)| memchr::memmem::find(p, ty).is_some()) else {
                    continue;
                };
                let (Some(seq), Some(sent)) = (field_u64(p, &SEQ), field_u64(p, &SENT_NS)) else {
                    continue;
                };
                let now = now_ns();
                let mut t = tally.borrow_mut();
                if memchr::memmem::find(p, &me).is_none() {
                    t.misrouted += 1;
                    continue;
                }
                let (skipped, repeat) = streams[topic].see(seq, true);
                t.gaps += skipped;
                t.dups += repeat as u64;
                if !repeat {
                    t.received += 1;
                    latency.borrow_mut().record(now.saturating_sub(sent) / 1000);
                }
            }
        }));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let total = a.rate * a.duration;
    let me = procstat::Sample::own();
    let server_start = run.sample();
    let (mut server_before, mut server_after) = (None, None);
    let (mut window, mut delivered, mut mine, mut drain_s) = (Duration::ZERO, 0u64, Duration::ZERO, 0.0);
    let mut producer = None;
    let expected_now = {
        let (users_c, produced) = (connected_users.clone(), produced.clone());
        move || {
            let p = produced.load(Ordering::Relaxed);
            users_c.iter().map(|u| updates_for(*u, users, p)).sum::<u64>()
        }
    };
    if kafka_error.is_none() && !connected_users.is_empty() && !run.stop.stopped() {
        producer = Some({
            let (brokers, rate, stop, produced) = (a.brokers.clone(), a.rate, stop.clone(), produced.clone());
            std::thread::spawn(move || produce(&brokers, users, rate, total, &stop, &produced))
        });
        run.enter("measure");
        run.end_interval(&mut [])?;
        server_before = run.sample();
        let me_before = procstat::Sample::own();
        let start = Instant::now();
        let end = start + Duration::from_secs(a.duration);
        let mut prev = (0u64, 0u64, 0u64, 0u64);
        let mut ticker = |run: &mut Run, extra: String| {
            let t = tally.borrow();
            let closed: u64 = t.closed.values().sum();
            let secs = run.interval().as_secs_f64().max(1e-3);
            let mut l = latency.borrow_mut();
            run.progress(&format!(
                "{:.0} deliveries/s; latency {}; +{} misrouted, +{} gaps or duplicates, +{} closed{extra}",
                (t.received - prev.0) as f64 / secs,
                brief(&l.interval),
                t.misrouted - prev.1,
                t.gaps + t.dups - prev.2,
                closed - prev.3
            ));
            prev = (t.received, t.misrouted, t.gaps + t.dups, closed);
            if let Err(e) = run.end_interval(&mut [&mut l]) {
                eprintln!("{e:#}");
            }
        };
        while Instant::now() < end {
            if run.stop.sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now()))).await {
                break;
            }
            ticker(&mut run, String::new());
        }
        window = start.elapsed();
        delivered = tally.borrow().received;
        server_after = run.sample();
        mine = procstat::Sample::own().cpu_since(&me_before);
        if !run.stop.stopped() {
            run.enter("drain");
            let drain_start = Instant::now();
            let deadline = drain_start + Duration::from_secs(a.drain);
            while Instant::now() < deadline
                && (tally.borrow().received < expected_now() || produced.load(Ordering::Relaxed) < total)
            {
                if run.stop.sleep(Duration::from_millis(20)).await {
                    break;
                }
                if run.interval() >= Duration::from_secs(1) {
                    let extra = format!("; received {}/{}", tally.borrow().received, expected_now());
                    ticker(&mut run, extra);
                }
            }
            let extra = format!("; received {}/{}", tally.borrow().received, expected_now());
            ticker(&mut run, extra);
            drain_s = drain_start.elapsed().as_secs_f64();
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
    let _ = me;
    let t = tally.borrow();
    let lat = latency.borrow();
    let expected = expected_now();
    let lost = expected.saturating_sub(t.received);
    let n_closed: u64 = t.closed.values().sum();
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
    let failed = o.as_ref().map_or(0, |o| o.failed());
    if let Some(r) = o.as_ref().and_then(|o| o.failure_reason()) {
        v.fail(r);
    }
    if t.misrouted > 0 {
        v.fail(format!("{} private updates reached another user's connection", t.misrouted));
    }
    if n_closed > 0 {
        v.fail(format!(
            "{n_closed} of {} connections closed unexpectedly: {}",
            connected_users.len(),
            causes(&t.closed)
        ));
    }
    if lost > 0 {
        let mut r =
            format!("lost {lost} of {expected} expected deliveries ({:.2}%)", lost as f64 * 100.0 / expected as f64);
        if t.received == 0 {
            r.push_str(&format!(
                ": nothing was delivered; does the server consume the private topics from the Kafka at --brokers {}?",
                a.brokers
            ));
        }
        v.fail(r);
    }
    if t.dups > 0 {
        v.fail(format!("{} duplicate deliveries", t.dups));
    }
    if t.gaps > 0 && lost == 0 {
        v.fail(format!("{} updates out of order", t.gaps));
    }
    if lat.total.is_empty() {
        v.fail("no samples: no private update was delivered");
    }
    if exited {
        v.fail("the server process exited during the run");
    }
    let throughput = per(delivered as f64, window.as_secs_f64());
    let mut values = BTreeMap::from([
        ("lost", lost as f64),
        ("duplicates", t.dups as f64),
        ("gaps", t.gaps as f64),
        ("misrouted", t.misrouted as f64),
        ("failed", failed as f64),
        ("closed", n_closed as f64),
        ("delivered", t.received as f64),
        ("connections", connected_users.len() as f64),
    ]);
    if let Some(r) = throughput.as_f64() {
        values.insert("throughput", r);
    }
    if let Some(x) = server["cpu_us_per_delivery"].as_f64() {
        values.insert("server_cpu_us", x);
    }
    let figures = Figures { latency: &lat.total, values };
    let ok = v.pass();
    let mut report = Map::new();
    for (k, val) in [
        ("users", json!(users)),
        ("connections_per_user", json!(per_user)),
        ("connections", json!(connected_users.len())),
        ("connect_failures", json!(o.as_ref().map(|o| o.failures.clone()).unwrap_or_default())),
        ("kafka_error", json!(kafka_error)),
        ("rate_per_s", json!(a.rate)),
        ("duration_s", json!(a.duration)),
        ("produced", json!(produced.load(Ordering::Relaxed))),
        ("expected", json!(expected)),
        ("received", json!(t.received)),
        ("lost", json!(lost)),
        ("misrouted", json!(t.misrouted)),
        ("gaps", json!(t.gaps)),
        ("duplicates", json!(t.dups)),
        ("closed_unexpectedly", json!(t.closed)),
        ("ok", json!(ok)),
        ("latency", percentiles(&lat.total)),
        ("server", server.clone()),
        ("window_s", json!(window.as_secs_f64())),
        ("drain_s", json!(drain_s)),
        ("deliveries_per_s", throughput.clone()),
        ("client_cpu_ms", json!(mine.as_secs_f64() * 1e3)),
        ("hdr", json!({"latency": hdr::encode(&lat.total)})),
        (
            "coordinated_omission",
            json!("corrected: latency counts from each update's scheduled send time (stamped in it)"),
        ),
    ] {
        report.insert(k.into(), val);
    }
    let probe = run.probe.take();
    let human = || {
        out!("private: {users} users x {per_user} connections, {} updates/s for {} s", a.rate, a.duration);
        if let Some(o) = &o {
            for (cause, n) in &o.failures {
                out!("  connect failure x{n}: {cause}");
            }
        }
        if let Some(e) = &kafka_error {
            out!("  Kafka unreachable at {}: {e}", a.brokers);
        }
        out!(
            "  received {}/{} expected (lost {lost}); misrouted {}, gaps {}, duplicates {}, closed {n_closed}",
            t.received,
            expected,
            t.misrouted,
            t.gaps,
            t.dups,
        );
        for (cause, n) in &t.closed {
            out!("  closed x{n}: {cause}");
        }
        print_table("publish -> receive (from intended send time)", &lat.total);
        if let Some(p) = &probe {
            p.describe(exited);
            let mb = |kb: Option<u64>| kb.map_or("-".to_string(), |k| format!("{:.1} MB", k as f64 / 1024.0));
            out!(
                "  server: {} CPU per delivery; RSS {} at start, {} at the end",
                server["cpu_us_per_delivery"].as_f64().map_or("no deliveries: no".into(), |x| format!("{x:.3} µs")),
                mb(server_start.map(|s| s.rss_kb)),
                mb(server_after.or(server_end).map(|s| s.rss_kb)),
            );
        }
    };
    Ok(run.finish("private", settings, report, &mut v, &figures, human))
}

/// Open loop: update `k` goes to user `k % users`, topic `(k / users) % 3`,
/// with a sequence number per (user, topic); keyed by user so each stream
/// stays in one partition. Each update carries its scheduled send time.
fn produce(brokers: &str, users: usize, rate: u64, total: u64, stop: &AtomicBool, produced: &AtomicU64) {
    use rdkafka::producer::BaseRecord;
    let producer = crate::kafka::producer(brokers, 1, false);
    let mut seqs = vec![[0u64; 3]; users];
    let start_ns = now_ns();
    let start = Instant::now();
    let interval_ns = 1_000_000_000 / rate.max(1);
    for k in 0..total {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        crate::kafka::wait_until_due(start, k, interval_ns, stop);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let user = (k as usize) % users;
        let topic = ((k as usize) / users) % 3;
        let seq = seqs[user][topic];
        seqs[user][topic] += 1;
        let key = format!("lt-u{user}");
        let intended = start_ns + k * interval_ns;
        let value = format!(r#"{{"userId":"{key}","seq":{seq},"sentNs":{intended},"status":"filled"}}"#);
        if !crate::kafka::send(&producer, BaseRecord::to(TOPICS[topic].0).key(&key).payload(&value), stop) {
            break;
        }
        produced.fetch_add(1, Ordering::Relaxed);
    }
    crate::kafka::finish(&producer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_updates_over_users() {
        assert_eq!((0..3).map(|u| updates_for(u, 3, 7)).collect::<Vec<_>>(), [3, 2, 2]);
        assert_eq!(updates_for(0, 1, 5), 5);
        assert_eq!(updates_for(4, 5, 4), 0);
    }
}
