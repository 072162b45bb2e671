//! The averaging schedules: what weight each input of a fold gets (`docs/strategies.md`).
//!
//! Every strategy is a sequence of updates `avg = lerp(avg, x, m)`, which is linear, so the
//! result is `Σ w_k x_k` with weights that depend only on the schedule and the inputs' steps.
//! The weights are computed here, in f64, once; the fold then reads every input once.
//!
//! - `mmengine`: the mmengine family and the OpenMMLab 1.x hooks;
//! - `power`: EDM2's power-function EMA, in closed form;
//! - `posthoc`: the least-squares synthesis of post-hoc EMAs from power-function snapshots;
//! - [`options`]: the strategies' command-line options, each taking a list (a sweep).
//!
//! A new strategy is a variant of [`Strategy`], its options in [`options`], its weights in a
//! file of this module, and its tests there: nothing outside this module changes.

mod mmengine;
pub mod options;
pub mod posthoc;
mod power;

use serde::Serialize;

use crate::error::{Error, Result};
pub use power::{gamma_to_sigma_rel, sigma_rel_to_gamma};

/// A weighting strategy (`docs/strategies.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// mmengine `ExponentialMovingAverage`: m_k = momentum.
    #[value(alias = "ExponentialMovingAverage")]
    Exponential,
    /// mmengine `MomentumAnnealingEMA`: m_k = max(momentum, gamma / (gamma + k)).
    #[value(alias = "MomentumAnnealingEMA")]
    Annealing,
    /// mmcv `EMAHook`: updates when it % interval == 0, m = min(momentum^interval,
    /// (1+it)/(warm_up+it)).
    #[value(alias = "EMAHook")]
    Mmcv,
    /// mmdet `ExpMomentumEMAHook`: updates when (it+1) % interval == 0,
    /// m = (1 − momentum)·exp(−(1+it)/total_iter) + momentum.
    #[value(alias = "ExpMomentumEMAHook")]
    ExpMomentum,
    /// mmdet `LinearMomentumEMAHook`: updates when (it+1) % interval == 0,
    /// m = min(momentum^interval, (1+it)/(warm_up+it)).
    #[value(alias = "LinearMomentumEMAHook")]
    LinearMomentum,
    /// mmengine `StochasticWeightAverage`: m_k = 1 / (k // interval + 1).
    #[value(alias = "StochasticWeightAverage")]
    Swa,
    /// EDM2 power-function EMA (`PowerFunctionEMA`, batch 1): decay (1 − 1/u)^(γ+1) at update
    /// u; γ from --sigma-rel or --power-gamma.
    #[value(alias = "PowerFunctionEMA")]
    Power,
}

impl Strategy {
    /// The class this strategy reproduces.
    pub fn reference_name(self) -> &'static str {
        match self {
            Strategy::Exponential => "ExponentialMovingAverage",
            Strategy::Annealing => "MomentumAnnealingEMA",
            Strategy::Mmcv => "EMAHook",
            Strategy::ExpMomentum => "ExpMomentumEMAHook",
            Strategy::LinearMomentum => "LinearMomentumEMAHook",
            Strategy::Swa => "StochasticWeightAverage",
            Strategy::Power => "PowerFunctionEMA",
        }
    }

    /// Whether the strategy is one of the 1.x hooks, whose x_k is the model after training
    /// iteration `it = k − 1`.
    pub fn is_hook(self) -> bool {
        matches!(
            self,
            Strategy::Mmcv | Strategy::ExpMomentum | Strategy::LinearMomentum
        )
    }

    /// Whether the strategy follows the conventions of the mmengine family and the hooks
    /// (`docs/strategies.md#the-mmengine-family`) rather than those of the ecosystem's
    /// strategies (`docs/strategies.md#time`).
    pub fn is_mmengine_family(self) -> bool {
        !matches!(self, Strategy::Power)
    }
}

