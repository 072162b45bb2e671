//! The CPU executor: one worker per rayon thread takes work items (a range of elements of one
//! output tensor) in order, folds the range of every input straight from the memory-mapped
//! inputs, and writes the encoded range at its place in the output. Folded input ranges are
//! unmapped behind the fold, so the resident set stays small whatever the size of the inputs.
//!
//! Why this shape (8 × 256 MB f32 checkpoints, page-cached, 2 cores; BENCHMARKS.md):
//! - Mapped inputs, not `pread`: the copy a `pread` makes cost as much CPU as the rest of the
//!   fold (0.58 s of CPU against 0.33 s mapped); see `checkpoint::mapped`.
//! - Workers own their buffers for the whole run (rayon's `for_each_init` made fresh,
//!   page-faulting buffers at every work split) and take items in order from a shared counter,
//!   so both write close to each other (the output is written nearly sequentially) and the
//!   folded prefix of the inputs can be released in large batches (one `madvise` per batch
//!   and file: releasing every item's pages on its own cost 0.1 s of TLB shootdowns).
//!
//! Each element's value is `((w_0·x_0) + w_1·x_1) + …` in f64, inputs in fold order, rounded
//! once to the output dtype: the chunking and the number of threads never change a result.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::kernels::{fold_into, Check, BLOCK};
use super::{non_finite_error, Job, Kind, Piece, Work};
use crate::checkpoint::mapped::Mapped;
use crate::codec::convert::{count_non_finite, count_overflow, decode};
use crate::codec::DType;
use crate::error::{Error, Result};

/// Input bytes per work item, all inputs together: small enough that the output range stays
/// in L2 and that both cores get work on small models, large enough that the per-item costs
/// (claiming it, one positioned write) vanish.
const ITEM_BYTES: u64 = 1 << 20;
/// Smallest range per item (elements), however many inputs.
const MIN_CHUNK: u64 = 4 * 1024;
/// Largest range per item (elements), for jobs with one or two inputs.
const MAX_CHUNK: u64 = 64 * 1024;
/// Input bytes folded between two releases of the folded ranges.
const RELEASE_BYTES: u64 = 8 << 20;
/// How many inputs (the first ones) are read through a mapping by default; the others are read
/// with `pread`. A fault maps the whole page-cache folio around the address, up to 2 MiB, and a
/// folio can only be released once it is folded through, so each mapped input keeps about
/// 4 MiB resident (measured: 68 MiB for 16 inputs); `pread` keeps nothing, at 1.75 times the
/// CPU time. `--mapped-inputs` sets it (0 reads every input with `pread`).
pub const MAPPED_INPUTS: usize = 24;

/// A range of elements of one job.
#[derive(Clone, Copy, Debug)]
struct Item {
    job: usize,
    start: u64,
    len: usize,
}

/// Elements per item of a job whose inputs take `bytes_per_elem` bytes per element together.
fn chunk_len(bytes_per_elem: u64) -> u64 {
    let n = (ITEM_BYTES / bytes_per_elem.max(1)).clamp(MIN_CHUNK, MAX_CHUNK);
    n - n % BLOCK as u64
}

