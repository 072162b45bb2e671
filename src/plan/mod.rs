//! The plan: the one description of the work of every command that writes files.
//!
//! A [`Plan`] is what the commands build and the fold executes: the inputs (opened
//! checkpoints, in fold order), the outputs (where each goes, and each input's weight in it),
//! and the tensors that every output holds, each with how it is made ([`Make`]): a weighted
//! fold of input tensors, a copy of one, or a copy of raw bytes of an input file. A fold reads
//! each of its sources once for all the outputs, so K outputs cost one read of the inputs.
//!
//! - [`order`]: the order of a fold's inputs;
//! - [`choose`]: which of them `--steps`, `--last` and `--best` keep;
//! - `fold`: the plans of `ema` and `swa` (inputs matched tensor by tensor);
//! - `swap`: the plans of `swap` and `swap --deploy`;
//! - `select`: which tensors `--include`/`--exclude` keep.
//!
//! Nothing here reads a value but `--best`'s metrics: a plan is made from headers, so a bad
//! call fails before any work.

pub mod choose;
pub(crate) mod fold;
pub mod order;
pub(crate) mod select;
pub(crate) mod swap;

use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::codec::{DType, TensorSpec};
pub use order::Order;

/// The work of one command: inputs, outputs, and every output tensor with how it is made.
#[derive(Debug)]
pub struct Plan {
    /// The checkpoints read, in fold order.
    pub inputs: Vec<Checkpoint>,
    /// How the inputs were ordered.
    pub order: Order,
    /// The outputs. Each holds every tensor of [`Plan::tensors`].
    pub outputs: Vec<Output>,
    /// The tensors of every output, in output order.
    pub tensors: Vec<Tensor>,
}

/// One output file.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// Where it is written.
    pub target: PathBuf,
    /// The values of the swept parameters that make this output, as typed (empty without a
    /// sweep).
    pub params: Vec<(String, String)>,
    /// The weight of each input in this output's folds, in fold order (empty for plans that
    /// only copy).
    pub weights: Vec<f64>,
}

/// One output tensor, and how it is made.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    /// The output dtype.
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub make: Make,
}

/// How an output tensor is made.
#[derive(Clone, Debug, PartialEq)]
pub enum Make {
    /// `Σ_k w_k · x_k` over `sources`, `w_k` the weight of the source's input in each output
    /// ([`Output::weights`]), accumulated in f64 and encoded as the tensor's dtype. Sources
    /// have the tensor's shape and float dtypes; every one has a non-zero weight in some
    /// output.
    Fold { sources: Vec<Src> },
    /// One input tensor as it is, or converted to the tensor's dtype when that differs (floats
    /// only); the same in every output.
    Copy { source: Src },
    /// Bytes `offset .. offset + len` of data file `file` of input `input`, as they are (the
    /// storage records of a `.pth` swapped inside its archive).
    Bytes {
        input: usize,
        file: usize,
        offset: u64,
        len: u64,
    },
}

/// One input tensor: which input, which of its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Src {
    /// Index into [`Plan::inputs`].
    pub input: usize,
    /// Index into that checkpoint's tensors.
    pub tensor: usize,
}

impl Plan {
    /// The input tensor `s`.
    pub fn tensor_info(&self, s: Src) -> &TensorInfo {
        &self.inputs[s.input].tensors()[s.tensor]
    }

    /// The weights of a fold over `sources`: for each output, each source's weight, output
    /// after output (`outputs × sources` values).
    pub fn fold_weights(&self, sources: &[Src]) -> Vec<f64> {
        self.outputs
            .iter()
            .flat_map(|o| sources.iter().map(|s| o.weights[s.input]))
            .collect()
    }

    /// What the writers need to know of the output tensors.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect()
    }

    /// Bytes of input that making `t` reads (once, whatever the number of outputs).
    pub fn input_bytes_of(&self, t: &Tensor) -> u64 {
        match &t.make {
            Make::Fold { sources } => sources.iter().map(|s| self.tensor_info(*s).len).sum(),
            Make::Copy { source } => self.tensor_info(*source).len,
            Make::Bytes { len, .. } => *len,
        }
    }

    /// Bytes of input the plan reads.
    pub fn input_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| self.input_bytes_of(t)).sum()
    }

    /// Bytes of tensor data of one output.
    pub fn output_bytes(&self) -> u64 {
        self.specs().iter().map(TensorSpec::nbytes).sum()
    }

    /// How many tensors are folded, and how many copied.
    pub fn counts(&self) -> (usize, usize) {
        let folded = self
            .tensors
            .iter()
            .filter(|t| matches!(t.make, Make::Fold { .. }))
            .count();
        (folded, self.tensors.len() - folded)
    }
}
