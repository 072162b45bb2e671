//! Reading checkpoints of every format into one flat namespace of named tensors.
//!
//! Opening a checkpoint reads and validates its header only. Every tensor is then a byte range
//! of one of the checkpoint's files ([`TensorInfo`]), read on demand with positioned reads
//! ([`Checkpoint::read_at`]: a file that shrinks under us gives an error), or, by the CPU fold,
//! through a mapping that is released as the fold goes ([`mapped`]: a file that shrinks under
//! us ends the run with an error too). No format is ever read whole into memory.

pub mod header_fast;
pub mod mapped;
pub mod pickle;
pub mod safetensors;
pub mod sharded;
pub mod torch;
pub mod zip;

use std::collections::BTreeMap;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The on-disk format of a checkpoint.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One `.safetensors` file.
    Safetensors,
    /// Several safetensors files tied together by an index.
    Sharded,
    /// A PyTorch zip checkpoint written by `torch.save`.
    Torch,
}

impl Format {
    /// The name shown to users.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Sharded => "sharded",
            Format::Torch => "torch",
        }
    }
}

/// One file that a checkpoint's tensors live in.
#[derive(Debug)]
pub struct DataFile {
    /// Path as given (or as found through an index).
    pub path: PathBuf,
    /// The open file; read with positioned reads only, so it can be shared across threads.
    pub file: File,
    /// Size when the header was read; reads past it are refused.
    pub len: u64,
    /// Modification time when the header was read.
    modified: Option<std::time::SystemTime>,
    /// A temporary file of the reader's (gathered views), not a file of the checkpoint's.
    pub scratch: bool,
}

impl DataFile {
    /// Opens `path` for reading and records its size and modification time.
    pub fn open(path: &Path) -> Result<DataFile> {
        let (file, meta) = open_regular(path)?;
        Ok(DataFile {
            path: path.to_path_buf(),
            file,
            len: meta.len(),
            modified: meta.modified().ok(),
            scratch: false,
        })
    }

    /// An anonymous file that a reader fills with copies of tensors (a `.pth`'s non-contiguous
    /// views), reported under `path`; call [`DataFile::seal`] once it is written.
    pub fn scratch(path: &Path, file: File) -> DataFile {
        DataFile {
            path: path.to_path_buf(),
            file,
            len: 0,
            modified: None,
            scratch: true,
        }
    }

    /// Records the current size and modification time, as [`DataFile::open`] does.
    pub fn seal(&mut self) -> Result<()> {
        let meta = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
        self.len = meta.len();
        self.modified = meta.modified().ok();
        Ok(())
    }

    /// Checks that the file still has the size and modification time it had when its header
    /// was read: a checkpoint rewritten under us is refused rather than half read.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
        if meta.len() != self.len {
            return Err(Error::format(
                &self.path,
                format!(
                    "file changed size while in use ({} bytes, now {})",
                    self.len,
                    meta.len()
                ),
            ));
        }
        if meta.modified().ok() != self.modified {
            return Err(Error::format(&self.path, "file was modified while in use"));
        }
        Ok(())
    }
}

/// Opens a regular file for reading, without blocking on a FIFO or a device: anything else is
/// refused with a message instead of hanging or reading a stream.
pub fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::format(path, "is a directory"));
    }
    if !meta.is_file() {
        return Err(Error::format(path, "is not a regular file"));
    }
    Ok((file, meta))
}

/// Where one tensor's bytes are, and what they are.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name in the flat namespace (`state_dict.backbone.conv1.weight`).
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte offset of the first element in that file.
    pub offset: u64,
    /// Byte length (`numel × dtype size`), contiguous, little-endian.
    pub len: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.len / self.dtype.size() as u64
    }
}

/// Where a checkpoint's step came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepSource {
    /// A metadata key (safetensors `__metadata__` or a plain number in a `.pth`).
    Metadata(String),
    /// The last integer in the file name.
    FileName,
}

