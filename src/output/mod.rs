//! Writing outputs, atomically ([`atomic`]): a temporary file beside each target, space
//! reserved up front, written with positioned writes, synced, then renamed over the target. A
//! crash, a kill or a full disk never leaves a partial file at a target; every temporary file
//! is registered with the runtime, which removes it on any error and on SIGINT, SIGTERM and
//! SIGHUP. Only SIGKILL (or a power cut) can leave a `.ema-tool-*.tmp` file beside a target.
//!
//! [`Writer`] picks the format from the target's name and `--max-shard-size`: safetensors
//! ([`safetensors`]), sharded safetensors ([`sharded`]) or a PyTorch state dict ([`pth`]);
//! [`patch`] writes a copy of a PyTorch checkpoint with storage records exchanged (`swap`
//! inside a `.pth`). The writers take tensor data at any offset, from many threads at once
//! (the fold's `Sink`), and complete in two steps: [`Writer::finish`] syncs everything, and
//! [`commit_all`] renames every file of every output together.

pub mod atomic;
pub mod dcp;
pub mod hf;
pub mod patch;
pub mod pth;
pub mod safetensors;
pub mod sharded;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::codec::names::is_torch_name;
use crate::codec::TensorSpec;
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use atomic::parent_dir;
pub use atomic::{commit_all, Finished};
use patch::PatchWriter;
use safetensors::SafetensorsWriter;

/// Checks, before any work, that `target` can be written: not one of `inputs`, not an existing
/// file unless `force`, and in a directory that exists and is writable.
pub fn check_target(target: &Path, inputs: &[&Path], force: bool, rt: &Runtime) -> Result<()> {
    let out_err = |what: String| Error::Output {
        path: target.to_path_buf(),
        what,
    };
    if let Ok(tmeta) = std::fs::metadata(target) {
        for input in inputs {
            if let Ok(imeta) = std::fs::metadata(input) {
                if imeta.dev() == tmeta.dev() && imeta.ino() == tmeta.ino() {
                    return Err(out_err("is also an input; refusing to overwrite it".into()));
                }
            }
        }
        if tmeta.is_dir() {
            return Err(out_err("is a directory".into()));
        }
        if !force {
            return Err(out_err("already exists (use --force to replace it)".into()));
        }
    }
    // An input whose path resolves to the target through a link not yet created cannot exist;
    // also compare names, for inputs inside a sharded directory that is the target.
    let dir = parent_dir(target);
    let dmeta = std::fs::metadata(&dir).map_err(|e| Error::io(&dir, e))?;
    if !dmeta.is_dir() {
        return Err(out_err(format!("{} is not a directory", dir.display())));
    }
    // Creating a probe file is the only reliable test of writability (ACLs, read-only mounts).
    let probe = rt
        .temporary(&dir, ".ema-tool-probe-", "")
        .map_err(|e| out_err(format!("cannot write in {}: {e}", dir.display())))?;
    drop(probe);
    Ok(())
}

/// Checks, before any work, that `target` and `--max-shard-size` go together: shards are
/// safetensors files named after a `<stem>.safetensors` target.
pub fn check_output_kind(target: &Path, max_shard_size: Option<u64>) -> Result<()> {
    if max_shard_size.is_some() {
        if is_torch_name(target) {
            return Err(Error::usage(format!(
                "{}: --max-shard-size writes safetensors shards; name the output \
                 <stem>.safetensors",
                target.display()
            )));
        }
        sharded::shard_names(target, 1)?;
    }
    Ok(())
}

/// An output of any format, being written.
pub enum Writer {
    Safetensors(SafetensorsWriter),
    Sharded(sharded::ShardedWriter),
    Pth(pth::PthWriter),
    Patch(PatchWriter),
    Dcp(dcp::DcpWriter),
}

impl Writer {
    /// Creates the output for `tensors`: a `.pth` state dict when `target` has a PyTorch
    /// extension (metadata cannot go there and is dropped), shards when `max_shard_size` is
    /// given and one shard cannot hold everything, else one safetensors file.
    pub fn create(
        target: &Path,
        force: bool,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
        max_shard_size: Option<u64>,
        rt: &Runtime,
    ) -> Result<Writer> {
        check_output_kind(target, max_shard_size)?;
        if is_torch_name(target) {
            return Ok(Writer::Pth(pth::PthWriter::create(
                target, force, tensors, rt,
            )?));
        }
        if let Some(max) = max_shard_size {
            let groups = sharded::plan_shards(tensors, max);
            if groups.len() > 1 {
                return Ok(Writer::Sharded(sharded::ShardedWriter::create(
                    target, force, tensors, metadata, &groups, rt,
                )?));
            }
        }
        Ok(Writer::Safetensors(SafetensorsWriter::create(
            target, force, tensors, metadata, rt,
        )?))
    }

    /// The file to name in summaries: the target, or the index of a sharded output.
    pub fn display_path(&self, target: &Path) -> PathBuf {
        match self {
            Writer::Sharded(s) => s.index_path().to_path_buf(),
            Writer::Dcp(d) => d.dir().to_path_buf(),
            _ => target.to_path_buf(),
        }
    }

    /// Puts `bytes` at byte `off` of output tensor `tensor`'s data. Called from many threads
    /// at once, for disjoint ranges.
    pub fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        match self {
            Writer::Safetensors(w) => w.write(tensor, off, bytes),
            Writer::Sharded(w) => w.write(tensor, off, bytes),
            Writer::Pth(w) => w.write(tensor, off, bytes),
            Writer::Patch(w) => w.write(tensor, off, bytes),
            Writer::Dcp(w) => w.write(tensor, off, bytes),
        }
    }

    /// Several writes (`(tensor, off, bytes)`, sorted by tensor and offset): the formats that
    /// lay tensors out back to back join neighbouring ranges into one system call.
    pub fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        match self {
            Writer::Safetensors(w) => w.write_batch(writes),
            Writer::Sharded(w) => w.write_batch(writes),
            Writer::Pth(_) | Writer::Patch(_) | Writer::Dcp(_) => writes
                .iter()
                .try_for_each(|&(t, off, b)| self.write(t, off, b)),
        }
    }

    /// Completes every file of the output and syncs it; returns them, to be renamed by
    /// [`commit_all`], with the bytes written.
    pub fn finish(self, rt: &Runtime) -> Result<(Vec<Finished>, u64)> {
        let one = |f: Finished, n: u64| (vec![f], n);
        Ok(match self {
            Writer::Safetensors(w) => {
                let n = w.total_bytes();
                one(w.finish()?, n)
            }
            Writer::Sharded(w) => w.finish(rt)?,
            Writer::Pth(w) => {
                let n = w.total_bytes();
                one(w.finish()?, n)
            }
            Writer::Patch(w) => {
                let n = w.total_bytes();
                one(w.finish()?, n)
            }
            Writer::Dcp(w) => {
                let n = w.total_bytes();
                (w.finish()?, n)
            }
        })
    }

    /// [`Writer::finish`], then the renames: the output is in place. Returns the bytes written.
    pub fn commit(self, rt: &Runtime) -> Result<u64> {
        let (files, n) = self.finish(rt)?;
        commit_all(rt, files)?;
        Ok(n)
    }
}
