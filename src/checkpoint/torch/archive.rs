//! The zip archive of a PyTorch checkpoint: its directory checked, `data.pkl` found and run
//! through the restricted pickle machine, the object graph flattened (`flatten`), and every
//! storage located in its stored `data/<key>` record.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::flatten::{flatten, Records};
use super::views::TorchTensor;
use super::MAX_PICKLE;
use crate::checkpoint::Skipped;
use crate::codec::pickle::{self, Pickle};
use crate::codec::zip::{self, Source};
use crate::error::{Error, Result};

/// Prefix of the zip comment in which `ema-tool swap` records which side holds the EMA.
pub const COMMENT_PREFIX: &str = "ema_tool:";

/// One storage record (`<prefix>data/<key>`).
#[derive(Clone, Debug)]
pub struct Storage {
    /// Bytes the pickle says the storage holds.
    pub nbytes: u64,
    /// The record's entry of the zip directory (name, CRC, where its headers are).
    pub entry: zip::Entry,
    /// Absolute offset of the record's data.
    pub data_offset: u64,
    /// Length of the record's data (at least `nbytes`).
    pub record_len: u64,
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

/// A parsed PyTorch archive: its storages, tensors and the rest.
#[derive(Clone, Debug)]
pub struct Archive {
    /// Offset of the zip's (32-bit) end-of-central-directory record.
    pub eocd_offset: u64,
    pub storages: Vec<Storage>,
    pub(crate) tensors: Vec<TorchTensor>,
    pub metadata: BTreeMap<String, String>,
    pub skipped: Vec<Skipped>,
    /// Top-level entries, when the root is a dict.
    pub top: Vec<TopEntry>,
}

impl Archive {
    /// What a pickle's flattening found, outside a zip archive.
    pub(super) fn from_flat(flat: super::flatten::Flat) -> Archive {
        Archive {
            eocd_offset: 0,
            storages: flat.storages,
            tensors: flat.tensors,
            metadata: flat.metadata,
            skipped: flat.skipped,
            top: flat.top,
        }
    }

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
        let records = |key: &str| -> Result<(zip::Entry, u64, u64)> {
            let name = format!("{prefix}data/{key}");
            let &i = by_name.get(name.as_str()).ok_or_else(|| {
                fmt(format!(
                    "storage `{key}` has no record {name} in the archive (truncated or \
                     damaged file?)"
                ))
            })?;
            let (off, len) = zip::data_range(&headers, &dir, &dir.entries[i]).map_err(fmt)?;
            Ok((dir.entries[i].clone(), off, len))
        };
        let flat = flatten(&pickle, path, Records(records, path))?;
        drop(by_name);
        let mut metadata = flat.metadata;
        if let Some(rec) = std::str::from_utf8(&dir.comment)
            .ok()
            .and_then(|c| c.strip_prefix(COMMENT_PREFIX))
        {
            metadata.insert("ema_tool".into(), rec.to_string());
        }
        Ok(Archive {
            eocd_offset: dir.eocd_offset,
            storages: flat.storages,
            tensors: flat.tensors,
            metadata,
            skipped: flat.skipped,
            top: flat.top,
        })
    }
}
