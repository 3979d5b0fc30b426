//! moonx-loadtest: drives any server speaking the MoonX WebSocket protocol
//! and reports what it measured, with a verdict (loadtest/README.md).
//!
//! Scenarios: `connect` (connect + auth + subscribe latency, CPU and RSS per
//! connection), `fanout` (an open-loop Kafka producer stamps each update with
//! its intended send time and a sequence number; every subscriber records
//! publish->receive latency in an HDR histogram, corrected for coordinated
//! omission the way wrk2 does, and checks gaps and duplicates), `private`,
//! `markets`, `churn`, `resume` (private connections drop together while
//! their updates flow, then all reconnect at once and resume with `since`:
//! time to recover, Kafka reads per replayed message, nothing lost or
//! repeated, and what the storm costs live prices), `broker` (a standalone
//! Kafka-protocol broker for the server and the peers to share) and
//! `report` (percentile tables, plots and merges of results). Every run is
//! bounded in count and time.

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
mod hdr;
mod kafka;
mod markets;
mod plan;
mod private;
mod procstat;
mod report;
mod resume;
mod run;
mod verdict;
mod ws;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Map, Value};
use ws::Ws;

pub(crate) use hdr::Recorder;
use run::Run;
use verdict::{fmt_us, Figures, Threshold, Verdict};

#[derive(Parser)]
#[command(
    name = "moonx-loadtest",
    version,
    about = "Load generator for MoonX WebSocket servers, with verdicts",
    after_help = "Exit status: 0 the run passed; 1 it failed (the reason is on the last line); 2 a usage or set-up \
                  error; 130 interrupted (Ctrl-C; the summary of what was measured is still printed)."
)]
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
    /// Connections on a few Zipf-popular markets each: exactly their markets' updates.
    Markets(markets::MarketsArgs),
    /// A fan-out while connections are opened and dropped at a steady rate.
    Churn(fanout::ChurnArgs),
    /// Private connections drop together, then all reconnect at once and resume with `since`.
    Resume(resume::ResumeArgs),
    /// Run a standalone embedded Kafka-protocol broker and print its address.
    Broker(BrokerArgs),
    /// Percentile table, plot and merge of JSON results and HDR logs.
    Report(report::ReportArgs),
}

fn positive_usize() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

#[derive(Args, Clone, Serialize)]
pub(crate) struct Common {
    /// Server address, host:port (a name such as localhost:3008 is
    /// resolved); the WebSocket path is /ws.
    #[arg(long, default_value = "127.0.0.1:3008")]
    pub(crate) server: String,
    /// HMAC secret the tool signs its HS256 test tokens with: it must be
    /// the server's JWT_SECRET, or every authentication is refused.
    #[arg(long, env = "JWT_SECRET", default_value = "loadtest-secret", hide_env_values = true)]
    #[serde(skip)]
    pub(crate) jwt_secret: String,
    /// Connections to open.
    #[arg(long, short = 'c', default_value_t = 1000, value_parser = positive_usize())]
    pub(crate) connections: usize,
    /// Connection attempts per second (0: as fast as `--concurrency`
    /// allows). With a rate, set-up latency counts from each attempt's
    /// scheduled time (coordinated omission corrected).
    #[arg(long, default_value_t = 0)]
    pub(crate) connect_rate: u64,
    /// Connection set-ups in flight at once.
    #[arg(long, default_value_t = 256, value_parser = positive_usize())]
    pub(crate) concurrency: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N to spread ephemeral ports
    /// over (for an IPv4 loopback server only; 1: the system's choice).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub(crate) sources: u8,
    /// PID of the server, to report its CPU time and RSS (checked at start:
    /// exit 2 when it is not a live process).
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Print one JSON object (schema 1, README) instead of the human
    /// summary; the verdict line then goes to stderr.
    #[arg(long)]
    pub(crate) json: bool,
    /// Give up on the whole run (every phase) after this many seconds:
    /// the summary is printed and the run fails.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) deadline: u64,
    /// Fail the run unless this holds, e.g. 'p99<50ms', 'p99.9<=0.2s',
    /// 'lost==0', 'throughput>=100000' (repeatable; README lists the
    /// figures).
    #[arg(long, value_name = "EXPR")]
    pub(crate) threshold: Vec<Threshold>,
    /// Write an HdrHistogram interval log (one histogram per tag per
    /// second, values in µs) to this file.
    #[arg(long, value_name = "PATH")]
    pub(crate) hdr_log: Option<String>,
    /// No progress lines on stderr.
    #[arg(long, short = 'q')]
    pub(crate) quiet: bool,
}

