//! Fuzzes the two safetensors header parsers against each other with the JSON text itself:
//! whenever the fast path (`safetensors_fast::parse`) answers, the serde path, which handles any
//! JSON, must accept the same text with the same tensors and metadata; and neither panics.
#![no_main]

use std::path::Path;

use ema_tool::codec::safetensors::parse_serde;
use ema_tool::codec::safetensors_fast;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let slow = parse_serde(Path::new("fuzz.safetensors"), text);
    if let Some(fast) = safetensors_fast::parse(text) {
        match slow {
            Ok(slow) => assert_eq!(fast, slow, "the two parsers disagree on {text:?}"),
            Err(e) => panic!("the fast path accepts {text:?}, the serde path refuses it: {e}"),
        }
    }
});
