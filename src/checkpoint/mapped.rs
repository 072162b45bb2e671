//! The data files of a fold's inputs, memory-mapped for the CPU executor, with what makes that
//! safe enough to ship: folded ranges are unmapped as the fold moves on, so the resident set
//! stays small, and a file truncated while mapped ends the run with ema-tool's usual one-line
//! error instead of a `SIGBUS` crash (the runtime's guard, `runtime::SigbusGuard`).
//!
//! Why a mapping and not `pread` (see BENCHMARKS.md): on page-cached inputs a `pread` copies
//! every byte once more, and that copy was as expensive as everything else the fold does
//! (0.58 s of CPU for 2 GB of f32 inputs, against 0.33 s mapped). Mapping page-cache folios
//! costs little on current kernels, which map a whole large folio per fault: 2 GB of inputs
//! took 3 600 page faults and 0.02 s of system time.

use memmap2::{Mmap, UncheckedAdvice};

use super::{Checkpoint, DataFile};

use crate::error::{Error, Result};
use crate::runtime::{Runtime, SigbusGuard};

/// The data files of the first checkpoints of a list, mapped read-only for the life of the
/// value.
pub struct Mapped {
    /// `maps[c][f]` maps `ckpts[c].files[f]`.
    maps: Vec<Vec<Mmap>>,
    _guard: SigbusGuard,
}

impl Mapped {
    /// Maps every data file of the first `count` checkpoints of `ckpts`.
    ///
    /// Until the value is dropped, a `SIGBUS` on one of the mappings prints
    /// `ema-tool: <file>: file changed while being read (truncated?)`, removes the temporary
    /// outputs registered with `rt`, and exits with status 1.
    pub fn new(ckpts: &[Checkpoint], count: usize, rt: &Runtime) -> Result<Mapped> {
        let maps = ckpts[..count.min(ckpts.len())]
            .iter()
            .map(|c| c.files().iter().map(map).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let ranges = ckpts
            .iter()
            .zip(&maps)
            .flat_map(|(c, ms)| c.files().iter().zip(ms))
            .map(|(df, m)| {
                let start = m.as_ptr() as usize;
                let msg = format!(
                    "ema-tool: {}: file changed while being read (truncated?)\n",
                    df.path().display()
                );
                (start, start + m.len(), msg.into_bytes())
            })
            .collect();
        let _guard = rt.guard_mappings(ranges);
        Ok(Mapped { maps, _guard })
    }

    /// Whether the files of checkpoint `ckpt` (an index into the slice given to
    /// [`Mapped::new`]) are mapped.
    pub fn covers(&self, ckpt: usize) -> bool {
        ckpt < self.maps.len()
    }

    /// Bytes `at .. at + len` of data file `file` of checkpoint `ckpt` (an index into the
    /// slice given to [`Mapped::new`], which must be [covered](Mapped::covers)), or `None` when
    /// the mapping is shorter: the file was truncated since its header was read.
    pub fn bytes(&self, ckpt: usize, file: usize, at: u64, len: usize) -> Option<&[u8]> {
        let map = &self.maps[ckpt][file];
        let s = usize::try_from(at).ok()?;
        map.get(s..s.checked_add(len)?)
    }

    /// Unmaps bytes `start .. end` of file `file` of checkpoint `ckpt`, widened to whole pages:
    /// they leave the resident set and come back from the page cache if touched again. The
    /// data itself is untouched, so releasing a range still in use costs a page fault, never
    /// a wrong value.
    pub fn release(&self, ckpt: usize, file: usize, start: u64, end: u64) {
        let map = &self.maps[ckpt][file];
        let end = (end as usize).min(map.len());
        let start = (start as usize).min(end);
        if start < end {
            // SAFETY: the mappings are shared and read-only, so MADV_DONTNEED drops page-table
            // entries only and the next access maps the same file pages again: no reference
            // into the mapping sees its data change. A failure leaves the pages mapped.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Maps `df` read-only.
fn map(df: &DataFile) -> Result<Mmap> {
    // SAFETY: a mapped file that another process modifies changes under the references we hand
    // out, and one that shrinks raises SIGBUS on access. ema-tool never writes its inputs (the
    // output is refused if it is an input), `check_unchanged` verifies the sizes before the
    // fold, and the SigbusGuard turns a truncation during the fold into a clean error exit.
    // This is the contract every mmap-based checkpoint reader has (safetensors, candle).
    unsafe { Mmap::map(df.file()) }.map_err(|e| Error::io(df.path(), e))
}