/// Splits every job into items, in job order; `outputs` outputs are made of each job.
fn items(jobs: &[Job], outputs: usize) -> Vec<Item> {
    let mut items = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let bytes_per_elem = job
            .sources()
            .iter()
            .map(|p| p.dtype.size() as u64)
            .sum::<u64>()
            + (outputs * job.dtype.size()) as u64;
        let n = job.numel();
        let chunk = chunk_len(bytes_per_elem);
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
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

/// Makes the tensors of `jobs` (jobs of `work`) on the CPU, on every thread of the current
/// rayon pool, reading the first `work.opts.mapped_inputs` inputs through a mapping (guarded
/// by the runtime) and the others with `pread`.
///
/// On failure, returns the error of the first failing item in job order (items are taken in
/// order, so every item before it was run).
pub fn execute(work: &Work, jobs: &[Job]) -> Result<()> {
    let items = items(jobs, work.outputs());
    let mapped = Mapped::new(work.inputs, work.opts.mapped_inputs, work.rt)?;
    let release = Release::new(items.iter().map(|it| input_bytes(&jobs[it.job], *it)));
    let writes = Writes::new(work);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results = rayon::broadcast(|_| {
        let mut scratch = Scratch::default();
        let ctx = Ctx {
            work,
            mapped: &mapped,
            writes: &writes,
        };
        let advance = || release.advance(|from, to| release_items(jobs, &items[from..to], &mapped));
        let mut failure = None;
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            while !release.may_start(i) && !failed.load(Ordering::Relaxed) {
                advance();
                std::thread::yield_now();
            }
            let job = &jobs[item.job];
            if let Err(e) = run_item(&ctx, job, i, *item, &mut scratch) {
                failed.store(true, Ordering::Relaxed);
                failure = Some((i, e));
                break;
            }
            if writes.failed() {
                failed.store(true, Ordering::Relaxed);
                break;
            }
            work.progress.add(input_bytes(job, *item));
            // Done before its output is written: its input may be released, and the other
            // worker may run ahead, while this one writes.
            release.done(i);
            advance();
            writes.write_if_due();
        }
        // The last worker to get here writes what the others queued.
        writes.finish();
        failure
    });
    let failures = results.into_iter().flatten().chain(writes.into_error());
    match failures.min_by_key(|(i, _)| *i) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// Bytes of encoded output of one output queued before they are written: enough to make few
/// large writes of many small tensors (back to back in the output, they are joined into one
/// `pwritev`).
const WRITE_BATCH: usize = 1 << 20;
/// Bytes queued, all outputs together, past which the worker that queues more waits to write
/// them: memory stays bounded however many outputs a sweep has.
const MAX_PENDING: usize = 8 << 20;

/// An encoded range waiting to be written.
struct Pending {
    item: usize,
    tensor: usize,
    off: u64,
    buf: Vec<u8>,
}

/// The queue of encoded ranges of one output, and its size in bytes.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    bytes: usize,
}

/// What is queued for one output, and the lock held while writing it.
#[derive(Default)]
struct Output {
    queue: Mutex<Queue>,
    writer: Mutex<()>,
}

