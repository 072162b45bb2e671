//! `ema-tool posthoc` against `fixtures/posthoc/` (made by `fixtures/gen_posthoc.py` from a
//! real ema-pytorch `PostHocEMA` run): every case within the tolerances of
//! `docs/accuracy.md`, its weights as the reference solved them, the error cases, and a list of
//! sigma_rel values from one read equal to the single runs.

mod common;

use common::*;
use serde_json::Value;

fn cases() -> Value {
    let text = std::fs::read_to_string(fixtures().join("posthoc/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn args_of(case: &Value) -> Vec<String> {
    common::case_args(case, &fixtures())
}

#[test]
fn every_case_matches_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let all = cases();
    let cases = all["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "fixtures/posthoc/cases.json lost cases");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.safetensors"));
        let mut args = args_of(case);
        args.extend(["-o".into(), out.display().to_string(), "-q".into()]);
        let o = run(&args);
        if !o.status.success() {
            failures.push(format!("{name}: {}", stderr(&o)));
            continue;
        }
        let (got, meta) = load(&out);
        let (want, _) = load(&fixtures().join(case["expected"].as_str().unwrap()));
        for (t, w) in &want {
            let Some(g) = got.get(t) else {
                failures.push(format!("{name}: no tensor {t}"));
                continue;
            };
            if let Err(e) = close(&format!("{name}: {t}"), &g.dtype, &g.values(), &w.values()) {
                failures.push(e);
            }
        }
        // The counters come from the last snapshot, the step is the one synthesised.
        let step = args
            .iter()
            .position(|a| a == "--step")
            .map(|i| args[i + 1].clone())
            .unwrap_or_else(|| "120".into());
        if meta.get("step") != Some(&step) {
            failures.push(format!(
                "{name}: step metadata {:?}, expected {step}",
                meta.get("step")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_weights_are_those_of_the_reference_solve() {
    for case in cases()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut args = args_of(case);
        args.extend(["--dry-run".into(), "--json".into()]);
        let o = run(&args);
        ok(&o);
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        let got: Vec<f64> = v["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["weight"].as_f64().unwrap())
            .collect();
        let want: Vec<f64> = case["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1e-3),
                "{name}: {got:?} vs {want:?}"
            );
        }
        let cond = v["condition"].as_f64().unwrap();
        assert!(cond > 1.0 && cond < 1e10, "{name}: condition {cond}");
    }
}

#[test]
fn the_error_cases_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases()["errors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut args: Vec<String> = case["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap();
                if a.starts_with("posthoc/") {
                    fixtures().join(a).display().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect();
        args.extend([
            "-o".into(),
            dir.path().join("x.safetensors").display().to_string(),
        ]);
        let o = run(&args);
        let want = case["code"].as_i64().unwrap() as i32;
        assert_eq!(code(&o), want, "{name}: {}", stderr(&o));
        assert_one_line_error(&stderr(&o), case["fragment"].as_str().unwrap(), name);
        assert!(entries(dir.path()).is_empty(), "{name}");
    }
}

#[test]
fn a_list_of_sigma_rel_is_the_single_runs_from_one_read() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = fixtures().join("posthoc/run").display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "posthoc".to_string(),
            run_dir.clone(),
            "--snapshot-sigma-rels".into(),
            "0.05,0.28".into(),
            "--step".into(),
            "100".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let template = dir
        .path()
        .join("p-{sigma_rel}.safetensors")
        .display()
        .to_string();
    ok(&run(base(&[
        "--sigma-rel",
        "0.1,0.17,0.25",
        "-o",
        &template,
        "-q",
    ])));
    for s in ["0.1", "0.17", "0.25"] {
        let single = dir.path().join(format!("single-{s}.safetensors"));
        ok(&run(base(&[
            "--sigma-rel",
            s,
            "-o",
            &single.display().to_string(),
            "-q",
        ])));
        assert_eq!(
            std::fs::read(&single).unwrap(),
            std::fs::read(template.replace("{sigma_rel}", s)).unwrap(),
            "sigma_rel {s}"
        );
    }
}

#[test]
fn skip_buffers_copies_the_float_buffers_of_the_last_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.safetensors");
    let run_dir = fixtures().join("posthoc/run");
    ok(&run([
        "posthoc",
        &run_dir.display().to_string(),
        "--snapshot-sigma-rels",
        "0.05,0.28",
        "--sigma-rel",
        "0.15",
        "--skip-buffers",
        "-o",
        &out.display().to_string(),
        "-q",
    ]));
    let (got, _) = load(&out);
    // The last snapshot in EDM2's order: the latest step, the largest sigma_rel (profile 1).
    let (last, _) = load_pth_twin(&run_dir.join("1.120.pt"));
    for name in [
        "ema_model.bn.running_mean",
        "ema_model.bn.running_var",
        "initted",
        "step",
    ] {
        assert_eq!(got[name].data, last[name].data, "{name}");
    }
}

/// The tensors of a PyTorch snapshot, through ema-tool's reader (its own `inspect` cannot
/// print values): folded with weight 1 from itself, which copies.
fn load_pth_twin(path: &std::path::Path) -> (std::collections::BTreeMap<String, T>, ()) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("twin.safetensors");
    ok(&run([
        "swa",
        &path.display().to_string(),
        "-o",
        &out.display().to_string(),
        "-q",
    ]));
    (load(&out).0, ())
}
