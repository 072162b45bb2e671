//! Choosing the inputs (`--steps`, `--last`, `--best --metric --mode`): what is kept is folded
//! exactly as if only it had been given, `--dry-run` says what was dropped and why, and bad
//! choices fail in one line naming the file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Five checkpoints `iter_{100·k}` with a metadata `acc` (not monotone in the step), one with a
/// scalar tensor score as Lightning's ModelCheckpoint leaves it.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let accs = ["0.61", "0.74", "0.70", "0.79", "0.66"];
    (1..=5u32)
        .map(|k| {
            let vals: Vec<f32> = (0..6).map(|i| (i as f32 * 0.3 + k as f32).cos()).collect();
            let score = f32_bytes(&[1.0 / k as f32]);
            let step = (k * 100).to_string();
            let tensors = [
                Spec("w", "F32", &[2, 3], f32_bytes(&vals)),
                Spec(
                    "callbacks.ModelCheckpoint{'monitor': 'val_loss'}.current_score",
                    "F32",
                    &[],
                    score,
                ),
            ];
            let p = dir.join(format!("iter_{step}.safetensors"));
            std::fs::write(
                &p,
                file(&tensors, &[("step", &step), ("acc", accs[k as usize - 1])]),
            )
            .unwrap();
            p
        })
        .collect()
}

