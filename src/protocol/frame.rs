//! WebSocket frame codec (RFC 6455 §5), sans-IO.
//!
//! Owns: parsing client frames out of a byte slice (unmasking in place),
//! reassembling fragmented messages under the size and fragment caps, and
//! encoding unmasked server frames into caller-owned buffers. It knows nothing
//! about sockets, JSON or sessions; a violation is reported as the close code
//! PROTOCOL.md §3 names, and the driver decides how to close.

use std::ops::Range;

/// Frame opcodes this server understands.
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes used by the codec (the full table lives in `close.rs`).
pub use super::close::CloseCode;

/// Longest server frame header: 2 bytes + 8 bytes of extended length.
pub const MAX_HEADER_LEN: usize = 10;

/// Limits the decoder enforces on every client message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame payload and largest reassembled message, in bytes.
    pub max_message_bytes: usize,
    /// Most frames one fragmented message may span (fragment floods).
    pub max_fragments: u32,
    /// Binary messages are delivered instead of refused with 1003. The
    /// service refuses them (PROTOCOL.md §3); the conformance echo build,
    /// which exercises the codec itself, accepts them.
    pub accept_binary: bool,
}

/// One frame located in the input: its header fields and where its
/// (already unmasked) payload sits in the slice given to [`decode_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Range<usize>,
    /// Bytes of input this frame occupied (header + payload).
    pub consumed: usize,
}

/// Parses one client frame from the start of `buf`, unmasking its payload in
/// place. `Ok(None)` means more bytes are needed. Checks everything that can
/// be judged from one frame alone (RSV bits, opcode, mask, control-frame
/// rules, size); sequencing rules live in [`Assembler`].
pub fn decode_frame(buf: &mut [u8], limits: &Limits) -> Result<Option<Frame>, CloseCode> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(CloseCode::PROTOCOL); // RSV bits without a negotiated extension
    }
    let opcode = b0 & 0x0F;
    let is_control = opcode & 0x8 != 0;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        _ => return Err(CloseCode::PROTOCOL),
    }
    if b1 & 0x80 == 0 {
        return Err(CloseCode::PROTOCOL); // clients must mask (§5.1)
    }
    let short = (b1 & 0x7F) as usize;
    if is_control && (!fin || short > 125) {
        return Err(CloseCode::PROTOCOL);
    }
    let (len, mut pos) = match short {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(CloseCode::PROTOCOL);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    if len > limits.max_message_bytes as u64 {
        return Err(CloseCode::TOO_BIG);
    }
    let len = len as usize;
    if buf.len() < pos + 4 + len {
        return Ok(None);
    }
    let mask = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
    pos += 4;
    unmask(&mut buf[pos..pos + len], mask);
    Ok(Some(Frame { fin, opcode, payload: pos..pos + len, consumed: pos + len }))
}

/// XORs `data` with the 4-byte masking key (RFC 6455 §5.3).
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// A complete message or control frame, ready for the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A whole text message (its UTF-8 checked here, once).
    Text(&'a str),
    /// A whole binary message (only with [`Limits::accept_binary`]).
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The peer's close frame: its status code, if it sent one.
    Close(Option<u16>),
}

/// Reassembles fragmented messages and enforces the sequencing rules:
/// continuation only inside a message, no new data message inside one,
/// a cap on fragments and on the reassembled size, UTF-8 for text.
#[derive(Debug, Default)]
pub struct Assembler {
    /// Payload of the text message being reassembled; empty when none.
    partial: Vec<u8>,
    /// Fragments seen of the current message; 0 when none is in progress.
    fragments: u32,
    /// The message being reassembled is binary.
    binary: bool,
}

