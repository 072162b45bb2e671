//! Every error of `docs/cli.md` and `docs/formats.md` gives its exit status (1, or 2 for usage), one line on stderr
//! naming the file (and the tensor where there is one), and no output file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use safetensors::Dtype;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A checkpoint with tensors `w` (f32 [2,3]) and `b` (f32 [3]), values offset by `v`.
    fn ckpt(&self, name: &str, v: f32) -> PathBuf {
        let p = self.p(name);
        save(
            &p,
            &[
                ("w", Dtype::F32, vec![2, 3], f32_bytes(&[v; 6])),
                ("b", Dtype::F32, vec![3], f32_bytes(&[v; 3])),
            ],
            &[],
        );
        p
    }
    /// Asserts the outcome of a failing run.
    fn fails(&self, args: &[&str], code: i32, needles: &[&str]) {
        let out = self.p("out.safetensors");
        let mut full: Vec<&str> = args.to_vec();
        let o_str = out.to_str().unwrap().to_string();
        if !args.contains(&"-o") {
            full.extend(["-o", &o_str]);
        }
        let o = run(&full);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(err.starts_with("ema-tool: "), "{err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: `{n}` not in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        if !args.contains(&"-o") {
            assert!(!out.exists(), "{args:?} left an output");
        }
        let leftovers: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".ema-tool"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn mismatched_shapes_name_the_tensor_both_files_and_shapes() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let b = e.p("b_2.safetensors");
    save(
        &b,
        &[
            ("w", Dtype::F32, vec![3, 2], f32_bytes(&[0.0; 6])),
            ("b", Dtype::F32, vec![3], f32_bytes(&[0.0; 3])),
        ],
        &[],
    );
    e.fails(
        &["ema", s(&a), s(&b)],
        1,
        &[
            "a_1.safetensors",
            "b_2.safetensors",
            "`w`",
            "[2, 3]",
            "[3, 2]",
        ],
    );
}

#[test]
fn missing_tensors_are_named() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let b = e.p("b_2.safetensors");
    save(
        &b,
        &[("w", Dtype::F32, vec![2, 3], f32_bytes(&[0.0; 6]))],
        &[],
    );
    e.fails(
        &["swa", s(&a), s(&b)],
        1,
        &["b_2.safetensors", "`b`", "missing", "a_1.safetensors"],
    );
    // And the other way round: an extra tensor in an earlier input.
    e.fails(&["swa", s(&b), s(&a)], 1, &["`b`", "missing"]);
}

#[test]
fn float_and_integer_dtypes_do_not_mix() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let b = e.p("b_2.safetensors");
    save(
        &b,
        &[
            ("w", Dtype::I32, vec![2, 3], vec![0; 24]),
            ("b", Dtype::F32, vec![3], f32_bytes(&[0.0; 3])),
        ],
        &[],
    );
    e.fails(&["ema", s(&a), s(&b)], 1, &["`w`", "dtype", "I32", "F32"]);
}

#[test]
fn float_dtypes_may_mix() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let b = e.p("b_2.safetensors");
    let bf = |v: f32| half::bf16::from_f32(v).to_le_bytes().to_vec();
    save(
        &b,
        &[
            ("w", Dtype::BF16, vec![2, 3], bf(3.0).repeat(6)),
            ("b", Dtype::F32, vec![3], f32_bytes(&[3.0; 3])),
        ],
        &[],
    );
    let out = e.p("o.safetensors");
    ok(&run(["swa", s(&a), s(&b), "-q", "-o", s(&out)]));
    let (t, _) = load(&out);
    assert_eq!(t["w"].dtype, "BF16"); // the last input's dtype
    assert_eq!(t["w"].values(), vec![2.0; 6]);
}

#[test]
fn truncated_and_corrupt_files() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let bytes = std::fs::read(&a).unwrap();
    let t = e.p("t_2.safetensors");
    std::fs::write(&t, &bytes[..bytes.len() - 5]).unwrap();
    e.fails(&["ema", s(&a), s(&t)], 1, &["t_2.safetensors", "truncated"]);
    std::fs::write(&t, &bytes[..4]).unwrap();
    e.fails(&["ema", s(&a), s(&t)], 1, &["t_2.safetensors", "too short"]);
    let mut c = bytes.clone();
    c[9] = b'#';
    std::fs::write(&t, &c).unwrap();
    e.fails(
        &["ema", s(&a), s(&t)],
        1,
        &["t_2.safetensors", "corrupt header"],
    );
    let o = run(["inspect", s(&t)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("corrupt header"), "{}", stderr(&o));
}

