//! The plans of `ema` and `swa`: the inputs opened and ordered, every input holding the same
//! tensors with the same shapes, and each selected tensor of the last input made by a fold of
//! every input that weighs in some output, or copied from the last input (integer and bool
//! tensors, and buffers with `--skip-buffers`).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use std::collections::HashMap;

use super::order::{order_inputs, Order};
use super::select::{glob_match, selected};
use super::{Make, Output, Plan, Src, Tensor};
use crate::checkpoint::{Checkpoint, Open};
use crate::codec::DType;
use crate::error::{Error, Result};
use crate::layout::{self, Layout, Prefixes, Side};

/// What selects and converts the tensors of a fold.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'a> {
    /// `--include` globs: when given, only the tensors matching one are output.
    pub include: &'a [String],
    /// `--exclude` globs: tensors matching one are left out.
    pub exclude: &'a [String],
    /// Copy the tensors matching `buffer_pattern` from the last input instead of folding them.
    pub skip_buffers: bool,
    pub buffer_pattern: &'a [String],
    /// Tensors copied from the last input whatever their dtype (the counters that ema-pytorch's
    /// snapshots store as floats).
    pub copy: &'a [String],
    /// The dtype of floating-point outputs (default: each tensor's input dtype).
    pub dtype: Option<DType>,
    /// Fold what each input deploys instead of its tensors as they are.
    pub deploy: Option<Deploy<'a>>,
}

/// `--deploy` of a fold: for each input, the tensors `swap --deploy` would write, under the
/// deployed names (`docs/layouts.md#deploy`).
#[derive(Clone, Copy, Debug)]
pub struct Deploy<'a> {
    /// The other side than the EMA's (`--raw`).
    pub raw: bool,
    /// `--layout` (default: detected per input), with `custom`'s prefixes.
    pub layout: Option<Layout>,
    pub custom: Option<&'a Prefixes>,
    /// `--ema-on`.
    pub ema_on: Option<Side>,
    /// `--strip-prefix` (or its default).
    pub strip: &'a [String],
}

/// The top-level entries that never deploy, for inputs without EMA pairs.
const NOT_DEPLOYED: [&str; 6] = [
    "optimizer.",
    "optimizer_states.",
    "optimizers.",
    "lr_scheduler.",
    "lr_schedulers.",
    "scheduler.",
];

/// What `c` deploys: `(deployed name, tensor index)`. With EMA pairs (or a layout with a side
/// absent), one side under the model's names; else the `state_dict`, `model`, `module` or `ema`
/// subtree if there is one, else every tensor but optimizer and scheduler state; prefixes
/// stripped.
pub fn deployed_tensors(c: &Checkpoint, d: &Deploy) -> Result<Vec<(String, usize)>> {
    let pairing = match d.layout {
        Some(l) => Some(layout::pair(c, l, d.custom)?),
        None => layout::detect(c),
    };
    if let Some(p) = pairing {
        let take = p.deployed_side(c, p.ema_side(c, d.ema_on), d.raw)?;
        return super::swap::deployed(c, &p, take, d.strip);
    }
    unpaired(c, d.strip)
}

/// What a checkpoint without EMA pairs deploys: the `state_dict`, `model`, `module` or `ema`
/// subtree if there is one, else every tensor but optimizer and scheduler state, under their
/// names with the subtree's and `strip`'s prefixes stripped.
pub fn unpaired(c: &Checkpoint, strip: &[String]) -> Result<Vec<(String, usize)>> {
    let names = || c.tensors().iter().map(|t| t.name.as_str());
    let subtree = ["state_dict.", "model.", "module.", "ema."]
        .into_iter()
        .find(|p| names().any(|n| n.starts_with(p)));
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, n) in names().enumerate() {
        let rest = match subtree {
            Some(p) => match n.strip_prefix(p) {
                Some(r) => r,
                None => continue,
            },
            None if NOT_DEPLOYED.iter().any(|p| n.starts_with(p)) => continue,
            None => n,
        };
        let name = super::swap::strip_prefixes(rest, strip).to_string();
        if let Some(prev) = seen.insert(name.clone(), i) {
            return Err(Error::tensor(
                c.path(),
                n,
                format!(
                    "deploys as `{name}`, like `{}`; pass other --strip-prefix values",
                    c.tensors()[prev].name
                ),
            ));
        }
        out.push((name, i));
    }
    Ok(out)
}

/// The tensors of the inputs under the names a fold matches them by: their own, or with
/// `--deploy` what each deploys.
enum Names<'a> {
    Own(&'a [Checkpoint]),
    /// Each input's deployed names in order, and indexed.
    Deployed(Vec<DeployedNames>),
}

type DeployedNames = (Vec<(String, usize)>, HashMap<String, usize>);

impl Names<'_> {
    /// Input `ci`'s `(name, tensor index)` in its order.
    fn list(&self, ci: usize) -> Vec<(&str, usize)> {
        match self {
            Names::Own(c) => c[ci]
                .tensors()
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_str(), i))
                .collect(),
            Names::Deployed(v) => v[ci].0.iter().map(|(n, i)| (n.as_str(), *i)).collect(),
        }
    }

    /// The tensor of input `ci` named `name`; `hint`, its position in another input's list.
    fn find(&self, ci: usize, name: &str, hint: usize) -> Option<usize> {
        match self {
            Names::Own(c) => c[ci].position_near(name, hint),
            Names::Deployed(v) => v[ci].1.get(name).copied(),
        }
    }
}

