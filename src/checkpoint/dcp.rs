//! Torch distributed checkpoints (DCP, `docs/dcp-format.md`): a directory holding a `.metadata`
//! pickle and the `*.distcp` files of the ranks, as `torch.distributed.checkpoint.save` writes
//! them (torchtitan, FSDP2).
//!
//! `.metadata` is run through the restricted pickle machine: only the classes of
//! `torch.distributed.checkpoint.metadata` (and `filesystem._StorageInfo`, `torch.Size`, the
//! dtypes) are understood, by name, and nothing is imported or called. Each tensor entry gives
//! the global shape, the dtype and the chunks (boxes of the global tensor, one per rank that
//! holds a part); `storage_data` gives where each chunk lies: a byte range of a `.distcp` file
//! that is a whole `torch.save` zip of the chunk, read with the `.pth` rules.
//!
//! A tensor stored as one chunk is read in place. A tensor split into chunks is assembled,
//! chunk by chunk through a bounded buffer, into an anonymous temporary file when the
//! checkpoint is opened readable, never in memory. Non-tensor entries (`BytesStorageMetadata`)
//! that hold a plain number, string or bool become metadata (the `step`); the others are listed
//! as skipped.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::torch::{chunk_at, is_contiguous, object_at};
use super::{DataFile, Format, Found, Open, Skipped};
use crate::codec::pickle::{self, Id, Pickle, Value};
use crate::codec::{DType, Segment, TensorInfo};
use crate::error::{Error, Result};

/// Largest `.metadata` read (it is read whole).
const MAX_METADATA: u64 = 256 << 20;
/// Most chunks holding elements of one tensor (a rank's part each; torch writes one per rank
/// and tensor-parallel shard).
const MAX_CHUNKS: usize = 1 << 16;
/// Largest non-tensor entry read for its value.
const MAX_BYTES_ITEM: u64 = 1 << 20;
/// Buffer of the assembly of a chunked tensor.
const COPY_BUFFER: usize = 8 << 20;
/// The module of DCP's metadata classes.
const METADATA: &str = "torch.distributed.checkpoint.metadata";

/// The step entries of a DCP checkpoint, in order of preference (torchtitan's `train_state`).
pub const DCP_STEP_KEYS: [&str; 3] = ["step", "train_state.step", "trainer.step"];

/// One item of a planner-data path: a dict key or a list index.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum PathKey {
    Key(String),
    Index(u64),
}

/// What a DCP checkpoint adds to a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct Parts {
    /// The chunks of each tensor (in the checkpoint's tensor order).
    pub chunks: Vec<usize>,
    /// The `.distcp` files the chunks lie in.
    pub files: Vec<String>,
    /// `planner_data`: where each FQN sits in the nested state dict that was saved
    /// (`("optim", "state", "fc.weight", "exp_avg")`), as `dcp_to_torch_save` rebuilds it.
    pub planner: HashMap<String, Vec<PathKey>>,
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

/// A key of `storage_data`: the FQN, and the chunk's offsets (none for a non-tensor entry).
type IndexKey = (String, Option<Vec<u64>>);

/// One chunk of a tensor: its box in the global tensor, and where its bytes are.
struct Chunk {
    offsets: Vec<u64>,
    sizes: Vec<u64>,
    /// `(relative path, offset, length)` of its `torch.save` zip.
    at: (String, u64, u64),
}

/// One entry of `state_dict_metadata`.
enum Entry {
    Tensor {
        fqn: String,
        dtype: DType,
        shape: Vec<u64>,
        chunks: Vec<Chunk>,
    },
    Bytes {
        fqn: String,
        at: (String, u64, u64),
    },
}

