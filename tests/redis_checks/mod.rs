//! The cluster-wide checks, run against one `redis-server` (`tests/redis.rs`)
//! and against a Redis Cluster (`tests/redis_cluster.rs`): the same
//! behaviour, and the same documented key names, on both.

#![allow(dead_code)]

use std::time::Duration;

use super::common::redis_servers::{wait_until, Redis, RedisCluster};
use super::common::*;
use serde_json::json;

/// Where the instances' Redis is.
pub enum Backend {
    Single(Redis),
    Cluster(RedisCluster),
}

impl Backend {
    pub fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c) => c.url(),
        }
    }

    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        match self {
            Backend::Single(r) => r.query(cmd),
            Backend::Cluster(c) => c.query(cmd),
        }
    }

    /// Keys matching `pattern` (on every primary of a cluster).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self {
            Backend::Single(r) => r.query(redis::cmd("KEYS").arg(pattern)),
            Backend::Cluster(c) => c.keys(pattern),
        }
    }
}

/// An in-process instance on Redis at `url`, once it sees Redis.
pub fn instance(url: &str, extra: &[(&str, &str)]) -> TestServer {
    instance_on(url, extra, moonx_ws::clock::Clock::system())
}

pub fn instance_on(url: &str, extra: &[(&str, &str)], clock: moonx_ws::clock::Clock) -> TestServer {
    let mut env = vec![
        ("REDIS_URL", url),
        ("REDIS_SYNC_INTERVAL_MS", "50"),
        ("REDIS_TIMEOUT_MS", "200"),
        ("WS_HEARTBEAT_INTERVAL", "300"),
    ];
    env.extend_from_slice(extra);
    let srv = TestServer::start_with_clock(&env, clock);
    assert!(
        wait_until(Duration::from_secs(10), || redis_up(&srv)),
        "instance sees redis: {}",
        get_json(srv.addr, "/health")
    );
    srv
}

pub fn redis_up(srv: &TestServer) -> bool {
    get_json(srv.addr, "/health")["services"]["redis"] == true
}

pub fn upgrade_status(srv: &TestServer) -> u16 {
    http(srv.addr, &upgrade_request("")).0
}

pub fn per_ip_limit_holds_across_instances(redis: &Backend) {
    let a = instance(&redis.url(), &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "3")]);
    let b = instance(&redis.url(), &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "3")]);
    let mut open = vec![connect(a.addr), connect(a.addr), connect(b.addr)];
    assert_eq!(upgrade_status(&a), 429, "4th connection from this IP, on A");
    assert_eq!(upgrade_status(&b), 429, "4th connection from this IP, on B");
    let mut first = open.remove(0);
    first.close(None).unwrap();
    let _ = first.read();
    // The slot is released cluster-wide; B admits again (bounded retries).
    let mut kept = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || match connect_with(b.addr, &[]) {
        Ok(ws) => {
            kept.push(ws);
            true
        }
        Err(_) => false,
    }));
    assert_eq!(upgrade_status(&a), 429);
    assert_eq!(redis.keys("moonx:ws:ip:*"), ["moonx:ws:ip:127.0.0.1"], "documented key names");
}

pub fn per_user_message_limit_holds_across_instances(redis: &Backend) {
    // Both instances on one clock held at the start of the current window:
    // the whole test happens inside it, however long it takes.
    let window = moonx_ws::limits::WINDOW_MS;
    let start = now_secs() * 1000 / window * window;
    let clock = moonx_ws::clock::Clock::held_at(start);
    let limit = [("RATE_LIMIT_MAX_MESSAGES_PER_MINUTE", "10")];
    let a = instance_on(&redis.url(), &limit, clock.clone());
    let b = instance_on(&redis.url(), &limit, clock.clone());
    let mut on_a = authed(a.addr, "shared-user"); // 1 (authenticate)
    for _ in 0..6 {
        send(&mut on_a, json!({"type":"ping"}));
        assert_eq!(recv(&mut on_a)["type"], "pong"); // 2..=7
    }
    let key = format!("moonx:ws:ratelimit:shared-user:{}", start / window);
    let count = |r: &Backend| r.query::<Option<u32>>(redis::cmd("GET").arg(&key)).unwrap_or(0);
    assert!(wait_until(Duration::from_secs(5), || count(redis) == 7), "A reconciled its 7 messages");
    let mut on_b = authed(b.addr, "shared-user"); // 8
    assert!(wait_until(Duration::from_secs(5), || count(redis) == 8), "B reconciled (and learned A's count)");
    for _ in 0..2 {
        send(&mut on_b, json!({"type":"ping"}));
        assert_eq!(recv(&mut on_b)["type"], "pong"); // 9, 10
    }
    send(&mut on_b, json!({"id":"over","type":"ping"}));
    let limited = recv(&mut on_b);
    assert_eq!(limited["data"]["code"], "rate_limited", "11th message in the cluster: {limited}");
    assert_eq!(limited["data"]["retryAfterMs"], window, "the window just began");
    // The next window starts afresh on both instances.
    clock.set_epoch_ms(start + window);
    send(&mut on_a, json!({"type":"ping"}));
    assert_eq!(recv(&mut on_a)["type"], "pong", "a new window: allowed again");
    send(&mut on_b, json!({"type":"ping"}));
    assert_eq!(recv(&mut on_b)["type"], "pong");
}