#[derive(Args, Serialize)]
struct ConnectArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// Seconds to hold the connections open after the last one is set up.
    #[arg(long, default_value_t = 2)]
    hold: u64,
    /// Channel to subscribe to, one subscribe each (repeatable: `--channel
    /// prices:1:ETH --channel prices:1:BTC`; any name the server knows).
    #[arg(long = "channel", default_value = "prices")]
    channels: Vec<String>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.scenario {
        Scenario::Broker(a) => broker(a).map(|_| 0),
        Scenario::Report(a) => report::run(a),
        Scenario::Connect(a) => run_local(connect(a)),
        Scenario::Fanout(a) => run_local(fanout::run_fanout(a)),
        Scenario::Private(a) => run_local(private::run(a)),
        Scenario::Markets(a) => run_local(markets::run(a)),
        Scenario::Churn(a) => run_local(fanout::run_churn(a)),
        Scenario::Resume(a) => run_local(resume::run(a)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_local<F: std::future::Future<Output = anyhow::Result<u8>>>(f: F) -> anyhow::Result<u8> {
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

/// The source address of connection `i`: spread over 127.0.0.1..=N for an
/// IPv4 loopback server, the system's choice otherwise.
fn source(common: &Common, server: SocketAddr, i: usize) -> Option<IpAddr> {
    let spread = common.sources > 1 && server.is_ipv4() && server.ip().is_loopback();
    spread.then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % common.sources as usize) as u8)))
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// One connection set up, and how long each step took (µs).
pub(crate) struct Setup {
    pub(crate) ws: Ws,
    connect_us: u64,
    auth_us: u64,
    subscribe_us: u64,
    /// Wall clock (ns since the epoch) just before the first subscribe was
    /// sent: an update produced before it can only be a snapshot.
    pub(crate) subscribed_ns: u64,
    /// Update frames that arrived between subscribe replies (a market's
    /// snapshot follows its `subscribed`), in order, for the reader.
    pub(crate) early: Vec<Vec<u8>>,
    /// The snapshot frames the `subscribed` replies announced
    /// (`"snapshot": n`; 0 from a server that does not say).
    pub(crate) snapshots_announced: u64,
}

/// A `subscribed` reply to a resume (a subscribe with `since`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resumed {
    /// Whether the server replays every update after `since`.
    pub(crate) recovered: bool,
    /// The replayed updates that follow the reply.
    pub(crate) missed: u64,
}

/// Update frames kept while waiting for subscribe replies, at most.
const MAX_EARLY: usize = 10_000;

/// The `"error"` text of a server reply, for failure messages.
fn error_text(reply: &[u8]) -> String {
    let v: Value = serde_json::from_slice(reply).unwrap_or(Value::Null);
    let d = &v["data"];
    d["error"].as_str().or(d["message"].as_str()).or(d["code"].as_str()).unwrap_or("no reason given").to_string()
}

/// Connects, authenticates and subscribes one connection (one `subscribe`
/// per channel, each answered before the next). `t0` is when the attempt
/// was due: with a connect rate, its scheduled time (so a late start
/// counts in the latency), otherwise when it started.
pub(crate) async fn set_up<S: AsRef<str>>(
    common: &Common,
    server: SocketAddr,
    i: usize,
    user: &str,
    channels: &[S],
    t0: Instant,
) -> anyhow::Result<Setup> {
    let (mut ws, connect_us, auth_us) = authenticated(common, server, i, user, t0).await?;
    let t2 = Instant::now();
    let subscribed_ns = now_ns();
    let subscribes: Vec<Value> = channels.iter().map(|c| json!({ "channel": c.as_ref() })).collect();
    let Subscribed { early, snapshots_announced, .. } = subscribe(&mut ws, &subscribes).await?;
    Ok(Setup {
        ws,
        connect_us,
        auth_us,
        subscribe_us: t2.elapsed().as_micros() as u64,
        subscribed_ns,
        early,
        snapshots_announced,
    })
}