#[test]
fn momentum_out_of_range_is_a_usage_error() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    e.fails(
        &["ema", "--momentum", "1.5", s(&a)],
        2,
        &["momentum must be in (0, 1)"],
    );
    e.fails(&["ema", "--momentum", "0", s(&a)], 2, &["momentum"]);
    e.fails(&["ema", "--decay", "1.2", s(&a)], 2, &["momentum"]);
    e.fails(&["ema", "--interval", "0", s(&a)], 2, &["--interval"]);
    e.fails(
        &["ema", "--momentum", "0.1", "--decay", "0.9", s(&a)],
        2,
        &["cannot be used with"],
    );
    e.fails(&["ema", "--strategy", "nope", s(&a)], 2, &["invalid value"]);
}

#[test]
fn output_must_not_be_an_input_or_exist() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let b = e.ckpt("b_2.safetensors", 2.0);
    let before = std::fs::read(&b).unwrap();
    e.fails(
        &["ema", s(&a), s(&b), "-o", s(&b), "--force"],
        1,
        &["b_2.safetensors", "is also an input"],
    );
    assert_eq!(std::fs::read(&b).unwrap(), before, "an input was modified");
    let out = e.p("exists.safetensors");
    std::fs::write(&out, b"keep me").unwrap();
    e.fails(
        &["ema", s(&a), s(&b), "-o", s(&out)],
        1,
        &["exists.safetensors", "already exists", "--force"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    ok(&run(["ema", s(&a), s(&b), "-q", "-f", "-o", s(&out)]));
    assert_ne!(std::fs::read(&out).unwrap(), b"keep me");
}

#[test]
fn unwritable_or_missing_output_directory_fails_before_work() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let out = e.p("no/such/dir/out.safetensors");
    e.fails(&["ema", s(&a), "-o", s(&out)], 1, &["no/such/dir"]);
}

#[test]
fn missing_input_and_nothing_selected() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let gone = e.p("gone_3.safetensors");
    e.fails(
        &["ema", s(&a), s(&gone)],
        1,
        &["gone_3.safetensors", "No such file"],
    );
    e.fails(
        &["ema", s(&a), "--include", "nothing*"],
        2,
        &["no tensor is selected"],
    );
}

#[test]
fn per_iter_needs_steps() {
    let e = Env::new();
    let a = e.ckpt("a.safetensors", 1.0);
    let b = e.ckpt("b_2.safetensors", 2.0);
    e.fails(
        &["ema", "--per-iter", "--order", "given", s(&a), s(&b)],
        1,
        &["a.safetensors", "has no step"],
    );
    let c = e.ckpt("c_2.safetensors", 2.0);
    e.fails(
        &["ema", "--per-iter", s(&b), s(&c)],
        2,
        &["strictly increasing"],
    );
}

#[test]
fn check_finite_names_the_file_and_tensor() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    let b = e.p("b_2.safetensors");
    save(
        &b,
        &[
            (
                "w",
                Dtype::F32,
                vec![2, 3],
                f32_bytes(&[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0]),
            ),
            ("b", Dtype::F32, vec![3], f32_bytes(&[0.0; 3])),
        ],
        &[],
    );
    e.fails(
        &["ema", "--check-finite", s(&a), s(&b)],
        1,
        &["b_2.safetensors", "`w`", "NaN"],
    );
    // Without the check, NaN propagates as the reference would.
    let out = e.p("o.safetensors");
    ok(&run(["ema", s(&a), s(&b), "-q", "-o", s(&out)]));
}

#[test]
fn narrowing_overflow_is_reported() {
    let e = Env::new();
    let a = e.p("a_1.safetensors");
    save(
        &a,
        &[("w", Dtype::F32, vec![2], f32_bytes(&[1e6, 1.0]))],
        &[],
    );
    e.fails(
        &["ema", "--dtype", "f16", s(&a)],
        1,
        &["`w`", "overflow F16"],
    );
}

#[test]
fn cuda_without_support_fails_cleanly() {
    let e = Env::new();
    let a = e.ckpt("a_1.safetensors", 1.0);
    // Where there is a GPU and the build has CUDA, `--device cuda` works (tests/cuda.rs).
    if !(cfg!(feature = "cuda") && common::gpu_present()) {
        e.fails(
            &["ema", "--device", "cuda", s(&a)],
            1,
            &["ema-tool: cuda: "],
        );
    }
    e.fails(&["ema", "--device", "tpu", s(&a)], 2, &["not a device"]);
}
