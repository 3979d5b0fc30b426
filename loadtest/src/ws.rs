//! A minimal WebSocket client for load generation: the upgrade, masked
//! text/pong frames out, and a cheap hand parser for the server's unmasked
//! frames (no per-frame allocation). Not a general client: it assumes a
//! conforming server, as the server under test is not what it checks.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

/// One connection's socket plus its read buffer.
pub struct Ws {
    pub stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    /// With arrival stamps on (`stamp_arrivals`): the kernel's receive
    /// time of the newest bytes read, in ns since the epoch (0: none yet).
    arrived_ns: Option<u64>,
}

/// A connection between two runtimes (see [`Ws::detach`]): the socket and
/// whatever it had read and not yet handed out.
pub struct Detached {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
    start: usize,
    arrived_ns: Option<u64>,
}

impl Detached {
    /// The connection on the calling thread's runtime (it must be inside
    /// one).
    pub fn attach(self) -> std::io::Result<Ws> {
        let Detached { stream, buf, start, arrived_ns } = self;
        Ok(Ws { stream: TcpStream::from_std(stream)?, buf, start, arrived_ns })
    }
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
        Ok(Ws { stream, buf, start: head_end, arrived_ns: None })
    }

    /// Takes the connection off this thread's runtime, to be carried to
    /// another thread and taken up there with [`Detached::attach`].
    pub fn detach(self) -> std::io::Result<Detached> {
        let Ws { stream, buf, start, arrived_ns } = self;
        Ok(Detached { stream: stream.into_std()?, buf, start, arrived_ns })
    }

    /// Has the kernel stamp data as it reaches this socket (`SO_TIMESTAMPNS`):
    /// on loopback that is the moment the server's write lands, so
    /// `arrived_ns` splits publish→receive into the server's part and the
    /// time this client took to get to the bytes.
    pub fn stamp_arrivals(&mut self) -> std::io::Result<()> {
        stamp_arrivals(&self.stream)?;
        self.arrived_ns = Some(0);
        Ok(())
    }

    /// When the newest bytes read so far reached the socket (kernel receive
    /// time, ns since the epoch); None unless `stamp_arrivals` is on and a
    /// stamped read happened (the kernel starts stamping shortly after the
    /// first socket asks). A frame parsed after a read completed in it:
    /// for frames that came in earlier segments of the same read this is
    /// late, so the server's part is over- and the client's understated.
    pub fn arrived_ns(&self) -> Option<u64> {
        self.arrived_ns.filter(|t| *t > 0)
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
            let n = match self.arrived_ns.as_mut() {
                Some(at) => read_stamped(&self.stream, &mut self.buf, at).await?,
                None => read_more(&mut self.stream, &mut self.buf).await?,
            };
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Next text frame (answering pings, skipping pongs and binary
    /// frames), or why the connection ended: `close 1001 (reason)`,
    /// `closed without a close frame`, or the read error.
    pub async fn next_text_or_close(&mut self) -> Result<Frame, String> {
        loop {
            match self.next_frame().await {
                Ok(Some(f)) if f.opcode == 0x1 => return Ok(f),
                Ok(Some(f)) if f.opcode == 0x8 => return Err(close_reason(self.payload(&f))),
                Ok(Some(_)) => continue,
                Ok(None) => return Err("closed without a close frame".into()),
                Err(e) => return Err(format!("read error: {e:#}")),
            }
        }
    }

    /// Reads (answering pings) until the connection ends; returns why.
    pub async fn run_until_closed(&mut self) -> String {
        loop {
            if let Err(why) = self.next_text_or_close().await {
                return why;
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

/// `close 1001 (reason)` from a close frame's payload.
fn close_reason(p: &[u8]) -> String {
    if p.len() < 2 {
        return "close frame without a code".into();
    }
    let code = u16::from_be_bytes([p[0], p[1]]);
    let text = String::from_utf8_lossy(&p[2..]);
    // The reason of a 1001 carries a random retry delay: left out so
    // closes group by cause.
    if text.is_empty() || code == 1001 {
        format!("close {code}")
    } else {
        format!("close {code} ({text})")
    }
}

/// Room for the next read: at least 4 KiB free, grown 16 KiB at a time.
fn make_room(buf: &mut Vec<u8>) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
    make_room(buf);
    let n = stream.read_buf(buf).await?;
    Ok(n)
}

/// Turns on kernel receive stamps (`SO_TIMESTAMPNS`) for `stream`.
fn stamp_arrivals(stream: &TcpStream) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain int option on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `read_more` through `recvmsg`, keeping the kernel's receive stamp of
/// the newest segment read in `at`.
async fn read_stamped(stream: &TcpStream, buf: &mut Vec<u8>, at: &mut u64) -> std::io::Result<usize> {
    make_room(buf);
    loop {
        stream.readable().await?;
        let spare = buf.spare_capacity_mut();
        let spare_len = spare.len();
        match stream.try_io(Interest::READABLE, || recv_stamped(stream.as_raw_fd(), spare, at)) {
            Ok(n) => {
                let short = n < spare_len;
                // SAFETY: recvmsg initialised the first n bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                if short {
                    // A short read drained the socket: clear the readiness
                    // without the EAGAIN call that would (as tokio's own
                    // reads do on epoll). Safe on the current-thread
                    // runtime the client uses: its I/O driver cannot record
                    // a new readiness between the read and this call.
                    let _ = stream.try_io(Interest::READABLE, || Err::<(), _>(std::io::ErrorKind::WouldBlock.into()));
                }
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn recv_stamped(fd: RawFd, spare: &mut [MaybeUninit<u8>], at: &mut u64) -> std::io::Result<usize> {
    let mut iov = libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: spare.len() };
    // Room for one SCM_TIMESTAMPNS message, aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: fd is an open socket; iov points into spare, which it may fill.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                *at = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n as usize)
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

    /// Where the value after the first `key` in `payload` starts.
    pub fn value_at(&self, payload: &[u8]) -> Option<usize> {
        Some(self.0.find(payload)? + self.0.needle().len())
    }
}

/// The keys of the stamps the load producers put in every update.
pub static SEQ: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"seq\":"));
pub static SENT_NS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"sentNs\":"));
/// The envelope's `timestamp` (the first in a frame: it comes before `data`).
pub static TIMESTAMP: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"timestamp\":"));
/// A market's own sequence number (`markets`).
pub static MSEQ: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"mseq\":"));
/// An update's Kafka position in the server's envelope (`"pos":"3:1042"`).
pub static POS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::new(b"\"pos\":\""));