impl Assembler {
    /// Feeds one decoded frame; returns a message when one is complete.
    pub fn push<'a>(
        &'a mut self,
        frame: &Frame,
        payload: &'a [u8],
        limits: &Limits,
    ) -> Result<Option<Message<'a>>, CloseCode> {
        match frame.opcode {
            OP_PING => Ok(Some(Message::Ping(payload))),
            OP_PONG => Ok(Some(Message::Pong)),
            OP_CLOSE => parse_close(payload).map(|c| Some(Message::Close(c))),
            OP_TEXT | OP_BINARY if self.fragments > 0 => Err(CloseCode::PROTOCOL),
            OP_BINARY if !limits.accept_binary => Err(CloseCode::UNSUPPORTED),
            OP_BINARY if frame.fin => Ok(Some(Message::Binary(payload))),
            OP_TEXT if frame.fin => Ok(Some(Message::Text(utf8(payload)?))),
            OP_TEXT | OP_BINARY => {
                self.fragments = 1;
                self.binary = frame.opcode == OP_BINARY;
                self.partial.clear();
                self.partial.extend_from_slice(payload);
                Ok(None)
            }
            _ => {
                // continuation
                if self.fragments == 0 {
                    return Err(CloseCode::PROTOCOL);
                }
                self.fragments += 1;
                if self.fragments > limits.max_fragments {
                    return Err(CloseCode::TOO_BIG);
                }
                if self.partial.len() + payload.len() > limits.max_message_bytes {
                    return Err(CloseCode::TOO_BIG);
                }
                self.partial.extend_from_slice(payload);
                if !frame.fin {
                    return Ok(None);
                }
                self.fragments = 0;
                if self.binary {
                    return Ok(Some(Message::Binary(&self.partial)));
                }
                Ok(Some(Message::Text(utf8(&self.partial)?)))
            }
        }
    }

    /// Releases the reassembly buffer once a fragmented message was handled,
    /// so an idle connection holds no heap memory for it.
    /// No message is being reassembled and no buffer is held.
    pub fn is_idle(&self) -> bool {
        self.fragments == 0 && self.partial.capacity() == 0
    }

    pub fn release(&mut self) {
        if self.fragments == 0 && self.partial.capacity() > 0 {
            self.partial = Vec::new();
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, CloseCode> {
    std::str::from_utf8(bytes).map_err(|_| CloseCode::INVALID_DATA)
}

/// Validates a close frame's body (RFC 6455 §5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<Option<u16>, CloseCode> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(CloseCode::PROTOCOL),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode(code).is_valid_on_wire() {
                return Err(CloseCode::PROTOCOL);
            }
            utf8(&payload[2..])?;
            Ok(Some(code))
        }
    }
}

