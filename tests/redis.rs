//! Redis (PROTOCOL.md §1, §7, §8): several instances sharing a real
//! `redis-server` (started here on a free port) act as one service; Redis
//! outages and pauses degrade to local limits and recover by themselves.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = Redis { port, child: None };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (.ci/run installs it)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()),
            "redis-server did not start"
        );
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill").arg(sig).arg(pid.to_string()).status().unwrap().success());
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2)).unwrap();
        cmd.query(&mut c).unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
        }
        self.kill();
    }
}

/// Polls `f` every 20 ms until it is true or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn instance(redis: &Redis, extra: &[(&str, &str)]) -> TestServer {
    instance_on(redis, extra, moonx_ws::clock::Clock::system())
}

fn instance_on(redis: &Redis, extra: &[(&str, &str)], clock: moonx_ws::clock::Clock) -> TestServer {
    let url = redis.url();
    let mut env = vec![
        ("REDIS_URL", url.as_str()),
        ("REDIS_SYNC_INTERVAL_MS", "50"),
        ("REDIS_TIMEOUT_MS", "200"),
        ("WS_HEARTBEAT_INTERVAL", "300"),
    ];
    env.extend_from_slice(extra);
    let srv = TestServer::start_with_clock(&env, clock);
    assert!(wait_until(Duration::from_secs(10), || redis_up(&srv)), "instance sees redis");
    srv
}

fn redis_up(srv: &TestServer) -> bool {
    get_json(srv.addr, "/health")["services"]["redis"] == true
}

fn upgrade_status(srv: &TestServer) -> u16 {
    http(srv.addr, &upgrade_request("")).0
}

#[test]
fn per_ip_limit_holds_across_instances() {
    let redis = Redis::start();
    let a = instance(&redis, &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "3")]);
    let b = instance(&redis, &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "3")]);
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
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("moonx:ws:ip:*"));
    assert_eq!(keys, ["moonx:ws:ip:127.0.0.1"], "documented key names");
}

#[test]
fn per_user_message_limit_holds_across_instances() {
    // Both instances on one clock held at the start of the current window:
    // the whole test happens inside it, however long it takes.
    let window = moonx_ws::limits::WINDOW_MS;
    let start = now_secs() * 1000 / window * window;
    let clock = moonx_ws::clock::Clock::held_at(start);
    let redis = Redis::start();
    let limit = [("RATE_LIMIT_MAX_MESSAGES_PER_MINUTE", "10")];
    let a = instance_on(&redis, &limit, clock.clone());
    let b = instance_on(&redis, &limit, clock.clone());
    let mut on_a = authed(a.addr, "shared-user"); // 1 (authenticate)
    for _ in 0..6 {
        send(&mut on_a, json!({"type":"ping"}));
        assert_eq!(recv(&mut on_a)["type"], "pong"); // 2..=7
    }
    let key = format!("moonx:ws:ratelimit:shared-user:{}", start / window);
    let count = |r: &Redis| r.query::<Option<u32>>(redis::cmd("GET").arg(&key)).unwrap_or(0);
    assert!(wait_until(Duration::from_secs(5), || count(&redis) == 7), "A reconciled its 7 messages");
    let mut on_b = authed(b.addr, "shared-user"); // 8
    assert!(wait_until(Duration::from_secs(5), || count(&redis) == 8), "B reconciled (and learned A's count)");
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

#[test]
fn connections_endpoint_shows_the_cluster_and_dead_instances_expire() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
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
    let records: u32 =
        redis.query(redis::cmd("EVAL").arg("return #redis.call('KEYS', ARGV[1])").arg(0).arg("moonx:ws:connections:*"));
    assert_eq!(records, 2, "one registry hash per instance");

    let _ = b.kill();
    let _ = b.wait();
    assert!(
        wait_until(Duration::from_secs(5), || cluster(&a)["instances"].as_array().is_some_and(|i| i.len() == 1)),
        "the dead instance leaves the view within three heartbeats"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        redis.query::<u32>(
            redis::cmd("EVAL").arg("return #redis.call('KEYS', ARGV[1])").arg(0).arg("moonx:ws:connections:*"),
        ) == 1
    }));
    assert_eq!(cluster(&a)["total"], 2);
}

#[test]
fn redis_outage_degrades_to_local_limits_and_recovers() {
    let mut redis = Redis::start();
    let a = instance(&redis, &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")]);
    let b = instance(&redis, &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")]);
    assert_eq!(get_json(a.addr, "/health")["status"], "healthy");

    redis.kill();
    assert!(wait_until(Duration::from_secs(5), || {
        let h = get_json(a.addr, "/health");
        h["status"] == "degraded" && h["services"]["redis"] == false
    }));
    // Still serving, with the limit enforced on local counts.
    let mut held = vec![authed(a.addr, "o1"), authed(a.addr, "o2")];
    assert_eq!(upgrade_status(&a), 429, "local per-IP limit during the outage");
    // Updates keep flowing: Redis is not on the fan-out path.
    subscribe(&mut held[1], "prices");
    for i in 0..50 {
        a.handle().publisher().publish_data(
            moonx_ws::shard::inbox::Route::Prices,
            0,
            format!(r#"{{"token":"R","chainId":1,"i":{i}}}"#).as_bytes(),
        );
    }
    for i in 0..50 {
        assert_eq!(recv(&mut held[1])["data"]["i"], i);
    }
    held.push(authed(b.addr, "o3"));
    send(&mut held[0], json!({"type":"ping"}));
    assert_eq!(recv(&mut held[0])["type"], "pong");
    assert!(metric(a.addr, "moonx_ws_redis_fallbacks_total") >= 2.0);

    redis.spawn();
    assert!(wait_until(Duration::from_secs(10), || redis_up(&a) && redis_up(&b)), "reconnects by itself");
    assert_eq!(get_json(a.addr, "/health")["status"], "healthy");
    // Heartbeats rewrite the counts taken during the outage: cluster-wide again.
    assert!(wait_until(Duration::from_secs(5), || upgrade_status(&b) == 429), "B sees A's connections again");
}

#[test]
fn paused_redis_never_blocks_new_connections() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut before = authed(a.addr, "before-pause");
    subscribe(&mut before, "prices");
    redis.signal("-STOP");
    // The upgrade waits at most REDIS_TIMEOUT_MS for Redis, then counts locally.
    let mut ws = authed(a.addr, "paused");
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong");
    // Messages and updates never wait for Redis.
    for i in 0..20 {
        send(&mut ws, json!({"type":"ping"}));
        assert_eq!(recv(&mut ws)["type"], "pong");
        a.handle().publisher().publish_data(
            moonx_ws::shard::inbox::Route::Prices,
            0,
            format!(r#"{{"token":"P","chainId":1,"i":{i}}}"#).as_bytes(),
        );
        assert_eq!(recv(&mut before)["data"]["i"], i);
    }
    assert!(wait_until(Duration::from_secs(10), || get_json(a.addr, "/health")["status"] == "degraded"));
    redis.signal("-CONT");
    assert!(wait_until(Duration::from_secs(10), || get_json(a.addr, "/health")["status"] == "healthy"));
}
