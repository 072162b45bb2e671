//! Writing a torch distributed checkpoint (`-o DIR --format dcp`, `docs/dcp-format.md`), as one
//! rank writes it: `DIR/__0_0.distcp` holds one `torch.save` zip per tensor, back to back (each
//! tensor whole, one chunk), and `DIR/.metadata` the protocol-2 pickle of DCP's `Metadata` that
//! `torch.distributed.checkpoint.load` and `format_utils.dcp_to_torch_save` read, with the
//! planner data that nests the state dict as it was saved.
//!
//! Both files are written in a temporary directory that the command renames to DIR once they
//! are committed (`cmd::fold::publish`), and removes when the fold fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::atomic::{AtomicFile, Finished};
use super::pth::{tensor_pickle, Chunks, PREFIX};
use super::safetensors::check_length;
use crate::checkpoint::dcp::PathKey;
use crate::codec::pickle::write::{self as pw, Writer as PickleWriter};
use crate::codec::zip::write as zw;
use crate::codec::TensorSpec;
use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// The one data file written.
pub const DATA_FILE: &str = "__0_0.distcp";
/// DCP's metadata classes.
const MD: &str = "torch.distributed.checkpoint.metadata";

/// A non-tensor entry to write: its FQN and its `torch.save` bytes, made here or copied from
/// a range of an input's file.
pub enum Extra<'a> {
    Made(String, Vec<u8>),
    Copied(String, &'a std::fs::File, u64, u64),
}

impl Extra<'_> {
    fn fqn(&self) -> &str {
        match self {
            Extra::Made(f, _) | Extra::Copied(f, ..) => f,
        }
    }
}

/// The `torch.save` bytes of the integer `n` (`data.pkl` and the records torch writes).
pub fn int_item(n: u64) -> Vec<u8> {
    let mut w = PickleWriter::new();
    w.int(n);
    let pickle = w.stop();
    let records: [(&str, &[u8]); 5] = [
        ("data.pkl", &pickle),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
        ("version", b"3\n"),
    ];
    let named: Vec<(String, &[u8])> = records
        .iter()
        .map(|(n, d)| (format!("{PREFIX}{n}"), *d))
        .collect();
    zw::archive(&named)
}

/// One tensor's `torch.save` zip inside the data file.
struct Item {
    /// Where its zip starts in the data file.
    base: u64,
    entries: Vec<zw::Planned>,
    crcs: Vec<u32>,
    /// Index in `entries` of `data/0`.
    data: usize,
}

/// A DCP directory being written.
pub struct DcpWriter {
    dir: PathBuf,
    data: AtomicFile,
    metadata: AtomicFile,
    items: Vec<Item>,
    chunks: Vec<Chunks>,
    total: u64,
}

impl DcpWriter {
    /// Creates both files in `dir` (which exists) and writes everything but the tensor data:
    /// first the non-tensor entries `extra` (`(fqn, torch.save bytes)`, copied as they are),
    /// then a zip per tensor. `planner` gives the nesting of each name (default: the name
    /// itself, flat).
    pub fn create(
        dir: &Path,
        force: bool,
        tensors: &[TensorSpec],
        extra: &[Extra],
        planner: &HashMap<String, Vec<PathKey>>,
        rt: &Runtime,
    ) -> Result<DcpWriter> {
        let data = AtomicFile::create(&dir.join(DATA_FILE), force, rt)?;
        let mut items = Vec::with_capacity(tensors.len());
        let mut base = 0u64;
        let mut bytes_at = Vec::with_capacity(extra.len());
        for x in extra {
            let len = match x {
                Extra::Made(_, raw) => {
                    data.write_at(base, raw)?;
                    raw.len() as u64
                }
                Extra::Copied(_, file, off, len) => {
                    // Through a bounded buffer: an entry may be large.
                    let mut buf = vec![0u8; (*len).min(8 << 20) as usize];
                    let mut done = 0u64;
                    while done < *len {
                        let k = (*len - done).min(buf.len() as u64) as usize;
                        std::os::unix::fs::FileExt::read_exact_at(*file, &mut buf[..k], off + done)
                            .map_err(|e| Error::io(dir, e))?;
                        data.write_at(base + done, &buf[..k])?;
                        done += k as u64;
                    }
                    *len
                }
            };
            bytes_at.push((x.fqn(), base, len));
            base += len;
        }
        for t in tensors {
            let pickle = tensor_pickle(t);
            let spec = vec![
                (format!("{PREFIX}data.pkl"), pickle.len() as u64),
                (format!("{PREFIX}.format_version"), 1),
                (format!("{PREFIX}.storage_alignment"), 2),
                (format!("{PREFIX}byteorder"), 6),
                (format!("{PREFIX}data/0"), t.nbytes()),
                (format!("{PREFIX}version"), 2),
            ];
            let (entries, cd_offset) = zw::plan(&spec);
            let small: [(usize, &[u8]); 5] = [
                (0, &pickle),
                (1, b"1"),
                (2, b"64"),
                (3, b"little"),
                (5, b"3\n"),
            ];
            let mut crcs = vec![0u32; entries.len()];
            for (i, bytes) in small {
                crcs[i] = crc32fast::hash(bytes);
                data.write_at(base + entries[i].data_offset, bytes)?;
            }
            for (e, crc) in entries.iter().zip(&crcs) {
                let mut h = e.header.clone();
                h[14..18].copy_from_slice(&crc.to_le_bytes());
                data.write_at(base + e.local_offset, &h)?;
            }
            let with: Vec<(&zw::Planned, u32)> = entries.iter().map(|e| (e, 0)).collect();
            let len = cd_offset + zw::central_directory(&with, cd_offset).len() as u64;
            items.push(Item {
                base,
                entries,
                crcs,
                data: 4,
            });
            base += len;
        }
        let metadata = AtomicFile::create(&dir.join(".metadata"), force, rt)?;
        let pickle = metadata_pickle(tensors, &items, base, &bytes_at, planner);
        metadata.write_at(0, &pickle)?;
        Ok(DcpWriter {
            dir: dir.to_path_buf(),
            data,
            metadata,
            chunks: tensors.iter().map(|_| Chunks::default()).collect(),
            items,
            total: base + pickle.len() as u64,
        })
    }

