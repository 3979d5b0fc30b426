//! moonx-loadtest: drives any server speaking the MoonX WebSocket protocol
//! (../shared/PROTOCOL.md) and reports what it measured.
//!
//! Scenarios: `connect` (connect + auth + subscribe latency, CPU and RSS per
//! connection), `fanout` (an open-loop Kafka producer stamps each update with
//! its intended send time and a sequence number; every subscriber records
//! publish->receive latency in an HDR histogram, corrected for coordinated
//! omission the way wrk2 does, and checks gaps and duplicates), and `broker`
//! (a standalone Kafka-protocol broker for the server and the peers to
//! share). Every run is bounded in count and time.

mod private;
mod procstat;
mod ws;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;
use ws::{field_u64, Ws};

#[derive(Parser)]
#[command(name = "moonx-loadtest", about = "Load generator for MoonX WebSocket servers")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N connections, authenticate, subscribe, hold; report latencies.
    Connect(ConnectArgs),
    /// N subscribers + an open-loop Kafka producer of R updates/s for T s.
    Fanout(FanoutArgs),
    /// Many users with private streams: each gets exactly its own, in order.
    Private(private::PrivateArgs),
    /// A fan-out while connections are opened and dropped at a steady rate.
    Churn(FanoutArgs),
    /// Run a standalone embedded Kafka-protocol broker and print its address.
    Broker(BrokerArgs),
}

#[derive(Args, Clone)]
pub(crate) struct Common {
    /// Server address (host:port); the WebSocket path is /ws.
    #[arg(long, default_value = "127.0.0.1:3008")]
    pub(crate) server: SocketAddr,
    /// HMAC secret used to mint HS256 tokens for the test users.
    #[arg(long, env = "JWT_SECRET", default_value = "loadtest-secret")]
    pub(crate) jwt_secret: String,
    /// Connections to open.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub(crate) connections: usize,
    /// Connection attempts per second (0: as fast as `--concurrency` allows).
    #[arg(long, default_value_t = 0)]
    pub(crate) connect_rate: u64,
    /// Connection set-ups in flight at once.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N to spread ephemeral ports over.
    #[arg(long, default_value_t = 32)]
    pub(crate) sources: u8,
    /// PID of the server, to report its CPU time and RSS.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) deadline: u64,
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds to hold the connections open after the last one is set up.
    #[arg(long, default_value_t = 2)]
    hold: u64,
    /// Channel to subscribe to.
    #[arg(long, default_value = "prices", value_parser = ["prices", "orders", "portfolio", "trades"])]
    channel: String,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Kafka bootstrap servers the server under test consumes from.
    #[arg(long)]
    brokers: String,
    #[arg(long, default_value = "price.updates")]
    topic: String,
    /// Updates per second (open loop: the schedule never waits for the server).
    #[arg(long, short = 'r', default_value_t = 200)]
    rate: u64,
    /// Seconds of measured load.
    #[arg(long, short = 'd', default_value_t = 10)]
    duration: u64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Bytes per Kafka value (padded).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Seconds to wait for stragglers after the producer stops.
    #[arg(long, default_value_t = 5)]
    drain: u64,
    /// Extra connections opened (auth + subscribe) and dropped per second
    /// during the run (`churn` defaults to 100).
    #[arg(long, default_value_t = 0)]
    churn_rate: u64,
    /// How long each churned connection stays open, in ms.
    #[arg(long, default_value_t = 500)]
    churn_hold_ms: u64,
}

#[derive(Args)]
struct BrokerArgs {
    /// Partitions per topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Seconds to keep running.
    #[arg(long, default_value_t = 3600)]
    duration: u64,
    /// File to write the bootstrap address to (besides stdout).
    #[arg(long)]
    address_file: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Broker(a) => broker(a),
        Scenario::Connect(a) => run_local(connect(a)),
        Scenario::Fanout(a) => run_local(fanout(a)),
        Scenario::Private(a) => run_local(private::run(a)),
        Scenario::Churn(mut a) => {
            if a.churn_rate == 0 {
                a.churn_rate = 100;
            }
            run_local(fanout(a))
        }
    }
}

fn run_local<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, f)
}

