//! Packing fold jobs into device batches: which elements go to which kernel launch, and the
//! byte layout of the buffers that the CUDA kernels (`cuda/kernels.cu`) read and write.
//!
//! A [`Batch`] is a list of segments (element ranges of fold jobs) laid end to end in one
//! accumulator array per output (a sweep has K outputs, `K` arrays one after the other). For
//! input `k` of its jobs, a *piece* is one host-to-device transfer: the segment table, the K
//! weights of input `k` of every segment, then the raw bytes of input `k` of every segment, as
//! they are in the files: each input is copied to the device once for all the outputs. Small tensors thus share launches and copies, and a large tensor is split over
//! batches. This module is plain Rust, compiled with or without the `cuda` feature, so that the
//! layout and the kernels can be tested on a machine without a GPU (see the tests, which run
//! the kernels through the host C compiler).

use rayon::prelude::*;

use super::{cpu, Job, Kind, Piece, Progress, Sink, Work};
use crate::codec::DType;
use crate::error::{Error, Result};

/// The CUDA C source of the kernels (the tests emulate it; the device runs its PTX).
#[cfg(test)]
pub const KERNELS: &str = include_str!("cuda/kernels.cu");
/// Threads per block (`BLOCK` in the kernels).
pub const BLOCK: u32 = 256;
/// Elements one block works on (`BLOCK * ITEMS` in the kernels).
pub const ELEMS_PER_BLOCK: u64 = BLOCK as u64 * 8;
/// Bytes of one entry of the segment table (`Seg` in the kernels).
pub const SEG_BYTES: usize = 56;
/// Input data of a piece starts this far in, and every segment's data is aligned to
/// [`DATA_ALIGN`] (16 bytes: any element type, and coalesced loads).
const TABLE_ALIGN: u64 = 256;
const DATA_ALIGN: u64 = 16;
/// The output buffer starts with the error counters (u32 non-finite, u32 overflow), padded.
pub const OUT_HEADER: usize = 256;

/// `Seg.flags`: first input of the segment (assign instead of add).
const FLAG_FIRST: u32 = 1;
/// `Seg.flags`: an input dtype differs from the output dtype (count overflows).
const FLAG_CONVERTS: u32 = 2;

/// The kernels' code for a float dtype (`DT_*`).
pub fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::F64 => 4,
        DType::F8E4M3 => 5,
        DType::F8E5M2 => 6,
        other => unreachable!("fold jobs have float dtypes, not {other}"),
    }
}

/// Caps on one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of input data in one piece (padding included).
    pub data_bytes: u64,
    /// Elements (accumulators) in one batch.
    pub elems: u64,
    /// Segments in one batch.
    pub segments: usize,
}

impl Default for Limits {
    /// 64 MiB pieces (16 Mi f32 elements, a 128 MiB f64 accumulator): large enough that a copy
    /// takes milliseconds next to microseconds of launch overhead, small enough that a few of
    /// them in flight stay far below any GPU's memory.
    fn default() -> Limits {
        Limits {
            data_bytes: 64 << 20,
            elems: 16 << 20,
            segments: 16 << 10,
        }
    }
}

impl Limits {
    /// The default limits for `outputs` outputs: the accumulators of all of them together are
    /// no more than those of one output by default (128 MiB of f64).
    pub fn for_outputs(outputs: usize) -> Limits {
        let d = Limits::default();
        let elems = (d.elems / outputs.max(1) as u64).max(ELEMS_PER_BLOCK);
        Limits {
            elems: elems - elems % ELEMS_PER_BLOCK,
            ..d
        }
    }
}

impl Limits {
    /// The smallest limits that [`Limits::halved`] goes down to: 1 MiB pieces, 64 Ki elements,
    /// 256 segments, a few MiB of device memory for one output. Smaller batches would leave
    /// the device waiting on launches and copies of a few KiB.
    pub const FLOOR: Limits = Limits {
        data_bytes: 1 << 20,
        elems: 64 << 10,
        segments: 256,
    };

    /// Every limit halved (elements in whole blocks) down to [`Limits::FLOOR`], or `None` when
    /// all of them are there.
    pub fn halved(self) -> Option<Limits> {
        let f = Limits::FLOOR;
        let elems = (self.elems / 2).max(f.elems);
        let half = Limits {
            data_bytes: (self.data_bytes / 2).max(f.data_bytes),
            elems: elems - elems % ELEMS_PER_BLOCK,
            segments: (self.segments / 2).max(f.segments),
        };
        (half != self).then_some(half)
    }
}

/// Elements `start .. start + count` of fold job `job`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub job: usize,
    pub start: u64,
    pub count: u64,
    /// Index of its first accumulator in the batch.
    pub acc: u64,
    /// Byte offset of its encoded output in the batch's output (after [`OUT_HEADER`]).
    pub out: u64,
    /// First block of each launch that works on it.
    pub first_block: u32,
}

