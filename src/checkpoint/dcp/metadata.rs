//! `.metadata`, the pickle that describes a DCP checkpoint: the entries of
//! `state_dict_metadata` (each tensor's global shape, dtype and chunks, the non-tensor
//! entries), where `storage_data` puts each of them, and `planner_data`. Run through the
//! restricted pickle machine: only DCP's own classes are understood, by name, and nothing is
//! imported or called.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{PathKey, PlannerData};
use crate::codec::pickle::{self, Id, Pickle, Value};
use crate::codec::DType;
use crate::error::{Error, Result};

/// Largest `.metadata` read (it is read whole).
const MAX_METADATA: u64 = 256 << 20;
/// Most chunks holding elements of one tensor (a rank's part each; torch writes one per rank
/// and tensor-parallel shard).
const MAX_CHUNKS: usize = 1 << 16;
/// The module of DCP's metadata classes.
const METADATA: &str = "torch.distributed.checkpoint.metadata";

/// A key of `storage_data`: the FQN, and the chunk's offsets (none for a non-tensor entry).
type IndexKey = (String, Option<Vec<u64>>);

/// One chunk of a tensor: its box in the global tensor, and where its bytes are.
pub(super) struct Chunk {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    /// `(relative path, offset, length)` of its `torch.save` zip (or of its tensor in the
    /// safetensors data that starts there).
    pub at: (String, u64, u64),
}

/// One entry of `state_dict_metadata`.
pub(super) enum Entry {
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

/// Reads and parses `meta_path`: its entries, in order, and its `planner_data`.
pub(super) fn read(meta_path: &Path) -> Result<(Vec<Entry>, PlannerData)> {
    let (file, m) = crate::checkpoint::open_regular(meta_path)?;
    if m.len() > MAX_METADATA {
        return Err(Error::format(
            meta_path,
            format!(
                "{} bytes exceeds the {MAX_METADATA}-byte limit of a .metadata",
                m.len()
            ),
        ));
    }
    let mut bytes = vec![0u8; m.len() as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| Error::io(meta_path, e))?;
    let p = Pickle::parse(&bytes, &pickle::LIMITS)
        .map_err(|e| Error::format(meta_path, format!("malformed pickle: {e}")))?;
    let entries = parse(&p).map_err(|e| Error::format(meta_path, e))?;
    Ok((entries, planner_data(&p)))
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
fn planner_data(p: &Pickle) -> PlannerData {
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
