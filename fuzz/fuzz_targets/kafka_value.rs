//! The Kafka value validator on arbitrary bytes, for every channel; a value
//! it accepts must be valid JSON (it is embedded verbatim in envelopes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use moonx_ws::ingest::validate::Validator;
use moonx_ws::protocol::message::Channel;

fuzz_target!(|data: &[u8]| {
    let mut v = Validator::default();
    for ch in Channel::ALL {
        if v.route(ch, data).is_ok() {
            // Clients parse it with their own JSON parsers: a second,
            // independent parser must agree that it is a JSON object.
            let v: serde_json::Value = serde_json::from_slice(data).expect("accepted a value that is not JSON");
            assert!(v.is_object());
        }
    }
});
