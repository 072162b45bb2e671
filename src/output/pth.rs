//! Writing a PyTorch checkpoint that holds a plain state dict, as `torch.save` writes it.
//!
//! [`PthWriter`] writes a zip of stored entries `archive/data.pkl` (an `OrderedDict` of
//! `_rebuild_tensor_v2` calls, `_rebuild_tensor_v3` for dtypes without a storage class),
//! `archive/.format_version`, `archive/.storage_alignment`, `archive/byteorder`,
//! `archive/data/<i>` (one record per tensor, 64-byte aligned) and `archive/version`, which
//! `torch.load(path, weights_only=True)` accepts. Tensor data arrives in chunks, out of order,
//! from many threads: each chunk's CRC-32 is kept and the chunks are combined in order at
//! commit, which also proves every byte was written.

use std::path::Path;
use std::sync::Mutex;

use crc32fast::Hasher;

use super::atomic::{AtomicFile, Finished};
use super::safetensors::check_length;
use crate::codec::pickle::write::{self as pw, Writer as PickleWriter};
use crate::codec::zip::write as zw;
use crate::codec::{DType, TensorSpec};
use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// Record name prefix of the archives written.
pub const PREFIX: &str = "archive/";

/// Whether torch has a legacy storage class for `d` (else it is written with
/// `_rebuild_tensor_v3` over an `UntypedStorage`, as torch does).
fn has_storage_class(d: DType) -> bool {
    !matches!(
        d,
        DType::F8E4M3 | DType::F8E5M2 | DType::U16 | DType::U32 | DType::U64
    )
}

/// Row-major strides as torch computes them (sizes of 0 count as 1).
pub fn contiguous_strides(shape: &[usize]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1].max(1) as u64;
    }
    s
}

/// `OrderedDict()`.
fn ordered_dict(w: &mut PickleWriter) {
    w.global("collections", "OrderedDict");
    w.op(pw::EMPTY_TUPLE);
    w.op(pw::REDUCE);
}

/// The rebuild call of tensor `t`, contiguous in storage record `key`, as `torch.save`
/// pickles it.
fn rebuild(w: &mut PickleWriter, t: &TensorSpec, key: &str) {
    let legacy = has_storage_class(t.dtype);
    w.global(
        "torch._utils",
        if legacy {
            "_rebuild_tensor_v2"
        } else {
            "_rebuild_tensor_v3"
        },
    );
    w.mark();
    // The persistent id ('storage', storage_type, key, location, numel).
    w.mark();
    w.str("storage");
    let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
    if legacy {
        w.global("torch", t.dtype.torch_storage());
        w.str(key);
        w.str("cpu");
        w.int(numel);
    } else {
        w.global("torch.storage", "UntypedStorage");
        w.str(key);
        w.str("cpu");
        w.int(numel * t.dtype.size() as u64);
    }
    w.op(pw::TUPLE);
    w.op(pw::BINPERSID);
    w.int(0);
    let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    w.int_tuple(&shape);
    w.int_tuple(&contiguous_strides(&t.shape));
    w.op(pw::NEWFALSE);
    ordered_dict(w);
    if !legacy {
        w.global("torch", t.dtype.torch_name());
    }
    w.op(pw::TUPLE);
    w.op(pw::REDUCE);
}

/// The `data.pkl` of a state dict holding `tensors`, tensor `i` in storage record `i`.
pub fn state_dict_pickle(tensors: &[TensorSpec]) -> Vec<u8> {
    let mut w = PickleWriter::new();
    ordered_dict(&mut w);
    w.mark();
    for (i, t) in tensors.iter().enumerate() {
        w.str(&t.name);
        rebuild(&mut w, t, &i.to_string());
    }
    w.op(pw::SETITEMS);
    w.stop()
}

/// The `data.pkl` of `torch.save(tensor)`: tensor `t` alone, in storage record `0` (a chunk
/// of a DCP checkpoint).
pub fn tensor_pickle(t: &TensorSpec) -> Vec<u8> {
    let mut w = PickleWriter::new();
    rebuild(&mut w, t, "0");
    w.stop()
}

/// CRCs of the chunks of one record, by offset.
#[derive(Default)]
pub struct Chunks(Mutex<Vec<(u64, u64, Hasher)>>);

impl Chunks {
    /// Records the CRC of `bytes`, written at `off` of the record.
    pub fn add(&self, off: u64, bytes: &[u8]) {
        let mut h = Hasher::new();
        h.update(bytes);
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.push((off, bytes.len() as u64, h));
    }

    /// The CRC of the whole record, when the chunks cover exactly `size` bytes.
    pub fn finish(self, size: u64) -> Option<u32> {
        let mut v = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        v.sort_by_key(|c| c.0);
        let mut h = Hasher::new();
        let mut at = 0;
        for (off, len, c) in v {
            if off != at {
                return None;
            }
            h.combine(&c);
            at += len;
        }
        (at == size).then(|| h.finalize())
    }
}

/// A `.pth` holding a plain state dict, being written.
pub struct PthWriter {
    file: AtomicFile,
    entries: Vec<zw::Planned>,
    /// CRC of every entry; tensor records' are filled in at commit.
    crcs: Vec<u32>,
    /// Index in `entries` of the first tensor record.
    first_tensor: usize,
    chunks: Vec<Chunks>,
    cd_offset: u64,
    total: u64,
}

