//! EMA/raw weight pairs inside a checkpoint (`docs/layouts.md`): detecting the layout, pairing the
//! tensors of the model side with those of the shadow side, and which side holds the EMA.

use std::collections::HashMap;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// How a checkpoint stores the EMA next to the raw weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// mmengine EMAHook: `state_dict.<n>` and `ema_state_dict.module.<n>` (+ `ema_state_dict.steps`).
    Mmengine,
    /// mmcv/mmdet 1.x hooks: `[state_dict.]<n>` and `[state_dict.]ema_<n with . → _>`.
    Mmcv,
    /// timm: `state_dict.<n>` and `state_dict_ema.<n>`.
    Timm,
    /// Lightning ≥ 2.6 `EMAWeightAveraging`: `state_dict.<n>` (the average) and
    /// `current_model_state.<n>` (the raw weights).
    Lightning,
    /// torch `AveragedModel` saved beside the model: `<P>.<n>` and `<Q>.module.<n>`
    /// (+ `<Q>.n_averaged`).
    SwaUtils,
    /// ema-pytorch `EMA`/`KarrasEMA`/`PostHocEMA` state: `<P>.<n>` or `<Q>.online_model.<n>`,
    /// and `<Q>.ema_model.<n>` (+ `<Q>.initted`, `<Q>.step`).
    EmaPytorch,
    /// ultralytics / YOLOv5 trainer checkpoints: `model.<n>` (may be absent) and `ema.<n>`.
    Ultralytics,
    /// `--model-prefix P` and `--shadow-prefix Q`: `P<n>` and `Q<n>`.
    Custom,
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
            Layout::Lightning => "lightning",
            Layout::SwaUtils => "swa-utils",
            Layout::EmaPytorch => "ema-pytorch",
            Layout::Ultralytics => "ultralytics",
            Layout::Custom => "custom",
        }
    }

    /// Where the EMA is when nothing says otherwise: mmengine's EMAHook, mmcv's epoch-based
    /// runners and Lightning's callback put it on the model side (`state_dict`); the others
    /// keep it on the shadow side.
    pub fn default_ema_side(self) -> Side {
        match self {
            Layout::Mmengine | Layout::Mmcv | Layout::Lightning => Side::Model,
            _ => Side::Shadow,
        }
    }
}

/// The prefixes of `--layout custom` (`--model-prefix`, `--shadow-prefix`).
#[derive(Clone, Debug, Default)]
pub struct Prefixes {
    pub model: String,
    pub shadow: String,
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
    /// Prefix of shadow-side names (for mmcv, of the `ema_` buffers).
    pub shadow_prefix: String,
    pub pairs: Vec<Pair>,
    /// Model-side tensors (by index) with the model's own name, paired or not, in file order.
    pub model_tensors: Vec<(usize, String)>,
    /// Shadow-side tensors (by index) with the model's own name, paired or not, in file order,
    /// without the layout's counters (`steps`, `n_averaged`, `initted`, `step`).
    pub shadow_tensors: Vec<(usize, String)>,
}

impl Pairing {
    /// The side that is absent (ultralytics' `model: None`, a lone `AveragedModel`), if one is.
    pub fn absent(&self) -> Option<Side> {
        if self.model_tensors.is_empty() {
            Some(Side::Model)
        } else if self.shadow_tensors.is_empty() {
            Some(Side::Shadow)
        } else {
            None
        }
    }

    /// The side that `swap --deploy` (or `--deploy` of a fold) takes: the EMA's, or with
    /// `raw` the other. With a side absent, the side there is, and `raw` is an error: the file
    /// keeps one set of weights, deployed as they are.
    pub fn deployed_side(&self, ckpt: &Checkpoint, ema: Side, raw: bool) -> Result<Side> {
        match self.absent() {
            None => Ok(if raw { ema.flip() } else { ema }),
            Some(absent) if !raw => Ok(absent.flip()),
            Some(absent) => Err(Error::format(
                ckpt.path(),
                format!(
                    "has no {} side in the {} layout (only `{}…`): it holds one set of weights, \
                     which `--deploy` without --raw writes",
                    absent.name(),
                    self.layout.name(),
                    match absent {
                        Side::Model => &self.shadow_prefix,
                        Side::Shadow => &self.model_prefix,
                    }
                ),
            )),
        }
    }

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

/// The top-level subtrees of `ckpt` (the first part of each name) with their tensor counts, in
/// file order.
pub fn subtrees(ckpt: &Checkpoint) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for t in ckpt.tensors() {
        let top = t.name.split_once('.').map_or(t.name.as_str(), |(a, _)| a);
        match out.iter_mut().find(|(n, _)| n == top) {
            Some((_, k)) => *k += 1,
            None => out.push((top.to_string(), 1)),
        }
    }
    out
}

