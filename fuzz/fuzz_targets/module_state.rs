//! The walk of pickled `nn.Module` objects (`_parameters`, `_buffers`, `_modules`,
//! `_non_persistent_buffers_set`, EDM2's `_reconstruct_persistent_obj`) on arbitrary pickles:
//! a result or an error, never a panic, a hang or an unbounded allocation, and every error one
//! line. (Names given twice, as a pickled dict with a repeated key gives them, are refused
//! when the checkpoint is made, by `Checkpoint::new`.)
//!
//! Seeds: the `data.pkl` of the module fixtures (`fixtures/formats/module/`) and EDM2-style
//! snapshots, copied by `fuzz/seed.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| match ema_tool::fuzzing::pickle_names(data) {
    Ok(names) => assert!(names.len() <= 1 << 20),
    Err(e) => assert!(!e.to_string().contains('\n')),
});
