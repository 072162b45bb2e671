//! Torch distributed checkpoints (DCP, `docs/dcp-format.md`): a directory holding a `.metadata`
//! pickle and the `*.distcp` files of the ranks, as `torch.distributed.checkpoint.save` writes
//! them (torchtitan, FSDP2).
//!
//! `.metadata` is run through the restricted pickle machine: only the classes of
//! `torch.distributed.checkpoint.metadata` (and `filesystem._StorageInfo`, `torch.Size`, the
//! dtypes) are understood, by name, and nothing is imported or called. Each tensor entry gives
//! the global shape, the dtype and the chunks (boxes of the global tensor, one per rank that
//! holds a part); `storage_data` gives where each chunk lies: a byte range of a `.distcp` file
//! that is a whole `torch.save` zip of the chunk, read with the `.pth` rules (or, saved with
//! `SerializationFormat.SAFETENSORS`, a tensor of the safetensors file that starts there).
//!
//! A tensor stored as one chunk is read in place, as is one whose chunks are each a run of the
//! global tensor (its segments). Any other tensor split into chunks is assembled, chunk by
//! chunk through a bounded buffer, into an anonymous temporary file when the checkpoint is
//! opened readable, never in memory. Non-tensor entries (`BytesStorageMetadata`) that hold a
//! plain number, string or bool become metadata (the `step`); the others are listed as
//! skipped.
//!
//! - `metadata`: `.metadata` parsed into its entries and `planner_data`;
//! - `chunks`: each chunk's header read and checked, each tensor placed (in place, as
//!   segments, or assembled);
//! - here: the files the entries name, checked and opened once, and the non-tensor entries.

mod chunks;
mod metadata;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::torch::object_at;
use super::{DataFile, Format, Found, Open, Skipped};
use crate::codec::TensorInfo;
use crate::error::{Error, Result};
use metadata::Entry;

pub use metadata::parse_metadata_bytes;

/// Largest non-tensor entry read for its value.
const MAX_BYTES_ITEM: u64 = 1 << 20;

/// The step entries of a DCP checkpoint, in order of preference (torchtitan's `train_state`).
pub const DCP_STEP_KEYS: [&str; 3] = ["step", "train_state.step", "trainer.step"];

/// One item of a planner-data path: a dict key or a list index.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum PathKey {
    Key(String),
    Index(u64),
}

/// `planner_data`: where each FQN sits in the nested state dict that was saved.
pub type PlannerData = HashMap<String, Vec<PathKey>>;

/// What a DCP checkpoint adds to a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct Parts {
    /// The chunks of each tensor (in the checkpoint's tensor order).
    pub chunks: Vec<usize>,
    /// The `.distcp` files the chunks lie in.
    pub files: Vec<String>,
    /// `planner_data`: where each FQN sits in the nested state dict that was saved
    /// (`("optim", "state", "fc.weight", "exp_avg")`), as `dcp_to_torch_save` rebuilds it.
    pub planner: PlannerData,
    /// The non-tensor entries: FQN, and the file (index among the checkpoint's files), offset
    /// and length of their `torch.save` bytes, which a DCP output copies as they are.
    pub bytes: Vec<(String, usize, u64, u64)>,
}

/// Whether `dir` is a DCP checkpoint: it holds `.metadata`.
pub(crate) fn is_dcp(dir: &Path) -> bool {
    dir.join(".metadata").is_file()
}

/// Where an item's bytes are: (file index, offset, length).
type Place = (usize, u64, u64);

/// Opens the DCP checkpoint in `dir`.
pub(crate) fn open(dir: &Path, how: Open) -> Result<Found> {
    let meta_path = dir.join(".metadata");
    let (entries, planner) = metadata::read(&meta_path)?;
    let mut files = Files::new(dir, &meta_path)?;
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut pending = Vec::new();
    let mut bytes_entries = Vec::new();
    for e in &entries {
        match e {
            Entry::Bytes { fqn, at } => {
                let (i, off, len) = files.locate(at, &format!("entry `{fqn}`"))?;
                bytes_entries.push((fqn.clone(), i, off, len));
                read_bytes_entry(&files.files[i], fqn, off, len, &mut metadata, &mut skipped)?;
            }
            Entry::Tensor {
                fqn,
                dtype,
                shape,
                chunks,
            } => {
                let numel: u64 = shape.iter().product();
                let len = numel
                    .checked_mul(dtype.size() as u64)
                    .ok_or_else(|| Error::tensor(&meta_path, fqn, "is too large"))?;
                let mut places = Vec::with_capacity(chunks.len());
                for c in chunks {
                    places.push(files.locate(&c.at, &format!("chunk of `{fqn}`"))?);
                }
                tensors.push(TensorInfo {
                    name: fqn.clone(),
                    dtype: *dtype,
                    shape: shape.iter().map(|&d| d as usize).collect(),
                    file: 0,
                    offset: 0,
                    len,
                    segments: None,
                    view: None,
                });
                pending.push(chunks::Pending {
                    index: tensors.len() - 1,
                    fqn,
                    shape,
                    chunks,
                    places,
                });
            }
        }
    }
    let names = files.names();
    let chunk_counts = pending.iter().map(|p| p.chunks.len()).collect();
    let mut files = files.files;
    // When only the header is asked for, the chunks' own headers are not read.
    let header_only = how == Open::HeaderOnly && !tensors.is_empty();
    if how != Open::HeaderOnly {
        chunks::place(dir, &mut files, &mut tensors, &pending)?;
    }
    Ok(Found {
        format: Format::Dcp,
        files,
        tensors,
        metadata,
        skipped,
        step_keys: &DCP_STEP_KEYS,
        torch: None,
        dcp: Some(Box::new(Parts {
            chunks: chunk_counts,
            files: names,
            planner,
            bytes: bytes_entries,
        })),
        header_only,
    })
}

