//! The checkpoints of the ecosystem end to end (`fixtures/formats/`, made by
//! `fixtures/gen_formats.py` with the real libraries): legacy torch files, plain pickles, EDM2
//! snapshots, pickled modules, the Lightning, AveragedModel, ema-pytorch, ultralytics and custom
//! layouts, Hugging Face and diffusers directories, a real mmengine run, hostile pickles. Every
//! expectation is what the library itself holds, compared bit for bit (folds within the
//! tolerance their case gives).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::run_in;
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::fixtures()
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixtures().join("formats/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fx(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> Output {
    run_in(&fixtures(), args)
}

fn ok(args: &[&str]) -> String {
    common::ok_in(&fixtures(), args)
}

/// Runs and expects exit status 1 with one line on stderr; returns it.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "ema-tool {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.starts_with("ema-tool: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    err
}

/// Every tensor of a checkpoint, read by ema-tool's readers: name → (dtype, shape, bytes).
fn tensors(path: &str) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    common::read_tensors(path)
}

/// The two checkpoints hold the same tensors, bit for bit.
fn assert_same(got: &str, want: &str, what: &str) {
    let x = tensors(got);
    let y = tensors(want);
    assert_eq!(
        x.keys().collect::<Vec<_>>(),
        y.keys().collect::<Vec<_>>(),
        "{what}: names"
    );
    for (name, t) in &x {
        assert_eq!(t, &y[name], "{what}: tensor `{name}` differs");
    }
}

