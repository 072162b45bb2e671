//! Sharded safetensors outputs, as Hugging Face writes them: `<stem>-0000k-of-0000n.safetensors`
//! beside `<stem>.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map"}`).
//!
//! Tensors are packed in order, a new shard starting when the next tensor would take the
//! current one past the limit (a tensor larger than the limit gets a shard of its own). Every
//! shard carries the output metadata. Shards are committed first and the index last, each
//! through its own temporary file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::atomic::{parent_dir, AtomicFile, Finished};
use super::safetensors::SafetensorsWriter;
use crate::codec::TensorSpec;
use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// Groups of tensor indices, one group per shard, none larger than `max` bytes unless it holds
/// a single tensor.
pub fn plan_shards(tensors: &[TensorSpec], max: u64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes();
        match groups.last_mut() {
            Some(g) if size.saturating_add(n) <= max => {
                g.push(i);
                size += n;
            }
            _ => {
                groups.push(vec![i]);
                size = n;
            }
        }
    }
    groups
}

/// The shard file names and the index path for `target` (`dir/<stem>.safetensors`).
pub fn shard_names(target: &Path, n: usize) -> Result<(Vec<String>, PathBuf)> {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = name.strip_suffix(".safetensors").ok_or_else(|| {
        Error::usage(format!(
            "{}: with --max-shard-size the output must be named <stem>.safetensors",
            target.display()
        ))
    })?;
    let names = (1..=n)
        .map(|k| format!("{stem}-{k:05}-of-{n:05}.safetensors"))
        .collect();
    Ok((names, parent_dir(target).join(format!("{name}.index.json"))))
}

/// A sharded output being written.
pub struct ShardedWriter {
    shards: Vec<SafetensorsWriter>,
    /// Output tensor → (shard, index within the shard).
    place: Vec<(usize, usize)>,
    index_path: PathBuf,
    index: Vec<u8>,
    force: bool,
}

impl ShardedWriter {
    /// Creates every shard (header written) for the grouping `groups` of `tensors`.
    pub fn create(
        target: &Path,
        force: bool,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
        groups: &[Vec<usize>],
        rt: &Runtime,
    ) -> Result<ShardedWriter> {
        let (names, index_path) = shard_names(target, groups.len())?;
        let dir = parent_dir(target);
        if !force {
            for p in names
                .iter()
                .map(|n| dir.join(n))
                .chain([index_path.clone()])
            {
                if p.exists() {
                    return Err(Error::Output {
                        path: p,
                        what: "already exists (use --force to replace it)".into(),
                    });
                }
            }
        }
        let mut place = vec![(0, 0); tensors.len()];
        let mut shards = Vec::with_capacity(groups.len());
        let mut weight_map = BTreeMap::new();
        for (s, (g, name)) in groups.iter().zip(&names).enumerate() {
            let subset: Vec<TensorSpec> = g.iter().map(|&i| tensors[i].clone()).collect();
            for (k, &i) in g.iter().enumerate() {
                place[i] = (s, k);
                weight_map.insert(tensors[i].name.clone(), name.clone());
            }
            shards.push(SafetensorsWriter::create(
                &dir.join(name),
                force,
                &subset,
                metadata,
                rt,
            )?);
        }
        let total: u64 = tensors.iter().map(TensorSpec::nbytes).sum();
        let mut index = serde_json::to_vec_pretty(&json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        }))
        .expect("a JSON value serializes");
        index.push(b'\n');
        Ok(ShardedWriter {
            shards,
            place,
            index_path,
            index,
            force,
        })
    }

    /// The index file's path.
    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// Completes and syncs every shard and the index, to be renamed by
    /// [`commit_all`](super::commit_all): the shards first, the index last, so that no shard
    /// is left behind without its index if a rename fails. Returns them with the bytes written.
    pub fn finish(self, rt: &Runtime) -> Result<(Vec<Finished>, u64)> {
        let mut done = Vec::with_capacity(self.shards.len() + 1);
        let mut total = 0;
        for s in self.shards {
            total += s.total_bytes();
            done.push(s.finish()?);
        }
        let index = AtomicFile::create(&self.index_path, self.force, rt)?;
        index.write_at(0, &self.index)?;
        done.push(index.finish()?);
        Ok((done, total + self.index.len() as u64))
    }

    /// Puts `bytes` at byte `off` of output tensor `tensor`'s data, in its shard.
    pub fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        let (s, k) = self.place[tensor];
        self.shards[s].write(k, off, bytes)
    }

    /// Several writes (`(tensor, off, bytes)`, sorted by tensor and offset), each shard's run
    /// written as one batch.
    pub fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        // Sorted by tensor, so by shard: each shard gets its run of the batch.
        let mut rest = writes;
        while let Some(&(first, ..)) = rest.first() {
            let s = self.place[first].0;
            let n = rest.iter().take_while(|w| self.place[w.0].0 == s).count();
            let local: Vec<(usize, u64, &[u8])> = rest[..n]
                .iter()
                .map(|&(t, off, b)| (self.place[t].1, off, b))
                .collect();
            self.shards[s].write_batch(&local)?;
            rest = &rest[n..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::DType;

    fn t(n: usize) -> TensorSpec {
        TensorSpec {
            name: format!("t{n}"),
            dtype: DType::U8,
            shape: vec![n],
        }
    }

    #[test]
    fn packing() {
        let ts = [t(4), t(4), t(3), t(10), t(1)];
        assert_eq!(
            plan_shards(&ts, 8),
            vec![vec![0, 1], vec![2], vec![3], vec![4]]
        );
        assert_eq!(plan_shards(&ts, 100), vec![vec![0, 1, 2, 3, 4]]);
    }

    #[test]
    fn names() {
        let (n, idx) = shard_names(Path::new("out/model.safetensors"), 2).unwrap();
        assert_eq!(
            n,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        assert_eq!(idx, Path::new("out/model.safetensors.index.json"));
        assert!(shard_names(Path::new("model.bin"), 2).is_err());
    }
}
