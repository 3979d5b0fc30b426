//! The `markets` scenario end to end: a server that speaks market channels,
//! a real Kafka-protocol broker (`moonx-loadtest broker`), and
//! `moonx-loadtest markets` run as a process against them over loopback.
//! Small sizes, a few seconds each, every wait bounded.
//!
//! Which server: [`TARGET`], the `moonx-ws` binary (built when missing,
//! `common::server_bin`, never skipped), overridable with
//! `MARKETS_TEST_SERVER=peer` to check the tool against the rust-tokio
//! peer (`$PEERS_DIR/rust-tokio/target/release/rust-tokio-peer`,
//! `PEERS_DIR` defaulting to `/tmp/peers`; without it those runs print
//! `SKIPPED`).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The servers these tests can run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The rust-tokio peer: market channels, no snapshots, no `"snapshot": n`.
    Peer,
    /// The real server, from this workspace.
    MoonxWs,
}

/// The server the tests run against (see the module comment).
const TARGET: Target = Target::MoonxWs;

fn target() -> Target {
    match std::env::var("MARKETS_TEST_SERVER").as_deref() {
        Ok("peer") => Target::Peer,
        Ok("moonx-ws") => Target::MoonxWs,
        Ok(other) => panic!("MARKETS_TEST_SERVER={other}: expected peer or moonx-ws"),
        Err(_) => TARGET,
    }
}

impl Target {
    /// The server on a free loopback port, consuming from `brokers` and
    /// ready; None (the test skips) only when the peer is not built.
    fn start(self, brokers: &str) -> Option<(Proc, SocketAddr)> {
        match self {
            Target::Peer => peer_bin().map(|bin| peer(&bin, brokers)),
            Target::MoonxWs => Some(server(brokers, true, &[])),
        }
    }

    /// Whether it sends a market's last update after `subscribed`
    /// (PROTOCOL.md section 11).
    fn sends_snapshots(self) -> bool {
        self == Target::MoonxWs
    }
}

fn peer_bin() -> Option<PathBuf> {
    let dir = std::env::var("PEERS_DIR").unwrap_or_else(|_| "/tmp/peers".into());
    let bin = PathBuf::from(dir).join("rust-tokio/target/release/rust-tokio-peer");
    if bin.exists() {
        Some(bin)
    } else {
        eprintln!(
            "SKIPPED: no rust-tokio peer at {} (copy shared/peers/rust-tokio to $PEERS_DIR, default /tmp/peers, and \
             run `cargo build --release` there)",
            bin.display()
        );
        None
    }
}

/// The peer on a free loopback port, consuming from `brokers`, once a
/// small fan-out through it passes (it has no readiness endpoint).
fn peer(bin: &PathBuf, brokers: &str) -> (Proc, SocketAddr) {
    let port = free_port();
    let child = Command::new(bin)
        .env("PORT", port.to_string())
        .env("JWT_SECRET", SECRET)
        .env("KAFKA_BROKERS", brokers)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "peer not listening within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    for attempt in 1..=5 {
        let out = lt(&[
            "fanout",
            "--server",
            &addr.to_string(),
            "--brokers",
            brokers,
            "--jwt-secret",
            SECRET,
            "-c",
            "1",
            "-r",
            "20",
            "-d",
            "1",
            "--warmup",
            "1",
            "--drain",
            "5",
            "-q",
        ]);
        if out.status.success() {
            return (p, addr);
        }
        eprintln!("peer not consuming yet (attempt {attempt}): {}", last_line(&out.stdout));
    }
    panic!("the peer never passed a small fan-out");
}

