//! Command-line behaviour (`docs/cli.md`): dry runs, JSON summaries, defaults, quiet runs,
//! provenance metadata, file permissions.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::Value;

fn convnet() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures().join("convnet"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".safetensors"))
        .collect();
    v.sort(); // as a shell glob would: iter_10 before iter_5
    v
}

#[test]
fn dry_run_prints_the_plan_in_step_order_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ema.safetensors");
    let mut args = vec![
        "ema".to_string(),
        "--momentum".into(),
        "0.5".into(),
        "-n".into(),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(convnet());
    let o = run(&args);
    ok(&o);
    let text = stdout(&o);
    let steps: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("iter_"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(steps, vec![5, 10, 20, 40, 80, 160, 320], "{text}");
    assert!(text.contains("order     step"), "{text}");
    assert!(!out.exists());
}

#[test]
fn json_summary_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("swa.safetensors");
    let mut args = vec![
        "swa".to_string(),
        "--json".into(),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(convnet());
    let o = run(&args);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["command"], "swa");
    assert_eq!(v["order"], "step");
    assert_eq!(v["inputs"].as_array().unwrap().len(), 7);
    assert_eq!(v["inputs"][0]["step"], 5);
    assert!((v["inputs"][3]["weight"].as_f64().unwrap() - 1.0 / 7.0).abs() < 1e-15);
    assert_eq!(
        v["bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    assert!(v["seconds"].as_f64().is_some());
    assert_eq!(v["output"], out.display().to_string());
    // The same record, as provenance, in the output's metadata.
    let (_, meta) = load(&out);
    let rec: Value = serde_json::from_str(&meta["ema_tool"]).unwrap();
    assert_eq!(rec["command"], "swa");
    assert_eq!(rec["inputs"], v["inputs"]);
    assert_eq!(meta["step"], "320", "the last input's metadata is kept");
}

#[test]
fn default_output_name_quiet_run_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["ema".to_string(), "-q".into()];
    args.extend(convnet());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ema-tool"))
        .args(&args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    ok(&o);
    assert!(
        o.stderr.is_empty() && o.stdout.is_empty(),
        "--quiet printed something"
    );
    let out = dir.path().join("ema.safetensors");
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

#[test]
fn auto_order_without_steps_keeps_the_given_order_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str, v: f32| {
        let p = dir.path().join(name);
        save(
            &p,
            &[("x", safetensors::Dtype::F32, vec![1], f32_bytes(&[v]))],
            &[],
        );
        p.display().to_string()
    };
    let (b, a) = (
        mk("model_b.safetensors", 2.0),
        mk("model_a.safetensors", 1.0),
    );
    let o = run(["ema", "--momentum", "0.25", "-n", "--json", &b, &a]);
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.starts_with("ema-tool: warning: ") && err.contains("order given"),
        "{err}"
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["order"], "given");
    assert_eq!(v["inputs"][0]["path"], b);
    // --order name folds model_a first, without a warning.
    let o = run([
        "ema",
        "--momentum",
        "0.25",
        "-n",
        "--json",
        "--order",
        "name",
        &b,
        &a,
    ]);
    ok(&o);
    assert!(o.stderr.is_empty());
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["inputs"][0]["path"], a);
    assert_eq!(v["inputs"][1]["weight"], 0.25);
}

#[test]
fn completions_are_printed() {
    let o = run(["completions", "bash"]);
    ok(&o);
    assert!(stdout(&o).contains("ema-tool"));
}
