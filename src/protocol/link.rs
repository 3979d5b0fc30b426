//! A connection's WebSocket rules after the upgrade, sans-IO: the peer's
//! bytes in, messages and control frames out, the time a parameter.
//!
//! Owns: decoding what the peer sends (a frame cut between reads is kept
//! until it is whole, fragmented messages are reassembled, every RFC 6455
//! check maps to its close code); liveness (a ping every
//! `ping_interval_ms`; any frame proves the peer alive; silence for
//! `pong_timeout_ms` after a ping means the connection is dropped without a
//! close handshake); the peer's pings, handed out in order with the data
//! messages so each is answered where it came; and the close handshake (our close frame after everything
//! queued, the peer's echo, a grace period for it, echoing the peer's code
//! when it closes first).
//!
//! The per-connection driver (`conn/driver.rs`) does the I/O around it and
//! hands text messages to the session; the Autobahn echo server
//! (`examples/autobahn_echo.rs`) drives the same type, so the conformance
//! run checks this code, not a copy of it. Nothing here does I/O or reads
//! a clock.

use super::frame::{decode_frame, encode_close, encode_frame, Assembler, Limits, Message, OP_PING, OP_PONG};
use super::CloseCode;

/// The link's timings, in ms.
#[derive(Debug, Clone, Copy)]
pub struct LinkTimers {
    pub ping_interval_ms: u64,
    pub pong_timeout_ms: u64,
    /// How long our close frame waits for the peer's.
    pub close_grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Our close frame is queued; waiting for the peer's until the deadline.
    Closing {
        deadline_ms: u64,
    },
    /// Finished: drop the socket.
    Done,
}

/// What the peer sent that the caller acts on, in the order it came.
#[derive(Debug, PartialEq, Eq)]
pub enum Data<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    /// A ping: answer with [`Link::pong`] of its payload.
    Ping(&'a [u8]),
}

/// Why the link must start closing after what the peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The peer broke the protocol: close with this code (1002, 1003,
    /// 1007, 1009).
    Violation(CloseCode),
    /// The peer closed first: answer with its code (1000 when it gave none).
    PeerClosed(CloseCode),
}

/// What a timer check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing to do now.
    Nothing,
    /// A ping frame to send.
    Ping(Vec<u8>),
    /// No frame since the last ping within the timeout: drop the TCP
    /// connection (no handshake with a dead peer).
    PeerSilent,
    /// The close handshake's grace ran out: drop the socket.
    CloseTimedOut,
}

/// One connection's link state (see the module doc).
#[derive(Debug)]
pub struct Link {
    phase: Phase,
    asm: Assembler,
    /// The bytes of a frame not yet whole (an idle link holds none).
    partial: Vec<u8>,
    next_ping_ms: u64,
    /// When the unanswered ping went out.
    ping_sent_ms: Option<u64>,
    peer_closed: bool,
    /// The code the peer closed with, until answered.
    peer_code: Option<CloseCode>,
    timers: LinkTimers,
}

impl Link {
    /// A link opened at monotonic `now_ms`.
    pub fn new(now_ms: u64, timers: LinkTimers) -> Self {
        Self::resume(now_ms + timers.ping_interval_ms, None, timers)
    }

    /// A link taken up again (a parked connection's) with its ping state.
    pub fn resume(next_ping_ms: u64, ping_sent_ms: Option<u64>, timers: LinkTimers) -> Self {
        Self {
            phase: Phase::Open,
            asm: Assembler::default(),
            partial: Vec::new(),
            next_ping_ms,
            ping_sent_ms,
            peer_closed: false,
            peer_code: None,
            timers,
        }
    }