/// Connects connection `i` (from its source address) and authenticates
/// it as `user`: the socket, then how long the connect took from `t0`
/// (until `auth_required`) and the authentication, in µs.
pub(crate) async fn authenticated(
    common: &Common,
    server: SocketAddr,
    i: usize,
    user: &str,
    t0: Instant,
) -> anyhow::Result<(Ws, u64, u64)> {
    let mut ws = match Ws::connect(server, source(common, server, i), "").await {
        Ok(ws) => ws,
        Err(e) if format!("{e:#}").contains("refused") && !format!("{e:#}").contains("upgrade") => {
            bail!("{e:#} (does anything listen at {server}?)")
        }
        Err(e) => return Err(e),
    };
    let first = ws.next_text().await.context("waiting for auth_required")?;
    if memchr::memmem::find(&first, b"auth_required").is_none() {
        bail!("expected auth_required, got: {}", String::from_utf8_lossy(&first[..first.len().min(120)]));
    }
    let connect_us = t0.elapsed().as_micros() as u64;
    let t1 = Instant::now();
    let auth = json!({"id":"a","type":"authenticate","data":{"token": token(&common.jwt_secret, user)}}).to_string();
    ws.send_text(&auth).await?;
    let reply = ws.next_text().await.context("waiting for the auth reply")?;
    if memchr::memmem::find(&reply, b"auth_success").is_none() {
        bail!(
            "auth refused ({}): the tool signs HS256 tokens with --jwt-secret (or $JWT_SECRET), which must be \
             the server's JWT_SECRET",
            error_text(&reply)
        );
    }
    Ok((ws, connect_us, t1.elapsed().as_micros() as u64))
}

/// What the `subscribed` replies to a connection's subscribes said.
pub(crate) struct Subscribed {
    /// Update frames that arrived between the replies, in order, for the
    /// reader.
    pub(crate) early: Vec<Vec<u8>>,
    /// The snapshot frames announced (`"snapshot": n`; 0 from a server
    /// that does not say).
    pub(crate) snapshots_announced: u64,
    /// What the reply to a subscribe with `since` said (the last such
    /// reply; None when there was none).
    pub(crate) resumed: Option<Resumed>,
}

/// Sends one `subscribe` per `data` object (a resume's carries `since`),
/// each answered before the next.
pub(crate) async fn subscribe(ws: &mut Ws, subscribes: &[Value]) -> anyhow::Result<Subscribed> {
    let mut s = Subscribed { early: Vec::new(), snapshots_announced: 0, resumed: None };
    for data in subscribes {
        let channel = data["channel"].as_str().unwrap_or("?");
        ws.send_text(&json!({"id":"s","type":"subscribe","data": data}).to_string()).await?;
        loop {
            let reply = ws.next_text().await.context("waiting for the subscribe reply")?;
            if memchr::memmem::find(&reply, b"\"subscribed\"").is_some() {
                // Parsed in full (once per channel, at set-up): the counts may
                // be written any way JSON allows.
                let v: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
                let d = &v["data"];
                s.snapshots_announced += d["snapshot"].as_u64().unwrap_or(0);
                if let Some(recovered) = d["recovered"].as_bool() {
                    s.resumed = Some(Resumed { recovered, missed: d["missed"].as_u64().unwrap_or(0) });
                }
                break;
            }
            // A snapshot after the previous channel's reply: the reader's.
            if memchr::memmem::find(&reply, b"_update\"").is_some() && s.early.len() < MAX_EARLY {
                s.early.push(reply);
                continue;
            }
            bail!("subscribe to {channel} refused ({})", error_text(&reply));
        }
    }
    Ok(s)
}

