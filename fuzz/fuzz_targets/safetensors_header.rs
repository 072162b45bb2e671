//! Fuzzes the safetensors header validation with whole files held in memory: whatever the
//! bytes, no panic, no allocation beyond the header's own size, and whatever is accepted
//! describes the data exactly.
#![no_main]

use std::path::Path;

use ema_tool::codec::dtype::nbytes;
use ema_tool::codec::safetensors::{validate_bytes, MAX_DIMS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match validate_bytes(Path::new("fuzz.safetensors"), data) {
        Ok((tensors, _metadata)) => {
            let n = u64::from_le_bytes(data[..8].try_into().unwrap());
            let mut expect = 8 + n;
            let mut names = std::collections::HashSet::new();
            for t in &tensors {
                assert_eq!(t.offset, expect, "tensors are contiguous, in order");
                assert_eq!(Some(t.len), nbytes(t.dtype, &t.shape));
                assert!(t.shape.len() <= MAX_DIMS);
                assert!(names.insert(t.name.clone()), "names are unique");
                expect += t.len;
            }
            assert_eq!(expect, data.len() as u64, "the data is covered exactly");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "one-line message: {msg:?}");
            assert!(msg.len() < 4096, "bounded message: {} bytes", msg.len());
        }
    }
});