    /// Bytes of both files.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// The directory written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Puts `bytes` at byte `off` of tensor `tensor`'s data.
    pub fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        let it = &self.items[tensor];
        let e = &it.entries[it.data];
        if off + bytes.len() as u64 > e.size {
            return Err(Error::Output {
                path: self.dir.clone(),
                what: format!("internal error: a write past the end of tensor {tensor}"),
            });
        }
        self.data.write_at(it.base + e.data_offset + off, bytes)?;
        self.chunks[tensor].add(off, bytes);
        Ok(())
    }

    /// Fills in the CRCs of the tensor records, writes each zip's central directory, syncs;
    /// the renames are left to `commit_all`.
    pub fn finish(mut self) -> Result<Vec<Finished>> {
        let chunks = std::mem::take(&mut self.chunks);
        let mut end = 0;
        for (it, c) in self.items.iter_mut().zip(chunks) {
            let e = &it.entries[it.data];
            let crc = c.finish(e.size).ok_or_else(|| Error::Output {
                path: self.dir.clone(),
                what: "internal error: a tensor was not completely written".into(),
            })?;
            it.crcs[it.data] = crc;
            self.data
                .write_at(it.base + e.local_offset + 14, &crc.to_le_bytes())?;
            let cd_offset = {
                let last = it.entries.last().expect("entries");
                last.data_offset + last.size
            };
            let with: Vec<(&zw::Planned, u32)> =
                it.entries.iter().zip(it.crcs.iter().copied()).collect();
            let cd = zw::central_directory(&with, cd_offset);
            self.data.write_at(it.base + cd_offset, &cd)?;
            end = it.base + cd_offset + cd.len() as u64;
        }
        check_length(&self.data, end)?;
        Ok(vec![self.data.finish()?, self.metadata.finish()?])
    }
}

/// `GLOBAL module.name`, `EMPTY_TUPLE`, `NEWOBJ`: an object whose state follows (then BUILD).
fn new_object(w: &mut PickleWriter, module: &str, name: &str) {
    w.global(module, name);
    w.op(pw::EMPTY_TUPLE);
    w.op(pw::NEWOBJ);
}

/// `_StorageInfo(relative_path=DATA_FILE, offset, length)`.
fn storage_info(w: &mut PickleWriter, offset: u64, length: u64) {
    new_object(w, "torch.distributed.checkpoint.filesystem", "_StorageInfo");
    w.op(pw::EMPTY_DICT);
    w.mark();
    w.str("relative_path");
    w.str(DATA_FILE);
    w.str("offset");
    w.int(offset);
    w.str("length");
    w.int(length);
    w.op(pw::SETITEMS);
    w.op(pw::BUILD);
}

