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
    if let Some(Ok((nimg, _))) = edm2_name(path) {
        return Some(nimg);
    }
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

/// `<prefix>-<kimg>-<std>.pkl`, as EDM2's training loop names its snapshots: `None` for other
/// names; else the training time in images (EDM2's `kimg_to_nimg`: the multiple of 1024 whose
/// thousands are `kimg`) and the snapshot's sigma_rel, or an error when no multiple of 1024
/// has `kimg` thousands (EDM2 asserts the same).
pub fn edm2_name(p: &Path) -> Option<std::result::Result<(u64, f64), String>> {
    let name = p.file_name()?.to_str()?.strip_suffix(".pkl")?;
    let (rest, std) = name.rsplit_once('-')?;
    let (_, kimg) = rest.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (whole, frac) = std.split_once('.')?;
    if !digits(kimg) || !digits(whole) || !digits(frac) {
        return None;
    }
    let std: f64 = std.parse().ok()?;
    let Some(nimg) = kimg
        .parse::<u64>()
        .ok()
        .and_then(|k| Some(k.checked_mul(1000)?.checked_add(999)? / 1024 * 1024))
        .filter(|n| n / 1000 == kimg.parse::<u64>().unwrap_or(u64::MAX))
    else {
        return Some(Err(format!(
            "names {kimg} kimg, which no EDM2 snapshot has (its time is a multiple of 1024 \
             images, and none has {kimg} thousands)"
        )));
    };
    Some(Ok((nimg, std)))
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
        // EDM2: the time in images, not the sigma_rel that ends the name.
        assert_eq!(s("network-snapshot-0002147-0.100.pkl"), Some(2_147_328));
    }

    #[test]
    fn edm2_names_give_edm2_times() {
        // EDM2's kimg_to_nimg: (kimg * 1000 + 999) // 1024 * 1024.
        let t = |n: &str| edm2_name(Path::new(n));
        assert_eq!(
            t("network-snapshot-0000128-0.050.pkl"),
            Some(Ok((128_000, 0.05)))
        );
        assert_eq!(t("phema-0002147-0.100.pkl"), Some(Ok((2_147_328, 0.1))));
        assert_eq!(t("run/x-y-0000001-0.200.pkl"), Some(Ok((1024, 0.2))));
        assert_eq!(t("network-snapshot-0000128.pkl"), None);
        assert_eq!(t("network-snapshot-0000128-0.050.pt"), None);
        assert_eq!(t("network-snapshot-12a-0.050.pkl"), None);
        // No multiple of 1024 images has 42 thousands.
        assert!(matches!(t("net-0000042-0.050.pkl"), Some(Err(e)) if e.contains("42 kimg")));
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
