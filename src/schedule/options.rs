//! The strategies' command-line options. Every numeric option takes a comma-separated list,
//! and several lists give their product: one output per combination, all from one read of the
//! inputs (`docs/strategies.md#sweeps`).

use std::str::FromStr;

use clap::Args;
use serde_json::{json, Value};

use super::{sigma_rel_to_gamma, Schedule, Strategy};
use crate::error::{Error, Result};

/// mmengine's default momentum.
pub const DEFAULT_MOMENTUM: f64 = 0.0002;

/// A number as it was typed: its text names the outputs of a sweep (`ema-{decay}.safetensors`
/// with `--decay 0.999` writes `ema-0.999.safetensors`).
#[derive(Clone, Debug, PartialEq)]
pub struct Typed {
    pub text: String,
    pub value: f64,
}

impl Typed {
    fn of(value: f64) -> Typed {
        Typed {
            text: value.to_string(),
            value,
        }
    }
}

impl FromStr for Typed {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Typed, String> {
        let text = s.trim();
        let value: f64 = text.parse().map_err(|_| format!("`{s}` is not a number"))?;
        Ok(Typed {
            text: text.to_string(),
            value,
        })
    }
}

/// The options of `ema`'s strategies.
#[derive(Debug, Args, Clone)]
pub struct EmaOptions {
    /// Averaging strategy; the libraries' class names are accepted too.
    #[arg(long, short = 's', value_enum, default_value_t = Strategy::Exponential)]
    pub strategy: Strategy,

    /// Weight of the newer checkpoint in each update (mmengine convention) [default: 0.0002].
    /// A comma-separated list sweeps, as every numeric option does.
    #[arg(
        long,
        short = 'm',
        conflicts_with = "decay",
        value_name = "M",
        value_delimiter = ','
    )]
    pub momentum: Vec<Typed>,

    /// Decay of the average (timm/torch convention): momentum = 1 - DECAY.
    #[arg(long, value_name = "D", value_delimiter = ',')]
    pub decay: Vec<Typed>,

    /// Update every INTERVAL-th step (mmengine/mmcv `interval`).
    #[arg(long, default_value = "1", value_name = "N", value_delimiter = ',')]
    pub interval: Vec<Typed>,

    /// `annealing`: momentum = max(momentum, gamma / (gamma + k)).
    #[arg(long, default_value = "100", value_name = "G", value_delimiter = ',')]
    pub gamma: Vec<Typed>,

    /// `mmcv`, `linear-momentum`: warm-up iterations of the momentum.
    #[arg(long, default_value = "100", value_name = "N", value_delimiter = ',')]
    pub warm_up: Vec<Typed>,

    /// `exp-momentum`: iterations over which the momentum decays.
    #[arg(long, default_value = "2000", value_name = "N", value_delimiter = ',')]
    pub total_iter: Vec<Typed>,

    /// `power`: relative standard deviation of the power-function profile (EDM2's `std`),
    /// 0 < S < 0.2887; its exponent γ is the largest root of γ³ + 7γ² + (16 − S⁻²)γ + (12 −
    /// S⁻²).
    #[arg(
        long,
        value_name = "S",
        value_delimiter = ',',
        conflicts_with = "power_gamma"
    )]
    pub sigma_rel: Vec<Typed>,

    /// `power`: exponent γ of the power function (EDM2's `exp`), instead of --sigma-rel.
    #[arg(long, value_name = "G", value_delimiter = ',')]
    pub power_gamma: Vec<Typed>,

    /// `timm`, `diffusers`, `ema-pytorch`: the smallest decay (ema-pytorch `min_value`)
    /// [default: 0].
    #[arg(long, value_name = "D", value_delimiter = ',')]
    pub min_decay: Vec<Typed>,

    /// `timm`, `diffusers`, `ema-pytorch`: updates before the average starts (it copies the
    /// model until then) [default: 0; ema-pytorch: 100].
    #[arg(long, value_name = "N", value_delimiter = ',')]
    pub update_after_step: Vec<Typed>,

    /// `ema-pytorch`: update the average every N-th update [default: 10].
    #[arg(long, value_name = "N", value_delimiter = ',')]
    pub update_every: Vec<Typed>,

    /// `timm` (`use_warmup`), `diffusers` (`use_ema_warmup`): warm the decay up as
    /// 1 − (1 + s/gamma)^−power.
    #[arg(long)]
    pub warmup: bool,

    /// `timm`: the warm-up's gamma [default: 1].
    #[arg(long, value_name = "G", value_delimiter = ',')]
    pub warmup_gamma: Vec<Typed>,

    /// `timm`: the warm-up's power [default: 2/3].
    #[arg(long, value_name = "P", value_delimiter = ',')]
    pub warmup_power: Vec<Typed>,

    /// `diffusers`, `ema-pytorch`: the warm-up's inverse gamma [default: 1].
    #[arg(long, value_name = "G", value_delimiter = ',')]
    pub inv_gamma: Vec<Typed>,

    /// `diffusers`, `ema-pytorch`: the warm-up's power [default: 2/3].
    #[arg(long, value_name = "P", value_delimiter = ',')]
    pub power: Vec<Typed>,

    /// `ultralytics`: the decay's ramp, decay · (1 − exp(−u/tau)) [default: 2000].
    #[arg(long, value_name = "T", value_delimiter = ',')]
    pub tau: Vec<Typed>,
}

