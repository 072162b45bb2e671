//! Executing a plan: every output tensor made as the plan says, on a device, written to one
//! [`Sink`] per output.
//!
//! A fold reads each of its sources once, chunk by chunk, accumulates `Σ w_k x_k` in f64 for
//! every output and encodes each result once; a copy moves one source's bytes, converting
//! their dtype if asked. Each element's value depends only on the weights and the inputs,
//! never on the chunking, the number of threads, the device or the number of outputs.
//!
//! - [`kernels`]: the fused fold loops;
//! - `cpu`: the CPU executor (mapped inputs, work items in order, batched writes);
//! - `cuda`: the CUDA executor (with the `cuda` feature; a stand-in without it), and
//!   `packing`, the layout of its batches;
//! - `sink`: the output writers as sinks.

pub(crate) mod cpu;
#[cfg_attr(not(feature = "cuda"), path = "cuda/stub.rs")]
pub(crate) mod cuda;
pub mod kernels;
// Compiled without the `cuda` feature too, so that its tests (the kernels emulated on the
// CPU) run everywhere; only the CUDA executor uses it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod packing;
mod sink;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::checkpoint::Checkpoint;
use crate::codec::DType;
use crate::error::{Error, Result};
use crate::plan::{Make, Plan, Src};
use crate::runtime::Runtime;

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

/// How the fold runs, beyond the plan.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Fail on NaN/Inf in any input or output value of a float tensor (`--check-finite`).
    pub finite: bool,
    /// How many inputs (the first ones) the CPU executor reads through memory maps; the others
    /// are read with `pread` (`cpu::MAPPED_INPUTS` by default).
    pub mapped_inputs: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            finite: false,
            mapped_inputs: cpu::MAPPED_INPUTS,
        }
    }
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

/// Makes every tensor of `plan` on `device`; output `o`'s tensors go to `sinks[o]`.
pub fn execute(
    plan: &Plan,
    sinks: &[&dyn Sink],
    device: Device,
    opts: Options,
    progress: &Progress,
    rt: &Runtime,
) -> Result<()> {
    assert_eq!(sinks.len(), plan.outputs.len(), "one sink per output");
    for c in &plan.inputs {
        c.check_readable()?;
        c.check_unchanged()?;
    }
    let work = Work::of(plan, sinks, opts, progress, rt);
    let result = match device {
        Device::Cpu => cpu::execute(&work, &work.jobs),
        Device::Cuda(n) => cuda::execute(n, &work),
    };
    progress.finish();
    result?;
    // An input rewritten in place while we read it may have given us a mix of old and new
    // bytes: refuse to commit such an output.
    for c in &plan.inputs {
        c.check_unchanged()?;
    }
    Ok(())
}

/// A plan as the executors run it: every output tensor as a [`Job`], the sinks, and how to
/// run.
pub struct Work<'p> {
    pub inputs: &'p [Checkpoint],
    pub jobs: Vec<Job<'p>>,
    pub sinks: &'p [&'p dyn Sink],
    pub opts: Options,
    pub progress: &'p Progress,
    pub rt: &'p Runtime,
}

/// One output tensor to make.
#[derive(Clone, Debug)]
pub struct Job<'p> {
    /// The output tensor made (the index the sinks know it by).
    pub tensor: usize,
    /// The first element of the tensor the job makes: a tensor whose inputs lie in several
    /// places (`TensorInfo::segments`) is made by one job per range that every source holds
    /// in one place; any other by one job from element 0.
    pub at: u64,
    /// The output dtype.
    pub dtype: DType,
    pub kind: Kind<'p>,
}

/// How a [`Job`] makes its tensor.
#[derive(Clone, Debug)]
pub enum Kind<'p> {
    /// `Σ weights[o·S + k] · sources[k]` for each output `o` (`S` sources).
    Fold {
        sources: Vec<Piece<'p>>,
        weights: Vec<f64>,
    },
    /// The piece as it is, or converted to the job's dtype, into every output.
    Copy(Piece<'p>),
}

/// Bytes of one input to read: a tensor, or a raw range of one of its files.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'p> {
    /// Index into the inputs.
    pub input: usize,
    /// Index into that input's data files.
    pub file: usize,
    /// Absolute offset in that file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    pub dtype: DType,
    /// The tensor's name, for messages.
    pub name: &'p str,
}

impl Piece<'_> {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.len / self.dtype.size() as u64
    }

    /// Reads `buf.len()` bytes of the piece, starting `off` bytes in.
    pub fn read(&self, inputs: &[Checkpoint], off: u64, buf: &mut [u8]) -> Result<()> {
        inputs[self.input].read_range(self.name, self.file, self.offset, self.len, off, buf)
    }
}

