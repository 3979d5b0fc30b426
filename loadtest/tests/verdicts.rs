//! The load tool's verdicts end to end: the real `moonx-ws` binary, a real
//! Kafka-protocol broker (`moonx-loadtest broker`, librdkafka's mock
//! cluster), and `moonx-loadtest` run as a process against them over
//! loopback sockets. Assertions are on exit codes, the last line's reason,
//! counts and file contents, never on timings. The helpers, and how the
//! server binary is found or built, are in `common/`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn a_passing_fanout_with_thresholds_writes_an_hdr_log_that_matches_its_json() {
    let (_b, brokers) = broker();
    let (srv, addr) = server(&brokers, true, &[]);
    let dir = tmp("pass");
    let log = dir.join("run.hlog");
    let pid = srv.0.id().to_string();
    let server = format!("localhost:{}", addr.port());
    let out = lt(&[
        "fanout",
        "--server",
        &server,
        "--brokers",
        &brokers,
        "--jwt-secret",
        SECRET,
        "-c",
        "20",
        "-r",
        "50",
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
        "p99<60s",
        "--threshold",
        "duplicates==0",
        "--hdr-log",
        log.to_str().unwrap(),
        "--json",
    ]);
    let r = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(last_line(&out.stderr), "PASS (3 thresholds met)");
    assert_eq!(r["schema"], 1);
    assert_eq!(r["scenario"], "fanout");
    assert_eq!(r["tool"]["name"], "moonx-loadtest");
    assert!(r["started_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r["settings"]["connections"], 20);
    assert_eq!(r["settings"]["rate"], 50);
    assert!(r["settings"].get("jwt_secret").is_none(), "the secret stays out of results");
    assert!(!text(&out.stdout).contains(SECRET));
    assert_eq!(r["verdict"]["pass"], true);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["subscribers"], 20);
    assert_eq!(r["measured"], r["expected_measured"]);
    assert_eq!(r["measured"], 20 * 50 * 2);
    assert_eq!(r["latency"]["count"], r["measured"]);
    assert!(r["server"]["rss_kb"].as_u64().unwrap() > 0);
    assert_eq!(r["server"]["embedded_broker"], false);
    assert!(r["server"]["cpu_clock_resolution_ns"].as_f64().unwrap() > 0.0);
    // Progress lines in every phase.
    let err = text(&out.stderr);
    for phase in ["connect", "warm-up", "measure", "drain"] {
        assert!(err.contains(&format!(" {phase} ")), "no {phase} progress line in {err}");
    }
    // The interval log, read back with HdrHistogram's own reader, adds up
    // to the result's histogram.
    let bytes = std::fs::read(&log).unwrap();
    let mut total: Option<hdrhistogram::Histogram<u64>> = None;
    let mut intervals = 0;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;
    for e in IntervalLogIterator::new(&bytes) {
        if let LogEntry::Interval(i) = e.unwrap() {
            if i.tag().map(|t| t.as_str()) != Some("latency") {
                continue;
            }
            intervals += 1;
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD.decode(i.encoded_histogram()).unwrap();
            let h: hdrhistogram::Histogram<u64> = Deserializer::new().deserialize(&mut &raw[..]).unwrap();
            match total.as_mut() {
                Some(t) => t.add(&h).unwrap(),
                None => total = Some(h),
            }
        }
    }
    assert!(intervals >= 2, "{intervals} latency intervals");
    let total = total.unwrap();
    assert_eq!(total.len(), r["measured"].as_u64().unwrap());
    assert_eq!(total.value_at_quantile(0.99), r["latency"]["p99_us"].as_u64().unwrap());
    assert_eq!(total.max(), r["latency"]["max_us"].as_u64().unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_server_killed_mid_run_fails_the_run() {
    let (_b, brokers) = broker();
    let (mut srv, addr) = server(&brokers, true, &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_moonx-loadtest"))
        .args([
            "fanout",
            "--server",
            &addr.to_string(),
            "--brokers",
            &brokers,
            "--jwt-secret",
            SECRET,
            "-c",
            "20",
            "-r",
            "50",
            "-d",
            "6",
            "--warmup",
            "1",
            "--drain",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server at the first progress line of the measured window.
    let stderr = child.stderr.take().unwrap();
    let reader = common::until_measuring(stderr);
    srv.0.kill().unwrap();
    srv.0.wait().unwrap();
    let out = wait_bounded(child, Duration::from_secs(60));
    let _ = reader.join();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let last = last_line(&out.stdout);
    assert!(last.starts_with("FAIL: "), "{last}");
    assert!(last.contains("20 of 20 subscribers closed unexpectedly"), "{last}");
    assert!(last.contains("lost "), "{last}");
}

#[test]
fn kafka_unreachable_fails_the_run() {
    // The tool's brokers do not answer: nothing can be produced.
    let dead = format!("127.0.0.1:{}", free_port());
    let out = lt(&[
        "fanout",
        "--server",
        "127.0.0.1:9",
        "--brokers",
        &dead,
        "-c",
        "5",
        "-r",
        "10",
        "-d",
        "1",
        "--warmup",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let last = last_line(&out.stdout);
    assert!(last.starts_with("FAIL: Kafka unreachable at --brokers"), "{last}");
    assert!(text(&out.stdout).contains("no samples"));

    // The server's Kafka is unreachable: every update is lost, and no
    // per-delivery CPU figure is made up from zero deliveries.
    let (_b, brokers) = broker();
    let (srv, addr) = server(&dead, false, &[]);
    let pid = srv.0.id().to_string();
    let out = lt(&[
        "fanout",
        "--server",
        &addr.to_string(),
        "--brokers",
        &brokers,
        "--jwt-secret",
        SECRET,
        "-c",
        "10",
        "-r",
        "20",
        "-d",
        "2",
        "--warmup",
        "0",
        "--drain",
        "1",
        "--server-pid",
        &pid,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let r = json_of(&out);
    assert_eq!(r["measured"], 0);
    assert_eq!(r["lost"], r["expected_measured"]);
    assert!(r["lost"].as_u64().unwrap() > 0);
    assert!(r["server"]["cpu_us_per_delivery"].is_null(), "{}", r["server"]);
    assert!(r["latency"]["p99_us"].is_null());
    let last = last_line(&out.stderr);
    assert!(last.contains("nothing was delivered"), "{last}");
    assert_eq!(r["verdict"]["pass"], false);
}

#[test]
fn a_connect_storm_reports_the_servers_cpu_and_its_kafka_clients_part() {
    let (_b, brokers) = broker();
    let (srv, addr) = server(&brokers, true, &[]);
    let pid = srv.0.id().to_string();
    let out = lt(&[
        "connect",
        "--server",
        &addr.to_string(),
        "--jwt-secret",
        SECRET,
        "-c",
        "50",
        "--hold",
        "0",
        "--server-pid",
        &pid,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let s = &json_of(&out)["server"];
    assert_eq!(s["embedded_broker"], false, "{s}");
    let total = s["cpu_us_per_connection"].as_f64().unwrap();
    assert!(total > 0.0, "{s}");
    // The consumer's threads are found by name (librdkafka's), and the
    // mock cluster's are not among them.
    let threads: Vec<&str> =
        s["kafka_client_threads"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(threads.contains(&"rdk:main"), "{threads:?}");
    assert!(threads.iter().all(|t| t.starts_with("rdk:") && *t != "rdk:mock"), "{threads:?}");
    // A part of the server's CPU, read inside the same window.
    let kafka = s["cpu_kafka_client_us_per_connection"].as_f64().unwrap();
    assert!((0.0..=total).contains(&kafka), "{kafka} of {total}");
}

#[test]
fn every_connection_refused_fails_the_run() {
    let (_b, brokers) = broker();
    let (_s, addr) = server(&brokers, false, &[]);
    // Wrong secret: every authentication is refused, with the hint.
    let out =
        lt(&["connect", "--server", &addr.to_string(), "--jwt-secret", "not-the-secret", "-c", "20", "--hold", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let last = last_line(&out.stdout);
    assert!(last.starts_with("FAIL: 20 of 20 connections failed to set up: auth refused"), "{last}");
    assert!(last.contains("must be the server's JWT_SECRET"), "{last}");
    assert!(last.contains("no samples"), "{last}");
    assert!(stdout.contains("total set-up latency: no samples"), "{stdout}");
    assert!(!stdout.contains("0.000 ms"), "a table of zeros: {stdout}");

    // Nothing listens.
    let closed = format!("127.0.0.1:{}", free_port());
    let out = lt(&["connect", "--server", &closed, "-c", "10", "--hold", "0", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r = json_of(&out);
    assert_eq!(r["connections"], 0);
    assert_eq!(r["total"]["count"], 0);
    assert!(r["total"]["p50_us"].is_null());
    let last = last_line(&out.stderr);
    assert!(last.starts_with("FAIL: 10 of 10 connections failed to set up"), "{last}");
    assert!(last.contains("does anything listen"), "{last}");
}

#[test]
fn a_partial_refusal_fails_the_run() {
    let (_b, brokers) = broker();
    let (_s, addr) = server(&brokers, false, &[("WS_MAX_CONNECTIONS", "100")]);
    let out =
        lt(&["connect", "--server", &addr.to_string(), "--jwt-secret", SECRET, "-c", "150", "--hold", "0", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let r = json_of(&out);
    assert_eq!(r["connections"], 100);
    assert_eq!(r["attempted"], 150);
    let failures = r["failures"].as_object().unwrap();
    assert_eq!(failures.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 50);
    assert!(failures.keys().all(|k| k.contains("503")), "{failures:?}");
    let last = last_line(&out.stderr);
    assert!(last.starts_with("FAIL: 50 of 150 connections failed to set up: upgrade refused: HTTP/1.1 503"), "{last}");
    assert_eq!(r["verdict"]["pass"], false);
    assert_eq!(r["total"]["count"], 100, "the 100 set up are still measured");
}

#[test]
fn thresholds_pass_and_fail_and_report_merges_runs() {
    let (_b, brokers) = broker();
    let (_s, addr) = server(&brokers, false, &[]);
    let server = format!("localhost:{}", addr.port());
    let dir = tmp("report");
    let (a_json, b_log) = (dir.join("a.json"), dir.join("b.hlog"));
    let pass = lt(&[
        "connect",
        "--server",
        &server,
        "--jwt-secret",
        SECRET,
        "-c",
        "30",
        "--hold",
        "0",
        "--threshold",
        "p99<60s",
        "--threshold",
        "failed==0",
        "--threshold",
        "connections>=30",
    ]);
    assert_eq!(pass.status.code(), Some(0), "{}", text(&pass.stdout));
    assert_eq!(last_line(&pass.stdout), "PASS (3 thresholds met)");
    let a = lt(&[
        "connect",
        "--server",
        &server,
        "--jwt-secret",
        SECRET,
        "-c",
        "30",
        "--hold",
        "0",
        "--threshold",
        "p99<1us",
        "--json",
    ]);
    assert_eq!(a.status.code(), Some(1));
    let last = last_line(&a.stderr);
    assert!(last.starts_with("FAIL: threshold p99<1us failed: p99 was "), "{last}");
    std::fs::write(&a_json, &a.stdout).unwrap();
    let b = lt(&[
        "connect",
        "--server",
        &server,
        "--jwt-secret",
        SECRET,
        "-c",
        "20",
        "--hold",
        "0",
        "-q",
        "--hdr-log",
        b_log.to_str().unwrap(),
    ]);
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stdout));

    let merged = dir.join("merged.json");
    let plot = dir.join("p.svg");
    let rep = lt(&[
        "report",
        a_json.to_str().unwrap(),
        b_log.to_str().unwrap(),
        "--merged",
        merged.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--threshold",
        "p99<60s",
    ]);
    assert_eq!(rep.status.code(), Some(0), "{}", text(&rep.stderr));
    let table = text(&rep.stdout);
    assert!(table.contains("| a.json | FAIL: threshold p99<1us failed"), "{table}");
    assert!(table.contains("| b.hlog | - | 20 |"), "{table}");
    assert!(table.contains("| **merged** |  | 50 |"), "{table}");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    assert_eq!(m["schema"], 1);
    assert_eq!(m["latency"]["count"], 50);
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    // A threshold on the merge that cannot hold.
    let rep = lt(&["report", a_json.to_str().unwrap(), b_log.to_str().unwrap(), "--threshold", "max<1us"]);
    assert_eq!(rep.status.code(), Some(1));
    assert!(last_line(&rep.stderr).starts_with("FAIL: threshold max<1us failed"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctrl_c_prints_what_was_measured() {
    let (_b, brokers) = broker();
    let (_s, addr) = server(&brokers, false, &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_moonx-loadtest"))
        .args(["connect", "--server", &addr.to_string(), "--jwt-secret", SECRET, "-c", "10", "--hold", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" hold ") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("no hold progress line");
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = wait_bounded(child, Duration::from_secs(30));
    let _ = reader.join();
    assert_eq!(out.status.code(), Some(130));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("connect: 10 of 10 connections set up"), "{stdout}");
    assert!(last_line(&out.stdout).starts_with("FAIL: interrupted (Ctrl-C) in the hold phase"), "{stdout}");
}

#[test]
fn one_deadline_bounds_the_whole_run() {
    // The server consumes from a dead broker, so the drain would wait its
    // full 60 s for updates that never come: the deadline ends it.
    let (_b, brokers) = broker();
    let dead = format!("127.0.0.1:{}", free_port());
    let (_s, addr) = server(&dead, false, &[]);
    let out = lt(&[
        "fanout",
        "--server",
        &addr.to_string(),
        "--brokers",
        &brokers,
        "--jwt-secret",
        SECRET,
        "-c",
        "5",
        "-r",
        "10",
        "-d",
        "2",
        "--warmup",
        "0",
        "--drain",
        "60",
        "--deadline",
        "4",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let r = json_of(&out);
    assert_eq!(r["interrupted"], "deadline");
    assert_eq!(r["subscribers"], 5);
    let last = last_line(&out.stderr);
    assert!(last.starts_with("FAIL: --deadline passed in the drain phase"), "{last}");
}

#[test]
fn meaningless_settings_and_a_dead_server_pid_are_refused() {
    let out = lt(&["fanout", "--brokers", "127.0.0.1:1", "-r", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--rate"), "{}", text(&out.stderr));
    let out = lt(&["connect", "-c", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = lt(&["private", "--brokers", "127.0.0.1:1", "-c", "5", "--per-user", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a multiple"), "{}", text(&out.stderr));
    let out = lt(&["fanout", "--brokers", "127.0.0.1:1", "-d", "10", "--deadline", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--deadline"), "{}", text(&out.stderr));
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id().to_string();
    gone.wait().unwrap();
    let out = lt(&["connect", "--server-pid", &pid, "-c", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no live process"), "{}", text(&out.stderr));
    let out = lt(&["connect", "--server", "no-port-here", "-c", "1"]);
    assert_eq!(out.status.code(), Some(2));
    // --help states the defaults that apply.
    let help = text(&lt(&["churn", "--help"]).stdout);
    let churn_rate = &help[help.find("--churn-rate").expect("--churn-rate in churn --help")..];
    let default = &churn_rate[churn_rate.find("[default: ").unwrap()..];
    assert!(default.starts_with("[default: 100]"), "{help}");
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("must be the server's JWT_SECRET"), "{help}");
}
