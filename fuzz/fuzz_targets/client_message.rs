//! The client message parser on arbitrary text (the codec hands it only
//! valid UTF-8; other input is refused before it).
#![no_main]
use libfuzzer_sys::fuzz_target;
use moonx_ws::protocol::message::parse_client;

fuzz_target!(|text: &str| {
    if let Ok(m) = parse_client(text) {
        if let Some(id) = &m.id {
            assert!(id.len() <= 128);
        }
    }
});