/// Opens the DCP checkpoint in `dir`.
pub(crate) fn open(dir: &Path, how: Open) -> Result<Found> {
    let meta_path = dir.join(".metadata");
    let (file, m) = super::open_regular(&meta_path)?;
    if m.len() > MAX_METADATA {
        return Err(Error::format(
            &meta_path,
            format!(
                "{} bytes exceeds the {MAX_METADATA}-byte limit of a .metadata",
                m.len()
            ),
        ));
    }
    let mut bytes = vec![0u8; m.len() as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| Error::io(&meta_path, e))?;
    let p = Pickle::parse(&bytes, &pickle::LIMITS)
        .map_err(|e| Error::format(&meta_path, format!("malformed pickle: {e}")))?;
    let entries = parse(&p).map_err(|e| Error::format(&meta_path, e))?;
    let planner = planner_data(&p);

    // The files, each opened once: names inside the directory only.
    let real_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut files = Files {
        dir,
        real_dir,
        meta_path: &meta_path,
        files: Vec::new(),
        file_of: HashMap::new(),
    };
    let mut tensors = Vec::new();
    let mut metadata = std::collections::BTreeMap::new();
    let mut skipped = Vec::new();
    let mut header_only = false;
    let mut pending: Vec<(usize, Vec<Place>)> = Vec::new();
    let mut bytes_entries = Vec::new();
    for e in &entries {
        match e {
            Entry::Bytes { fqn, at } => {
                let (i, off, len) = files.locate(at, &format!("entry `{fqn}`"))?;
                bytes_entries.push((fqn.clone(), i, off, len));
                let f = &files.files[i];
                if len > MAX_BYTES_ITEM {
                    skipped.push(Skipped {
                        name: fqn.clone(),
                        kind: format!("bytes entry ({len} bytes)"),
                    });
                    continue;
                }
                let (values, others, n) = object_at(f.file(), off, len, f.path())?;
                let under = |k: &str| {
                    if k.is_empty() {
                        fqn.clone()
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
                        name: fqn.clone(),
                        kind: format!("bytes entry holding {n} tensors"),
                    });
                }
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
                pending.push((tensors.len() - 1, places));
            }
        }
    }
    let names: Vec<String> = {
        let mut by_index: Vec<(&usize, &String)> =
            files.file_of.iter().map(|(k, v)| (v, k)).collect();
        by_index.sort();
        by_index.into_iter().map(|(_, k)| k.clone()).collect()
    };
    let chunk_counts: Vec<usize> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Tensor { chunks, .. } => Some(chunks.len()),
            Entry::Bytes { .. } => None,
        })
        .collect();
    let mut files = files.files;
    if how == Open::HeaderOnly {
        // Only `.metadata` was read: the chunks' own headers are not.
        header_only = !tensors.is_empty();
    } else {
        let mut spill: Option<DataFile> = None;
        let mut blobs: HashMap<(usize, u64), Vec<TensorInfo>> = HashMap::new();
        // Where every chunk's bytes are, to refuse two chunks sharing them.
        let mut ranges: Vec<(usize, u64, u64, &str)> = Vec::new();
        let mut all_located = Vec::with_capacity(pending.len());
        let mut k = 0;
        for e in &entries {
            let Entry::Tensor { fqn, chunks, .. } = e else {
                continue;
            };
            let (ti, places) = &pending[k];
            k += 1;
            let t = &tensors[*ti];
            let mut located = Vec::with_capacity(chunks.len());
            for (c, &(fi, off, len)) in chunks.iter().zip(places) {
                let f = &files[fi];
                let sizes: Vec<usize> = c.sizes.iter().map(|&d| d as usize).collect();
                let (dtype, shape, stride, data) = if is_zip_at(f, off)? {
                    let (local, data, stored) = chunk_at(f.file(), off, len, f.path())?;
                    if local.nbytes() > stored {
                        // A view repeating its storage's bytes (a stride of 0): refused, so
                        // that a small file cannot stand for a large tensor.
                        return Err(Error::tensor(
                            f.path(),
                            fqn,
                            format!(
                                "a chunk of {} bytes views a storage of {stored}",
                                local.nbytes()
                            ),
                        ));
                    }
                    ranges.push((fi, off, len, fqn.as_str()));
                    (local.dtype, local.shape.clone(), local.stride.clone(), data)
                } else {
                    // SerializationFormat.SAFETENSORS: the range starts a safetensors file of
                    // the rank's chunks, which runs to the end of the `.distcp` file.
                    let header = match blobs.entry((fi, off)) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(safetensors_at(f, off)?)
                        }
                    };
                    let s = header.iter().find(|s| s.name == *fqn).ok_or_else(|| {
                        Error::tensor(
                            f.path(),
                            fqn,
                            "is not in the safetensors data its chunk names",
                        )
                    })?;
                    if s.len != len {
                        return Err(Error::tensor(
                            f.path(),
                            fqn,
                            format!("its chunk is {} bytes, where .metadata says {len}", s.len),
                        ));
                    }
                    ranges.push((fi, off + s.offset, s.len, fqn.as_str()));
                    (
                        s.dtype,
                        s.shape.clone(),
                        row_major(&s.shape),
                        off + s.offset,
                    )
                };
                if dtype != t.dtype || shape != sizes {
                    return Err(Error::tensor(
                        f.path(),
                        fqn,
                        format!(
                            "a chunk holds {dtype} {shape:?}, where .metadata says {} {sizes:?}",
                            t.dtype
                        ),
                    ));
                }
                let contiguous = is_contiguous(&shape, &stride);
                located.push((fi, data, stride, contiguous));
            }
            all_located.push(located);
        }
        ranges.retain(|r| r.2 > 0);
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            let ((fa, oa, la, a), (fb, ob, _, b)) = (w[0], w[1]);
            if fa == fb && oa + la > ob {
                return Err(Error::format(
                    files[fa].path(),
                    format!("chunks of `{a}` and `{b}` share bytes {ob}..{}", oa + la),
                ));
            }
        }
        let mut k = 0;
        for e in &entries {
            let Entry::Tensor {
                fqn, shape, chunks, ..
            } = e
            else {
                continue;
            };
            let (ti, _) = &pending[k];
            let located: &Vec<_> = &all_located[k];
            k += 1;
            let t = &mut tensors[*ti];
            let whole = chunks.len() == 1 && chunks[0].sizes == *shape;
            if whole && located[0].3 {
                t.file = located[0].0;
                t.offset = located[0].1;
                continue;
            }
            // Chunks that are each one run of the global tensor (FSDP2's Shard(0) shards):
            // read in place, as the segments of the tensor.
            let size = t.dtype.size() as u64;
            let runs: Option<Vec<Segment>> = chunks
                .iter()
                .zip(located)
                .filter(|(c, _)| !c.sizes.contains(&0))
                .map(|(c, (fi, data, stride, _))| {
                    one_run(c, shape, stride).map(|dst| Segment {
                        file: *fi,
                        offset: *data,
                        start: dst * size,
                        len: c.sizes.iter().product::<u64>() * size,
                    })
                })
                .collect();
            if let Some(mut segs) = runs.filter(|s| !s.is_empty()) {
                segs.sort_by_key(|s| s.start);
                t.file = segs[0].file;
                t.offset = segs[0].offset;
                t.segments = Some(segs.into_boxed_slice());
                continue;
            }
            let sp = match &mut spill {
                Some(sp) => sp,
                None => {
                    let file = tempfile::tempfile().map_err(|e| Error::io(dir, e))?;
                    spill.insert(DataFile::scratch(dir, file))
                }
            };
            let at = sp.len;
            sp.file.set_len(at + t.len).map_err(|e| Error::io(dir, e))?;
            for (c, (fi, data, stride, _)) in chunks.iter().zip(located) {
                assemble(&files[*fi], *data, stride, c, shape, t.dtype, &sp.file, at).map_err(
                    |e| match e {
                        Error::Io { path, source } => Error::tensor(path, fqn, source.to_string()),
                        e => e,
                    },
                )?;
            }
            sp.len += t.len;
            t.file = usize::MAX; // the spill, numbered below
            t.offset = at;
        }
        if let Some(mut sp) = spill {
            sp.seal()?;
            let n = files.len();
            for t in tensors.iter_mut().filter(|t| t.file == usize::MAX) {
                t.file = n;
            }
            (&sp.file).flush().map_err(|e| Error::io(dir, e))?;
            files.push(sp);
        }
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

