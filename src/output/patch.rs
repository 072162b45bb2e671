//! `swap` inside a PyTorch checkpoint: a copy of the archive in which the storage records of
//! each EMA pair exchange their contents. Every other byte, the pickle included, stays as it
//! was, except the CRC fields of the exchanged records and the archive comment; so the
//! optimizer, the message hub and the rest of the checkpoint are kept, and the training
//! framework can still resume from the result.
//!
//! [`plan_exchange`] decides which records trade places, [`slots`] says which bytes go where
//! (a plain range copy from the input, which the fold runs like any other copy), and
//! [`PatchWriter`] writes the copy.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::atomic::{AtomicFile, Finished};
use super::safetensors::check_length;
use crate::checkpoint::torch::{Parts, COMMENT_PREFIX};
use crate::checkpoint::Checkpoint;
use crate::codec::zip;
use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// The parts of a PyTorch checkpoint a patch needs, or an error when it is not one.
fn parts(ckpt: &Checkpoint) -> Result<&Parts> {
    ckpt.torch()
        .ok_or_else(|| Error::format(ckpt.path(), "is not a PyTorch archive"))
}

/// The pairs of storage records (indices into the archive's storages) whose contents to
/// exchange so that the tensors of every pair (`model`, `shadow`: indices into the
/// checkpoint's tensors) exchange values and no other tensor changes.
///
/// Fails, naming the tensor, when that is impossible without re-encoding the pickle: the two
/// views differ, or a storage is shared with a tensor outside the pairs.
pub fn plan_exchange(ckpt: &Checkpoint, pairs: &[(usize, usize)]) -> Result<Vec<(usize, usize)>> {
    let path = ckpt.path();
    let storages = &parts(ckpt)?.storages;
    let tensors = ckpt.tensors();
    let view = |i: usize| {
        tensors[i]
            .view
            .as_deref()
            .ok_or_else(|| Error::tensor(path, &tensors[i].name, "is not in the archive"))
    };
    let advice = "; write a .safetensors output instead";
    let mut partner: HashMap<usize, usize> = HashMap::new();
    let mut paired: HashSet<usize> = HashSet::new();
    let mut out = Vec::new();
    for &(mi, si) in pairs {
        let (tm, ts) = (&tensors[mi], &tensors[si]);
        let (vm, vs) = (view(mi)?, view(si)?);
        paired.insert(mi);
        paired.insert(si);
        let same_view = tm.dtype == ts.dtype
            && tm.shape == ts.shape
            && vm.stride == vs.stride
            && vm.storage_offset == vs.storage_offset;
        if !same_view {
            return Err(Error::tensor(
                path,
                &tm.name,
                format!(
                    "cannot be exchanged inside the archive: it and `{}` are laid out \
                     differently in their storages{advice}",
                    ts.name
                ),
            ));
        }
        if vm.storage == vs.storage {
            // The same view of the same storage: the values are already equal.
            continue;
        }
        let (a, b) = (&storages[vm.storage], &storages[vs.storage]);
        if a.nbytes != b.nbytes || a.record_len != b.record_len {
            return Err(Error::tensor(
                path,
                &tm.name,
                format!(
                    "cannot be exchanged inside the archive: its storage holds {} bytes, that \
                     of `{}` {}{advice}",
                    a.record_len, ts.name, b.record_len
                ),
            ));
        }
        for (x, y) in [(vm.storage, vs.storage), (vs.storage, vm.storage)] {
            match partner.insert(x, y) {
                Some(prev) if prev != y => {
                    return Err(Error::tensor(
                        path,
                        &tm.name,
                        format!(
                            "cannot be exchanged inside the archive: its storage is shared with \
                             tensors paired with another storage{advice}"
                        ),
                    ))
                }
                Some(_) => {}
                None if x < y => out.push((x, y)),
                None => {}
            }
        }
    }
    for (i, t) in tensors.iter().enumerate() {
        if let Some(v) = &t.view {
            if partner.contains_key(&v.storage) && !paired.contains(&i) {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "shares its storage with an EMA pair, so the pair cannot be exchanged \
                         inside the archive{advice}"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// One record of the patched archive to fill: its name and size, and the byte range of the
/// input (in its first data file) whose bytes it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The zip entry name of the record filled.
    pub name: String,
    /// Where its bytes come from: offset and length in the input's file.
    pub from: (u64, u64),
}

/// The slots of the exchange, in the order [`PatchWriter`] numbers them: for every exchanged
/// pair `(a, b)`, record `a` filled from record `b`, then record `b` from record `a`.
pub fn slots(ckpt: &Checkpoint, exchanges: &[(usize, usize)]) -> Result<Vec<Slot>> {
    let storages = &parts(ckpt)?.storages;
    let slot = |to: usize, from: usize| Slot {
        name: storages[to].entry.name.clone(),
        from: (storages[from].data_offset, storages[from].record_len),
    };
    Ok(exchanges
        .iter()
        .flat_map(|&(a, b)| [slot(a, b), slot(b, a)])
        .collect())
}

/// The archive comment recording `record` (the `ema_tool` JSON) for a later `ema-tool`.
pub fn comment_for(record: &serde_json::Value) -> String {
    format!("{COMMENT_PREFIX}{record}")
}

/// A copy of a PyTorch checkpoint being written, with some storage records to be filled.
pub struct PatchWriter {
    file: AtomicFile,
    /// Absolute data offset of each slot's record.
    offsets: Vec<u64>,
    total: u64,
}

impl PatchWriter {
    /// Copies `ckpt`'s file, through the handle it was read with, to a temporary file beside
    /// `target`, with the comment `comment` (`ema_tool:{json}`, or empty), and prepares the
    /// exchange of the records of each pair of storages in `exchanges`: the CRCs are
    /// exchanged now, the contents arrive through [`PatchWriter::write`] for the slots of
    /// [`slots`].
    pub fn create(
        target: &Path,
        force: bool,
        ckpt: &Checkpoint,
        exchanges: &[(usize, usize)],
        comment: &str,
        rt: &Runtime,
    ) -> Result<PatchWriter> {
        let input = ckpt.path();
        let parts = parts(ckpt)?;
        if comment.len() > 0xFFFF {
            return Err(Error::Output {
                path: target.to_path_buf(),
                what: "internal error: archive comment too long".into(),
            });
        }
        let mut ranges: Vec<(u64, u64)> = exchanges
            .iter()
            .flat_map(|&(a, b)| [a, b])
            .map(|s| {
                let st = &parts.storages[s];
                (st.data_offset, st.data_offset + st.record_len)
            })
            .collect();
        ranges.sort_unstable();
        if ranges.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(Error::format(
                input,
                "storage records overlap; cannot exchange them in place",
            ));
        }
        let file = AtomicFile::create(target, force, rt)?;
        let src = &ckpt.files()[0];
        // Everything up to the comment length field of the end record.
        let keep = parts.eocd_offset + 20;
        copy_range(src.file(), file.file(), keep).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Error::format(input, "file shrank while being copied")
            }
            _ => Error::io(input, e),
        })?;
        let mut tail = (comment.len() as u16).to_le_bytes().to_vec();
        tail.extend_from_slice(comment.as_bytes());
        file.write_at(keep, &tail)?;
        let total = keep + tail.len() as u64;

        let zsrc = src.zip_source();
        let fmt = |e: String| Error::format(input, e);
        let mut offsets = Vec::with_capacity(exchanges.len() * 2);
        for &(a, b) in exchanges {
            let (sa, sb) = (&parts.storages[a], &parts.storages[b]);
            for (s, crc) in [(sa, sb.entry.crc32), (sb, sa.entry.crc32)] {
                let mut at = zip::crc_locations(&zsrc, &s.entry, s.data_offset + s.record_len)
                    .map_err(fmt)?;
                at.push(s.entry.central_offset + 16);
                for off in at {
                    file.write_at(off, &crc.to_le_bytes())?;
                }
            }
            offsets.push(sa.data_offset);
            offsets.push(sb.data_offset);
        }
        Ok(PatchWriter {
            file,
            offsets,
            total,
        })
    }

    /// Total size of the file.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Puts `bytes` at byte `off` of slot `slot`'s record.
    pub fn write(&self, slot: usize, off: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_at(self.offsets[slot] + off, bytes)
    }

    /// Checks the file is complete and syncs it; the rename is left to
    /// [`commit_all`](super::commit_all).
    pub fn finish(self) -> Result<Finished> {
        check_length(&self.file, self.total)?;
        self.file.finish()
    }
}

/// Copies the first `len` bytes of `from` to the start of `to` with positioned calls (the
/// input's handle is shared; its position is never moved), in the kernel where it can
/// (`copy_file_range`: no copy through memory, a reflink on filesystems that have them).
fn copy_range(from: &std::fs::File, to: &std::fs::File, len: u64) -> std::io::Result<()> {
    use rustix::io::Errno;
    let (mut off_in, mut off_out) = (0u64, 0u64);
    while off_in < len {
        let n = (len - off_in).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), n) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // Where the kernel cannot copy: through a buffer, still with positioned calls.
    let mut buf = vec![0u8; 1 << 20];
    while off_in < len {
        let n = (len - off_in).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], off_in)?;
        to.write_all_at(&buf[..n], off_out)?;
        off_in += n as u64;
        off_out += n as u64;
    }
    Ok(())
}