impl PthWriter {
    /// Creates the temporary file and writes everything but the tensor data.
    pub fn create(
        target: &Path,
        force: bool,
        tensors: &[TensorSpec],
        rt: &Runtime,
    ) -> Result<PthWriter> {
        let file = AtomicFile::create(target, force, rt)?;
        let pickle = state_dict_pickle(tensors);
        let head: Vec<(String, Vec<u8>)> = vec![
            (format!("{PREFIX}data.pkl"), pickle),
            (format!("{PREFIX}.format_version"), b"1".to_vec()),
            (format!("{PREFIX}.storage_alignment"), b"64".to_vec()),
            (format!("{PREFIX}byteorder"), b"little".to_vec()),
        ];
        let tail: Vec<(String, Vec<u8>)> = vec![(format!("{PREFIX}version"), b"3\n".to_vec())];
        let mut spec: Vec<(String, u64)> = head
            .iter()
            .map(|(n, d)| (n.clone(), d.len() as u64))
            .collect();
        let first_tensor = spec.len();
        for (i, t) in tensors.iter().enumerate() {
            spec.push((format!("{PREFIX}data/{i}"), t.nbytes()));
        }
        spec.extend(tail.iter().map(|(n, d)| (n.clone(), d.len() as u64)));
        let (entries, cd_offset) = zw::plan(&spec);
        let mut crcs = vec![0u32; entries.len()];
        let small = head.iter().enumerate().chain(
            tail.iter()
                .enumerate()
                .map(|(i, e)| (first_tensor + tensors.len() + i, e)),
        );
        for (i, (_, data)) in small {
            let e = &entries[i];
            crcs[i] = crc32fast::hash(data);
            file.write_at(e.data_offset, data)?;
        }
        for (e, crc) in entries.iter().zip(&crcs) {
            let mut h = e.header.clone();
            h[14..18].copy_from_slice(&crc.to_le_bytes());
            file.write_at(e.local_offset, &h)?;
        }
        let with: Vec<(&zw::Planned, u32)> = entries.iter().map(|e| (e, 0)).collect();
        let total = cd_offset + zw::central_directory(&with, cd_offset).len() as u64;
        Ok(PthWriter {
            file,
            entries,
            crcs,
            first_tensor,
            chunks: tensors.iter().map(|_| Chunks::default()).collect(),
            cd_offset,
            total,
        })
    }

    /// Total size of the file.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Fills in the tensor records' CRCs, writes the central directory and syncs; the rename
    /// is left to [`commit_all`](super::commit_all).
    pub fn finish(mut self) -> Result<Finished> {
        let chunks = std::mem::take(&mut self.chunks);
        for (i, c) in chunks.into_iter().enumerate() {
            let k = self.first_tensor + i;
            let e = &self.entries[k];
            let crc = c.finish(e.size).ok_or_else(|| Error::Output {
                path: self.file.target().to_path_buf(),
                what: format!(
                    "internal error: record {} was not completely written",
                    e.name
                ),
            })?;
            self.crcs[k] = crc;
            self.file
                .write_at(e.local_offset + 14, &crc.to_le_bytes())?;
        }
        let with: Vec<(&zw::Planned, u32)> =
            self.entries.iter().zip(self.crcs.iter().copied()).collect();
        let cd = zw::central_directory(&with, self.cd_offset);
        self.file.write_at(self.cd_offset, &cd)?;
        check_length(&self.file, self.total)?;
        self.file.finish()
    }
}

impl PthWriter {
    /// Puts `bytes` at byte `off` of tensor `tensor`'s record.
    pub fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        let e = &self.entries[self.first_tensor + tensor];
        debug_assert!(off + bytes.len() as u64 <= e.size);
        self.file.write_at(e.data_offset + off, bytes)?;
        self.chunks[tensor].add(off, bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::torch::flatten_pickle_bytes;
    use proptest::prelude::*;

    proptest! {
        /// What the writer pickles, the reader flattens back: names, dtypes, shapes, each
        /// tensor contiguous in its own storage.
        #[test]
        fn state_dict_pickle_round_trips(
            spec in proptest::collection::vec(
                ("[a-z_.]{1,12}", 0usize..DType::ALL.len(), proptest::collection::vec(0usize..5, 0..4)),
                0..12,
            )
        ) {
            let mut seen = std::collections::HashSet::new();
            let tensors: Vec<TensorSpec> = spec
                .into_iter()
                .filter(|(n, _, _)| seen.insert(n.clone()))
                .map(|(name, d, shape)| TensorSpec { name, dtype: DType::ALL[d], shape })
                .collect();
            let back = flatten_pickle_bytes(&state_dict_pickle(&tensors)).unwrap();
            prop_assert_eq!(back.len(), tensors.len());
            for (i, (b, t)) in back.iter().zip(&tensors).enumerate() {
                prop_assert_eq!(&b.name, &t.name);
                prop_assert_eq!(b.dtype, t.dtype);
                prop_assert_eq!(&b.shape, &t.shape);
                prop_assert!(b.is_contiguous());
                prop_assert_eq!(b.storage, i);
                prop_assert_eq!(b.storage_offset, 0);
            }
        }
    }

    #[test]
    fn strides_like_torch() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[3, 0]), vec![1, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<u64>::new());
    }

    #[test]
    fn chunk_crcs_combine_in_order() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let c = Chunks::default();
        c.add(600, &data[600..]);
        c.add(0, &data[..250]);
        c.add(250, &data[250..600]);
        assert_eq!(c.finish(1000), Some(crc32fast::hash(&data)));
        let gap = Chunks::default();
        gap.add(0, &data[..10]);
        gap.add(20, &data[20..]);
        assert_eq!(gap.finish(1000), None);
    }
}
