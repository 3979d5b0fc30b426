//! The frame decoder and message assembler on an arbitrary byte stream, as
//! a connection would feed them: decode, assemble, advance, until stuck.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moonx_ws::protocol::frame::{decode_frame, Assembler, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_message_bytes: 16384, max_fragments: 64, accept_binary: data.first() == Some(&0) };
    let mut buf = data.to_vec();
    let mut asm = Assembler::default();
    let mut pos = 0;
    while pos < buf.len() {
        match decode_frame(&mut buf[pos..], &limits) {
            Ok(Some(f)) => {
                assert!(f.consumed > 0 && pos + f.consumed <= buf.len());
                let payload = buf[pos + f.payload.start..pos + f.payload.end].to_vec();
                if asm.push(&f, &payload, &limits).is_err() {
                    break;
                }
                pos += f.consumed;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