/// The user of connection `i`: `lt-{i}`, or `lt-u{i / per_user}` when
/// several connections share a user.
fn user_of(i: usize, per_user: usize) -> String {
    if per_user <= 1 {
        format!("lt-{i}")
    } else {
        format!("lt-u{}", i / per_user)
    }
}

/// What the connect phase produced.
pub(crate) struct Opened {
    /// The connections set up, with their index.
    pub(crate) setups: Vec<(usize, Setup)>,
    /// Failure causes and how often each happened.
    pub(crate) failures: BTreeMap<String, u64>,
    pub(crate) attempted: usize,
    pub(crate) connect: Recorder,
    pub(crate) auth: Recorder,
    pub(crate) subscribe: Recorder,
    pub(crate) total: Recorder,
    pub(crate) elapsed: Duration,
}

impl Opened {
    fn accept(&mut self, i: usize, r: anyhow::Result<Setup>) {
        match r {
            Ok(s) => {
                self.connect.record(s.connect_us);
                self.auth.record(s.auth_us);
                self.subscribe.record(s.subscribe_us);
                self.total.record(s.connect_us + s.auth_us + s.subscribe_us);
                self.setups.push((i, s));
            }
            Err(e) => *self.failures.entry(format!("{e:#}")).or_insert(0) += 1,
        }
    }

    pub(crate) fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// "N of M connections failed to set up: cause xK; ..." when any did.
    pub(crate) fn failure_reason(&self) -> Option<String> {
        let failed = self.failed();
        (failed > 0)
            .then(|| format!("{failed} of {} connections failed to set up: {}", self.attempted, causes(&self.failures)))
    }
}

/// The channels connection `i` subscribes to.
pub(crate) type Channels = Rc<dyn Fn(usize) -> Vec<String>>;

/// The same channels for every connection.
pub(crate) fn same_channels(channels: &[&str]) -> Channels {
    let channels: Vec<String> = channels.iter().map(|s| s.to_string()).collect();
    Rc::new(move |_| channels.clone())
}

/// Opens `common.connections` connections with the pacing and
/// concurrency asked for, printing a progress line a second; stops early
/// when the run is stopped.
pub(crate) async fn open_all(run: &mut Run, common: &Common, channels: Channels, per_user: usize) -> Opened {
    run.enter("connect");
    let n = common.connections;
    let server = run.server;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, anyhow::Result<Setup>)>();
    let aborts: Rc<RefCell<Vec<tokio::task::AbortHandle>>> = Rc::default();
    let start = Instant::now();
    let spawner = {
        let (common, aborts) = (common.clone(), aborts.clone());
        tokio::task::spawn_local(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(common.concurrency));
            for i in 0..n {
                let due = (common.connect_rate > 0)
                    .then(|| start + Duration::from_secs_f64(i as f64 / common.connect_rate as f64));
                if let Some(at) = due {
                    tokio::time::sleep_until(at.into()).await;
                }
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                let (c, chs, tx) = (common.clone(), channels(i), tx.clone());
                let t = tokio::task::spawn_local(async move {
                    let user = user_of(i, per_user);
                    let t0 = due.unwrap_or_else(Instant::now);
                    let r = tokio::time::timeout(Duration::from_secs(30), set_up(&c, server, i, &user, &chs, t0)).await;
                    drop(permit);
                    let _ = tx.send((i, r.unwrap_or_else(|_| Err(anyhow::anyhow!("set-up timed out after 30 s")))));
                });
                aborts.borrow_mut().push(t.abort_handle());
            }
        })
    };
    let mut o = Opened {
        setups: Vec::with_capacity(n),
        failures: BTreeMap::new(),
        attempted: 0,
        connect: Recorder::new("connect"),
        auth: Recorder::new("auth"),
        subscribe: Recorder::new("subscribe"),
        total: Recorder::new("setup"),
        elapsed: Duration::ZERO,
    };
    let mut tick = Instant::now() + Duration::from_secs(1);
    let (mut ok_before, mut failed_before) = (0usize, 0u64);
    let stop = run.stop.clone();
    loop {
        let done = o.setups.len() + o.failed() as usize;
        if done >= n {
            break;
        }
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((i, r)) => o.accept(i, r),
                None => break,
            },
            _ = tokio::time::sleep_until(tick.into()) => {
                tick += Duration::from_secs(1);
                connect_progress(run, &mut o, n, &mut ok_before, &mut failed_before);
            }
            _ = stop.wait() => break,
        }
    }
    spawner.abort();
    for a in aborts.borrow().iter() {
        a.abort();
    }
    // Set-ups that completed before the stop still count.
    while let Ok((i, r)) = rx.try_recv() {
        o.accept(i, r);
    }
    o.attempted = if run.stop.stopped() { o.setups.len() + o.failed() as usize } else { n };
    o.elapsed = start.elapsed();
    connect_progress(run, &mut o, n, &mut ok_before, &mut failed_before);
    o.setups.sort_by_key(|(i, _)| *i);
    o
}

