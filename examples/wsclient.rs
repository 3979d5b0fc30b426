//! A small interactive WebSocket client for trying the service by hand, so
//! a first run needs nothing that Debian does not package.
//!
//! ```sh
//! cargo run --release --example wsclient -- [URL] [--token JWT] [--subscribe CHANNEL]...
//! ```
//!
//! URL defaults to `ws://127.0.0.1:3008/ws` (`ws://` only; for `wss://` use
//! a client with TLS). With `--token` it authenticates first, then sends a
//! `subscribe` for each `--subscribe`. Every line typed on standard input is
//! sent as one text message; every message received is printed on its own
//! line. Ctrl-D (end of input) closes the connection with 1000.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

use tungstenite::{Message, WebSocket};

fn main() {
    let mut url = "ws://127.0.0.1:3008/ws".to_string();
    let mut token = None;
    let mut channels = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--token" => token = args.next(),
            "--subscribe" => channels.extend(args.next()),
            "-h" | "--help" => {
                eprintln!("usage: wsclient [URL] [--token JWT] [--subscribe CHANNEL]...");
                return;
            }
            _ => url = arg,
        }
    }
    if let Err(e) = run(&url, token, channels) {
        eprintln!("wsclient: {e}");
        std::process::exit(1);
    }
}

fn run(url: &str, token: Option<String>, channels: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    let (mut ws, _) = tungstenite::connect(url)?;
    eprintln!("connected to {url}; type a JSON message per line, Ctrl-D to close");
    if let Some(token) = token {
        let auth = serde_json::json!({"type": "authenticate", "data": {"token": token}});
        ws.send(Message::text(auth.to_string()))?;
    }
    for channel in channels {
        let sub = serde_json::json!({"type": "subscribe", "data": {"channel": channel}});
        ws.send(Message::text(sub.to_string()))?;
    }
    // Standard input is read on a thread of its own; the socket is polled
    // with a short read timeout so typed lines go out promptly.
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim().is_empty() => continue,
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
    }
    loop {
        match rx.try_recv() {
            Ok(Some(line)) => ws.send(Message::text(line))?,
            Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                ws.close(None)?;
                return drain(&mut ws);
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        match ws.read() {
            Ok(msg) => print(&msg)?,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads until the server answers our close (or the socket ends).
fn drain<S: std::io::Read + std::io::Write>(ws: &mut WebSocket<S>) -> Result<(), Box<dyn std::error::Error>> {
    for _ in 0..100 {
        match ws.read() {
            Ok(msg) => print(&msg)?,
            Err(tungstenite::Error::ConnectionClosed) => return Ok(()),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn print(msg: &Message) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match msg {
        Message::Text(t) => writeln!(out, "{t}"),
        Message::Close(Some(f)) => writeln!(out, "[closed by the server: {} {}]", u16::from(f.code), f.reason),
        Message::Close(None) => writeln!(out, "[closed by the server]"),
        Message::Binary(b) => writeln!(out, "[binary frame, {} bytes]", b.len()),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
    }
}