/// The `.distcp` files of a checkpoint, each opened once, as its entries name them.
struct Files<'a> {
    dir: &'a Path,
    real_dir: std::path::PathBuf,
    meta_path: &'a Path,
    files: Vec<DataFile>,
    file_of: HashMap<String, usize>,
}

impl Files<'_> {
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

/// Copies the chunk whose elements start at `data` of `from` (with the chunk's own `stride`)
/// into its box `c` of the global tensor of `shape`, row-major at `base` of `to`, through a
/// bounded buffer: whole runs where the chunk and the global tensor are both contiguous.
#[allow(clippy::too_many_arguments)]
fn assemble(
    from: &DataFile,
    data: u64,
    stride: &[usize],
    c: &Chunk,
    shape: &[u64],
    dtype: DType,
    to: &std::fs::File,
    base: u64,
) -> Result<()> {
    let n = shape.len();
    let size = dtype.size() as u64;
    if c.sizes.contains(&0) {
        return Ok(());
    }
    // Row-major strides of the global tensor, in elements.
    let gstride = row_major(shape);
    // The run: elements copied at once, over the innermost dims [inner, n), where the chunk's
    // elements are one run of its storage and the global tensor's one run too.
    let mut run = 1u64;
    let mut inner = n;
    while inner > 0 {
        let d = inner - 1;
        if stride[d] as u64 != run && c.sizes[d] != 1 {
            break;
        }
        run *= c.sizes[d];
        inner = d;
        if c.sizes[d] != shape[d] {
            break;
        }
    }
    let total = run * size;
    let mut buf = vec![0u8; total.min(COPY_BUFFER as u64) as usize];
    // Every index of the outer dims [0, inner).
    let mut idx = vec![0u64; inner];
    loop {
        let mut src = 0u64;
        let mut dst = 0u64;
        for d in 0..n {
            let i = if d < inner { idx[d] } else { 0 };
            src += i * stride[d] as u64;
            dst += (c.offsets[d] + i) * gstride[d];
        }
        let mut done = 0u64;
        while done < total {
            let k = (total - done).min(buf.len() as u64) as usize;
            from.file()
                .read_exact_at(&mut buf[..k], data + src * size + done)
                .map_err(|e| Error::io(from.path(), e))?;
            to.write_all_at(&buf[..k], base + dst * size + done)
                .map_err(|e| Error::io(from.path(), e))?;
            done += k as u64;
        }
        if !next(&mut idx, &c.sizes[..inner]) {
            return Ok(());
        }
    }
}

