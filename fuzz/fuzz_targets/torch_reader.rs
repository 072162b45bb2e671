//! Fuzzes opening a PyTorch zip checkpoint (`.pth`) the way the command line does, through
//! `Checkpoint::open` on a file, then reads every tensor it reports. Until the torch reader
//! lands this only exercises format detection; once `Checkpoint::open` routes zips to it, the
//! same target fuzzes the reader and the restricted unpickler without change. Seeds:
//! `fuzz/seeds/torch_reader/`, made by `fuzz/make_torch_seeds.py`.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

thread_local! {
    // One file per fuzzing thread, rewritten for every input (tmpfs when /dev/shm exists).
    static FILE: tempfile::NamedTempFile = tempfile::Builder::new()
        .suffix(".pth")
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
