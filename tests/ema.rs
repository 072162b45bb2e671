//! `ema` and `swa` against the reference implementations: every case of `fixtures/cases.json`
//! (made by `fixtures/gen.py` with mmengine, the mmcv/mmdet hook code and timm) is run through
//! the binary and compared within the tolerances of `docs/accuracy.md`.

mod common;

use common::*;
use serde_json::Value;

/// The safetensors cases, the same folds over `.pth` series (`pth_cases.json`), and the
/// ecosystem's schedules (`schedules/cases.json`, made by `fixtures/gen_schedules.py`).
fn cases() -> Vec<Value> {
    ["cases.json", "pth_cases.json", "schedules/cases.json"]
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(fixtures().join(f)).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            v["cases"].as_array().unwrap().clone()
        })
        .collect()
}

/// Runs one case; returns the first disagreement.
fn check_case(case: &Value, dir: &std::path::Path, extra: &[&str]) -> Result<(), String> {
    let name = case["name"].as_str().unwrap();
    let out = dir.join(format!("{name}.safetensors"));
    let mut args = common::case_args(case, &fixtures());
    args.extend([
        "-o".to_string(),
        out.display().to_string(),
        "-q".into(),
        "-f".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run(&args);
    if !o.status.success() {
        return Err(format!("{name}: exit {:?}: {}", o.status, stderr(&o)));
    }
    let (got, meta) = load(&out);
    let (want, _) = load(&fixtures().join(case["expected"].as_str().unwrap()));
    let got_names: Vec<&String> = got.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    if got_names != want_names {
        return Err(format!(
            "{name}: tensors {got_names:?}, expected {want_names:?}"
        ));
    }
    if !meta.contains_key("ema_tool") {
        return Err(format!("{name}: no ema_tool provenance metadata"));
    }
    for (t, w) in &want {
        let g = &got[t];
        if g.shape != w.shape {
            return Err(format!(
                "{name}: {t} has shape {:?}, expected {:?}",
                g.shape, w.shape
            ));
        }
        if w.dtype.starts_with('I') {
            if g != w {
                return Err(format!("{name}: integer tensor {t} differs"));
            }
            continue;
        }
        close(&format!("{name}: {t}"), &g.dtype, &g.values(), &w.values())?;
    }
    Ok(())
}

#[test]
fn every_reference_case_matches() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(
        cases.len() >= 40,
        "fixtures/cases.json or schedules/cases.json lost cases"
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| check_case(c, dir.path(), &[]).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn output_dtype_follows_the_input_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    for c in cases() {
        let name = c["name"].as_str().unwrap();
        if !name.starts_with("bf16-") {
            continue;
        }
        check_case(&c, dir.path(), &[]).unwrap();
        let (got, _) = load(&dir.path().join(format!("{name}.safetensors")));
        let want = if name.ends_with("dtype-f32") {
            "F32"
        } else {
            "BF16"
        };
        for (t, v) in got {
            if !v.dtype.starts_with('I') {
                assert_eq!(v.dtype, want, "{name}: {t}");
            }
        }
    }
}

#[test]
fn thread_count_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "exponential-m0.1")
        .unwrap();
    let inputs: Vec<String> = case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| fixtures().join(i.as_str().unwrap()).display().to_string())
        .collect();
    let mut outs = Vec::new();
    for threads in ["1", "2", "5"] {
        let out = dir.path().join(format!("t{threads}.safetensors"));
        let mut args = vec![
            "ema".to_string(),
            "--momentum".into(),
            "0.1".into(),
            "-q".into(),
            "-j".into(),
            threads.into(),
            "-o".into(),
            out.display().to_string(),
        ];
        args.extend(inputs.iter().cloned());
        ok(&run(&args));
        outs.push(load(&out).0);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}
