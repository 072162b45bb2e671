//! PyTorch zip checkpoints (`torch.save` since 1.6: `.pth`, `.pt`, `.bin`, `.ckpt`,
//! `.pth.tar`): the archive's `data.pkl` run through the restricted [`pickle`] machine, the
//! object graph flattened into the namespace of SPEC §1, tensors located in the stored
//! `data/<key>` records.
//!
//! Nested dicts are joined with `.` and list items indexed (`optimizer.state.0.exp_avg`).
//! Torch's tensor rebuild calls (`_rebuild_tensor{,_v2,_v3}`, `_rebuild_parameter`,
//! `_rebuild_from_type_v2`) over storages (`torch.FloatStorage`, ..., or
//! `torch.storage.UntypedStorage` with a dtype) become tensors; `OrderedDict` and any other
//! dict or list subclass is walked like a dict or list; plain numbers, strings and bools become
//! metadata under their flat name; everything else (numpy arrays, `argparse.Namespace`,
//! mmengine's `HistoryBuffer`, ...) is recorded as skipped with its kind. Nothing is imported or
//! called. A tensor whose elements are not one contiguous run of its storage is gathered into
//! an anonymous temporary file at open, so every tensor stays a contiguous byte range.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::pickle::{self, Call, Id, Pickle, Value};
use super::zip::{self, Directory, Source};
use super::{Checkpoint, DataFile, Format, Skipped, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest `data.pkl` read (it is read whole).
pub const MAX_PICKLE: u64 = 512 << 20;
/// Deepest nesting of dicts and lists flattened.
pub const MAX_DEPTH: usize = 256;
/// Most values visited while flattening: a value reachable by several paths is visited once per
/// path, so a small pickle of shared sub-graphs could otherwise describe 2^40 of them. The
/// count is computed before walking ([`tree_size`]).
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

/// File name extensions of PyTorch checkpoints.
pub const EXTENSIONS: [&str; 5] = [".pth", ".pt", ".bin", ".ckpt", ".pth.tar"];

/// Whether `path` names a PyTorch checkpoint (by extension).
pub fn is_torch_name(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// Prefix of the zip comment in which `ema-tool swap` records which side holds the EMA.
pub const COMMENT_PREFIX: &str = "ema_tool:";

/// One storage record (`<prefix>data/<key>`).
#[derive(Clone, Debug)]
pub struct Storage {
    pub key: String,
    /// Bytes the pickle says the storage holds.
    pub nbytes: u64,
    /// Index of the record in [`Directory::entries`].
    pub entry: usize,
    /// Absolute offset of the record's data.
    pub data_offset: u64,
    /// Length of the record's data (at least `nbytes`).
    pub record_len: u64,
}

/// A tensor as the pickle describes it: a view of a storage.
#[derive(Clone, Debug)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    /// Offset of the first element in the storage, in elements of `dtype`.
    pub storage_offset: u64,
    /// Index into [`Archive::storages`].
    pub storage: usize,
}

impl TorchTensor {
    /// Number of elements (checked when the archive was read).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Whether the elements are one row-major run of the storage.
    pub fn is_contiguous(&self) -> bool {
        is_contiguous(&self.shape, &self.stride)
    }
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// A top-level entry of the checkpoint, summarized for `inspect`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TopEntry {
    pub key: String,
    /// `dict`, `list`, `tensor`, `int`, ..., or the kind of a skipped object.
    pub kind: String,
    pub tensors: usize,
    pub bytes: u64,
    /// Plain values kept as metadata.
    pub values: usize,
    pub skipped: usize,
}

/// A parsed PyTorch archive: its directory, storages, tensors and the rest.
#[derive(Clone, Debug)]
pub struct Archive {
    pub dir: Directory,
    /// Record name prefix (`archive/`).
    pub prefix: String,
    pub storages: Vec<Storage>,
    pub tensors: Vec<TorchTensor>,
    pub metadata: BTreeMap<String, String>,
    pub skipped: Vec<Skipped>,
    /// Top-level entries, when the root is a dict.
    pub top: Vec<TopEntry>,
}

impl Archive {
    /// Reads and validates the directory and the pickle of the archive in `src`; `path` names
    /// it in errors.
    pub fn read(src: &Source, path: &Path) -> Result<Archive> {
        let fmt = |what: String| Error::format(path, what);
        let dir = zip::read_directory(src).map_err(fmt)?;
        let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(dir.entries.len());
        for (i, e) in dir.entries.iter().enumerate() {
            if by_name.insert(&e.name, i).is_some() {
                return Err(fmt(format!("zip entry `{}` appears twice", e.name)));
            }
        }
        let pkl: Vec<&str> = dir
            .entries
            .iter()
            .map(|e| e.name.as_str())
            .filter(|n| {
                n.strip_suffix("data.pkl").is_some_and(|p| {
                    p.is_empty() || (p.ends_with('/') && p.matches('/').count() == 1)
                })
            })
            .collect();
        let pkl_name = match pkl.as_slice() {
            [one] => *one,
            [] => {
                return Err(fmt(
                    "zip archive without a data.pkl: not a checkpoint written by torch.save".into(),
                ))
            }
            _ => {
                return Err(fmt(format!(
                    "zip archive with {} data.pkl records ({}, ...)",
                    pkl.len(),
                    pkl[0]
                )))
            }
        };
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
        if by_name.contains_key(format!("{prefix}constants.pkl").as_str()) {
            return Err(fmt(
                "a TorchScript archive (torch.jit.save), not a checkpoint: load it in Python and \
                 torch.save its state_dict()"
                    .into(),
            ));
        }
        if let Some(&i) = by_name.get(format!("{prefix}byteorder").as_str()) {
            let (off, len) = zip::data_range(src, &dir, &dir.entries[i]).map_err(fmt)?;
            let order = src.read_vec(off, len.min(16)).map_err(fmt)?;
            if order != b"little" {
                return Err(fmt(format!(
                    "byte order `{}` is not supported (only little-endian checkpoints are)",
                    String::from_utf8_lossy(&order)
                )));
            }
        }
        let e = &dir.entries[by_name[pkl_name]];
        let (off, len) = zip::data_range(src, &dir, e).map_err(fmt)?;
        if len > MAX_PICKLE {
            return Err(fmt(format!(
                "{pkl_name} is {len} bytes, above the {MAX_PICKLE}-byte limit"
            )));
        }
        let data = src.read_vec(off, len).map_err(fmt)?;
        let pickle =
            Pickle::parse(&data, &pickle::LIMITS).map_err(|e| fmt(format!("{pkl_name}: {e}")))?;
        drop(data);

        let headers = zip::Headers::new(src);
        let records = |key: &str| -> Result<(usize, u64, u64)> {
            let name = format!("{prefix}data/{key}");
            let &i = by_name.get(name.as_str()).ok_or_else(|| {
                fmt(format!(
                    "storage `{key}` has no record {name} in the archive (truncated or \
                     damaged file?)"
                ))
            })?;
            let (off, len) = zip::data_range(&headers, &dir, &dir.entries[i]).map_err(fmt)?;
            Ok((i, off, len))
        };
        let flat = flatten(&pickle, path, records)?;
        let mut metadata = flat.metadata;
        if let Some(rec) = std::str::from_utf8(&dir.comment)
            .ok()
            .and_then(|c| c.strip_prefix(COMMENT_PREFIX))
        {
            metadata.insert("ema_tool".into(), rec.to_string());
        }
        Ok(Archive {
            dir,
            prefix,
            storages: flat.storages,
            tensors: flat.tensors,
            metadata,
            skipped: flat.skipped,
            top: flat.top,
        })
    }

    /// Absolute offset of the first byte of `t`.
    pub fn data_offset(&self, t: &TorchTensor) -> u64 {
        self.storages[t.storage].data_offset + t.storage_offset * t.dtype.size() as u64
    }

    /// For `swap` inside the archive: the pairs of storage records (indices into
    /// [`Archive::storages`]) whose contents to exchange so that the tensors of every pair
    /// (`model name`, `shadow name`) exchange values and no other tensor changes.
    ///
    /// Fails, naming the tensor, when that is impossible without re-encoding the pickle: the
    /// two views differ, or a storage is shared with a tensor outside the pairs.
    pub fn record_exchange(
        &self,
        path: &Path,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<(usize, usize)>> {
        let by_name: HashMap<&str, &TorchTensor> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let get = |n: &str| {
            by_name
                .get(n)
                .copied()
                .ok_or_else(|| Error::tensor(path, n, "is not in the archive"))
        };
        let advice = "; write a .safetensors output instead";
        let mut partner: HashMap<usize, usize> = HashMap::new();
        let mut paired: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut out = Vec::new();
        for &(m, s) in pairs {
            let (tm, ts) = (get(m)?, get(s)?);
            paired.insert(m);
            paired.insert(s);
            let same_view = tm.dtype == ts.dtype
                && tm.shape == ts.shape
                && tm.stride == ts.stride
                && tm.storage_offset == ts.storage_offset;
            if !same_view {
                return Err(Error::tensor(
                    path,
                    m,
                    format!(
                        "cannot be exchanged inside the archive: it and `{s}` are laid out \
                         differently in their storages{advice}"
                    ),
                ));
            }
            if tm.storage == ts.storage {
                // The same view of the same storage: the values are already equal.
                continue;
            }
            let (a, b) = (&self.storages[tm.storage], &self.storages[ts.storage]);
            if a.nbytes != b.nbytes || a.record_len != b.record_len {
                return Err(Error::tensor(
                    path,
                    m,
                    format!(
                        "cannot be exchanged inside the archive: its storage holds {} bytes, \
                         that of `{s}` {}{advice}",
                        a.record_len, b.record_len
                    ),
                ));
            }
            for (x, y) in [(tm.storage, ts.storage), (ts.storage, tm.storage)] {
                match partner.insert(x, y) {
                    Some(prev) if prev != y => {
                        return Err(Error::tensor(
                            path,
                            m,
                            format!(
                                "cannot be exchanged inside the archive: its storage is shared \
                                 with tensors paired with another storage{advice}"
                            ),
                        ))
                    }
                    Some(_) => {}
                    None if x < y => out.push((x, y)),
                    None => {}
                }
            }
        }
        for t in &self.tensors {
            if partner.contains_key(&t.storage) && !paired.contains(t.name.as_str()) {
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
        Ok(out)
    }
}

/// Opens a PyTorch checkpoint; `gather_views`: whether to gather the values of non-contiguous views
/// into a temporary file (without, they are not to be read: see `Checkpoint::open_header`).
pub fn open(path: &Path, gather_views: bool) -> Result<Checkpoint> {
    let df = DataFile::open(path)?;
    let mut archive = Archive::read(&Source::File(&df.file, df.len), path)?;
    let mut spill: Option<DataFile> = None;
    let mut ungathered = false;
    let mut tensors = Vec::with_capacity(archive.tensors.len());
    for t in &archive.tensors {
        let len = t.nbytes();
        let (file, offset) = if t.is_contiguous() {
            (0, archive.data_offset(t))
        } else if !gather_views {
            ungathered = true;
            (0, archive.data_offset(t))
        } else {
            let bytes = gather(&df, &archive, t, path)?;
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
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            file,
            offset,
            len,
        });
    }
    if let Some(sp) = &mut spill {
        sp.seal()?;
    }
    let mut files = vec![df];
    files.extend(spill);
    let mut ckpt = Checkpoint::new(
        path.to_path_buf(),
        Format::Torch,
        files,
        tensors,
        std::mem::take(&mut archive.metadata),
        std::mem::take(&mut archive.skipped),
    )?;
    ckpt.header_only = ungathered;
    ckpt.archive = Some(Box::new(archive));
    Ok(ckpt)
}

/// The elements of a non-contiguous tensor, in row-major order.
fn gather(df: &DataFile, archive: &Archive, t: &TorchTensor, path: &Path) -> Result<Vec<u8>> {
    let elem = t.dtype.size();
    // Checked when the archive was read: the last element lies inside the storage.
    let last: u64 = t
        .shape
        .iter()
        .zip(&t.stride)
        .map(|(&d, &s)| (d as u64 - 1) * s as u64)
        .sum();
    let span = (last + 1) * elem as u64;
    if span > MAX_GATHER {
        return Err(Error::tensor(
            path,
            &t.name,
            format!(
                "is not contiguous (strides {:?}) and spans {span} bytes of its storage, above \
                 the {MAX_GATHER}-byte limit for gathering it; save it with .contiguous()",
                t.stride
            ),
        ));
    }
    let mut src = vec![0u8; span as usize];
    df.file
        .read_exact_at(&mut src, archive.data_offset(t))
        .map_err(|e| Error::tensor(path, &t.name, e.to_string()))?;
    let numel = t.numel() as usize;
    let mut out = Vec::with_capacity(numel * elem);
    let n = t.shape.len();
    let mut idx = vec![0usize; n];
    let mut pos = 0usize;
    for _ in 0..numel {
        out.extend_from_slice(&src[pos * elem..(pos + 1) * elem]);
        for d in (0..n).rev() {
            idx[d] += 1;
            pos += t.stride[d];
            if idx[d] < t.shape[d] {
                break;
            }
            pos -= t.shape[d] * t.stride[d];
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// What flattening produced.
struct Flat {
    storages: Vec<Storage>,
    tensors: Vec<TorchTensor>,
    metadata: BTreeMap<String, String>,
    skipped: Vec<Skipped>,
    top: Vec<TopEntry>,
}

struct Walker<'p, F> {
    p: &'p Pickle,
    path: &'p Path,
    /// Finds the record of storage `key`: (entry index, data offset, data length).
    records: F,
    flat: Flat,
    storage_index: HashMap<String, usize>,
    visits: usize,
    text: usize,
    /// The top-level entry being walked.
    top: Option<usize>,
    /// Plain values and skipped objects beyond [`MAX_KEPT`].
    dropped_values: usize,
    dropped_skipped: usize,
}

/// What a value turned out to be, when it is tensor-like.
enum TensorLike {
    Tensor(TorchTensor),
    Skip(String),
}

/// Flattens the object graph of `p`; `records` locates storage records.
fn flatten<F>(p: &Pickle, path: &Path, records: F) -> Result<Flat>
where
    F: FnMut(&str) -> Result<(usize, u64, u64)>,
{
    let mut w = Walker {
        p,
        path,
        records,
        flat: Flat {
            storages: Vec::new(),
            tensors: Vec::new(),
            metadata: BTreeMap::new(),
            skipped: Vec::new(),
            top: Vec::new(),
        },
        storage_index: HashMap::new(),
        visits: 0,
        text: 0,
        top: None,
        dropped_values: 0,
        dropped_skipped: 0,
    };
    match tree_size(p, p.root, MAX_VISITS as u64) {
        Ok(n) if n <= MAX_VISITS as u64 => {}
        Ok(_) => {
            return Err(w.bad(format!(
                "the object graph expands to more than {MAX_VISITS} values (shared references)"
            )))
        }
        Err(what) => return Err(w.bad(what.into())),
    }
    w.walk_root()?;
    w.finish();
    Ok(w.flat)
}

fn child(name: &str, key: &str) -> String {
    if name.is_empty() {
        key.to_string()
    } else {
        format!("{name}.{key}")
    }
}

/// A float as Python's `repr` would show it (`12.0`, `0.0002`, `1e-05` as `1e-5`).
fn float_text(f: f64) -> String {
    format!("{f:?}")
}

/// The `i`-th value the flattening walks into from `id` (dict values, list items), if any.
fn walked_child(p: &Pickle, id: Id, i: usize) -> Option<Id> {
    if let Some(e) = entries_of(p, id) {
        return e.get(i).map(|e| e.1);
    }
    match p.get(id) {
        Value::List(v) | Value::Tuple(v) => v.get(i).copied(),
        Value::Call(c) => c.items.get(i).copied(),
        _ => None,
    }
}

/// How many values the flattening visits from `root` (saturating just above `cap`), computed
/// once per value without recursion; a cycle through dicts and lists is an error.
fn tree_size(p: &Pickle, root: Id, cap: u64) -> std::result::Result<u64, &'static str> {
    const NEW: u8 = 0;
    const OPEN: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![NEW; p.values.len()];
    let mut size = vec![0u64; p.values.len()];
    // (value, next child, size so far)
    let mut stack: Vec<(Id, usize, u64)> = vec![(root, 0, 1)];
    state[root as usize] = OPEN;
    while let Some(top) = stack.last_mut() {
        let (id, i) = (top.0, top.1);
        match walked_child(p, id, i) {
            Some(c) => {
                top.1 += 1;
                match state[c as usize] {
                    NEW => {
                        state[c as usize] = OPEN;
                        stack.push((c, 0, 1));
                    }
                    OPEN => return Err("a dict or list contains itself (cyclic references)"),
                    _ => top.2 = top.2.saturating_add(size[c as usize]).min(cap + 1),
                }
            }
            None => {
                let (id, _, n) = stack.pop().expect("not empty");
                size[id as usize] = n;
                state[id as usize] = DONE;
                if let Some(parent) = stack.last_mut() {
                    parent.2 = parent.2.saturating_add(n).min(cap + 1);
                }
            }
        }
    }
    Ok(size[root as usize])
}

/// The entries of `id` when it is a dict, an `OrderedDict` or another dict subclass.
fn entries_of(p: &Pickle, id: Id) -> Option<&[(Id, Id)]> {
    match p.get(id) {
        Value::Dict(e) => Some(e),
        Value::Call(c) if !c.entries.is_empty() || is_dict_class(p, c) => Some(&c.entries),
        _ => None,
    }
}

fn is_dict_class(p: &Pickle, c: &Call) -> bool {
    p.global(c.func).is_some_and(|g| {
        g.is("collections", "OrderedDict")
            || g.is("collections", "defaultdict")
            || g.is("builtins", "dict")
            || g.is("__builtin__", "dict")
    })
}

/// The text of a dict key, when it is a plain value.
fn key_text(p: &Pickle, k: Id) -> Option<String> {
    Some(match p.get(k) {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Value::None => "None".to_string(),
        Value::Float(f) => float_text(*f),
        _ => return None,
    })
}

/// A short description of what `id` is, for the tree of `inspect`.
fn kind_of(p: &Pickle, id: Id) -> String {
    match p.get(id) {
        Value::Call(c) => {
            if let Some(g) = p.global(c.func) {
                if g.is("collections", "OrderedDict") {
                    return "dict".into();
                }
                if is_tensor_func(g) {
                    return "tensor".into();
                }
            }
            if entries_of(p, id).is_some() {
                return format!("dict ({})", call_kind(p, c));
            }
            if !c.items.is_empty() {
                return format!("list ({})", call_kind(p, c));
            }
            call_kind(p, c)
        }
        v => v.type_name().into(),
    }
}

/// What a call that is not a tensor is, for the skipped list.
fn call_kind(p: &Pickle, c: &Call) -> String {
    let Some(g) = p.global(c.func) else {
        return "object".into();
    };
    let (m, n) = (&*g.module, &*g.name);
    let numpy = m == "numpy.core.multiarray" || m == "numpy._core.multiarray";
    if numpy && n == "_reconstruct" {
        return "numpy.ndarray".into();
    }
    if numpy && n == "scalar" {
        return "numpy scalar".into();
    }
    if m == "_codecs" && n == "encode" {
        return "bytes".into();
    }
    if (m == "builtins" || m == "__builtin__") && (n == "set" || n == "frozenset") {
        return "set".into();
    }
    if m == "copyreg" && n == "_reconstructor" {
        if let Some(cls) = p
            .seq(c.args)
            .and_then(|a| a.first())
            .and_then(|&a| p.global(a))
        {
            return cls.dotted();
        }
    }
    g.dotted()
}

/// Whether `id` is a dict with a `True` value (torch's `{"conj": True}` / `{"neg": True}`).
fn has_true_flag(p: &Pickle, id: Id) -> bool {
    entries_of(p, id).is_some_and(|e| e.iter().any(|&(_, v)| p.get(v) == &Value::Bool(true)))
}

/// A tuple (or list, or `torch.Size`) of non-negative integers.
fn usize_seq(p: &Pickle, id: Id) -> Option<Vec<usize>> {
    let items = match p.get(id) {
        Value::Tuple(v) | Value::List(v) => v,
        Value::Call(c) if p.global(c.func).is_some_and(|g| g.is("torch", "Size")) => {
            let a = p.seq(c.args)?;
            let inner = *a.first()?;
            return match p.get(inner) {
                Value::Tuple(v) | Value::List(v) => v
                    .iter()
                    .map(|&i| p.int(i).and_then(|v| usize::try_from(v).ok()))
                    .collect(),
                _ => None,
            };
        }
        _ => return None,
    };
    items
        .iter()
        .map(|&i| p.int(i).and_then(|v| usize::try_from(v).ok()))
        .collect()
}

impl<'p, F> Walker<'p, F>
where
    F: FnMut(&str) -> Result<(usize, u64, u64)>,
{
    fn bad(&self, what: String) -> Error {
        Error::format(self.path, format!("data.pkl: {what}"))
    }

    fn charge_text(&mut self, n: usize) -> Result<()> {
        self.text = self.text.saturating_add(n);
        if self.text > MAX_TEXT {
            return Err(self.bad(format!(
                "flat names and values exceed {MAX_TEXT} bytes (shared or cyclic references?)"
            )));
        }
        Ok(())
    }

    fn walk_root(&mut self) -> Result<()> {
        let root = self.p.root;
        if let Some(entries) = entries_of(self.p, root) {
            for &(k, v) in entries {
                let Some(key) = key_text(self.p, k) else {
                    let kind = format!("entry with a {} key", self.p.get(k).type_name());
                    self.skip(String::from("?"), kind)?;
                    continue;
                };
                self.flat.top.push(TopEntry {
                    key: key.clone(),
                    kind: kind_of(self.p, v),
                    ..TopEntry::default()
                });
                self.top = Some(self.flat.top.len() - 1);
                self.walk(v, key, 1)?;
            }
            self.top = None;
            Ok(())
        } else {
            self.walk(root, String::new(), 0)
        }
    }

    fn skip(&mut self, name: String, kind: String) -> Result<()> {
        if let Some(t) = self.top {
            self.flat.top[t].skipped += 1;
        }
        if self.flat.skipped.len() < MAX_KEPT {
            self.flat.skipped.push(Skipped { name, kind });
        } else {
            self.dropped_skipped += 1;
        }
        Ok(())
    }

    /// Keeps the plain `value` as metadata under `name` (its text made only when kept).
    fn meta(&mut self, name: String, value: &Value) -> Result<()> {
        if let Some(t) = self.top {
            self.flat.top[t].values += 1;
        }
        if self.flat.metadata.len() >= MAX_KEPT {
            self.dropped_values += 1;
            return Ok(());
        }
        let text = match value {
            Value::Int(i) => i.to_string(),
            Value::Float(f) => float_text(*f),
            Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            Value::Str(s) => s.to_string(),
            _ => return Ok(()),
        };
        self.charge_text(text.len())?;
        self.flat.metadata.insert(name, text);
        Ok(())
    }

    /// The summary entries for what did not fit in the lists.
    fn finish(&mut self) {
        if self.dropped_values > 0 {
            self.flat.skipped.push(Skipped {
                name: String::new(),
                kind: format!(
                    "{} plain values beyond the first {MAX_KEPT} kept as metadata",
                    self.dropped_values
                ),
            });
        }
        if self.dropped_skipped > 0 {
            self.flat.skipped.push(Skipped {
                name: String::new(),
                kind: format!(
                    "{} more skipped objects beyond the first {MAX_KEPT}",
                    self.dropped_skipped
                ),
            });
        }
    }

    fn walk(&mut self, id: Id, name: String, depth: usize) -> Result<()> {
        self.visits += 1;
        if self.visits > MAX_VISITS {
            return Err(self.bad(format!(
                "the object graph expands to more than {MAX_VISITS} values (shared or cyclic \
                 references?)"
            )));
        }
        if depth > MAX_DEPTH {
            return Err(self.bad(format!(
                "`{}…` is nested deeper than {MAX_DEPTH} levels",
                name.chars().take(80).collect::<String>()
            )));
        }
        self.charge_text(name.len())?;
        if let Some(entries) = entries_of(self.p, id) {
            for &(k, v) in entries {
                match key_text(self.p, k) {
                    Some(key) => self.walk(v, child(&name, &key), depth + 1)?,
                    None => {
                        let kind = format!("entry with a {} key", self.p.get(k).type_name());
                        self.skip(child(&name, "?"), kind)?;
                    }
                }
            }
            return Ok(());
        }
        let value = self.p.get(id);
        match value {
            Value::List(items) | Value::Tuple(items) => self.walk_seq(items, &name, depth),
            Value::Call(c) => {
                if !c.items.is_empty() {
                    return self.walk_seq(&c.items, &name, depth);
                }
                match self.tensor_like(c, &name, 0)? {
                    Some(TensorLike::Tensor(t)) => {
                        if self.flat.tensors.len() >= MAX_TENSORS {
                            return Err(self.bad(format!("more than {MAX_TENSORS} tensors")));
                        }
                        if let Some(top) = self.top {
                            self.flat.top[top].tensors += 1;
                            self.flat.top[top].bytes += t.nbytes();
                        }
                        self.flat.tensors.push(t);
                        Ok(())
                    }
                    Some(TensorLike::Skip(kind)) => self.skip(name, kind),
                    None => {
                        let kind = call_kind(self.p, c);
                        self.skip(name, kind)
                    }
                }
            }
            Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Str(_) => {
                self.meta(name, value)
            }
            Value::None | Value::Dict(_) => Ok(()),
            Value::BigInt => self.skip(name, "int (beyond 64 bits)".into()),
            Value::Bytes(n) => self.skip(name, format!("bytes ({n})")),
            Value::Set => self.skip(name, "set".into()),
            Value::Global(g) => self.skip(name, format!("reference to {}", g.dotted())),
            Value::PersId(_) => self.skip(name, "storage".into()),
        }
    }

    fn walk_seq(&mut self, items: &[Id], name: &str, depth: usize) -> Result<()> {
        let long = items.len() > LONG_SEQUENCE;
        let mut dropped = 0usize;
        for (i, &v) in items.iter().enumerate() {
            if long
                && matches!(
                    self.p.get(v),
                    Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Str(_) | Value::None
                )
            {
                dropped += 1;
                continue;
            }
            self.walk(v, child(name, &i.to_string()), depth + 1)?;
        }
        if dropped > 0 {
            self.skip(
                name.to_string(),
                format!("{dropped} plain values of a {}-item sequence", items.len()),
            )?;
        }
        Ok(())
    }

    /// Interprets `c` as one of torch's tensor rebuild calls: a tensor, a tensor that is
    /// skipped (with why), or `None` when it is no tensor at all.
    fn tensor_like(&mut self, c: &Call, name: &str, depth: usize) -> Result<Option<TensorLike>> {
        let Some(g) = self.p.global(c.func) else {
            return Ok(None);
        };
        if !is_tensor_func(g) {
            return Ok(None);
        }
        let malformed = |w: &Self, what: &str| {
            Error::tensor(
                w.path,
                name,
                format!("malformed {} call in data.pkl: {what}", g.dotted()),
            )
        };
        let args = self
            .p
            .seq(c.args)
            .ok_or_else(|| malformed(self, "arguments are not a tuple"))?;
        let fname = &*g.name;
        match (&*g.module, fname) {
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
                let (min, dtype_arg, meta_arg) = match fname {
                    "_rebuild_tensor" => (4, None, None),
                    "_rebuild_tensor_v2" => (6, None, Some(6)),
                    _ => (7, Some(6), Some(7)),
                };
                if args.len() < min {
                    return Err(malformed(self, &format!("{} arguments", args.len())));
                }
                if let Some(&m) = meta_arg.and_then(|i| args.get(i)) {
                    if has_true_flag(self.p, m) {
                        return Err(Error::tensor(
                            self.path,
                            name,
                            "has torch's lazy conjugate/negative bit set; save it after \
                             .resolve_conj().resolve_neg()",
                        ));
                    }
                }
                let storage = match self.p.get(args[0]) {
                    Value::PersId(pid) => *pid,
                    _ => return Err(malformed(self, "the storage is not a persistent id")),
                };
                let explicit = match dtype_arg {
                    Some(i) => match self.p.global(args[i]) {
                        Some(d) if &*d.module == "torch" => match torch_dtype(&d.name) {
                            Some(dt) => Some(dt),
                            None => {
                                return Ok(Some(TensorLike::Skip(format!(
                                    "tensor of dtype torch.{}",
                                    d.name
                                ))))
                            }
                        },
                        _ => return Err(malformed(self, "the dtype is not a torch dtype")),
                    },
                    None => None,
                };
                self.rebuild(storage, args[1], args[2], args[3], explicit, name)
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let &data = args
                    .first()
                    .ok_or_else(|| malformed(self, "no arguments"))?;
                self.nested(data, name, depth)
            }
            ("torch._tensor", "_rebuild_from_type_v2" | "_rebuild_from_type") => {
                if args.len() < 3 {
                    return Err(malformed(self, &format!("{} arguments", args.len())));
                }
                if depth >= 4 {
                    return Err(malformed(self, "nested too deeply"));
                }
                let inner = Call {
                    func: args[0],
                    args: args[2],
                    state: None,
                    items: Vec::new(),
                    entries: Vec::new(),
                };
                Ok(Some(
                    self.tensor_like(&inner, name, depth + 1)?
                        .unwrap_or_else(|| TensorLike::Skip(g.dotted())),
                ))
            }
            _ => {
                let what = match fname {
                    "_rebuild_qtensor" => "quantized tensor".to_string(),
                    "_rebuild_sparse_tensor" | "_rebuild_sparse_csr_tensor" => {
                        "sparse tensor".to_string()
                    }
                    "_rebuild_meta_tensor_no_storage" => {
                        "tensor on the meta device (no data)".into()
                    }
                    "_rebuild_nested_tensor" => "nested tensor".into(),
                    _ => format!("tensor ({})", g.dotted()),
                };
                Ok(Some(TensorLike::Skip(what)))
            }
        }
    }

    /// The tensor `data` of a `_rebuild_parameter` call.
    fn nested(&mut self, data: Id, name: &str, depth: usize) -> Result<Option<TensorLike>> {
        if depth >= 4 {
            return Err(Error::tensor(
                self.path,
                name,
                "malformed data.pkl: parameter rebuild calls nested too deeply",
            ));
        }
        match self.p.get(data) {
            Value::Call(inner) => {
                let inner = inner.clone();
                Ok(Some(
                    self.tensor_like(&inner, name, depth + 1)?
                        .unwrap_or_else(|| TensorLike::Skip("parameter of a non-tensor".into())),
                ))
            }
            _ => Err(Error::tensor(
                self.path,
                name,
                "malformed data.pkl: a parameter whose data is not a tensor",
            )),
        }
    }

    /// A tensor viewing storage `pid` from `offset` with `size` and `stride`, checked against
    /// the storage's record.
    fn rebuild(
        &mut self,
        pid: Id,
        offset: Id,
        size: Id,
        stride: Id,
        explicit: Option<DType>,
        name: &str,
    ) -> Result<Option<TensorLike>> {
        let terr = |w: &Self, what: String| Error::tensor(w.path, name, what);
        // ('storage', storage_type, key, location, numel)
        let pid_items = self
            .p
            .seq(pid)
            .filter(|t| t.len() == 5 && self.p.str(t[0]) == Some("storage"))
            .ok_or_else(|| {
                terr(
                    self,
                    "malformed data.pkl: a persistent id that is not ('storage', type, key, \
                     location, numel)"
                        .into(),
                )
            })?
            .to_vec();
        let storage_type = self.p.global(pid_items[1]).ok_or_else(|| {
            terr(
                self,
                "malformed data.pkl: storage type is not a global".into(),
            )
        })?;
        let storage_dtype = match (&*storage_type.module, &*storage_type.name) {
            ("torch" | "torch.storage", "UntypedStorage") => DType::U8,
            ("torch" | "torch.cuda", n) => match DType::from_torch_storage(n) {
                Some(d) => d,
                None => return Ok(Some(TensorLike::Skip(format!("tensor of torch.{n}")))),
            },
            _ => {
                return Err(terr(
                    self,
                    format!("unknown storage type {} in data.pkl", storage_type.dotted()),
                ))
            }
        };
        let dtype = explicit.unwrap_or(storage_dtype);
        let key = match self.p.get(pid_items[2]) {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => {
                return Err(terr(
                    self,
                    "malformed data.pkl: storage key is not a string".into(),
                ))
            }
        };
        let numel = self
            .p
            .int(pid_items[4])
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                terr(
                    self,
                    "malformed data.pkl: storage size is not a count".into(),
                )
            })?;
        let nbytes = numel
            .checked_mul(storage_dtype.size() as u64)
            .ok_or_else(|| terr(self, format!("storage size {numel} overflows")))?;
        let storage = match self.storage_index.get(&key) {
            Some(&i) => {
                if self.flat.storages[i].nbytes != nbytes {
                    return Err(terr(
                        self,
                        format!(
                            "storage `{key}` is referenced with two sizes ({} and {nbytes} bytes)",
                            self.flat.storages[i].nbytes
                        ),
                    ));
                }
                i
            }
            None => {
                let (entry, data_offset, record_len) = (self.records)(&key)?;
                if record_len < nbytes {
                    return Err(terr(
                        self,
                        format!(
                            "storage `{key}` needs {nbytes} bytes but its record holds {record_len} \
                             (truncated or damaged file?)"
                        ),
                    ));
                }
                self.flat.storages.push(Storage {
                    key: key.clone(),
                    nbytes,
                    entry,
                    data_offset,
                    record_len,
                });
                self.storage_index
                    .insert(key.clone(), self.flat.storages.len() - 1);
                self.flat.storages.len() - 1
            }
        };
        let storage_offset = self
            .p
            .int(offset)
            .and_then(|o| u64::try_from(o).ok())
            .ok_or_else(|| {
                terr(
                    self,
                    "malformed data.pkl: storage offset is not a count".into(),
                )
            })?;
        let shape = usize_seq(self.p, size).ok_or_else(|| {
            terr(
                self,
                "malformed data.pkl: size is not a tuple of counts".into(),
            )
        })?;
        let stride = usize_seq(self.p, stride).ok_or_else(|| {
            terr(
                self,
                "malformed data.pkl: stride is not a tuple of counts".into(),
            )
        })?;
        if shape.len() != stride.len() {
            return Err(terr(
                self,
                format!(
                    "malformed data.pkl: size {shape:?} and stride {stride:?} differ in length"
                ),
            ));
        }
        let elem = dtype.size() as u64;
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .filter(|n| n.checked_mul(elem).is_some())
            .ok_or_else(|| terr(self, format!("shape {shape:?} overflows")))?;
        if numel > 0 {
            let capacity = nbytes / elem;
            let last = shape
                .iter()
                .zip(&stride)
                .try_fold(storage_offset, |a, (&d, &s)| {
                    (d as u64 - 1)
                        .checked_mul(s as u64)
                        .and_then(|x| a.checked_add(x))
                });
            if last.map_or(true, |v| v >= capacity) {
                return Err(terr(
                    self,
                    format!(
                        "{dtype} {shape:?} with strides {stride:?} at offset {storage_offset} \
                         runs past its storage `{key}` of {nbytes} bytes"
                    ),
                ));
            }
        }
        self.charge_text(name.len())?;
        Ok(Some(TensorLike::Tensor(TorchTensor {
            name: name.to_string(),
            dtype,
            shape,
            stride,
            storage_offset,
            storage,
        })))
    }
}

fn is_tensor_func(g: &pickle::Global) -> bool {
    (&*g.module == "torch._utils" && g.name.starts_with("_rebuild_"))
        || g.is("torch._tensor", "_rebuild_from_type_v2")
        || g.is("torch._tensor", "_rebuild_from_type")
}

/// The dtype of a `torch.<name>` dtype global.
fn torch_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "uint16" => DType::U16,
        "uint32" => DType::U32,
        "uint64" => DType::U64,
        "bool" => DType::Bool,
        "float8_e4m3fn" => DType::F8E4M3,
        "float8_e5m2" => DType::F8E5M2,
        _ => return None,
    })
}

