//! Sweeps (`docs/strategies.md#sweeps`): lists of option values, one output per combination,
//! all from one read of the inputs. Every output is the single run of its values bit for bit;
//! targets are checked before any work; a failure or a kill leaves no target behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

fn series(name: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures().join(name))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    v.sort();
    v
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `args` (an ema-tool call), expecting success.
fn runs(args: &[String]) -> std::process::Output {
    let o = run(args);
    ok(&o);
    o
}

/// A sweep and the single runs of each of its values write the same bytes. `singles[0].1`
/// is the name of the swept option; the others are (single run, value as typed).
fn check_sweep(inputs: &[String], sweep: &[&str], singles: &[(&[&str], &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = sweep.iter().map(|a| a.to_string()).collect();
    args.extend(inputs.iter().cloned());
    let placeholder = singles[0].1;
    let template = s(&dir
        .path()
        .join(format!("sweep-{{{placeholder}}}.safetensors")));
    args.extend(["-o".into(), template.clone(), "-q".into()]);
    runs(&args);
    for (single, value) in &singles[1..] {
        let out = dir.path().join(format!("single-{value}.safetensors"));
        let mut a: Vec<String> = single.iter().map(|x| x.to_string()).collect();
        a.extend(inputs.iter().cloned());
        a.extend(["-o".into(), s(&out), "-q".into()]);
        runs(&a);
        let swept = template.replace(&format!("{{{placeholder}}}"), value);
        let (x, y) = (std::fs::read(&out).unwrap(), std::fs::read(&swept).unwrap());
        assert!(
            x == y,
            "{sweep:?}: output {swept} differs from the single run {single:?}"
        );
    }
}

#[test]
fn every_output_of_a_sweep_is_the_single_run_bit_for_bit() {
    let conv = series("convnet");
    check_sweep(
        &conv,
        &["ema", "--decay", "0.9,0.99,0.9990"],
        &[
            (&[], "decay"),
            (&["ema", "--decay", "0.9"], "0.9"),
            (&["ema", "--decay", "0.99"], "0.99"),
            (&["ema", "--decay", "0.9990"], "0.9990"),
        ],
    );
    check_sweep(
        &conv,
        &[
            "ema",
            "--strategy",
            "power",
            "--sigma-rel",
            "0.05,0.2",
            "--per-iter",
        ],
        &[
            (&[], "sigma_rel"),
            (
                &[
                    "ema",
                    "--strategy",
                    "power",
                    "--sigma-rel",
                    "0.05",
                    "--per-iter",
                ],
                "0.05",
            ),
            (
                &[
                    "ema",
                    "--strategy",
                    "power",
                    "--sigma-rel",
                    "0.2",
                    "--per-iter",
                ],
                "0.2",
            ),
        ],
    );
    check_sweep(
        &conv,
        &["swa", "--interval", "1,2"],
        &[(&[], "interval"), (&["swa", "--interval", "2"], "2")],
    );
    // bf16 inputs, a conversion of the output and skipped buffers.
    let bf16 = series("transformer_bf16");
    check_sweep(
        &bf16,
        &[
            "ema",
            "--strategy",
            "mmcv",
            "--momentum",
            "0.1,0.3",
            "--dtype",
            "f16",
            "--skip-buffers",
        ],
        &[
            (&[], "momentum"),
            (
                &[
                    "ema",
                    "--strategy",
                    "mmcv",
                    "--momentum",
                    "0.1",
                    "--dtype",
                    "f16",
                    "--skip-buffers",
                ],
                "0.1",
            ),
            (
                &[
                    "ema",
                    "--strategy",
                    "mmcv",
                    "--momentum",
                    "0.3",
                    "--dtype",
                    "f16",
                    "--skip-buffers",
                ],
                "0.3",
            ),
        ],
    );
}

/// The outputs of a sweep over values that have references from mmengine's classes
/// (`fixtures/cases.json`) agree with them.
#[test]
fn a_sweep_matches_the_references_of_its_values() {
    let dir = tempfile::tempdir().unwrap();
    let conv = series("convnet");
    let mut args = vec![
        "ema".to_string(),
        "--strategy".into(),
        "annealing".into(),
        "--momentum".into(),
        "0.0002,0.4".into(),
        "--gamma".into(),
        "100,3".into(),
    ];
    args.extend(conv);
    let template = dir.path().join("a-{momentum}-{gamma}.safetensors");
    args.extend(["-o".into(), s(&template), "-q".into()]);
    runs(&args);
    for (file, reference) in [
        (
            "a-0.0002-100.safetensors",
            "reference/annealing-gamma100.safetensors",
        ),
        (
            "a-0.4-3.safetensors",
            "reference/annealing-gamma3-m0.4.safetensors",
        ),
    ] {
        let (got, _) = load(&dir.path().join(file));
        let (want, _) = load(&fixtures().join(reference));
        for (name, w) in &want {
            let g = &got[name];
            if w.dtype.starts_with('I') {
                assert_eq!(g, w, "{file}: {name}");
            } else {
                close(
                    &format!("{file}: {name}"),
                    &g.dtype,
                    &g.values(),
                    &w.values(),
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn dry_run_shows_the_weight_table_and_json_lists_the_outputs() {
    let conv = series("convnet");
    let mut args = vec![
        "ema".to_string(),
        "--decay".into(),
        "0.9,0.99".into(),
        "--dry-run".into(),
    ];
    args.extend(conv.iter().cloned());
    let o = runs(&args);
    let text = stdout(&o);
    assert!(
        text.contains("output 0  ema-0.9.safetensors  (decay 0.9)"),
        "{text}"
    );
    // Input 6 (the last) weighs 1 − 0.9 and 1 − 0.99.
    let last = text
        .lines()
        .find(|l| l.trim_start().starts_with("6 "))
        .unwrap();
    assert!(
        last.contains("1.000000e-1") && last.contains("1.000000e-2"),
        "{last}"
    );
    args.push("--json".into());
    let v: Value = serde_json::from_str(&stdout(&runs(&args))).unwrap();
    let outs = v["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[1]["path"], "ema-0.99.safetensors");
    // (serde_json's parser is not exact in the last bit: compare within one.)
    let m = outs[1]["params"]["momentum"].as_f64().unwrap();
    assert!((m - (1.0 - 0.99)).abs() < 1e-17, "{m}");
    let w: Vec<f64> = outs[0]["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(w.len(), 7);
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn a_template_without_the_varying_name_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let conv = series("convnet");
    for (opts, out, fragment) in [
        (
            vec!["--decay", "0.9,0.99"],
            "ema.safetensors",
            "put {decay} in it",
        ),
        (
            vec!["--decay", "0.9,0.99"],
            "ema-{tau}.safetensors",
            "`{tau}` names no option",
        ),
        (
            vec!["--decay", "0.9,0.9"],
            "ema-{decay}.safetensors",
            "a value given twice",
        ),
        (
            vec!["--gamma", "1,2"],
            "ema-{gamma}.safetensors",
            "--gamma takes several values",
        ),
    ] {
        let mut args: Vec<String> = vec!["ema".into()];
        args.extend(opts.iter().map(|x| x.to_string()));
        args.extend(conv.iter().cloned());
        args.extend(["-o".into(), s(&dir.path().join(out))]);
        let o = run(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert_one_line_error(&stderr(&o), fragment, out);
    }
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn an_existing_target_stops_the_whole_sweep_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let conv = series("convnet");
    let taken = dir.path().join("ema-0.99.safetensors");
    std::fs::write(&taken, b"keep me").unwrap();
    let mut args = vec!["ema".to_string(), "--decay".into(), "0.9,0.99,0.999".into()];
    args.extend(conv.iter().cloned());
    args.extend(["-o".into(), s(&dir.path().join("ema-{decay}.safetensors"))]);
    let o = run(&args);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_one_line_error(&stderr(&o), "already exists", "sweep");
    assert_eq!(
        entries(dir.path()),
        vec!["ema-0.99.safetensors".to_string()]
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
    // With --force every target is written.
    args.push("--force".into());
    runs(&args);
    assert_eq!(entries(dir.path()).len(), 3);
    assert_ne!(std::fs::read(&taken).unwrap(), b"keep me");
}

#[test]
fn a_failure_during_the_fold_leaves_no_target_of_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    // The second input holds a NaN: --check-finite fails the fold after the writers exist.
    let mk = |name: &str, v: f32| {
        let p = dir.path().join(name);
        let data = f32_bytes(&[1.0, v, 3.0]);
        std::fs::write(&p, file(&[Spec("w", "F32", &[3], data)], &[])).unwrap();
        p
    };
    let inputs = [mk("a_1.safetensors", 2.0), mk("b_2.safetensors", f32::NAN)];
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut args = vec![
        "ema".to_string(),
        "--decay".into(),
        "0.5,0.9".into(),
        "--check-finite".into(),
    ];
    args.extend(inputs.iter().map(|p| s(p)));
    args.extend(["-o".into(), s(&out.join("e-{decay}.safetensors"))]);
    let o = run(&args);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(entries(&out).is_empty(), "{:?}", entries(&out));
}

/// SIGKILL in the middle of a sweep leaves no partial target: each is absent or complete.
#[test]
fn a_killed_sweep_leaves_no_partial_target() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = big_inputs(dir.path(), 3, 8, 1 << 20);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut rng = Rng::new("a_killed_sweep_leaves_no_partial_target");
    let mut complete = Vec::new();
    for round in 0..6 {
        for e in entries(&out) {
            std::fs::remove_file(out.join(e)).unwrap();
        }
        let mut child = Command::new(bin())
            .arg("ema")
            .args(["--decay", "0.9,0.99,0.999,0.9999", "-q"])
            .args(&inputs)
            .arg("-o")
            .arg(out.join("e-{decay}.safetensors"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(
            rng.below(120 + 40 * round),
        ));
        let _ = child.kill();
        let _ = child.wait();
        for e in entries(&out) {
            if e.starts_with(".ema-tool-") {
                continue; // left by SIGKILL, never a target
            }
            let p: PathBuf = out.join(&e);
            // A target is there only complete: the reference crate reads all of it.
            let (tensors, _) = load(&p);
            assert_eq!(tensors.len(), 8, "{e}");
            complete.push(e);
        }
    }
    eprintln!("complete targets seen after kills: {}", complete.len());
}