#[test]
fn each_connection_gets_exactly_its_markets_updates_and_snapshots_are_not_counted_against_it() {
    let (_b, brokers) = broker();
    let Some((srv, addr)) = target().start(&brokers) else { return };
    let dir = tmp("markets");
    let log = dir.join("markets.hlog");
    let pid = srv.0.id().to_string();
    let out = lt(&[
        "markets",
        "--server",
        &addr.to_string(),
        "--brokers",
        &brokers,
        "--jwt-secret",
        SECRET,
        "-c",
        "300",
        "--markets",
        "60",
        "--per-connection",
        "4",
        "-r",
        "100",
        "-d",
        "2",
        "--warmup",
        "1",
        "--drain",
        "15",
        "--server-pid",
        &pid,
        "--threshold",
        "lost==0",
        "--threshold",
        "leaked==0",
        "--hdr-log",
        log.to_str().unwrap(),
        "--json",
    ]);
    let r = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(last_line(&out.stderr), "PASS (2 thresholds met)");
    assert_eq!(r["schema"], 1);
    assert_eq!(r["scenario"], "markets");
    for (k, v) in [("connections", 300), ("markets", 60), ("per_connection", 4), ("rate", 100), ("seed", 1)] {
        assert_eq!(r["settings"][k], v, "settings.{k}");
    }
    assert_eq!(r["settings"]["chains"], serde_json::json!([1, 56, 137, 8453]));
    assert_eq!(r["settings"]["zipf_s"], 1.1);
    assert_eq!(r["subscribers"], 300);
    assert_eq!(r["connections_on_prices"], 30, "10% of the connections, spread evenly");
    assert_eq!(r["market_subscriptions"], 300 * 4);
    assert_eq!(r["measured_updates"], 200);
    // Exactly each connection's markets: nothing lost, leaked or repeated.
    for k in ["lost", "leaked", "duplicates", "gaps", "connections_short", "snapshots"] {
        assert_eq!(r[k], 0, "{k}");
    }
    let expected = r["expected_measured"].as_u64().unwrap();
    assert_eq!(r["measured"], expected);
    assert_eq!(r["latency"]["count"], expected);
    // More than the prices connections' share, less than everyone on everything.
    assert!(expected > 30 * 200 && expected < 300 * 200, "{expected}");
    let per_update = r["deliveries_per_update"].as_f64().unwrap();
    assert_eq!(per_update, expected as f64 / 200.0);
    assert!(r["server"]["cpu_us_per_delivery"].as_f64().unwrap() > 0.0);
    assert!(r["coordinated_omission"].as_str().unwrap().starts_with("corrected"));
    let err = text(&out.stderr);
    for phase in ["connect", "warm-up", "measure", "drain"] {
        assert!(err.contains(&format!(" {phase} ")), "no {phase} progress line in {err}");
    }
    assert!(err.contains("leaked"), "progress lines count leaks: {err}");
    // The interval log adds up to the result's histogram.
    let bytes = std::fs::read(&log).unwrap();
    let mut count = 0;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;
    for e in IntervalLogIterator::new(&bytes) {
        if let LogEntry::Interval(i) = e.unwrap() {
            if i.tag().map(|t| t.as_str()) == Some("latency") {
                use base64::Engine as _;
                let raw = base64::engine::general_purpose::STANDARD.decode(i.encoded_histogram()).unwrap();
                let h: hdrhistogram::Histogram<u64> = Deserializer::new().deserialize(&mut &raw[..]).unwrap();
                count += h.len();
            }
        }
    }
    assert_eq!(count, expected);

    // The same seed draws the same run: the same expected deliveries. A
    // server with snapshots now sends each market's last update of the
    // first run after `subscribed`: counted as snapshots (as many as
    // announced), not as leaks or duplicates, or the run would fail.
    let again = lt(&[
        "markets",
        "--server",
        &addr.to_string(),
        "--brokers",
        &brokers,
        "--jwt-secret",
        SECRET,
        "-c",
        "300",
        "--markets",
        "60",
        "--per-connection",
        "4",
        "-r",
        "100",
        "-d",
        "2",
        "--warmup",
        "1",
        "--drain",
        "15",
        "-q",
        "--json",
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let again = json_of(&again);
    assert_eq!(again["expected_measured"], expected);
    assert_eq!(again["snapshots"], again["snapshots_announced"]);
    if target().sends_snapshots() {
        assert!(again["snapshots"].as_u64().unwrap() > 0, "no snapshots in a second run: {again}");
    } else {
        assert_eq!(again["snapshots"], 0);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn updates_nobody_subscribed_to_fail_the_run_as_leaked() {
    // A second producer (a fan-out's, ETH on chain 8453, without the
    // markets' stamps) feeds the same server during the measured window: its
    // updates reach the markets connections on 8453:ETH and on prices,
    // which expected none of them.
    let (_b, brokers) = broker();
    let Some((_srv, addr)) = target().start(&brokers) else { return };
    let server = addr.to_string();
    let mut markets = Command::new(env!("CARGO_BIN_EXE_moonx-loadtest"))
        .args([
            "markets",
            "--server",
            &server,
            "--brokers",
            &brokers,
            "--jwt-secret",
            SECRET,
            "-c",
            "100",
            "--markets",
            "8",
            "--per-connection",
            "2",
            "-r",
            "20",
            "-d",
            "4",
            "--warmup",
            "1",
            "--drain",
            "5",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = markets.stderr.take().unwrap();
    let reader = common::until_measuring(stderr);
    let other = lt(&[
        "fanout",
        "--server",
        &server,
        "--brokers",
        &brokers,
        "--jwt-secret",
        SECRET,
        "-c",
        "1",
        "-r",
        "50",
        "-d",
        "1",
        "--warmup",
        "0",
        "--drain",
        "1",
        "-q",
    ]);
    let _ = other;
    let out = wait_bounded(markets, Duration::from_secs(60));
    let lines = reader.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", lines.join("\n"));
    let r = json_of(&out);
    assert!(r["leaked"].as_u64().unwrap() > 0, "{}", lines.join("\n"));
    let last = lines.last().cloned().unwrap_or_default();
    assert!(last.starts_with("FAIL: ") && last.contains(" leaked deliveries"), "{last}");
    assert_eq!(r["verdict"]["pass"], false);
}

#[test]
fn meaningless_market_settings_are_refused() {
    let refused = |args: &[&str], says: &str| {
        let mut all = vec!["markets", "--brokers", "127.0.0.1:1"];
        all.extend_from_slice(args);
        let out = lt(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: {}", text(&out.stderr));
    };
    refused(&["--markets", "3", "--per-connection", "4"], "--per-connection");
    refused(&["--chains", "1,56,1"], "--chains");
    refused(&["--chains=-1"], "--chains");
    refused(&["--prices-share", "1.5"], "--prices-share");
    refused(&["--zipf-s=-1"], "--zipf-s");
    refused(&["--markets", "0"], "--markets");
    refused(&["-r", "0"], "--rate");
    refused(&["-d", "10", "--deadline", "5"], "--deadline");
    // --help states the defaults of the issue.
    let help = text(&lt(&["markets", "--help"]).stdout);
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for default in [
        "--connections <CONNECTIONS> Connections to open [default: 10000]",
        "[default: 1000]",
        "[default: 1,56,137,8453]",
        "[default: 5]",
        "[default: 1.1]",
        "[default: 0.1]",
    ] {
        assert!(flat.contains(default), "{default} not in {help}");
    }
}
