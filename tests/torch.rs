//! PyTorch checkpoints end to end: the binary on the fixtures of `fixtures/gen_torch.py`
//! (made by real mmengine, timm and torch runs), outputs in a temporary directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::run_in;
use ema_tool::checkpoint::{Checkpoint, Open};
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::fixtures().join("torch")
}

fn fx(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> Output {
    run_in(&fixtures(), args)
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "ema-tool {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs and expects exit status `code` and one line on stderr; returns it.
fn fails(args: &[&str], code: i32) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "ema-tool {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.starts_with("ema-tool: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    err
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).expect("JSON on stdout")
}

/// Every tensor of a checkpoint: name → (dtype, shape, bytes).
fn tensors(path: &str) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    common::read_tensors(path)
        .into_iter()
        .map(|(n, (d, s, b))| (n, d, s, b))
        .collect()
}

/// The two checkpoints hold the same tensors, bit for bit (order aside).
fn assert_same(a: &str, b: &str) {
    let mut x = tensors(a);
    let mut y = tensors(b);
    x.sort();
    y.sort();
    let names = |v: &[(String, String, Vec<usize>, Vec<u8>)]| -> Vec<String> {
        v.iter().map(|t| t.0.clone()).collect()
    };
    assert_eq!(names(&x), names(&y), "{a} vs {b}");
    for (p, q) in x.iter().zip(&y) {
        assert_eq!(p, q, "{a} vs {b}: tensor `{}` differs", p.0);
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn out(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_string_lossy().into_owned()
}

#[test]
fn mmengine_deploy_is_the_state_dict_torch_loads() {
    let d = tmp();
    let o = out(&d, "model.safetensors");
    ok(&["swap", "--deploy", &fx("mmengine/epoch_2.pth"), "-o", &o]);
    assert_same(&o, &fx("mmengine/epoch_2.state_dict.safetensors"));
    let raw = out(&d, "raw.safetensors");
    ok(&[
        "swap",
        "--deploy",
        "--raw",
        &fx("mmengine/epoch_2.pth"),
        "-o",
        &raw,
    ]);
    assert_same(&raw, &fx("mmengine/epoch_2.raw.safetensors"));
}

#[test]
fn mmengine_checkpoint_reads_whole() {
    let d = tmp();
    let o = out(&d, "all.safetensors");
    // A one-input fold copies every tensor.
    ok(&["ema", &fx("mmengine/epoch_2.pth"), "-o", &o]);
    assert_same(&o, &fx("mmengine/epoch_2.expected.safetensors"));

    let v = json(&["inspect", "--json", &fx("mmengine/epoch_2.pth")]);
    let f = &v["files"][0];
    assert_eq!(f["format"], "torch");
    assert_eq!(f["step"], 8, "meta.iter");
    assert_eq!(f["step_source"]["metadata"], "meta.iter");
    assert_eq!(f["metadata"]["meta.epoch"], "2");
    assert_eq!(f["layout"]["name"], "mmengine");
    assert_eq!(f["layout"]["ema_on"], "model");
    let top: Vec<&str> = f["tree"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        top,
        [
            "meta",
            "state_dict",
            "message_hub",
            "optimizer",
            "ema_state_dict"
        ]
    );
    let kinds: Vec<&str> = f["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"mmengine.logging.history_buffer.HistoryBuffer"),
        "{kinds:?}"
    );
    let hub = &f["tree"][2];
    assert_eq!(hub["tensors"], 0);
    assert!(hub["skipped"].as_u64().unwrap() > 0);

    let human = ok(&["inspect", &fx("mmengine/epoch_2.pth")]);
    assert!(human.contains("tree        meta: dict"), "{human}");
    assert!(human.contains("(mmengine.logging.history_buffer.HistoryBuffer)"));
}

#[test]
fn swap_inside_a_pth_twice_gives_back_the_input() {
    let d = tmp();
    let (a, b) = (out(&d, "a.pth"), out(&d, "b.pth"));
    let input = fx("mmengine/epoch_2.pth");
    ok(&["swap", &input, "-o", &a]);
    ok(&["swap", &a, "-o", &b]);
    assert_eq!(
        std::fs::read(&b).unwrap(),
        std::fs::read(&input).unwrap(),
        "swap∘swap"
    );
    // The first swap exchanged every pair and kept everything else.
    let orig: std::collections::HashMap<_, _> = tensors(&input)
        .into_iter()
        .map(|t| (t.0.clone(), t))
        .collect();
    let swapped = tensors(&a);
    assert_eq!(swapped.len(), orig.len());
    for t in &swapped {
        let partner = if let Some(n) = t.0.strip_prefix("state_dict.") {
            format!("ema_state_dict.module.{n}")
        } else if let Some(n) = t.0.strip_prefix("ema_state_dict.module.") {
            format!("state_dict.{n}")
        } else {
            t.0.clone()
        };
        assert_eq!(t.3, orig[&partner].3, "{}", t.0);
    }
    // The side now holding the EMA is recorded, so deploy still takes the EMA.
    let v = json(&["inspect", "--json", &a]);
    assert_eq!(v["files"][0]["layout"]["ema_on"], "shadow");
    let dep = out(&d, "dep.safetensors");
    ok(&["swap", "--deploy", &a, "-o", &dep]);
    assert_same(&dep, &fx("mmengine/epoch_2.state_dict.safetensors"));
}

#[test]
fn swap_through_safetensors_twice_gives_back_the_tensors() {
    let d = tmp();
    let (a, b) = (out(&d, "a.safetensors"), out(&d, "b.safetensors"));
    ok(&["swap", &fx("timm/checkpoint-1.pth.tar"), "-o", &a]);
    ok(&["swap", &a, "-o", &b]);
    assert_same(&b, &fx("timm/checkpoint-1.expected.safetensors"));
}

#[test]
fn written_pth_files_are_the_ones_torch_checked() {
    // fixtures/gen_torch.py ran these commands, loaded the outputs with
    // torch.load(weights_only=True), compared them and resumed mmengine from the swapped one;
    // the tool must still write exactly those bytes.
    let v: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("written/verified.json")).unwrap())
            .unwrap();
    let d = tmp();
    for r in v["results"].as_array().unwrap() {
        let file = r["file"].as_str().unwrap();
        for (k, val) in r.as_object().unwrap() {
            assert_ne!(val, &Value::Bool(false), "{file}: {k} was false");
        }
        let mut args: Vec<String> = r["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let target = out(&d, Path::new(file).file_name().unwrap().to_str().unwrap());
        *args.last_mut().unwrap() = target.clone();
        args.push("-q".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&argv);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (now, then) = (
            std::fs::read(&target).unwrap(),
            std::fs::read(fixtures().join(file)).unwrap(),
        );
        // The archive comment of a swap records ema-tool's version; the rest must not change.
        let (now, now_comment) = split_comment(&now);
        let (then, then_comment) = split_comment(&then);
        assert!(
            now == then,
            "{file}: the tool now writes other bytes; rerun fixtures/gen_torch.py to check them \
             with torch"
        );
        let record = |c: &[u8]| -> Value {
            let c = std::str::from_utf8(c).unwrap();
            let mut v: Value = c
                .strip_prefix("ema_tool:")
                .map_or(Value::Null, |j| serde_json::from_str(j).unwrap());
            if let Some(o) = v.as_object_mut() {
                o.remove("version");
            }
            v
        };
        assert_eq!(record(now_comment), record(then_comment), "{file}");
    }
}

/// A zip archive without and with its comment (the end record is the last 22 bytes before it).
fn split_comment(b: &[u8]) -> (&[u8], &[u8]) {
    for pos in (0..=b.len().saturating_sub(22)).rev() {
        if b[pos..].starts_with(b"PK\x05\x06") {
            let len = u16::from_le_bytes([b[pos + 20], b[pos + 21]]) as usize;
            if pos + 22 + len == b.len() {
                return (&b[..pos + 20], &b[pos + 22..]);
            }
        }
    }
    panic!("no zip end record");
}

#[test]
fn written_pth_reads_back() {
    let d = tmp();
    let p = out(&d, "deploy.pth");
    ok(&["swap", "--deploy", &fx("mmengine/epoch_2.pth"), "-o", &p]);
    assert_same(&p, &fx("mmengine/epoch_2.state_dict.safetensors"));
    let v = json(&["inspect", "--json", &p]);
    let tree = v["files"][0]["tree"].as_array().unwrap();
    assert!(tree.iter().all(|e| e["kind"] == "tensor"));
    // Every dtype through the writer and back.
    let q = out(&d, "dtypes.pt");
    ok(&["ema", &fx("dtypes.pth"), "-o", &q]);
    assert_same(&q, &fx("dtypes.expected.safetensors"));
    // bf16 deploy as .pth.
    let r = out(&d, "bf16.pth");
    ok(&[
        "swap",
        "--deploy",
        "--dtype",
        "bf16",
        &fx("timm/checkpoint-1.pth.tar"),
        "-o",
        &r,
    ]);
    let t = tensors(&r);
    assert!(t.iter().all(|t| t.1 == "BF16" || t.1 == "I64"), "{t:?}");
}

#[test]
fn ema_over_pth_equals_ema_over_safetensors_twins() {
    let d = tmp();
    for (prefix, flags) in [
        ("iter", vec!["--momentum", "0.3"]),
        ("bf16", vec!["--momentum", "0.3"]),
    ] {
        let mut outs = Vec::new();
        for ext in ["pth", "safetensors"] {
            let o = out(&d, &format!("{prefix}-{ext}.safetensors"));
            let mut args: Vec<String> = vec!["ema".into()];
            args.extend(flags.iter().map(|s| s.to_string()));
            // Given out of order: the steps (meta.iter, global_step, file names) order them.
            for s in [300, 100, 200] {
                args.push(fx(&format!("series/{prefix}_{s}.{ext}")));
            }
            args.extend(["-o".into(), o.clone(), "--json".into()]);
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let v = json(&argv);
            let steps: Vec<u64> = v["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["step"].as_u64().unwrap())
                .collect();
            assert_eq!(steps, [100, 200, 300]);
            outs.push(o);
        }
        assert_same(&outs[0], &outs[1]);
    }
}

#[test]
fn timm_checkpoint() {
    let d = tmp();
    let o = out(&d, "model.safetensors");
    ok(&[
        "swap",
        "--deploy",
        &fx("timm/checkpoint-1.pth.tar"),
        "-o",
        &o,
    ]);
    assert_same(&o, &fx("timm/checkpoint-1.ema.safetensors"));
    let v = json(&["inspect", "--json", &fx("timm/checkpoint-1.pth.tar")]);
    let f = &v["files"][0];
    assert_eq!(f["layout"]["name"], "timm");
    assert_eq!(f["step"], 1);
    assert!(f["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "args" && s["kind"] == "argparse.Namespace"));
}

#[test]
fn lightning_checkpoint() {
    let d = tmp();
    let o = out(&d, "all.safetensors");
    ok(&["ema", &fx("lightning/last.ckpt"), "-o", &o]);
    assert_same(&o, &fx("lightning/last.expected.safetensors"));
    let v = json(&["inspect", "--json", &fx("lightning/last.ckpt")]);
    let f = &v["files"][0];
    assert_eq!(f["step"], 120);
    assert_eq!(f["step_source"]["metadata"], "global_step");
    assert_eq!(f["metadata"]["hyper_parameters.name"], "convnet");
}

#[test]
fn dtypes_and_views() {
    let d = tmp();
    for name in ["dtypes", "views"] {
        let o = out(&d, &format!("{name}.safetensors"));
        ok(&["ema", &fx(&format!("{name}.pth")), "-o", &o]);
        assert_same(&o, &fx(&format!("{name}.expected.safetensors")));
    }
    let v = json(&["inspect", "--json", &fx("dtypes.pth")]);
    let skipped = &v["files"][0]["skipped"];
    assert_eq!(skipped[0]["name"], "complex");
    assert!(skipped[0]["kind"]
        .as_str()
        .unwrap()
        .contains("ComplexFloatStorage"));
}

#[test]
fn every_pickle_protocol_torch_writes() {
    let d = tmp();
    for proto in 1..=5 {
        let input = fx(&format!("protocols/p{proto}.pth"));
        let o = out(&d, &format!("p{proto}.safetensors"));
        ok(&["ema", &input, "-o", &o]);
        assert_same(&o, &fx("protocols/expected.safetensors"));
        let v = json(&["inspect", "--json", &input]);
        let m = &v["files"][0]["metadata"];
        assert_eq!(m["meta.iter"], "500", "protocol {proto}");
        assert_eq!(m["meta.lr"], "0.001");
        assert_eq!(m["meta.name"], "run");
        assert_eq!(m["meta.ok"], "True");
        assert_eq!(m["meta.big"], "1099511627776");
        assert_eq!(m["hist.1.1"], "3.5");
        assert_eq!(v["files"][0]["step"], 500);
    }
}

#[test]
fn sharded_checkpoints_open_as_one() {
    let d = tmp();
    for (i, input) in [
        "sharded",
        "sharded/model.safetensors.index.json",
        "sharded_bin",
        "sharded_bin/pytorch_model.bin.index.json",
    ]
    .iter()
    .enumerate()
    {
        let o = out(&d, &format!("{i}.safetensors"));
        ok(&["ema", &fx(input), "-o", &o]);
        assert_same(&o, &fx("sharded.expected.safetensors"));
    }
    let v = json(&["inspect", "--json", &fx("sharded")]);
    assert_eq!(v["files"][0]["format"], "sharded");
    assert_eq!(v["files"][0]["shards"].as_array().unwrap().len(), 2);
}

#[test]
fn sharded_outputs() {
    let d = tmp();
    let single = out(&d, "single.safetensors");
    let input = fx("mmengine/epoch_2.pth");
    ok(&["swap", "--deploy", &input, "-o", &single]);
    std::fs::create_dir(d.path().join("sh")).unwrap();
    let target = out(&d, "sh/model.safetensors");
    let v = json(&[
        "swap",
        "--deploy",
        &input,
        "-o",
        &target,
        "--max-shard-size",
        "1KB",
        "--json",
    ]);
    let index_path = d.path().join("sh/model.safetensors.index.json");
    assert_eq!(v["output"], index_path.to_string_lossy().as_ref());
    let index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let total: u64 = tensors(&single).iter().map(|t| t.3.len() as u64).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(files.len() > 1, "{files:?}");
    let n = files.len();
    assert!(files.contains(format!("model-00001-of-{n:05}.safetensors").as_str()));
    for f in &files {
        assert!(d.path().join("sh").join(f).is_file());
    }
    assert!(!d.path().join("sh/model.safetensors").exists());
    assert_same(&out(&d, "sh"), &single);
    // Everything fits in one shard: one plain file.
    let big = out(&d, "big.safetensors");
    ok(&[
        "swap",
        "--deploy",
        &input,
        "-o",
        &big,
        "--max-shard-size",
        "5GB",
    ]);
    assert_same(&big, &single);
}

#[test]
fn output_kinds_that_do_not_go_together() {
    let d = tmp();
    let input = fx("mmengine/epoch_2.pth");
    fails(
        &[
            "swap",
            "--deploy",
            &input,
            "-o",
            &out(&d, "a.pth"),
            "--max-shard-size",
            "1KB",
        ],
        2,
    );
    fails(
        &[
            "swap",
            &input,
            "-o",
            &out(&d, "a.bin"),
            "--max-shard-size",
            "1KB",
        ],
        2,
    );
    fails(
        &[
            "swap",
            &fx("mmengine/epoch_2.expected.safetensors"),
            "-o",
            &out(&d, "a.pth"),
        ],
        2,
    );
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn malformed_files_fail_with_a_message() {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("bad/cases.json")).unwrap()).unwrap();
    let d = tmp();
    for c in cases["cases"].as_array().unwrap() {
        let file = fx(c["file"].as_str().unwrap());
        match c["error"].as_str() {
            None => {
                ok(&["inspect", &file]);
            }
            Some(want) => {
                let err = fails(&["inspect", &file], 1);
                assert!(err.contains(want), "{file}: want `{want}`, got {err}");
                let err = fails(&["swap", "--deploy", &file, "-o", &out(&d, "x.pth")], 1);
                assert!(err.contains(want), "{file}: want `{want}`, got {err}");
            }
        }
    }
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn inspect_reads_the_header_of_views_and_stats_their_values() {
    // Without --stats nothing but the header is read: the views are not gathered.
    let c = Checkpoint::open(Path::new(&fx("views.pth")), Open::HeaderOnly).unwrap();
    assert!(c.files().len() == 1, "no temporary file of gathered views");
    let t = c.get("transposed").unwrap();
    let mut buf = vec![0u8; t.len as usize];
    let e = c.read_at(t, 0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("opened for its header only"), "{e}");
    let header = json(&["inspect", "--json", "--tensors", &fx("views.pth")]);
    let tensors = header["files"][0]["tensor_list"].as_array().unwrap();
    let transposed = tensors.iter().find(|t| t["name"] == "transposed").unwrap();
    let expected =
        Checkpoint::open(Path::new(&fx("views.expected.safetensors")), Open::Readable).unwrap();
    let e = expected.get("transposed").unwrap();
    assert_eq!(transposed["shape"], serde_json::json!(e.shape));
    assert_eq!(transposed["bytes"], e.len);
    assert_eq!(header["files"][0]["tree"][0]["kind"], "tensor");
    // With --stats the values are those of the contiguous twin.
    let stats = |p: &str| {
        let v = json(&["inspect", "--json", "--stats", p]);
        let list = v["files"][0]["tensor_list"].as_array().unwrap().clone();
        let mut m: Vec<(String, Value)> = list
            .into_iter()
            .map(|t| (t["name"].as_str().unwrap().to_string(), t["stats"].clone()))
            .collect();
        m.sort_by(|a, b| a.0.cmp(&b.0));
        m
    };
    assert_eq!(
        stats(&fx("views.pth")),
        stats(&fx("views.expected.safetensors"))
    );
}
