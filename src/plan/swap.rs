//! The plans of `swap` and `swap --deploy` over one checkpoint and the pairing of its EMA and
//! raw weights (`layout`): every tensor kept with the values of each pair exchanged, the
//! storage records of the pairs exchanged inside a PyTorch archive, or one side written under
//! the model's own names.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::{Make, Order, Output, Plan, Src, Tensor};
use crate::checkpoint::Checkpoint;
use crate::codec::DType;
use crate::error::{Error, Result};
use crate::layout::{Pairing, Side};
use crate::output::patch::Slot;

/// A plan of one input and one output that only copies.
fn one_to_one(ckpt: Checkpoint, target: PathBuf, tensors: Vec<Tensor>) -> Plan {
    Plan {
        inputs: vec![ckpt],
        order: Order::Given,
        outputs: vec![Output {
            target,
            params: Vec::new(),
            weights: Vec::new(),
        }],
        tensors,
    }
}

fn from_input(tensor: usize) -> Src {
    Src { input: 0, tensor }
}

/// Every tensor kept under its name; the two tensors of each pair exchange their values.
pub fn swap(ckpt: Checkpoint, pairing: &Pairing, target: PathBuf) -> Plan {
    let mut partner: HashMap<usize, usize> = HashMap::new();
    for p in &pairing.pairs {
        partner.insert(p.model, p.shadow);
        partner.insert(p.shadow, p.model);
    }
    let tensors = ckpt
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| Tensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            make: Make::Copy {
                source: from_input(partner.get(&i).copied().unwrap_or(i)),
            },
        })
        .collect();
    one_to_one(ckpt, target, tensors)
}

/// `swap` inside a PyTorch archive: the output's "tensors" are the storage records in
/// `slots` (from `output::patch::slots`), each filled with the bytes of its partner record.
pub fn swap_in_archive(ckpt: Checkpoint, slots: &[Slot], target: PathBuf) -> Plan {
    let tensors = slots
        .iter()
        .map(|s| Tensor {
            name: s.name.clone(),
            dtype: DType::U8,
            shape: vec![s.from.1 as usize],
            make: Make::Bytes {
                input: 0,
                file: 0,
                offset: s.from.0,
                len: s.from.1,
            },
        })
        .collect();
    one_to_one(ckpt, target, tensors)
}

/// What `swap --deploy` takes.
#[derive(Clone, Copy, Debug)]
pub struct Deploy<'a> {
    /// The side that holds the EMA.
    pub ema_side: Side,
    /// Deploy the other side.
    pub raw: bool,
    /// Prefixes stripped from the deployed names.
    pub strip: &'a [String],
    /// The dtype of floating-point outputs (default: as in the input).
    pub dtype: Option<DType>,
}

/// The weights of one side under the model's own names, prefixes stripped.
pub fn deploy(ckpt: Checkpoint, pairing: &Pairing, d: &Deploy, target: PathBuf) -> Result<Plan> {
    let take = if d.raw { d.ema_side.flip() } else { d.ema_side };
    let shadow_of: HashMap<usize, usize> =
        pairing.pairs.iter().map(|p| (p.model, p.shadow)).collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut tensors = Vec::new();
    for (model_idx, plain) in &pairing.model_tensors {
        let src = match take {
            Side::Model => *model_idx,
            Side::Shadow => shadow_of.get(model_idx).copied().unwrap_or(*model_idx),
        };
        let mut name = plain.as_str();
        for p in d.strip {
            name = name.strip_prefix(p.as_str()).unwrap_or(name);
        }
        if let Some(prev) = seen.insert(name.to_string(), *model_idx) {
            return Err(Error::tensor(
                ckpt.path(),
                &ckpt.tensors()[*model_idx].name,
                format!(
                    "deploys as `{name}`, like `{}`; pass other --strip-prefix values",
                    ckpt.tensors()[prev].name
                ),
            ));
        }
        let t = &ckpt.tensors()[src];
        let dtype = match d.dtype {
            Some(o) if t.dtype.is_float() => o,
            _ => t.dtype,
        };
        tensors.push(Tensor {
            name: name.to_string(),
            dtype,
            shape: t.shape.clone(),
            make: Make::Copy {
                source: from_input(src),
            },
        });
    }
    Ok(one_to_one(ckpt, target, tensors))
}