pub fn connections_endpoint_shows_the_cluster_and_dead_instances_expire(redis: &Backend) {
    let a = instance(&redis.url(), &[]);
    let mut ws = authed(a.addr, "viewer");
    subscribe(&mut ws, "prices");
    let _anon = connect(a.addr);

    // A second instance as a separate process, to be killed without cleanup.
    let url = redis.url();
    let (mut b, b_addr) = spawn_server(&[
        ("JWT_SECRET", SECRET),
        ("DEMO_FEED", "false"),
        ("REDIS_URL", url.as_str()),
        ("REDIS_SYNC_INTERVAL_MS", "50"),
        ("WS_HEARTBEAT_INTERVAL", "300"),
        ("LOG_LEVEL", "warn"),
    ]);
    let _on_b = authed(b_addr, "other");

    let cluster = |srv: &TestServer| get_json(srv.addr, "/connections")["cluster"].clone();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let c = cluster(&a);
            c["instances"].as_array().is_some_and(|i| i.len() == 2) && c["total"] == 3 && c["authenticated"] == 2
        }),
        "{}",
        cluster(&a)
    );
    assert_eq!(cluster(&a)["channels"]["prices"], 1);
    assert_eq!(redis.keys("moonx:ws:connections:*").len(), 2, "one registry hash per instance");
    assert_eq!(redis.keys("moonx:ws:instance:*").len(), 2, "one summary per instance");

    let _ = b.kill();
    let _ = b.wait();
    assert!(
        wait_until(Duration::from_secs(5), || cluster(&a)["instances"].as_array().is_some_and(|i| i.len() == 1)),
        "the dead instance leaves the view within three heartbeats"
    );
    assert!(wait_until(Duration::from_secs(5), || redis.keys("moonx:ws:connections:*").len() == 1));
    assert_eq!(cluster(&a)["total"], 2);
}

/// A dead instance's per-IP count stops counting once its heartbeat is
/// three intervals old: the admitting script is told which instances are
/// dead and drops their fields.
pub fn a_dead_instances_ip_count_is_dropped(redis: &Backend) {
    let (mut b, b_addr) = spawn_server(&[
        ("JWT_SECRET", SECRET),
        ("DEMO_FEED", "false"),
        ("REDIS_URL", redis.url().as_str()),
        ("REDIS_SYNC_INTERVAL_MS", "50"),
        ("WS_HEARTBEAT_INTERVAL", "300"),
        ("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2"),
        ("LOG_LEVEL", "warn"),
    ]);
    let _held = [connect(b_addr), connect(b_addr)];
    let a = instance(&redis.url(), &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")]);
    assert!(wait_until(Duration::from_secs(5), || upgrade_status(&a) == 429), "B's two connections count on A");
    let _ = b.kill();
    let _ = b.wait();
    // B's heartbeat ages past 3 x 300 ms; A's next admission drops its count.
    let mut kept = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || match connect_with(a.addr, &[]) {
            Ok(ws) => {
                kept.push(ws);
                true
            }
            Err(_) => false,
        }),
        "a dead instance's connections stop counting"
    );
    let fields: Vec<String> = redis.query(redis::cmd("HKEYS").arg("moonx:ws:ip:127.0.0.1"));
    assert_eq!(fields.len(), 1, "only A's field is left: {fields:?}");
}
