//! PROTOCOL.md §10: SIGTERM/SIGINT closes every connection with 1001 and
//! exits 0; the in-process handle does the same.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use moonx_ws::shard::inbox::Route;

#[test]
fn shutdown_closes_every_connection_with_1001_after_queued_updates() {
    let mut srv = TestServer::start(&[]);
    let mut clients: Vec<Ws> = (0..20).map(|i| authed(srv.addr, &format!("s{i}"))).collect();
    for ws in clients.iter_mut() {
        subscribe(ws, "prices");
    }
    let publisher = srv.handle().publisher();
    for i in 0..50 {
        publisher.publish_data(Route::Prices, 0, format!(r#"{{"token":"T","chainId":1,"i":{i}}}"#).as_bytes());
    }
    // Let the fan-out queue everything before shutdown begins.
    for ws in clients.iter_mut().take(1) {
        for _ in 0..50 {
            recv(ws);
        }
    }
    let handle = srv.handle.take().unwrap();
    handle.shutdown();
    for (n, ws) in clients.iter_mut().enumerate() {
        let mut updates = if n == 0 { 50 } else { 0 };
        let code = loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(_)) => updates += 1,
                Ok(tungstenite::Message::Close(Some(f))) => break u16::from(f.code),
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        assert_eq!(code, 1001);
        assert_eq!(updates, 50, "updates queued before the close are delivered whole");
    }
    handle.join();
    assert!(std::net::TcpStream::connect(srv.addr).is_err(), "no longer listening");
}

#[test]
fn sigterm_exits_zero_after_closing_clients() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_moonx-ws"))
        .env_clear()
        .env("WEBSOCKET_SERVICE_HOST", "127.0.0.1")
        .env("WEBSOCKET_SERVICE_PORT", port.to_string())
        .env("JWT_SECRET", SECRET)
        .env("WS_SHARDS", "2")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut ws = authed(addr, "term");
    // The `kill` command sends the signal (no unsafe libc call in tests).
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    assert_eq!(expect_close(&mut ws), 1001);
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0));
}
