//! PROTOCOL.md §1 (transport, refusals) and §8 (HTTP endpoints), over real
//! sockets against a real server.

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn upgrades_only_on_ws_and_404s_the_rest_with_json() {
    let srv = TestServer::start(&[]);
    let req = upgrade_request("").replace("GET /ws", "GET /other");
    let (status, _, body) = http(srv.addr, &req);
    assert_eq!(status, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    let (status, body) = get(srv.addr, "/nope");
    assert_eq!(status, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    let mut ws = connect(srv.addr);
    assert_eq!(recv(&mut ws)["type"], "auth_required");
}

#[test]
fn malformed_upgrades_get_400_426_431() {
    let srv = TestServer::start(&[]);
    let cases = [
        (upgrade_request("").replace(UPGRADE_KEY, "not-a-key"), 400),
        (upgrade_request("").replace("Sec-WebSocket-Key", "X-Nothing"), 400),
        (upgrade_request("").replace("GET", "POST"), 400),
        (upgrade_request("").replace("Connection: Upgrade", "Connection: keep-alive"), 400),
        ("GET /ws HTTP/1.1\r\nHost: t\r\n\r\n".to_string(), 400),
        (upgrade_request("").replace("Version: 13", "Version: 8"), 426),
        (upgrade_request(&format!("X-Pad: {}\r\n", "a".repeat(9000))), 431),
        (upgrade_request(&(0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()), 431),
    ];
    for (req, want) in cases {
        let (status, head, body) = http(srv.addr, &req);
        assert_eq!(status, want, "{req:.60}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(), "{body}");
        if want == 426 {
            assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
        }
    }
    assert!(metric(srv.addr, "moonx_ws_handshake_refusals_total") >= 8.0);
}

#[test]
fn incomplete_head_is_closed_after_the_handshake_timeout() {
    let srv = TestServer::start(&[("WS_HANDSHAKE_TIMEOUT_MS", "300")]);
    let (status, _, _) = http(srv.addr, "GET /ws HTTP/1.1\r\nHost: t\r\n");
    assert!(status == 408 || status == 0, "closed, optionally with 408: {status}");
}

#[test]
fn origin_allowlist() {
    let srv = TestServer::start(&[("ALLOWED_ORIGINS", "https://app.moonx.farm,https://other.example")]);
    let (status, _, _) = http(srv.addr, &upgrade_request("Origin: https://evil.example\r\n"));
    assert_eq!(status, 403);
    assert!(connect_with(srv.addr, &[("Origin", "https://app.moonx.farm")]).is_ok());
    assert!(connect_with(srv.addr, &[]).is_ok(), "no Origin: a non-browser client");
}

#[test]
fn ip_whitelist_and_trusted_proxies() {
    let srv = TestServer::start(&[("IP_WHITELIST", "10.0.0.0/8")]);
    let (status, _, _) = http(srv.addr, &upgrade_request(""));
    assert_eq!(status, 403);
    let (status, _, _) = http(srv.addr, &upgrade_request("X-Forwarded-For: 10.1.2.3\r\n"));
    assert_eq!(status, 403, "X-Forwarded-For from an untrusted peer is ignored");

    let srv = TestServer::start(&[("IP_WHITELIST", "10.0.0.0/8"), ("TRUSTED_PROXIES", "127.0.0.1")]);
    let (status, _, _) = http(srv.addr, &upgrade_request("X-Forwarded-For: 10.1.2.3\r\n"));
    assert_eq!(status, 101);
    let (status, _, _) = http(srv.addr, &upgrade_request("X-Forwarded-For: 10.1.2.3, 8.8.8.8\r\n"));
    assert_eq!(status, 403, "the right-most untrusted hop is the client");
}

#[test]
fn per_ip_connection_limit_counts_every_open_connection() {
    let srv = TestServer::start(&[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "3")]);
    let mut open: Vec<_> = (0..3).map(|_| connect(srv.addr)).collect();
    let (status, _, body) = http(srv.addr, &upgrade_request(""));
    assert_eq!(status, 429, "{body}");
    // A proxied client is counted by its own address, not the proxy's.
    let srv2 = TestServer::start(&[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "1"), ("TRUSTED_PROXIES", "127.0.0.1")]);
    let _a = connect_with(srv2.addr, &[("X-Forwarded-For", "1.1.1.1")]).unwrap();
    assert!(connect_with(srv2.addr, &[("X-Forwarded-For", "2.2.2.2")]).is_ok());
    assert!(connect_with(srv2.addr, &[("X-Forwarded-For", "1.1.1.1")]).is_err());
    // Closing one frees its slot.
    let mut first = open.remove(0);
    first.close(None).unwrap();
    let _ = first.read();
    let freed = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        get_json(srv.addr, "/health")["metrics"]["activeConnections"] == 2
    });
    assert!(freed);
    assert!(connect_with(srv.addr, &[]).is_ok());
}