    /// The ping state a parked connection keeps: next ping, unanswered ping.
    pub fn ping_state(&self) -> (u64, Option<u64>) {
        (self.next_ping_ms, self.ping_sent_ms)
    }

    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether only new input or a deadline can need the link: open,
    /// nothing half-received.
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Open && !self.peer_closed && self.partial.is_empty() && self.asm.is_idle()
    }

    /// The socket ended (EOF, reset, a failed write): nothing more to do.
    pub fn end(&mut self) {
        self.phase = Phase::Done;
    }

    /// Takes `data` the peer sent at monotonic `now_ms`: every whole data
    /// message and every ping goes to `on_data`, in order, while the link is
    /// open (until `on_data` returns false: the caller is about to close);
    /// the peer's close is noted. Returns why the link must now close, if
    /// it must; the caller then calls [`Link::close`].
    pub fn receive(
        &mut self,
        data: &mut [u8],
        now_ms: u64,
        limits: &Limits,
        mut on_data: impl FnMut(Data<'_>) -> bool,
    ) -> Option<CloseCause> {
        // Any frame, indeed any byte, proves the peer alive.
        let _ = now_ms;
        self.ping_sent_ms = None;
        let mut partial = std::mem::take(&mut self.partial);
        let result = if partial.is_empty() {
            let r = self.decode(data, limits, &mut on_data);
            if let Ok(used) = r {
                partial.extend_from_slice(&data[used..]);
            }
            r
        } else {
            partial.extend_from_slice(data);
            let r = self.decode(&mut partial, limits, &mut on_data);
            if let Ok(used) = r {
                partial.drain(..used);
            }
            r
        };
        self.partial = if partial.is_empty() { Vec::new() } else { partial };
        match result {
            Err(code) => {
                self.partial = Vec::new();
                Some(CloseCause::Violation(code))
            }
            Ok(_) if self.peer_closed && self.phase == Phase::Open => {
                Some(CloseCause::PeerClosed(self.peer_code.take().unwrap_or(CloseCode::NORMAL)))
            }
            Ok(_) => None,
        }
    }

    /// Decodes every whole frame in `buf`; returns the bytes used.
    fn decode(
        &mut self,
        buf: &mut [u8],
        limits: &Limits,
        on_data: &mut impl FnMut(Data<'_>) -> bool,
    ) -> Result<usize, CloseCode> {
        let mut asm = std::mem::take(&mut self.asm);
        let mut pos = 0;
        let mut delivering = self.phase == Phase::Open;
        let result = loop {
            if self.peer_closed {
                break Ok(pos);
            }
            let frame = match decode_frame(&mut buf[pos..], limits) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(pos),
                Err(code) => break Err(code),
            };
            let payload = &buf[pos + frame.payload.start..pos + frame.payload.end];
            match asm.push(&frame, payload, limits) {
                Ok(Some(Message::Text(text))) if delivering => delivering = on_data(Data::Text(text)),
                Ok(Some(Message::Binary(bytes))) if delivering => delivering = on_data(Data::Binary(bytes)),
                Ok(Some(Message::Ping(payload))) if delivering => delivering = on_data(Data::Ping(payload)),
                Ok(Some(Message::Close(code))) => {
                    self.peer_closed = true;
                    self.peer_code = Some(code.map_or(CloseCode::NORMAL, CloseCode));
                }
                Ok(Some(_)) | Ok(None) => {}
                Err(code) => break Err(code),
            }
            pos += frame.consumed;
        };
        asm.release();
        self.asm = asm;
        result
    }

    /// Appends the answer to a ping with `payload` to `out`.
    pub fn pong(payload: &[u8], out: &mut Vec<u8>) {
        encode_frame(OP_PONG, payload, out);
    }

    /// Starts the close handshake at monotonic `now_ms`: the close frame to
    /// queue after everything already queued (None when already closing).
    pub fn close(&mut self, code: CloseCode, reason: &str, now_ms: u64) -> Option<Vec<u8>> {
        self.close_by(code, reason, now_ms + self.timers.close_grace_ms)
    }

    /// [`Link::close`] waiting for the peer's answer until `deadline_ms`
    /// (a shutdown's own grace period).
    pub fn close_by(&mut self, code: CloseCode, reason: &str, deadline_ms: u64) -> Option<Vec<u8>> {
        if self.phase != Phase::Open {
            return None;
        }
        self.phase = Phase::Closing { deadline_ms };
        let mut frame = Vec::with_capacity(4 + reason.len());
        encode_close(code, reason, &mut frame);
        Some(frame)
    }

    /// Everything queued was written: a close handshake both sides have
    /// sent is complete.
    pub fn flushed(&mut self) {
        if self.peer_closed && self.is_closing() {
            self.phase = Phase::Done;
        }
    }

    /// What is due at monotonic `now_ms`: a ping, a silent peer, an expired
    /// close handshake.
    pub fn check(&mut self, now_ms: u64) -> Due {
        match self.phase {
            Phase::Done => Due::Nothing,
            Phase::Closing { deadline_ms } if now_ms >= deadline_ms => {
                self.phase = Phase::Done;
                Due::CloseTimedOut
            }
            Phase::Closing { .. } => Due::Nothing,
            Phase::Open => match self.ping_sent_ms {
                Some(sent) if now_ms >= sent + self.timers.pong_timeout_ms => {
                    self.phase = Phase::Done;
                    Due::PeerSilent
                }
                None if now_ms >= self.next_ping_ms => {
                    self.ping_sent_ms = Some(now_ms);
                    self.next_ping_ms = now_ms + self.timers.ping_interval_ms;
                    let mut frame = Vec::with_capacity(2);
                    encode_frame(OP_PING, &[], &mut frame);
                    Due::Ping(frame)
                }
                _ => Due::Nothing,
            },
        }
    }

    /// The next monotonic ms at which [`Link::check`] has work.
    pub fn deadline_ms(&self) -> u64 {
        match self.phase {
            Phase::Open => match self.ping_sent_ms {
                Some(sent) => sent + self.timers.pong_timeout_ms,
                None => self.next_ping_ms,
            },
            Phase::Closing { deadline_ms } => deadline_ms,
            Phase::Done => u64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{OP_BINARY, OP_CLOSE, OP_TEXT};

    const TIMERS: LinkTimers = LinkTimers { ping_interval_ms: 30_000, pong_timeout_ms: 5_000, close_grace_ms: 3_000 };
    const LIMITS: Limits = Limits { max_message_bytes: 1024, max_fragments: 4, accept_binary: false };

    /// A masked client frame.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![(fin as u8) << 7 | opcode, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn texts(link: &mut Link, bytes: &[u8], now: u64) -> (Vec<String>, Option<CloseCause>) {
        let mut got = Vec::new();
        let mut buf = bytes.to_vec();
        let cause = link.receive(&mut buf, now, &LIMITS, |d| {
            match d {
                Data::Text(t) => got.push(t.to_string()),
                Data::Binary(_) => got.push("<binary>".into()),
                Data::Ping(p) => got.push(format!("<ping {}>", String::from_utf8_lossy(p))),
            }
            true
        });
        (got, cause)
    }

    #[test]
    fn a_frame_cut_between_reads_is_kept_until_whole() {
        let mut link = Link::new(0, TIMERS);
        let frame = client(true, OP_TEXT, b"hello");
        assert_eq!(texts(&mut link, &frame[..3], 0), (vec![], None));
        assert!(!link.is_idle(), "half a frame is held");
        assert_eq!(texts(&mut link, &frame[3..], 1), (vec!["hello".to_string()], None));
        assert!(link.is_idle());
    }

    #[test]
    fn violations_name_their_close_code() {
        let mut link = Link::new(0, TIMERS);
        let (_, cause) = texts(&mut link, &client(true, OP_BINARY, b"x"), 0);
        assert_eq!(cause, Some(CloseCause::Violation(CloseCode::UNSUPPORTED)));
        let mut link = Link::new(0, TIMERS);
        let (_, cause) = texts(&mut link, &client(true, OP_TEXT, &[0xff, 0xfe]), 0);
        assert_eq!(cause, Some(CloseCause::Violation(CloseCode::INVALID_DATA)));
    }

    #[test]
    fn the_peers_close_is_echoed_and_the_handshake_ends_when_flushed() {
        let mut link = Link::new(0, TIMERS);
        let (_, cause) = texts(&mut link, &client(true, OP_CLOSE, &4000u16.to_be_bytes()), 0);
        assert_eq!(cause, Some(CloseCause::PeerClosed(CloseCode(4000))));
        let frame = link.close(CloseCode(4000), "", 0).expect("a close frame to send");
        assert_eq!(&frame[..2], &[0x88, 2]);
        assert!(link.close(CloseCode::NORMAL, "", 0).is_none(), "one close only");
        link.flushed();
        assert!(link.is_done());
        let mut link = Link::new(0, TIMERS);
        let (_, cause) = texts(&mut link, &client(true, OP_CLOSE, &[]), 0);
        assert_eq!(cause, Some(CloseCause::PeerClosed(CloseCode::NORMAL)), "no code: answered with 1000");
    }

    #[test]
    fn our_close_waits_for_the_peer_within_the_grace() {
        let mut link = Link::new(0, TIMERS);
        assert!(link.close(CloseCode::AUTH_FAILED, "authentication failed", 100).is_some());
        link.flushed();
        assert!(link.is_closing(), "the peer has not answered");
        assert_eq!(link.deadline_ms(), 3_100);
        assert_eq!(link.check(3_099), Due::Nothing);
        assert_eq!(link.check(3_100), Due::CloseTimedOut);
        assert!(link.is_done());
    }

    #[test]
    fn pings_on_schedule_and_a_silent_peer_is_dropped() {
        let mut link = Link::new(0, TIMERS);
        assert_eq!(link.check(29_999), Due::Nothing);
        assert!(matches!(link.check(30_000), Due::Ping(f) if f == [0x89, 0]));
        assert_eq!(link.deadline_ms(), 35_000);
        // Any input answers the ping.
        texts(&mut link, &client(true, OP_TEXT, b"{}"), 31_000);
        assert_eq!(link.deadline_ms(), 60_000);
        assert!(matches!(link.check(60_000), Due::Ping(_)));
        assert_eq!(link.check(64_999), Due::Nothing);
        assert_eq!(link.check(65_000), Due::PeerSilent);
        assert!(link.is_done());
    }

    #[test]
    fn every_ping_is_handed_out_in_order_with_the_data() {
        let mut link = Link::new(0, TIMERS);
        let input = [
            client(false, OP_TEXT, b"a"),
            client(true, OP_PING, b"1"),
            client(true, 0, b"b"),
            client(true, OP_PING, b"2"),
        ]
        .concat();
        let (got, _) = texts(&mut link, &input, 0);
        assert_eq!(got, ["<ping 1>", "ab", "<ping 2>"]);
        let mut pong = Vec::new();
        Link::pong(b"2", &mut pong);
        assert_eq!(pong, [0x8a, 1, b'2']);
    }
}