/// The output writes of the folds. Writes to one file serialize in the kernel (buffered writes
/// take the file's lock), and a worker blocked there used to spin on it (a fifth of the CPU
/// time of a fold of two 4 GB checkpoints, whose output is half the input). So a worker queues
/// its encoded range and goes on folding; once an output has a batch queued, whichever worker
/// finds no one writing that output writes its whole queue, as few system calls as the
/// output's layout allows. The outputs of a sweep are written in parallel (writing to tmpfs
/// costs about as much as the fold: one writer at a time made the 8-value sweep wait on it),
/// and a long queue makes the next worker write it, so memory stays bounded.
struct Writes<'a> {
    work: &'a Work<'a>,
    outputs: Vec<Output>,
    /// Bytes queued for a batch of one output.
    batch: usize,
    /// Bytes queued, all outputs together.
    queued: AtomicUsize,
    /// The first failed write (by item), with its item.
    error: Mutex<Option<(usize, Error)>>,
    /// Buffers written, to encode the next ranges into.
    pool: Mutex<Vec<Vec<u8>>>,
    failed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<'a> Writes<'a> {
    fn new(work: &'a Work<'a>) -> Writes<'a> {
        let n = work.outputs();
        Writes {
            work,
            outputs: (0..n).map(|_| Output::default()).collect(),
            // Half the bound queued in batches of every output, at least one item's range.
            batch: (MAX_PENDING / 2 / n.max(1)).clamp(64 << 10, WRITE_BATCH),
            queued: AtomicUsize::new(0),
            error: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
        }
    }

    /// Queues `p` for writing to output `output` and returns a buffer for the next range.
    fn submit(&self, output: usize, p: Pending) -> Vec<u8> {
        self.queued.fetch_add(p.buf.len(), Ordering::Relaxed);
        {
            let mut q = lock(&self.outputs[output].queue);
            q.bytes += p.buf.len();
            q.pending.push(p);
        }
        lock(&self.pool).pop().unwrap_or_default()
    }

    /// Writes the queue of every output that has a batch and that no other worker is writing;
    /// when too much is queued, waits to write the longest queue.
    fn write_if_due(&self) {
        for (o, out) in self.outputs.iter().enumerate() {
            if lock(&out.queue).bytes >= self.batch {
                if let Ok(w) = out.writer.try_lock() {
                    self.drain(o, w);
                }
            }
        }
        if self.queued.load(Ordering::Relaxed) > MAX_PENDING {
            let longest =
                (0..self.outputs.len()).max_by_key(|&o| lock(&self.outputs[o].queue).bytes);
            if let Some(o) = longest {
                self.drain(o, lock(&self.outputs[o].writer));
            }
        }
    }

    /// Writes the queue of output `o` until it is empty (`_writing`: its writer lock).
    fn drain(&self, o: usize, _writing: std::sync::MutexGuard<'_, ()>) {
        loop {
            let mut batch = std::mem::take(&mut *lock(&self.outputs[o].queue)).pending;
            if batch.is_empty() {
                return;
            }
            let bytes: usize = batch.iter().map(|p| p.buf.len()).sum();
            if !self.failed() {
                batch.sort_unstable_by_key(|p| (p.tensor, p.off));
                let writes: Vec<(usize, u64, &[u8])> = batch
                    .iter()
                    .map(|p| (p.tensor, p.off, &p.buf[..]))
                    .collect();
                if let Err(e) = self.work.sinks[o].write_batch(&writes) {
                    // Which of the batch failed is not known: blame its first item.
                    let item = batch.iter().map(|p| p.item).min().unwrap_or(0);
                    let mut first = lock(&self.error);
                    if first.as_ref().map_or(true, |(i, _)| item < *i) {
                        *first = Some((item, e));
                    }
                    self.failed.store(true, Ordering::Relaxed);
                }
            }
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            lock(&self.pool).extend(batch.into_iter().map(|p| p.buf));
        }
    }

    /// Whether a write failed.
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Writes whatever is queued: first the outputs no other worker is writing, then the
    /// others once it is done.
    fn finish(&self) {
        for (o, out) in self.outputs.iter().enumerate() {
            if let Ok(w) = out.writer.try_lock() {
                self.drain(o, w);
            }
        }
        for (o, out) in self.outputs.iter().enumerate() {
            self.drain(o, lock(&out.writer));
        }
    }

    /// The first failed write, with its item.
    fn into_error(self) -> Option<(usize, Error)> {
        self.error
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Bytes of input that `item` of `job` reads.
fn input_bytes(job: &Job, item: Item) -> u64 {
    job.sources()
        .iter()
        .map(|p| (item.len * p.dtype.size()) as u64)
        .sum()
}

/// Tracks which items are done and releases the mapped input of the folded prefix of the item
/// list, in batches of about [`RELEASE_BYTES`] of input.
struct Release {
    done: Vec<AtomicBool>,
    /// `before[i]`: bytes of input of the items before item `i`.
    before: Vec<u64>,
    /// (first item not known done, first item not released); whoever holds the lock advances.
    state: Mutex<(usize, usize)>,
    /// The first of `state`, readable without the lock.
    low: AtomicUsize,
}

/// How far (in bytes of input) a worker may run ahead of the first item not done: on a busy
/// machine the other worker is often descheduled in the middle of an item, and the input
/// folded meanwhile stays mapped until that item is done.
const MAX_LEAD: u64 = 2 * RELEASE_BYTES;

impl Release {
    /// Tracks items that read `bytes` of input each.
    fn new(bytes: impl Iterator<Item = u64>) -> Release {
        let mut before = vec![0];
        for b in bytes {
            before.push(before.last().copied().unwrap_or(0) + b);
        }
        let n = before.len() - 1;
        Release {
            done: (0..n).map(|_| AtomicBool::new(false)).collect(),
            before,
            state: Mutex::new((0, 0)),
            low: AtomicUsize::new(0),
        }
    }

    /// Whether item `i` is close enough to the first item not done to be started.
    fn may_start(&self, i: usize) -> bool {
        let low = self.low.load(Ordering::Acquire).min(i);
        self.before[i] - self.before[low] < MAX_LEAD
    }

    /// Marks item `i` done.
    fn done(&self, i: usize) {
        self.done[i].store(true, Ordering::Release);
    }

    /// Moves the first item not done forward, and calls `release(from, to)` on the done items
    /// not yet released when they read [`RELEASE_BYTES`] (or are the last ones). Does nothing
    /// when another worker is doing it.
    fn advance(&self, release: impl FnOnce(usize, usize)) {
        let Ok(mut st) = self.state.try_lock() else {
            return;
        };
        let (mut next, released) = *st;
        while next < self.done.len() && self.done[next].load(Ordering::Acquire) {
            next += 1;
        }
        st.0 = next;
        self.low.store(next, Ordering::Release);
        let batch = self.before[next] - self.before[released];
        if batch >= RELEASE_BYTES || (next == self.done.len() && next > released) {
            release(released, next);
            st.1 = next;
        }
    }
}

/// Page-cache folios are at most this large and aligned to their size: a fault maps the whole
/// folio, so only whole folded folios are worth releasing (a part of one comes back with the
/// next fault in the rest of it).
const FOLIO: u64 = 2 << 20;

/// Releases the input ranges of `items`, joined where they touch in a file, and cut down to
/// whole folios. The folio cut off at the end of a range was partly folded: the next batch
/// starts from it.
fn release_items(jobs: &[Job], items: &[Item], mapped: &Mapped) {
    // Open runs: (checkpoint, file, start, end).
    let mut runs: Vec<(usize, usize, u64, u64)> = Vec::new();
    let flush = |r: &(usize, usize, u64, u64)| {
        let (start, end) = (r.2 - r.2 % FOLIO, r.3 - r.3 % FOLIO);
        mapped.release(r.0, r.1, start, end);
    };
    for item in items {
        for p in jobs[item.job].sources() {
            if !mapped.covers(p.input) {
                continue;
            }
            let size = p.dtype.size() as u64;
            let start = p.offset + item.start * size;
            let end = start + item.len as u64 * size;
            match runs.iter_mut().find(|r| r.0 == p.input && r.1 == p.file) {
                Some(r) if r.3 == start => r.3 = end,
                Some(r) => {
                    flush(r);
                    (r.2, r.3) = (start, end);
                }
                None => runs.push((p.input, p.file, start, end)),
            }
        }
    }
    runs.iter().for_each(flush);
}

/// What every item needs.
struct Ctx<'a> {
    work: &'a Work<'a>,
    /// The inputs that are mapped.
    mapped: &'a Mapped,
    writes: &'a Writes<'a>,
}

