//! Flattening the object graph of a checkpoint's pickle into the namespace of
//! `docs/formats.md#names`: nested dicts joined with `.`, list items indexed
//! (`optimizer.state.0.exp_avg`), plain numbers, strings and bools kept as metadata, everything
//! else recorded as skipped with its kind. The graph is bounded before it is walked: its
//! expanded size ([`tree_size`]), depth, text and tensor count.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::archive::{Storage, TopEntry};
use super::rebuild::is_tensor_func;
use super::views::TorchTensor;
use super::{LONG_SEQUENCE, MAX_DEPTH, MAX_KEPT, MAX_TENSORS, MAX_TEXT, MAX_VISITS};
use crate::checkpoint::Skipped;
use crate::codec::pickle::{Call, Id, Pickle, Value};
use crate::codec::zip;
use crate::error::{Error, Result};

/// What flattening produced.
pub(super) struct Flat {
    pub storages: Vec<Storage>,
    pub tensors: Vec<TorchTensor>,
    pub metadata: BTreeMap<String, String>,
    pub skipped: Vec<Skipped>,
    pub top: Vec<TopEntry>,
}

/// Where the storages of a pickle's tensors are.
pub(super) trait Storages {
    /// The record of storage `key`: its zip entry (a default one outside zip archives), the
    /// offset of its data and how many bytes are there.
    fn record(&mut self, key: &str) -> Result<(zip::Entry, u64, u64)>;

    /// A storage embedded as the bytes `[at, at + len)` of the file
    /// (`torch.storage._load_from_bytes`, a legacy-format file of the storage); its record is
    /// then [`Storages::record`] of the key returned.
    fn embedded(&mut self, at: u64, len: u64) -> Result<Embedded>;

    /// Whether the pickle is the `data.pkl` record of a zip archive, which messages name; the
    /// pickle of a legacy file or of `pickle.dump` is the file itself.
    const IN_ZIP: bool;
}

/// [`Storages`] of a zip archive: `F` finds the `data/<key>` records; no storage is embedded
/// as bytes there.
pub(super) struct Records<'a, F>(pub F, pub &'a Path);

impl<F: FnMut(&str) -> Result<(zip::Entry, u64, u64)>> Storages for Records<'_, F> {
    const IN_ZIP: bool = true;

    fn record(&mut self, key: &str) -> Result<(zip::Entry, u64, u64)> {
        (self.0)(key)
    }

    fn embedded(&mut self, _: u64, _: u64) -> Result<Embedded> {
        Err(Error::Format {
            path: self.1.to_path_buf(),
            what: "data.pkl embeds a storage as bytes (torch.storage._load_from_bytes), which \
                   torch.save never writes into a zip archive"
                .into(),
        })
    }
}

/// A storage embedded as bytes: the key to find its record by, its type and its elements.
pub(super) struct Embedded {
    pub key: String,
    pub storage_type: crate::codec::pickle::Global,
    pub numel: u64,
}

pub(super) struct Walker<'p, F> {
    pub p: &'p Pickle,
    pub path: &'p Path,
    /// Finds the records of storages.
    pub records: F,
    pub flat: Flat,
    pub storage_index: HashMap<String, usize>,
    visits: usize,
    text: usize,
    /// The top-level entry being walked.
    top: Option<usize>,
    /// Plain values and skipped objects beyond [`MAX_KEPT`].
    dropped_values: usize,
    dropped_skipped: usize,
}

/// What a value turned out to be, when it is tensor-like.
pub(super) enum TensorLike {
    Tensor(TorchTensor),
    Skip(String),
}