#[test]
fn instance_capacity_gives_503() {
    let srv = TestServer::start(&[("WS_MAX_CONNECTIONS", "2")]);
    let _a = connect(srv.addr);
    let _b = connect(srv.addr);
    let (status, head, _) = http(srv.addr, &upgrade_request(""));
    assert_eq!(status, 503);
    assert!(head.lines().any(|l| l == "Retry-After: 5"), "a 503 says when to come back: {head}");
}

#[test]
fn bearer_token_on_the_upgrade() {
    let srv = TestServer::start(&[]);
    let good = format!("Bearer {}", token("u-bearer", 600));
    let mut ws = connect_with(srv.addr, &[("Authorization", &good)]).unwrap();
    let first = recv(&mut ws);
    assert_eq!(first["type"], "auth_success");
    assert_eq!(first["data"]["user"]["id"], "u-bearer");
    subscribe(&mut ws, "orders");

    let (status, _, body) = http(srv.addr, &upgrade_request("Authorization: Bearer nope\r\n"));
    assert_eq!(status, 401);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    let expired = format!("Authorization: Bearer {}\r\n", token("u", -3600));
    assert_eq!(http(srv.addr, &upgrade_request(&expired)).0, 401);
}

#[test]
fn tokens_in_the_url_are_ignored() {
    let srv = TestServer::start(&[]);
    let req = upgrade_request("").replace("GET /ws", &format!("GET /ws?token={}", token("u", 600)));
    let (status, _, _) = http(srv.addr, &req);
    assert_eq!(status, 101);
    let mut ws = connect(srv.addr);
    assert_eq!(recv(&mut ws)["type"], "auth_required");
}

#[test]
fn health_endpoints() {
    let srv = TestServer::start(&[]);
    let mut ws = authed(srv.addr, "h1");
    send(&mut ws, json!({"type": "ping"}));
    recv(&mut ws);
    let h = get_json(srv.addr, "/health");
    assert_eq!(h["status"], "healthy");
    assert!(h["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(h["services"], json!({"redis": true, "kafka": true, "auth": true}));
    assert_eq!(
        h["modes"],
        json!({"redis": "not_configured", "kafka": "embedded", "auth": "jwt"}),
        "what each `true` stands for: no KAFKA_BROKERS means the embedded broker"
    );
    assert_eq!(h["metrics"]["activeConnections"], 1);
    assert_eq!(h["metrics"]["totalConnections"], 1);
    assert_eq!(h["metrics"]["messagesReceived"], 2);
    assert_eq!(h["metrics"]["messagesSent"], 3);
    assert_eq!(get(srv.addr, "/health/live").0, 200);
    srv.wait_ready();
    assert_eq!(get_json(srv.addr, "/health/ready")["status"], "ready");
}

#[test]
fn metrics_connections_and_docs() {
    let srv = TestServer::start(&[]);
    let mut a = authed(srv.addr, "m1");
    subscribe(&mut a, "prices");
    subscribe(&mut a, "orders");
    let _b = connect(srv.addr);
    let (status, body) = get(srv.addr, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "moonx_ws_connections_active",
        "moonx_ws_auth_total{result=\"success\"} 1",
        "moonx_ws_messages_received_total{type=\"subscribe\"} 2",
        "moonx_ws_messages_sent_total{type=\"subscribed\"} 2",
        "moonx_ws_rate_limited_total",
        "moonx_ws_slow_consumer_closes_total",
        "moonx_ws_fanout_latency_seconds_bucket",
        "moonx_ws_subscriptions{channel=\"prices\"} 1",
    ] {
        assert!(body.contains(name), "missing {name}");
    }
    let c = get_json(srv.addr, "/connections");
    assert_eq!(c["total"], 2);
    assert_eq!(c["authenticated"], 1);
    assert_eq!(c["shards"].as_array().unwrap().len(), 2);
    assert_eq!(c["channels"]["prices"], 1);
    assert_eq!(c["channels"]["orders"], 1);
    let (status, _, docs) = http(srv.addr, "GET /docs HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 200);
    assert!(docs.contains("<html") && docs.contains("auth_required") && docs.contains("4009"));
}