/// The options of `swa`.
#[derive(Debug, Args, Clone)]
pub struct SwaOptions {
    /// Average every INTERVAL-th checkpoint (mmengine `interval`).
    #[arg(long, default_value = "1", value_name = "N", value_delimiter = ',')]
    pub interval: Vec<Typed>,
}

/// One output of a sweep (or the only output): its schedule, its options' values as typed
/// (placeholder name, text), and its parameters as recorded in the output.
#[derive(Clone, Debug)]
pub struct Swept {
    pub schedule: Schedule,
    /// `(name, text)` of every option the strategy uses, as typed or by default.
    pub values: Vec<(String, String)>,
    /// The strategy and its parameters, as `--json` and the `ema_tool` metadata record them.
    pub params: Value,
}

/// One axis of a sweep: the placeholder name, the option, its values, whether the strategy
/// uses it, and how a value sets the schedule.
struct Axis<'a> {
    name: &'static str,
    flag: &'static str,
    values: &'a [Typed],
    used: bool,
    set: fn(&mut Schedule, f64) -> Result<()>,
}

fn whole(flag: &str, v: f64) -> Result<u64> {
    if v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 {
        Ok(v as u64)
    } else {
        Err(Error::usage(format!(
            "{flag} must be a whole number, got {v}"
        )))
    }
}

/// A schedule and its options' `(name, text)`.
type Combination = (Schedule, Vec<(String, String)>);

/// The product of `axes`, last axis fastest: every combination's schedule and values.
fn product(base: Schedule, axes: &[Axis]) -> Result<Vec<Combination>> {
    let mut out = vec![(base, Vec::new())];
    for a in axes {
        if a.values.len() > 1 && !a.used {
            return Err(Error::usage(format!(
                "{} takes several values only with a strategy that uses it ({} does not)",
                a.flag,
                base.strategy.reference_name()
            )));
        }
        // An option not given and without a default (one of two alternatives) is no axis.
        if !a.used || a.values.is_empty() {
            continue;
        }
        let mut next = Vec::with_capacity(out.len() * a.values.len());
        for (s, vals) in &out {
            for v in a.values {
                let mut s = *s;
                (a.set)(&mut s, v.value)?;
                let mut vals = vals.clone();
                vals.push((a.name.to_string(), v.text.clone()));
                next.push((s, vals));
            }
        }
        out = next;
    }
    Ok(out)
}

