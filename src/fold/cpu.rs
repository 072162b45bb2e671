//! The CPU executor: rayon over fixed-size chunks of every job, positioned reads into
//! per-thread buffers that stay in cache, one fused accumulate loop per input.

use rayon::prelude::*;

use super::kernels::{accumulate, count_non_finite, count_overflow, decode, encode};
use super::{non_finite_error, Checks, Job, Progress, Sink, Src};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Elements per work item: 32 Ki elements keep a chunk of every buffer in L2.
pub const CHUNK: u64 = 32 * 1024;

/// A range of elements of one job.
#[derive(Clone, Copy, Debug)]
struct Item {
    job: usize,
    start: u64,
    len: usize,
}

/// Per-thread scratch space, reused across items.
#[derive(Default)]
struct Scratch {
    raw: Vec<u8>,
    acc: Vec<f64>,
    out: Vec<u8>,
}

/// Splits every job into chunks of at most [`CHUNK`] elements.
fn items(ckpts: &[Checkpoint], jobs: &[Job]) -> Vec<Item> {
    let mut items = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let s = match job {
            Job::Fold { sources, .. } => sources[0],
            Job::Copy { source, .. } => *source,
        };
        let n = ckpts[s.ckpt].tensors[s.tensor].numel();
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            items.push(Item {
                job: j,
                start,
                len: len as usize,
            });
            start += len;
        }
    }
    items
}

/// Runs all jobs on the CPU, in parallel over chunks.
pub fn execute(
    ckpts: &[Checkpoint],
    jobs: &[Job],
    sink: &dyn Sink,
    checks: Checks,
    progress: &Progress,
) -> Result<()> {
    let items = items(ckpts, jobs);
    items
        .par_iter()
        .with_min_len(1)
        .try_for_each_init(Scratch::default, |scratch, item| {
            run_item(
                ckpts,
                &jobs[item.job],
                *item,
                sink,
                checks,
                progress,
                scratch,
            )
        })
}

fn read_chunk<'a>(
    ckpts: &[Checkpoint],
    s: Src,
    item: Item,
    raw: &'a mut Vec<u8>,
) -> Result<&'a [u8]> {
    let c = &ckpts[s.ckpt];
    let t = &c.tensors[s.tensor];
    let size = t.dtype.size();
    let bytes = item.len * size;
    raw.resize(bytes, 0);
    c.read_at(t, item.start * size as u64, &mut raw[..bytes])?;
    Ok(&raw[..bytes])
}

fn run_item(
    ckpts: &[Checkpoint],
    job: &Job,
    item: Item,
    sink: &dyn Sink,
    checks: Checks,
    progress: &Progress,
    scratch: &mut Scratch,
) -> Result<()> {
    let Scratch { raw, acc, out } = scratch;
    acc.resize(item.len, 0.0);
    let (out_dtype, first_src, converts) = match job {
        Job::Fold {
            sources,
            weights,
            out_dtype,
        } => {
            for (k, (s, &w)) in sources.iter().zip(weights).enumerate() {
                let dtype = ckpts[s.ckpt].tensors[s.tensor].dtype;
                let bytes = read_chunk(ckpts, *s, item, raw)?;
                accumulate(dtype, bytes, w, acc, k == 0);
                progress.add(bytes.len() as u64);
            }
            let converts = sources
                .iter()
                .any(|s| ckpts[s.ckpt].tensors[s.tensor].dtype != *out_dtype);
            (*out_dtype, sources[0], converts)
        }
        Job::Copy { source, out_dtype } => {
            let t = &ckpts[source.ckpt].tensors[source.tensor];
            let bytes = read_chunk(ckpts, *source, item, raw)?;
            progress.add(bytes.len() as u64);
            if t.dtype == *out_dtype && !(checks.finite && t.dtype.is_float()) {
                return sink.write(item.job, item.start * t.dtype.size() as u64, bytes);
            }
            decode(t.dtype, bytes, acc);
            if t.dtype == *out_dtype {
                check_finite(ckpts, job, item, acc, raw)?;
                return sink.write(item.job, item.start * t.dtype.size() as u64, &raw[..]);
            }
            (*out_dtype, *source, true)
        }
    };
    if checks.finite {
        check_finite(ckpts, job, item, acc, raw)?;
    }
    if converts && count_overflow(out_dtype, acc) > 0 {
        let t = &ckpts[first_src.ckpt].tensors[first_src.tensor];
        return Err(Error::tensor(
            &ckpts[first_src.ckpt].path,
            &t.name,
            format!(
                "{} values overflow {out_dtype} when converted from {}",
                count_overflow(out_dtype, acc),
                t.dtype
            ),
        ));
    }
    let size = out_dtype.size();
    out.resize(item.len * size, 0);
    encode(out_dtype, acc, out);
    sink.write(item.job, item.start * size as u64, out)
}

/// With NaN/Inf among the results of `item`, finds the input that holds them, or blames the
/// output when every input is finite (overflow of the sum itself).
fn check_finite(
    ckpts: &[Checkpoint],
    job: &Job,
    item: Item,
    acc: &[f64],
    raw: &mut Vec<u8>,
) -> Result<()> {
    let (nan, inf) = count_non_finite(acc);
    if nan + inf == 0 {
        return Ok(());
    }
    let sources: Vec<Src> = match job {
        Job::Fold { sources, .. } => sources.clone(),
        Job::Copy { source, .. } => vec![*source],
    };
    let mut vals = vec![0.0; item.len];
    for s in &sources {
        let dtype = ckpts[s.ckpt].tensors[s.tensor].dtype;
        let bytes = read_chunk(ckpts, *s, item, raw)?;
        decode(dtype, bytes, &mut vals);
        let (n, i) = count_non_finite(&vals);
        if n + i > 0 {
            return Err(non_finite_error(ckpts, Some(*s), "", n, i));
        }
    }
    let s = sources[0];
    Err(non_finite_error(
        ckpts,
        None,
        &ckpts[s.ckpt].tensors[s.tensor].name,
        nan,
        inf,
    ))
}
