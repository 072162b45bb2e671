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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::kernels::{count_non_finite, count_overflow, decode, fold_into, BLOCK};
use super::{non_finite_error, Checks, Job, Progress, Sink, Src};
use crate::checkpoint::mapped::Mapped;
use crate::checkpoint::Checkpoint;
use crate::dtype::DType;
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
/// How many inputs (the first ones) are read through a mapping; the others are read with
/// `pread`. A fault maps the whole page-cache folio around the address, up to 2 MiB, and a
/// folio can only be released once it is folded through, so each mapped input keeps about
/// 4 MiB resident (measured: 68 MiB for 16 inputs); `pread` keeps nothing, at 1.75 times the
/// CPU time. Set by `EMA_TOOL_MAPPED_INPUTS` (benchmarks and tests: 0 reads every input with
/// `pread`).
pub const MAPPED_INPUTS: usize = 24;

/// A range of elements of one job.
#[derive(Clone, Copy, Debug)]
struct Item {
    job: usize,
    start: u64,
    len: usize,
}

fn dtype_of(ckpts: &[Checkpoint], s: Src) -> DType {
    ckpts[s.ckpt].tensors[s.tensor].dtype
}

/// The inputs a job reads: every source of a fold, the one source of a copy.
fn job_sources(job: &Job) -> &[Src] {
    match job {
        Job::Fold { sources, .. } => sources,
        Job::Copy { source, .. } => std::slice::from_ref(source),
    }
}

/// Elements per item of a job whose inputs take `bytes_per_elem` bytes per element together.
fn chunk_len(bytes_per_elem: u64) -> u64 {
    let n = (ITEM_BYTES / bytes_per_elem.max(1)).clamp(MIN_CHUNK, MAX_CHUNK);
    n - n % BLOCK as u64
}

