//! Torch distributed checkpoints end to end (`fixtures/dcp/`, made by `fixtures/gen_dcp.py`
//! with torch's own `dcp.save`, in one process and in a 2-rank FSDP2 run): every tensor as
//! torch's `dcp_to_torch_save` gives it, bit for bit; folds against references computed from
//! the state dicts torch loads back; hostile, escaping and truncated checkpoints refused.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::run_in;
use ema_tool::checkpoint::{Checkpoint, Open};
use serde_json::Value;

fn root() -> PathBuf {
    common::fixtures().join("dcp")
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("cases.json")).unwrap()).unwrap()
}

fn fx(rel: &str) -> String {
    root().join(rel).to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> Output {
    run_in(&root(), args)
}

fn ok(args: &[&str]) -> String {
    common::ok_in(&root(), args)
}

fn tensors(path: &str) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    common::read_tensors(path)
}

#[test]
fn every_checkpoint_reads_as_torch_loads_it() {
    let cases = cases();
    for c in cases["checkpoints"].as_array().unwrap() {
        let dir = fx(c["dir"].as_str().unwrap());
        let got = tensors(&dir);
        let want = tensors(&fx(c["expected"].as_str().unwrap()));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{dir}"
        );
        for (name, t) in &got {
            assert_eq!(t, &want[name], "{dir}: tensor `{name}`");
        }
        assert_eq!(got.len() as u64, c["tensors"].as_u64().unwrap(), "{dir}");
        let v: Value = serde_json::from_str(&ok(&["inspect", "--json", &dir])).unwrap();
        let f = &v["files"][0];
        assert_eq!(f["step"], c["step"], "{dir}: step");
        if Path::new(&dir).join(".metadata").exists() {
            assert_eq!(f["format"], "dcp", "{dir}");
        }
    }
}

#[test]
fn chunks_from_two_ranks_are_assembled() {
    // FSDP2 Shard(0) over 2 ranks: 11 rows as 6 + 5, and a 1-row tensor with an empty chunk.
    let dir = fx("ranks2/step-300");
    let c = Checkpoint::open(Path::new(&dir), Open::Readable).unwrap();
    assert_eq!(c.format().name(), "dcp");
    let ranks = c
        .files()
        .iter()
        .filter(|f| f.path().to_string_lossy().ends_with(".distcp"))
        .count();
    assert_eq!(ranks, 2);
    let t = c.get("tok.weight").expect("tok.weight");
    assert_eq!(t.shape, [11, 6]);
    // Shard(0) chunks are runs of the tensor: read in place, from both ranks' files.
    let segs = t
        .segments
        .as_ref()
        .expect("a tensor of two chunks has segments");
    assert_eq!(segs.len(), 2);
    assert_eq!(
        (segs[0].start, segs[0].len, segs[1].start),
        (0, 6 * 6 * 4, 6 * 6 * 4)
    );
    assert_ne!(segs[0].file, segs[1].file);
    assert!(c.files().iter().all(|f| !f.is_scratch()), "nothing copied");
    // A chunk saved with its own strides (a transposed tensor) is copied into place instead.
    let e = Checkpoint::open(Path::new(&fx("edge/step-1")), Open::Readable).unwrap();
    assert!(e.files().iter().any(|f| f.is_scratch()));
    // Inspect reads `.metadata` only: no chunk is opened.
    let h = Checkpoint::open(Path::new(&dir), Open::HeaderOnly).unwrap();
    assert_eq!(h.tensors().len(), c.tensors().len());
}

