//! PyTorch's legacy serialization (`torch.save` before 1.6, or with
//! `_use_new_zipfile_serialization=False`), and plain pickles whose tensors carry their storages
//! as bytes (`pickle.dump` of tensors, EDM2's snapshots).
//!
//! A legacy file is five pickles, then the storages: the magic number, the protocol version
//! (1001), the system's byte order and type sizes, the object (its storages as persistent ids
//! `('storage', type, key, location, numel, view)`), and the list of storage keys; then every
//! storage in that order, as its element count (8 bytes, little-endian) and its bytes. A storage
//! pickled on its own (`TypedStorage.__reduce__` calls `torch.save` with the legacy format) is
//! such a file, embedded as bytes in the pickle that holds it, and read where it lies.
//!
//! Every pickle is read with `pickle::scan`, which steps over byte payloads without reading
//! them, so opening reads the opcodes and the storages' 8-byte counts only.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use super::flatten::{Embedded, Storages};
use super::MAX_PICKLE;
use crate::checkpoint::read_up_to;
use crate::codec::pickle::{self, Global, Pickle, Value};
use crate::codec::{zip, DType};
use crate::error::{Error, Result};

/// The legacy format's protocol version (torch's `PROTOCOL_VERSION`).
const PROTOCOL_VERSION: i64 = 1001;

/// Most storages of one legacy file.
const MAX_STORAGES: usize = 1 << 20;

/// A legacy file read: its object and where each storage's bytes are.
pub(super) struct LegacyFile {
    pub pickle: Pickle,
    /// Storage key: (offset of its data, bytes).
    pub storages: HashMap<String, (u64, u64)>,
}

/// Reads the pickle at `pos` of `file` (which ends at `end`), returning it and where it ends.
pub(super) fn pickle_at(
    file: &File,
    pos: u64,
    end: u64,
    path: &Path,
    what: &str,
) -> Result<(Pickle, u64)> {
    let bad = |e: pickle::PickleError| Error::format(path, format!("{what}: {e}"));
    let s = pickle::scan(file, pos, end, MAX_PICKLE as usize).map_err(bad)?;
    let p = Pickle::parse_scanned(&s, &pickle::LIMITS).map_err(bad)?;
    Ok((p, pos + s.len))
}

/// The bytes one element of a storage of type `g` takes, or `None` for a storage type that is
/// not a plain array of numbers.
fn element_size(g: &Global) -> Option<usize> {
    match (&*g.module, &*g.name) {
        ("torch" | "torch.storage", "UntypedStorage") => Some(1),
        ("torch" | "torch.cuda", n) => DType::from_torch_storage(n).map(DType::size),
        _ => None,
    }
}

/// The storage key of a persistent id `('storage', type, key, ...)` of `p`, and its type.
fn storage_id(p: &Pickle, pid: pickle::Id) -> Option<(String, &Global)> {
    let t = p.seq(pid)?;
    if t.len() < 5 || p.str(t[0]) != Some("storage") {
        return None;
    }
    let key = match p.get(t[2]) {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        _ => return None,
    };
    Some((key, p.global(t[1])?))
}

