//! PyTorch zip checkpoints (`torch.save` since 1.6: `.pth`, `.pt`, `.bin`, `.ckpt`,
//! `.pth.tar`), read without running anything in them (`docs/formats.md#pytorch`):
//!
//! - `archive`: the zip directory checked, `data.pkl` run through the restricted pickle
//!   machine of `codec::pickle`, every storage located in its stored `data/<key>` record;
//! - `flatten`: the object graph flattened into the flat namespace, plain values kept as
//!   metadata, other objects listed as skipped;
//! - `rebuild`: torch's tensor rebuild calls recognised as views of storage records;
//! - `views`: the geometry of those views, and the gathering of a non-contiguous one;
//! - `legacy`: the legacy (pre-zip) format and plain pickles whose storages are embedded as
//!   bytes, read with the same flattening.
//!
//! Nothing is imported or called. A tensor whose elements are not one contiguous run of its
//! storage is gathered into an anonymous temporary file when the checkpoint is opened
//! readable, so every tensor is a contiguous byte range.

mod archive;
mod flatten;
mod legacy;
mod rebuild;
mod views;

use std::io::Write;
use std::path::Path;

use archive::Archive;
pub use archive::{Storage, TopEntry, COMMENT_PREFIX};
pub(crate) use views::{is_contiguous, TorchTensor};

use super::step::TORCH_STEP_KEYS;
use super::{DataFile, Format, Found, Open};
use crate::codec::pickle::{self, Pickle};
use crate::codec::{zip, StorageView, TensorInfo};
use crate::error::{Error, Result};

/// Largest `data.pkl` read (it is read whole).
pub const MAX_PICKLE: u64 = 512 << 20;
/// Deepest nesting of dicts and lists flattened.
pub const MAX_DEPTH: usize = 256;
/// Most values visited while flattening: a value reachable by several paths is visited once per
/// path, so a small pickle of shared sub-graphs could otherwise describe 2^40 of them. The
/// count is computed before walking (`flatten::tree_size`).
pub const MAX_VISITS: usize = 1 << 20;
/// Most bytes of flat names and metadata text produced.
pub const MAX_TEXT: usize = 128 << 20;
/// Most tensors a checkpoint may hold.
pub const MAX_TENSORS: usize = 1 << 20;
/// Most plain values kept as metadata, and most skipped objects listed; those beyond are
/// counted in one summary entry of the skipped list.
pub const MAX_KEPT: usize = 1 << 16;
/// Sequences longer than this keep their tensors, but their plain values are summarized as one
/// skipped entry instead of one metadata key each (optimizer `params` lists).
pub const LONG_SEQUENCE: usize = 64;
/// Largest storage span read to gather a non-contiguous tensor.
pub const MAX_GATHER: u64 = 512 << 20;

/// What a PyTorch archive adds to a checkpoint: its top-level entries, for `inspect`, and its
/// storage records, for `swap` inside the archive.
#[derive(Debug)]
pub struct Parts {
    /// Top-level entries, when the root is a dict.
    pub top: Vec<TopEntry>,
    /// The storages that tensors view (their [`StorageView::storage`] indexes this).
    pub storages: Vec<Storage>,
    /// Offset of the zip's (32-bit) end-of-central-directory record.
    pub eocd_offset: u64,
}

/// Opens a PyTorch zip checkpoint. Opened [`Open::Readable`], the values of non-contiguous
/// views are gathered into a temporary file.
pub(crate) fn open(path: &Path, how: Open) -> Result<Found> {
    let df = DataFile::open(path)?;
    let archive = Archive::read(&df.zip_source(), path)?;
    finish(df, archive, how, path, Format::Torch)
}

/// Opens a checkpoint in PyTorch's legacy format, as [`open`] does a zip checkpoint.
pub(crate) fn open_legacy(path: &Path, how: Open) -> Result<Found> {
    let df = DataFile::open(path)?;
    let size = df.len();
    let file = legacy::read(df.file(), 0, size, path)?;
    let storages = legacy::FileStorages {
        file: df.file(),
        size,
        path,
        keyed: file.storages,
    };
    let flat = flatten::flatten(&file.pickle, path, storages)?;
    finish(df, Archive::from_flat(flat), how, path, Format::TorchLegacy)
}