/// A checkpoint whose "tensors" are the given storage records of `archive`, as bytes: the
/// sources of the record exchange of `swap` inside an archive.
pub fn records_checkpoint(path: &Path, archive: &Archive, records: &[usize]) -> Result<Checkpoint> {
    let df = DataFile::open(path)?;
    let tensors = records
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let s = &archive.storages[r];
            TensorInfo {
                // Unique even when a record is listed twice.
                name: format!("{}data/{} #{i}", archive.prefix, s.key),
                dtype: DType::U8,
                shape: vec![s.record_len as usize],
                file: 0,
                offset: s.data_offset,
                len: s.record_len,
            }
        })
        .collect();
    Checkpoint::new(
        path.to_path_buf(),
        Format::Torch,
        vec![df],
        tensors,
        BTreeMap::new(),
        Vec::new(),
    )
}

/// Parses a whole archive held in memory; the entry point of the fuzz target `torch_zip`.
pub fn parse_archive_bytes(bytes: &[u8]) -> Result<Archive> {
    Archive::read(&Source::Bytes(bytes), Path::new("<memory>"))
}

/// Runs a bare pickle through the machine and the flattening, every storage record taken to
/// exist; the entry point of the fuzz target `pickle`. Returns the tensors.
pub fn flatten_pickle_bytes(bytes: &[u8]) -> Result<Vec<TorchTensor>> {
    let path = Path::new("<memory>");
    let p = Pickle::parse(bytes, &pickle::LIMITS)
        .map_err(|e| Error::format(path, format!("data.pkl: {e}")))?;
    let records = |_: &str| -> Result<(usize, u64, u64)> { Ok((0, 0, 1 << 40)) };
    Ok(flatten(&p, path, records)?.tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(is_contiguous(&[0, 3], &[7, 7]));
        assert!(!is_contiguous(&[4], &[0]));
    }

    #[test]
    fn torch_names() {
        assert!(is_torch_name(Path::new("w/epoch_12.pth")));
        assert!(is_torch_name(Path::new("checkpoint-4.pth.tar")));
        assert!(is_torch_name(Path::new("last.ckpt")));
        assert!(!is_torch_name(Path::new("model.safetensors")));
    }

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
        let found = include_bytes!("../../fuzz/regressions/pickle-fanout-strings.pkl");
        assert!(flatten_pickle_bytes(found).is_err());
        assert!(t.elapsed().as_secs() < 2);
    }
}
