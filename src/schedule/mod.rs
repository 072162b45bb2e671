//! The averaging schedules: what weight each input of a fold gets (`docs/strategies.md`).
//!
//! Every strategy is a sequence of updates `avg = lerp(avg, x, m)`, which is linear, so the
//! result is `Σ w_k x_k` with weights that depend only on the schedule and the inputs' steps.
//! The weights are computed here, in f64, once; the fold then reads every input once.
//!
//! - `mmengine`: the mmengine family and the OpenMMLab 1.x hooks;
//! - `power`: EDM2's power-function EMA, in closed form;
//! - `ecosystem`: the EMA classes of timm, diffusers, ultralytics and ema-pytorch, and `wma`;
//! - `posthoc`: the least-squares synthesis of post-hoc EMAs from power-function snapshots;
//! - [`options`]: the strategies' command-line options, each taking a list (a sweep).
//!
//! A new strategy is a variant of [`Strategy`], its options in [`options`], its weights in a
//! file of this module, and its tests there: nothing outside this module changes.

mod ecosystem;
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
    /// timm `ModelEmaV3`: decay, or its warm-up 1 − (1 + s/warmup_gamma)^−warmup_power
    /// clamped to [min_decay, decay], from update_after_step on.
    #[value(alias = "ModelEmaV3")]
    Timm,
    /// diffusers `EMAModel`: (1 + s)/(10 + s), or the warm-up 1 − (1 + s/inv_gamma)^−power,
    /// clamped to [min_decay, decay], from update_after_step on.
    #[value(alias = "EMAModel")]
    Diffusers,
    /// ultralytics / YOLOv5 `ModelEMA`: decay · (1 − exp(−u/tau)).
    #[value(alias = "ModelEMA")]
    Ultralytics,
    /// lucidrains ema-pytorch `EMA`: every update_every-th update after update_after_step,
    /// 1 − (1 + e/inv_gamma)^−power clamped to [min_decay, decay]; copies before.
    #[value(name = "ema-pytorch", alias = "EMA")]
    EmaPytorch,
    /// Weighted moving average: weights proportional to the update's index (LLM checkpoint
    /// merging).
    #[value(alias = "WMA")]
    Wma,
}

