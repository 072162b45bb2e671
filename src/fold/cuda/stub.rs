//! Stand-in for the CUDA executor in builds without the `cuda` feature, so that callers never
//! need `#[cfg]` (the pattern of candle-core's `dummy_cuda_backend`).

use crate::error::{Error, Result};
use crate::fold::Work;

/// The error of every call: this build has no CUDA support.
fn not_built() -> Error {
    Error::Cuda(
        "this ema-tool was built without CUDA support (rebuild with `--features cuda`)".into(),
    )
}

/// Always fails: this build has no CUDA support.
pub fn execute(_device: usize, _work: &Work) -> Result<()> {
    Err(not_built())
}

/// Always fails: this build has no CUDA support.
pub fn check_device(_device: usize) -> Result<()> {
    Err(not_built())
}