/// Two top-level subtrees whose names mirror each other (`net.<n>` and `net_avg.<n>`, most
/// such names first), for `inspect` to suggest `--layout custom` with; `None` when none do.
pub fn mirrored_subtrees(ckpt: &Checkpoint) -> Option<(String, String)> {
    let tops = subtrees(ckpt);
    let mut best: Option<(usize, String, String)> = None;
    for (a, _) in &tops {
        for (b, _) in &tops {
            if a == b {
                continue;
            }
            let (pa, pb) = (format!("{a}."), format!("{b}."));
            let hits = ckpt
                .tensors()
                .iter()
                .filter_map(|t| t.name.strip_prefix(pa.as_str()))
                .filter(|n| ckpt.position(&format!("{pb}{n}")).is_some())
                .count();
            if hits > 0 && best.as_ref().map_or(true, |(h, _, _)| hits > *h) {
                best = Some((hits, pa, pb));
            }
        }
    }
    best.map(|(_, a, b)| (a, b))
}

/// mmcv's buffer name for parameter `n`: `ema_` + `n` with `.` replaced by `_`.
pub fn mmcv_buffer_name(n: &str) -> String {
    format!("ema_{}", n.replace('.', "_"))
}

/// The layouts [`detect`] tries, in order.
const DETECTED: [Layout; 7] = [
    Layout::Mmengine,
    Layout::Lightning,
    Layout::Timm,
    Layout::EmaPytorch,
    Layout::SwaUtils,
    Layout::Ultralytics,
    Layout::Mmcv,
];

/// Detects the layout: the first that pairs some tensors, or, for the layouts whose
/// checkpoints mark themselves (a lone `AveragedModel`'s `n_averaged`, ema-pytorch's
/// `initted`, ultralytics' `updates`), that finds its shadow side alone.
///
/// A layout is paired only when some name could be on its shadow side, so a checkpoint
/// without an EMA costs a pass or two over its names.
pub fn detect(ckpt: &Checkpoint) -> Option<Pairing> {
    DETECTED
        .into_iter()
        .filter_map(|l| {
            let prefixes = prefixes(ckpt, l, None)?;
            pair_with(ckpt, l, &prefixes).ok()
        })
        .find(|p| {
            !p.pairs.is_empty()
                || (marked(ckpt, p.layout)
                    && !(p.shadow_tensors.is_empty() && p.model_tensors.is_empty()))
        })
}

/// Whether `ckpt` carries the mark of `layout`, so that one side alone is enough to detect
/// it: `n_averaged` and `initted` are found by [`prefixes`] already; ultralytics' and YOLOv5's
/// trainers write an `updates` entry beside `model` and `ema` (`strip_optimizer` sets it and
/// `ema` to `None` in `best.pt`), and pickle their models as `ultralytics.` or `models.yolo.`
/// classes.
fn marked(ckpt: &Checkpoint, layout: Layout) -> bool {
    match layout {
        Layout::SwaUtils | Layout::EmaPytorch => true,
        Layout::Ultralytics => {
            let top = |key: &str| ckpt.top_kind(key).is_some();
            let yolo = |key: &str| {
                ckpt.top_kind(key)
                    .is_some_and(|k| k.starts_with("ultralytics.") || k.starts_with("models.yolo."))
            };
            let updates = ckpt.metadata().contains_key("updates") || top("updates");
            (updates && top("model") && top("ema")) || yolo("model") || yolo("ema")
        }
        _ => false,
    }
}

/// Pairs the tensors of `ckpt` in `layout` (with `custom`'s prefixes for `--layout custom`).
/// Pairs must agree in shape and dtype.
pub fn pair(ckpt: &Checkpoint, layout: Layout, custom: Option<&Prefixes>) -> Result<Pairing> {
    let prefixes = prefixes(ckpt, layout, custom).ok_or_else(|| {
        Error::format(
            ckpt.path(),
            match layout {
                Layout::Custom => "--layout custom needs --model-prefix and --shadow-prefix".into(),
                l => format!("no {} layout found (see `ema-tool inspect`)", l.name()),
            },
        )
    })?;
    pair_with(ckpt, layout, &prefixes)
}

