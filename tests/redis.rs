//! Redis (PROTOCOL.md §1, §7, §8): several instances sharing a real
//! `redis-server` (started here on a free port) act as one service; Redis
//! outages and pauses degrade to local limits and recover by themselves.
//! The cluster-wide checks are in `redis_checks/` (run on Redis Cluster
//! too, by `redis_cluster.rs`).

mod common;
mod redis_checks;

use std::time::Duration;

use common::redis_servers::{wait_until, Redis};
use common::*;
use redis_checks::{instance, redis_up, upgrade_status, Backend};
use serde_json::json;

#[test]
fn per_ip_limit_holds_across_instances() {
    redis_checks::per_ip_limit_holds_across_instances(&Backend::Single(Redis::start()));
}

#[test]
fn per_user_message_limit_holds_across_instances() {
    redis_checks::per_user_message_limit_holds_across_instances(&Backend::Single(Redis::start()));
}

#[test]
fn connections_endpoint_shows_the_cluster_and_dead_instances_expire() {
    redis_checks::connections_endpoint_shows_the_cluster_and_dead_instances_expire(&Backend::Single(Redis::start()));
}

#[test]
fn a_dead_instances_ip_count_is_dropped() {
    redis_checks::a_dead_instances_ip_count_is_dropped(&Backend::Single(Redis::start()));
}

#[test]
fn redis_outage_degrades_to_local_limits_and_recovers() {
    let mut redis = Redis::start();
    let a = instance(&redis.url(), &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")]);
    let b = instance(&redis.url(), &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")]);
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
    let a = instance(&redis.url(), &[]);
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