impl EmaOptions {
    /// Every output the options ask for: one, or the product of the lists given.
    pub fn expand(&self) -> Result<Vec<Swept>> {
        if self.strategy.is_ecosystem_ema() || self.strategy == Strategy::Wma {
            return self.expand_ecosystem();
        }
        self.refuse_ecosystem_options()?;
        let st = self.strategy;
        let family = st.is_mmengine_family();
        let power = st == Strategy::Power;
        let default_momentum = [Typed::of(DEFAULT_MOMENTUM)];
        let (name, flag, momenta, from_decay) = if !self.decay.is_empty() {
            ("decay", "--decay", &self.decay[..], true)
        } else if !self.momentum.is_empty() {
            ("momentum", "--momentum", &self.momentum[..], false)
        } else {
            ("momentum", "--momentum", &default_momentum[..], false)
        };
        let profile_given = !(self.sigma_rel.is_empty() && self.power_gamma.is_empty());
        if !power && profile_given {
            return Err(Error::usage(
                "--sigma-rel and --power-gamma apply to --strategy power",
            ));
        }
        if power && !profile_given {
            return Err(Error::usage(
                "--strategy power needs --sigma-rel S or --power-gamma G",
            ));
        }
        let uses_momentum = family && st != Strategy::Swa;
        let axes = [
            Axis {
                name,
                flag,
                values: momenta,
                used: uses_momentum,
                set: if from_decay {
                    |s, v| {
                        s.momentum = 1.0 - v;
                        Ok(())
                    }
                } else {
                    |s, v| {
                        s.momentum = v;
                        Ok(())
                    }
                },
            },
            Axis {
                name: "interval",
                flag: "--interval",
                values: &self.interval,
                used: family,
                set: |s, v| {
                    s.interval = whole("--interval", v)?;
                    Ok(())
                },
            },
            Axis {
                name: "gamma",
                flag: "--gamma",
                values: &self.gamma,
                used: st == Strategy::Annealing,
                set: |s, v| {
                    s.gamma = v;
                    Ok(())
                },
            },
            Axis {
                name: "warm_up",
                flag: "--warm-up",
                values: &self.warm_up,
                used: matches!(st, Strategy::Mmcv | Strategy::LinearMomentum),
                set: |s, v| {
                    s.warm_up = v;
                    Ok(())
                },
            },
            Axis {
                name: "total_iter",
                flag: "--total-iter",
                values: &self.total_iter,
                used: st == Strategy::ExpMomentum,
                set: |s, v| {
                    s.total_iter = v;
                    Ok(())
                },
            },
            Axis {
                name: "sigma_rel",
                flag: "--sigma-rel",
                values: &self.sigma_rel,
                used: power,
                set: |s, v| {
                    s.power_gamma = sigma_rel_to_gamma(v).ok_or_else(|| {
                        Error::usage(format!(
                            "--sigma-rel must be in (0, 0.2887) (1/√12), got {v}"
                        ))
                    })?;
                    Ok(())
                },
            },
            Axis {
                name: "power_gamma",
                flag: "--power-gamma",
                values: &self.power_gamma,
                used: power,
                set: |s, v| {
                    s.power_gamma = v;
                    Ok(())
                },
            },
        ];
        // The interval and the momentum of the mmengine family are recorded even where unused
        // (`ema --strategy swa` records its momentum), as before sweeps existed.
        let mut base = Schedule::new(st);
        if !uses_momentum && family {
            base.momentum = if from_decay {
                1.0 - momenta[0].value
            } else {
                momenta[0].value
            };
        }
        product(base, &axes)?
            .into_iter()
            .map(|(schedule, values)| {
                schedule.validate()?;
                let sigma_rel = self
                    .sigma_rel
                    .iter()
                    .find(|t| sigma_rel_to_gamma(t.value) == Some(schedule.power_gamma));
                Ok(Swept {
                    params: ema_params(&schedule, sigma_rel.map(|t| t.value)),
                    schedule,
                    values,
                })
            })
            .collect()
    }
}

