//! The kernel floor of a connection set-up: the least a server can do for
//! `moonx-loadtest connect` and still pass it.
//!
//! One thread, level-triggered epoll, non-blocking sockets. Per connection:
//! `accept4`, `TCP_NODELAY`, `epoll_ctl`, then for each of the client's
//! three messages (upgrade request, `authenticate`, `subscribe`) one `read`
//! and one `write` of a canned reply (101 with `auth_required`,
//! `auth_success`, `subscribed`). It parses nothing beyond finding where a
//! message ends, verifies no token and keeps no state but a counter, so it is
//! not a server anyone should run: it measures what the system calls and the
//! loopback TCP traffic of a set-up cost on this machine, which no real
//! server can go below. `perf/floor.sh` runs it beside moonx-ws and the
//! rust-tokio peer.
//!
//! With `KAFKA_BROKERS` set it is also the floor of a fan-out, for
//! `moonx-loadtest fanout`: a consumer thread reads `price.updates` (librdkafka,
//! assigned at the end of every partition, `fetch.wait.max.ms=5` like the
//! servers compared), wraps each value as `{"type":"price","data":…}` in one
//! frame appended to a buffer all subscribers share, and the main thread
//! writes that buffer to every subscribed socket in io_uring batches of 64
//! `send`s, at once or every `FLUSH_MS` milliseconds. No per-connection
//! queue, no slow-reader handling (a socket that does not take the whole
//! buffer is only counted), no envelope ids: what is left is the Kafka
//! consumer, one frame per update and the sends, the part of a fan-out's cost
//! no server avoids. `SCENARIO=fanout perf/floor.sh` runs it beside the servers.
//!
//! `PORT` (default 3108) picks the port on 127.0.0.1. Runs until killed.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// The reply to the client's upgrade request, for the fixed key
/// `moonx-loadtest` sends, followed by the `auth_required` frame.
fn upgrade_reply() -> Vec<u8> {
    let mut out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        .to_vec();
    text_frame(&mut out, br#"{"type":"auth_required","data":{"timeout":10000}}"#);
    out
}

/// An unmasked server text frame (payloads here are under 126 bytes).
fn text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    assert!(payload.len() < 126);
    out.push(0x81);
    out.push(payload.len() as u8);
    out.extend_from_slice(payload);
}

const ENVELOPE: (&[u8], &[u8]) = (br#"{"type":"price","data":"#, b"}");

/// Appends `{"type":"price","data":VALUE}` as one unmasked text frame.
fn price_frame(out: &mut Vec<u8>, value: &[u8]) {
    let len = ENVELOPE.0.len() + value.len() + ENVELOPE.1.len();
    out.push(0x81);
    match len {
        0..=125 => out.push(len as u8),
        126..=65535 => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(ENVELOPE.0);
    out.extend_from_slice(value);
    out.extend_from_slice(ENVELOPE.1);
}

/// Frames not yet written, shared by the consumer thread and the writer.
struct Pending {
    frames: Mutex<Vec<u8>>,
    /// Signalled when `frames` goes from empty to not (the writer's epoll
    /// watches it).
    eventfd: libc::c_int,
}

/// Reads every partition of `price.updates` from its end and appends a
/// frame per message to `pending`.
fn consume(brokers: &str, pending: &Pending) {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "floor")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("kafka consumer");
    let topic = "price.updates";
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("topic metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition_offset(topic, p.id(), Offset::End).expect("partition offset");
    }
    consumer.assign(&tpl).expect("assign partitions");
    eprintln!("floor: consuming {} partitions of {topic} from {brokers}", tpl.count());
    loop {
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) else { continue };
        let was_empty = {
            let mut frames = pending.frames.lock().unwrap();
            let was_empty = frames.is_empty();
            price_frame(&mut frames, msg.payload().unwrap_or(b"null"));
            was_empty
        };
        if was_empty {
            let one: u64 = 1;
            // SAFETY: an 8-byte write from a live local to an eventfd.
            unsafe { libc::write(pending.eventfd, (&one as *const u64).cast(), 8) };
        }
    }
}

/// Writes `buf` to every socket in `subs`, 64 sends per submission;
/// returns how many took less than all of it.
fn send_all(ring: &mut IoUring, subs: &[libc::c_int], buf: &[u8]) -> io::Result<u64> {
    let mut short = 0;
    for chunk in subs.chunks(64) {
        {
            let mut sq = ring.submission();
            for (i, fd) in chunk.iter().enumerate() {
                let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                let send = opcode::Send::new(types::Fd(*fd), buf.as_ptr(), buf.len() as u32).flags(flags);
                // SAFETY: `buf` outlives the submission: every completion is
                // reaped below before this function returns.
                unsafe { sq.push(&send.build().user_data(i as u64)).expect("the ring has 64 entries") };
            }
        }
        ring.submit_and_wait(chunk.len())?;
        short += ring.completion().filter(|c| c.result() != buf.len() as i32).count() as u64;
    }
    Ok(short)
}

