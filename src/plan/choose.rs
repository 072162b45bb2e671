//! Choosing the inputs of `ema`, `swa` and `posthoc` (`docs/formats.md#choosing`), after they
//! are ordered: `--steps A:B`, then `--last N`, then `--best N --metric KEY [--mode max|min]`.
//! What is left is folded in the order it had; what was dropped is reported, with why.

use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;
use serde_json::{json, Value};

use crate::checkpoint::Checkpoint;
use crate::codec::convert::decode;
use crate::error::{Error, Result};

/// Which of `--best`'s values is best.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The largest values (accuracy, mAP).
    #[default]
    Max,
    /// The smallest values (loss).
    Min,
}

/// `A:B`, either end optional: the steps from A to B, both included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepRange {
    pub from: Option<u64>,
    pub to: Option<u64>,
}

impl FromStr for StepRange {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<StepRange, String> {
        let (a, b) = s.split_once(':').ok_or_else(|| {
            format!("`{s}` is not A:B (either end may be left out: 1000:, :5000)")
        })?;
        let end = |t: &str| -> std::result::Result<Option<u64>, String> {
            let t = t.trim();
            if t.is_empty() {
                return Ok(None);
            }
            t.parse()
                .map(Some)
                .map_err(|_| format!("`{t}` is not a step (a whole number)"))
        };
        let r = StepRange {
            from: end(a)?,
            to: end(b)?,
        };
        if let (Some(a), Some(b)) = (r.from, r.to) {
            if a > b {
                return Err(format!("`{s}`: the first step is after the last"));
            }
        }
        Ok(r)
    }
}

impl std::fmt::Display for StepRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = |e: Option<u64>| e.map(|x| x.to_string()).unwrap_or_default();
        write!(f, "{}:{}", end(self.from), end(self.to))
    }
}

/// The choice asked for on the command line.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    pub steps: Option<StepRange>,
    pub last: Option<usize>,
    pub best: Option<usize>,
    pub metric: Option<String>,
    pub mode: Mode,
}

impl Choice {
    /// Whether it keeps every input.
    pub fn is_none(&self) -> bool {
        self.steps.is_none() && self.last.is_none() && self.best.is_none()
    }
}

/// An input left out, and why.
#[derive(Clone, Debug)]
pub struct Dropped {
    pub path: PathBuf,
    pub step: Option<u64>,
    pub why: String,
}

/// The inputs kept (their indices, in order), with their `--metric` values (when asked), and
/// those dropped.
#[derive(Clone, Debug, Default)]
pub struct Chosen {
    pub kept: Vec<usize>,
    pub metrics: Vec<Option<f64>>,
    pub dropped: Vec<Dropped>,
}

impl Chosen {
    /// `"dropped"` of `--json`.
    pub fn dropped_json(&self) -> Value {
        self.dropped
            .iter()
            .map(|d| json!({"path": d.path, "step": d.step, "why": d.why}))
            .collect()
    }
}

/// Keeps of `inputs` the elements that `chosen` kept, in order.
pub fn keep<T>(inputs: Vec<T>, chosen: &Chosen) -> Vec<T> {
    let mut slots: Vec<Option<T>> = inputs.into_iter().map(Some).collect();
    chosen
        .kept
        .iter()
        .map(|&i| slots[i].take().expect("each index once"))
        .collect()
}

