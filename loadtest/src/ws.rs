//! A minimal WebSocket client for load generation: the upgrade, masked
//! text/pong frames out, and a cheap hand parser for the server's unmasked
//! frames (no per-frame allocation). Not a general client: it assumes a
//! conforming server, as the server under test is not what it checks.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One connection's socket plus its read buffer.
pub struct Ws {
    pub stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

/// A server frame located in the read buffer.
pub struct Frame {
    pub opcode: u8,
    pub start: usize,
    pub end: usize,
}

impl Ws {
    /// Connects from `source` (a 127.0.0.x address spreads ephemeral
    /// ports), upgrades on `/ws`, returns the client.
    pub async fn connect(server: SocketAddr, source: Option<IpAddr>, extra_headers: &str) -> anyhow::Result<Ws> {
        let sock = if server.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = source {
            sock.bind(SocketAddr::new(ip, 0)).context("bind source address")?;
        }
        let mut stream = sock.connect(server).await.context("connect")?;
        stream.set_nodelay(true)?;
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        stream.write_all(req.as_bytes()).await.context("send upgrade")?;
        let mut buf = Vec::with_capacity(4096);
        let head_end = loop {
            let n = read_more(&mut stream, &mut buf).await?;
            if n == 0 {
                bail!("closed during upgrade");
            }
            if let Some(p) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 16 * 1024 {
                bail!("oversized upgrade response");
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            let line =
                String::from_utf8_lossy(&buf[..buf.iter().position(|b| *b == b'\r').unwrap_or(buf.len())]).into_owned();
            bail!("upgrade refused: {line}");
        }
        Ok(Ws { stream, buf, start: head_end })
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(text.len() + 14);
        masked_frame(0x1, text.as_bytes(), &mut out);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn send_pong(&mut self, payload_range: (usize, usize)) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(2 + 4 + 125);
        let payload = self.buf[payload_range.0..payload_range.1].to_vec();
        masked_frame(0xA, &payload, &mut out);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Next complete frame in the buffer, reading as needed; answers pings.
    /// Returns None when the server closed the connection.
    pub async fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some((opcode, start, end)) = parse(&self.buf[self.start..]) {
                let frame = Frame { opcode, start: self.start + start, end: self.start + end };
                self.start += end;
                if opcode == 0x9 {
                    self.send_pong((frame.start, frame.end)).await?;
                    continue;
                }
                return Ok(Some(frame));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if read_more(&mut self.stream, &mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Next text frame (answering pings, skipping pongs); None on close.
    pub async fn next_text_frame(&mut self) -> Option<Frame> {
        loop {
            match self.next_frame().await {
                Ok(Some(f)) if f.opcode == 0x1 => return Some(f),
                Ok(Some(f)) if f.opcode == 0x8 => return None,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    pub fn payload(&self, f: &Frame) -> &[u8] {
        &self.buf[f.start..f.end]
    }

    /// Next text message's payload (skipping pongs); an error on close.
    pub async fn next_text(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            match self.next_frame().await? {
                Some(f) if f.opcode == 0x1 => return Ok(self.payload(&f).to_vec()),
                Some(f) if f.opcode == 0x8 => {
                    let p = self.payload(&f);
                    let code = if p.len() >= 2 { u16::from_be_bytes([p[0], p[1]]) } else { 1005 };
                    bail!("server closed with {code}")
                }
                Some(_) => continue,
                None => bail!("server closed the connection"),
            }
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let n = stream.read_buf(buf).await?;
    Ok(n)
}

/// (opcode, payload start, frame end) of the unmasked frame at `b[0..]`.
fn parse(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0F;
    let (len, off) = match b[1] & 0x7F {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    (b.len() >= off + len).then_some((opcode, off, off + len))
}

fn masked_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mask: [u8; 4] = rand::random();
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 65535 => {
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
}

/// Sequence checking for one stream: counts numbers skipped and repeated.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sequence {
    last: Option<u64>,
}

impl Sequence {
    /// Records `seq`; returns (numbers skipped, whether it is a repeat).
    /// With `from_zero`, numbers before the first one seen count as skipped.
    pub fn see(&mut self, seq: u64, from_zero: bool) -> (u64, bool) {
        let out = match self.last {
            Some(l) if seq <= l => (0, true),
            Some(l) => (seq - l - 1, false),
            None if from_zero => (seq, false),
            None => (0, false),
        };
        self.last = Some(self.last.map_or(seq, |l| l.max(seq)));
        out
    }
}

/// A JSON key to look for in server frames (e.g. `"seq":`), its searcher
/// built once: building one per frame cost the client ~8% of its CPU at 1M
/// frames/s.
pub struct Key(memchr::memmem::Finder<'static>);

impl Key {
    pub fn new(key: &'static [u8]) -> Self {
        Self(memchr::memmem::Finder::new(key))
    }
}

/// The keys of the stamps the load producers put in every update.
pub static SEQ: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"seq\":"));
pub static SENT_NS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"sentNs\":"));

/// Reads the unsigned integer after `key` in `payload`.
pub fn field_u64(payload: &[u8], key: &Key) -> Option<u64> {
    let at = key.0.find(payload)? + key.0.needle().len();
    let mut v: u64 = 0;
    let mut any = false;
    for &c in &payload[at..] {
        if c.is_ascii_digit() {
            v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_and_fields() {
        let mut b = vec![0x81, 5];
        b.extend_from_slice(b"hello");
        assert_eq!(parse(&b), Some((1, 2, 7)));
        assert_eq!(parse(&b[..4]), None);
        assert_eq!(field_u64(br#"{"data":{"seq":42,"sentNs":7}}"#, &SEQ), Some(42));
        assert_eq!(field_u64(br#"{"data":{"seq":42,"sentNs":7}}"#, &SENT_NS), Some(7));
        assert_eq!(field_u64(br#"{"x":1}"#, &SEQ), None);
    }

    #[test]
    fn sequences_count_gaps_and_repeats() {
        let mut s = Sequence::default();
        assert_eq!(s.see(5, false), (0, false), "mid-stream start");
        assert_eq!(s.see(6, false), (0, false));
        assert_eq!(s.see(9, false), (2, false));
        assert_eq!(s.see(9, false), (0, true));
        let mut z = Sequence::default();
        assert_eq!(z.see(3, true), (3, false), "0..=2 missing");
    }
}