/// Whether the bytes at `off` of `f` start a zip archive (a `torch.save` record).
fn is_zip_at(f: &DataFile, off: u64) -> Result<bool> {
    let mut magic = [0u8; 4];
    let n = super::read_up_to(f.file(), off, &mut magic).map_err(|e| Error::io(f.path(), e))?;
    Ok(crate::codec::zip::is_zip(&magic[..n]))
}

/// The tensors of the safetensors file starting at `off` of `f` and running to its end, with
/// offsets in `f` counted from `off`.
fn safetensors_at(f: &DataFile, off: u64) -> Result<Vec<TensorInfo>> {
    let (tensors, _) = crate::codec::safetensors::validate(f.path(), f.len() - off, |at, buf| {
        super::read_up_to(f.file(), off + at, buf)
    })?;
    Ok(tensors)
}

/// Row-major strides of `shape`, in elements.
fn row_major<T: Copy + std::ops::Mul<Output = T> + From<u8>>(shape: &[T]) -> Vec<T> {
    let mut s = vec![T::from(1); shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Where chunk `c` (elements with `stride`) starts in the global tensor of `shape`, in elements,
/// when its elements are one run both in its storage and in the global tensor.
fn one_run(c: &Chunk, shape: &[u64], stride: &[usize]) -> Option<u64> {
    let n = shape.len();
    let mut run = 1u64;
    let mut global_full = true;
    for d in (0..n).rev() {
        if c.sizes[d] != 1 && (stride[d] as u64 != run || !global_full) {
            return None;
        }
        run *= c.sizes[d];
        global_full &= c.sizes[d] == shape[d];
    }
    let mut g = 1u64;
    let mut dst = 0u64;
    for d in (0..n).rev() {
        dst += c.offsets[d] * g;
        g *= shape[d];
    }
    Some(dst)
}

/// Steps the row-major index `idx` within `sizes`; false after the last.
fn next(idx: &mut [u64], sizes: &[u64]) -> bool {
    for d in (0..idx.len()).rev() {
        idx[d] += 1;
        if idx[d] < sizes[d] {
            return true;
        }
        idx[d] = 0;
    }
    false
}

/// The entries a `.metadata` pickle describes (the fuzz target `dcp_metadata`).
pub fn parse_metadata_bytes(bytes: &[u8]) -> Result<usize> {
    let path = Path::new("<memory>/.metadata");
    let p = Pickle::parse(bytes, &pickle::LIMITS)
        .map_err(|e| Error::format(path, format!("malformed pickle: {e}")))?;
    let n = parse(&p).map_err(|e| Error::format(path, e))?.len();
    let _ = planner_data(&p);
    Ok(n)
}

/// `planner_data` of the Metadata, where it is well-formed (it only nests what is written).
fn planner_data(p: &Pickle) -> HashMap<String, Vec<PathKey>> {
    let mut out = HashMap::new();
    let Ok(root) = object(p, p.root, METADATA, "Metadata") else {
        return out;
    };
    let Some(entries) = field(p, root, "planner_data").and_then(|v| dict(p, v)) else {
        return out;
    };
    for &(k, v) in entries {
        let (Some(fqn), Some(items)) = (p.str(k), p.seq(v)) else {
            continue;
        };
        let path: Option<Vec<PathKey>> = items
            .iter()
            .map(|&x| match p.get(x) {
                Value::Str(s) => Some(PathKey::Key(s.to_string())),
                Value::Int(i) => u64::try_from(*i).ok().map(PathKey::Index),
                _ => None,
            })
            .collect();
        if let Some(path) = path {
            out.insert(fqn.to_string(), path);
        }
    }
    out
}

/// The entries of `.metadata`, in its order.
fn parse(p: &Pickle) -> std::result::Result<Vec<Entry>, String> {
    let root = object(p, p.root, METADATA, "Metadata")?;
    let sdm = field(p, root, "state_dict_metadata")
        .and_then(|v| dict(p, v))
        .ok_or("its Metadata has no state_dict_metadata dict")?;
    let storage = field(p, root, "storage_data")
        .and_then(|v| dict(p, v))
        .ok_or("its Metadata has no storage_data dict")?;
    // Megatron-core's torch_dist may store tensors flattened under another shape, described
    // in `mcore_data`: refused, naming one, rather than read with a wrong shape.
    if let Some(m) = field(p, root, "mcore_data").and_then(|v| dict(p, v)) {
        if let Some(&(k, _)) = m.first() {
            return Err(format!(
                "tensor `{}` is stored reformulated by Megatron-core (`mcore_data`), which is \
                 not supported: convert the checkpoint with Megatron's own tools first",
                p.str(k).map(crate::text::printable).unwrap_or_default()
            ));
        }
    }
    let mut index: HashMap<IndexKey, (String, u64, u64)> = HashMap::with_capacity(storage.len());
    for &(k, v) in storage {
        let key = object(p, k, METADATA, "MetadataIndex")?;
        let fqn = field(p, key, "fqn")
            .and_then(|f| p.str(f))
            .ok_or("a MetadataIndex without an fqn")?
            .to_string();
        let offset = match field(p, key, "offset") {
            None => None,
            Some(o) if p.get(o) == &Value::None => None,
            Some(o) => Some(size(p, o).ok_or_else(|| format!("`{fqn}`: a malformed offset"))?),
        };
        let info = object(
            p,
            v,
            "torch.distributed.checkpoint.filesystem",
            "_StorageInfo",
        )?;
        let num = |name: &str| {
            field(p, info, name)
                .and_then(|x| p.int(x))
                .and_then(|x| u64::try_from(x).ok())
                .ok_or_else(|| format!("`{fqn}`: its _StorageInfo has no {name}"))
        };
        let (offset_at, length) = (num("offset")?, num("length")?);
        let rel = field(p, info, "relative_path")
            .and_then(|x| p.str(x))
            .ok_or_else(|| format!("`{fqn}`: its _StorageInfo has no relative_path"))?
            .to_string();
        if let Some(t) = field(p, info, "transform_descriptors") {
            let names: Vec<&str> = p
                .seq(t)
                .map(|s| s.iter().filter_map(|&x| p.str(x)).collect())
                .unwrap_or_default();
            if !names.is_empty() {
                return Err(format!(
                    "`{fqn}` is stored through stream transforms ({}), which are not supported",
                    names.join(", ")
                ));
            }
        }
        index.insert((fqn, offset), (rel, offset_at, length));
    }
    let mut out = Vec::with_capacity(sdm.len());
    for &(k, v) in sdm {
        let fqn = p
            .str(k)
            .ok_or("a state_dict_metadata key that is not a string")?;
        let Value::Call(c) = p.get(v) else {
            return Err(format!("`{fqn}`: its metadata is not an object"));
        };
        let g = p
            .global(c.func)
            .ok_or_else(|| format!("`{fqn}`: not an object"))?;
        if g.is(METADATA, "BytesStorageMetadata") {
            let at = index
                .get(&(fqn.to_string(), None))
                .cloned()
                .ok_or_else(|| format!("`{fqn}` has no entry in storage_data"))?;
            out.push(Entry::Bytes {
                fqn: fqn.to_string(),
                at,
            });
            continue;
        }
        let t = object(p, v, METADATA, "TensorStorageMetadata")?;
        let shape = field(p, t, "size")
            .and_then(|s| size(p, s))
            .ok_or_else(|| format!("`{fqn}`: no size"))?;
        let dtype = field(p, t, "properties")
            .and_then(|x| dtype_of(p, x))
            .ok_or_else(|| format!("`{fqn}`: no dtype (or one that is not supported)"))?;
        let chunk_ids = field(p, t, "chunks")
            .and_then(|c| p.seq(c))
            .ok_or_else(|| format!("`{fqn}`: no chunks"))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("`{fqn}`: its shape {shape:?} is too large"))?;
        let mut chunks = Vec::with_capacity(chunk_ids.len());
        let mut volume = 0u64;
        for &cid in chunk_ids {
            let ch = object(p, cid, METADATA, "ChunkStorageMetadata")?;
            let offsets = field(p, ch, "offsets").and_then(|x| size(p, x));
            let sizes = field(p, ch, "sizes").and_then(|x| size(p, x));
            let (Some(offsets), Some(sizes)) = (offsets, sizes) else {
                return Err(format!("`{fqn}`: a chunk without offsets and sizes"));
            };
            if offsets.len() != shape.len()
                || sizes.len() != shape.len()
                || offsets
                    .iter()
                    .zip(&sizes)
                    .zip(&shape)
                    .any(|((&o, &s), &d)| o.checked_add(s).map_or(true, |e| e > d))
            {
                return Err(format!(
                    "`{fqn}`: the chunk at {offsets:?} of sizes {sizes:?} is outside its shape \
                     {shape:?}"
                ));
            }
            volume = volume
                .checked_add(sizes.iter().product::<u64>())
                .ok_or_else(|| format!("`{fqn}`: its chunks are too large"))?;
            let at = index
                .get(&(fqn.to_string(), Some(offsets.clone())))
                .cloned()
                .ok_or_else(|| {
                    format!("`{fqn}`: the chunk at {offsets:?} is not in storage_data")
                })?;
            chunks.push(Chunk { offsets, sizes, at });
        }
        // In bounds, and no two overlapping: then covering every element is their volume.
        check_disjoint(fqn, &chunks)?;
        if volume != numel {
            return Err(format!(
                "`{fqn}`: its chunks hold {volume} of its {numel} elements"
            ));
        }
        out.push(Entry::Tensor {
            fqn: fqn.to_string(),
            dtype,
            shape,
            chunks,
        });
    }
    Ok(out)
}

/// That no two non-empty chunks of `fqn` overlap: swept along the dimension whose offsets
/// differ most, so that `Shard(d)` splits and grids cost about one comparison per chunk.
fn check_disjoint(fqn: &str, chunks: &[Chunk]) -> std::result::Result<(), String> {
    let mut full: Vec<&Chunk> = chunks.iter().filter(|c| !c.sizes.contains(&0)).collect();
    if full.len() > MAX_CHUNKS {
        return Err(format!(
            "`{fqn}` is in {} chunks, more than the {MAX_CHUNKS} read",
            full.len()
        ));
    }
    let Some(first) = full.first() else {
        return Ok(());
    };
    let n = first.offsets.len();
    if n == 0 {
        // 0-d: one element; two chunks of it overlap.
        return match full.len() {
            0 | 1 => Ok(()),
            _ => Err(format!("`{fqn}`: two chunks hold its one element")),
        };
    }
    let dim = (0..n)
        .max_by_key(|&d| {
            let mut o: Vec<u64> = full.iter().map(|c| c.offsets[d]).collect();
            o.sort_unstable();
            o.dedup();
            o.len()
        })
        .unwrap_or(0);
    let meet = |a: &Chunk, b: &Chunk| {
        (0..n).all(|d| {
            a.offsets[d] < b.offsets[d] + b.sizes[d] && b.offsets[d] < a.offsets[d] + a.sizes[d]
        })
    };
    full.sort_by_key(|c| c.offsets[dim]);
    // Active: the chunks whose extent along `dim` reaches the current start.
    let mut active: Vec<&Chunk> = Vec::new();
    for c in full {
        let start = c.offsets[dim];
        active.retain(|a| a.offsets[dim] + a.sizes[dim] > start);
        if let Some(a) = active.iter().find(|a| meet(a, c)) {
            return Err(format!(
                "`{fqn}`: the chunks at {:?} and {:?} overlap",
                a.offsets, c.offsets
            ));
        }
        active.push(c);
    }
    Ok(())
}

/// The state (`BUILD` dict) of an object of class `module.name`; an error naming what it is
/// otherwise. An object without state (`BytesStorageMetadata`) has an empty one.
fn object<'p>(
    p: &'p Pickle,
    id: Id,
    module: &str,
    name: &str,
) -> std::result::Result<&'p [(Id, Id)], String> {
    let Value::Call(c) = p.get(id) else {
        return Err(format!(
            "not a DCP .metadata: a {} where a {name} should be",
            p.get(id).type_name()
        ));
    };
    match p.global(c.func) {
        Some(g) if g.is(module, name) => {}
        Some(g) => {
            return Err(format!(
                "not a DCP .metadata: `{}` is not allowed where a {name} should be (nothing in \
                 it was run)",
                g.dotted()
            ))
        }
        None => {
            return Err(format!(
                "not a DCP .metadata: no class where a {name} should be"
            ))
        }
    }
    Ok(match c.state {
        Some(s) => dict(p, s).unwrap_or(&[]),
        None => &[],
    })
}