/// Per-worker scratch space, reused across items.
#[derive(Default)]
struct Scratch {
    /// The item's range of every input that is not mapped, back to back.
    raw: Vec<u8>,
    /// The encoded item, one buffer per output.
    outs: Vec<Vec<u8>>,
    /// The dtype of every input of the item.
    dtypes: Vec<DType>,
}

impl Ctx<'_> {
    /// The range of `item` of every source: a slice of the mapping, or read into `raw`.
    fn inputs<'a>(
        &'a self,
        sources: &[Piece],
        item: Item,
        raw: &'a mut Vec<u8>,
    ) -> Result<Vec<&'a [u8]>> {
        let range = |p: &Piece| {
            let size = p.dtype.size();
            (item.start * size as u64, item.len * size)
        };
        let read = |p: &&Piece| !self.mapped.covers(p.input);
        let total = sources.iter().filter(read).map(|p| range(p).1).sum();
        raw.resize(total, 0);
        let mut rest = &mut raw[..];
        for p in sources.iter().filter(read) {
            let (off, len) = range(p);
            let (buf, tail) = rest.split_at_mut(len);
            p.read(self.work.inputs, off, buf)?;
            rest = tail;
        }
        let mut rest = &raw[..];
        sources
            .iter()
            .map(|p| {
                let (off, len) = range(p);
                if self.mapped.covers(p.input) {
                    return self
                        .mapped
                        .bytes(p.input, p.file, p.offset + off, len)
                        .ok_or_else(|| {
                            Error::tensor(
                                self.work.inputs[p.input].files()[p.file].path(),
                                p.name,
                                "file is shorter than its header says (truncated while in use?)",
                            )
                        });
                }
                let (buf, tail) = rest.split_at(len);
                rest = tail;
                Ok(buf)
            })
            .collect()
    }

    /// Writes `bytes` at `off` of the job's tensor in every output, now.
    fn write_everywhere(&self, job: &Job, off: u64, bytes: &[u8]) -> Result<()> {
        self.work
            .sinks
            .iter()
            .try_for_each(|s| s.write(job.tensor, off, bytes))
    }
}