/// Segments folded by the same launches.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub segments: Vec<Segment>,
    /// Pieces (inputs) of the batch: the most sources of any of its jobs.
    pub pieces: usize,
    /// Accumulators.
    pub elems: u64,
    /// Blocks of each launch.
    pub blocks: u32,
    /// Bytes of encoded output of each output (after [`OUT_HEADER`], the outputs one after
    /// the other).
    pub out_bytes: u64,
    /// Outputs: the rows of weights of each input, and the accumulator arrays.
    pub outputs: usize,
    /// Input data bytes so far, padding included (while planning).
    data: u64,
}

fn align(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

/// The sources and weights of a fold job (of one output), or `None` for a copy.
fn fold_parts<'j>(job: &'j Job) -> Option<(&'j [Piece<'j>], &'j [f64])> {
    match &job.kind {
        Kind::Fold { sources, weights } => Some((sources, weights)),
        Kind::Copy(_) => None,
    }
}

/// Splits the fold jobs among `jobs` (of `outputs` outputs) into batches, in job order. Copy
/// jobs are left out.
pub fn plan(jobs: &[Job], outputs: usize, limits: Limits) -> Vec<Batch> {
    let mut batches = Vec::new();
    let fresh = || Batch {
        outputs,
        ..Batch::default()
    };
    let mut cur = fresh();
    for (j, job) in jobs.iter().enumerate() {
        let Some((sources, _)) = fold_parts(job) else {
            continue;
        };
        let out_dtype = job.dtype;
        let numel = job.numel();
        // Bytes per element of the widest input: a bound for every piece.
        let width = sources
            .iter()
            .map(|p| p.dtype.size() as u64)
            .max()
            .unwrap_or(1);
        let mut start = 0;
        while start < numel {
            let room_elems = limits.elems - cur.elems;
            let room_data = limits.data_bytes.saturating_sub(cur.data + DATA_ALIGN - 1) / width;
            let n = (numel - start).min(room_elems).min(room_data);
            if n == 0 || cur.segments.len() == limits.segments {
                assert!(!cur.segments.is_empty(), "limits too small for one element");
                batches.push(std::mem::replace(&mut cur, fresh()));
                continue;
            }
            cur.segments.push(Segment {
                job: j,
                start,
                count: n,
                acc: cur.elems,
                out: cur.out_bytes,
                first_block: cur.blocks,
            });
            cur.pieces = cur.pieces.max(sources.len());
            cur.elems += n;
            cur.blocks += n.div_ceil(ELEMS_PER_BLOCK) as u32;
            cur.data += align(n * width, DATA_ALIGN);
            cur.out_bytes += align(n * out_dtype.size() as u64, DATA_ALIGN);
            start += n;
        }
    }
    if !cur.segments.is_empty() {
        batches.push(cur);
    }
    batches
}

impl Batch {
    /// Bytes of the segment table, padded to where the weights start.
    fn seg_table_bytes(&self) -> u64 {
        align((self.segments.len() * SEG_BYTES) as u64, TABLE_ALIGN)
    }

    /// Bytes of the segment table and the weights, padded to where the data starts.
    pub fn table_bytes(&self) -> u64 {
        let weights = (self.segments.len() * self.outputs * 8) as u64;
        self.seg_table_bytes() + align(weights, TABLE_ALIGN)
    }

    /// Bytes of piece `k`: table and data.
    pub fn piece_bytes(&self, jobs: &[Job], k: usize) -> u64 {
        let mut end = self.table_bytes();
        for seg in &self.segments {
            if let Some(p) = fold_parts(&jobs[seg.job]).and_then(|(src, _)| src.get(k)) {
                end += align(seg.count * p.dtype.size() as u64, DATA_ALIGN);
            }
        }
        end
    }

