//! `ema-tool swa`: fold a series of checkpoints into a stochastic weight average.

use serde_json::json;

use super::fold;
use crate::cli::SwaArgs;
use crate::error::Result;
use crate::runtime::Runtime;
use crate::schedule::{Schedule, Strategy};

/// Runs `swa`.
pub fn run(args: &SwaArgs, rt: &Runtime) -> Result<()> {
    let schedule = Schedule {
        strategy: Strategy::Swa,
        momentum: 0.0,
        interval: args.fold.interval,
        gamma: 0.0,
        warm_up: 0.0,
        total_iter: 0.0,
    };
    let params = json!({
        "strategy": "swa",
        "reference": Strategy::Swa.reference_name(),
        "interval": args.fold.interval,
    });
    fold::run(&args.fold, &schedule, "swa", params, rt)
}