#[test]
fn non_tensor_entries_are_metadata_or_listed() {
    let v: Value = serde_json::from_str(&ok(&["inspect", "--json", &fx("edge/step-1")])).unwrap();
    let f = &v["files"][0];
    assert_eq!(f["metadata"]["step"], "1");
    assert_eq!(f["metadata"]["name"], "edge-cases");
    assert_eq!(f["metadata"]["betas.1"], "0.95");
    let skipped: Vec<&str> = f["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(skipped.contains(&"blob"), "{skipped:?}");
    // torchtitan's step lives in train_state.
    let v: Value =
        serde_json::from_str(&ok(&["inspect", "--json", &fx("ranks2/step-200")])).unwrap();
    assert_eq!(v["files"][0]["step"], 200);
    assert_eq!(
        v["files"][0]["step_source"]["metadata"], "train_state.step",
        "{}",
        v["files"][0]["step_source"]
    );
}

#[test]
fn folds_equal_the_references() {
    let cases = cases();
    let d = tempfile::tempdir().unwrap();
    for c in cases["folds"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let o = d.path().join(format!("{name}.safetensors"));
        let mut args = common::case_args(c, &root());
        args.extend(["-o".into(), o.to_string_lossy().into_owned()]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let (got, _) = common::load(&o);
        let (want, _) = common::load(&root().join(c["expected"].as_str().unwrap()));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, g) in &got {
            let w = &want[k];
            assert_eq!(g.shape, w.shape, "{name}: {k}");
            if let Err(e) = common::close(k, &g.dtype, &g.values(), &w.values()) {
                panic!("{name}: {e}");
            }
        }
    }
}

#[test]
fn bad_checkpoints_fail_cleanly_and_run_nothing() {
    let cases = cases();
    let marker = Path::new(cases["marker"].as_str().unwrap());
    let _ = std::fs::remove_file(marker);
    let d = tempfile::tempdir().unwrap();
    for c in cases["bad"].as_array().unwrap() {
        let dir = fx(c["dir"].as_str().unwrap());
        let fragment = c["error"].as_str().unwrap();
        let o = d.path().join("out.safetensors");
        for args in [
            vec!["swa", dir.as_str(), "-o", o.to_str().unwrap()],
            vec!["inspect", dir.as_str()],
        ] {
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            if args[0] == "inspect" && out.status.success() {
                // Headers only: a damaged chunk is found when it is read.
                continue;
            }
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(
                err.starts_with("ema-tool: ") && err.trim_end().lines().count() == 1,
                "{err}"
            );
            assert!(err.contains(fragment), "{dir}: `{fragment}` not in {err}");
            assert!(!o.exists(), "{dir}: an output was written");
        }
        assert!(!marker.exists(), "{dir} ran code");
    }
}

/// Runs `args` twice, writing `-o DIR --format dcp` and `-o DIR.safetensors`; returns both.
fn both(d: &Path, name: &str, args: &[&str]) -> (String, String) {
    let dir = d.join(name).to_string_lossy().into_owned();
    let st = format!("{dir}.safetensors");
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["-o", &dir, "--format", "dcp"]);
    ok(&a);
    let mut b: Vec<&str> = args.to_vec();
    b.extend(["-o", &st]);
    ok(&b);
    (dir, st)
}

