//! `ema-tool ema`: fold a series of checkpoints into an exponential moving average, or into
//! one per combination of the values of a sweep.

use super::{fold, warn};
use crate::cli::EmaArgs;
use crate::error::Result;
use crate::runtime::Runtime;
use crate::schedule::Strategy;

/// Runs `ema`.
pub fn run(args: &EmaArgs, rt: &Runtime) -> Result<()> {
    let swept = args.schedule.expand()?;
    let mut warned: Vec<f64> = Vec::new();
    for s in &swept {
        let m = s.schedule.momentum;
        let uses_momentum =
            s.schedule.strategy.is_mmengine_family() && s.schedule.strategy != Strategy::Swa;
        if uses_momentum && m > 0.5 && !warned.contains(&m) {
            warned.push(m);
            // mmengine's ExponentialMovingAverage warns the same way.
            warn(
                args.fold.out.quiet,
                &format!(
                    "the value of momentum in EMA is usually a small number, which is different \
                     from the conventional notion of momentum, but got {m}; please make sure \
                     the value is correct (--decay takes the conventional one)"
                ),
            );
        }
    }
    fold::run(&args.fold, &swept, "ema", rt)
}