fn run_item(ctx: &Ctx, job: &Job, index: usize, item: Item, scratch: &mut Scratch) -> Result<()> {
    let outputs = ctx.work.outputs();
    let ones;
    let (sources, weights): (&[Piece], &[f64]) = match &job.kind {
        Kind::Fold { sources, weights } => (sources, weights),
        Kind::Copy(source) => {
            if source.dtype == job.dtype && !(ctx.work.opts.finite && source.dtype.is_float()) {
                // A plain copy: the bytes as they are.
                let bytes = ctx.inputs(std::slice::from_ref(source), item, &mut scratch.raw)?;
                return ctx.write_everywhere(
                    job,
                    (job.at + item.start) * source.dtype.size() as u64,
                    bytes[0],
                );
            }
            // A float copy that converts or is checked: a fold of one input with weight 1,
            // which is what decoding a float does.
            ones = vec![1.0; outputs];
            (std::slice::from_ref(source), &ones[..])
        }
    };
    let out_dtype = job.dtype;
    let Scratch { raw, outs, dtypes } = scratch;
    dtypes.clear();
    dtypes.extend(sources.iter().map(|p| p.dtype));
    // One small allocation per item (a megabyte of input): the slices borrow the mapping.
    let inputs = ctx.inputs(sources, item, raw)?;

    let osize = out_dtype.size();
    outs.resize_with(outputs, Vec::new);
    for o in outs.iter_mut() {
        o.resize(item.len * osize, 0);
    }
    let converts = dtypes.iter().any(|d| *d != out_dtype);
    let (mut nan, mut inf, mut overflow) = (0, 0, 0);
    let mut refs: Vec<&mut [u8]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    let mut check = |_: usize, acc: &[f64]| {
        if ctx.work.opts.finite {
            let (n, i) = count_non_finite(acc);
            nan += n;
            inf += i;
        }
        if converts {
            overflow += count_overflow(out_dtype, acc);
        }
    };
    // Unchecked, the fold may encode its sums straight from registers.
    let check: Check<'_> = (ctx.work.opts.finite || converts).then_some(&mut check);
    fold_into(dtypes, weights, &inputs, out_dtype, &mut refs, check);
    if nan + inf > 0 {
        return Err(find_non_finite(ctx, sources, &inputs, (nan, inf)));
    }
    if overflow > 0 {
        let p = &sources[0];
        return Err(Error::tensor(
            ctx.work.inputs[p.input].path(),
            p.name,
            format!(
                "{overflow} values overflow {out_dtype} when converted from {}",
                p.dtype
            ),
        ));
    }
    if !converts && matches!(job.kind, Kind::Copy(_)) {
        // A checked copy keeps the input's bytes (NaN payloads included).
        return ctx.write_everywhere(job, (job.at + item.start) * osize as u64, inputs[0]);
    }
    for (o, buf) in outs.iter_mut().enumerate() {
        *buf = ctx.writes.submit(
            o,
            Pending {
                item: index,
                tensor: job.tensor,
                off: (job.at + item.start) * osize as u64,
                buf: std::mem::take(buf),
            },
        );
    }
    Ok(())
}

/// With NaN/Inf among the results of an item (`nan`, `inf` of them), finds the input that
/// holds them, or blames the output when every input is finite (overflow of the sum itself).
fn find_non_finite(
    ctx: &Ctx,
    sources: &[Piece],
    inputs: &[&[u8]],
    (nan, inf): (usize, usize),
) -> Error {
    for (p, x) in sources.iter().zip(inputs) {
        let mut vals = vec![0.0; x.len() / p.dtype.size()];
        decode(p.dtype, x, &mut vals);
        let (n, i) = count_non_finite(&vals);
        if n + i > 0 {
            return non_finite_error(ctx.work.inputs, Some(p), "", n, i);
        }
    }
    // Every input is finite: the weighted sum itself overflowed.
    non_finite_error(ctx.work.inputs, None, sources[0].name, nan, inf)
}
