//! `inspect`: headers, layouts, `--tensors`, `--stats`, `--json`.

mod common;

use common::*;
use safetensors::Dtype;
use serde_json::Value;

#[test]
fn json_describes_format_counts_dtypes_step_and_layout() {
    let p = fixtures().join("swap/mmengine_epoch_2.safetensors");
    let o = run(["inspect", "--json", "--tensors", p.to_str().unwrap()]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let f = &v["files"][0];
    assert_eq!(f["format"], "safetensors");
    assert_eq!(f["tensors"], 43);
    assert_eq!(f["dtypes"]["F32"], 38);
    assert_eq!(f["dtypes"]["I64"], 5);
    assert_eq!(f["step"], 2);
    assert_eq!(f["step_source"], "filename");
    assert_eq!(f["layout"]["name"], "mmengine");
    assert_eq!(f["layout"]["ema_on"], "model");
    let list = f["tensor_list"].as_array().unwrap();
    assert_eq!(list.len(), 43);
    let params: u64 = list
        .iter()
        .map(|t| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert_eq!(f["parameters"].as_u64().unwrap(), params);
    assert!(
        list.iter().all(|t| t.get("stats").is_none()),
        "stats without --stats"
    );
}

#[test]
fn stats_are_exact_on_known_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.safetensors");
    save(
        &p,
        &[(
            "v",
            Dtype::F32,
            vec![6],
            f32_bytes(&[1.0, 2.0, 3.0, 4.0, f32::NAN, f32::INFINITY]),
        )],
        &[("step", "7")],
    );
    let o = run(["inspect", "--json", "--stats", p.to_str().unwrap()]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let f = &v["files"][0];
    assert_eq!(f["step"], 7);
    assert_eq!(f["step_source"]["metadata"], "step");
    let st = &f["tensor_list"][0]["stats"];
    assert_eq!(st["min"], 1.0);
    assert_eq!(st["max"], 4.0);
    assert_eq!(st["mean"], 2.5);
    assert!((st["std"].as_f64().unwrap() - 1.2909944487358056).abs() < 1e-12);
    assert_eq!(st["nan"], 1);
    assert_eq!(st["inf"], 1);
}

#[test]
fn human_output_has_one_block_per_file() {
    let a = fixtures().join("convnet/iter_5.safetensors");
    let b = fixtures().join("swap/timm_checkpoint-1.safetensors");
    let o = run(["inspect", "-t", a.to_str().unwrap(), b.to_str().unwrap()]);
    ok(&o);
    let out = stdout(&o);
    assert!(out.contains("iter_5.safetensors") && out.contains("timm_checkpoint-1.safetensors"));
    assert!(out.contains("layout      timm:"), "{out}");
    assert!(out.contains("no EMA/raw pairs"), "{out}");
    assert!(out.contains("step        5 (metadata `step`)"), "{out}");
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
}
