//! The `resume` scenario end to end: the real `moonx-ws`, a real
//! Kafka-protocol broker (`moonx-loadtest broker`) and `moonx-loadtest
//! resume` run as a process against them over loopback. Small sizes, a few
//! seconds, every wait bounded.

mod common;

use common::*;

#[test]
fn private_updates_arrive_once_across_the_drop_and_the_replays_reads_are_counted() {
    let (_b, brokers) = broker();
    let (srv, addr) = server(&brokers, true, &[]);
    let pid = srv.0.id().to_string();
    let out = lt(&[
        "resume",
        "--server",
        &addr.to_string(),
        "--brokers",
        &brokers,
        "--jwt-secret",
        SECRET,
        "-c",
        "50",
        "--observers",
        "10",
        "-r",
        "200",
        "--price-rate",
        "50",
        "--warmup",
        "1",
        "--baseline",
        "2",
        "--away",
        "1",
        "--after",
        "1",
        "--drain",
        "10",
        "--server-pid",
        &pid,
        "--threshold",
        "lost==0",
        "--threshold",
        "not_recovered==0",
        "--threshold",
        "p99_ratio<1000",
        "--json",
    ]);
    let r = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(last_line(&out.stderr), "PASS (3 thresholds met)");
    assert_eq!(r["scenario"], "resume");
    assert_eq!(
        (r["users"].clone(), r["observers"].clone(), r["connections"].clone()),
        (50.into(), 10.into(), 60.into())
    );
    // Every user resumed from its position and got what it missed.
    let resume = &r["resume"];
    for (k, v) in [("resumes", 50), ("recovered", 50), ("not_recovered", 0), ("without_since", 0), ("failed", 0)] {
        assert_eq!(resume[k], v, "resume.{k}: {resume}");
    }
    let missed = resume["missed"].as_u64().unwrap();
    // About 200 (a second away at 200/s), but how many depends on the
    // timing of the drop and the producer's pace: only that some were.
    assert!(missed > 0, "updates produced while away: {resume}");
    assert_eq!(resume["replayed_received"], missed);
    assert!(resume["recover_all_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(resume["recover"]["count"], 50);
    // The server's counters: what it replayed is what the clients counted.
    let replay = &r["replay"];
    assert_eq!(replay["server_replayed"], missed, "{replay}");
    assert_eq!(replay["outcomes"]["recovered"], 50, "{replay}");
    assert!(replay["read_for_replays"].as_u64().unwrap() >= missed, "{replay}");
    assert!(replay["replayed_range"].as_u64().unwrap() >= missed, "{replay}");
    assert!(replay["read_ratio"].as_f64().unwrap() > 0.0, "{replay}");
    assert!(replay["metrics_error"].is_null());
    // Across both connections: every update once, in order, only one's own.
    let private = &r["private"];
    for k in ["lost", "duplicates", "gaps", "misrouted", "users_short"] {
        assert_eq!(private[k], 0, "private.{k}: {private}");
    }
    assert_eq!(private["received"], private["produced"], "every user was followed: {private}");
    let prices = &r["prices"];
    assert_eq!(prices["lost"], 0, "{prices}");
    assert!(prices["baseline"]["count"].as_u64().unwrap() > 0 && prices["storm"]["count"].as_u64().unwrap() > 0);
    assert!(prices["p99_ratio"].as_f64().is_some(), "{prices}");
    assert_eq!(r["latency"], prices["storm"]);
    assert!(r["server"]["cpu_utilisation_storm"].as_f64().is_some(), "{}", r["server"]);
    let err = text(&out.stderr);
    for phase in ["connect", "warm-up", "baseline", "away", "reconnect", "after", "drain"] {
        assert!(err.contains(&format!(" {phase} ")), "no {phase} progress line in {err}");
    }
}

#[test]
fn meaningless_resume_settings_are_refused() {
    let refused = |args: &[&str], says: &str| {
        let mut all = vec!["resume", "--brokers", "127.0.0.1:1"];
        all.extend_from_slice(args);
        let out = lt(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: {}", text(&out.stderr));
    };
    refused(&["-r", "100", "--warmup", "0", "--baseline", "10"], "each needs one to resume from");
    refused(&["--baseline", "10", "--deadline", "12"], "--deadline");
    refused(&["--observers", "0"], "--observers");
    let help = text(&lt(&["resume", "--help"]).stdout);
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for default in ["they drop together, then resume [default: 5000]", "[default: 1000]", "[default: 2000]"] {
        assert!(flat.contains(default), "{default} not in {help}");
    }
}
