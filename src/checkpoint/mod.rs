//! Reading checkpoints of every format into one flat namespace of named tensors.
//!
//! [`Checkpoint::open`] reads and validates a checkpoint's header, in one of two ways
//! ([`Open`]): for its header only (`inspect`), or readable (everything that reads values).
//! Every tensor is then a byte range of one of the checkpoint's files ([`TensorInfo`]), read on
//! demand with positioned reads ([`Checkpoint::read_at`]: a file that shrinks under us gives an
//! error), or, by the CPU fold, through a mapping that is released as the fold goes
//! ([`mapped`]). No format is ever read whole into memory.
//!
//! The formats (`docs/formats.md`): `safetensors` files, `sharded` checkpoints (an index
//! and its shards) and PyTorch zip checkpoints (`torch`).

pub mod dcp;
pub mod mapped;
pub(crate) mod safetensors;
pub(crate) mod sharded;
pub mod step;
pub(crate) mod torch;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use crate::codec::TensorInfo;
use crate::codec::{zip, NameIndex};
use crate::error::{Error, Result};
pub use step::StepSource;

/// The on-disk format of a checkpoint.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One `.safetensors` file.
    Safetensors,
    /// Several files tied together by an index.
    Sharded,
    /// A PyTorch zip checkpoint written by `torch.save`.
    Torch,
    /// PyTorch's legacy format (`torch.save` before 1.6, or `_use_new_zipfile_serialization=False`).
    #[serde(rename = "torch-legacy")]
    TorchLegacy,
    /// A plain pickle whose tensors embed their storages (`pickle.dump` of tensors, EDM2).
    Pickle,
    /// A torch distributed checkpoint: a directory with `.metadata` and `*.distcp` files.
    Dcp,
}

impl Format {
    /// The name shown to users.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Sharded => "sharded",
            Format::Torch => "torch",
            Format::TorchLegacy => "torch-legacy",
            Format::Pickle => "pickle",
            Format::Dcp => "dcp",
        }
    }
}

/// How a checkpoint is opened.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Open {
    /// For what its header says: nothing but headers is read, whatever the checkpoint (the
    /// non-contiguous views of a `.pth` are not gathered), and reading a tensor is an error.
    HeaderOnly,
    /// Ready to read every tensor.
    Readable,
}

/// One file that a checkpoint's tensors live in.
#[derive(Debug)]
pub struct DataFile {
    path: PathBuf,
    /// Read with positioned reads only, so it can be shared across threads.
    file: File,
    /// Size when the header was read; reads past it are refused.
    len: u64,
    /// Modification time when the header was read.
    modified: Option<std::time::SystemTime>,
    /// A temporary file of the reader's (gathered views), not a file of the checkpoint's.
    scratch: bool,
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
    fn scratch(path: &Path, file: File) -> DataFile {
        DataFile {
            path: path.to_path_buf(),
            file,
            len: 0,
            modified: None,
            scratch: true,
        }
    }

    /// Records the current size and modification time, as [`DataFile::open`] does.
    fn seal(&mut self) -> Result<()> {
        let meta = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
        self.len = meta.len();
        self.modified = meta.modified().ok();
        Ok(())
    }

    /// The path as given, or as found through an index.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for positioned reads and mappings.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its size when the header was read.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is a scratch file of the reader's rather than a file of the checkpoint.
    pub fn is_scratch(&self) -> bool {
        self.scratch
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

    /// The file as a zip [`zip::Source`], for the archive readers and writers.
    pub fn zip_source(&self) -> zip::Source<'_> {
        zip::Source::File(&self.file, self.len)
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
    path: PathBuf,
    format: Format,
    files: Vec<DataFile>,
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
    skipped: Vec<Skipped>,
    step: Option<(u64, StepSource)>,
    torch: Option<Box<torch::Parts>>,
    dcp: Option<Box<dcp::Parts>>,
    /// Opened with [`Open::HeaderOnly`] and some tensor needs more than the header to read.
    header_only: bool,
    index: NameIndex,
    /// Opened from a directory (a model directory, or one holding a sharded index).
    dir: bool,
}

/// What a format's reader found, for [`Checkpoint::new`].
pub(crate) struct Found {
    pub format: Format,
    pub files: Vec<DataFile>,
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    pub skipped: Vec<Skipped>,
    /// Metadata keys that hold the step, in order of preference.
    pub step_keys: &'static [&'static str],
    /// What a PyTorch archive adds.
    pub torch: Option<Box<torch::Parts>>,
    /// What a DCP checkpoint adds.
    pub dcp: Option<Box<dcp::Parts>>,
    /// Some tensor cannot be read (see [`Open::HeaderOnly`]).
    pub header_only: bool,
}