/// Reads the non-tensor entry `fqn` (`len` bytes at `off` of `f`): its plain values become
/// metadata (a dict's under `fqn.key`), anything else is listed in `skipped`, as is an entry
/// too large to read.
fn read_bytes_entry(
    f: &DataFile,
    fqn: &str,
    off: u64,
    len: u64,
    metadata: &mut BTreeMap<String, String>,
    skipped: &mut Vec<Skipped>,
) -> Result<()> {
    if len > MAX_BYTES_ITEM {
        skipped.push(Skipped {
            name: fqn.to_string(),
            kind: format!("bytes entry ({len} bytes)"),
        });
        return Ok(());
    }
    let (values, others, n) = object_at(f.file(), off, len, f.path())?;
    let under = |k: &str| {
        if k.is_empty() {
            fqn.to_string()
        } else {
            format!("{fqn}.{k}")
        }
    };
    for (k, v) in values {
        metadata.insert(under(&k), v);
    }
    for s in others {
        skipped.push(Skipped {
            name: under(&s.name),
            kind: s.kind,
        });
    }
    if n > 0 {
        skipped.push(Skipped {
            name: fqn.to_string(),
            kind: format!("bytes entry holding {n} tensors"),
        });
    }
    Ok(())
}

/// The `.distcp` files of a checkpoint, each opened once, as its entries name them.
struct Files<'a> {
    dir: &'a Path,
    real_dir: std::path::PathBuf,
    meta_path: &'a Path,
    files: Vec<DataFile>,
    file_of: HashMap<String, usize>,
}

impl<'a> Files<'a> {
    /// No file opened yet, of the checkpoint in `dir` described by `meta_path`.
    fn new(dir: &'a Path, meta_path: &'a Path) -> Result<Files<'a>> {
        Ok(Files {
            dir,
            real_dir: dir.canonicalize().map_err(|e| Error::io(dir, e))?,
            meta_path,
            files: Vec::new(),
            file_of: HashMap::new(),
        })
    }

    /// The names of the files opened, in the order of `files`.
    fn names(&self) -> Vec<String> {
        let mut by_index: Vec<(&usize, &String)> =
            self.file_of.iter().map(|(k, v)| (v, k)).collect();
        by_index.sort();
        by_index.into_iter().map(|(_, k)| k.clone()).collect()
    }

    /// The file (opened on first use) and range of `at`, checked: a file of the directory
    /// itself (no path, no link leading out), and a range inside it. `what` names it in errors.
    fn locate(&mut self, at: &(String, u64, u64), what: &str) -> Result<Place> {
        let (rel, off, len) = at;
        let i = match self.file_of.get(rel) {
            Some(&i) => i,
            None => {
                if rel.is_empty() || rel.contains(['/', '\\']) || rel.starts_with('.') {
                    return Err(Error::format(
                        self.meta_path,
                        format!(
                            "{what} lies in `{rel}`, outside the checkpoint's directory (only its \
                             own files are read)"
                        ),
                    ));
                }
                let path = self.dir.join(rel);
                let real = path.canonicalize().map_err(|e| Error::io(&path, e))?;
                if real.parent() != Some(self.real_dir.as_path()) {
                    return Err(Error::format(
                        &path,
                        format!("is a link leading outside {}", self.dir.display()),
                    ));
                }
                self.files.push(DataFile::open(&path)?);
                self.file_of.insert(rel.clone(), self.files.len() - 1);
                self.files.len() - 1
            }
        };
        let f = &self.files[i];
        if off.checked_add(*len).map_or(true, |e| e > f.len()) {
            return Err(Error::format(
                f.path(),
                format!(
                    "{what}: bytes {off}..{} run past the end of the file ({} bytes; truncated?)",
                    off.saturating_add(*len),
                    f.len()
                ),
            ));
        }
        Ok((i, *off, *len))
    }
}