/// Bytes buffered for one connection and how many replies it has had.
#[derive(Default)]
struct Conn {
    buf: Vec<u8>,
    replies: u8,
}

impl Conn {
    /// Length of the first complete message in `buf`: the HTTP head before
    /// the first reply, a masked client frame (16-bit length at most) after.
    fn complete(&self) -> Option<usize> {
        if self.replies == 0 {
            return self.buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            126 => return None,
            n => (n as usize, 2),
        };
        let total = head + 4 + len;
        (b.len() >= total).then_some(total)
    }
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Sets an integer socket option to 1.
///
/// # Safety
/// `fd` must be an open socket.
unsafe fn enable(fd: libc::c_int, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let one: libc::c_int = 1;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    check(libc::setsockopt(fd, level, name, (&one as *const libc::c_int).cast(), len))
}

fn main() -> io::Result<()> {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3108);
    let replies = {
        let (mut auth, mut sub) = (Vec::new(), Vec::new());
        text_frame(&mut auth, br#"{"id":"a","type":"auth_success","data":{"user_id":"floor"}}"#);
        text_frame(&mut sub, br#"{"id":"s","type":"subscribed","data":{"channel":"prices"}}"#);
        [upgrade_reply(), auth, sub]
    };
    // SAFETY: plain system calls on descriptors this function owns; every
    // pointer passed points at a live local of the size given.
    unsafe {
        let lfd = check(libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0))?;
        enable(lfd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = port.to_be();
        addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        let addr_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        check(libc::bind(lfd, (&addr as *const libc::sockaddr_in).cast(), addr_len))?;
        check(libc::listen(lfd, 1024))?;
        let ep = check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?;
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: lfd as u64 };
        check(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, &mut ev))?;
        eprintln!("floor: listening on 127.0.0.1:{port}");

        // The fan-out: the consumer thread, the shared frames and the ring.
        let pending = Arc::new(Pending {
            frames: Mutex::new(Vec::new()),
            eventfd: check(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?,
        });
        let flush = Duration::from_millis(std::env::var("FLUSH_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
        if let Some(brokers) = std::env::var("KAFKA_BROKERS").ok().filter(|b| !b.is_empty()) {
            let pending = pending.clone();
            std::thread::spawn(move || consume(&brokers, &pending));
        }
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: pending.eventfd as u64 };
        check(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, pending.eventfd, &mut ev))?;
        let mut ring = IoUring::new(64)?;
        let mut subs: Vec<libc::c_int> = Vec::new();
        let mut out: Vec<u8> = Vec::new();
        let (mut waiting, mut last_flush, mut short, mut report) = (false, Instant::now(), 0u64, Instant::now());

        let mut conns: HashMap<libc::c_int, Conn> = HashMap::new();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            // Sweeps start at most once per `flush` (as the server's do).
            if waiting && last_flush.elapsed() >= flush {
                (waiting, last_flush) = (false, Instant::now());
                std::mem::swap(&mut out, &mut pending.frames.lock().unwrap());
                short += send_all(&mut ring, &subs, &out)?;
                out.clear();
            }
            if report.elapsed() >= Duration::from_secs(5) && !subs.is_empty() {
                eprintln!("floor: {} subscribers, {short} short writes", subs.len());
                report = Instant::now();
            }
            let timeout = match waiting {
                true => flush.saturating_sub(last_flush.elapsed()).as_micros().div_ceil(1000) as i32,
                false => -1,
            };
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as libc::c_int, timeout);
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for e in &events[..n as usize] {
                let fd = e.u64 as libc::c_int;
                if fd == pending.eventfd {
                    let mut count = 0u64;
                    libc::read(fd, (&mut count as *mut u64).cast(), 8);
                    waiting = true;
                    continue;
                }
                if fd == lfd {
                    loop {
                        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
                        let c = libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), flags);
                        if c < 0 {
                            break;
                        }
                        let _ = enable(c, libc::IPPROTO_TCP, libc::TCP_NODELAY);
                        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: c as u64 };
                        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c, &mut ev);
                        conns.insert(c, Conn::default());
                    }
                    continue;
                }
                let r = libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len());
                let Some(conn) = conns.get_mut(&fd) else { continue };
                if r <= 0 {
                    if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                        libc::close(fd); // also leaves the epoll set
                        conns.remove(&fd);
                        subs.retain(|s| *s != fd);
                    }
                    continue;
                }
                conn.buf.extend_from_slice(&chunk[..r as usize]);
                while let Some(len) = conn.complete() {
                    conn.buf.drain(..len);
                    if let Some(reply) = replies.get(conn.replies as usize) {
                        libc::write(fd, reply.as_ptr().cast(), reply.len());
                        conn.replies += 1;
                        if conn.replies as usize == replies.len() {
                            subs.push(fd);
                        }
                    }
                }
            }
        }
    }
}
