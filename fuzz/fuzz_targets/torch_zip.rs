//! A whole PyTorch checkpoint (zip directory, local headers, pickle, storage records) on
//! arbitrary bytes: any input must give an archive or an error, never a panic.
//!
//! Seeds: every `.pth` fixture (`fuzz/seed.sh`).
#![no_main]

use ema_tool::codec::zip::{data_range, read_directory, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let src = Source::Bytes(data);
    if let Ok(dir) = read_directory(&src) {
        for e in &dir.entries {
            let _ = data_range(&src, &dir, e);
        }
    }
    let _ = ema_tool::fuzzing::torch_archive(data);
});