/// Writes an unmasked server frame header for a payload of `len` bytes into
/// `out`, returning how many bytes it used.
pub fn encode_header(opcode: u8, len: usize, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Length (header + payload) of the unmasked server frame at the start of
/// `buf`, if its header is complete. Used to find frame boundaries in an
/// outbox that holds whole frames back to back.
pub fn server_frame_len(buf: &[u8]) -> Option<usize> {
    let short = (*buf.get(1)? & 0x7F) as usize;
    match short {
        126 => Some(4 + u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some(10 + u64::from_be_bytes(b) as usize)
        }
        n => Some(2 + n),
    }
}

/// Header length of the unmasked server frame at the start of `buf` (at
/// most `buf.len()`): where its payload starts.
pub fn server_header_len(buf: &[u8]) -> usize {
    match buf.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
    .min(buf.len())
}

/// Appends one complete unmasked server frame to `out`.
pub fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(opcode, payload.len(), &mut header);
    out.reserve(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and a short reason.
pub fn encode_close(code: CloseCode, reason: &str, out: &mut Vec<u8>) {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut body = [0u8; 125];
    body[..2].copy_from_slice(&code.0.to_be_bytes());
    body[2..2 + reason.len()].copy_from_slice(reason);
    encode_frame(OP_CLOSE, &body[..2 + reason.len()], out);
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_message_bytes: 16384, max_fragments: 4, accept_binary: false };

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
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
        out
    }

    #[test]
    fn decodes_masked_text_frame() {
        let mut buf = client_frame(true, OP_TEXT, b"Hello");
        let f = decode_frame(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!(&buf[f.payload.clone()], b"Hello");
        assert_eq!(f.consumed, buf.len());
    }

    #[test]
    fn waits_for_more_bytes_at_every_prefix() {
        let full = client_frame(true, OP_TEXT, &[b'x'; 300]);
        for cut in 0..full.len() {
            let mut part = full[..cut].to_vec();
            assert_eq!(decode_frame(&mut part, &LIMITS), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn rejects_unmasked_rsv_and_bad_opcodes() {
        let mut unmasked = vec![0x81, 0x01, b'a'];
        assert_eq!(decode_frame(&mut unmasked, &LIMITS), Err(CloseCode::PROTOCOL));
        let mut rsv = client_frame(true, OP_TEXT, b"a");
        rsv[0] |= 0x40;
        assert_eq!(decode_frame(&mut rsv, &LIMITS), Err(CloseCode::PROTOCOL));
        let mut op = client_frame(true, 0x3, b"a");
        assert_eq!(decode_frame(&mut op, &LIMITS), Err(CloseCode::PROTOCOL));
        let mut frag_ping = client_frame(false, OP_PING, b"a");
        assert_eq!(decode_frame(&mut frag_ping, &LIMITS), Err(CloseCode::PROTOCOL));
        let mut long_ping = client_frame(true, OP_PING, &[0; 126]);
        assert_eq!(decode_frame(&mut long_ping, &LIMITS), Err(CloseCode::PROTOCOL));
    }

    #[test]
    fn too_big_is_judged_from_the_header() {
        let mut head = client_frame(true, OP_TEXT, &vec![b'a'; 16385])[..14].to_vec();
        assert_eq!(decode_frame(&mut head, &LIMITS), Err(CloseCode::TOO_BIG));
    }

    fn feed(asm: &mut Assembler, bytes: Vec<u8>) -> Result<Option<String>, CloseCode> {
        let mut bytes = bytes;
        let f = decode_frame(&mut bytes, &LIMITS)?.unwrap();
        let payload = bytes[f.payload.clone()].to_vec();
        Ok(asm.push(&f, &payload, &LIMITS)?.map(|m| match m {
            Message::Text(t) => t.to_string(),
            other => format!("{other:?}"),
        }))
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control() {
        let mut asm = Assembler::default();
        assert_eq!(feed(&mut asm, client_frame(false, OP_TEXT, b"he")), Ok(None));
        assert_eq!(feed(&mut asm, client_frame(true, OP_PING, b"p")), Ok(Some("Ping([112])".into())));
        assert_eq!(feed(&mut asm, client_frame(false, OP_CONTINUATION, b"ll")), Ok(None));
        assert_eq!(feed(&mut asm, client_frame(true, OP_CONTINUATION, b"o")), Ok(Some("hello".into())));
    }

    #[test]
    fn sequencing_errors() {
        let mut asm = Assembler::default();
        assert_eq!(feed(&mut asm, client_frame(true, OP_CONTINUATION, b"x")), Err(CloseCode::PROTOCOL));
        let mut asm = Assembler::default();
        feed(&mut asm, client_frame(false, OP_TEXT, b"x")).unwrap();
        assert_eq!(feed(&mut asm, client_frame(true, OP_TEXT, b"y")), Err(CloseCode::PROTOCOL));
        let mut asm = Assembler::default();
        assert_eq!(feed(&mut asm, client_frame(true, OP_BINARY, b"y")), Err(CloseCode::UNSUPPORTED));
    }

    #[test]
    fn binary_only_where_accepted() {
        let open = Limits { accept_binary: true, ..LIMITS };
        let mut asm = Assembler::default();
        let mut b = client_frame(false, OP_BINARY, &[1, 2]);
        let f = decode_frame(&mut b, &open).unwrap().unwrap();
        let p = b[f.payload.clone()].to_vec();
        assert_eq!(asm.push(&f, &p, &open), Ok(None));
        let mut c = client_frame(true, OP_CONTINUATION, &[0xff]);
        let f = decode_frame(&mut c, &open).unwrap().unwrap();
        let p = c[f.payload.clone()].to_vec();
        assert_eq!(asm.push(&f, &p, &open), Ok(Some(Message::Binary(&[1, 2, 0xff]))), "not UTF-8 checked");
    }

    #[test]
    fn fragment_flood_is_capped() {
        let mut asm = Assembler::default();
        feed(&mut asm, client_frame(false, OP_TEXT, b"")).unwrap();
        for _ in 0..3 {
            feed(&mut asm, client_frame(false, OP_CONTINUATION, b"")).unwrap();
        }
        assert_eq!(feed(&mut asm, client_frame(false, OP_CONTINUATION, b"")), Err(CloseCode::TOO_BIG));
    }

    #[test]
    fn invalid_utf8_and_close_bodies() {
        let mut asm = Assembler::default();
        assert_eq!(feed(&mut asm, client_frame(true, OP_TEXT, &[0xff, 0xfe])), Err(CloseCode::INVALID_DATA));
        assert_eq!(feed(&mut asm, client_frame(true, OP_CLOSE, &[0x03])), Err(CloseCode::PROTOCOL));
        assert_eq!(feed(&mut asm, client_frame(true, OP_CLOSE, &1005u16.to_be_bytes())), Err(CloseCode::PROTOCOL));
        assert_eq!(
            feed(&mut asm, client_frame(true, OP_CLOSE, &1000u16.to_be_bytes())),
            Ok(Some("Close(Some(1000))".into()))
        );
    }

    #[test]
    fn server_frame_lengths() {
        for len in [0usize, 125, 126, 70_000] {
            let mut out = Vec::new();
            encode_frame(OP_TEXT, &vec![b'a'; len], &mut out);
            assert_eq!(server_frame_len(&out), Some(out.len()));
        }
        assert_eq!(server_frame_len(&[0x81]), None);
    }

    #[test]
    fn encoded_frames_round_trip_through_tungstenite() {
        use tungstenite::protocol::frame::FrameHeader;
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload = vec![b'z'; len];
            let mut out = Vec::new();
            encode_frame(OP_TEXT, &payload, &mut out);
            let mut cur = std::io::Cursor::new(&out[..]);
            let (header, plen) = FrameHeader::parse(&mut cur).unwrap().unwrap();
            assert!(header.is_final);
            assert_eq!(plen as usize, len);
            assert_eq!(cur.position() as usize + len, out.len());
        }
    }
}