/// Opens a plain pickle (`pickle.dump` of tensors, EDM2's snapshots) whose tensors embed their
/// storages as bytes, as [`open`] does a zip checkpoint.
pub(crate) fn open_pickle(path: &Path, how: Open) -> Result<Found> {
    let df = DataFile::open(path)?;
    let size = df.len();
    let (p, _) = legacy::pickle_at(df.file(), 0, size, path, "pickle")?;
    let storages = legacy::FileStorages {
        file: df.file(),
        size,
        path,
        keyed: Default::default(),
    };
    let flat = flatten::flatten(&p, path, storages)?;
    finish(df, Archive::from_flat(flat), how, path, Format::Pickle)
}

/// What every PyTorch format's reader does with what it read: every tensor a contiguous byte
/// range (a non-contiguous view gathered into a temporary file when opened readable).
fn finish(df: DataFile, archive: Archive, how: Open, path: &Path, format: Format) -> Result<Found> {
    let Archive {
        eocd_offset,
        storages,
        tensors: views,
        metadata,
        skipped,
        top,
    } = archive;
    let mut spill: Option<DataFile> = None;
    let mut ungathered = false;
    let mut tensors = Vec::with_capacity(views.len());
    for t in views {
        let len = t.nbytes();
        let data_offset =
            storages[t.storage].data_offset + t.storage_offset * t.dtype.size() as u64;
        let (file, offset) = if t.is_contiguous() {
            (0, data_offset)
        } else if how == Open::HeaderOnly {
            ungathered = true;
            (0, data_offset)
        } else {
            let bytes = views::gather(&df, data_offset, &t, path)?;
            let sp = match &mut spill {
                Some(sp) => sp,
                None => {
                    let file = tempfile::tempfile().map_err(|e| Error::io(path, e))?;
                    spill.insert(DataFile::scratch(path, file))
                }
            };
            let at = sp.len;
            (&sp.file)
                .write_all(&bytes)
                .map_err(|e| Error::io(path, e))?;
            sp.len += bytes.len() as u64;
            (1, at)
        };
        tensors.push(TensorInfo {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            file,
            offset,
            len,
            segments: None,
            view: Some(Box::new(StorageView {
                storage: t.storage,
                storage_offset: t.storage_offset,
                stride: t.stride,
            })),
        });
    }
    if let Some(sp) = &mut spill {
        sp.seal()?;
    }
    let mut files = vec![df];
    files.extend(spill);
    Ok(Found {
        format,
        files,
        tensors,
        metadata,
        skipped,
        step_keys: &TORCH_STEP_KEYS,
        dcp: None,
        torch: Some(Box::new(Parts {
            top,
            storages,
            eocd_offset,
        })),
        header_only: ungathered,
    })
}

/// Parses a whole archive held in memory: the entry point of the fuzz target `torch_zip`.
/// Returns how many tensors it holds.
pub(crate) fn parse_archive_bytes(bytes: &[u8]) -> Result<usize> {
    Archive::read(&zip::Source::Bytes(bytes), Path::new("<memory>")).map(|a| a.tensors.len())
}

/// Runs a bare pickle through the machine and the flattening, every storage record taken to
/// exist: the entry point of the fuzz target `pickle`, and of tests of the pickles ema-tool
/// writes. Returns the tensors it holds.
pub(crate) fn flatten_pickle_bytes(bytes: &[u8]) -> Result<Vec<TorchTensor>> {
    let path = Path::new("<memory>");
    let p = Pickle::parse(bytes, &pickle::LIMITS)
        .map_err(|e| Error::format(path, format!("data.pkl: {e}")))?;
    /// Every record exists and is large; every embedded storage is one of floats.
    struct Any;
    impl flatten::Storages for Any {
        const IN_ZIP: bool = true;

        fn record(&mut self, _: &str) -> Result<(zip::Entry, u64, u64)> {
            Ok((zip::Entry::default(), 0, 1 << 40))
        }
        fn embedded(&mut self, at: u64, len: u64) -> Result<flatten::Embedded> {
            Ok(flatten::Embedded {
                key: format!("@{at}"),
                storage_type: pickle::Global {
                    module: "torch".into(),
                    name: "FloatStorage".into(),
                },
                numel: len / 4,
            })
        }
    }
    Ok(flatten::flatten(&p, path, Any)?.tensors)
}