    /// Writes piece `k` into `buf`: the segment table, then input `k` of every segment read
    /// from its file (in parallel, in parts of at most 8 MiB). Returns the bytes of the piece
    /// and the bytes read from the inputs.
    pub fn fill_piece(
        &self,
        work: &Work,
        jobs: &[Job],
        k: usize,
        buf: &mut [u8],
    ) -> Result<(usize, u64)> {
        const PART: usize = 8 << 20;
        let table = self.table_bytes() as usize;
        let segs_end = self.seg_table_bytes() as usize;
        let kk = self.outputs;
        let (head, mut rest) = buf.split_at_mut(table);
        let (head, weight_rows) = head.split_at_mut(segs_end);
        let mut pos = table;
        let mut reads: Vec<(Piece, u64, &mut [u8])> = Vec::new();
        let mut total = 0u64;
        for (i, seg) in self.segments.iter().enumerate() {
            let job = &jobs[seg.job];
            let (sources, weights) = fold_parts(job).expect("batches hold fold jobs");
            let out_dtype = job.dtype;
            let converts = sources.iter().any(|p| p.dtype != out_dtype);
            let mut flags = if converts { FLAG_CONVERTS } else { 0 };
            // This segment's weight of input `k` in every output.
            let row_at = segs_end + i * kk * 8;
            let row = &mut weight_rows[i * kk * 8..(i + 1) * kk * 8];
            let s_count = sources.len();
            let (src_off, in_code) = match sources.get(k) {
                Some(s) => {
                    let dtype = s.dtype;
                    let size = dtype.size();
                    let len = seg.count as usize * size;
                    let padded = align(len as u64, DATA_ALIGN) as usize;
                    let (data, tail) = std::mem::take(&mut rest).split_at_mut(padded);
                    rest = tail;
                    let mut off = seg.start * size as u64;
                    for part in data[..len].chunks_mut(PART) {
                        let n = part.len() as u64;
                        reads.push((*s, off, part));
                        off += n;
                    }
                    total += len as u64;
                    let at = pos;
                    pos += padded;
                    if k == 0 {
                        flags |= FLAG_FIRST;
                    }
                    for (o, w) in row.chunks_exact_mut(8).enumerate() {
                        w.copy_from_slice(&weights[o * s_count + k].to_le_bytes());
                    }
                    (at as u64, dtype_code(dtype))
                }
                None => {
                    row.fill(0);
                    (0, 0)
                }
            };
            let e = &mut head[i * SEG_BYTES..(i + 1) * SEG_BYTES];
            e[0..8].copy_from_slice(&seg.acc.to_le_bytes());
            e[8..16].copy_from_slice(&src_off.to_le_bytes());
            e[16..24].copy_from_slice(&seg.out.to_le_bytes());
            e[24..32].copy_from_slice(&(row_at as u64).to_le_bytes());
            e[32..36].copy_from_slice(&(seg.count as u32).to_le_bytes());
            e[36..40].copy_from_slice(&seg.first_block.to_le_bytes());
            e[40..44].copy_from_slice(&in_code.to_le_bytes());
            e[44..48].copy_from_slice(&dtype_code(out_dtype).to_le_bytes());
            e[48..52].copy_from_slice(&flags.to_le_bytes());
            e[52..56].copy_from_slice(&0u32.to_le_bytes());
        }
        reads
            .into_par_iter()
            .try_for_each(|(p, off, part)| p.read(work.inputs, off, part))?;
        Ok((pos, total))
    }

    /// Writes the batch's encoded outputs (`out`, the output buffer after [`OUT_HEADER`]:
    /// [`Batch::out_bytes`] for each output, one after the other) to `sinks`, one batch of
    /// writes per output.
    pub fn write_out(&self, jobs: &[Job], out: &[u8], sinks: &[&dyn Sink]) -> Result<()> {
        for (o, sink) in sinks.iter().enumerate().take(self.outputs) {
            let out = &out[o * self.out_bytes as usize..];
            let writes: Vec<(usize, u64, &[u8])> = self
                .segments
                .iter()
                .map(|seg| {
                    let job = &jobs[seg.job];
                    let size = job.dtype.size() as u64;
                    let at = seg.out as usize;
                    (
                        job.tensor,
                        (job.at + seg.start) * size,
                        &out[at..at + (seg.count * size) as usize],
                    )
                })
                .collect();
            sink.write_batch(&writes)?;
        }
        Ok(())
    }

    /// The error for a batch whose kernels counted NaN/Inf (`--check-finite`) or overflow:
    /// the CPU path runs the batch's jobs again, and names the input or the output, exactly as
    /// it does on the CPU.
    pub fn error_from_cpu(&self, work: &Work, jobs: &[Job], counts: [u32; 2]) -> Error {
        let mut sub: Vec<Job> = Vec::new();
        let mut last = None;
        for seg in &self.segments {
            if last != Some(seg.job) {
                sub.push(jobs[seg.job].clone());
                last = Some(seg.job);
            }
        }
        let sinks: Vec<&dyn Sink> = vec![&Discard; work.outputs()];
        let quiet = Progress::default();
        let again = Work {
            inputs: work.inputs,
            jobs: Vec::new(),
            sinks: &sinks,
            opts: work.opts,
            progress: &quiet,
            rt: work.rt,
        };
        match cpu::execute(&again, &sub) {
            Err(e) => e,
            Ok(()) => Error::Cuda(format!(
                "the device counted {} non-finite and {} overflowing values that the CPU path \
                 does not find (a fault of the device?)",
                counts[0], counts[1]
            )),
        }
    }
}

/// Reads the error counters at the start of an output buffer.
pub fn out_counts(out: &[u8]) -> [u32; 2] {
    let word = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().expect("4 bytes"));
    [word(0), word(4)]
}

/// A sink that drops what it is given.
pub(crate) struct Discard;

impl Sink for Discard {
    fn write(&self, _: usize, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
