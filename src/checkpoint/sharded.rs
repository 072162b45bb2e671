//! Sharded checkpoints: an HF-style index (`model.safetensors.index.json`,
//! `pytorch_model.bin.index.json`) whose `weight_map` names the shard file of every tensor.
//!
//! A directory holding such an index, or the index itself, opens as one checkpoint whose files
//! are the shards (safetensors or PyTorch zip files). The index must agree with the shards
//! exactly: every tensor it lists is in the shard it names, and every tensor of a shard is
//! listed there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::step::{self, SAFETENSORS_STEP_KEYS};
use super::{open_file, Checkpoint, Format, Found, Open};
use crate::error::{Error, Result};

/// Index file names looked for first in a directory, as Hugging Face writes them.
pub const INDEX_NAMES: [&str; 2] = [
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
];

/// Largest index file read.
pub const MAX_INDEX: u64 = 64 << 20;

/// The index file of the sharded checkpoint in directory `dir`.
pub fn find_index(dir: &Path) -> Result<PathBuf> {
    for n in INDEX_NAMES {
        let p = dir.join(n);
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.ends_with(".safetensors.index.json") || n.ends_with(".bin.index.json")
            })
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::format(
            dir,
            "is a directory without a sharded checkpoint index (*.safetensors.index.json or \
             *.bin.index.json)",
        )),
        n => Err(Error::format(
            dir,
            format!(
                "holds {n} sharded checkpoint indexes ({}); name the one to use",
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Opens the sharded checkpoint at `path` (a directory or an index file).
pub(crate) fn open(path: &Path, how: Open) -> Result<Checkpoint> {
    let index_path = if path.is_dir() {
        find_index(path)?
    } else {
        path.to_path_buf()
    };
    let dir = match index_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let bad = |what: String| Error::format(&index_path, what);
    // A regular file only (a FIFO would block), read through the same handle whose size is
    // checked, and never past the cap.
    let (file, meta) = super::open_regular(&index_path)?;
    let len = meta.len();
    if len > MAX_INDEX {
        return Err(bad(format!(
            "index of {len} bytes exceeds the {MAX_INDEX}-byte limit"
        )));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_INDEX), &mut text)
        .map_err(|e| Error::io(&index_path, e))?;
    let json: serde_json::Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid index JSON ({e})")))?;
    let weight_map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("index has no `weight_map` object".into()))?;
    if weight_map.is_empty() {
        return Err(bad("index lists no tensors".into()));
    }
    // Shards in order of first appearance, each with the tensors the index puts there.
    let mut shards: Vec<(String, Vec<&str>)> = Vec::new();
    let mut shard_of: HashMap<&str, usize> = HashMap::new();
    for (name, file) in weight_map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry `{name}` is not a file name")))?;
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(bad(format!(
                "weight_map entry `{name}` names `{file}`, not a file beside the index"
            )));
        }
        let i = *shard_of.entry(file).or_insert_with(|| {
            shards.push((file.to_string(), Vec::new()));
            shards.len() - 1
        });
        shards[i].1.push(name);
    }

    let mut files = Vec::new();
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut header_only = false;
    // The step keys of the shards' format: a sharded `.bin` finds its step as the same file
    // unsharded would.
    let mut step_keys: &[&str] = &SAFETENSORS_STEP_KEYS;
    for (k, (file, names)) in shards.iter().enumerate() {
        let shard_path = dir.join(file);
        let found = open_file(&shard_path, how)?;
        header_only |= found.header_only;
        if k == 0 {
            step_keys = found.step_keys;
        }
        // Each shard is a checkpoint of its own: a name given twice is its error.
        let c = Checkpoint::new(&shard_path, found.format, found)?;
        for n in names {
            if c.get(n).is_none() {
                return Err(Error::tensor(
                    &shard_path,
                    *n,
                    format!(
                        "is missing (the index {} puts it here)",
                        index_path.display()
                    ),
                ));
            }
        }
        for t in &c.tensors {
            if weight_map.get(&t.name).and_then(Value::as_str) != Some(file.as_str()) {
                return Err(Error::tensor(
                    &shard_path,
                    &t.name,
                    format!(
                        "is not listed for this shard in the index {}",
                        index_path.display()
                    ),
                ));
            }
        }
        let base = files.len();
        files.extend(c.files);
        tensors.extend(c.tensors.into_iter().map(|mut t| {
            t.file += base;
            // The views name the storages of a shard's archive, which is not kept.
            t.view = None;
            t
        }));
        for (k, v) in c.metadata {
            metadata.entry(k).or_insert(v);
        }
        skipped.extend(c.skipped);
    }
    if let Some(m) = json.get("metadata").and_then(Value::as_object) {
        for (k, v) in m {
            // The total size describes the shards, not the model; it is recomputed on output.
            if k == "total_size" {
                continue;
            }
            let v = match v {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            metadata.entry(k.clone()).or_insert(v);
        }
    }
    let mut ckpt = Checkpoint::new(
        path,
        Format::Sharded,
        Found {
            format: Format::Sharded,
            files,
            tensors,
            metadata,
            skipped,
            step_keys,
            torch: None,
            dcp: None,
            header_only,
        },
    )?;
    if ckpt.step.is_none() {
        // `checkpoint-1000/model.safetensors.index.json`: the directory carries the step.
        ckpt.step = step::from_file_name(&dir).map(|s| (s, step::StepSource::FileName));
    }
    Ok(ckpt)
}
