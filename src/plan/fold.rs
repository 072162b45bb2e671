//! The plans of `ema` and `swa`: the inputs opened and ordered, every input holding the same
//! tensors with the same shapes, and each selected tensor of the last input made by a fold of
//! every input that weighs in some output, or copied from the last input (integer and bool
//! tensors, and buffers with `--skip-buffers`).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::order::{order_inputs, Order};
use super::select::{glob_match, selected};
use super::{Make, Output, Plan, Src, Tensor};
use crate::checkpoint::{Checkpoint, Open};
use crate::codec::DType;
use crate::error::{Error, Result};

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
    // Tensors of other inputs missing from the last one.
    for c in &ckpts[..last_i] {
        if let Some(t) = c
            .tensors()
            .iter()
            .enumerate()
            .find(|(i, t)| is_selected(&t.name) && last.position_near(&t.name, *i).is_none())
            .map(|(_, t)| t)
        {
            return Err(Error::missing(last.path(), c.path(), &t.name));
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
    for (ti, t) in last.tensors().iter().enumerate() {
        if !is_selected(&t.name) {
            continue;
        }
        let mut sources = Vec::new();
        for (ci, c) in ckpts.iter().enumerate() {
            let Some(pos) = c.position_near(&t.name, ti) else {
                return Err(Error::missing(c.path(), last.path(), &t.name));
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
            && opts.buffer_pattern.iter().any(|g| glob_match(g, &t.name)))
            || opts.copy.iter().any(|g| glob_match(g, &t.name));
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
            name: t.name.clone(),
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