/// The entries of a dict.
fn dict(p: &Pickle, id: Id) -> Option<&[(Id, Id)]> {
    match p.get(id) {
        Value::Dict(e) => Some(e),
        Value::Call(c) if !c.entries.is_empty() => Some(&c.entries),
        _ => None,
    }
}

/// Field `name` of an object's state.
fn field(p: &Pickle, state: &[(Id, Id)], name: &str) -> Option<Id> {
    state
        .iter()
        .find(|&&(k, _)| p.str(k) == Some(name))
        .map(|&(_, v)| v)
}

/// A `torch.Size((d0, d1, ...))`, or a plain tuple or list of non-negative integers.
fn size(p: &Pickle, id: Id) -> Option<Vec<u64>> {
    let items = match p.get(id) {
        Value::Call(c) if p.global(c.func).is_some_and(|g| g.is("torch", "Size")) => {
            let args = p.seq(c.args)?;
            p.seq(*args.first()?)?
        }
        Value::Tuple(t) | Value::List(t) => t,
        _ => return None,
    };
    items
        .iter()
        .map(|&x| p.int(x).and_then(|v| u64::try_from(v).ok()))
        .collect()
}

/// The dtype of a `TensorProperties` (its state is a tuple with the dtype first, or a dict).
fn dtype_of(p: &Pickle, id: Id) -> Option<DType> {
    let Value::Call(c) = p.get(id) else {
        return None;
    };
    let g = p.global(c.func)?;
    if !g.is(METADATA, "TensorProperties") {
        return None;
    }
    let state = c.state?;
    let d = match p.get(state) {
        Value::Tuple(t) => *t.first()?,
        _ => field(p, dict(p, state)?, "dtype")?,
    };
    let g = p.global(d)?;
    if &*g.module != "torch" {
        return None;
    }
    DType::from_torch_name(&g.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offsets: &[u64], sizes: &[u64]) -> Chunk {
        Chunk {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
            at: (String::new(), 0, 0),
        }
    }

    #[test]
    fn overlapping_chunks_are_found_in_one_sweep() {
        // A grid of 2 x 3 boxes: disjoint.
        let grid: Vec<Chunk> = (0..2)
            .flat_map(|i| (0..3).map(move |j| chunk(&[i * 4, j * 5], &[4, 5])))
            .collect();
        assert!(check_disjoint("t", &grid).is_ok());
        // One more box across two of them.
        let mut bad = grid;
        bad.push(chunk(&[2, 3], &[4, 4]));
        assert!(check_disjoint("t", &bad).unwrap_err().contains("overlap"));
        // Shard(1) of many: linear, and empty chunks cost nothing.
        let cols: Vec<Chunk> = (0..60_000).map(|j| chunk(&[0, j], &[7, 1])).collect();
        let t = std::time::Instant::now();
        assert!(check_disjoint("t", &cols).is_ok());
        let empties: Vec<Chunk> = (0..100_000).map(|_| chunk(&[0], &[0])).collect();
        assert!(check_disjoint("t", &empties).is_ok());
        if cfg!(not(debug_assertions)) {
            assert!(t.elapsed().as_secs() < 1);
        }
        // Too many chunks holding elements: refused.
        let many: Vec<Chunk> = (0..(MAX_CHUNKS as u64 + 1))
            .map(|j| chunk(&[j], &[1]))
            .collect();
        assert!(check_disjoint("t", &many).unwrap_err().contains("chunks"));
        // Two chunks of a 0-d tensor.
        assert!(check_disjoint("t", &[chunk(&[], &[]), chunk(&[], &[])]).is_err());
    }
}