impl EmaOptions {
    /// The options of the ecosystem's EMAs given, by flag.
    fn ecosystem_options(&self) -> [(&'static str, bool); 9] {
        [
            ("--min-decay", !self.min_decay.is_empty()),
            ("--update-after-step", !self.update_after_step.is_empty()),
            ("--update-every", !self.update_every.is_empty()),
            ("--warmup", self.warmup),
            ("--warmup-gamma", !self.warmup_gamma.is_empty()),
            ("--warmup-power", !self.warmup_power.is_empty()),
            ("--inv-gamma", !self.inv_gamma.is_empty()),
            ("--power", !self.power.is_empty()),
            ("--tau", !self.tau.is_empty()),
        ]
    }

    /// An option of the ecosystem's EMAs given to a strategy without it is a usage error.
    fn refuse_ecosystem_options(&self) -> Result<()> {
        let used: &[&str] = match self.strategy {
            Strategy::Timm => &[
                "--min-decay",
                "--update-after-step",
                "--warmup",
                "--warmup-gamma",
                "--warmup-power",
            ],
            Strategy::Diffusers => &[
                "--min-decay",
                "--update-after-step",
                "--warmup",
                "--inv-gamma",
                "--power",
            ],
            Strategy::Ultralytics => &["--tau"],
            Strategy::EmaPytorch => &[
                "--min-decay",
                "--update-after-step",
                "--update-every",
                "--inv-gamma",
                "--power",
            ],
            _ => &[],
        };
        for (flag, given) in self.ecosystem_options() {
            if given && !used.contains(&flag) {
                return Err(Error::usage(format!(
                    "{flag} is not an option of --strategy {}",
                    self.strategy.name()
                )));
            }
        }
        Ok(())
    }

    /// [`EmaOptions::expand`] for the ecosystem's EMAs and `wma`: their options, with their
    /// libraries' defaults.
    fn expand_ecosystem(&self) -> Result<Vec<Swept>> {
        self.refuse_ecosystem_options()?;
        let st = self.strategy;
        if !self.sigma_rel.is_empty() || !self.power_gamma.is_empty() {
            return Err(Error::usage(
                "--sigma-rel and --power-gamma apply to --strategy power",
            ));
        }
        let base = Schedule::new(st);
        let or = |given: &[Typed], default: f64| -> Vec<Typed> {
            if given.is_empty() {
                vec![Typed::of(default)]
            } else {
                given.to_vec()
            }
        };
        // --decay, or --momentum as 1 − decay.
        let (name, flag, decays, from_momentum) = if !self.momentum.is_empty() {
            ("momentum", "--momentum", self.momentum.clone(), true)
        } else {
            ("decay", "--decay", or(&self.decay, base.decay), false)
        };
        let lists = [
            or(&self.min_decay, base.min_decay),
            or(&self.update_after_step, base.update_after_step as f64),
            or(&self.update_every, base.update_every as f64),
            or(&self.warmup_gamma, base.inv_gamma),
            or(&self.warmup_power, base.power),
            or(&self.inv_gamma, base.inv_gamma),
            or(&self.power, base.power),
            or(&self.tau, base.tau),
        ];
        let is = |s: &[Strategy]| s.contains(&st);
        use Strategy::{Diffusers, EmaPytorch, Timm, Ultralytics};
        let axes = [
            Axis {
                name,
                flag,
                values: &decays,
                used: st != Strategy::Wma,
                set: if from_momentum {
                    |s, v| {
                        s.decay = 1.0 - v;
                        Ok(())
                    }
                } else {
                    |s, v| {
                        s.decay = v;
                        Ok(())
                    }
                },
            },
            Axis {
                name: "min_decay",
                flag: "--min-decay",
                values: &lists[0],
                used: is(&[Timm, Diffusers, EmaPytorch]),
                set: |s, v| {
                    s.min_decay = v;
                    Ok(())
                },
            },
            Axis {
                name: "update_after_step",
                flag: "--update-after-step",
                values: &lists[1],
                used: is(&[Timm, Diffusers, EmaPytorch]),
                set: |s, v| {
                    s.update_after_step = whole("--update-after-step", v)?;
                    Ok(())
                },
            },
            Axis {
                name: "update_every",
                flag: "--update-every",
                values: &lists[2],
                used: is(&[EmaPytorch]),
                set: |s, v| {
                    s.update_every = whole("--update-every", v)?;
                    Ok(())
                },
            },
            Axis {
                name: "warmup_gamma",
                flag: "--warmup-gamma",
                values: &lists[3],
                used: is(&[Timm]) && self.warmup,
                set: |s, v| {
                    s.inv_gamma = v;
                    Ok(())
                },
            },
            Axis {
                name: "warmup_power",
                flag: "--warmup-power",
                values: &lists[4],
                used: is(&[Timm]) && self.warmup,
                set: |s, v| {
                    s.power = v;
                    Ok(())
                },
            },
            Axis {
                name: "inv_gamma",
                flag: "--inv-gamma",
                values: &lists[5],
                used: is(&[EmaPytorch]) || (is(&[Diffusers]) && self.warmup),
                set: |s, v| {
                    s.inv_gamma = v;
                    Ok(())
                },
            },
            Axis {
                name: "power",
                flag: "--power",
                values: &lists[6],
                used: is(&[EmaPytorch]) || (is(&[Diffusers]) && self.warmup),
                set: |s, v| {
                    s.power = v;
                    Ok(())
                },
            },
            Axis {
                name: "tau",
                flag: "--tau",
                values: &lists[7],
                used: is(&[Ultralytics]),
                set: |s, v| {
                    s.tau = v;
                    Ok(())
                },
            },
        ];
        let base = Schedule {
            warmup: self.warmup,
            ..base
        };
        product(base, &axes)?
            .into_iter()
            .map(|(schedule, values)| {
                schedule.validate()?;
                Ok(Swept {
                    params: ecosystem_params(&schedule),
                    schedule,
                    values,
                })
            })
            .collect()
    }
}

/// The record of an ecosystem EMA's parameters: its library's names and values.
fn ecosystem_params(s: &Schedule) -> Value {
    let mut p = json!({
        "strategy": s.strategy,
        "reference": s.strategy.reference_name(),
    });
    let mut set = |k: &str, v: Value| p[k] = v;
    match s.strategy {
        Strategy::Timm => {
            set("decay", json!(s.decay));
            set("min_decay", json!(s.min_decay));
            set("update_after_step", json!(s.update_after_step));
            set("use_warmup", json!(s.warmup));
            if s.warmup {
                set("warmup_gamma", json!(s.inv_gamma));
                set("warmup_power", json!(s.power));
            }
        }
        Strategy::Diffusers => {
            set("decay", json!(s.decay));
            set("min_decay", json!(s.min_decay));
            set("update_after_step", json!(s.update_after_step));
            set("use_ema_warmup", json!(s.warmup));
            if s.warmup {
                set("inv_gamma", json!(s.inv_gamma));
                set("power", json!(s.power));
            }
        }
        Strategy::Ultralytics => {
            set("decay", json!(s.decay));
            set("tau", json!(s.tau));
        }
        Strategy::EmaPytorch => {
            set("beta", json!(s.decay));
            set("update_after_step", json!(s.update_after_step));
            set("update_every", json!(s.update_every));
            set("inv_gamma", json!(s.inv_gamma));
            set("power", json!(s.power));
            set("min_value", json!(s.min_decay));
        }
        _ => {}
    }
    p
}

/// The record of a schedule's parameters, as before sweeps existed for the mmengine family.
fn ema_params(s: &Schedule, sigma_rel: Option<f64>) -> Value {
    if s.strategy == Strategy::Power {
        let mut p = json!({
            "strategy": s.strategy,
            "reference": s.strategy.reference_name(),
            "power_gamma": s.power_gamma,
        });
        if let Some(v) = sigma_rel {
            p["sigma_rel"] = json!(v);
        }
        return p;
    }
    let mut p = json!({
        "strategy": s.strategy,
        "reference": s.strategy.reference_name(),
        "momentum": s.momentum,
        "interval": s.interval,
    });
    match s.strategy {
        Strategy::Annealing => p["gamma"] = json!(s.gamma),
        Strategy::Mmcv | Strategy::LinearMomentum => p["warm_up"] = json!(s.warm_up),
        Strategy::ExpMomentum => p["total_iter"] = json!(s.total_iter),
        _ => {}
    }
    p
}

impl SwaOptions {
    /// Every output the options ask for: one per `--interval` value.
    pub fn expand(&self) -> Result<Vec<Swept>> {
        let axes = [Axis {
            name: "interval",
            flag: "--interval",
            values: &self.interval,
            used: true,
            set: |s, v| {
                s.interval = whole("--interval", v)?;
                Ok(())
            },
        }];
        let base = Schedule {
            momentum: 0.0,
            gamma: 0.0,
            warm_up: 0.0,
            total_iter: 0.0,
            ..Schedule::new(Strategy::Swa)
        };
        product(base, &axes)?
            .into_iter()
            .map(|(schedule, values)| {
                schedule.validate()?;
                Ok(Swept {
                    params: json!({
                        "strategy": "swa",
                        "reference": Strategy::Swa.reference_name(),
                        "interval": schedule.interval,
                    }),
                    schedule,
                    values,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(list: &str) -> Vec<Typed> {
        list.split(',').map(|s| s.parse().unwrap()).collect()
    }

    fn ema(strategy: Strategy) -> EmaOptions {
        EmaOptions {
            strategy,
            momentum: Vec::new(),
            decay: Vec::new(),
            interval: typed("1"),
            gamma: typed("100"),
            warm_up: typed("100"),
            total_iter: typed("2000"),
            sigma_rel: Vec::new(),
            power_gamma: Vec::new(),
            min_decay: Vec::new(),
            update_after_step: Vec::new(),
            update_every: Vec::new(),
            warmup: false,
            warmup_gamma: Vec::new(),
            warmup_power: Vec::new(),
            inv_gamma: Vec::new(),
            power: Vec::new(),
            tau: Vec::new(),
        }
    }

    #[test]
    fn one_value_each_is_one_output_as_before() {
        let mut o = ema(Strategy::Annealing);
        o.decay = typed("0.9");
        let s = o.expand().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].values,
            vec![
                ("decay".into(), "0.9".into()),
                ("interval".into(), "1".into()),
                ("gamma".into(), "100".into())
            ]
        );
        assert_eq!(s[0].schedule.momentum, 1.0 - 0.9);
        assert_eq!(
            s[0].params,
            json!({"strategy": "annealing", "reference": "MomentumAnnealingEMA",
                   "momentum": 1.0 - 0.9, "interval": 1, "gamma": 100.0})
        );
    }

    #[test]
    fn lists_give_their_product_with_the_values_as_typed() {
        let mut o = ema(Strategy::Annealing);
        o.decay = typed("0.999,0.9990,0.9");
        o.gamma = typed("3,1e2");
        let s = o.expand().unwrap();
        assert_eq!(s.len(), 6);
        let names: Vec<_> = s.iter().map(|x| x.values.clone()).collect();
        assert_eq!(
            names[1],
            vec![
                ("decay".into(), "0.999".into()),
                ("interval".into(), "1".into()),
                ("gamma".into(), "1e2".into())
            ]
        );
        assert_eq!(names[2][0], ("decay".into(), "0.9990".into()));
        assert_eq!(s[5].schedule.gamma, 100.0);
    }

    #[test]
    fn a_list_of_an_option_the_strategy_ignores_is_refused() {
        let mut o = ema(Strategy::Exponential);
        o.gamma = typed("1,2");
        let e = o.expand().unwrap_err().to_string();
        assert!(e.contains("--gamma takes several values"), "{e}");
        let mut o = ema(Strategy::Exponential);
        o.sigma_rel = typed("0.1");
        assert!(o.expand().is_err());
        assert!(ema(Strategy::Power).expand().is_err());
    }

    #[test]
    fn power_takes_sigma_rel_or_gamma() {
        let mut o = ema(Strategy::Power);
        o.sigma_rel = typed("0.05,0.28");
        let s = o.expand().unwrap();
        assert_eq!(s.len(), 2);
        assert!((s[0].schedule.power_gamma - 16.972198602303447).abs() < 1e-11);
        assert_eq!(s[1].params["sigma_rel"], json!(0.28));
        o.sigma_rel = typed("0.3");
        assert!(o.expand().is_err());
        let mut o = ema(Strategy::Power);
        o.power_gamma = typed("6.94");
        assert_eq!(o.expand().unwrap()[0].schedule.power_gamma, 6.94);
    }

    #[test]
    fn intervals_are_whole_numbers() {
        let o = SwaOptions {
            interval: typed("1,2,3"),
        };
        assert_eq!(o.expand().unwrap().len(), 3);
        let o = SwaOptions {
            interval: typed("1.5"),
        };
        assert!(o.expand().is_err());
    }
}
