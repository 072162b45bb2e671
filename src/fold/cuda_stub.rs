//! Stand-in for the CUDA executor in builds without the `cuda` feature, so that callers never
//! need `#[cfg]` (the pattern of candle-core's `dummy_cuda_backend`).

use super::{Checks, Job, Progress, Sink};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Always fails: this build has no CUDA support.
pub fn execute(
    _device: usize,
    _ckpts: &[Checkpoint],
    _jobs: &[Job],
    _sink: &dyn Sink,
    _checks: Checks,
    _progress: &Progress,
) -> Result<()> {
    Err(Error::Cuda(
        "this ema-tool was built without CUDA support (rebuild with `--features cuda`)".into(),
    ))
}

/// Always fails: this build has no CUDA support.
pub fn check_device(_device: usize) -> Result<()> {
    execute(
        _device,
        &[],
        &[],
        &NoSink,
        Checks::default(),
        &Progress::default(),
    )
}

struct NoSink;
impl Sink for NoSink {
    fn write(&self, _: usize, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
}