/// Reads the legacy file that lies in `[start, end)` of `file`.
pub(super) fn read(file: &File, start: u64, end: u64, path: &Path) -> Result<LegacyFile> {
    let fmt = |what: String| Error::format(path, what);
    let (magic, pos) = pickle_at(file, start, end, path, "legacy header")?;
    if !matches!(magic.get(magic.root), Value::Int(_) | Value::BigInt) {
        return Err(fmt("not a legacy PyTorch file (no magic number)".into()));
    }
    let (proto, pos) = pickle_at(file, pos, end, path, "legacy header")?;
    if proto.int(proto.root) != Some(PROTOCOL_VERSION) {
        return Err(fmt(format!(
            "legacy PyTorch file of an unknown protocol version (expected {PROTOCOL_VERSION})"
        )));
    }
    let (info, pos) = pickle_at(file, pos, end, path, "legacy header")?;
    let little = match info.get(info.root) {
        Value::Dict(e) => e
            .iter()
            .find(|&&(k, _)| info.str(k) == Some("little_endian"))
            .map(|&(_, v)| info.get(v) == &Value::Bool(true)),
        _ => None,
    };
    if little != Some(true) {
        return Err(fmt(
            "a legacy PyTorch file written on a big-endian machine is not supported".into(),
        ));
    }
    let (object, pos) = pickle_at(file, pos, end, path, "legacy pickle")?;
    let (keys, mut pos) = pickle_at(file, pos, end, path, "legacy storage keys")?;
    let keys: Vec<String> = keys
        .seq(keys.root)
        .ok_or_else(|| fmt("legacy storage keys are not a list".into()))?
        .iter()
        .map(|&k| match keys.get(k) {
            Value::Str(s) => Ok(s.to_string()),
            Value::Int(i) => Ok(i.to_string()),
            _ => Err(fmt("a legacy storage key is not a string".into())),
        })
        .collect::<Result<_>>()?;
    if keys.len() > MAX_STORAGES {
        return Err(fmt(format!("more than {MAX_STORAGES} storages")));
    }
    // The element size of each storage, from the persistent ids that name it.
    let mut sizes: HashMap<String, usize> = HashMap::new();
    for v in &object.values {
        if let Value::PersId(pid) = v {
            if let Some((key, g)) = storage_id(&object, *pid) {
                let size = element_size(g).ok_or_else(|| {
                    fmt(format!(
                        "unknown storage type {} in a legacy file",
                        g.dotted()
                    ))
                })?;
                sizes.insert(key, size);
            }
        }
    }
    let mut storages = HashMap::with_capacity(keys.len());
    for key in keys {
        let size = *sizes
            .get(&key)
            .ok_or_else(|| fmt(format!("storage `{key}` is listed but no tensor names it")))?;
        let mut count = [0u8; 8];
        let n = read_up_to(file, pos, &mut count).map_err(|e| Error::io(path, e))?;
        if n < 8 || pos + 8 > end {
            return Err(fmt(format!(
                "storage `{key}` is cut short (truncated file?)"
            )));
        }
        let numel = u64::try_from(i64::from_le_bytes(count))
            .map_err(|_| fmt(format!("storage `{key}` has a negative size")))?;
        let nbytes = numel
            .checked_mul(size as u64)
            .ok_or_else(|| fmt(format!("storage `{key}` of {numel} elements overflows")))?;
        let data = pos + 8;
        if nbytes > end - data {
            return Err(fmt(format!(
                "storage `{key}` needs {nbytes} bytes, the file holds {} after it (truncated?)",
                end - data
            )));
        }
        if storages.insert(key.clone(), (data, nbytes)).is_some() {
            return Err(fmt(format!("storage `{key}` is listed twice")));
        }
        pos = data + nbytes;
    }
    Ok(LegacyFile {
        pickle: object,
        storages,
    })
}

/// The storages of a legacy file or a plain pickle: the file's own, by key, and those embedded
/// as bytes, read where they are when a tensor names them.
pub(super) struct FileStorages<'a> {
    pub file: &'a File,
    pub size: u64,
    pub path: &'a Path,
    pub keyed: HashMap<String, (u64, u64)>,
}

impl Storages for FileStorages<'_> {
    const IN_ZIP: bool = false;

    fn record(&mut self, key: &str) -> Result<(zip::Entry, u64, u64)> {
        match self.keyed.get(key) {
            Some(&(offset, len)) => Ok((zip::Entry::default(), offset, len)),
            None => Err(Error::format(
                self.path,
                format!("storage `{key}` is not in the file (truncated or damaged?)"),
            )),
        }
    }

    fn embedded(&mut self, at: u64, len: u64) -> Result<Embedded> {
        let key = format!("@{at}");
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::format(self.path, "an embedded storage runs past the file"))?;
        let sub = read(self.file, at, end, self.path)?;
        let p = &sub.pickle;
        let fmt = |what: &str| Error::format(self.path, format!("embedded storage: {what}"));
        let Value::PersId(pid) = p.get(p.root) else {
            return Err(fmt("its pickle is not a storage"));
        };
        let (inner, g) = storage_id(p, *pid).ok_or_else(|| fmt("malformed storage id"))?;
        let numel = p
            .seq(*pid)
            .and_then(|t| p.int(t[4]))
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| fmt("malformed storage size"))?;
        let &(data, nbytes) = sub
            .storages
            .get(&inner)
            .ok_or_else(|| fmt("its bytes are missing"))?;
        self.keyed.insert(key.clone(), (data, nbytes));
        Ok(Embedded {
            key,
            storage_type: g.clone(),
            numel,
        })
    }
}
