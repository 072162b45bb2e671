//! Producing output tensors: the jobs (weighted folds and copies), the device they run on, and
//! the sink they write to.
//!
//! Every output tensor is one [`Job`]. A fold job reads each of its sources once, chunk by
//! chunk, accumulates `Σ w_k x_k` in f64 and encodes the result; a copy job moves one source
//! tensor, converting its dtype if asked. Each element's value depends only on the weights and
//! the inputs, never on the chunking or the number of threads.

pub mod cpu;
#[cfg_attr(not(feature = "cuda"), path = "cuda_stub.rs")]
pub mod cuda;
pub mod kernels;
pub mod packing;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::checkpoint::Checkpoint;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// One input tensor: which checkpoint, which of its tensors.
#[derive(Clone, Copy, Debug)]
pub struct Src {
    /// Index into the checkpoint slice given to [`execute`].
    pub ckpt: usize,
    /// Index into that checkpoint's `tensors`.
    pub tensor: usize,
}

/// How one output tensor is made.
#[derive(Clone, Debug)]
pub enum Job {
    /// `Σ weights[k] · sources[k]`, encoded as `out_dtype` (a float dtype). Sources all have
    /// `numel` elements of a float dtype; weights are non-zero.
    Fold {
        sources: Vec<Src>,
        weights: Vec<f64>,
        out_dtype: DType,
    },
    /// The source tensor as it is, or converted to `out_dtype` when that differs (floats only).
    Copy { source: Src, out_dtype: DType },
}

impl Job {
    /// Bytes of input this job reads.
    pub fn input_bytes(&self, ckpts: &[Checkpoint]) -> u64 {
        let len = |s: &Src| ckpts[s.ckpt].tensors[s.tensor].len;
        match self {
            Job::Fold { sources, .. } => sources.iter().map(len).sum(),
            Job::Copy { source, .. } => len(source),
        }
    }
}

/// Where output tensors go: `write(i, off, bytes)` puts `bytes` at byte `off` of output tensor
/// `i`'s data. Called from many threads at once, for disjoint ranges.
pub trait Sink: Sync {
    fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()>;

    /// Several writes (`(tensor, off, bytes)`), sorted by tensor and offset. A sink that lays
    /// tensors out back to back joins neighbouring ranges into one system call: a checkpoint of
    /// many small tensors would otherwise cost a write per tensor.
    fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        writes
            .iter()
            .try_for_each(|&(t, off, b)| self.write(t, off, b))
    }
}

/// The device that folds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Checks applied while folding.
#[derive(Clone, Copy, Debug, Default)]
pub struct Checks {
    /// Fail on NaN/Inf in any input or output value of a float tensor.
    pub finite: bool,
}

/// Counts bytes read, for the progress bar and the summary.
#[derive(Debug, Default)]
pub struct Progress {
    bytes: AtomicU64,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// A counter that also drives `bar`, when given.
    pub fn new(bar: Option<indicatif::ProgressBar>) -> Progress {
        Progress {
            bytes: AtomicU64::new(0),
            bar,
        }
    }

    /// Records `n` more bytes read.
    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `jobs` (output tensor `i` is made by `jobs[i]`) on `device`, writing into `sink`.
pub fn execute(
    ckpts: &[Checkpoint],
    jobs: &[Job],
    sink: &dyn Sink,
    device: Device,
    checks: Checks,
    progress: &Progress,
) -> Result<()> {
    for c in ckpts {
        c.check_readable()?;
        c.check_unchanged()?;
    }
    let result = match device {
        Device::Cpu => cpu::execute(ckpts, jobs, sink, checks, progress),
        Device::Cuda(n) => cuda::execute(n, ckpts, jobs, sink, checks, progress),
    };
    progress.finish();
    result?;
    // An input rewritten in place while we read it may have given us a mix of old and new
    // bytes: refuse to commit such an output.
    for c in ckpts {
        c.check_unchanged()?;
    }
    Ok(())
}

/// The error for a NaN/Inf found by `--check-finite`.
pub(crate) fn non_finite_error(
    ckpts: &[Checkpoint],
    src: Option<Src>,
    out_name: &str,
    nan: usize,
    inf: usize,
) -> Error {
    match src {
        Some(s) => {
            let c = &ckpts[s.ckpt];
            Error::tensor(
                &c.path,
                &c.tensors[s.tensor].name,
                format!("{nan} NaN and {inf} infinite values (--check-finite)"),
            )
        }
        None => Error::tensor(
            "output",
            out_name,
            format!("{nan} NaN and {inf} infinite values in the result (--check-finite)"),
        ),
    }
}
