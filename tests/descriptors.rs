//! Out of file descriptors: a connection past the process's limit waits in
//! the listen backlog (the failed accept is counted, the process keeps
//! serving) and is served as soon as a descriptor frees up.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// The server's descriptor limit: ~40 are its own at start (one shard),
/// the rest go to connections.
const OPEN_FILES: u32 = 64;

/// Reads the response head: the bytes after it for a 101 within `wait`.
fn answered_101(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    buf.starts_with(b"HTTP/1.1 101").then(|| buf.split_off(end))
}

/// Reads server frames (after `buf`) until one with `opcode`; its payload.
fn read_until(s: &mut TcpStream, mut buf: Vec<u8>, opcode: u8) -> Vec<u8> {
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut chunk = [0u8; 4096];
    loop {
        // Server frames are unmasked; these are all shorter than 126 bytes.
        if buf.len() >= 2 && buf.len() >= 2 + (buf[1] & 0x7f) as usize {
            let len = (buf[1] & 0x7f) as usize;
            assert!(len < 126, "a short frame");
            let frame: Vec<u8> = buf.drain(..2 + len).collect();
            if frame[0] & 0x0f == opcode {
                return frame[2..].to_vec();
            }
            continue;
        }
        let n = s.read(&mut chunk).expect("a frame");
        assert!(n > 0, "closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_connection_past_the_descriptor_limit_waits_and_is_served_when_one_frees() {
    let env = [("JWT_SECRET", SECRET), ("WS_SHARDS", "1"), ("LOG_LEVEL", "warn")];
    let (mut child, addr) = spawn_server_limited(Some(OPEN_FILES), &env);
    let mut served = Vec::new();
    // Upgrade one connection after another until one gets no answer: the
    // kernel completed its handshake, the server had no descriptor for it.
    let mut waiting = loop {
        assert!(served.len() < OPEN_FILES as usize, "every connection was served: the limit never bit");
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(upgrade_request("").as_bytes()).unwrap();
        match answered_101(&mut s, Duration::from_secs(3)) {
            Some(rest) => served.push((s, rest)),
            None => break s,
        }
    };
    assert!(served.len() > 5, "the server had room for some connections: {}", served.len());
    // The server is alive and still serves the upgraded connections: each
    // answers a ping while it is out of descriptors.
    for (s, rest) in served.iter_mut().take(3) {
        s.write_all(&Raw::frame(true, 0x9, b"p")).unwrap();
        assert_eq!(read_until(s, std::mem::take(rest), 0xA), b"p", "pong");
    }
    // One descriptor frees: the waiting connection is accepted and upgraded.
    drop(served.pop());
    assert!(answered_101(&mut waiting, Duration::from_secs(20)).is_some(), "served once a descriptor freed");
    drop(served);
    drop(waiting);
    let failures = (0..200)
        .find_map(|_| {
            let n = metric(addr, "moonx_ws_accept_failures_total");
            if n >= 1.0 {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(50));
            None
        })
        .expect("the failed accepts are counted in /metrics");
    assert!(failures >= 1.0);
    assert!(child.try_wait().unwrap().is_none(), "the server is still running");
    child.kill().unwrap();
    child.wait().unwrap();
}
