//! The HTTP request head parser and the upgrade routing on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moonx_ws::protocol::handshake::{parse_head, route, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Parsed::Complete(head, used) = parse_head(data) {
        assert!(used <= data.len());
        let _ = route(&head);
    }
});
