//! The HTTP endpoints on the WebSocket port (PROTOCOL.md §8).
//!
//! Owns: `/health`, `/health/live`, `/health/ready`, `/metrics`,
//! `/connections`, `/docs`, `/snapshot/<channel>` and the JSON 404. Every endpoint reads shared,
//! per-shard state (summed here, on the shard that serves the request); none
//! of them touches another shard's connections.

pub mod docs;

use std::sync::Arc;

use serde_json::json;

use crate::global::Global;
use crate::protocol::channel::ChannelName;
use crate::protocol::handshake::{write_refusal, write_response, Refusal, RequestHead};
use crate::protocol::message::Channel;
use crate::shard::inbox::Update;
use crate::telemetry::{describe_shards, total, Exposition};

/// Where `GET /snapshot/<channel>` reads last values: the serving shard's
/// table (the same on every shard), newest first, at most `max`.
pub type Snapshots<'a> = &'a dyn Fn(&ChannelName, usize) -> Vec<Arc<Update>>;

/// Writes the response to an HTTP (non-upgrade) request.
pub fn respond(head: &RequestHead, g: &Global, snapshots: Snapshots<'_>, out: &mut Vec<u8>) {
    if head.method != "GET" && head.method != "HEAD" {
        return write_refusal(Refusal::new(404, "not found"), out);
    }
    if let Some(channel) = head.path.strip_prefix("/snapshot/") {
        return snapshot(channel, g, snapshots, out);
    }
    match head.path.as_str() {
        "/health" => health(g, out),
        "/health/live" => json_response(200, &json!({ "status": "alive" }), out),
        "/health/ready" => {
            let ready = g.is_ready();
            let status = if ready { 200 } else { 503 };
            json_response(status, &json!({ "status": if ready { "ready" } else { "not_ready" } }), out)
        }
        "/metrics" => {
            let body = metrics(g);
            write_response(200, "text/plain; version=0.0.4", &[], body.as_bytes(), out)
        }
        "/connections" => connections(g, out),
        "/docs" | "/docs/" => write_response(200, "text/html; charset=utf-8", &[], g.docs_html.as_bytes(), out),
        _ => write_refusal(Refusal::new(404, "not found"), out),
    }
}

/// `GET /snapshot/<channel>` (PROTOCOL.md §11): the last `price_update`
/// envelopes of a market or a chain, newest first; 404 for any other name.
fn snapshot(channel: &str, g: &Global, snapshots: Snapshots<'_>, out: &mut Vec<u8>) {
    // A client may escape the colons (`prices%3A8453%3AETH`).
    let channel = channel.replace("%3A", ":").replace("%3a", ":");
    let name = ChannelName::parse(&channel).filter(|n| matches!(n, ChannelName::Market(_) | ChannelName::Chain(_)));
    let Some(name) = name else {
        let body = json!({ "error": "not_found", "message": "expected /snapshot/prices:<chainId> or /snapshot/prices:<chainId>:<token>" });
        return json_response(404, &body, out);
    };
    let updates = snapshots(&name, g.config.ws_snapshot_max_markets.get());
    let mut body = Vec::with_capacity(2 + updates.iter().map(|u| u.frame.len() + 1).sum::<usize>());
    body.push(b'[');
    for (i, u) in updates.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(u.json());
    }
    body.push(b']');
    write_response(200, "application/json", &[], &body, out)
}

/// The `/metrics` page: every owner describes its own figures through the
/// one writer.
fn metrics(g: &Global) -> String {
    let dropped: Vec<u64> = (0..g.publisher.shard_count()).map(|i| g.publisher.inbox(i).dropped()).collect();
    let mut e = Exposition::new();
    describe_shards(&g.stats, &dropped, &mut e);
    g.ingest.describe(&mut e);
    let sum = |f: fn(&crate::telemetry::ShardStats) -> u64| g.stats.iter().map(|s| f(s)).sum::<u64>();
    g.recovery.describe(
        &mut e,
        [
            sum(|s| s.recoveries_overflowed.get()),
            sum(|s| s.recoveries_abandoned.get()),
            sum(|s| s.recoveries_in_flight.get()),
        ],
    );
    if let Some(cluster) = &g.cluster {
        cluster.describe(&mut e);
    }
    e.finish()
}