/// `torch.Size(dims)`.
fn size(w: &mut PickleWriter, dims: &[u64]) {
    w.global("torch", "Size");
    w.mark();
    w.int_tuple(dims);
    w.op(pw::TUPLE);
    w.op(pw::REDUCE);
}

/// The `.metadata` pickle: `Metadata(state_dict_metadata, planner_data, storage_data,
/// storage_meta=None, version="1.0.0")`, each tensor one chunk at offsets 0 of `items`.
fn metadata_pickle(
    tensors: &[TensorSpec],
    items: &[Item],
    end: u64,
    bytes: &[(&str, u64, u64)],
    planner: &HashMap<String, Vec<PathKey>>,
) -> Vec<u8> {
    let mut w = PickleWriter::new();
    new_object(&mut w, MD, "Metadata");
    w.op(pw::EMPTY_DICT);
    w.mark();
    w.str("state_dict_metadata");
    w.op(pw::EMPTY_DICT);
    w.mark();
    for (fqn, _, _) in bytes {
        w.str(fqn);
        new_object(&mut w, MD, "BytesStorageMetadata");
    }
    for t in tensors {
        let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        let zeros = vec![0u64; shape.len()];
        w.str(&t.name);
        new_object(&mut w, MD, "TensorStorageMetadata");
        w.op(pw::EMPTY_DICT);
        w.mark();
        w.str("properties");
        new_object(&mut w, MD, "TensorProperties");
        // (dtype, layout, requires_grad, memory_format, pin_memory, strides)
        w.mark();
        w.global("torch", t.dtype.torch_name());
        w.global("torch", "strided");
        w.op(pw::NEWFALSE);
        w.global(MD, "_MEM_FORMAT_ENCODING");
        w.mark();
        w.int(0);
        w.op(pw::TUPLE);
        w.op(pw::REDUCE);
        w.op(pw::NEWFALSE);
        w.int_tuple(&super::pth::contiguous_strides(&t.shape));
        w.op(pw::TUPLE);
        w.op(pw::BUILD);
        w.str("size");
        size(&mut w, &shape);
        w.str("chunks");
        w.op(pw::EMPTY_LIST);
        new_object(&mut w, MD, "ChunkStorageMetadata");
        w.op(pw::EMPTY_DICT);
        w.mark();
        w.str("offsets");
        size(&mut w, &zeros);
        w.str("sizes");
        size(&mut w, &shape);
        w.op(pw::SETITEMS);
        w.op(pw::BUILD);
        w.op(pw::APPEND);
        w.op(pw::SETITEMS);
        w.op(pw::BUILD);
    }
    w.op(pw::SETITEMS);
    w.str("planner_data");
    w.op(pw::EMPTY_DICT);
    w.mark();
    let names = bytes
        .iter()
        .map(|b| b.0)
        .chain(tensors.iter().map(|t| t.name.as_str()));
    for name in names {
        w.str(name);
        w.mark();
        match planner.get(name) {
            Some(path) => {
                for k in path {
                    match k {
                        PathKey::Key(s) => w.str(s),
                        PathKey::Index(i) => w.int(*i),
                    }
                }
            }
            None => w.str(name),
        }
        w.op(pw::TUPLE);
    }
    w.op(pw::SETITEMS);
    w.str("storage_data");
    w.op(pw::EMPTY_DICT);
    w.mark();
    for &(fqn, off, len) in bytes {
        new_object(&mut w, MD, "MetadataIndex");
        w.op(pw::EMPTY_DICT);
        w.mark();
        w.str("fqn");
        w.str(fqn);
        w.str("index");
        w.op(pw::NONE);
        w.op(pw::SETITEMS);
        w.op(pw::BUILD);
        storage_info(&mut w, off, len);
    }
    for (i, (t, it)) in tensors.iter().zip(items).enumerate() {
        let zeros = vec![0u64; t.shape.len()];
        new_object(&mut w, MD, "MetadataIndex");
        w.op(pw::EMPTY_DICT);
        w.mark();
        w.str("fqn");
        w.str(&t.name);
        w.str("offset");
        size(&mut w, &zeros);
        w.str("index");
        w.int(0);
        w.op(pw::SETITEMS);
        w.op(pw::BUILD);
        let next = items.get(i + 1).map_or(end, |n| n.base);
        storage_info(&mut w, it.base, next - it.base);
    }
    w.op(pw::SETITEMS);
    w.str("storage_meta");
    w.op(pw::NONE);
    w.str("version");
    w.str("1.0.0");
    w.op(pw::SETITEMS);
    w.op(pw::BUILD);
    w.stop()
}
