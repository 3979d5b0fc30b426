//! The `private` scenario: many users, each with order, portfolio and trade
//! streams on several connections. Every connection checks that it got
//! only its own user's updates, each stream in order, with no gaps or
//! duplicates, and records publish->receive latency.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use crate::ws::{field_u64, Sequence, SENT_NS, SEQ};
use crate::{histogram, now_ns, open_all, percentiles, print_table, procstat, Common};

const TOPICS: [(&str, &[u8]); 3] = [
    ("order.updates", b"order_update"),
    ("portfolio.updates", b"portfolio_update"),
    ("trade.updates", b"trade_update"),
];

#[derive(Args)]
pub struct PrivateArgs {
    #[command(flatten)]
    pub common: Common,
    /// Kafka bootstrap servers the server under test consumes from.
    #[arg(long)]
    pub brokers: String,
    /// Connections per user (`--connections` / this = users).
    #[arg(long, default_value_t = 2)]
    pub per_user: usize,
    /// Private updates per second, over all users and the three topics.
    #[arg(long, short = 'r', default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of load.
    #[arg(long, short = 'd', default_value_t = 10)]
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
}

pub async fn run(a: PrivateArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let per_user = a.per_user.max(1);
    let users = (c.connections / per_user).max(1);
    let (setups, failures) = tokio::time::timeout(
        Duration::from_secs(c.deadline),
        open_all(c, &["orders", "portfolio", "trades"], per_user),
    )
    .await
    .context("deadline passed while connecting")?;
    if setups.len() < users * per_user {
        bail!("only {} of {} connections set up: {failures:?}", setups.len(), users * per_user);
    }
    let tally = Rc::new(RefCell::new(Tally::default()));
    let latency = Rc::new(RefCell::new(histogram()));
    let mut readers = Vec::new();
    for (i, s) in setups.into_iter().enumerate() {
        let (tally, latency) = (tally.clone(), latency.clone());
        let me = format!("\"userId\":\"lt-u{}\"", i / per_user).into_bytes();
        readers.push(tokio::task::spawn_local(async move {
            let mut ws = s.ws;
            let mut streams = [Sequence::default(); 3];
            while let Some(f) = ws.next_text_frame().await {
                let p = ws.payload(&f);
                let Some(topic) = TOPICS.iter().position(|(_, ty)| memchr::memmem::find(p, ty).is_some()) else {
                    continue;
                };
                let (Some(seq), Some(sent)) = (field_u64(p, &SEQ), field_u64(p, &SENT_NS)) else {
                    continue;
                };
                let now = now_ns();
                let mut t = tally.borrow_mut();
                t.received += 1;
                if memchr::memmem::find(p, &me).is_none() {
                    t.misrouted += 1;
                    continue;
                }
                let (skipped, repeat) = streams[topic].see(seq, true);
                t.gaps += skipped;
                t.dups += repeat as u64;
                latency.borrow_mut().saturating_record((now.saturating_sub(sent) / 1000).max(1));
            }
        }));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let total = a.rate * a.duration;
    let producer = {
        let (brokers, rate, stop, produced) = (a.brokers.clone(), a.rate, stop.clone(), produced.clone());
        std::thread::spawn(move || produce(&brokers, users, rate, total, &stop, &produced))
    };
    let server_before = c.server_pid.map(procstat::Sample::of);
    let me = procstat::Sample::own();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.duration)).await;
    let expected = total * per_user as u64;
    let deadline = Instant::now() + Duration::from_secs(a.drain);
    while tally.borrow().received < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window = start.elapsed();
    let server_after = c.server_pid.map(procstat::Sample::of);
    stop.store(true, Ordering::Release);
    let _ = producer.join();
    for r in readers {
        r.abort();
    }
    let t = tally.borrow();
    let lat = latency.borrow();
    let server = match (server_before, server_after) {
        (Some(b), Some(a)) => {
            let cpu = a.cpu_since(&b);
            json!({"cpu_ms": cpu.as_secs_f64() * 1e3, "cpu_us_per_delivery": cpu.as_secs_f64() * 1e6 / t.received.max(1) as f64})
        }
        _ => json!(null),
    };
    let ok = t.misrouted == 0 && t.gaps == 0 && t.dups == 0 && t.received == expected;
    let report = json!({
        "scenario": "private", "users": users, "connections_per_user": per_user, "rate_per_s": a.rate,
        "produced": produced.load(Ordering::Relaxed), "expected": expected, "received": t.received,
        "misrouted": t.misrouted, "gaps": t.gaps, "duplicates": t.dups, "ok": ok,
        "latency": percentiles(&lat), "server": server, "window_s": window.as_secs_f64(),
        "client_cpu_ms": procstat::Sample::own().cpu_since(&me).as_secs_f64() * 1e3,
    });
    if c.json {
        out!("{report}");
    } else {
        out!("private: {users} users x {per_user} connections, {} updates/s for {} s", a.rate, a.duration);
        out!(
            "  received {}/{} expected; misrouted {}, gaps {}, duplicates {} => {}",
            t.received,
            expected,
            t.misrouted,
            t.gaps,
            t.dups,
            if ok { "OK" } else { "FAILED" }
        );
        print_table("publish -> receive", &lat);
    }
    if ok {
        Ok(())
    } else {
        bail!("private delivery check failed")
    }
}

/// Open loop: update `k` goes to user `k % users`, topic `(k / users) % 3`,
/// with a sequence number per (user, topic); keyed by user so each stream
/// stays in one partition.
fn produce(brokers: &str, users: usize, rate: u64, total: u64, stop: &AtomicBool, produced: &AtomicU64) {
    use rdkafka::producer::BaseRecord;
    let producer = crate::kafka::producer(brokers, 1, false);
    let mut seqs = vec![[0u64; 3]; users];
    let start = Instant::now();
    let interval_ns = 1_000_000_000 / rate.max(1);
    for k in 0..total {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        crate::kafka::wait_until_due(start, k, interval_ns);
        let user = (k as usize) % users;
        let topic = ((k as usize) / users) % 3;
        let seq = seqs[user][topic];
        seqs[user][topic] += 1;
        let key = format!("lt-u{user}");
        let value = format!(r#"{{"userId":"{key}","seq":{seq},"sentNs":{},"status":"filled"}}"#, now_ns());
        crate::kafka::send(&producer, BaseRecord::to(TOPICS[topic].0).key(&key).payload(&value));
        produced.fetch_add(1, Ordering::Relaxed);
    }
    crate::kafka::finish(&producer);
}
