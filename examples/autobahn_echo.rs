//! Echo server for the Autobahn conformance cases (`conformance/run.sh`):
//! the service's real upgrade parser, frame codec and assembler, with its
//! limits raised for section 9 (messages up to 16 MiB) and binary messages
//! accepted, driven by a thin blocking loop, one thread per connection.
//! Not a production server: it exists to test the codec against RFC 6455.
//!
//! Usage: `cargo run --release --example autobahn_echo -- --port 9001`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use moonx_ws::protocol::frame::{
    decode_frame, encode_close, encode_frame, Assembler, Limits, Message, OP_BINARY, OP_CLOSE, OP_PONG, OP_TEXT,
};
use moonx_ws::protocol::handshake::{parse_head, route, write_refusal, write_switching_protocols, Parsed, Route};
use moonx_ws::protocol::CloseCode;

const LIMITS: Limits = Limits { max_message_bytes: 64 << 20, max_fragments: 1 << 20, accept_binary: true };

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
    let mut asm = Assembler::default();
    loop {
        out.clear();
        let mut pos = 0;
        let mut done = false;
        loop {
            let frame = match decode_frame(&mut buf[pos..], &LIMITS) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(code) => {
                    encode_close(code, code.reason(), &mut out);
                    done = true;
                    break;
                }
            };
            let payload = &buf[pos + frame.payload.start..pos + frame.payload.end];
            match asm.push(&frame, payload, &LIMITS) {
                Ok(Some(Message::Text(t))) => encode_frame(OP_TEXT, t, &mut out),
                Ok(Some(Message::Binary(b))) => encode_frame(OP_BINARY, b, &mut out),
                Ok(Some(Message::Ping(p))) => encode_frame(OP_PONG, p, &mut out),
                Ok(Some(Message::Pong)) | Ok(None) => {}
                Ok(Some(Message::Close(code))) => {
                    match code {
                        Some(c) => encode_close(CloseCode(c), "", &mut out),
                        None => encode_frame(OP_CLOSE, &[], &mut out),
                    }
                    done = true;
                }
                Err(code) => {
                    encode_close(code, code.reason(), &mut out);
                    done = true;
                }
            }
            pos += frame.consumed;
            if done {
                break;
            }
        }
        buf.drain(..pos);
        if !out.is_empty() {
            s.write_all(&out)?;
        }
        if done {
            let _ = s.shutdown(std::net::Shutdown::Write);
            // Let the peer read our close before the socket goes away.
            let _ = s.read(&mut chunk);
            return Ok(());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
