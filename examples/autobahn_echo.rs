//! Echo server for the Autobahn conformance cases (`conformance/run.sh`):
//! the service's real upgrade parser and its sans-IO link
//! (`protocol::link`: frame codec, reassembly, ping answers, the close
//! handshake) with its limits raised for section 9 (messages up to 16 MiB)
//! and binary messages accepted, driven by a thin blocking loop, one thread
//! per connection. Not a production server: it exists to test the service's
//! own WebSocket code against RFC 6455.
//!
//! Usage: `cargo run --release --example autobahn_echo -- --port 9001`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use moonx_ws::protocol::frame::{encode_frame, Limits, OP_BINARY, OP_TEXT};
use moonx_ws::protocol::handshake::{parse_head, route, write_refusal, write_switching_protocols, Parsed, Route};
use moonx_ws::protocol::link::{CloseCause, Data, Link, LinkTimers};

const LIMITS: Limits = Limits { max_message_bytes: 64 << 20, max_fragments: 1 << 20, accept_binary: true };
/// No pings from the echo server (the cases send their own).
const TIMERS: LinkTimers = LinkTimers { ping_interval_ms: u64::MAX / 2, pong_timeout_ms: 5_000, close_grace_ms: 3_000 };

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut port = 9001u16;
    while let Some(a) = args.next() {
        if a == "--port" {
            port = args.next().and_then(|p| p.parse().ok()).expect("--port N");
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    eprintln!("autobahn echo on 127.0.0.1:{}", listener.local_addr()?.port());
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
    Ok(())
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let (mut head, used) = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf) {
            Parsed::Partial => continue,
            Parsed::Complete(h, used) => break (h, used),
            Parsed::Refused(r) => {
                let mut out = Vec::new();
                write_refusal(r, &mut out);
                return s.write_all(&out);
            }
        }
    };
    // The service upgrades on /ws only; the test client asks for other paths.
    head.path = "/ws".into();
    let mut out = Vec::new();
    match route(&head) {
        Route::Upgrade { key } => write_switching_protocols(&key, &mut out),
        Route::Refused(r) => {
            write_refusal(r, &mut out);
            return s.write_all(&out);
        }
        Route::Http => return Ok(()),
    }
    s.write_all(&out)?;
    buf.drain(..used);
    // The production link: the same decoding, ping answers and close
    // handshake (echoing the peer's code) as every connection of the service.
    let mut link = Link::new(0, TIMERS);
    let mut data = buf;
    loop {
        out.clear();
        let cause = link.receive(&mut data, 0, &LIMITS, |msg| {
            match msg {
                Data::Text(t) => encode_frame(OP_TEXT, t.as_bytes(), &mut out),
                Data::Binary(b) => encode_frame(OP_BINARY, b, &mut out),
                Data::Ping(p) => Link::pong(p, &mut out),
            }
            true
        });
        let code = match cause {
            Some(CloseCause::Violation(code)) | Some(CloseCause::PeerClosed(code)) => Some(code),
            None => None,
        };
        if let Some(frame) = code.and_then(|code| link.close(code, code.reason(), 0)) {
            out.extend_from_slice(&frame);
        }
        if !out.is_empty() {
            s.write_all(&out)?;
        }
        if !link.is_open() {
            let _ = s.shutdown(std::net::Shutdown::Write);
            // Let the peer read our close before the socket goes away.
            let _ = s.read(&mut chunk);
            return Ok(());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        data = chunk[..n].to_vec();
    }
}