/// A non-tensor entry of a checkpoint that was recognised and left out of the tensor namespace.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Skipped {
    /// Flat name of the entry.
    pub name: String,
    /// What it was (`HistoryBuffer`, `numpy.ndarray`, ...).
    pub kind: String,
}

/// An opened checkpoint: validated header, tensors as byte ranges, metadata.
#[derive(Debug)]
pub struct Checkpoint {
    /// Path as the user gave it.
    pub path: PathBuf,
    pub format: Format,
    /// The files holding tensor data (one, except for sharded checkpoints).
    pub files: Vec<DataFile>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// String metadata (safetensors `__metadata__`, or plain values of a `.pth`).
    pub metadata: BTreeMap<String, String>,
    /// Entries that are neither tensors nor plain metadata (only for `.pth`).
    pub skipped: Vec<Skipped>,
    /// Training step, when one was found.
    pub step: Option<u64>,
    pub step_source: Option<StepSource>,
    /// The parsed archive of a `.pth` (its directory, storages and top-level entries).
    pub archive: Option<Box<torch::Archive>>,
    /// Opened by [`Checkpoint::open_header`]: the values of a `.pth`'s non-contiguous views
    /// were not gathered, so its tensors are not to be read.
    header_only: bool,
    index: NameIndex,
}

/// The tensors of a checkpoint by name: a hash table of their indices (the names are not
/// copied), hashed with std's randomly keyed SipHash, since the names come from the file.
#[derive(Debug)]
pub struct NameIndex {
    table: hashbrown::HashTable<usize>,
    hasher: RandomState,
}

impl NameIndex {
    /// The index of `tensors`, or the position of the first tensor whose name an earlier one
    /// has.
    pub fn new(tensors: &[TensorInfo]) -> std::result::Result<NameIndex, usize> {
        let hasher = RandomState::new();
        let mut table = hashbrown::HashTable::with_capacity(tensors.len());
        let hash = |i: &usize| hasher.hash_one(tensors[*i].name.as_str());
        for (i, t) in tensors.iter().enumerate() {
            match table.entry(hash(&i), |&j| tensors[j].name == t.name, hash) {
                hashbrown::hash_table::Entry::Occupied(_) => return Err(i),
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
        Ok(NameIndex { table, hasher })
    }

    /// The position of `name` in `tensors` (those the index was made of).
    fn find(&self, tensors: &[TensorInfo], name: &str) -> Option<usize> {
        self.table
            .find(self.hasher.hash_one(name), |&j| tensors[j].name == name)
            .copied()
    }
}

/// Metadata keys that hold the step, in order of preference (SPEC §2).
pub const SAFETENSORS_STEP_KEYS: [&str; 5] = ["step", "global_step", "iter", "iteration", "epoch"];
/// Plain values of a `.pth` that hold the step, in order of preference (SPEC §2).
pub const TORCH_STEP_KEYS: [&str; 5] = ["meta.iter", "meta.epoch", "global_step", "epoch", "iter"];

impl Checkpoint {
    /// Opens a checkpoint of any supported format and validates its header: a safetensors
    /// file, a PyTorch zip checkpoint, or a sharded checkpoint (a directory holding an index,
    /// or the index file itself).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        Checkpoint::open_with(path, true)
    }

    /// Opens a checkpoint as [`Checkpoint::open`] does, for what its header says only: the
    /// non-contiguous views of a `.pth`, whose values `open` gathers into a temporary file,
    /// are left as they are, so this reads nothing but the header whatever the checkpoint.
    /// Reading a tensor of it is an error.
    pub fn open_header(path: &Path) -> Result<Checkpoint> {
        Checkpoint::open_with(path, false)
    }

    /// [`Checkpoint::open`]; `gather`: whether to gather the values of non-contiguous views
    /// (see [`Checkpoint::open_header`]).
    fn open_with(path: &Path, gather: bool) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() || sharded::is_index_name(path) {
            return sharded::open(path, gather);
        }
        Checkpoint::open_file_with(path, gather)
    }

