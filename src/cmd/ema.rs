//! `ema-tool ema`: fold a series of checkpoints into an exponential moving average.

use serde_json::json;

use super::{fold, warn};
use crate::cli::EmaArgs;
use crate::error::Result;
use crate::runtime::Runtime;
use crate::schedule::{Schedule, Strategy};

/// mmengine's default momentum.
pub const DEFAULT_MOMENTUM: f64 = 0.0002;

/// Runs `ema`.
pub fn run(args: &EmaArgs, rt: &Runtime) -> Result<()> {
    let momentum = match (args.momentum, args.decay) {
        (Some(m), _) => m,
        (None, Some(d)) => 1.0 - d,
        (None, None) => DEFAULT_MOMENTUM,
    };
    let schedule = Schedule {
        strategy: args.strategy,
        momentum,
        interval: args.fold.interval,
        gamma: args.gamma,
        warm_up: args.warm_up,
        total_iter: args.total_iter,
    };
    schedule.validate()?;
    if momentum > 0.5 && args.strategy != Strategy::Swa {
        // mmengine's ExponentialMovingAverage warns the same way.
        warn(
            args.fold.out.quiet,
            &format!(
                "the value of momentum in EMA is usually a small number, which is different \
                 from the conventional notion of momentum, but got {momentum}; please make sure \
                 the value is correct (--decay takes the conventional one)"
            ),
        );
    }
    let mut params = json!({
        "strategy": args.strategy,
        "reference": args.strategy.reference_name(),
        "momentum": momentum,
        "interval": args.fold.interval,
    });
    match args.strategy {
        Strategy::Annealing => params["gamma"] = json!(args.gamma),
        Strategy::Mmcv | Strategy::LinearMomentum => params["warm_up"] = json!(args.warm_up),
        Strategy::ExpMomentum => params["total_iter"] = json!(args.total_iter),
        _ => {}
    }
    fold::run(&args.fold, &schedule, "ema", params, rt)
}