impl<'p> Work<'p> {
    /// The jobs of `plan`, in tensor order.
    pub fn of(
        plan: &'p Plan,
        sinks: &'p [&'p dyn Sink],
        opts: Options,
        progress: &'p Progress,
        rt: &'p Runtime,
    ) -> Work<'p> {
        let piece = |s: Src| {
            let t = plan.tensor_info(s);
            Piece {
                input: s.input,
                file: t.file,
                offset: t.offset,
                len: t.len,
                dtype: t.dtype,
                name: &t.name,
            }
        };
        // Elements `from .. to` of source `s`, from the segment that holds them.
        let part = |s: Src, from: u64, to: u64| {
            let t = plan.tensor_info(s);
            let size = t.dtype.size() as u64;
            let (file, offset) = match &t.segments {
                Some(segs) => {
                    // Sorted by start and covering the tensor: the last starting at or before.
                    let k = segs.partition_point(|g| g.start <= from * size) - 1;
                    let seg = &segs[k];
                    (seg.file, seg.offset + from * size - seg.start)
                }
                None => (t.file, t.offset + from * size),
            };
            Piece {
                input: s.input,
                file,
                offset,
                len: (to - from) * size,
                dtype: t.dtype,
                name: &t.name,
            }
        };
        let mut jobs = Vec::with_capacity(plan.tensors.len());
        for (i, t) in plan.tensors.iter().enumerate() {
            let srcs: &[Src] = match &t.make {
                Make::Fold { sources } => sources,
                Make::Copy { source } => std::slice::from_ref(source),
                Make::Bytes { .. } => &[],
            };
            let segmented = srcs.iter().any(|&s| plan.tensor_info(s).segments.is_some());
            if !segmented {
                jobs.push(Job {
                    tensor: i,
                    at: 0,
                    dtype: t.dtype,
                    kind: match &t.make {
                        Make::Fold { sources } => Kind::Fold {
                            sources: sources.iter().map(|&s| piece(s)).collect(),
                            weights: plan.fold_weights(sources),
                        },
                        Make::Copy { source } => Kind::Copy(piece(*source)),
                        Make::Bytes {
                            input,
                            file,
                            offset,
                            len,
                        } => Kind::Copy(Piece {
                            input: *input,
                            file: *file,
                            offset: *offset,
                            len: *len,
                            dtype: DType::U8,
                            name: &t.name,
                        }),
                    },
                });
                continue;
            }
            // Cut where any source's segment ends, in elements.
            let numel = piece(srcs[0]).numel();
            let mut cuts = vec![0, numel];
            for &s in srcs {
                let ti = plan.tensor_info(s);
                let size = ti.dtype.size() as u64;
                if let Some(segs) = &ti.segments {
                    cuts.extend(segs.iter().map(|g| g.start / size));
                }
            }
            cuts.sort_unstable();
            cuts.dedup();
            for w in cuts.windows(2).filter(|w| w[0] < w[1]) {
                let (from, to) = (w[0], w[1]);
                jobs.push(Job {
                    tensor: i,
                    at: from,
                    dtype: t.dtype,
                    kind: match &t.make {
                        Make::Fold { sources } => Kind::Fold {
                            sources: sources.iter().map(|&s| part(s, from, to)).collect(),
                            weights: plan.fold_weights(sources),
                        },
                        _ => Kind::Copy(part(srcs[0], from, to)),
                    },
                });
            }
        }
        Work {
            inputs: &plan.inputs,
            jobs,
            sinks,
            opts,
            progress,
            rt,
        }
    }

    /// How many outputs.
    pub fn outputs(&self) -> usize {
        self.sinks.len()
    }
}

impl<'p> Job<'p> {
    /// The pieces it reads: every source of a fold, the one of a copy.
    pub fn sources(&self) -> &[Piece<'p>] {
        match &self.kind {
            Kind::Fold { sources, .. } => sources,
            Kind::Copy(p) => std::slice::from_ref(p),
        }
    }

    /// Elements of the tensor it makes.
    pub fn numel(&self) -> u64 {
        self.sources()[0].numel()
    }

    /// Bytes of input it reads.
    pub fn input_bytes(&self) -> u64 {
        self.sources().iter().map(|p| p.len).sum()
    }
}

/// The error for a NaN/Inf found by `--check-finite`: in the input `piece`, or, without one,
/// in the result for output tensor `out_name`.
pub(crate) fn non_finite_error(
    inputs: &[Checkpoint],
    piece: Option<&Piece>,
    out_name: &str,
    nan: usize,
    inf: usize,
) -> Error {
    match piece {
        Some(p) => Error::tensor(
            inputs[p.input].path(),
            p.name,
            format!("{nan} NaN and {inf} infinite values (--check-finite)"),
        ),
        None => Error::tensor(
            "output",
            out_name,
            format!("{nan} NaN and {inf} infinite values in the result (--check-finite)"),
        ),
    }
}
