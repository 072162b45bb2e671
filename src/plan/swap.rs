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

/// `name` with every prefix of `strip` removed wherever one leads it, again and again
/// (`module._orig_mod.conv.weight` → `conv.weight`).
pub fn strip_prefixes<'a>(mut name: &'a str, strip: &[String]) -> &'a str {
    loop {
        let before = name.len();
        for p in strip {
            if !p.is_empty() {
                name = name.strip_prefix(p.as_str()).unwrap_or(name);
            }
        }
        if name.len() == before {
            return name;
        }
    }
}

/// What one side of a checkpoint deploys: `(deployed name, tensor index)` in file order. The
/// model side's names, each taken from `take` (a tensor with no partner on the shadow side
/// from the model side); or, when the model side is absent, the shadow side's.
pub fn deployed(
    ckpt: &Checkpoint,
    pairing: &Pairing,
    take: Side,
    strip: &[String],
) -> Result<Vec<(String, usize)>> {
    let shadow_of: HashMap<usize, usize> =
        pairing.pairs.iter().map(|p| (p.model, p.shadow)).collect();
    let from: Vec<(usize, &str, usize)> = match (pairing.absent(), take) {
        (Some(Side::Model), Side::Model) | (Some(Side::Shadow), Side::Shadow) => {
            return Err(Error::format(
                ckpt.path(),
                format!(
                    "has no {} side in the {} layout (only `{}…`), so it cannot deploy it{}",
                    take.name(),
                    pairing.layout.name(),
                    if take == Side::Model {
                        &pairing.shadow_prefix
                    } else {
                        &pairing.model_prefix
                    },
                    if take == Side::Model {
                        "; deploy the EMA (without --raw)"
                    } else {
                        ""
                    }
                ),
            ))
        }
        (Some(Side::Model), _) => pairing
            .shadow_tensors
            .iter()
            .map(|(i, n)| (*i, n.as_str(), *i))
            .collect(),
        _ => pairing
            .model_tensors
            .iter()
            .map(|(i, n)| {
                let src = match take {
                    Side::Model => *i,
                    Side::Shadow => shadow_of.get(i).copied().unwrap_or(*i),
                };
                (*i, n.as_str(), src)
            })
            .collect(),
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(from.len());
    for (idx, plain, src) in from {
        let name = strip_prefixes(plain, strip);
        if let Some(prev) = seen.insert(name.to_string(), idx) {
            return Err(Error::tensor(
                ckpt.path(),
                &ckpt.tensors()[idx].name,
                format!(
                    "deploys as `{name}`, like `{}`; pass other --strip-prefix values",
                    ckpt.tensors()[prev].name
                ),
            ));
        }
        out.push((name.to_string(), src));
    }
    Ok(out)
}

/// The tensors `deployed` (`(name, tensor index)`, from [`deployed`] or, for a checkpoint
/// without pairs, `plan::fold::unpaired`) as a plain state dict.
/// `dtype` is that of floating-point outputs (default: as in the input).
pub fn deploy(
    ckpt: Checkpoint,
    deployed: Vec<(String, usize)>,
    dtype: Option<DType>,
    target: PathBuf,
) -> Result<Plan> {
    let mut tensors = Vec::new();
    for (name, src) in deployed {
        let t = &ckpt.tensors()[src];
        let dtype = match dtype {
            Some(o) if t.dtype.is_float() => o,
            _ => t.dtype,
        };
        tensors.push(Tensor {
            name,
            dtype,
            shape: t.shape.clone(),
            make: Make::Copy {
                source: from_input(src),
            },
        });
    }
    Ok(one_to_one(ckpt, target, tensors))
}