#[test]
fn a_dcp_output_reads_back_as_the_same_fold() {
    let d = tempfile::tempdir().unwrap();
    let runs: [(&str, Vec<String>); 3] = [
        (
            "ranks2",
            [
                "swa",
                "ranks2/step-100",
                "ranks2/step-200",
                "ranks2/step-300",
            ]
            .map(String::from)
            .to_vec(),
        ),
        ("edge", ["swa", "edge/step-1"].map(String::from).to_vec()),
        (
            "model",
            [
                "swa",
                "--include",
                "model.*",
                "single/step-100",
                "single/step-300",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ];
    for (name, args) in &runs {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains("step-") {
                    fx(a)
                } else {
                    a.clone()
                }
            })
            .collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (dir, st) = both(d.path(), name, &refs);
        let mut names = common::entries(Path::new(&dir));
        names.sort();
        assert_eq!(names, [".metadata", "__0_0.distcp"], "{name}");
        let got = tensors(&dir);
        let want = tensors(&st);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, t) in &got {
            assert_eq!(t, &want[k], "{name}: `{k}`");
        }
    }
    // The non-tensor entries of the last input go along (the step, train_state), but those of
    // a subtree left out (the optimizer's, under --include 'model.*').
    let v: Value = serde_json::from_str(&ok(&[
        "inspect",
        "--json",
        d.path().join("ranks2").to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(v["files"][0]["step"], 300);
    assert_eq!(v["files"][0]["metadata"]["lr_scheduler.last_epoch"], "3");
    let v: Value = serde_json::from_str(&ok(&[
        "inspect",
        "--json",
        d.path().join("model").to_str().unwrap(),
    ]))
    .unwrap();
    let meta = v["files"][0]["metadata"].as_object().unwrap();
    assert!(meta.keys().all(|k| !k.starts_with("optim")), "{meta:?}");
    assert_eq!(v["files"][0]["step"], 300);
}

#[test]
fn a_dcp_output_is_checked_first_and_never_left_half_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = out.to_str().unwrap();
    let inputs = [fx("single/step-100"), fx("single/step-200")];
    // Without -o, or with shards: usage errors.
    let e = run(&["swa", &inputs[0], "--format", "dcp"]);
    assert_eq!(e.status.code(), Some(2));
    // An existing directory needs --force.
    std::fs::create_dir(&out).unwrap();
    let e = run(&["swa", &inputs[0], &inputs[1], "-o", o, "--format", "dcp"]);
    assert_eq!(
        e.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    ok(&[
        "swa", &inputs[0], &inputs[1], "-o", o, "--format", "dcp", "--force",
    ]);
    // A failure (a truncated input) leaves no directory it made.
    let fresh = d.path().join("fresh");
    let e = run(&[
        "swa",
        &inputs[0],
        &fx("bad/truncated"),
        "-o",
        fresh.to_str().unwrap(),
        "--format",
        "dcp",
    ]);
    assert_eq!(e.status.code(), Some(1));
    assert!(!fresh.exists());
    let left: Vec<String> = common::entries(d.path());
    assert!(left.iter().all(|n| !n.contains(".ema-tool")), "{left:?}");
    // A directory holding other files is never replaced, even with --force.
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let e = run(&[
        "swa",
        &inputs[0],
        "-o",
        other.to_str().unwrap(),
        "--format",
        "dcp",
        "--force",
    ]);
    assert_eq!(e.status.code(), Some(1));
    assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"mine");
    // A DCP checkpoint there is replaced whole.
    ok(&["swa", &inputs[1], "-o", o, "--format", "dcp", "--force"]);
    let v: Value = serde_json::from_str(&ok(&["inspect", "--json", o])).unwrap();
    assert_eq!(v["files"][0]["step"], 200);
    // An input directory is never the output.
    let e = run(&[
        "swa", &inputs[0], &inputs[1], "-o", &inputs[1], "--format", "dcp", "--force",
    ]);
    assert_eq!(e.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&e.stderr).contains("input directory"));
}

#[test]
fn a_dcp_target_is_replaced_only_when_it_is_a_checkpoint_alone() {
    let d = tempfile::tempdir().unwrap();
    let input = fx("single/step-100");
    // A directory with a `.metadata` and other files: untouched, even with --force.
    let mixed = d.path().join("mixed");
    std::fs::create_dir_all(mixed.join("sub")).unwrap();
    std::fs::write(mixed.join(".metadata"), b"junk").unwrap();
    std::fs::write(mixed.join("notes.txt"), b"mine").unwrap();
    let m = mixed.to_str().unwrap();
    let e = run(&["swa", &input, "-o", m, "--format", "dcp", "--force"]);
    assert_eq!(
        e.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    assert_eq!(std::fs::read(mixed.join("notes.txt")).unwrap(), b"mine");
    assert!(mixed.join("sub").is_dir());
    // A target holding an input: refused.
    let holder = d.path().join("holder");
    std::fs::create_dir(&holder).unwrap();
    let inner = holder.join("in.safetensors");
    common::save(
        &inner,
        &[(
            "w",
            safetensors::Dtype::F32,
            vec![2],
            common::f32_bytes(&[1.0, 2.0]),
        )],
        &[],
    );
    let e = run(&[
        "swa",
        inner.to_str().unwrap(),
        "-o",
        holder.to_str().unwrap(),
        "--format",
        "dcp",
        "--force",
    ]);
    assert_eq!(e.status.code(), Some(1));
    assert!(inner.exists());
    // A file's name is not a directory's.
    let e = run(&["swa", &input, "-o", "x.safetensors", "--format", "dcp"]);
    assert_eq!(e.status.code(), Some(2));
}

#[test]
fn a_fold_failing_midway_leaves_no_directory() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("inf.safetensors");
    common::save(
        &bad,
        &[(
            "w",
            safetensors::Dtype::F32,
            vec![2],
            common::f32_bytes(&[1.0, f32::INFINITY]),
        )],
        &[],
    );
    let out = d.path().join("out");
    let e = run(&[
        "swa",
        bad.to_str().unwrap(),
        bad.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--format",
        "dcp",
        "--check-finite",
    ]);
    assert_eq!(
        e.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    assert!(!out.exists());
    let left = common::entries(d.path());
    assert!(left.iter().all(|n| !n.contains(".ema-tool")), "{left:?}");
}
