//! Fuzzes opening a PyTorch zip checkpoint (`.pth`) the way the command line does, through
//! `Checkpoint::open` on a file, then reads every tensor it reports: format detection, the zip
//! reader and the restricted unpickler. Seeds: `fuzz/seeds/torch_reader/`, made by
//! `fuzz/make_torch_seeds.py`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ema_tool::fuzzing::open_and_read(data, ".pth"));