/// The one tensor of the `torch.save` zip lying at `base .. base + len` of `file` (a chunk
/// of a DCP checkpoint): its view, the offset in `file` of its first element, and the bytes
/// of its storage.
pub(crate) fn chunk_at(
    file: &std::fs::File,
    base: u64,
    len: u64,
    path: &Path,
) -> Result<(TorchTensor, u64, u64)> {
    let a = Archive::read(&zip::Source::Part(file, base, len), path)?;
    let [t] = a.tensors.as_slice() else {
        return Err(Error::format(
            path,
            format!(
                "the record at byte {base} holds {} tensors, where a chunk holds one",
                a.tensors.len()
            ),
        ));
    };
    let s = &a.storages[t.storage];
    let at = base + s.data_offset + t.storage_offset * t.dtype.size() as u64;
    Ok((t.clone(), at, s.nbytes))
}

/// What the `torch.save` zip at `base .. base + len` of `file` holds besides tensors (a
/// non-tensor entry of a DCP checkpoint): its plain values as metadata and its other objects
/// as skipped entries, under flat names relative to it (`""` for the value itself, `0`, `1`
/// for the items of a tuple), and how many tensors it holds.
pub(crate) fn object_at(
    file: &std::fs::File,
    base: u64,
    len: u64,
    path: &Path,
) -> Result<(
    std::collections::BTreeMap<String, String>,
    Vec<super::Skipped>,
    usize,
)> {
    let a = Archive::read(&zip::Source::Part(file, base, len), path)?;
    Ok((a.metadata, a.skipped, a.tensors.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_pickles_fail_cleanly() {
        // A list holding itself.
        let cyc = b"]q\x00h\x00a.";
        let e = flatten_pickle_bytes(cyc).unwrap_err().to_string();
        assert!(e.contains("contains itself"), "{e}");
        // Deep, not cyclic.
        let mut deep = vec![b']'; 1000];
        deep.extend(vec![b'a'; 999]);
        deep.push(b'.');
        let e = flatten_pickle_bytes(&deep).unwrap_err().to_string();
        assert!(e.contains("nested deeper"), "{e}");
        // 2^30 paths through 30 levels of [x, x].
        let mut b = b"]".to_vec();
        for _ in 0..30 {
            b.extend_from_slice(b"2\x86");
        }
        b.push(b'.');
        let e = flatten_pickle_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("expands to more than"), "{e}");
        // Shared, but small once expanded: fine.
        let mut b = b"}".to_vec();
        for _ in 0..10 {
            b.extend_from_slice(b"2\x86");
        }
        b.push(b'.');
        assert!(flatten_pickle_bytes(&b).unwrap().is_empty());
        // Found by the fuzzer: 2^20 paths to long strings, once slow.
        let t = std::time::Instant::now();
        let found = include_bytes!("../../../fuzz/regressions/pickle-fanout-strings.pkl");
        assert!(flatten_pickle_bytes(found).is_err());
        // How slow is a figure of optimised code only.
        if cfg!(not(debug_assertions)) {
            assert!(t.elapsed().as_secs() < 2);
        }
    }

    #[test]
    fn fuzz_regression_file_content_in_a_message_stays_on_one_line() {
        // Found by the torch_legacy target: a byte order record holding a newline.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pkl");
        std::fs::write(
            &path,
            include_bytes!("../../../fuzz/regressions/torch-legacy-newline-in-byteorder.pkl"),
        )
        .unwrap();
        let e = crate::checkpoint::Checkpoint::open(&path, crate::checkpoint::Open::Readable)
            .unwrap_err()
            .to_string();
        assert!(e.contains("byte order") && !e.contains('\n'), "{e}");
    }
}
