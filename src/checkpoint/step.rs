//! A checkpoint's training step (`docs/formats.md#steps`): a metadata entry, else the last
//! number in the file name.

use std::collections::BTreeMap;
use std::path::Path;

use crate::codec::names::strip_known_extensions;

/// Where a checkpoint's step came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepSource {
    /// A metadata key (safetensors `__metadata__` or a plain number in a `.pth`).
    Metadata(String),
    /// The last integer in the file name.
    FileName,
}

/// Metadata keys of safetensors files that hold the step, in order of preference.
pub const SAFETENSORS_STEP_KEYS: [&str; 5] = ["step", "global_step", "iter", "iteration", "epoch"];
/// Plain values of a `.pth` that hold the step, in order of preference.
pub const TORCH_STEP_KEYS: [&str; 5] = ["meta.iter", "meta.epoch", "global_step", "epoch", "iter"];

/// The step of a checkpoint: the first metadata key of `keys` holding an integer, else the last
/// integer in the file name.
pub fn find(
    metadata: &BTreeMap<String, String>,
    keys: &[&str],
    path: &Path,
) -> Option<(u64, StepSource)> {
    for k in keys {
        if let Some(v) = metadata.get(*k) {
            if let Some(s) = parse_value(v) {
                return Some((s, StepSource::Metadata((*k).to_string())));
            }
        }
    }
    from_file_name(path).map(|s| (s, StepSource::FileName))
}

/// Parses `"1000"`, `"1000.0"` as a step.
fn parse_value(v: &str) -> Option<u64> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    let f: f64 = v.parse().ok()?;
    (f >= 0.0 && f.fract() == 0.0 && f < 2f64.powi(63)).then_some(f as u64)
}

/// The last run of digits in the file name (`iter_1000.safetensors` → 1000,
/// `checkpoint-4.pth.tar` → 4, `model_0001000.pth` → 1000).
pub fn from_file_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let name = strip_known_extensions(name);
    let bytes = name.as_bytes();
    let end = bytes.iter().rposition(|b| b.is_ascii_digit())? + 1;
    let start = bytes[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    name[start..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_from_names() {
        let s = |n: &str| from_file_name(Path::new(n));
        assert_eq!(s("iter_1000.safetensors"), Some(1000));
        assert_eq!(s("dir_7/epoch_12.pth"), Some(12));
        assert_eq!(s("checkpoint-4.pth.tar"), Some(4));
        assert_eq!(s("model_0001000.pth"), Some(1000));
        assert_eq!(s("model.safetensors"), None);
        assert_eq!(s("v2_step300_final.ckpt"), Some(300));
    }

    #[test]
    fn step_values() {
        assert_eq!(parse_value("12"), Some(12));
        assert_eq!(parse_value("12.0"), Some(12));
        assert_eq!(parse_value("12.5"), None);
        assert_eq!(parse_value("-3"), None);
        assert_eq!(parse_value("abc"), None);
    }

    #[test]
    fn metadata_keys_come_first_in_their_order() {
        let m = BTreeMap::from([
            ("epoch".to_string(), "3".to_string()),
            ("global_step".to_string(), "300".to_string()),
        ]);
        let p = Path::new("iter_7.safetensors");
        assert_eq!(
            find(&m, &SAFETENSORS_STEP_KEYS, p),
            Some((300, StepSource::Metadata("global_step".into())))
        );
        assert_eq!(
            find(&BTreeMap::new(), &SAFETENSORS_STEP_KEYS, p),
            Some((7, StepSource::FileName))
        );
    }
}
