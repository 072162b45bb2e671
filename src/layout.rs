//! EMA/raw weight pairs inside a checkpoint (`docs/layouts.md`): detecting the layout, pairing the
//! tensors of the model side with those of the shadow side, and which side holds the EMA.

use std::collections::HashMap;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// How a checkpoint stores the EMA next to the raw weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// mmengine EMAHook: `state_dict.<n>` and `ema_state_dict.module.<n>` (+ `ema_state_dict.steps`).
    Mmengine,
    /// mmcv/mmdet 1.x hooks: `[state_dict.]<n>` and `[state_dict.]ema_<n with . → _>`.
    Mmcv,
    /// timm: `state_dict.<n>` and `state_dict_ema.<n>`.
    Timm,
}

/// A side of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The model's own tensors (`state_dict.<n>`, or `<n>` for mmcv without prefix).
    Model,
    /// The EMA copy's tensors (`ema_state_dict.module.<n>`, `ema_<n>`, `state_dict_ema.<n>`).
    Shadow,
}

impl Side {
    /// The other side.
    pub fn flip(self) -> Side {
        match self {
            Side::Model => Side::Shadow,
            Side::Shadow => Side::Model,
        }
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Side::Model => "model",
            Side::Shadow => "shadow",
        }
    }
}

impl Layout {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Mmengine => "mmengine",
            Layout::Mmcv => "mmcv",
            Layout::Timm => "timm",
        }
    }

    /// Where the EMA is when nothing says otherwise: mmengine's EMAHook and mmcv's epoch-based
    /// runners swap before saving (model side); timm keeps it in `state_dict_ema`.
    pub fn default_ema_side(self) -> Side {
        match self {
            Layout::Mmengine | Layout::Mmcv => Side::Model,
            Layout::Timm => Side::Shadow,
        }
    }
}

/// One pair: indices into the checkpoint's tensors, and the model's own name of the weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pair {
    pub name: String,
    pub model: usize,
    pub shadow: usize,
}

/// The pairs of a checkpoint in one layout.
#[derive(Clone, Debug, Serialize)]
pub struct Pairing {
    pub layout: Layout,
    /// Prefix of model-side names (`state_dict.` or empty).
    pub model_prefix: String,
    pub pairs: Vec<Pair>,
    /// Model-side tensors (by index) with the model's own name, paired or not, in file order.
    pub model_tensors: Vec<(usize, String)>,
}

impl Pairing {
    /// The side holding the EMA: `--ema-on`, else what `ema-tool swap` recorded in the
    /// metadata, else the layout's default.
    pub fn ema_side(&self, ckpt: &Checkpoint, flag: Option<Side>) -> Side {
        flag.or_else(|| recorded_side(ckpt))
            .unwrap_or_else(|| self.layout.default_ema_side())
    }
}

/// The EMA side recorded by `ema-tool swap` in the `ema_tool` metadata, if any.
pub fn recorded_side(ckpt: &Checkpoint) -> Option<Side> {
    let v: serde_json::Value = serde_json::from_str(ckpt.metadata().get("ema_tool")?).ok()?;
    match v.get("ema_on")?.as_str()? {
        "model" => Some(Side::Model),
        "shadow" => Some(Side::Shadow),
        _ => None,
    }
}

/// mmcv's buffer name for parameter `n`: `ema_` + `n` with `.` replaced by `_`.
pub fn mmcv_buffer_name(n: &str) -> String {
    format!("ema_{}", n.replace('.', "_"))
}

/// Detects the layout: the first of mmengine, timm, mmcv with at least one pair.
///
/// A layout is paired only when some name could be on its shadow side, so a checkpoint
/// without an EMA costs one pass over its names.
pub fn detect(ckpt: &Checkpoint) -> Option<Pairing> {
    [Layout::Mmengine, Layout::Timm, Layout::Mmcv]
        .into_iter()
        .filter(|&l| ckpt.tensors().iter().any(|t| may_be_shadow(l, &t.name)))
        .filter_map(|l| pair(ckpt, l).ok())
        .find(|p| !p.pairs.is_empty())
}