fn connect_progress(run: &mut Run, o: &mut Opened, n: usize, ok_before: &mut usize, failed_before: &mut u64) {
    let secs = run.interval().as_secs_f64().max(1e-3);
    let ok = o.setups.len() - *ok_before;
    let failed = o.failed() - *failed_before;
    run.progress(&format!(
        "+{ok} set up ({:.0}/s), +{failed} failed; {}/{n} done; set-up {}",
        ok as f64 / secs,
        o.setups.len() + o.failed() as usize,
        brief(&o.total.interval)
    ));
    *ok_before = o.setups.len();
    *failed_before = o.failed();
    if let Err(e) = run.end_interval(&mut [&mut o.connect, &mut o.auth, &mut o.subscribe, &mut o.total]) {
        eprintln!("{e:#}");
    }
}

/// `p50 1.2 ms p99 3.4 ms max 5.0 ms`, or `no samples`.
pub(crate) fn brief(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {} p99 {} max {}",
        fmt_us(h.value_at_quantile(0.5) as f64),
        fmt_us(h.value_at_quantile(0.99) as f64),
        fmt_us(h.max() as f64)
    )
}

/// Percentiles in µs; every figure null when nothing was measured.
pub(crate) fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({
            "count": 0, "min_us": null, "p50_us": null, "p75_us": null, "p90_us": null, "p99_us": null,
            "p999_us": null, "p9999_us": null, "max_us": null, "mean_us": null,
        });
    }
    let q = |p: f64| h.value_at_quantile(p);
    json!({
        "count": h.len(), "min_us": h.min(), "p50_us": q(0.5), "p75_us": q(0.75), "p90_us": q(0.9),
        "p99_us": q(0.99), "p999_us": q(0.999), "p9999_us": q(0.9999), "max_us": h.max(), "mean_us": h.mean(),
    })
}

