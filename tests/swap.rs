//! `swap` and `swap --deploy` against checkpoints written by the real libraries (an mmengine
//! Runner with EMAHook, the mmcv and mmdet hooks, timm): `fixtures/swap/cases.json`.

mod common;

use common::*;
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("swap/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn fx(case: &Value, key: &str) -> std::path::PathBuf {
    fixtures().join(case[key].as_str().unwrap())
}

/// Tensors equal bit for bit, names and dtypes included.
fn assert_same(name: &str, got: &std::path::Path, want: &std::path::Path) {
    let (g, _) = load(got);
    let (w, _) = load(want);
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "{name}: names"
    );
    for (k, t) in &w {
        assert_eq!(&g[k], t, "{name}: tensor {k}");
    }
}

#[test]
fn swap_and_deploy_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 4);
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let input = fx(c, "input");
        for (mode, key, extra) in [
            ("swap", "swap_expected", vec![]),
            ("deploy", "deploy_expected", vec!["--deploy"]),
            (
                "deploy_raw",
                "deploy_raw_expected",
                vec!["--deploy", "--raw"],
            ),
        ] {
            let out = dir.path().join(format!("{name}.{mode}.safetensors"));
            let mut args = vec![
                "swap".to_string(),
                input.display().to_string(),
                "-q".into(),
                "-o".into(),
                out.display().to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let o = run(&args);
            ok(&o);
            assert_same(&format!("{name} {mode}"), &out, &fx(c, key));
        }
        // The layout and pair count are what the fixture says.
        let o = run(["inspect", "--json", input.to_str().unwrap()]);
        ok(&o);
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        let layout = &v["files"][0]["layout"];
        assert_eq!(layout["name"], c["layout"], "{name}");
        assert_eq!(layout["pairs"], c["pairs"], "{name}");
        assert_eq!(layout["ema_on"], c["ema_on"], "{name}");
    }
}

#[test]
fn swap_twice_is_the_identity_and_records_the_side() {
    let dir = tempfile::tempdir().unwrap();
    for c in cases() {
        let name = c["name"].as_str().unwrap();
        let input = fx(&c, "input");
        let once = dir.path().join(format!("{name}.1.safetensors"));
        let twice = dir.path().join(format!("{name}.2.safetensors"));
        ok(&run([
            "swap",
            input.to_str().unwrap(),
            "-q",
            "-o",
            once.to_str().unwrap(),
        ]));
        ok(&run([
            "swap",
            once.to_str().unwrap(),
            "-q",
            "-o",
            twice.to_str().unwrap(),
        ]));
        assert_same(name, &twice, &input);
        // The first swap moved the EMA to the other side, and says so; deploy follows it.
        let (_, meta) = load(&once);
        let rec: Value = serde_json::from_str(&meta["ema_tool"]).unwrap();
        let flipped = if c["ema_on"] == "model" {
            "shadow"
        } else {
            "model"
        };
        assert_eq!(rec["ema_on"], flipped, "{name}");
        let dep = dir.path().join(format!("{name}.dep.safetensors"));
        ok(&run([
            "swap",
            "--deploy",
            once.to_str().unwrap(),
            "-q",
            "-o",
            dep.to_str().unwrap(),
        ]));
        assert_same(name, &dep, &fx(&c, "deploy_expected"));
        // Other metadata passes through.
        let (_, orig) = load(&input);
        for (k, v) in orig {
            assert_eq!(meta.get(&k), Some(&v), "{name}: metadata {k}");
        }
    }
}

#[test]
fn ema_on_flag_overrides_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let c = cases()
        .into_iter()
        .find(|c| c["layout"] == "mmengine")
        .unwrap();
    let out = dir.path().join("d.safetensors");
    ok(&run([
        "swap",
        "--deploy",
        "--ema-on",
        "shadow",
        fx(&c, "input").to_str().unwrap(),
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]));
    // EMA said to be on the shadow side: deploying it gives what --raw gives by default.
    assert_same("ema-on shadow", &out, &fx(&c, "deploy_raw_expected"));
}

#[test]
fn no_pairs_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixtures().join("convnet/iter_5.safetensors");
    let out = dir.path().join("x.safetensors");
    let o = run(["swap", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with("ema-tool: ")
            && err.contains("iter_5.safetensors")
            && err.contains("no EMA/raw weight pairs"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.exists());
}
