//! Fuzzes PyTorch's legacy serialization and plain pickles with embedded storages
//! (`torch.storage._load_from_bytes`) through `Checkpoint::open` on a `.pkl` file, then reads
//! every tensor it reports: the five pickles and storage counts of a legacy file, storages
//! embedded as bytes inside another pickle, views and shared storages over them.
//!
//! Seeds: the legacy and pickle fixtures (`fixtures/formats/legacy/`, `pickle/`, `module/`),
//! copied by `fuzz/seed.sh`.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

thread_local! {
    static FILE: tempfile::NamedTempFile = tempfile::Builder::new()
        .suffix(".pkl")
        .tempfile_in(if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" })
        .expect("a temporary file");
}

fuzz_target!(|data: &[u8]| {
    FILE.with(|f| {
        let mut file = f.reopen().unwrap();
        file.set_len(0).unwrap();
        file.write_all(data).unwrap();
        ema_tool::fuzzing::open_and_read(f.path());
    });
});