pub(crate) fn print_table(title: &str, h: &Histogram<u64>) {
    if h.is_empty() {
        out!("  {title} latency: no samples");
        return;
    }
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

/// Causes listed in a verdict line, at most (the JSON has them all).
const LISTED_CAUSES: usize = 5;

/// A count of causes as `cause xN; ...`: the most frequent first when
/// there are more than a few (each market channel refused is a cause of
/// its own), then how many more.
pub(crate) fn causes(m: &BTreeMap<String, u64>) -> String {
    let mut all: Vec<(&String, &u64)> = m.iter().collect();
    if all.len() <= LISTED_CAUSES {
        return all.iter().map(|(c, n)| format!("{c} x{n}")).collect::<Vec<_>>().join("; ");
    }
    all.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let shown: Vec<String> = all[..LISTED_CAUSES].iter().map(|(c, n)| format!("{c} x{n}")).collect();
    let rest = &all[LISTED_CAUSES..];
    format!("{}; and {} other causes x{}", shown.join("; "), rest.len(), rest.iter().map(|(_, n)| **n).sum::<u64>())
}

/// `x / y` as a number, or null when `y` is 0 (never a misleading zero or
/// a division by zero).
pub(crate) fn per(x: f64, y: f64) -> Value {
    if y > 0.0 {
        json!(x / y)
    } else {
        Value::Null
    }
}

async fn connect(a: ConnectArgs) -> anyhow::Result<u8> {
    let c = &a.common;
    if c.deadline <= a.hold {
        bail!("--deadline {} s leaves no time for the connect phase after --hold {} s", c.deadline, a.hold);
    }
    let mut run = Run::start(c, "connect")?;
    let me = procstat::Sample::own();
    let server_before = run.sample();
    let kafka_before = run.probe.as_ref().map(|p| p.kafka_client_cpu());
    let names: Vec<&str> = a.channels.iter().map(String::as_str).collect();
    let mut o = open_all(&mut run, c, same_channels(&names), 1).await;
    // Read inside the process's window, so the part cannot exceed the whole.
    let kafka_after = run.probe.as_ref().map(|p| p.kafka_client_cpu());
    let server_after = run.sample();
    let open = o.setups.len();
    // Hold (answering pings) so idle memory can be read; a connection the
    // server closes meanwhile is an unexpected close.
    let closed: Rc<RefCell<BTreeMap<String, u64>>> = Rc::default();
    let mut server_held = server_after;
    if !run.stop.stopped() && a.hold > 0 {
        run.enter("hold");
        let held: Vec<_> = std::mem::take(&mut o.setups)
            .into_iter()
            .map(|(_, s)| {
                let closed = closed.clone();
                tokio::task::spawn_local(async move {
                    let mut ws = s.ws;
                    let why = ws.run_until_closed().await;
                    *closed.borrow_mut().entry(why).or_insert(0) += 1;
                })
            })
            .collect();
        let end = Instant::now() + Duration::from_secs(a.hold);
        let mut closed_before = 0;
        while Instant::now() < end {
            let stopped =
                run.stop.sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now()))).await;
            let now_closed: u64 = closed.borrow().values().sum();
            run.progress(&format!(
                "{} open, +{} closed by the server",
                open as u64 - now_closed,
                now_closed - closed_before
            ));
            closed_before = now_closed;
            if stopped {
                break;
            }
        }
        server_held = run.sample();
        for h in held {
            h.abort();
        }
    }
    let mine = procstat::Sample::own().cpu_since(&me);
    let elapsed = o.elapsed;
    let rate = per(open as f64, elapsed.as_secs_f64());
    let closed = closed.borrow().clone();
    let n_closed: u64 = closed.values().sum();
    let exited = run.probe.is_some() && server_held.is_none();
    let server = match (&run.probe, server_before, server_after, server_held) {
        (Some(p), Some(b), Some(af), Some(h)) => {
            let cpu = af.cpu_since(&b);
            let mut m = p.base_json(false);
            m.insert("cpu_ms".into(), json!(cpu.as_secs_f64() * 1e3));
            m.insert("cpu_us_per_connection".into(), per(cpu.as_secs_f64() * 1e6, open as f64));
            // The split of that CPU between the server's own code and the
            // kernel (from /proc's tick counts: a few percent over a storm).
            let user_share = af.user_share_since(&b);
            m.insert("cpu_user_share".into(), json!(user_share));
            if let Some(share) = user_share {
                let us = cpu.as_secs_f64() * 1e6;
                m.insert("cpu_user_us_per_connection".into(), per(us * share, open as f64));
                m.insert("cpu_system_us_per_connection".into(), per(us * (1.0 - share), open as f64));
            }
            // Of that CPU, what the server's Kafka client spent meanwhile:
            // background work, not set-up work.
            if let (Some((threads, before)), Some((_, after))) = (&kafka_before, &kafka_after) {
                let us = after.saturating_sub(*before).as_secs_f64() * 1e6;
                m.insert("kafka_client_threads".into(), json!(threads));
                m.insert("cpu_kafka_client_us_per_connection".into(), per(us, open as f64));
            }
            m.insert("rss_before_kb".into(), json!(b.rss_kb));
            m.insert("rss_held_kb".into(), json!(h.rss_kb));
            m.insert("rss_bytes_per_connection".into(), per((h.rss_kb as f64 - b.rss_kb as f64) * 1024.0, open as f64));
            Value::Object(m)
        }
        (Some(p), ..) => Value::Object(p.base_json(true)),
        _ => Value::Null,
    };
    let mut v = Verdict::default();
    if let Some(r) = o.failure_reason() {
        v.fail(r);
    }
    if n_closed > 0 {
        v.fail(format!("{n_closed} of {open} connections closed unexpectedly while held: {}", causes(&closed)));
    }
    if open == 0 {
        v.fail("no samples: no connection was set up");
    }
    if exited {
        v.fail("the server process exited during the run");
    }
    let server_cpu = server["cpu_us_per_connection"].as_f64();
    let mut values =
        BTreeMap::from([("failed", o.failed() as f64), ("closed", n_closed as f64), ("connections", open as f64)]);
    if let Some(r) = rate.as_f64() {
        values.insert("throughput", r);
    }
    if let Some(x) = server_cpu {
        values.insert("server_cpu_us", x);
    }
    let figures = Figures { latency: &o.total.total, values };
    let mut report = Map::new();
    for (k, val) in [
        ("connections", json!(open)),
        ("attempted", json!(o.attempted)),
        ("failures", json!(o.failures)),
        ("closed_unexpectedly", json!(closed)),
        ("elapsed_s", json!(elapsed.as_secs_f64())),
        ("connections_per_s", rate.clone()),
        ("connect", percentiles(&o.connect.total)),
        ("auth", percentiles(&o.auth.total)),
        ("subscribe", percentiles(&o.subscribe.total)),
        ("total", percentiles(&o.total.total)),
        ("server", server.clone()),
        ("client_cpu_ms", json!(mine.as_secs_f64() * 1e3)),
        (
            "hdr",
            json!({
                "connect": hdr::encode(&o.connect.total), "auth": hdr::encode(&o.auth.total),
                "subscribe": hdr::encode(&o.subscribe.total), "setup": hdr::encode(&o.total.total),
            }),
        ),
        (
            "coordinated_omission",
            json!(if c.connect_rate > 0 {
                "corrected: set-up latency counts from each attempt's scheduled time"
            } else {
                "none: no connect rate, so latency counts from each attempt's actual start"
            }),
        ),
    ] {
        report.insert(k.into(), val);
    }
    let settings = serde_json::to_value(&a)?;
    let probe = run.probe.take();
    let human = || {
        out!(
            "connect: {open} of {} connections set up in {:.2} s ({}), {} failed, {n_closed} closed while held",
            o.attempted,
            elapsed.as_secs_f64(),
            rate.as_f64().map_or("-".into(), |r| format!("{r:.0}/s")),
            o.failed()
        );
        for (cause, n) in &o.failures {
            out!("  failure x{n}: {cause}");
        }
        for (cause, n) in &closed {
            out!("  closed while held x{n}: {cause}");
        }
        let from = if c.connect_rate > 0 { "from the scheduled time" } else { "from the actual start" };
        print_table(&format!("connect (TCP + upgrade + auth_required, {from})"), &o.connect.total);
        print_table("authenticate", &o.auth.total);
        print_table("subscribe", &o.subscribe.total);
        print_table("total set-up", &o.total.total);
        if let Some(p) = &probe {
            p.describe(exited);
            if let (Some(b), Some(h)) = (server_before, server_held) {
                let us = |k: &str| server[k].as_f64().map_or("-".into(), |x| format!("{x:.1} µs"));
                out!(
                    "  server: {} CPU per connection ({} user, {} system; of it, {} in its Kafka client's threads), RSS {:.1} MB before, {:.1} MB held ({} per held connection)",
                    us("cpu_us_per_connection"),
                    us("cpu_user_us_per_connection"),
                    us("cpu_system_us_per_connection"),
                    us("cpu_kafka_client_us_per_connection"),
                    b.rss_kb as f64 / 1024.0,
                    h.rss_kb as f64 / 1024.0,
                    server["rss_bytes_per_connection"].as_f64().map_or("-".into(), |x| format!("{x:.0} bytes"))
                );
            }
        }
        out!("  client CPU: {:.0} ms", mine.as_secs_f64() * 1e3);
    };
    Ok(run.finish("connect", settings, report, &mut v, &figures, human))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_lines_list_the_most_frequent_causes() {
        let few = BTreeMap::from([("b".to_string(), 1), ("a".to_string(), 2)]);
        assert_eq!(causes(&few), "a x2; b x1");
        let many: BTreeMap<String, u64> = (0..8).map(|i| (format!("refused {i}"), 10 + i)).collect();
        assert_eq!(
            causes(&many),
            "refused 7 x17; refused 6 x16; refused 5 x15; refused 4 x14; refused 3 x13; and 3 other causes x33"
        );
    }

    /// A scripted server: the upgrade, `auth_required`, then one reply to
    /// each client frame from `replies` (each reply one or more frames).
    fn scripted(replies: Vec<Vec<&'static str>>) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
                head.push(b[0]);
            }
            let text = |s: &mut std::net::TcpStream, t: &str| {
                assert!(t.len() < 126, "short frames only");
                s.write_all(&[0x81, t.len() as u8]).unwrap();
                s.write_all(t.as_bytes()).unwrap();
            };
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").unwrap();
            text(&mut s, r#"{"type":"auth_required"}"#);
            let mut got = Vec::new();
            for frames in replies {
                // A masked client frame (under 64 KiB).
                let mut h = [0u8; 2];
                s.read_exact(&mut h).unwrap();
                let mut len = (h[1] & 0x7f) as usize;
                if len == 126 {
                    let mut l = [0u8; 2];
                    s.read_exact(&mut l).unwrap();
                    len = u16::from_be_bytes(l) as usize;
                }
                let mut mask = [0u8; 4];
                s.read_exact(&mut mask).unwrap();
                let mut payload = vec![0u8; len];
                s.read_exact(&mut payload).unwrap();
                payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= mask[i % 4]);
                got.push(String::from_utf8(payload).unwrap());
                for f in frames {
                    text(&mut s, f);
                }
            }
            got
        });
        (addr, server)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn set_up_keeps_snapshots_that_arrive_between_subscribe_replies() {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            c: Common,
        }
        let common = T::parse_from(["t", "--sources", "1"]).c;
        let snap = [r#"{"type":"price_update","data":{"seq":1}}"#, r#"{"type":"price_update","data":{"seq":2}}"#];
        let (addr, server) = scripted(vec![
            vec![r#"{"type":"auth_success"}"#],
            // The count may be written with spaces; the snapshot follows.
            vec![r#"{"type":"subscribed","data":{"channel":"prices:1:ETH","snapshot": 1}}"#, snap[0]],
            vec![r#"{"type":"subscribed","data":{"channel":"prices:1:WBTC","snapshot":1}}"#, snap[1]],
            vec![r#"{"type":"subscribed","data":{"channel":"prices","snapshot":0}}"#],
        ]);
        let before = now_ns();
        let channels = ["prices:1:ETH", "prices:1:WBTC", "prices"];
        let mut s = set_up(&common, addr, 0, "u", &channels, Instant::now()).await.unwrap();
        let got = server.join().unwrap();
        assert!(got[0].contains("authenticate"), "{got:?}");
        for (sent, ch) in got[1..].iter().zip(channels) {
            assert!(sent.contains(r#""type":"subscribe""#) && sent.contains(&format!(r#""channel":"{ch}""#)), "{sent}");
        }
        assert_eq!(s.snapshots_announced, 2);
        assert!(s.subscribed_ns >= before);
        // The snapshots read while waiting for a later reply are kept, in
        // order; the ones after the last reply are the reader's.
        assert_eq!(s.early, [snap[0].as_bytes(), snap[1].as_bytes()]);
        assert!(s.ws.next_text().await.is_err(), "nothing else was sent");
    }
}
