//! A safetensors output: the header first, tensor data at known offsets (`docs/formats.md`).

use std::collections::BTreeMap;
use std::path::Path;

use super::atomic::{AtomicFile, Finished};
use crate::codec::safetensors::encode_header;
use crate::codec::TensorSpec;
use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// A safetensors file being written: header first, tensor data at known offsets.
pub struct SafetensorsWriter {
    file: AtomicFile,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
    total: u64,
}

impl SafetensorsWriter {
    /// Creates the temporary file, writes the header and sizes the file.
    pub fn create(
        target: &Path,
        force: bool,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
        rt: &Runtime,
    ) -> Result<SafetensorsWriter> {
        let file = AtomicFile::create(target, force, rt)?;
        let (header, offsets) = encode_header(tensors, metadata);
        let sizes: Vec<u64> = tensors.iter().map(TensorSpec::nbytes).collect();
        let total = header.len() as u64 + sizes.iter().sum::<u64>();
        file.reserve(total)?;
        file.write_at(0, &header)?;
        Ok(SafetensorsWriter {
            file,
            offsets,
            sizes,
            total,
        })
    }

    /// Total size of the file.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Checks the file is complete and syncs it; the rename is left to
    /// [`commit_all`](super::commit_all).
    pub fn finish(self) -> Result<Finished> {
        check_length(&self.file, self.total)?;
        self.file.finish()
    }

    /// Puts `bytes` at byte `off` of tensor `tensor`'s data.
    pub fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        debug_assert!(off + bytes.len() as u64 <= self.sizes[tensor]);
        self.file.write_at(self.offsets[tensor] + off, bytes)
    }

    /// Several writes (`(tensor, off, bytes)`, sorted by tensor and offset); neighbouring
    /// ranges, back to back in the file, go out in one `pwritev`.
    pub fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        let mut run: Vec<&[u8]> = Vec::new();
        let (mut start, mut end) = (0, 0);
        for &(tensor, off, bytes) in writes {
            debug_assert!(off + bytes.len() as u64 <= self.sizes[tensor]);
            let at = self.offsets[tensor] + off;
            if at != end && !run.is_empty() {
                self.file.write_vectored_at(start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                start = at;
            }
            run.push(bytes);
            end = at + bytes.len() as u64;
        }
        if !run.is_empty() {
            self.file.write_vectored_at(start, &run)?;
        }
        Ok(())
    }
}

/// Checks that `file` has the length planned for it.
pub(crate) fn check_length(file: &AtomicFile, total: u64) -> Result<()> {
    let len = file
        .file()
        .metadata()
        .map_err(|e| Error::io(file.target(), e))?
        .len();
    if len != total {
        return Err(Error::Output {
            path: file.target().to_path_buf(),
            what: format!("internal error: wrote {len} bytes, expected {total}"),
        });
    }
    Ok(())
}