/// Splits every job into items, in job order.
fn items(ckpts: &[Checkpoint], jobs: &[Job]) -> Vec<Item> {
    let mut items = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let sources = job_sources(job);
        let bytes_per_elem = sources
            .iter()
            .map(|s| dtype_of(ckpts, *s).size() as u64)
            .sum();
        let n = ckpts[sources[0].ckpt].tensors[sources[0].tensor].numel();
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

/// Runs all jobs on the CPU, on every thread of the current rayon pool: [`execute_with`] with
/// the first [`MAPPED_INPUTS`] inputs mapped (or `EMA_TOOL_MAPPED_INPUTS`, for benchmarks), and
/// this process's temporary outputs to remove if a mapped input is truncated.
pub fn execute(
    ckpts: &[Checkpoint],
    jobs: &[Job],
    sink: &dyn Sink,
    checks: Checks,
    progress: &Progress,
) -> Result<()> {
    let mapped = std::env::var("EMA_TOOL_MAPPED_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAPPED_INPUTS);
    let cleanup = crate::output::temporaries();
    execute_with(ckpts, jobs, sink, checks, progress, mapped, &cleanup)
}

/// Runs all jobs on the CPU, on every thread of the current rayon pool, reading the first
/// `mapped_inputs` checkpoints through a mapping and the others with `pread`. The files in
/// `cleanup` are removed if an input is truncated while mapped (the process then exits; see
/// `checkpoint::mapped`).
///
/// On failure, returns the error of the first failing item in job order (items are taken in
/// order, so every item before it was run).
pub fn execute_with(
    ckpts: &[Checkpoint],
    jobs: &[Job],
    sink: &dyn Sink,
    checks: Checks,
    progress: &Progress,
    mapped_inputs: usize,
    cleanup: &[PathBuf],
) -> Result<()> {
    let items = items(ckpts, jobs);
    let mapped = Mapped::new(ckpts, mapped_inputs, cleanup)?;
    let release = Release::new(
        items
            .iter()
            .map(|it| input_bytes(ckpts, &jobs[it.job], *it)),
    );
    let writes = Writes::new(sink);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results = rayon::broadcast(|_| {
        let mut scratch = Scratch::default();
        let ctx = Ctx {
            ckpts,
            mapped: &mapped,
            sink,
            writes: &writes,
            checks,
        };
        let advance =
            || release.advance(|from, to| release_items(ckpts, jobs, &items[from..to], &mapped));
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
            progress.add(input_bytes(ckpts, job, *item));
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

/// Bytes of encoded output queued before they are written: enough to make few large writes of
/// many small tensors (back to back in the output, they are joined into one `pwritev`).
const WRITE_BATCH: usize = 1 << 20;
/// Bytes queued past which the worker that queues more waits to write them.
const MAX_PENDING: usize = 4 * WRITE_BATCH;

/// An encoded range waiting to be written.
struct Pending {
    item: usize,
    tensor: usize,
    off: u64,
    buf: Vec<u8>,
}

/// The queue of encoded ranges and its size in bytes.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    bytes: usize,
}

/// The output writes of the folds. Writes to one file serialize in the kernel (buffered writes
/// take the file's lock), and a worker blocked there used to spin on it (a fifth of the CPU
/// time of a fold of two 4 GB checkpoints, whose output is half the input). So a worker queues
/// its encoded range and goes on folding; once [`WRITE_BATCH`] bytes are queued, whichever
/// worker finds no one writing writes the whole queue, as few system calls as the output's
/// layout allows. A long queue makes the next worker write it, so memory stays bounded.
struct Writes<'a> {
    sink: &'a dyn Sink,
    queue: Mutex<Queue>,
    /// Held while writing; the first failed write, with its item.
    writer: Mutex<Option<(usize, Error)>>,
    /// Buffers written, to encode the next ranges into.
    pool: Mutex<Vec<Vec<u8>>>,
    failed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<'a> Writes<'a> {
    fn new(sink: &'a dyn Sink) -> Writes<'a> {
        Writes {
            sink,
            queue: Mutex::new(Queue::default()),
            writer: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
        }
    }

    /// Queues `p` for writing and returns a buffer for the next range.
    fn submit(&self, p: Pending) -> Vec<u8> {
        {
            let mut q = lock(&self.queue);
            q.bytes += p.buf.len();
            q.pending.push(p);
        }
        lock(&self.pool).pop().unwrap_or_default()
    }

    /// Writes the queue if it is large enough and no other worker is writing it, or, when it is
    /// too long, once the other worker is done writing.
    fn write_if_due(&self) {
        let queued = lock(&self.queue).bytes;
        if queued > MAX_PENDING {
            self.drain(lock(&self.writer));
        } else if queued >= WRITE_BATCH {
            if let Ok(w) = self.writer.try_lock() {
                self.drain(w);
            }
        }
    }

    /// Writes the queue until it is empty.
    fn drain(&self, mut error: std::sync::MutexGuard<'_, Option<(usize, Error)>>) {
        loop {
            let mut batch = std::mem::take(&mut *lock(&self.queue)).pending;
            if batch.is_empty() {
                return;
            }
            if error.is_none() {
                batch.sort_unstable_by_key(|p| (p.tensor, p.off));
                let writes: Vec<(usize, u64, &[u8])> = batch
                    .iter()
                    .map(|p| (p.tensor, p.off, &p.buf[..]))
                    .collect();
                if let Err(e) = self.sink.write_batch(&writes) {
                    // Which of the batch failed is not known: blame its first item.
                    let item = batch.iter().map(|p| p.item).min().unwrap_or(0);
                    *error = Some((item, e));
                    self.failed.store(true, Ordering::Relaxed);
                }
            }
            lock(&self.pool).extend(batch.into_iter().map(|p| p.buf));
        }
    }

    /// Whether a write failed.
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Writes whatever is queued.
    fn finish(&self) {
        self.drain(lock(&self.writer));
    }

    /// The first failed write, with its item.
    fn into_error(self) -> Option<(usize, Error)> {
        self.writer
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Bytes of input that `item` of `job` reads.
fn input_bytes(ckpts: &[Checkpoint], job: &Job, item: Item) -> u64 {
    job_sources(job)
        .iter()
        .map(|s| (item.len * dtype_of(ckpts, *s).size()) as u64)
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
fn release_items(ckpts: &[Checkpoint], jobs: &[Job], items: &[Item], mapped: &Mapped) {
    // Open runs: (checkpoint, file, start, end).
    let mut runs: Vec<(usize, usize, u64, u64)> = Vec::new();
    let flush = |r: &(usize, usize, u64, u64)| {
        let (start, end) = (r.2 - r.2 % FOLIO, r.3 - r.3 % FOLIO);
        mapped.release(r.0, r.1, start, end);
    };
    for item in items {
        for s in job_sources(&jobs[item.job]) {
            if !mapped.covers(s.ckpt) {
                continue;
            }
            let t = &ckpts[s.ckpt].tensors[s.tensor];
            let size = t.dtype.size() as u64;
            let start = t.offset + item.start * size;
            let end = start + item.len as u64 * size;
            match runs.iter_mut().find(|r| r.0 == s.ckpt && r.1 == t.file) {
                Some(r) if r.3 == start => r.3 = end,
                Some(r) => {
                    flush(r);
                    (r.2, r.3) = (start, end);
                }
                None => runs.push((s.ckpt, t.file, start, end)),
            }
        }
    }
    runs.iter().for_each(flush);
}

/// What every item needs.
struct Ctx<'a> {
    ckpts: &'a [Checkpoint],
    /// The inputs that are mapped.
    mapped: &'a Mapped,
    sink: &'a dyn Sink,
    writes: &'a Writes<'a>,
    checks: Checks,
}

/// Per-worker scratch space, reused across items.
#[derive(Default)]
struct Scratch {
    /// The item's range of every input that is not mapped, back to back.
    raw: Vec<u8>,
    /// The encoded item.
    out: Vec<u8>,
    /// The dtype of every input of the item.
    dtypes: Vec<DType>,
}

impl Ctx<'_> {
    /// The range of `item` of every source: a slice of the mapping, or read into `raw`.
    fn inputs<'a>(
        &'a self,
        sources: &[Src],
        item: Item,
        raw: &'a mut Vec<u8>,
    ) -> Result<Vec<&'a [u8]>> {
        let range = |s: &Src| {
            let c = &self.ckpts[s.ckpt];
            let t = &c.tensors[s.tensor];
            let size = t.dtype.size();
            (c, t, item.start * size as u64, item.len * size)
        };
        let read = |s: &&Src| !self.mapped.covers(s.ckpt);
        let total = sources.iter().filter(read).map(|s| range(s).3).sum();
        raw.resize(total, 0);
        let mut rest = &mut raw[..];
        for s in sources.iter().filter(read) {
            let (c, t, off, len) = range(s);
            let (buf, tail) = rest.split_at_mut(len);
            c.read_at(t, off, buf)?;
            rest = tail;
        }
        let mut rest = &raw[..];
        sources
            .iter()
            .map(|s| {
                let (c, t, off, len) = range(s);
                if self.mapped.covers(s.ckpt) {
                    return self.mapped.bytes(s.ckpt, c, t, off, len);
                }
                let (buf, tail) = rest.split_at(len);
                rest = tail;
                Ok(buf)
            })
            .collect()
    }
}

fn run_item(ctx: &Ctx, job: &Job, index: usize, item: Item, scratch: &mut Scratch) -> Result<()> {
    let ckpts = ctx.ckpts;
    let (sources, weights, out_dtype): (&[Src], &[f64], DType) = match job {
        Job::Fold {
            sources,
            weights,
            out_dtype,
        } => (sources, weights, *out_dtype),
        Job::Copy { source, out_dtype } => {
            let dtype = dtype_of(ckpts, *source);
            if dtype == *out_dtype && !(ctx.checks.finite && dtype.is_float()) {
                // A plain copy: the bytes as they are.
                let bytes = ctx.inputs(std::slice::from_ref(source), item, &mut scratch.raw)?;
                return ctx
                    .sink
                    .write(item.job, item.start * dtype.size() as u64, bytes[0]);
            }
            // A float copy that converts or is checked: a fold of one input with weight 1,
            // which is what decoding a float does.
            (std::slice::from_ref(source), &[1.0], *out_dtype)
        }
    };
    let Scratch { raw, out, dtypes } = scratch;
    dtypes.clear();
    dtypes.extend(sources.iter().map(|s| dtype_of(ckpts, *s)));
    // One small allocation per item (a megabyte of input): the slices borrow the mapping.
    let inputs = ctx.inputs(sources, item, raw)?;

    let osize = out_dtype.size();
    out.resize(item.len * osize, 0);
    let converts = dtypes.iter().any(|d| *d != out_dtype);
    let (mut nan, mut inf, mut overflow) = (0, 0, 0);
    fold_into(dtypes, weights, &inputs, out_dtype, out, |acc| {
        if ctx.checks.finite {
            let (n, i) = count_non_finite(acc);
            nan += n;
            inf += i;
        }
        if converts {
            overflow += count_overflow(out_dtype, acc);
        }
    });
    if nan + inf > 0 {
        return Err(find_non_finite(ckpts, sources, &inputs, (nan, inf)));
    }
    if overflow > 0 {
        let s = sources[0];
        let t = &ckpts[s.ckpt].tensors[s.tensor];
        return Err(Error::tensor(
            &ckpts[s.ckpt].path,
            &t.name,
            format!(
                "{overflow} values overflow {out_dtype} when converted from {}",
                t.dtype
            ),
        ));
    }
    if !converts && matches!(job, Job::Copy { .. }) {
        // A checked copy keeps the input's bytes (NaN payloads included).
        return ctx
            .sink
            .write(item.job, item.start * osize as u64, inputs[0]);
    }
    *out = ctx.writes.submit(Pending {
        item: index,
        tensor: item.job,
        off: item.start * osize as u64,
        buf: std::mem::take(out),
    });
    Ok(())
}

/// With NaN/Inf among the results of an item (`nan`, `inf` of them), finds the input that
/// holds them, or blames the output when every input is finite (overflow of the sum itself).
fn find_non_finite(
    ckpts: &[Checkpoint],
    sources: &[Src],
    inputs: &[&[u8]],
    (nan, inf): (usize, usize),
) -> Error {
    for (s, x) in sources.iter().zip(inputs) {
        let dtype = dtype_of(ckpts, *s);
        let mut vals = vec![0.0; x.len() / dtype.size()];
        decode(dtype, x, &mut vals);
        let (n, i) = count_non_finite(&vals);
        if n + i > 0 {
            return non_finite_error(ckpts, Some(*s), "", n, i);
        }
    }
    // Every input is finite: the weighted sum itself overflowed.
    let s = sources[0];
    non_finite_error(ckpts, None, &ckpts[s.ckpt].tensors[s.tensor].name, nan, inf)
}