    /// Opens a single-file checkpoint, its format told by its first bytes.
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        Checkpoint::open_file_with(path, true)
    }

    /// [`Checkpoint::open_file`]; `gather`: whether to gather the values of a `.pth`'s
    /// non-contiguous views (see [`Checkpoint::open_header`]).
    pub(crate) fn open_file_with(path: &Path, gather: bool) -> Result<Checkpoint> {
        let mut magic = [0u8; 512];
        let (file, _) = open_regular(path)?;
        let n = read_up_to(&file, 0, &mut magic).map_err(|e| Error::io(path, e))?;
        drop(file);
        let magic = &magic[..n];
        if zip::is_zip(magic) {
            return torch::open(path, gather);
        }
        if let Some(what) = legacy_torch(magic) {
            return Err(Error::format(
                path,
                format!(
                    "{what} (PyTorch's legacy serialization, torch.save before 1.6 or with \
                     _use_new_zipfile_serialization=False) is not supported; convert it once, in \
                     Python, with torch.save(torch.load(\"{p}\", map_location=\"cpu\", \
                     weights_only=False), \"{p}.zip.pth\") (weights_only=False runs the file's \
                     pickle: do it only for files you trust)",
                    p = path.display()
                ),
            ));
        }
        safetensors::open(path)
    }

    /// Builds a checkpoint from parts; computes the name index and the step.
    ///
    /// Fails on duplicate tensor names.
    pub fn new(
        path: PathBuf,
        format: Format,
        files: Vec<DataFile>,
        tensors: Vec<TensorInfo>,
        metadata: BTreeMap<String, String>,
        skipped: Vec<Skipped>,
    ) -> Result<Checkpoint> {
        let index = NameIndex::new(&tensors).map_err(|dup| {
            let what = match format {
                Format::Safetensors => "appears twice in the header",
                _ => "appears twice",
            };
            Error::tensor(&path, &tensors[dup].name, what)
        })?;
        let keys: &[&str] = match format {
            Format::Torch => &TORCH_STEP_KEYS,
            _ => &SAFETENSORS_STEP_KEYS,
        };
        let (step, step_source) = match find_step(&metadata, keys, &path) {
            Some((s, src)) => (Some(s), Some(src)),
            None => (None, None),
        };
        Ok(Checkpoint {
            path,
            format,
            files,
            tensors,
            metadata,
            skipped,
            step,
            step_source,
            archive: None,
            header_only: false,
            index,
        })
    }

    /// An error for a checkpoint opened with [`Checkpoint::open_header`], whose tensors are
    /// not to be read (a mistake of the caller, reported rather than reading wrong values).
    pub fn check_readable(&self) -> Result<()> {
        if self.header_only {
            return Err(Error::format(
                &self.path,
                "opened for its header only: its tensors cannot be read",
            ));
        }
        Ok(())
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.position(name).map(|i| &self.tensors[i])
    }

    /// The index in [`Checkpoint::tensors`] of the tensor called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.find(&self.tensors, name)
    }

    /// [`Checkpoint::position`], looking first at `hint`: the checkpoints of a series usually
    /// list the same tensors in the same order, and a name compared costs less than one hashed.
    pub fn position_near(&self, name: &str, hint: usize) -> Option<usize> {
        match self.tensors.get(hint) {
            Some(t) if t.name == name => Some(hint),
            _ => self.position(name),
        }
    }

    /// Reads `buf.len()` bytes of tensor `t` starting `off` bytes into its data.
    pub fn read_at(&self, t: &TensorInfo, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check_readable()?;
        off.checked_add(buf.len() as u64)
            .filter(|&e| e <= t.len)
            .ok_or_else(|| Error::tensor(&self.path, &t.name, "read past the end of the tensor"))?;
        let df = &self.files[t.file];
        df.file
            .read_exact_at(buf, t.offset + off)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::tensor(
                    &df.path,
                    &t.name,
                    "file is shorter than its header says (truncated while in use?)",
                ),
                _ => Error::tensor(&df.path, &t.name, e.to_string()),
            })
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Checks that no file changed size since the header was read.
    pub fn check_unchanged(&self) -> Result<()> {
        self.files.iter().try_for_each(DataFile::check_unchanged)
    }
}