/// Flattens the object graph of `p`; `records` locates storage records.
pub(super) fn flatten<F: Storages>(p: &Pickle, path: &Path, records: F) -> Result<Flat> {
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
pub(super) fn entries_of(p: &Pickle, id: Id) -> Option<&[(Id, Id)]> {
    match p.get(id) {
        Value::Dict(e) => Some(e),
        Value::Call(c) if !c.entries.is_empty() || is_dict_class(p, c) => Some(&c.entries),
        _ => None,
    }
}

pub(super) fn is_dict_class(p: &Pickle, c: &Call) -> bool {
    p.global(c.func).is_some_and(|g| {
        g.is("collections", "OrderedDict")
            || g.is("collections", "defaultdict")
            || g.is("builtins", "dict")
            || g.is("__builtin__", "dict")
    })
}

/// The text of a dict key, when it is a plain value.
pub(super) fn key_text(p: &Pickle, k: Id) -> Option<String> {
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
pub(super) fn kind_of(p: &Pickle, id: Id) -> String {
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
pub(super) fn call_kind(p: &Pickle, c: &Call) -> String {
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

/// The state of a pickled `nn.Module` that `c` rebuilds: its `__dict__` (given to `BUILD`,
/// or, for EDM2's `torch_utils.persistence` classes, the `state` of the metadata given to
/// `_reconstruct_persistent_obj`), when it holds `_parameters` or `_modules`.
pub(super) fn module_state(p: &Pickle, c: &Call) -> Option<Id> {
    let is_module_dict = |s: Id| {
        entries_of(p, s).is_some_and(|e| {
            e.iter()
                .any(|&(k, _)| matches!(p.str(k), Some("_parameters" | "_modules")))
        })
    };
    let persistent = p.global(c.func).is_some_and(|g| {
        &*g.name == "_reconstruct_persistent_obj" && g.module.ends_with("persistence")
    });
    let state = if persistent {
        let meta = *p.seq(c.args)?.first()?;
        entries_of(p, meta)?
            .iter()
            .find(|&&(k, _)| p.str(k) == Some("state"))
            .map(|&(_, v)| v)?
    } else {
        let s = c.state?;
        // With __slots__, the state is (dict, slots).
        match p.get(s) {
            Value::Tuple(t) if !t.is_empty() => t[0],
            _ => s,
        }
    };
    is_module_dict(state).then_some(state)
}

/// The strings of a set (`{"a", "b"}` as pickled: `EMPTY_SET`+`ADDITEMS`, or `builtins.set`
/// called on a list).
fn set_strings(p: &Pickle, id: Id) -> Vec<String> {
    let items: &[Id] = match p.get(id) {
        Value::Set(items) => items,
        Value::Call(c)
            if p.global(c.func).is_some_and(|g| {
                g.is("builtins", "set")
                    || g.is("__builtin__", "set")
                    || g.is("builtins", "frozenset")
            }) =>
        {
            match p
                .seq(c.args)
                .and_then(|a| a.first())
                .and_then(|&l| p.seq(l))
            {
                Some(items) => items,
                None => &[],
            }
        }
        _ => &[],
    };
    items
        .iter()
        .filter_map(|&i| p.str(i).map(str::to_string))
        .collect()
}

/// Whether `id` is a dict with a `True` value (torch's `{"conj": True}` / `{"neg": True}`).
pub(super) fn has_true_flag(p: &Pickle, id: Id) -> bool {
    entries_of(p, id).is_some_and(|e| e.iter().any(|&(_, v)| p.get(v) == &Value::Bool(true)))
}

/// A tuple (or list, or `torch.Size`) of non-negative integers.
pub(super) fn usize_seq(p: &Pickle, id: Id) -> Option<Vec<usize>> {
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

impl<'p, F: Storages> Walker<'p, F> {
    pub(super) fn bad(&self, what: String) -> Error {
        if F::IN_ZIP {
            Error::format(self.path, format!("data.pkl: {what}"))
        } else {
            Error::format(self.path, what)
        }
    }

    /// `malformed data.pkl`, or `malformed pickle` outside a zip archive: how the messages
    /// about a pickle's broken structure start.
    pub(super) const MALFORMED: &'static str = if F::IN_ZIP {
        "malformed data.pkl"
    } else {
        "malformed pickle"
    };

    /// ` in data.pkl`, or nothing outside a zip archive (the file is the pickle).
    pub(super) const IN_PICKLE: &'static str = if F::IN_ZIP { " in data.pkl" } else { "" };

    pub(super) fn charge_text(&mut self, n: usize) -> Result<()> {
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
                        if let Some(state) = module_state(self.p, c) {
                            return self.walk_module(state, &name, depth);
                        }
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
            Value::Bytes { len, .. } => self.skip(name, format!("bytes ({len})")),
            Value::Set(_) => self.skip(name, "set".into()),
            Value::Global(g) => self.skip(name, format!("reference to {}", g.dotted())),
            Value::PersId(_) => self.skip(name, "storage".into()),
        }
    }

    /// Walks the state of a pickled `nn.Module`, giving the names `module.state_dict()` would:
    /// its parameters, its persistent buffers, then its submodules', in their order. Nothing
    /// else of the object (hooks, flags, plain tensor attributes) is a tensor of the
    /// checkpoint.
    fn walk_module(&mut self, state: Id, name: &str, depth: usize) -> Result<()> {
        let p = self.p;
        let field = |key: &str| -> Option<Id> {
            entries_of(p, state)?
                .iter()
                .find(|&&(k, _)| p.str(k) == Some(key))
                .map(|&(_, v)| v)
        };
        let non_persistent: Vec<String> = field("_non_persistent_buffers_set")
            .map(|s| set_strings(p, s))
            .unwrap_or_default();
        for (group, skip) in [("_parameters", false), ("_buffers", true)] {
            let Some(entries) = field(group).and_then(|g| entries_of(p, g)) else {
                continue;
            };
            for &(k, v) in entries {
                let Some(key) = key_text(p, k) else { continue };
                if p.get(v) == &Value::None || (skip && non_persistent.contains(&key)) {
                    continue;
                }
                self.walk(v, child(name, &key), depth + 1)?;
            }
        }
        if let Some(entries) = field("_modules").and_then(|m| entries_of(p, m)) {
            for &(k, v) in entries {
                let Some(key) = key_text(p, k) else { continue };
                if p.get(v) == &Value::None {
                    continue;
                }
                self.walk(v, child(name, &key), depth + 1)?;
            }
        }
        Ok(())
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
}