/// The two checkpoints hold the same names, dtypes and shapes, and values within `rtol`/`atol`
/// (integer tensors exactly).
fn assert_close(got: &str, want: &str, rtol: f64, atol: f64, what: &str) {
    let (x, _) = common::load(Path::new(got));
    let y = tensors(want);
    assert_eq!(
        x.keys().collect::<Vec<_>>(),
        y.keys().collect::<Vec<_>>(),
        "{what}: names"
    );
    for (name, t) in &x {
        let (dtype, shape, data) = &y[name];
        assert_eq!((&t.dtype, &t.shape), (dtype, shape), "{what}: `{name}`");
        let want = common::T {
            dtype: dtype.clone(),
            shape: shape.clone(),
            data: data.clone(),
        };
        let exact = !matches!(dtype.as_str(), "F32" | "F64" | "F16" | "BF16");
        for (i, (g, w)) in t.values().iter().zip(want.values()).enumerate() {
            let tol = if exact { 0.0 } else { atol + rtol * w.abs() };
            assert!(
                (g - w).abs() <= tol,
                "{what}: `{name}`[{i}] = {g}, expected {w} (tolerance {tol:e})"
            );
        }
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

#[test]
fn every_file_reads_as_the_library_holds_it() {
    let cases = cases();
    let list = cases["tensors"].as_array().unwrap();
    assert!(list.len() >= 25, "{} tensor cases", list.len());
    let mut formats = Vec::new();
    for c in list {
        let file = str_of(c, "file").unwrap();
        if file.ends_with("tensors_protocol2.pkl") {
            // Protocol 2 pickles bytes as text (`_codecs.encode`): not in place, so refused
            // with what to do about it.
            let err = fails(&["inspect", &fx(file)]);
            assert!(
                err.contains("protocol 2") && err.contains("tensor `"),
                "{err}"
            );
            continue;
        }
        let v: Value = serde_json::from_str(&ok(&["inspect", "--json", &fx(file)])).unwrap();
        let format = v["files"][0]["format"].as_str().unwrap().to_string();
        assert_eq!(Some(format.as_str()), str_of(c, "format"), "{file}");
        formats.push(format);
        assert_same(&fx(file), &fx(str_of(c, "expected").unwrap()), file);
        if let Some(twin) = str_of(c, "twin") {
            assert_same(&fx(file), &fx(twin), &format!("{file} vs its twin {twin}"));
        }
    }
    for f in ["torch-legacy", "pickle", "torch", "sharded", "safetensors"] {
        assert!(formats.iter().any(|x| x == f), "no {f} case");
    }
}

#[test]
fn legacy_files_equal_their_zip_twins() {
    let twins = [
        (
            "formats/legacy/state_dict.pt",
            "formats/legacy/state_dict.zip.pt",
        ),
        (
            "formats/legacy/mmengine_epoch_3.pth",
            "formats/legacy/mmengine_epoch_3.zip.pth",
        ),
    ];
    for (legacy, zip) in twins {
        assert_same(&fx(legacy), &fx(zip), legacy);
    }
    // f16 and bf16 are among the plain state dict's tensors.
    let t = tensors(&fx("formats/legacy/state_dict.pt"));
    for dtype in ["F16", "BF16", "I64"] {
        assert!(t.values().any(|(d, _, _)| d == dtype), "no {dtype}");
    }
    let a = ok(&["inspect", &fx("formats/legacy/state_dict.pt")]);
    assert!(a.contains("torch-legacy"), "{a}");
}

#[test]
fn layouts_deploy_raw_and_swap_as_the_libraries_hold_them() {
    let cases = cases();
    let list = cases["layouts"].as_array().unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let file = fx(str_of(c, "file").unwrap());
        let layout = str_of(c, "layout").unwrap();
        seen.push(layout.to_string());
        let extra: Vec<&str> = c["args"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap()).collect())
            .unwrap_or_default();
        let out = |kind: &str| {
            d.path()
                .join(format!("{i}-{kind}.safetensors"))
                .to_string_lossy()
                .into_owned()
        };
        let with = |cmd: &[&str], o: &str| -> Vec<String> {
            let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
            v.extend(extra.iter().map(|s| s.to_string()));
            v.extend([file.clone(), "-o".into(), o.to_string()]);
            v
        };
        fn args(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        if layout != "custom" {
            let v: Value = serde_json::from_str(&ok(&["inspect", "--json", &file])).unwrap();
            assert_eq!(v["files"][0]["layout"]["name"], layout, "{file}");
        }
        let o = out("deploy");
        ok(&args(&with(&["swap", "--deploy"], &o)));
        assert_same(
            &o,
            &fx(str_of(c, "deploy").unwrap()),
            &format!("{file} deploy"),
        );
        let o = out("raw");
        match str_of(c, "deploy_raw") {
            Some(g) => {
                ok(&args(&with(&["swap", "--deploy", "--raw"], &o)));
                assert_same(&o, &fx(g), &format!("{file} deploy --raw"));
            }
            None => {
                let err = fails(&args(&with(&["swap", "--deploy", "--raw"], &o)));
                assert!(err.contains("side"), "{err}");
                assert!(!Path::new(&o).exists());
            }
        }
        let o = out("swap");
        match str_of(c, "swap") {
            Some(g) => {
                ok(&args(&with(&["swap"], &o)));
                assert_same(&o, &fx(g), &format!("{file} swap"));
            }
            None => {
                let err = fails(&args(&with(&["swap"], &o)));
                assert!(err.contains("nothing to swap"), "{err}");
                assert!(!Path::new(&o).exists());
            }
        }
    }
    for l in [
        "lightning",
        "swa-utils",
        "ema-pytorch",
        "ultralytics",
        "custom",
        "mmengine",
    ] {
        assert!(seen.iter().any(|s| s == l), "no {l} case");
    }
}

#[test]
fn a_checkpoint_without_pairs_deploys_only_with_raw() {
    let d = tempfile::tempdir().unwrap();
    let o = d.path().join("m.safetensors");
    let o = o.to_str().unwrap();
    let file = fx("formats/module/torch_save_model.pt");
    let err = fails(&["swap", "--deploy", &file, "-o", o]);
    assert!(
        err.contains("subtrees") && err.contains("conv (") && err.contains("--raw"),
        "{err}"
    );
    assert!(!Path::new(o).exists());
    ok(&["swap", "--deploy", "--raw", &file, "-o", o]);
    // `torch.save(model)` of the whole module: its state_dict() names, as they are.
    assert_same(
        o,
        &fx("formats/module/torch_save_model.pt.expected.safetensors"),
        "deploy --raw",
    );
}

#[test]
fn folds_equal_the_reference_averages() {
    let cases = cases();
    let d = tempfile::tempdir().unwrap();
    for c in cases["folds"].as_array().unwrap() {
        let name = str_of(c, "name").unwrap();
        let o = d.path().join(format!("{name}.safetensors"));
        let o = o.to_str().unwrap();
        let mut args = common::case_args(c, &fixtures());
        args.extend(["-o".into(), o.to_string()]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let rtol = c["rtol"].as_f64().unwrap();
        let atol = c["atol"].as_f64().unwrap();
        assert_close(o, &fx(str_of(c, "expected").unwrap()), rtol, atol, name);
        if args.iter().any(|a| a == "--deploy") {
            // A plain state dict: no optimizer, no counters, metadata `step` only.
            let (t, meta) = common::load(Path::new(o));
            assert!(
                t.keys()
                    .all(|k| !k.starts_with("optimizer") && !k.starts_with("state_dict")),
                "{name}"
            );
            assert!(
                meta.keys().all(|k| k == "step" || k == "ema_tool"),
                "{meta:?}"
            );
        }
    }
}

#[test]
fn hf_outputs_are_directories_that_from_pretrained_loads() {
    let cases = cases();
    let d = tempfile::tempdir().unwrap();
    for c in cases["hf"].as_array().unwrap() {
        let name = str_of(c, "name").unwrap();
        let dir = format!("{}/", d.path().join(name).display());
        let inputs: Vec<String> = common::strings(&c["inputs"])
            .iter()
            .map(|i| fx(i))
            .collect();
        let mut args = common::case_args(c, &fixtures());
        args.extend(["-o".into(), dir.clone()]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let want: Vec<&str> = c["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert_eq!(common::entries(Path::new(&dir)), want, "{name}");
        // The companions are the last input's files, byte for byte.
        let last = Path::new(inputs.last().unwrap());
        for f in want
            .iter()
            .filter(|f| !f.ends_with(".safetensors") && !f.ends_with(".index.json"))
        {
            assert_eq!(
                std::fs::read(Path::new(&dir).join(f)).unwrap(),
                std::fs::read(last.join(f)).unwrap(),
                "{name}: {f}"
            );
        }
        // The directory is a checkpoint in its turn (one weights file, or an index).
        let merged = d.path().join(format!("{name}.safetensors"));
        ok(&["ema", &dir, "-o", merged.to_str().unwrap()]);
        let rtol = c["rtol"].as_f64().unwrap();
        let atol = c["atol"].as_f64().unwrap();
        assert_close(
            merged.to_str().unwrap(),
            &fx(str_of(c, "expected").unwrap()),
            rtol,
            atol,
            name,
        );
    }
}

#[test]
fn a_failed_fold_into_a_directory_leaves_no_directory() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    std::fs::write(&bad, b"junk").unwrap();
    let dir = format!("{}/", d.path().join("n1/n2/out").display());
    fails(&[
        "swa",
        &fx("formats/hf/run/checkpoint-100"),
        bad.to_str().unwrap(),
        "-o",
        &dir,
    ]);
    assert!(
        !d.path().join("n1").exists(),
        "every directory made is removed"
    );
}

#[test]
fn an_input_directory_is_never_the_output() {
    let d = tempfile::tempdir().unwrap();
    // A copy of a run, so that a failure of the check cannot damage the fixtures.
    let run = d.path().join("run");
    for c in ["checkpoint-100", "checkpoint-200"] {
        let to = run.join(c);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(fixtures().join("formats/hf/run").join(c)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let a = run.join("checkpoint-100");
    let b = run.join("checkpoint-200");
    let before = std::fs::read(b.join("model.safetensors")).unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    for force in [false, true] {
        let target = format!("{b}/");
        let mut args = vec!["swa", a, b, "-o", &target];
        if force {
            args.push("--force");
        }
        let err = fails(&args);
        assert!(err.contains("is an input directory"), "{err}");
    }
    // The same directory under another spelling, sharded: still refused.
    let other = format!("{}/../checkpoint-200/", a);
    let err = fails(&[
        "swa",
        a,
        b,
        "-o",
        &other,
        "--force",
        "--max-shard-size",
        "12KB",
    ]);
    assert!(err.contains("is an input directory"), "{err}");
    assert_eq!(
        std::fs::read(Path::new(b).join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn a_models_package_is_not_taken_for_yolov5() {
    // A plain `{"model": Module}` whose class lives in a package named `models`, as many do:
    // not the ultralytics layout, so `swap --deploy` must not ship it as an EMA.
    let bytes = std::fs::read(fixtures().join("formats/module/hostile_nested.pkl")).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == b"__main__")
        .expect("the fixture names __main__");
    let mut renamed = bytes.clone();
    renamed[at..at + 8].copy_from_slice(b"models.x");
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("models_x.pkl");
    std::fs::write(&file, &renamed).unwrap();
    let file = file.to_str().unwrap();
    let v: Value = serde_json::from_str(&ok(&["inspect", "--json", file])).unwrap();
    assert!(
        v["files"][0]["layout"].is_null(),
        "{}",
        v["files"][0]["layout"]
    );
    let o = d.path().join("o.safetensors");
    let err = fails(&["swap", "--deploy", file, "-o", o.to_str().unwrap()]);
    assert!(err.contains("no EMA/raw weight pairs"), "{err}");
}

#[test]
fn hostile_pickles_are_read_without_running_them() {
    let cases = cases();
    let d = tempfile::tempdir().unwrap();
    for c in cases["hostile"].as_array().unwrap() {
        let file = fx(str_of(c, "file").unwrap());
        let marker = Path::new(str_of(c, "marker").unwrap());
        let _ = std::fs::remove_file(marker);
        let o = d.path().join("h.safetensors");
        let o = o.to_str().unwrap();
        for args in [
            vec!["inspect", "--json", &file],
            vec!["inspect", "--stats", &file],
            vec!["swap", "--deploy", "--raw", &file, "-o", o],
            vec!["swa", "--force", &file, "-o", o],
            vec!["swa", "--deploy", "--force", &file, "-o", o],
        ] {
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("panicked"), "{args:?}: {err}");
            assert!(!marker.exists(), "{args:?} created {}", marker.display());
        }
        // inspect names the object it did not build.
        let v: Value = serde_json::from_str(&ok(&["inspect", "--json", &file])).unwrap();
        assert!(
            !v["files"][0]["skipped"].as_array().unwrap().is_empty()
                || v["files"][0]["tensors"].as_u64().unwrap() > 0,
            "{file}: {v}"
        );
    }
}

#[test]
fn edm2_snapshots_give_posthoc_their_profiles() {
    // The names give sigma_rel and EDM2's time in images; --deploy keeps the ema net's names.
    let dir = fx("formats/pickle");
    let v: Value = serde_json::from_str(&ok(&[
        "posthoc",
        "--sigma-rel",
        "0.07",
        "--dry-run",
        "--json",
        &fx("formats/pickle/network-snapshot-0000128-0.050.pkl"),
        &fx("formats/pickle/network-snapshot-0000128-0.100.pkl"),
        &fx("formats/pickle/network-snapshot-0000256-0.050.pkl"),
        &fx("formats/pickle/network-snapshot-0000256-0.100.pkl"),
    ]))
    .unwrap();
    let snaps = v["inputs"].as_array().expect("inputs");
    let steps: Vec<i64> = snaps.iter().map(|s| s["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [128_000, 128_000, 256_000, 256_000], "{v}");
    let sig: Vec<f64> = snaps
        .iter()
        .map(|s| s["sigma_rel"].as_f64().unwrap())
        .collect();
    for (s, w) in sig.iter().zip([0.05, 0.1, 0.05, 0.1]) {
        assert!((s - w).abs() < 1e-12, "{sig:?}");
    }
    // A folder of them is the same snapshots.
    let v2: Value = serde_json::from_str(&ok(&[
        "posthoc",
        "--sigma-rel",
        "0.07",
        "--dry-run",
        "--json",
        &dir,
    ]))
    .unwrap();
    let steps2: Vec<i64> = v2["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|s| s["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps2, steps);
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full.safetensors");
    ok(&[
        "posthoc",
        "--sigma-rel",
        "0.07",
        &dir,
        "-o",
        full.to_str().unwrap(),
    ]);
    let o = d.path().join("phema.safetensors");
    ok(&[
        "posthoc",
        "--sigma-rel",
        "0.07",
        "--deploy",
        &fx("formats/pickle/network-snapshot-0000128-0.050.pkl"),
        &fx("formats/pickle/network-snapshot-0000256-0.050.pkl"),
        &fx("formats/pickle/network-snapshot-0000128-0.100.pkl"),
        &fx("formats/pickle/network-snapshot-0000256-0.100.pkl"),
        "-o",
        o.to_str().unwrap(),
    ]);
    let (t, _) = common::load(&o);
    let snap = tensors(&fx("formats/pickle/network-snapshot-0000256-0.050.pkl"));
    let want: Vec<String> = snap
        .keys()
        .filter_map(|k| k.strip_prefix("ema.").map(str::to_string))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), {
        let mut w = want.clone();
        w.sort();
        w
    });
    // The deployed tensors are the `ema.` ones of the whole output, bit for bit.
    let (whole, _) = common::load(&full);
    for (name, x) in &t {
        let y = &whole[&format!("ema.{name}")];
        assert_eq!(
            (&x.dtype, &x.shape, &x.data),
            (&y.dtype, &y.shape, &y.data),
            "{name}"
        );
    }
}

#[test]
fn errors_in_a_pickle_name_data_pkl_only_inside_a_zip_archive() {
    // Hand-made pickles: `{"w": torch._utils._rebuild_tensor_v2(5, 0, (1,), (1,)…)}`, whose
    // storage is a number, with 4 and with 6 arguments; and dicts nested 300 deep. In a file
    // of its own, the file is the pickle; in a `torch.save` zip, the pickle is its `data.pkl`
    // record, which the messages name.
    let rebuild = |args: &[u8]| {
        let mut pkl = b"\x80\x04}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n".to_vec();
        pkl.extend_from_slice(args);
        pkl.extend_from_slice(b"Rs.");
        pkl
    };
    let mut nested = b"\x80\x04".to_vec();
    for _ in 0..300 {
        nested.extend_from_slice(b"}X\x01\x00\x00\x00a");
    }
    nested.extend_from_slice(b"}");
    nested.extend(std::iter::repeat(b's').take(300));
    nested.push(b'.');
    let d = tempfile::tempdir().unwrap();
    for (pkl, alone, zipped) in [
        (
            rebuild(b"(K\x05K\x00K\x01\x85K\x01\x85t"),
            "tensor `w`: malformed torch._utils._rebuild_tensor_v2 call: 4 arguments",
            "tensor `w`: malformed torch._utils._rebuild_tensor_v2 call in data.pkl: 4 arguments",
        ),
        (
            rebuild(b"(K\x05K\x00K\x01\x85K\x01\x85\x89}t"),
            "tensor `w`: malformed pickle: the storage is not a persistent id",
            "tensor `w`: malformed data.pkl: the storage is not a persistent id",
        ),
        (nested, ": `a.a.a", ": data.pkl: `a.a.a"),
    ] {
        let file = d.path().join("bad.pkl");
        std::fs::write(&file, &pkl).unwrap();
        let err = fails(&["inspect", file.to_str().unwrap()]);
        common::assert_one_line_error(&err, alone, "plain pickle");
        assert!(!err.contains("data.pkl"), "{err}");
        let archive = ema_tool::codec::zip::write::archive(&[
            ("archive/data.pkl".to_string(), &pkl[..]),
            ("archive/version".to_string(), b"3\n"),
        ]);
        let file = d.path().join("bad.pth");
        std::fs::write(&file, archive).unwrap();
        let err = fails(&["inspect", file.to_str().unwrap()]);
        common::assert_one_line_error(&err, zipped, "zip");
    }
}