/// What a file in PyTorch's legacy (pre-zip) format is, from its first 512 bytes: a tar
/// archive (torch < 0.4) or a bare pickle stream (torch < 1.6).
fn legacy_torch(magic: &[u8]) -> Option<&'static str> {
    // A safetensors header (8 bytes of length, then JSON) is never taken for one.
    if magic.get(8) == Some(&b'{') {
        return None;
    }
    if magic.len() >= 262 && &magic[257..262] == b"ustar" {
        return Some("a tar archive");
    }
    // A pickle (protocol 2 to 5) of torch's legacy magic number 0x1950a86a20f9469cfc6c, or any
    // pickle stream.
    match magic {
        [0x80, 2..=5, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, ..] => {
            Some("a legacy PyTorch checkpoint")
        }
        [0x80, 2..=5, ..] => Some("a pickle file, not a zip archive,"),
        _ => None,
    }
}

/// Reads as many bytes as are there, up to `buf.len()`.
pub(crate) fn read_up_to(file: &File, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The step of a checkpoint: the first metadata key of `keys` holding an integer, else the last
/// integer in the file name.
pub fn find_step(
    metadata: &BTreeMap<String, String>,
    keys: &[&str],
    path: &Path,
) -> Option<(u64, StepSource)> {
    for k in keys {
        if let Some(v) = metadata.get(*k) {
            if let Some(s) = parse_step_value(v) {
                return Some((s, StepSource::Metadata((*k).to_string())));
            }
        }
    }
    step_from_file_name(path).map(|s| (s, StepSource::FileName))
}

/// Parses `"1000"`, `"1000.0"` as a step.
fn parse_step_value(v: &str) -> Option<u64> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    let f: f64 = v.parse().ok()?;
    (f >= 0.0 && f.fract() == 0.0 && f < 2f64.powi(63)).then_some(f as u64)
}

/// The last run of digits in the file name (`iter_1000.safetensors` → 1000,
/// `checkpoint-4.pth.tar` → 4, `model_0001000.pth` → 1000).
pub fn step_from_file_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let name = strip_known_extensions(name);
    let bytes = name.as_bytes();
    let end = bytes.iter().rposition(|b| b.is_ascii_digit())? + 1;
    let start = bytes[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    name[start..end].parse().ok()
}

/// `epoch_12.pth.tar` → `epoch_12`; keeps names without a known extension as they are.
pub fn strip_known_extensions(name: &str) -> &str {
    const EXTS: [&str; 8] = [
        ".safetensors.index.json",
        ".bin.index.json",
        ".safetensors",
        ".pth.tar",
        ".pth",
        ".pt",
        ".bin",
        ".ckpt",
    ];
    for e in EXTS {
        if let Some(stem) = name.strip_suffix(e) {
            return stem;
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_from_names() {
        let s = |n: &str| step_from_file_name(Path::new(n));
        assert_eq!(s("iter_1000.safetensors"), Some(1000));
        assert_eq!(s("dir_7/epoch_12.pth"), Some(12));
        assert_eq!(s("checkpoint-4.pth.tar"), Some(4));
        assert_eq!(s("model_0001000.pth"), Some(1000));
        assert_eq!(s("model.safetensors"), None);
        assert_eq!(s("v2_step300_final.ckpt"), Some(300));
    }

    #[test]
    fn step_values() {
        assert_eq!(parse_step_value("12"), Some(12));
        assert_eq!(parse_step_value("12.0"), Some(12));
        assert_eq!(parse_step_value("12.5"), None);
        assert_eq!(parse_step_value("-3"), None);
        assert_eq!(parse_step_value("abc"), None);
    }
}