fn json_response(status: u16, body: &serde_json::Value, out: &mut Vec<u8>) {
    write_response(status, "application/json", &[], body.to_string().as_bytes(), out)
}

fn health(g: &Global, out: &mut Vec<u8>) {
    let stats = &g.stats;
    let auth = g.auth.is_reachable();
    let redis = g.cluster.as_ref().is_none_or(|c| c.is_up());
    let kafka = g.ingest.broker_up.load(std::sync::atomic::Ordering::Relaxed);
    let stuck = g.ingest.stuck.load(std::sync::atomic::Ordering::Relaxed);
    // Why the instance is degraded, for the operator reading it.
    let mut reasons: Vec<String> = Vec::new();
    if !kafka {
        reasons.push("kafka: no broker connection is up (librdkafka keeps reconnecting)".into());
    }
    if let Some(refused) = g.ingest.refused.lock().clone() {
        let security = g.ingest.security.lock().clone();
        reasons.push(format!("kafka: the broker refused this client ({security}): {refused}"));
    }
    if stuck > 0 {
        reasons.push(format!(
            "kafka: {stuck} partition(s) held up by a batch that cannot be decoded (being stepped over)"
        ));
    }
    if !redis {
        let why = g.cluster.as_ref().and_then(|c| c.state.error.lock().clone());
        reasons.push(match why {
            Some(why) => format!("redis: not answering ({why}); limits are counted by this instance alone"),
            None => "redis: not answering; limits are counted by this instance alone".into(),
        });
    }
    if !auth {
        reasons.push("auth: the Auth Service did not answer its last request".into());
    }
    let status = if !g.is_listening() {
        "unhealthy"
    } else if reasons.is_empty() {
        "healthy"
    } else {
        "degraded"
    };
    // What `true` stands for: a service that answers, or one this
    // configuration does not use (Redis unset) or runs in-process.
    let kafka_mode = if g.ingest.embedded.load(std::sync::atomic::Ordering::Relaxed) { "embedded" } else { "external" };
    let redis_mode = if g.cluster.is_some() { "external" } else { "not_configured" };
    let body = json!({
        "status": status,
        "timestamp": g.clock.epoch_ms(),
        "services": { "redis": redis, "kafka": kafka, "auth": auth },
        "modes": { "redis": redis_mode, "kafka": kafka_mode, "auth": g.config.auth_mode() },
        "reasons": reasons,
        "metrics": {
            "totalConnections": total(stats, |s| s.connections_accepted.get()),
            "activeConnections": g.limits.open_connections(),
            "messagesSent": total(stats, |s| s.sent.iter().map(|c| c.get()).sum()),
            "messagesReceived": total(stats, |s| s.received.iter().map(|c| c.get()).sum()),
        },
    });
    json_response(if status == "unhealthy" { 503 } else { 200 }, &body, out)
}

fn connections(g: &Global, out: &mut Vec<u8>) {
    let shards: Vec<_> = g
        .stats
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "shard": i,
                "connections": s.connections_active.get(),
                "authenticated": s.connections_authenticated.get(),
            })
        })
        .collect();
    let channels: serde_json::Map<String, serde_json::Value> = Channel::ALL
        .iter()
        .map(|ch| (ch.name().to_string(), json!(total(&g.stats, |s| s.subscribers[*ch as usize].get()))))
        .collect();
    let body = json!({
        "instance": g.instance_id,
        "total": total(&g.stats, |s| s.connections_active.get()),
        "authenticated": total(&g.stats, |s| s.connections_authenticated.get()),
        "shards": shards,
        "channels": channels,
        "cluster": g.cluster.as_ref().map(|c| c.state.view.lock().clone()),
    });
    json_response(200, &body, out)
}
