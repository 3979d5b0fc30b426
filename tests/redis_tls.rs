//! Managed-Redis connections: `rediss://` to a real `redis-server` with a
//! TLS port (its certificates generated here, signed by a private CA given
//! with REDIS_TLS_CA_FILE), logging in as an ACL user from the URL; and
//! what an operator sees when that goes wrong (an untrusted certificate, a
//! wrong password, TLS to a plaintext port): `/health` degraded with the
//! reason and never the password, one error line, service going on.

mod common;
mod redis_checks;

use std::time::Duration;

use common::redis_servers::{wait_until, Pki, Redis};
use common::*;
use redis_checks::{instance_on, upgrade_status};
use serde_json::{json, Value};

const ACL_PASSWORD: &str = "acl-pw-7f3e9a";

/// A TLS `redis-server` with an ACL user `moonx` that may touch only the
/// service's keys.
fn tls_redis(pki: &Pki) -> Redis {
    let redis = Redis::start_tls(pki);
    let _: () = redis.query(
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("moonx")
            .arg("on")
            .arg(format!(">{ACL_PASSWORD}"))
            .arg("~moonx:ws:*")
            .arg("+@all"),
    );
    redis
}

fn tls_url(redis: &Redis, password: &str) -> String {
    format!("rediss://moonx:{password}@127.0.0.1:{}/", redis.tls_port.unwrap())
}

fn reasons(h: &Value) -> String {
    h["reasons"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" | "))
        .unwrap_or_default()
}

#[test]
fn rediss_with_an_acl_user_and_a_private_ca() {
    let pki = Pki::new("redis-tls");
    let redis = tls_redis(&pki);
    let url = tls_url(&redis, ACL_PASSWORD);
    let ca = Pki::path(&pki.ca);
    let env = [("REDIS_TLS_CA_FILE", ca), ("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")];
    let a = instance_on(&url, &env, moonx_ws::clock::Clock::system());
    let b = instance_on(&url, &env, moonx_ws::clock::Clock::system());
    assert_eq!(get_json(a.addr, "/health")["status"], "healthy");
    let _held = [authed(a.addr, "t1"), authed(b.addr, "t2")];
    assert!(
        wait_until(Duration::from_secs(5), || upgrade_status(&a) == 429),
        "the per-IP limit holds across instances"
    );
    // Over TLS, as the ACL user.
    let clients: String = redis.query(redis::cmd("CLIENT").arg("LIST"));
    let tls_port = format!("laddr=127.0.0.1:{}", redis.tls_port.unwrap());
    assert!(
        clients.lines().any(|l| l.contains("user=moonx") && l.contains(&tls_port)),
        "the instances log in as `moonx` on the TLS port:\n{clients}"
    );
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*"));
    assert!(keys.iter().all(|k| k.starts_with("moonx:ws:")), "only keys the ACL allows: {keys:?}");
    assert!(keys.contains(&"moonx:ws:ip:127.0.0.1".to_string()), "{keys:?}");
}

#[test]
fn an_untrusted_certificate_degrades_health_with_the_reason_and_serving_goes_on() {
    let pki = Pki::new("redis-untrusted");
    let redis = tls_redis(&pki);
    // No REDIS_TLS_CA_FILE: the system's trust store does not know the test CA.
    let srv = TestServer::start(&[("REDIS_URL", &tls_url(&redis, ACL_PASSWORD))]);
    assert!(
        wait_until(Duration::from_secs(10), || reasons(&get_json(srv.addr, "/health")).contains("TLS failed")),
        "{}",
        get_json(srv.addr, "/health")
    );
    let h = get_json(srv.addr, "/health");
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["services"]["redis"], false);
    let why = reasons(&h);
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert!(!h.to_string().contains(ACL_PASSWORD), "{h}");
    // Still serving, on local counts.
    let mut ws = authed(srv.addr, "u");
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong");
}

#[test]
fn tls_to_a_plaintext_port_degrades_health_with_the_reason() {
    let pki = Pki::new("redis-plain-port");
    let redis = tls_redis(&pki);
    let url = format!("rediss://moonx:{ACL_PASSWORD}@127.0.0.1:{}/", redis.port);
    let srv = TestServer::start(&[("REDIS_URL", &url), ("REDIS_TLS_CA_FILE", Pki::path(&pki.ca))]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let h = get_json(srv.addr, "/health");
            h["status"] == "degraded" && reasons(&h).contains("redis: not answering (")
        }),
        "{}",
        get_json(srv.addr, "/health")
    );
    let h = get_json(srv.addr, "/health");
    assert!(!h.to_string().contains(ACL_PASSWORD), "{h}");
}

#[test]
fn a_wrong_password_is_an_error_logged_once_and_never_shown() {
    let pki = Pki::new("redis-wrongpass");
    let redis = tls_redis(&pki);
    let wrong = "wrong-pw-5c1d";
    let url = tls_url(&redis, wrong);
    let log = test_file("redis-wrongpass.log");
    let (_srv, addr) = spawn_server_logged(
        &[
            ("JWT_SECRET", SECRET),
            ("DEMO_FEED", "false"),
            ("REDIS_URL", url.as_str()),
            ("REDIS_TLS_CA_FILE", Pki::path(&pki.ca)),
            ("REDIS_SYNC_INTERVAL_MS", "50"),
            ("LOG_FORMAT", "json"),
            ("LOG_LEVEL", "info"),
        ],
        &log,
    );
    assert!(
        wait_until(Duration::from_secs(10), || reasons(&get_json(addr, "/health")).contains("authentication failed")),
        "{}",
        get_json(addr, "/health")
    );
    let h = get_json(addr, "/health");
    assert_eq!(h["status"], "degraded");
    assert!(!h.to_string().contains(wrong), "{h}");
    let line = wait_for_log(&log, "the refusal at error", |l| {
        l["level"] == "ERROR" && l["message"].as_str().is_some_and(|m| m.contains("redis refused"))
    });
    assert!(line["error"].as_str().is_some_and(|e| e.contains("authentication failed")), "{line}");
    // ~40 more refused rounds at 50 ms: no new error line (rate-limited).
    std::thread::sleep(Duration::from_secs(2));
    let errors = log_lines(&log).iter().filter(|l| l["level"] == "ERROR").count();
    assert_eq!(errors, 1, "one error line, then rate-limited");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(wrong), "the password never reaches the log");
    // Still serving.
    let mut ws = authed(addr, "u");
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong");
}

#[test]
fn help_shows_no_secret_from_the_environment() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moonx-ws"))
        .arg("--help")
        .env_clear()
        .env("REDIS_URL", "rediss://u:help-pw-1@example:6380/")
        .env("KAFKA_SASL_PASSWORD", "help-pw-2")
        .env("KAFKA_SSL_KEY_PASSWORD", "help-pw-3")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("KAFKA_SASL_PASSWORD") && text.contains("REDIS_URL"), "{text}");
    for secret in ["help-pw-1", "help-pw-2", "help-pw-3"] {
        assert!(!text.contains(secret), "--help shows {secret}");
    }
}
