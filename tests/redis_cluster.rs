//! Redis Cluster (`REDIS_URL=redis+cluster://...`): three primaries with a
//! replica each, real `redis-server --cluster-enabled` processes joined
//! here. The instances share limits and the registry exactly as on one
//! node (the same checks as `redis.rs`, the same key names), and a
//! primary's failover is ridden out like an outage.

mod common;
mod redis_checks;

use std::time::Duration;

use common::redis_servers::{wait_until, RedisCluster};
use common::*;
use redis_checks::{instance, redis_up, upgrade_status, Backend};
use serde_json::json;

#[test]
fn per_ip_limit_holds_across_instances() {
    redis_checks::per_ip_limit_holds_across_instances(&Backend::Cluster(RedisCluster::start()));
}

#[test]
fn per_user_message_limit_holds_across_instances() {
    redis_checks::per_user_message_limit_holds_across_instances(&Backend::Cluster(RedisCluster::start()));
}

#[test]
fn connections_endpoint_shows_the_cluster_and_dead_instances_expire() {
    redis_checks::connections_endpoint_shows_the_cluster_and_dead_instances_expire(&Backend::Cluster(
        RedisCluster::start(),
    ));
}

#[test]
fn a_dead_instances_ip_count_is_dropped() {
    redis_checks::a_dead_instances_ip_count_is_dropped(&Backend::Cluster(RedisCluster::start()));
}

#[test]
fn a_primary_failover_is_ridden_out_and_counting_resumes() {
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let a = instance(&url, &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")]);
    let b = instance(&url, &[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2")]);
    let mut on_a = authed(a.addr, "fo-a");
    let _on_b = authed(b.addr, "fo-b");
    assert!(wait_until(Duration::from_secs(5), || upgrade_status(&a) == 429), "cluster-wide count before");

    // Kill the primary that holds this IP's count; its replica takes over.
    let key = "moonx:ws:ip:127.0.0.1";
    let killed = cluster.primary_of(key).expect("a primary holds the key's slot");
    cluster.kill(killed);
    // Still serving meanwhile: messages and updates never wait for Redis.
    subscribe(&mut on_a, "prices");
    for i in 0..20 {
        send(&mut on_a, json!({"type":"ping"}));
        assert_eq!(recv(&mut on_a)["type"], "pong");
        a.handle().publisher().publish_data(
            moonx_ws::shard::inbox::Route::Prices,
            0,
            format!(r#"{{"token":"F","chainId":1,"i":{i}}}"#).as_bytes(),
        );
        assert_eq!(recv(&mut on_a)["data"]["i"], i);
    }
    assert!(
        wait_until(Duration::from_secs(30), || cluster.primary_of(key).is_some_and(|p| p != killed)),
        "the replica was promoted: the slot has a live primary again; {}",
        cluster
            .nodes
            .iter()
            .find(|n| n.port != cluster.nodes[killed].port)
            .map(|n| n.query::<String>(redis::cmd("CLUSTER").arg("NODES")))
            .unwrap_or_default()
    );
    assert!(cluster.wait_ok(Duration::from_secs(30)), "the cluster is whole again");

    assert!(wait_until(Duration::from_secs(20), || redis_up(&a) && redis_up(&b)), "both instances see Redis again");
    assert!(wait_until(Duration::from_secs(10), || get_json(a.addr, "/health")["status"] == "healthy"));
    // Heartbeats rewrite the counts: the cluster-wide limit holds again.
    assert!(wait_until(Duration::from_secs(10), || upgrade_status(&b) == 429), "B sees A's connection again");
    assert!(wait_until(Duration::from_secs(10), || upgrade_status(&a) == 429), "A sees B's connection again");
    let fields: Vec<String> = cluster.query(redis::cmd("HKEYS").arg(key));
    assert_eq!(fields.len(), 2, "both instances' counts, on the new primary: {fields:?}");
}