/// Reads the unsigned integer after `key` in `payload`.
pub fn field_u64(payload: &[u8], key: &Key) -> Option<u64> {
    let at = key.value_at(payload)?;
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

    #[tokio::test(flavor = "current_thread")]
    async fn a_stamped_read_carries_the_kernels_arrival_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        stamp_arrivals(&client).unwrap();
        let mut buf = Vec::new();
        let mut at = 0;
        // The kernel turns stamping on shortly after the first socket asks
        // (deferred work): until then reads leave `at` alone.
        for _ in 0..200 {
            server.write_all(b"warm").await.unwrap();
            read_stamped(&client, &mut buf, &mut at).await.unwrap();
            if at != 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_ne!(at, 0, "no receive stamp within 2 s");
        buf.clear();
        for (i, chunk) in [&b"first"[..], b"second"].into_iter().enumerate() {
            let before = crate::now_ns();
            server.write_all(chunk).await.unwrap();
            let n = read_stamped(&client, &mut buf, &mut at).await.unwrap();
            let after = crate::now_ns();
            assert_eq!(&buf[buf.len() - n..], chunk, "read {i}");
            assert!((before..=after).contains(&at), "read {i}: stamp {at} outside {before}..={after}");
        }
        assert_eq!(buf, b"firstsecond");
        // A stamp is the newest segment's: a read of two writes has the second's.
        server.write_all(b"third").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let between = crate::now_ns();
        server.write_all(b"fourth").await.unwrap();
        // Both queued before the one read (bounded wait).
        for _ in 0..200 {
            let mut queued: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            unsafe { libc::ioctl(client.as_raw_fd(), libc::FIONREAD, &mut queued) };
            if queued as usize >= "thirdfourth".len() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        buf.clear();
        read_stamped(&client, &mut buf, &mut at).await.unwrap();
        assert_eq!(buf, b"thirdfourth");
        assert!(at >= between, "stamp {at} is the older segment's (before {between})");
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