/// Opens every input readable. In parallel: a header of many tensors takes milliseconds to
/// parse. The first error in the order given is the one reported.
pub fn open_inputs(paths: &[PathBuf]) -> Result<Vec<Checkpoint>> {
    paths
        .par_iter()
        .map(|p| Checkpoint::open(p, Open::Readable))
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// Inputs in fold order.
#[derive(Debug)]
pub struct Ordered {
    pub inputs: Vec<Checkpoint>,
    /// The order used (`step`, `given` or `name`).
    pub order: Order,
    /// A warning for the user, when the order is doubtful.
    pub warning: Option<String>,
}

/// Puts `inputs` in fold order.
pub fn arrange(inputs: Vec<Checkpoint>, order: Order) -> Result<Ordered> {
    let paths: Vec<&Path> = inputs.iter().map(Checkpoint::path).collect();
    let steps: Vec<Option<u64>> = inputs.iter().map(Checkpoint::step).collect();
    let ord = order_inputs(order, &paths, &steps)?;
    let mut slots: Vec<Option<Checkpoint>> = inputs.into_iter().map(Some).collect();
    let inputs = ord
        .perm
        .iter()
        .map(|&i| slots[i].take().expect("a permutation"))
        .collect();
    Ok(Ordered {
        inputs,
        order: ord.used,
        warning: ord.warning,
    })
}

impl Ordered {
    /// Every input's step, in fold order, for `--per-iter`; an error names the first input
    /// without one.
    pub fn steps(&self) -> Result<Vec<u64>> {
        self.inputs
            .iter()
            .map(|c| {
                c.step().ok_or_else(|| {
                    Error::format(
                        c.path(),
                        "has no step (no step metadata and no number in the file name); \
                         --per-iter needs one for every input",
                    )
                })
            })
            .collect()
    }
}

/// The plan of a fold of `ordered` into `outputs` (each with one weight per input): checks
/// that every input holds the same tensors with the same shapes, and makes one output tensor
/// per selected tensor of the last input, in its order.
pub fn build(ordered: Ordered, outputs: Vec<Output>, opts: &Options) -> Result<Plan> {
    assert!(!outputs.is_empty(), "a fold has an output");
    let ckpts = &ordered.inputs;
    let n = ckpts.len();
    debug_assert!(outputs.iter().all(|o| o.weights.len() == n));
    let last_i = n - 1;
    let last = &ckpts[last_i];
    let is_selected = |name: &str| selected(name, opts.include, opts.exclude);
    let names = match &opts.deploy {
        None => Names::Own(ckpts),
        Some(d) => Names::Deployed(
            ckpts
                .iter()
                .map(|c| {
                    let list = deployed_tensors(c, d)?;
                    let index = list.iter().map(|(n, i)| (n.clone(), *i)).collect();
                    Ok((list, index))
                })
                .collect::<Result<_>>()?,
        ),
    };
    // Tensors of other inputs missing from the last one.
    for (ci, c) in ckpts[..last_i].iter().enumerate() {
        if let Some((name, _)) = names
            .list(ci)
            .into_iter()
            .enumerate()
            .find(|(i, (n, _))| is_selected(n) && names.find(last_i, n, *i).is_none())
            .map(|(_, x)| x)
        {
            return Err(Error::missing(last.path(), c.path(), name));
        }
    }
    let out_dtype = |d: DType| match opts.dtype {
        Some(o) if d.is_float() => o,
        _ => d,
    };
    // The inputs that weigh in some output; the others are never read.
    let weighs: Vec<bool> = (0..n)
        .map(|k| outputs.iter().any(|o| o.weights[k] != 0.0))
        .collect();
    let mut tensors = Vec::new();
    for (pos_in_list, (out_name, ti)) in names.list(last_i).into_iter().enumerate() {
        let t = &last.tensors()[ti];
        if !is_selected(out_name) {
            continue;
        }
        let mut sources = Vec::new();
        for (ci, c) in ckpts.iter().enumerate() {
            let Some(pos) = names.find(ci, out_name, pos_in_list) else {
                return Err(Error::missing(c.path(), last.path(), out_name));
            };
            let o = &c.tensors()[pos];
            if o.shape != t.shape {
                return Err(Error::mismatch(
                    c.path(),
                    last.path(),
                    &t.name,
                    "shape",
                    format!("{:?}", o.shape),
                    format!("{:?}", t.shape),
                ));
            }
            if o.dtype.is_float() != t.dtype.is_float()
                || (!t.dtype.is_float() && o.dtype != t.dtype)
            {
                return Err(Error::mismatch(
                    c.path(),
                    last.path(),
                    &t.name,
                    "dtype",
                    o.dtype,
                    t.dtype,
                ));
            }
            if weighs[ci] {
                sources.push(Src {
                    input: ci,
                    tensor: pos,
                });
            }
        }
        let buffer = (opts.skip_buffers
            && opts.buffer_pattern.iter().any(|g| glob_match(g, out_name)))
            || opts.copy.iter().any(|g| glob_match(g, out_name));
        let only_one =
            |s: &[Src]| s.len() == 1 && outputs.iter().all(|o| o.weights[s[0].input] == 1.0);
        let make = if !t.dtype.is_float() || buffer {
            Make::Copy {
                source: Src {
                    input: last_i,
                    tensor: ti,
                },
            }
        } else if only_one(&sources) {
            Make::Copy { source: sources[0] }
        } else {
            Make::Fold { sources }
        };
        tensors.push(Tensor {
            name: out_name.to_string(),
            dtype: out_dtype(t.dtype),
            shape: t.shape.clone(),
            make,
        });
    }
    if tensors.is_empty() {
        return Err(Error::usage(
            "no tensor is selected (check --include/--exclude against `ema-tool inspect --tensors`)",
        ));
    }
    Ok(Plan {
        inputs: ordered.inputs,
        order: ordered.order,
        outputs,
        tensors,
    })
}
