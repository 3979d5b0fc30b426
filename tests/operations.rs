//! What an operator reads: one log line per refused upgrade, failed
//! authentication and close by the server, each naming the connection
//! (the id the client was given as `connectionId`), its IP and the
//! instance; rate-limited with the rest counted. The real binary, its real
//! log (`LOG_FORMAT=json`), real sockets.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;
use serde_json::{json, Value};

fn server(log: &std::path::Path) -> (ServerProcess, std::net::SocketAddr) {
    spawn_server_logged(
        &[
            ("JWT_SECRET", SECRET),
            ("WS_SHARDS", "2"),
            ("LOG_FORMAT", "json"),
            ("LOG_LEVEL", "info"),
            ("DEMO_FEED", "false"),
        ],
        log,
    )
}

/// `<instance>/<conn>` as given to the client, split.
fn split_id(connection_id: &Value) -> (String, u64) {
    let text = connection_id.as_str().expect("connectionId is a string");
    let (instance, conn) = text.rsplit_once('/').expect("<instance>/<conn>");
    (instance.to_string(), conn.parse().expect("a number after the slash"))
}

fn is(line: &Value, message: &str, conn: u64) -> bool {
    line["message"] == message && line["conn"] == conn
}

#[test]
fn the_client_is_told_its_connection_id_and_the_logs_name_it() {
    let log = test_file("ops-log");
    let (mut child, addr) = server(&log);

    // A good connection: the same id in auth_required and auth_success.
    let mut ok = connect(addr);
    let required = recv(&mut ok);
    assert_eq!(required["type"], "auth_required");
    let (instance, ok_id) = split_id(&required["data"]["connectionId"]);
    send(&mut ok, json!({"type": "authenticate", "data": {"token": token("alice", 600)}}));
    let success = recv(&mut ok);
    assert_eq!(success["type"], "auth_success");
    assert_eq!(success["data"]["connectionId"], required["data"]["connectionId"]);

    // A refused token: a line for the failure and one for the 4001 close.
    let mut bad = connect(addr);
    let (bad_instance, bad_id) = split_id(&recv(&mut bad)["data"]["connectionId"]);
    assert_eq!(bad_instance, instance, "one instance");
    assert_ne!(bad_id, ok_id, "ids differ per connection");
    send(&mut bad, json!({"type": "authenticate", "data": {"token": "not-a-jwt"}}));
    assert_eq!(recv(&mut bad)["type"], "auth_failed");
    assert_eq!(expect_close(&mut bad), 4001);
    let failed = wait_for_log(&log, "the failed authentication", |l| is(l, "authentication failed", bad_id));
    assert_eq!(failed["ip"], "127.0.0.1");
    assert_eq!(failed["instance"], instance.as_str());
    assert_eq!(failed["level"], "INFO", "at the default level");
    let closed = wait_for_log(&log, "the 4001 close", |l| is(l, "connection closed by the server", bad_id));
    assert_eq!(closed["code"], 4001, "the code as a number");

    // A frame-level violation: 1003 for a binary frame.
    let mut raw = Raw::connect(addr);
    let (_, raw_id) = split_id(&raw.recv()["data"]["connectionId"]);
    raw.send_frame(true, 2, b"\x01\x02");
    assert_eq!(raw.expect_close(), 1003);
    let closed = wait_for_log(&log, "the 1003 close", |l| is(l, "connection closed by the server", raw_id));
    assert_eq!(closed["code"], 1003);

    // A refused upgrade: status and reason.
    let (status, _, _) =
        http(addr, &upgrade_request("").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"));
    assert_eq!(status, 426);
    let refused =
        wait_for_log(&log, "the refused upgrade", |l| l["message"] == "upgrade refused" && l["status"] == 426);
    assert!(refused["reason"].as_str().is_some_and(|r| !r.is_empty()), "{refused}");
    assert!(refused["conn"].is_u64() && refused["ip"] == "127.0.0.1" && refused["instance"] == instance.as_str());

    drop(ok);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A flood of bad clients writes a bounded number of lines: the rest are
/// counted in /metrics, and a later line says how many it held back.
#[test]
fn a_flood_of_refusals_is_rate_limited_and_counted() {
    let log = test_file("ops-flood");
    let (mut child, addr) = server(&log);
    let bad = upgrade_request("").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let flood = 1000;
    for _ in 0..flood {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bad.as_bytes()).unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    }
    let suppressed = metric(addr, "moonx_ws_log_lines_suppressed_total") as usize;
    let written = log_lines(&log).iter().filter(|l| l["message"] == "upgrade refused").count();
    assert!(suppressed > 0, "some lines were held back");
    assert_eq!(written + suppressed, flood, "every refusal is either logged or counted");
    assert_eq!(metric(addr, "moonx_ws_handshake_refusals_total{status=\"426\"}") as usize, flood);
    // Once the budget refills, the next line reports what was held back.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (status, _, _) = http(addr, &bad);
    assert_eq!(status, 426);
    let line = wait_for_log(&log, "a line reporting the suppressed ones", |l| {
        l["message"] == "upgrade refused" && l["suppressed"].as_u64().is_some_and(|n| n > 0)
    });
    assert!(line["suppressed"].as_u64().unwrap() as usize <= suppressed);
    child.kill().unwrap();
    child.wait().unwrap();
}
