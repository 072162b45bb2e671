//! The data files of a fold's inputs, memory-mapped for the CPU executor, with what makes that
//! safe enough to ship: folded ranges are unmapped as the fold moves on, so the resident set
//! stays small, and a file truncated while mapped ends the run with ema-tool's usual one-line
//! error instead of a `SIGBUS` crash.
//!
//! Why a mapping and not `pread` (see BENCHMARKS.md): on page-cached inputs a `pread` copies
//! every byte once more, and that copy was as expensive as everything else the fold does
//! (0.58 s of CPU for 2 GB of f32 inputs, against 0.33 s mapped). Mapping page-cache folios
//! costs little on current kernels, which map a whole large folio per fault: 2 GB of inputs
//! took 3 600 page faults and 0.02 s of system time.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, Once};

use memmap2::{Mmap, UncheckedAdvice};

use super::{Checkpoint, DataFile, TensorInfo};
use crate::error::{Error, Result};

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
    /// `ema-tool: <file>: file changed while being read (truncated?)`, removes the files in
    /// `cleanup` (the temporary outputs), and exits with status 1.
    pub fn new(ckpts: &[Checkpoint], count: usize, cleanup: &[PathBuf]) -> Result<Mapped> {
        let maps = ckpts[..count.min(ckpts.len())]
            .iter()
            .map(|c| c.files.iter().map(map).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let ranges = ckpts
            .iter()
            .zip(&maps)
            .flat_map(|(c, ms)| c.files.iter().zip(ms))
            .map(|(df, m)| {
                let start = m.as_ptr() as usize;
                let msg = format!(
                    "ema-tool: {}: file changed while being read (truncated?)\n",
                    df.path.display()
                );
                (start, start + m.len(), msg.into_bytes())
            })
            .collect();
        let _guard = SigbusGuard::new(ranges, cleanup);
        Ok(Mapped { maps, _guard })
    }

    /// Whether the files of checkpoint `ckpt` (an index into the slice given to
    /// [`Mapped::new`]) are mapped.
    pub fn covers(&self, ckpt: usize) -> bool {
        ckpt < self.maps.len()
    }

    /// Bytes `off .. off + len` of the data of tensor `t` of checkpoint `ckpt`, which must be
    /// [covered](Mapped::covers).
    pub fn bytes(
        &self,
        ckpt: usize,
        c: &Checkpoint,
        t: &TensorInfo,
        off: u64,
        len: usize,
    ) -> Result<&[u8]> {
        let map = &self.maps[ckpt][t.file];
        off.checked_add(len as u64)
            .filter(|&e| e <= t.len)
            .and_then(|_| t.offset.checked_add(off))
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| map.get(s..s.checked_add(len)?))
            .ok_or_else(|| {
                Error::tensor(
                    &c.files[t.file].path,
                    &t.name,
                    "file is shorter than its header says (truncated while in use?)",
                )
            })
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
    unsafe { Mmap::map(&df.file) }.map_err(|e| Error::io(&df.path, e))
}

/// What the `SIGBUS` handler needs, allocated before it can run, never freed while installed.
struct GuardState {
    /// Mapped address ranges and the message for each.
    ranges: Vec<(usize, usize, Vec<u8>)>,
    /// Files to remove before exiting.
    cleanup: Vec<CString>,
}

/// The state of the guard in force, or null.
static STATE: AtomicPtr<GuardState> = AtomicPtr::new(std::ptr::null_mut());
/// Guards are used one at a time.
static GUARD_LOCK: Mutex<()> = Mutex::new(());

/// While alive, makes a `SIGBUS` in one of its address ranges an error exit.
struct SigbusGuard {
    state: *mut GuardState,
    _lock: std::sync::MutexGuard<'static, ()>,
}

// SAFETY: `state` is only dereferenced by the signal handler and freed by `drop`; shared
// references to the guard give no access to it.
unsafe impl Sync for SigbusGuard {}

impl SigbusGuard {
    fn new(ranges: Vec<(usize, usize, Vec<u8>)>, cleanup: &[PathBuf]) -> SigbusGuard {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            // SAFETY: installs a handler that only calls async-signal-safe functions.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigbus as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
        });
        let _lock = GUARD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let cleanup = cleanup
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect();
        let state = Box::into_raw(Box::new(GuardState { ranges, cleanup }));
        STATE.store(state, Ordering::Release);
        SigbusGuard { state, _lock }
    }
}

impl Drop for SigbusGuard {
    fn drop(&mut self) {
        STATE.store(std::ptr::null_mut(), Ordering::Release);
        // SAFETY: allocated by `new`; the handler no longer sees it. A handler that loaded the
        // pointer before the store above exits the process without returning.
        drop(unsafe { Box::from_raw(self.state) });
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: async-signal-safe calls only (write, unlink, _exit, signal); the state is alive
    // while it is published.
    unsafe {
        let state = STATE.load(Ordering::Acquire);
        let addr = (*info).si_addr() as usize;
        if let Some(state) = state.as_ref() {
            if let Some((_, _, msg)) = state.ranges.iter().find(|r| r.0 <= addr && addr < r.1) {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                for p in &state.cleanup {
                    libc::unlink(p.as_ptr());
                }
                libc::_exit(1);
            }
        }
        // Not one of ours: restore the default action; returning re-runs the faulting access.
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}
