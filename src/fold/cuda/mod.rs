//! The CUDA executor: fold jobs stream through pinned staging buffers into fused kernels, whose
//! PTX is embedded in the binary and compiled by the driver; copy jobs run on the CPU path.
//!
//! - `device`: the driver, the device and the kernels (`kernels.ptx`);
//! - `memory`: the pinned and device buffers and the events that order their use;
//! - `pipeline`: the threads and streams that move every batch through them.
//!
//! cudarc loads `libcuda` only when first used (its `dynamic-loading` feature; its `nvrtc`
//! feature is there for the `Ptx` type of `load_module`, and never loads `libnvrtc`),
//! so this module builds without a CUDA toolkit, the binary starts on machines without CUDA,
//! and every failure to find or use the device is an [`Error::Cuda`], never a panic.
//!
//! The pipeline, over the batches that `fold::packing` plans (a piece is one input of one
//! batch: its segment table and raw bytes):
//!
//! ```text
//! producer thread   reads piece p into pinned slot p % SLOTS (positioned reads, in parallel)
//! h2d stream        copies the slot to device slot p % SLOTS
//! compute stream    ema_accumulate on it (into every output's accumulators); after a
//!                   batch's last input, ema_encode for each output
//! d2h stream        copies the encoded batch to one of two pinned output buffers
//! issuing thread    queues all of the above, without waiting on the device
//! writer thread     waits for each batch's output and writes it to the sink
//! ```
//!
//! Events order the streams: a copy into a device slot waits for the kernels that read its
//! previous piece, the kernels wait for their copy, the producer refills a pinned slot once its
//! copy is done, and an output buffer is reused once the writer has written it out. Reading,
//! copies, kernels and writing thus overlap, and only a full pipeline makes a thread wait, so
//! the throughput is that of the slowest of reading the inputs and the host-to-device link.

mod device;
mod memory;
mod pipeline;

use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;

use cudarc::driver::DriverError;

use super::{cpu, Job, Kind, Work};
use crate::error::{Error, Result};
use device::Gpu;

/// Pieces in flight: pinned staging buffers, and as many device input buffers.
pub(super) const SLOTS: usize = 4;

/// Checks that device `device` can be used: driver, device. Takes milliseconds.
pub fn check_device(device: usize) -> Result<()> {
    guarded(|| Gpu::open(device).map(drop))
}

/// Runs the fold jobs of `work` on device `device` and its copy jobs on the CPU.
pub fn execute(device: usize, work: &Work) -> Result<()> {
    let (copies, folds): (Vec<Job>, Vec<Job>) = work
        .jobs
        .iter()
        .cloned()
        .partition(|j| matches!(j.kind, Kind::Copy(_)));
    if !copies.is_empty() {
        cpu::execute(work, &copies)?;
    }
    if folds.is_empty() {
        return Ok(());
    }
    guarded(|| pipeline::fold(&Gpu::open(device)?, work, &folds))
}

/// Runs `f`, turning a panic into an error: cudarc panics where a library or one of its
/// symbols is missing, and the contract is one line on stderr and exit status 1. The error is
/// the first panic's: a panic in one of the pipeline's scoped threads makes `thread::scope`
/// panic again ("a scoped thread panicked"), which says nothing.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    static FIRST: Mutex<Option<String>> = Mutex::new(None);
    fn first() -> std::sync::MutexGuard<'static, Option<String>> {
        FIRST.lock().unwrap_or_else(|e| e.into_inner())
    }
    *first() = None;
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        // A fault of ours says where; a library's own messages say enough.
        let text = match info.location().filter(|l| l.file().starts_with("src/")) {
            Some(l) => format!("internal error: {msg} (at {}:{})", l.file(), l.line()),
            None => format!("a CUDA library call failed: {msg}"),
        };
        first().get_or_insert(text);
    }));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(previous);
    result.unwrap_or_else(|_| {
        let msg = first().take();
        Err(Error::Cuda(msg.unwrap_or_else(|| "unknown panic".into())))
    })
}

/// `what: <the driver's description> (<error name>)`.
pub(super) fn describe(what: &str, e: DriverError) -> Error {
    let text = |r: std::result::Result<&std::ffi::CStr, DriverError>| {
        r.ok().map(|s| s.to_string_lossy().into_owned())
    };
    let name = text(e.error_name()).unwrap_or_else(|| format!("{:?}", e.0));
    let desc = text(e.error_string()).unwrap_or_default();
    Error::Cuda(format!("{what}: {desc} ({name})"))
}

/// Maps driver errors to [`Error::Cuda`] with what was being done.
pub(super) trait Describe<T> {
    fn or_cuda(self, what: &str) -> Result<T>;
}

impl<T> Describe<T> for std::result::Result<T, DriverError> {
    fn or_cuda(self, what: &str) -> Result<T> {
        self.map_err(|e| describe(what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_panic_of_a_scoped_thread_is_the_error() {
        let err = guarded(|| -> Result<()> {
            std::thread::scope(|s| {
                s.spawn(|| panic!("the reading thread broke"));
            });
            Ok(())
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("the reading thread broke"), "{msg}");
        assert!(msg.contains("src/fold/cuda/mod.rs"), "{msg}");
        assert!(!msg.contains("a scoped thread panicked"), "{msg}");
        // The next call starts afresh.
        let err = guarded(|| -> Result<()> { panic!("another") }).unwrap_err();
        assert!(err.to_string().contains("another"), "{err}");
    }
}
