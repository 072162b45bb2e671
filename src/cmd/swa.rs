//! `ema-tool swa`: fold a series of checkpoints into a stochastic weight average.

use super::fold;
use crate::cli::SwaArgs;
use crate::error::Result;
use crate::runtime::Runtime;

/// Runs `swa`.
pub fn run(args: &SwaArgs, rt: &Runtime) -> Result<()> {
    fold::run(&args.fold, &args.schedule.expand()?, "swa", rt)
}