/// Whether `name` has the form of a shadow-side name in `layout` (which [`pair`] needs to
/// find a pair).
fn may_be_shadow(layout: Layout, name: &str) -> bool {
    match layout {
        Layout::Mmengine => name.starts_with("ema_state_dict.module."),
        Layout::Timm => name.starts_with("state_dict_ema."),
        Layout::Mmcv => {
            let rest = name.strip_prefix("state_dict.").unwrap_or(name);
            rest.starts_with("ema_") && !rest.contains('.')
        }
    }
}

/// Pairs the tensors of `ckpt` in `layout`. Pairs must agree in shape and dtype.
pub fn pair(ckpt: &Checkpoint, layout: Layout) -> Result<Pairing> {
    let names: Vec<&str> = ckpt.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut pairs = Vec::new();
    let mut model_tensors = Vec::new();
    let model_prefix = match layout {
        Layout::Mmengine | Layout::Timm => "state_dict.".to_string(),
        Layout::Mmcv => {
            if names.iter().any(|n| n.starts_with("state_dict.")) {
                "state_dict.".to_string()
            } else {
                String::new()
            }
        }
    };
    match layout {
        Layout::Mmengine | Layout::Timm => {
            let shadow_prefix = if layout == Layout::Mmengine {
                "ema_state_dict.module."
            } else {
                "state_dict_ema."
            };
            let mut key = String::from(shadow_prefix);
            for (i, n) in names.iter().enumerate() {
                if let Some(plain) = n.strip_prefix(&model_prefix) {
                    model_tensors.push((i, plain.to_string()));
                    key.truncate(shadow_prefix.len());
                    key.push_str(plain);
                    if let Some(s) = ckpt.position(&key) {
                        pairs.push(Pair {
                            name: plain.to_string(),
                            model: i,
                            shadow: s,
                        });
                    }
                }
            }
        }
        Layout::Mmcv => {
            // Model-side names under the prefix, by their mangled buffer name.
            let mut by_buffer: HashMap<String, usize> = HashMap::new();
            let mut shadows: Vec<(usize, &str)> = Vec::new();
            for (i, n) in names.iter().enumerate() {
                let Some(rest) = n.strip_prefix(&model_prefix) else {
                    continue;
                };
                if rest.starts_with("ema_") && !rest.contains('.') {
                    shadows.push((i, rest));
                }
                if let Some(prev) = by_buffer.insert(mmcv_buffer_name(rest), i) {
                    if !names[prev]
                        .strip_prefix(&model_prefix)
                        .unwrap_or("")
                        .starts_with("ema_")
                    {
                        return Err(Error::tensor(
                            ckpt.path(),
                            *n,
                            format!(
                                "mangles to the same mmcv EMA buffer name as `{}`",
                                names[prev]
                            ),
                        ));
                    }
                }
            }
            let mut paired_shadow = vec![false; names.len()];
            for (si, sname) in &shadows {
                if let Some(&mi) = by_buffer.get(*sname) {
                    if mi != *si {
                        paired_shadow[*si] = true;
                        let plain = names[mi][model_prefix.len()..].to_string();
                        pairs.push(Pair {
                            name: plain,
                            model: mi,
                            shadow: *si,
                        });
                    }
                }
            }
            pairs.sort_by_key(|p| p.model);
            for (i, n) in names.iter().enumerate() {
                if let Some(rest) = n.strip_prefix(&model_prefix) {
                    if !paired_shadow[i] {
                        model_tensors.push((i, rest.to_string()));
                    }
                }
            }
        }
    }
    for p in &pairs {
        let (m, s) = (&ckpt.tensors()[p.model], &ckpt.tensors()[p.shadow]);
        if m.shape != s.shape || m.dtype != s.dtype {
            return Err(Error::tensor(
                ckpt.path(),
                &m.name,
                format!(
                    "is {} {:?} but its EMA pair `{}` is {} {:?}",
                    m.dtype, m.shape, s.name, s.dtype, s.shape
                ),
            ));
        }
    }
    Ok(Pairing {
        layout,
        model_prefix,
        pairs,
        model_tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmcv_names_mangle_dots() {
        assert_eq!(
            mmcv_buffer_name("backbone.conv1.weight"),
            "ema_backbone_conv1_weight"
        );
    }
}
