//! The `.metadata` pickle of a torch distributed checkpoint, read as the DCP reader reads it
//! (restricted pickle machine, DCP's classes recognised by name): a result or a one-line
//! error, never a panic, a hang or an unbounded allocation.
//!
//! Seeds: the `.metadata` of every checkpoint under `fixtures/dcp/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = ema_tool::fuzzing::dcp_metadata(data) {
        assert!(!e.to_string().contains('\n'));
    }
});