/// The model and shadow prefixes of `layout` in `ckpt`; `None` when the layout is not there.
fn prefixes(ckpt: &Checkpoint, layout: Layout, custom: Option<&Prefixes>) -> Option<Prefixes> {
    let names = || ckpt.tensors().iter().map(|t| t.name.as_str());
    let fixed = |m: &str, s: &str| {
        names().any(|n| n.starts_with(s)).then(|| Prefixes {
            model: m.into(),
            shadow: s.into(),
        })
    };
    match layout {
        Layout::Mmengine => fixed("state_dict.", "ema_state_dict.module."),
        Layout::Timm => fixed("state_dict.", "state_dict_ema."),
        Layout::Lightning => fixed("state_dict.", "current_model_state."),
        Layout::Ultralytics => fixed("model.", "ema.").or_else(|| {
            // `best.pt`: the EMA moved into `model`, `ema` set to None.
            (marked(ckpt, layout) && names().any(|n| n.starts_with("model."))).then(|| Prefixes {
                model: "model.".into(),
                shadow: "ema.".into(),
            })
        }),
        Layout::Mmcv => {
            let model = if names().any(|n| n.starts_with("state_dict.")) {
                "state_dict."
            } else {
                ""
            };
            names()
                .any(|n| {
                    let rest = n.strip_prefix(model).unwrap_or(n);
                    rest.starts_with("ema_") && !rest.contains('.')
                })
                .then(|| Prefixes {
                    model: model.into(),
                    shadow: format!("{model}ema_"),
                })
        }
        Layout::SwaUtils => {
            // Q: where `<Q>n_averaged` sits beside `<Q>module.*`.
            let q = names().find_map(|n| {
                let q = n.strip_suffix("n_averaged")?;
                (q.is_empty() || q.ends_with('.')).then_some(q)
            })?;
            let shadow = format!("{q}module.");
            names().any(|n| n.starts_with(&shadow)).then(|| Prefixes {
                model: best_model_prefix(ckpt, &shadow, q),
                shadow,
            })
        }
        Layout::EmaPytorch => {
            let q = names().find_map(|n| {
                let q = n.strip_suffix("initted")?;
                (q.is_empty() || q.ends_with('.')).then_some(q)
            })?;
            let shadow = format!("{q}ema_model.");
            if !names().any(|n| n.starts_with(&shadow)) {
                return None;
            }
            let online = format!("{q}online_model.");
            let model = if names().any(|n| n.starts_with(&online)) {
                online
            } else {
                best_model_prefix(ckpt, &shadow, q)
            };
            Some(Prefixes { model, shadow })
        }
        Layout::Custom => custom.cloned(),
    }
}

/// The top-level subtree `P.` (other than the shadow's `q`) that holds the most of the shadow's
/// names; empty (the model side absent) when none holds any.
fn best_model_prefix(ckpt: &Checkpoint, shadow: &str, q: &str) -> String {
    let plain: Vec<&str> = ckpt
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix(shadow))
        .collect();
    let mut tops: Vec<&str> = ckpt
        .tensors()
        .iter()
        .filter_map(|t| t.name.split_once('.').map(|(top, _)| top))
        .filter(|top| format!("{top}.") != q)
        .collect();
    tops.sort_unstable();
    tops.dedup();
    let mut best = (0, String::new());
    for top in tops {
        let p = format!("{top}.");
        let hits = plain
            .iter()
            .filter(|n| ckpt.position(&format!("{p}{n}")).is_some())
            .count();
        if hits > best.0 {
            best = (hits, p);
        }
    }
    best.1
}

/// The counters a layout keeps beside its shadow's tensors, which belong to neither side.
fn counters(layout: Layout, shadow: &str) -> Vec<String> {
    let q = |name: &str, sub: &str| format!("{}{name}", &shadow[..shadow.len() - sub.len()]);
    match layout {
        Layout::Mmengine => vec!["ema_state_dict.steps".into()],
        Layout::SwaUtils => vec![q("n_averaged", "module.")],
        Layout::EmaPytorch => vec![q("initted", "ema_model."), q("step", "ema_model.")],
        _ => Vec::new(),
    }
}

/// Pairs the tensors of `ckpt` in `layout` with `prefixes`.
fn pair_with(ckpt: &Checkpoint, layout: Layout, prefixes: &Prefixes) -> Result<Pairing> {
    let names: Vec<&str> = ckpt.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut pairs = Vec::new();
    let mut model_tensors = Vec::new();
    let mut shadow_tensors = Vec::new();
    let model_prefix = prefixes.model.clone();
    let shadow_prefix = prefixes.shadow.clone();
    if layout == Layout::Mmcv {
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
        shadow_tensors = pairs.iter().map(|p| (p.shadow, p.name.clone())).collect();
    } else {
        let counters = counters(layout, &shadow_prefix);
        let absent_model =
            model_prefix.is_empty() && matches!(layout, Layout::SwaUtils | Layout::EmaPytorch);
        let mut key = String::from(shadow_prefix.as_str());
        for (i, n) in names.iter().enumerate() {
            if let Some(plain) = n.strip_prefix(shadow_prefix.as_str()) {
                if !counters.iter().any(|c| c == n) {
                    shadow_tensors.push((i, plain.to_string()));
                }
                continue;
            }
            // A model side without a prefix holds every name outside the shadow side.
            if absent_model || counters.iter().any(|c| c == n) {
                continue;
            }
            if let Some(plain) = n.strip_prefix(model_prefix.as_str()) {
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
        shadow_prefix,
        pairs,
        model_tensors,
        shadow_tensors,
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
