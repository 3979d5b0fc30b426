//! The client message parser on arbitrary (UTF-8 or not) text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moonx_ws::protocol::message::parse_client;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse_client(data) {
        if let Some(id) = &m.id {
            assert!(id.len() <= 128);
        }
    }
});