fn broker(a: BrokerArgs) -> anyhow::Result<()> {
    let cluster = rdkafka::mocking::MockCluster::new(1).context("mock cluster")?;
    for t in ["price.updates", "order.updates", "portfolio.updates", "trade.updates"] {
        cluster.create_topic(t, a.partitions, 1).context("create topic")?;
    }
    let addr = cluster.bootstrap_servers();
    println!("{addr}");
    if let Some(path) = &a.address_file {
        std::fs::write(path, &addr)?;
    }
    std::thread::sleep(Duration::from_secs(a.duration));
    Ok(())
}

fn token(secret: &str, user: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 24 * 3600;
    let claims = json!({ "sub": user, "exp": exp });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing")
}

fn source(common: &Common, i: usize) -> Option<IpAddr> {
    (common.sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % common.sources as usize) as u8)))
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Latencies of one connection's set-up, in µs.
struct Setup {
    ws: Ws,
    connect_us: u64,
    auth_us: u64,
    subscribe_us: u64,
}

async fn set_up(common: &Common, i: usize, user: &str, channels: &[&str]) -> anyhow::Result<Setup> {
    let t0 = Instant::now();
    let mut ws = Ws::connect(common.server, source(common, i), "").await?;
    let first = ws.next_text().await.context("auth_required")?;
    if memchr::memmem::find(&first, b"auth_required").is_none() {
        bail!("expected auth_required");
    }
    let connect_us = t0.elapsed().as_micros() as u64;
    let t1 = Instant::now();
    let auth = json!({"id":"a","type":"authenticate","data":{"token": token(&common.jwt_secret, user)}}).to_string();
    ws.send_text(&auth).await?;
    let reply = ws.next_text().await.context("auth reply")?;
    if memchr::memmem::find(&reply, b"auth_success").is_none() {
        bail!("auth refused");
    }
    let auth_us = t1.elapsed().as_micros() as u64;
    let t2 = Instant::now();
    for channel in channels {
        ws.send_text(&json!({"id":"s","type":"subscribe","data":{"channel": channel}}).to_string()).await?;
        let reply = ws.next_text().await.context("subscribe reply")?;
        if memchr::memmem::find(&reply, b"subscribed").is_none() {
            bail!("subscribe refused");
        }
    }
    Ok(Setup { ws, connect_us, auth_us, subscribe_us: t2.elapsed().as_micros() as u64 })
}

/// Opens `n` connections with the pacing and concurrency asked for.
/// The user of connection `i`: `lt-{i}`, or `lt-u{i / per_user}` when
/// several connections share a user.
fn user_of(i: usize, per_user: usize) -> String {
    if per_user <= 1 {
        format!("lt-{i}")
    } else {
        format!("lt-u{}", i / per_user)
    }
}

pub(crate) async fn open_all(
    common: &Common,
    channels: &[&str],
    per_user: usize,
) -> (Vec<Setup>, BTreeMap<String, u64>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(common.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(common.connections);
    let start = Instant::now();
    for i in 0..common.connections {
        if common.connect_rate > 0 {
            let at = start + Duration::from_secs_f64(i as f64 / common.connect_rate as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let (c, chs): (Common, Vec<String>) = (common.clone(), channels.iter().map(|s| s.to_string()).collect());
        tasks.push(tokio::task::spawn_local(async move {
            let user = user_of(i, per_user);
            let chs: Vec<&str> = chs.iter().map(String::as_str).collect();
            let r = tokio::time::timeout(Duration::from_secs(30), set_up(&c, i, &user, &chs)).await;
            drop(permit);
            match r {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("set-up timed out")),
            }
        }));
    }
    let mut ok = Vec::with_capacity(tasks.len());
    let mut failures = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => ok.push(s),
            Ok(Err(e)) => *failures.entry(format!("{e:#}")).or_insert(0) += 1,
            Err(e) => *failures.entry(format!("task: {e}")).or_insert(0) += 1,
        }
    }
    (ok, failures)
}

pub(crate) fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let q = |p: f64| h.value_at_quantile(p);
    json!({
        "count": h.len(), "min_us": h.min(), "p50_us": q(0.5), "p75_us": q(0.75), "p90_us": q(0.9),
        "p99_us": q(0.99), "p999_us": q(0.999), "p9999_us": q(0.9999), "max_us": h.max(), "mean_us": h.mean(),
    })
}

