//! The restricted pickle machine and the flattening of its object graph, on arbitrary bytes:
//! any input must give a result or an error, never a panic, a hang or an unbounded allocation.
//!
//! Seeds: the `data.pkl` of every fixture (`fuzz/seed.sh`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ema_tool::fuzzing::flatten_pickle(data);
});
