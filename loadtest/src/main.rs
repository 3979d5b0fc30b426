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

/// `println!` that ends the process quietly once stdout is gone (a reader
/// such as `| head` closed the pipe) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod fanout;
mod kafka;
mod private;
mod procstat;
mod ws;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;
use ws::Ws;

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
    Fanout(fanout::FanoutArgs),
    /// Many users with private streams: each gets exactly its own, in order.
    Private(private::PrivateArgs),
    /// A fan-out while connections are opened and dropped at a steady rate.
    Churn(fanout::FanoutArgs),
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
    /// Take the broker down every this many seconds (0: never), to test
    /// ingest under an outage while traffic flows.
    #[arg(long, default_value_t = 0)]
    down_every: u64,
    /// Seconds each outage lasts.
    #[arg(long, default_value_t = 10)]
    down_for: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Broker(a) => broker(a),
        Scenario::Connect(a) => run_local(connect(a)),
        Scenario::Fanout(a) => run_local(fanout::run(a)),
        Scenario::Private(a) => run_local(private::run(a)),
        Scenario::Churn(mut a) => {
            if a.churn_rate == 0 {
                a.churn_rate = 100;
            }
            run_local(fanout::run(a))
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
    out!("{addr}");
    if let Some(path) = &a.address_file {
        std::fs::write(path, &addr)?;
    }
    let end = Instant::now() + Duration::from_secs(a.duration);
    if a.down_every == 0 {
        std::thread::sleep(Duration::from_secs(a.duration));
        return Ok(());
    }
    let mut outages = 0;
    loop {
        // No outage starts in the last period, so the run ends with the broker up.
        let up_until = Instant::now() + Duration::from_secs(2 * a.down_every);
        if up_until >= end {
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            break;
        }
        std::thread::sleep(Duration::from_secs(a.down_every));
        outages += 1;
        eprintln!("broker down (outage {outages}, {} s)", a.down_for);
        cluster.broker_down(1).context("broker down")?;
        std::thread::sleep(Duration::from_secs(a.down_for).min(end.saturating_duration_since(Instant::now())));
        cluster.broker_up(1).context("broker up")?;
        eprintln!("broker up");
    }
    eprintln!("{outages} outages");
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

pub(crate) async fn set_up(common: &Common, i: usize, user: &str, channels: &[&str]) -> anyhow::Result<Setup> {
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
    out!("  {title} latency ({} samples)", h.len());
    for (label, p) in [
        ("50.000%", 0.5),
        ("75.000%", 0.75),
        ("90.000%", 0.9),
        ("99.000%", 0.99),
        ("99.900%", 0.999),
        ("99.990%", 0.9999),
    ] {
        out!("    {label}  {:>10.3} ms", h.value_at_quantile(p) as f64 / 1000.0);
    }
    out!("    100.000%  {:>10.3} ms", h.max() as f64 / 1000.0);
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
        out!("{report}");
    } else {
        out!(
            "connect: {open} connections in {:.2} s ({rate:.0}/s), {} failed",
            elapsed.as_secs_f64(),
            c.connections - open
        );
        for (cause, n) in &failures {
            out!("  failure x{n}: {cause}");
        }
        print_table("connect (TCP + upgrade + auth_required)", &hc);
        print_table("authenticate", &ha);
        print_table("subscribe", &hs);
        print_table("total set-up", &ht);
        if !server.is_null() {
            out!(
                "  server: {:.1} µs CPU per connection, {:.0} bytes RSS per held connection",
                server["cpu_us_per_connection"].as_f64().unwrap_or(0.0),
                server["rss_bytes_per_connection"].as_f64().unwrap_or(0.0)
            );
        }
        out!("  client CPU: {:.0} ms", mine.as_secs_f64() * 1e3);
    }
    Ok(())
}