impl Strategy {
    /// The strategy's name on the command line.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

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
            Strategy::Timm => "timm.utils.ModelEmaV3",
            Strategy::Diffusers => "diffusers.training_utils.EMAModel",
            Strategy::Ultralytics => "ultralytics.utils.torch_utils.ModelEMA",
            Strategy::EmaPytorch => "ema_pytorch.EMA",
            Strategy::Wma => "WMA",
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
        !matches!(
            self,
            Strategy::Power
                | Strategy::Timm
                | Strategy::Diffusers
                | Strategy::Ultralytics
                | Strategy::EmaPytorch
                | Strategy::Wma
        )
    }

    /// Whether the strategy is one of the ecosystem's EMA classes, with a `--decay`.
    pub fn is_ecosystem_ema(self) -> bool {
        matches!(
            self,
            Strategy::Timm | Strategy::Diffusers | Strategy::Ultralytics | Strategy::EmaPytorch
        )
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
    /// The ecosystem's EMAs: the weight of the old average (timm `decay`, ema-pytorch `beta`).
    pub decay: f64,
    /// timm, diffusers `min_decay`, ema-pytorch `min_value`.
    pub min_decay: f64,
    /// timm, diffusers, ema-pytorch `update_after_step`.
    pub update_after_step: u64,
    /// ema-pytorch `update_every`.
    pub update_every: u64,
    /// timm `use_warmup`, diffusers `use_ema_warmup`.
    pub warmup: bool,
    /// diffusers, ema-pytorch `inv_gamma`; timm `warmup_gamma`.
    pub inv_gamma: f64,
    /// diffusers, ema-pytorch `power`; timm `warmup_power`.
    pub power: f64,
    /// ultralytics `tau`.
    pub tau: f64,
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
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: if strategy == Strategy::EmaPytorch {
                100
            } else {
                0
            },
            update_every: if strategy == Strategy::EmaPytorch {
                10
            } else {
                1
            },
            warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
            tau: 2000.0,
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
        if self.strategy.is_ecosystem_ema() {
            let unit = |name: &str, v: f64| {
                if (0.0..=1.0).contains(&v) {
                    Ok(())
                } else {
                    Err(Error::usage(format!("{name} must be in [0, 1], got {v}")))
                }
            };
            let positive = |name: &str, v: f64| {
                if v > 0.0 && v.is_finite() {
                    Ok(())
                } else {
                    Err(Error::usage(format!(
                        "{name} must be greater than 0, got {v}"
                    )))
                }
            };
            unit("--decay", self.decay)?;
            unit("--min-decay", self.min_decay)?;
            match self.strategy {
                Strategy::Ultralytics => positive("--tau", self.tau)?,
                Strategy::Timm => {
                    positive("--warmup-gamma", self.inv_gamma)?;
                    positive("--warmup-power", self.power)?;
                }
                _ => {
                    positive("--inv-gamma", self.inv_gamma)?;
                    positive("--power", self.power)?;
                }
            }
            if self.update_every == 0 {
                return Err(Error::usage("--update-every must be at least 1"));
            }
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
            s if s.is_ecosystem_ema() || s == Strategy::Wma => {
                // Without --per-iter, input k is passed to update k + 1.
                let updates: Vec<u64>;
                let steps = match steps {
                    Some(s) => s,
                    None => {
                        updates = (1..=n as u64).collect();
                        &updates
                    }
                };
                Ok(ecosystem::weights(self, steps))
            }
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

#[cfg(test)]
mod tests {
    use super::{Schedule, Strategy};
    use clap::ValueEnum;
    use proptest::prelude::{prop_assert, proptest};

    /// Every strategy with parameters drawn from `p` (each in [0, 1)).
    fn schedules(p: &[f64]) -> Vec<Schedule> {
        Strategy::value_variants()
            .iter()
            .map(|&strategy| {
                let mut s = Schedule::new(strategy);
                s.momentum = 0.001 + 0.99 * p[0];
                s.interval = 1 + (p[1] * 4.0) as u64;
                s.gamma = 1.0 + 200.0 * p[2];
                s.warm_up = 200.0 * p[2];
                s.total_iter = 1.0 + 3000.0 * p[2];
                s.power_gamma = 0.05 + 30.0 * p[3];
                s.decay = 1.0 - 10f64.powf(-0.5 - 4.0 * p[0]);
                s.min_decay = if p[4] < 0.3 { 0.0 } else { p[4] * s.decay };
                s.update_after_step = (p[5] * 200.0) as u64;
                s.update_every = 1 + (p[1] * 12.0) as u64;
                s.warmup = p[6] < 0.5;
                s.inv_gamma = 0.1 + 50.0 * p[3];
                s.power = 0.2 + 1.5 * p[6];
                s.tau = 1.0 + 5000.0 * p[2];
                s
            })
            .collect()
    }

    proptest! {
        /// For every strategy and any parameters, per checkpoint and per iteration, the weights
        /// are non-negative and sum to 1.
        #[test]
        fn weights_are_a_convex_combination(
            p in proptest::collection::vec(0.0f64..1.0, 7),
            first in 0u64..100,
            gaps in proptest::collection::vec(1u64..5000, 0..12),
        ) {
            let mut steps = vec![first];
            for g in gaps {
                steps.push(steps.last().unwrap() + g);
            }
            for s in schedules(&p) {
                s.validate().unwrap();
                for per_iter in [false, true] {
                    let w = s.weights(steps.len(), per_iter.then_some(&steps[..])).unwrap();
                    let sum: f64 = w.iter().sum();
                    prop_assert!((sum - 1.0).abs() < 1e-9, "{s:?} per_iter {per_iter}: sum {sum}");
                    prop_assert!(
                        w.iter().all(|&x| x >= 0.0 && x.is_finite()),
                        "{s:?} per_iter {per_iter}: {w:?}"
                    );
                }
            }
        }
    }
}
