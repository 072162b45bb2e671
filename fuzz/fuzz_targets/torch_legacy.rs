//! Fuzzes PyTorch's legacy serialization and plain pickles with embedded storages
//! (`torch.storage._load_from_bytes`) through `Checkpoint::open` on a `.pkl` file, then reads
//! every tensor it reports: the five pickles and storage counts of a legacy file, storages
//! embedded as bytes inside another pickle, views and shared storages over them.
//!
//! Seeds: the legacy and pickle fixtures (`fixtures/formats/legacy/`, `pickle/`, `module/`),
//! copied by `fuzz/seed.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ema_tool::fuzzing::open_and_read(data, ".pkl"));