impl Checkpoint {
    /// Opens a checkpoint of any supported format and validates its header: a safetensors
    /// file, a PyTorch zip checkpoint, a sharded checkpoint (a directory holding an index, or
    /// the index file itself), or a model directory holding one weights file.
    pub fn open(path: &Path, how: Open) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() && dcp::is_dcp(path) {
            let found = dcp::open(path, how)?;
            return Checkpoint::new(path, found.format, found);
        }
        if meta.is_dir() {
            if let Some(w) = single_weights(path)? {
                let found = open_file(&w, how)?;
                let mut c = Checkpoint::new(path, found.format, found)?;
                c.dir = true;
                return Ok(c);
            }
        }
        if meta.is_dir() || crate::codec::names::is_index_name(path) {
            let mut c = sharded::open(path, how)?;
            c.dir = meta.is_dir();
            return Ok(c);
        }
        let found = open_file(path, how)?;
        Checkpoint::new(path, found.format, found)
    }

    /// Builds a checkpoint from what a reader found; indexes the names and finds the step.
    ///
    /// Fails on duplicate tensor names.
    pub(crate) fn new(path: &Path, format: Format, found: Found) -> Result<Checkpoint> {
        let index = NameIndex::new(&found.tensors).map_err(|dup| {
            let what = match format {
                Format::Safetensors => "appears twice in the header",
                _ => "appears twice",
            };
            Error::tensor(path, &found.tensors[dup].name, what)
        })?;
        let step = step::find(&found.metadata, found.step_keys, path);
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format,
            files: found.files,
            tensors: found.tensors,
            metadata: found.metadata,
            skipped: found.skipped,
            step,
            torch: found.torch,
            dcp: found.dcp,
            header_only: found.header_only,
            index,
            dir: false,
        })
    }

    /// The directory the checkpoint was opened from (a model directory, or one holding a
    /// sharded index), whose other files go beside an output written to a directory.
    pub fn source_dir(&self) -> Option<&Path> {
        self.dir.then_some(self.path.as_path())
    }

    /// The kind of top-level entry `key` of a PyTorch checkpoint or pickle (`dict`, or the
    /// class of a pickled object: `ultralytics.nn.tasks.DetectionModel`).
    pub fn top_kind(&self, key: &str) -> Option<&str> {
        let t = self.torch()?;
        t.top.iter().find(|e| e.key == key).map(|e| e.kind.as_str())
    }

    /// The path as the user gave it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// String metadata (safetensors `__metadata__`, or plain values of a `.pth`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Entries that are neither tensors nor plain metadata (`.pth` only).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The training step, when one was found.
    pub fn step(&self) -> Option<u64> {
        self.step.as_ref().map(|s| s.0)
    }

    /// Where the step came from.
    pub fn step_source(&self) -> Option<&StepSource> {
        self.step.as_ref().map(|s| &s.1)
    }

    /// The files holding tensor data (one, except for sharded checkpoints and the scratch file
    /// of gathered views).
    pub fn files(&self) -> &[DataFile] {
        &self.files
    }

    /// What a PyTorch archive adds: its top-level entries and storage records.
    /// What a DCP checkpoint adds: chunks per tensor, its files, its planner data.
    pub fn dcp(&self) -> Option<&dcp::Parts> {
        self.dcp.as_deref()
    }

    pub(crate) fn torch(&self) -> Option<&torch::Parts> {
        self.torch.as_deref()
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

    /// An error when the checkpoint was opened with [`Open::HeaderOnly`] and holds a tensor
    /// whose values that did not prepare (a mistake of the caller, reported rather than reading
    /// wrong values).
    pub fn check_readable(&self) -> Result<()> {
        if self.header_only {
            return Err(Error::format(
                &self.path,
                "opened for its header only: its tensors cannot be read",
            ));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of tensor `t` starting `off` bytes into its data.
    pub fn read_at(&self, t: &TensorInfo, off: u64, buf: &mut [u8]) -> Result<()> {
        let Some(segments) = &t.segments else {
            return self.read_range(&t.name, t.file, t.offset, t.len, off, buf);
        };
        if off
            .checked_add(buf.len() as u64)
            .map_or(true, |e| e > t.len)
        {
            return Err(Error::tensor(
                &self.path,
                &t.name,
                "read past the end of the tensor",
            ));
        }
        let (mut at, mut rest) = (off, buf);
        let first = segments
            .partition_point(|s| s.start + s.len <= off)
            .min(segments.len());
        for s in segments[first..].iter() {
            if rest.is_empty() {
                break;
            }
            if at >= s.start + s.len {
                continue;
            }
            let k = ((s.start + s.len - at) as usize).min(rest.len());
            let (now, later) = rest.split_at_mut(k);
            self.read_range(&t.name, s.file, s.offset, s.len, at - s.start, now)?;
            at += k as u64;
            rest = later;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes starting `off` bytes into the range `start .. start + len` of
    /// data file `file`: a tensor's data (as [`Checkpoint::read_at`]), or raw bytes that a plan
    /// copies as they are (the storage records of a `.pth` swapped inside its archive), named
    /// `name` in errors.
    pub fn read_range(
        &self,
        name: &str,
        file: usize,
        start: u64,
        len: u64,
        off: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        self.check_readable()?;
        off.checked_add(buf.len() as u64)
            .filter(|&e| e <= len)
            .ok_or_else(|| Error::tensor(&self.path, name, "read past the end of the tensor"))?;
        let df = &self.files[file];
        df.file
            .read_exact_at(buf, start + off)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::tensor(
                    &df.path,
                    name,
                    "file is shorter than its header says (truncated while in use?)",
                ),
                _ => Error::tensor(&df.path, name, e.to_string()),
            })
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Bytes of the checkpoint's own files (scratch files left out).
    pub fn file_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| !f.scratch)
            .map(|f| f.len)
            .sum()
    }

    /// Checks that no file changed since the header was read.
    pub fn check_unchanged(&self) -> Result<()> {
        self.files.iter().try_for_each(DataFile::check_unchanged)
    }
}

/// The format a single-file reader's result is in.
/// Opens a single-file checkpoint, its format told by its first bytes.
pub(crate) fn open_file(path: &Path, how: Open) -> Result<Found> {
    let mut magic = [0u8; 512];
    let (file, _) = open_regular(path)?;
    let n = read_up_to(&file, 0, &mut magic).map_err(|e| Error::io(path, e))?;
    drop(file);
    let magic = &magic[..n];
    if zip::is_zip(magic) {
        return torch::open(path, how);
    }
    match pickle_kind(magic) {
        Some(PickleKind::Tar) => Err(Error::format(
            path,
            "a tar archive (PyTorch's serialization before 0.4) is not supported; convert it \
             once, in Python, with torch.save(torch.load(...)) on a trusted file",
        )),
        Some(PickleKind::Legacy) => torch::open_legacy(path, how),
        Some(PickleKind::Plain) => torch::open_pickle(path, how),
        None => safetensors::open(path),
    }
}

/// The weights file names of model directories, as `save_pretrained` writes them.
pub const WEIGHTS_NAMES: [&str; 4] = [
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
];

/// The one weights file of model directory `dir`, when it has no sharded index: a file of
/// [`WEIGHTS_NAMES`], or its only `.safetensors` file.
fn single_weights(dir: &Path) -> Result<Option<PathBuf>> {
    if sharded::find_index(dir).is_ok() {
        return Ok(None);
    }
    Ok(weights_of_dir(dir)?.map(|n| dir.join(n)))
}

/// The name of the weights of directory `dir`: its sharded index's weights name
/// (`model.safetensors` for `model.safetensors.index.json`), a file of [`WEIGHTS_NAMES`], or
/// its only `.safetensors` file; `None` if it has none of these.
pub fn weights_of_dir(dir: &Path) -> Result<Option<String>> {
    if let Ok(index) = sharded::find_index(dir) {
        let name = index
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(Some(
            name.strip_suffix(".index.json")
                .unwrap_or(&name)
                .to_string(),
        ));
    }
    for n in WEIGHTS_NAMES {
        if dir.join(n).is_file() {
            return Ok(Some(n.to_string()));
        }
    }
    let mut st: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") && dir.join(n).is_file())
        .collect();
    st.sort();
    Ok(if st.len() == 1 { st.pop() } else { None })
}

/// The pickle-based formats a file's first 512 bytes tell.
enum PickleKind {
    /// A tar archive (torch < 0.4).
    Tar,
    /// PyTorch's legacy serialization: a pickle of its magic number first.
    Legacy,
    /// Any other pickle stream (protocol 2 to 5).
    Plain,
}

fn pickle_kind(magic: &[u8]) -> Option<PickleKind> {
    // A safetensors header (8 bytes of length, then JSON) is never taken for one.
    if magic.get(8) == Some(&b'{') {
        return None;
    }
    if magic.len() >= 262 && &magic[257..262] == b"ustar" {
        return Some(PickleKind::Tar);
    }
    // A pickle (protocol 2 to 5) of torch's legacy magic number 0x1950a86a20f9469cfc6c.
    match magic {
        [0x80, 2..=5, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, ..] => {
            Some(PickleKind::Legacy)
        }
        [0x80, 2..=5, ..] => Some(PickleKind::Plain),
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
