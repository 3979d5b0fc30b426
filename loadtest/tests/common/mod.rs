//! What the end-to-end tests share: child processes killed on drop, the
//! mock broker, the real `moonx-ws` binary (built when missing or stale)
//! and a server started from it, the load tool run as a bounded process.
//!
//! The server binary: `cargo test --workspace` builds it before any test
//! runs (the server's own tests need it), so it is found beside the test's
//! executable (`target/<profile>/moonx-ws`); when it is missing or older
//! than the server's sources (e.g. `cargo test -p moonx-loadtest` on a
//! fresh checkout) it is built first with the same cargo and profile
//! (README: "Tests").

// Each test file uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

pub const SECRET: &str = "loadtest-secret";

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `target/<profile>`: this test runs from `target/<profile>/deps`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let t =
                if p.is_dir() { newest_source(&p) } else { e.metadata().and_then(|m| m.modified()).unwrap_or(newest) };
            newest = newest.max(t);
        }
    }
    newest
}

/// The `moonx-ws` binary of this profile, built first when missing or stale.
pub fn server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = profile_dir().join("moonx-ws");
        let root = workspace();
        let sources = newest_source(&root.join("src")).max(newest_source(&root.join("vendor"))).max(
            std::fs::metadata(root.join("Cargo.toml")).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        if built.is_none_or(|b| b < sources) {
            let mut cmd = Command::new(env!("CARGO"));
            cmd.current_dir(&root).args(["build", "--quiet", "-p", "moonx-ws", "--bin", "moonx-ws"]);
            if profile_dir().file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo to build moonx-ws");
            assert!(status.success(), "building moonx-ws failed");
        }
        assert!(bin.exists(), "no server binary at {}", bin.display());
        bin
    })
    .clone()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A standalone mock Kafka broker and its bootstrap address.
pub fn broker() -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moonx-loadtest"))
        .args(["broker", "--duration", "180"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains(':'), "broker printed {line:?}");
    (Proc(child), line.trim().to_string())
}

pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// The real server on a free loopback port, consuming from `brokers`;
/// waits until it accepts (and, when `ready`, until its partitions are
/// assigned).
pub fn server(brokers: &str, ready: bool, env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let port = free_port();
    let child = Command::new(server_bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WEBSOCKET_SERVICE_HOST", "127.0.0.1")
        .env("WEBSOCKET_SERVICE_PORT", port.to_string())
        .env("JWT_SECRET", SECRET)
        .env("KAFKA_BROKERS", brokers)
        .env("DEMO_FEED", "false")
        .env("WS_SHARDS", "1")
        .env("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "100000")
        .env("LOG_LEVEL", "warn")
        // `MOONX_TEST_PARK_IDLE_MS` runs the server with that parking delay,
        // as the service's own tests do (tools/test.sh's second pass).
        .envs(std::env::var("MOONX_TEST_PARK_IDLE_MS").ok().map(|ms| ("WS_PARK_IDLE_MS", ms)))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "server not up within 60 s");
        let up = if ready { http_status(addr, "/health/ready") == Some(200) } else { TcpStream::connect(addr).is_ok() };
        if up {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, addr)
}

/// Runs the load tool to completion (killed, and the test failed, past
/// two minutes).
pub fn lt(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_moonx-loadtest"))
        .args(args)
        .env_remove("JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, Duration::from_secs(120))
}

pub fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("load tool still running after {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default().to_string()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", text(&out.stdout)))
}

pub fn tmp(name: &str) -> PathBuf {
    static N: Mutex<u32> = Mutex::new(0);
    let mut n = N.lock().unwrap();
    *n += 1;
    let dir = std::env::temp_dir().join(format!("moonx-lt-{}-{}-{name}", std::process::id(), *n));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Reads a tool run's stderr on a thread and returns once its first
/// progress line of the measured window appeared (bounded: 60 s); the
/// thread's result is every line it read.
pub fn until_measuring(stderr: std::process::ChildStderr) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" measure ") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    rx.recv_timeout(std::time::Duration::from_secs(60)).expect("no measure progress line");
    reader
}
