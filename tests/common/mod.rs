//! Test harness: boots the real server on an ephemeral loopback port and
//! talks to it over real sockets, with tungstenite (a real WebSocket client)
//! for well-behaved clients and a raw frame writer for malformed input.

#![allow(dead_code)]

pub mod kafka;
pub mod redis_servers;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moonx_ws::config::Config;
use moonx_ws::server::{self, ServerHandle};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

pub const SECRET: &str = "test-secret";
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
}

impl TestServer {
    /// Starts a server with test defaults overridden by `env`.
    pub fn start(env: &[(&str, &str)]) -> TestServer {
        Self::try_start(env).expect("server starts")
    }

    /// [`TestServer::start`] on `clock` (hold its wall time still to keep
    /// a test inside one rate-limit window, or move it on by hand).
    pub fn start_with_clock(env: &[(&str, &str)], clock: moonx_ws::clock::Clock) -> TestServer {
        Self::try_start_with(env, clock).expect("server starts")
    }

    /// [`TestServer::start`], returning the start error as text.
    pub fn try_start(env: &[(&str, &str)]) -> Result<TestServer, String> {
        Self::try_start_with(env, moonx_ws::clock::Clock::system())
    }

    fn try_start_with(env: &[(&str, &str)], clock: moonx_ws::clock::Clock) -> Result<TestServer, String> {
        let mut map: HashMap<String, String> = [
            ("WEBSOCKET_SERVICE_HOST", "127.0.0.1"),
            ("WEBSOCKET_SERVICE_PORT", "0"),
            ("WS_SHARDS", "2"),
            ("JWT_SECRET", SECRET),
            ("LOG_LEVEL", "warn"),
            ("DEMO_FEED", "false"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // `MOONX_TEST_PARK_IDLE_MS` runs every test with that parking delay
        // (e.g. 1: idle connections are parked at every chance).
        if let Ok(ms) = std::env::var("MOONX_TEST_PARK_IDLE_MS") {
            map.insert("WS_PARK_IDLE_MS".into(), ms);
        }
        for (k, v) in env {
            if v.is_empty() {
                map.remove(*k);
            } else {
                map.insert(k.to_string(), v.to_string());
            }
        }
        let config = Config::from_sources_with(["moonx-ws"], |k| map.get(k).cloned(), map.keys().cloned())
            .map_err(|e| e.to_string())?;
        let handle = server::start_with(config, clock).map_err(|e| format!("{e:#}"))?;
        let addr = handle.local_addr();
        Ok(TestServer { handle: Some(handle), addr })
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    /// Waits until `/health/ready` says the consumer is consuming, for at
    /// most 15 s in all (each request may itself wait `IO_TIMEOUT`, so the
    /// bound is on elapsed time, not on attempts).
    pub fn wait_ready(&self) {
        let started = std::time::Instant::now();
        let mut last = 0;
        while started.elapsed() < Duration::from_secs(15) {
            last = get(self.addr, "/health/ready").0;
            if last == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("server never became ready (last /health/ready status {last}, 0 = no answer)");
    }
}

/// A `moonx-ws` process run by a test: killed when dropped, so a failing
/// test leaves no server behind.
pub struct ServerProcess(pub std::process::Child);

impl std::ops::Deref for ServerProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for ServerProcess {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs the `moonx-ws` binary on a free loopback port with only `env` (plus
/// host and port) in its environment; returns once it accepts connections.
pub fn spawn_server(env: &[(&str, &str)]) -> (ServerProcess, SocketAddr) {
    spawn_server_limited(None, env)
}

/// [`spawn_server`], writing its log (standard error) to `log`.
pub fn spawn_server_logged(env: &[(&str, &str)], log: &std::path::Path) -> (ServerProcess, SocketAddr) {
    spawn(None, env, || std::process::Stdio::from(std::fs::File::create(log).unwrap()))
}

/// The JSON log lines (`LOG_FORMAT=json`) written to `log` so far.
pub fn log_lines(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Waits (bounded) for a log line that `matches`; returns it.
pub fn wait_for_log(log: &std::path::Path, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let started = std::time::Instant::now();
    loop {
        if let Some(line) = log_lines(log).into_iter().find(|l| matches(l)) {
            return line;
        }
        assert!(
            started.elapsed() < IO_TIMEOUT,
            "no log line for {what}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh path under the target directory for a test's files.
pub fn test_file(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{name}-{}-{n}", std::process::id()))
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A port for a spawned server that nothing else picks: below the
/// ephemeral range (32768-60999 here), so no `bind(0)` and no client
/// socket takes it, and distinct per call within this test process
/// (test binaries run one at a time).
pub fn server_port() -> u16 {
    for _ in 0..1000 {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + ((std::process::id().wrapping_mul(131) + n * 7) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999");
}

/// [`spawn_server`], with at most `open_files` descriptors (`prlimit`)
/// when given.
pub fn spawn_server_limited(open_files: Option<u32>, env: &[(&str, &str)]) -> (ServerProcess, SocketAddr) {
    spawn(open_files, env, std::process::Stdio::null)
}

fn spawn(
    open_files: Option<u32>,
    env: &[(&str, &str)],
    stderr: impl Fn() -> std::process::Stdio,
) -> (ServerProcess, SocketAddr) {
    let port = server_port();
    let bin = env!("CARGO_BIN_EXE_moonx-ws");
    let mut command = match open_files {
        Some(n) => {
            let mut c = std::process::Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
            c
        }
        None => std::process::Command::new(bin),
    };
    let child = command
        .env_clear()
        .env("WEBSOCKET_SERVICE_HOST", "127.0.0.1")
        .env("WEBSOCKET_SERVICE_PORT", port.to_string())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(stderr())
        .spawn()
        .unwrap();
    let mut child = ServerProcess(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = std::time::Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited during start-up");
        assert!(started.elapsed() < Duration::from_secs(30), "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token for `user` expiring `ttl` seconds from now (may be negative).
pub fn token(user: &str, ttl: i64) -> String {
    token_with(json!({ "sub": user, "email": format!("{user}@example.com"), "exp": now_secs() as i64 + ttl }))
}

pub fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub type Ws = WebSocket<TcpStream>;

/// Opens a WebSocket with tungstenite; `headers` are added to the upgrade.
pub fn connect_with(addr: SocketAddr, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            panic!("blocking handshake interrupted")
        }
    }
}

pub fn connect(addr: SocketAddr) -> Ws {
    connect_with(addr, &[]).expect("upgrade")
}

/// Next JSON text message (server ping frames are answered and skipped).
pub fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

pub fn recv_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

pub fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).expect("send");
}

/// Reads until the server's close frame; returns its code.
pub fn expect_close(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return u16::from(f.code),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Connects, expects `auth_required`, authenticates as `user`.
pub fn authed(addr: SocketAddr, user: &str) -> Ws {
    let mut ws = connect(addr);
    assert_eq!(recv(&mut ws)["type"], "auth_required");
    send(&mut ws, json!({"id": "a1", "type": "authenticate", "data": {"token": token(user, 3600)}}));
    let reply = recv(&mut ws);
    assert_eq!(reply["type"], "auth_success", "{reply}");
    ws
}

pub fn subscribe(ws: &mut Ws, channel: &str) {
    send(ws, json!({"id": "s1", "type": "subscribe", "data": {"channel": channel}}));
    let reply = recv(ws);
    assert_eq!(reply["type"], "subscribed", "{reply}");
}

/// One HTTP exchange with this service, as (status, raw head, body): a
/// server that stays silent for `IO_TIMEOUT` fails the test here, rather
/// than letting a polling loop wait out its attempts one read timeout at
/// a time.
pub fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    try_http(addr, request).unwrap_or_else(|| {
        panic!("{addr}: no answer within {IO_TIMEOUT:?} to {:?}", request.lines().next().unwrap_or(""))
    })
}

/// [`http`], with `None` when nothing came within `IO_TIMEOUT` (for a
/// server not under test, such as Chromium's DevTools while it starts).
pub fn try_http(addr: SocketAddr, request: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read to EOF, except after a 101: the upgraded connection stays open.
    loop {
        match s.read(&mut chunk) {
            // Silent from the start: no answer. After some bytes, the
            // answer is what came (a server that keeps the connection open
            // despite `Connection: close`, as Chromium's DevTools does).
            Err(e) if out.is_empty() && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
        if out.starts_with(b"HTTP/1.1 101") && out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((status, head.to_owned(), body.to_owned()))
}

pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http(addr, &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
    (status, body)
}

pub fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = get(addr, path);
    assert!(status == 200 || status == 503, "{path}: {status}");
    serde_json::from_str(&body).expect("JSON body")
}

/// A Prometheus sample's value (summed over label sets matching `name{...`).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = get(addr, "/metrics");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub const UPGRADE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {UPGRADE_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A raw WebSocket client that writes frames byte by byte as told.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(upgrade_request("").as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
        buf.drain(..end);
        Raw { s, buf }
    }

    pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = Self::frame(fin, opcode, payload);
        self.s.write_all(&f).unwrap();
    }

    pub fn send_text(&mut self, text: &str) {
        self.send_frame(true, 1, text.as_bytes());
    }

    /// Next frame as (opcode, payload); None when the server closed TCP
    /// (or the read failed or timed out: see [`Raw::try_read_frame`]).
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        self.try_read_frame().ok().flatten()
    }

    /// Next frame as (opcode, payload); `Ok(None)` at the end of the
    /// stream, an error when the read failed or timed out.
    pub fn try_read_frame(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, off) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= off + len {
                    let payload = self.buf[off..off + len].to_vec();
                    self.buf.drain(..off + len);
                    return Ok(Some((op, payload)));
                }
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk)? {
                0 => return Ok(None),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Next text message as JSON, skipping ping frames.
    pub fn recv(&mut self) -> Value {
        loop {
            let (op, payload) = self.read_frame().expect("frame");
            match op {
                1 => return serde_json::from_slice(&payload).unwrap(),
                9 | 10 => continue,
                8 => panic!("unexpected close {:?}", close_of(&payload)),
                _ => panic!("unexpected opcode {op}"),
            }
        }
    }

    /// Reads until a close frame; returns its code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.read_frame() {
                Some((8, payload)) => return close_of(&payload),
                Some(_) => continue,
                None => panic!("TCP closed without a close frame"),
            }
        }
    }

    /// True when the server closed TCP with no further frame but pings;
    /// false on another frame, or when nothing ends the stream within the
    /// read timeout.
    pub fn expect_eof(&mut self) -> bool {
        loop {
            match self.try_read_frame() {
                Ok(None) => return true,
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset, // not a timeout
                Ok(Some((9, _))) => continue,
                Ok(Some(_)) => return false,
            }
        }
    }
}

fn close_of(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// Auth as a raw client.
pub fn raw_authed(addr: SocketAddr, user: &str) -> Raw {
    let mut raw = Raw::connect(addr);
    assert_eq!(raw.recv()["type"], "auth_required");
    raw.send_text(&json!({"type":"authenticate","data":{"token": token(user, 3600)}}).to_string());
    assert_eq!(raw.recv()["type"], "auth_success");
    raw
}

/// Reads a stream of price updates numbered `data.i` = 0, 1, ... until the
/// close frame (answering nothing): every text frame must parse whole and
/// continue the numbering without a gap. Returns the last number read (-1
/// for none) and the close code.
pub fn drain_numbered_until_close(raw: &mut Raw) -> (i64, u16) {
    let mut last_i = -1i64;
    loop {
        match raw.read_frame() {
            Some((1, payload)) => {
                let v: Value = serde_json::from_slice(&payload).expect("whole frames only");
                let i = v["data"]["i"].as_i64().unwrap();
                assert_eq!(i, last_i + 1, "a prefix of the stream, no gaps inside it");
                last_i = i;
            }
            Some((8, payload)) => return (last_i, u16::from_be_bytes([payload[0], payload[1]])),
            Some((9, _)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