/// A strategy with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub strategy: Strategy,
    /// Weight of the newer model in one update (mmengine's convention): the mmengine family.
    pub momentum: f64,
    pub interval: u64,
    /// `annealing`.
    pub gamma: f64,
    /// `mmcv`, `linear-momentum`.
    pub warm_up: f64,
    /// `exp-momentum`.
    pub total_iter: f64,
    /// `power`: the exponent γ of the power function.
    pub power_gamma: f64,
}

/// Largest number of schedule evaluations a `--per-iter` plan may take.
pub const MAX_ITERATIONS: u64 = 1 << 32;

impl Schedule {
    /// `strategy` with the defaults of its library.
    pub fn new(strategy: Strategy) -> Schedule {
        Schedule {
            strategy,
            momentum: options::DEFAULT_MOMENTUM,
            interval: 1,
            gamma: 100.0,
            warm_up: 100.0,
            total_iter: 2000.0,
            power_gamma: f64::NAN,
        }
    }

    /// Checks parameter ranges; errors are usage errors.
    pub fn validate(&self) -> Result<()> {
        if self.interval == 0 {
            return Err(Error::usage("--interval must be at least 1"));
        }
        let family = self.strategy.is_mmengine_family();
        if family && self.strategy != Strategy::Swa && !(self.momentum > 0.0 && self.momentum < 1.0)
        {
            return Err(Error::usage(format!(
                "momentum must be in (0, 1), got {} (with --decay D, momentum is 1 - D)",
                self.momentum
            )));
        }
        if self.strategy == Strategy::Annealing && (self.gamma.is_nan() || self.gamma <= 0.0) {
            return Err(Error::usage(format!(
                "--gamma must be greater than 0, got {}",
                self.gamma
            )));
        }
        if matches!(self.strategy, Strategy::Mmcv | Strategy::LinearMomentum)
            && (self.warm_up.is_nan() || self.warm_up < 0.0)
        {
            return Err(Error::usage(format!(
                "--warm-up must be at least 0, got {}",
                self.warm_up
            )));
        }
        if self.strategy == Strategy::ExpMomentum
            && (self.total_iter.is_nan() || self.total_iter <= 0.0)
        {
            return Err(Error::usage(format!(
                "--total-iter must be greater than 0, got {}",
                self.total_iter
            )));
        }
        if self.strategy == Strategy::Power
            && !(self.power_gamma > 0.0 && self.power_gamma.is_finite())
        {
            return Err(Error::usage(format!(
                "the power function's exponent must be greater than 0, got {} (--power-gamma G, \
                 or --sigma-rel S with 0 < S < 0.2887)",
                self.power_gamma
            )));
        }
        Ok(())
    }

    /// Per-input weights of a fold over `n` inputs, in fold order, summing to 1.
    ///
    /// `steps = None`: one update per input. With the inputs' steps (`--per-iter`), the
    /// schedule runs per training iteration, each input holding over the iterations since the
    /// previous one (`docs/strategies.md`).
    pub fn weights(&self, n: usize, steps: Option<&[u64]>) -> Result<Vec<f64>> {
        if let Some(s) = steps {
            check_steps(s)?;
            assert_eq!(s.len(), n);
        }
        match self.strategy {
            Strategy::Power => Ok(power::weights(self.power_gamma, n, steps)),
            _ => self.mmengine_weights(n, steps),
        }
    }
}

/// Steps must increase strictly and span at most [`MAX_ITERATIONS`].
fn check_steps(steps: &[u64]) -> Result<()> {
    for w in steps.windows(2) {
        if w[1] <= w[0] {
            return Err(Error::usage(format!(
                "--per-iter needs strictly increasing steps, got {} then {}",
                w[0], w[1]
            )));
        }
    }
    if let (Some(first), Some(last)) = (steps.first(), steps.last()) {
        if last - first > MAX_ITERATIONS {
            return Err(Error::usage(format!(
                "--per-iter over {} iterations is more than the {MAX_ITERATIONS} supported",
                last - first
            )));
        }
    }
    Ok(())
}