/// Applies `choice` to `inputs` (in fold order).
pub fn choose(inputs: &[&Checkpoint], choice: &Choice) -> Result<Chosen> {
    let mut kept: Vec<(usize, Option<f64>)> = (0..inputs.len()).map(|i| (i, None)).collect();
    let mut dropped = Vec::new();
    let drop = |i: usize, why: String| Dropped {
        path: inputs[i].path().to_path_buf(),
        step: inputs[i].step(),
        why,
    };
    if let Some(r) = choice.steps {
        let mut rest = Vec::new();
        for (i, m) in kept {
            let c = inputs[i];
            let step = c.step().ok_or_else(|| {
                Error::format(
                    c.path(),
                    format!(
                        "has no step (no step metadata and no number in the file name); \
                         --steps {r} needs one for every input"
                    ),
                )
            })?;
            if r.from.is_some_and(|a| step < a) || r.to.is_some_and(|b| step > b) {
                dropped.push(drop(i, format!("step outside --steps {r}")));
            } else {
                rest.push((i, m));
            }
        }
        kept = rest;
    }
    if let Some(n) = choice.last {
        if n == 0 {
            return Err(Error::usage("--last must be at least 1"));
        }
        let cut = kept.len().saturating_sub(n);
        for (i, _) in kept.drain(..cut) {
            dropped.push(drop(i, format!("not among the last {n}")));
        }
    }
    if let Some(n) = choice.best {
        if n == 0 {
            return Err(Error::usage("--best must be at least 1"));
        }
        let key = choice
            .metric
            .as_deref()
            .ok_or_else(|| Error::usage("--best needs --metric KEY"))?;
        for (i, m) in kept.iter_mut() {
            *m = Some(metric(inputs[*i], key)?);
        }
        // Rank by value, best first; among equal values the later input (the newer one).
        let mut rank: Vec<usize> = (0..kept.len()).collect();
        let value = |i: usize| kept[i].1.unwrap_or(f64::NAN);
        rank.sort_by(|&a, &b| {
            let (x, y) = (value(a), value(b));
            let by = match choice.mode {
                Mode::Max => y.total_cmp(&x),
                Mode::Min => x.total_cmp(&y),
            };
            by.then(b.cmp(&a))
        });
        let mut keep = vec![false; kept.len()];
        for &i in rank.iter().take(n) {
            keep[i] = true;
        }
        let threshold = rank.get(n.saturating_sub(1)).map(|&i| value(i));
        let mode = match choice.mode {
            Mode::Max => "max",
            Mode::Min => "min",
        };
        let mut rest = Vec::new();
        for ((i, m), k) in kept.into_iter().zip(keep) {
            if k {
                rest.push((i, m));
            } else {
                let why = format!(
                    "{key} {} is not among the best {n} (--mode {mode}; the worst kept: {})",
                    m.unwrap_or(f64::NAN),
                    threshold.unwrap_or(f64::NAN)
                );
                dropped.push(drop(i, why));
            }
        }
        kept = rest;
    } else if choice.metric.is_some() {
        return Err(Error::usage("--metric is for --best N"));
    }
    if kept.is_empty() {
        return Err(Error::usage(format!(
            "no input is left to fold ({} dropped; the first: {})",
            dropped.len(),
            dropped.first().map_or("", |d| d.why.as_str())
        )));
    }
    let (kept, metrics) = kept.into_iter().unzip();
    Ok(Chosen {
        kept,
        metrics,
        dropped,
    })
}

/// The number `key` of `c`: a metadata entry (safetensors `__metadata__`, a plain value of a
/// `.pth`), else a one-element float tensor (Lightning stores its scores as tensors); `key`
/// may also be the last part of a dotted name, when only one name ends so.
pub fn metric(c: &Checkpoint, key: &str) -> Result<f64> {
    let meta = c.metadata();
    let suffix = format!(".{key}");
    let found = |names: Vec<&String>| -> Result<Option<String>> {
        match names.len() {
            0 => Ok(None),
            1 => Ok(Some(names[0].clone())),
            _ => Err(Error::format(
                c.path(),
                format!(
                    "`{key}` is the end of several names ({}): give the whole name to --metric",
                    names
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    };
    let name = if meta.contains_key(key) {
        Some(key.to_string())
    } else {
        found(meta.keys().filter(|k| k.ends_with(&suffix)).collect())?
    };
    if let Some(name) = name {
        let text = &meta[&name];
        return text.trim().parse::<f64>().map_err(|_| {
            Error::format(
                c.path(),
                format!("its metric `{name}` is `{text}`, not a number"),
            )
        });
    }
    // A scalar tensor.
    let scalar = |t: &&crate::codec::TensorInfo| t.dtype.is_float() && t.numel() == 1;
    let tensor = match c.get(key).filter(scalar) {
        Some(t) => Some(t),
        None => {
            let names: Vec<&String> = c
                .tensors()
                .iter()
                .filter(scalar)
                .map(|t| &t.name)
                .filter(|n| n.ends_with(&suffix))
                .collect();
            found(names)?.and_then(|n| c.get(&n))
        }
    };
    if let Some(t) = tensor {
        let mut raw = vec![0u8; t.dtype.size()];
        c.read_at(t, 0, &mut raw)?;
        let mut v = [0.0f64];
        decode(t.dtype, &raw, &mut v);
        return Ok(v[0]);
    }
    let known: Vec<&str> = meta.keys().map(String::as_str).take(8).collect();
    Err(Error::format(
        c.path(),
        format!(
            "has no metric `{key}` for --best (its metadata: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ranges_parse_with_either_end_left_out() {
        let r: StepRange = "100:500".parse().unwrap();
        assert_eq!((r.from, r.to), (Some(100), Some(500)));
        let r: StepRange = "1000:".parse().unwrap();
        assert_eq!((r.from, r.to), (Some(1000), None));
        let r: StepRange = ":5".parse().unwrap();
        assert_eq!((r.from, r.to), (None, Some(5)));
        assert!("5".parse::<StepRange>().is_err());
        assert!("9:3".parse::<StepRange>().is_err());
        assert!("a:3".parse::<StepRange>().is_err());
        assert_eq!("100:".parse::<StepRange>().unwrap().to_string(), "100:");
    }
}