pub(crate) fn print_table(title: &str, h: &Histogram<u64>) {
    println!("  {title} latency ({} samples)", h.len());
    for (label, p) in [
        ("50.000%", 0.5),
        ("75.000%", 0.75),
        ("90.000%", 0.9),
        ("99.000%", 0.99),
        ("99.900%", 0.999),
        ("99.990%", 0.9999),
    ] {
        println!("    {label}  {:>10.3} ms", h.value_at_quantile(p) as f64 / 1000.0);
    }
    println!("    100.000%  {:>10.3} ms", h.max() as f64 / 1000.0);
}

async fn connect(a: ConnectArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let me = procstat::Sample::own();
    let server_before = c.server_pid.map(procstat::Sample::of);
    let t0 = Instant::now();
    let (setups, failures) =
        tokio::time::timeout(Duration::from_secs(c.deadline), open_all(c, &[a.channel.as_str()], 1))
            .await
            .context("deadline passed while connecting")?;
    let elapsed = t0.elapsed();
    let server_after = c.server_pid.map(procstat::Sample::of);
    let (mut hc, mut ha, mut hs, mut ht) = (histogram(), histogram(), histogram(), histogram());
    for s in &setups {
        hc.saturating_record(s.connect_us.max(1));
        ha.saturating_record(s.auth_us.max(1));
        hs.saturating_record(s.subscribe_us.max(1));
        ht.saturating_record((s.connect_us + s.auth_us + s.subscribe_us).max(1));
    }
    // Hold (answering pings) so idle memory can be read.
    let open = setups.len();
    let held: Vec<_> = setups
        .into_iter()
        .map(|s| {
            tokio::task::spawn_local(async move {
                let mut ws = s.ws;
                while let Ok(Some(_)) = ws.next_frame().await {}
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    let server_held = c.server_pid.map(procstat::Sample::of);
    for h in held {
        h.abort();
    }
    let mine = procstat::Sample::own().cpu_since(&me);
    let rate = open as f64 / elapsed.as_secs_f64();
    let server = match (server_before, server_after, server_held) {
        (Some(b), Some(a), Some(h)) => {
            let cpu = a.cpu_since(&b);
            json!({
                "cpu_ms": cpu.as_secs_f64() * 1e3,
                "cpu_us_per_connection": cpu.as_secs_f64() * 1e6 / open.max(1) as f64,
                "rss_before_kb": b.rss_kb, "rss_held_kb": h.rss_kb,
                "rss_bytes_per_connection": (h.rss_kb.saturating_sub(b.rss_kb) * 1024) as f64 / open.max(1) as f64,
            })
        }
        _ => json!(null),
    };
    let report = json!({
        "scenario": "connect", "connections": open, "failures": failures, "elapsed_s": elapsed.as_secs_f64(),
        "connections_per_s": rate, "connect": percentiles(&hc), "auth": percentiles(&ha),
        "subscribe": percentiles(&hs), "total": percentiles(&ht), "server": server,
        "client_cpu_ms": mine.as_secs_f64() * 1e3,
    });
    if c.json {
        println!("{report}");
    } else {
        println!(
            "connect: {open} connections in {:.2} s ({rate:.0}/s), {} failed",
            elapsed.as_secs_f64(),
            c.connections - open
        );
        for (cause, n) in &failures {
            println!("  failure x{n}: {cause}");
        }
        print_table("connect (TCP + upgrade + auth_required)", &hc);
        print_table("authenticate", &ha);
        print_table("subscribe", &hs);
        print_table("total set-up", &ht);
        if !server.is_null() {
            println!(
                "  server: {:.1} µs CPU per connection, {:.0} bytes RSS per held connection",
                server["cpu_us_per_connection"].as_f64().unwrap_or(0.0),
                server["rss_bytes_per_connection"].as_f64().unwrap_or(0.0)
            );
        }
        println!("  client CPU: {:.0} ms", mine.as_secs_f64() * 1e3);
    }
    Ok(())
}

/// What the subscribers share (one runtime thread: no locking).
struct Tally {
    latency: Histogram<u64>,
    received: u64,
    measured: u64,
    gaps: u64,
    dups: u64,
}

async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let (setups, failures) = tokio::time::timeout(Duration::from_secs(c.deadline), open_all(c, &["prices"], 1))
        .await
        .context("deadline passed while connecting")?;
    if setups.is_empty() {
        bail!("no connection could be set up: {failures:?}");
    }
    let subscribers = setups.len();
    let tally = Rc::new(RefCell::new(Tally { latency: histogram(), received: 0, measured: 0, gaps: 0, dups: 0 }));
    // Updates with a seq at or past this are measured (set when warm-up ends).
    let measure_from = Rc::new(std::cell::Cell::new(u64::MAX));
    let mut readers = Vec::with_capacity(subscribers);
    for s in setups {
        let (tally, measure_from) = (tally.clone(), measure_from.clone());
        readers.push(tokio::task::spawn_local(async move {
            let mut ws = s.ws;
            let mut last: Option<u64> = None;
            while let Ok(Some(f)) = ws.next_frame().await {
                if f.opcode != 0x1 {
                    if f.opcode == 0x8 {
                        break;
                    }
                    continue;
                }
                let p = ws.payload(&f);
                let (Some(seq), Some(sent)) = (field_u64(p, b"\"seq\":"), field_u64(p, b"\"sentNs\":")) else {
                    continue;
                };
                let now = now_ns();
                let mut t = tally.borrow_mut();
                t.received += 1;
                match last {
                    Some(l) if seq <= l => t.dups += 1,
                    Some(l) if seq > l + 1 => t.gaps += seq - l - 1,
                    _ => {}
                }
                last = Some(last.map_or(seq, |l| l.max(seq)));
                if seq >= measure_from.get() {
                    t.measured += 1;
                    t.latency.saturating_record((now.saturating_sub(sent) / 1000).max(1));
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
        std::thread::spawn(move || produce(&brokers, &topic, size, rate, total, &stop, &produced, &late))
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
        "client_cpu_ms": mine.as_secs_f64() * 1e3,
        "client_cpu_utilisation": mine.as_secs_f64() / window.as_secs_f64(),
        "churn": {"opened": churn.opened, "failed": churn.failed, "setup": percentiles(&churn.setup)},
    });
    if c.json {
        println!("{report}");
    } else {
        println!("fanout: {subscribers} subscribers x {} updates/s for {} s ({} B values)", a.rate, a.duration, a.size);
        println!(
            "  delivered {delivered} in {:.2} s = {rate:.0} deliveries/s; measured {}/{} expected; gaps {}, duplicates {}",
            window.as_secs_f64(),
            t.measured,
            expected_measured,
            t.gaps,
            t.dups
        );
        print_table("publish -> receive (from intended send time)", &t.latency);
        if churn.opened + churn.failed > 0 {
            println!(
                "  churn: {} connections opened and dropped ({} failed), set-up p50 {:.1} ms p99 {:.1} ms",
                churn.opened,
                churn.failed,
                churn.setup.value_at_quantile(0.5) as f64 / 1000.0,
                churn.setup.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
        if !server.is_null() {
            println!(
                "  server: {:.3} µs CPU per delivery ({:.0}% of a core)",
                server["cpu_us_per_delivery"].as_f64().unwrap_or(0.0),
                server["cpu_utilisation"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
        println!("  client: {:.0}% of a core", mine.as_secs_f64() / window.as_secs_f64() * 100.0);
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
    brokers: &str,
    topic: &str,
    size: usize,
    rate: u64,
    total: u64,
    stop: &AtomicBool,
    produced: &AtomicU64,
    late: &AtomicU64,
) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("kafka producer");
    let start_ns = now_ns();
    let start = Instant::now();
    let interval_ns = 1_000_000_000 / rate.max(1);
    let mut value = String::with_capacity(size + 64);
    for i in 0..total {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = Duration::from_nanos(i * interval_ns);
        let elapsed = start.elapsed();
        if elapsed < due {
            std::thread::sleep(due - elapsed);
        } else if elapsed > due + Duration::from_millis(1) {
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
        let mut rec = BaseRecord::<(), str>::to(topic).payload(value.as_str()).partition(0);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(1));
                    rec = back;
                }
            }
        }
        producer.poll(Duration::ZERO);
        produced.fetch_add(1, Ordering::Relaxed);
    }
    let _ = producer.flush(Duration::from_secs(10));
}