fn strs(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

/// The output of `ema --decay 0.5` over `inputs` with `extra` options.
fn fold(dir: &Path, name: &str, inputs: &[PathBuf], extra: &[&str]) -> Vec<u8> {
    let out = dir.join(name);
    let mut args = vec![
        "ema".to_string(),
        "--decay".into(),
        "0.5".into(),
        "-q".into(),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(strs(inputs));
    let o = run(&args);
    ok(&o);
    load(&out).0["w"].data.clone()
}

#[test]
fn what_is_kept_is_folded_as_if_only_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let all = inputs(dir.path());
    let pick = |ks: &[usize]| ks.iter().map(|&k| all[k].clone()).collect::<Vec<_>>();
    let cases: [(&[&str], &[usize]); 6] = [
        (&["--steps", "200:400"], &[1, 2, 3]),
        (&["--steps", "300:"], &[2, 3, 4]),
        (&["--last", "2"], &[3, 4]),
        (&["--steps", ":400", "--last", "2"], &[2, 3]),
        // acc 0.74 (200) and 0.79 (400), folded in step order.
        (&["--best", "2", "--metric", "acc"], &[1, 3]),
        // The scalar tensor by the end of its name; the smallest are the latest.
        (
            &["--best", "2", "--metric", "current_score", "--mode", "min"],
            &[3, 4],
        ),
    ];
    for (i, (extra, kept)) in cases.iter().enumerate() {
        let chosen = fold(dir.path(), &format!("c{i}.safetensors"), &all, extra);
        let given = fold(dir.path(), &format!("g{i}.safetensors"), &pick(kept), &[]);
        assert_eq!(chosen, given, "{extra:?}");
    }
    // Given in any order, the choice is made after ordering.
    let mut shuffled = all.clone();
    shuffled.reverse();
    assert_eq!(
        fold(dir.path(), "r.safetensors", &shuffled, &["--last", "2"]),
        fold(dir.path(), "r2.safetensors", &pick(&[3, 4]), &[])
    );
}

#[test]
fn dry_run_says_what_was_dropped_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let all = inputs(dir.path());
    let mut args: Vec<String> = [
        "ema",
        "--best",
        "2",
        "--metric",
        "acc",
        "--dry-run",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(strs(&all));
    let o = run(&args);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let dropped = v["dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 3);
    assert_eq!(dropped[0]["step"], 100);
    let why = dropped[0]["why"].as_str().unwrap();
    assert!(why.contains("acc 0.61") && why.contains("best 2"), "{why}");
    let kept: Vec<f64> = v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metric"].as_f64().unwrap())
        .collect();
    assert_eq!(kept, vec![0.74, 0.79]);
    // The human plan lists them too.
    args.retain(|a| a != "--json");
    let o = run(&args);
    ok(&o);
    let text = stdout(&o);
    assert_eq!(text.matches("dropped   ").count(), 3, "{text}");
    assert!(
        text.contains("iter_300.safetensors (step 300): acc 0.7 is not among"),
        "{text}"
    );
}

#[test]
fn bad_choices_fail_in_one_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let all = inputs(dir.path());
    let out = dir.path().join("out.safetensors");
    let attempt = |extra: &[&str], inputs: &[PathBuf]| {
        let mut args: Vec<String> = vec!["ema".into(), "-o".into(), out.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(strs(inputs));
        run(&args)
    };
    // A metric that one input lacks: exit 1, naming that file.
    let no_acc = dir.path().join("iter_600.safetensors");
    std::fs::write(
        &no_acc,
        file(
            &[Spec("w", "F32", &[2, 3], f32_bytes(&[0.0; 6]))],
            &[("step", "600")],
        ),
    )
    .unwrap();
    let mut with = all.clone();
    with.push(no_acc.clone());
    let o = attempt(&["--best", "2", "--metric", "acc"], &with);
    assert_eq!(code(&o), 1);
    assert_one_line_error(&stderr(&o), "iter_600.safetensors", "missing metric");
    assert!(stderr(&o).contains("no metric `acc`"), "{}", stderr(&o));
    // A metric that is not a number.
    let text_acc = dir.path().join("iter_700.safetensors");
    std::fs::write(
        &text_acc,
        file(
            &[Spec("w", "F32", &[2, 3], f32_bytes(&[0.0; 6]))],
            &[("step", "700"), ("acc", "high")],
        ),
    )
    .unwrap();
    let o = attempt(&["--best", "1", "--metric", "acc"], &[text_acc]);
    assert_eq!(code(&o), 1);
    assert_one_line_error(&stderr(&o), "iter_700.safetensors", "metric not a number");
    // Usage errors (exit 2): nothing left, --best without --metric, --last 0.
    for extra in [
        &["--steps", "900:"][..],
        &["--best", "2"],
        &["--metric", "acc"],
        &["--last", "0"],
        &["--steps", "5:1"],
    ] {
        let o = attempt(extra, &all);
        assert_eq!(code(&o), 2, "{extra:?}: {}", stderr(&o));
    }
    // --steps needs a step for every input.
    let stepless = dir.path().join("final.safetensors");
    std::fs::write(
        &stepless,
        file(&[Spec("w", "F32", &[2, 3], f32_bytes(&[0.0; 6]))], &[]),
    )
    .unwrap();
    let o = attempt(&["--steps", "100:", "--order", "given"], &[stepless]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_one_line_error(&stderr(&o), "final.safetensors", "no step");
    assert!(!out.exists(), "an output was written");
}

#[test]
fn swa_and_posthoc_choose_too() {
    let dir = tempfile::tempdir().unwrap();
    let all = inputs(dir.path());
    let swa = |name: &str, extra: &[&str], inputs: &[PathBuf]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "swa".to_string(),
            "-q".into(),
            "-o".into(),
            out.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(strs(inputs));
        ok(&run(&args));
        load(&out).0["w"].data.clone()
    };
    assert_eq!(
        swa("a.safetensors", &["--last", "3"], &all),
        swa("b.safetensors", &[], &all[2..])
    );
    // posthoc: the snapshots from step 60 on, as if the folder held only those.
    let folder = fixtures().join("posthoc/run");
    let o = run([
        "posthoc",
        folder.to_str().unwrap(),
        "--snapshot-sigma-rels",
        "0.05,0.28",
        "--sigma-rel",
        "0.1",
        "--steps",
        "60:",
        "--dry-run",
        "--json",
    ]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["dropped"].as_array().unwrap().len(), 4, "{v}");
    let steps: Vec<u64> = v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.iter().all(|&s| s >= 60) && steps.len() == 8,
        "{steps:?}"
    );
}
