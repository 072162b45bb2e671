//! The entry points of the fuzz targets (`fuzz/fuzz_targets/`) into internals that no other
//! caller needs. Each runs one parser on arbitrary bytes; none of them is part of the library's
//! interface.

use crate::error::Result;

/// The restricted pickle machine and the flattening of its object graph, every storage record
/// taken to exist (target `pickle`). Returns how many tensors the pickle holds.
pub fn flatten_pickle(bytes: &[u8]) -> Result<usize> {
    crate::checkpoint::torch::flatten_pickle_bytes(bytes).map(|t| t.len())
}

/// A whole PyTorch archive held in memory: zip directory, local headers, pickle, storage
/// records (target `torch_zip`). Returns how many tensors it holds.
pub fn torch_archive(bytes: &[u8]) -> Result<usize> {
    crate::checkpoint::torch::parse_archive_bytes(bytes)
}

/// The names of the tensors a pickle holds once flattened, pickled modules walked as their
/// `state_dict()` names (target `module_state`).
pub fn pickle_names(bytes: &[u8]) -> Result<Vec<String>> {
    crate::checkpoint::torch::flatten_pickle_bytes(bytes)
        .map(|t| t.into_iter().map(|t| t.name).collect())
}

/// A DCP `.metadata` pickle, read as the DCP reader reads it (target `dcp_metadata`). Returns
/// how many entries it describes.
pub fn dcp_metadata(bytes: &[u8]) -> Result<usize> {
    crate::checkpoint::dcp::parse_metadata_bytes(bytes)
}

/// Writes `bytes` to this thread's temporary file ending in `suffix` (one per thread and
/// suffix, rewritten for every input, on tmpfs when `/dev/shm` exists), opens it as the command
/// line does and reads every tensor it reports (targets `torch_reader`, `torch_legacy`): a
/// tensor that was reported but does not read back, or an error of more than one line, is a
/// panic.
pub fn open_and_read(bytes: &[u8], suffix: &str) {
    use std::io::Write;

    use crate::checkpoint::{Checkpoint, Open};
    thread_local! {
        static FILES: std::cell::RefCell<std::collections::HashMap<String, tempfile::NamedTempFile>> =
            Default::default();
    }
    FILES.with(|files| {
        let mut files = files.borrow_mut();
        let f = files.entry(suffix.to_string()).or_insert_with(|| {
            let tmpfs = std::path::Path::new("/dev/shm");
            tempfile::Builder::new()
                .suffix(suffix)
                .tempfile_in(if tmpfs.is_dir() {
                    tmpfs
                } else {
                    std::path::Path::new("/tmp")
                })
                .expect("a temporary file")
        });
        let mut file = f.reopen().unwrap();
        file.set_len(0).unwrap();
        file.write_all(bytes).unwrap();
        match Checkpoint::open(f.path(), Open::Readable) {
            Ok(c) => {
                for t in c.tensors() {
                    assert!(t.len <= c.files()[t.file].len());
                    let mut buf = vec![0u8; t.len as usize];
                    c.read_at(t, 0, &mut buf).expect("a validated tensor reads");
                }
            }
            Err(e) => assert!(!e.to_string().contains('\n')),
        }
    });
}
