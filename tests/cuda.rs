//! `--device cuda`: the same bytes as `--device cpu`, or on a machine without a usable GPU (no
//! driver, no device, a build without the `cuda` feature) a one-line failure with exit status
//! 1 that writes nothing.
//!
//! Where does `--device cuda` run? On this machine's GPU when it has one (`nvidia-smi -L`, or
//! the driver counts a device); else, with the `cuda` feature, on the stand-in driver
//! (`tests/stand-in/libcuda.c`, built by the host C compiler), which runs the kernels on the
//! CPU behind the driver API. Either way it must succeed and match the CPU path bit for bit,
//! and fail exactly as the CPU path fails where that fails. Only a build without the feature,
//! or a machine without a C compiler (a missing prerequisite: a failure with
//! `EMA_TOOL_TEST_STRICT=1`), accepts a clean `cuda:` failure instead. Tiny stand-in drivers
//! check the messages for a driver without devices, a missing device and a driver that lacks
//! a function.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{file, gpu_present, stderr, Spec};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ema-tool-cuda-")
        .tempdir()
        .expect("temp dir")
}

/// Three small checkpoints: f32, bf16 and int64 tensors.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    (1..=3u64)
        .map(|k| {
            let f32s: Vec<u8> = (0..15)
                .flat_map(|i| ((i as f32 * 0.37 + k as f32).sin()).to_le_bytes())
                .collect();
            let bf16s: Vec<u8> = (0..7)
                .flat_map(|i| (half::bf16::from_f32(i as f32 / 3.0 - k as f32)).to_le_bytes())
                .collect();
            let p = dir.join(format!("iter_{}.safetensors", k * 100));
            let step = (k * 100).to_string();
            let tensors = [
                Spec("a.weight", "F32", &[3, 5], f32s),
                Spec("b.weight", "BF16", &[7], bf16s),
                Spec("c.steps", "I64", &[1], (k as i64).to_le_bytes().to_vec()),
            ];
            std::fs::write(&p, file(&tensors, &[("step", &step)])).unwrap();
            p
        })
        .collect()
}

fn ema_tool<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(common::bin());
    cmd.args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

/// Runs `command` on the inputs with `--device device`; returns the outcome and the output path.
fn fold(dir: &Path, command: &str, device: &str, env: &[(&str, &Path)]) -> (Output, PathBuf) {
    let out = dir.join(format!(
        "{command}-{}.safetensors",
        device.replace(':', "-")
    ));
    let ins = inputs(dir);
    let mut args = vec![command, "-o", out.to_str().unwrap(), "--device", device];
    args.extend(ins.iter().map(|p| p.to_str().unwrap()));
    (ema_tool(&args, env), out)
}

/// Exit status 1, one line `ema-tool: cuda: ...`, no panic, no output, no temporary file.
fn assert_clean_cuda_failure(o: &Output, out: &Path) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("ema-tool: cuda: "), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert!(!out.exists(), "{} was written", out.display());
    let dir = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ema-tool"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    err
}

/// Where `--device cuda` runs in these tests.
enum Driver {
    /// This machine's GPU.
    Gpu,
    /// The stand-in driver: the directory holding its `libcuda.so`.
    StandIn(PathBuf),
    /// Nowhere: a build without the `cuda` feature, or no C compiler for the stand-in.
    Absent,
}

/// The stand-in driver, built once per test run into a directory of its own (`None` without a
/// C compiler).
fn stand_in() -> Option<PathBuf> {
    static LIB: OnceLock<Option<PathBuf>> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ema-tool-stand-in-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let ok = Command::new(&cc)
            .args([
                "-shared",
                "-fPIC",
                "-O2",
                "-ffp-contract=off",
                "-Wall",
                "-I",
            ])
            .arg(root.join("src/fold/cuda"))
            .arg("-o")
            .arg(dir.join("libcuda.so"))
            .arg(root.join("tests/stand-in/libcuda.c"))
            .arg("-lpthread")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            common::missing_prerequisite(&format!(
                "a working C compiler ({cc}) for the stand-in CUDA driver"
            ));
        }
        ok.then_some(dir)
    })
    .clone()
}

fn driver() -> Driver {
    if !cfg!(feature = "cuda") {
        Driver::Absent
    } else if gpu_present() {
        Driver::Gpu
    } else {
        stand_in().map_or(Driver::Absent, Driver::StandIn)
    }
}

/// `LD_LIBRARY_PATH` with `lib` first.
fn lib_path(lib: &Path) -> PathBuf {
    let mut v = vec![lib.to_path_buf()];
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        v.extend(std::env::split_paths(&p));
    }
    PathBuf::from(std::env::join_paths(v).unwrap())
}

impl Driver {
    /// The environment of a `--device cuda` run, the stand-in logging to `log`.
    fn env(&self, log: &Path, extra: &[(&str, &str)]) -> Vec<(String, OsString)> {
        let mut env = Vec::new();
        if let Driver::StandIn(lib) = self {
            env.push(("LD_LIBRARY_PATH".into(), lib_path(lib).into_os_string()));
            env.push(("EMA_STAND_IN_LOG".into(), log.as_os_str().to_owned()));
        }
        env.extend(
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v))),
        );
        env
    }
}

/// Runs `args` and `-o DIR/NAME.<device><suffix>` with `--device cpu` and with `--device cuda`
/// (environment `extra` for the latter); both must succeed with the same bytes in every file
/// `NAME.<device><file>` of `files`, or both fail with the same message and write nothing.
/// Returns the stand-in's log of the cuda run (empty on a GPU).
fn agree(dir: &Path, name: &str, args: &[String], suffix: &str, files: &[&str]) -> String {
    agree_with(dir, name, args, suffix, files, &[])
}

fn agree_with(
    dir: &Path,
    name: &str,
    args: &[String],
    suffix: &str,
    files: &[&str],
    extra: &[(&str, &str)],
) -> String {
    let d = driver();
    let log = dir.join(format!("{name}.log"));
    let run = |device: &str| {
        let mut a: Vec<OsString> = args.iter().map(OsString::from).collect();
        a.push("-o".into());
        a.push(dir.join(format!("{name}.{device}{suffix}")).into());
        a.extend(["--device".into(), device.into(), "--quiet".into()]);
        let mut cmd = Command::new(common::bin());
        cmd.args(&a).stdin(std::process::Stdio::null());
        if device == "cuda" {
            for (k, v) in d.env(&log, extra) {
                cmd.env(k, v);
            }
        }
        cmd.output().expect("the binary runs")
    };
    let cpu = run("cpu");
    let gpu = run("cuda");
    let out = |device: &str, f: &str| dir.join(format!("{name}.{device}{f}"));
    if matches!(d, Driver::Absent) {
        let err = assert_clean_cuda_failure(&gpu, &out("cuda", files[0]));
        if !cfg!(feature = "cuda") {
            assert!(err.contains("built without CUDA support"), "{err}");
        }
        return String::new();
    }
    assert_eq!(
        (gpu.status.code(), stderr(&gpu)),
        (cpu.status.code(), stderr(&cpu)),
        "{name}: --device cuda (left) and --device cpu (right) end differently"
    );
    for f in files {
        let (c, g) = (out("cpu", f), out("cuda", f));
        if cpu.status.success() {
            let (a, b) = (std::fs::read(&c).unwrap(), std::fs::read(&g).unwrap());
            assert!(a == b, "{name}: {} and {} differ", c.display(), g.display());
        } else {
            assert!(!g.exists(), "{name}: {} written on failure", g.display());
        }
    }
    std::fs::read_to_string(&log).unwrap_or_default()
}

/// The stand-in really ran the device path: it loaded the embedded PTX and launched kernels.
fn assert_ran_on_the_device(name: &str, log: &str) {
    if matches!(driver(), Driver::StandIn(_)) {
        assert!(
            log.contains("module ptx"),
            "{name}: no module loaded: {log}"
        );
        assert!(
            log.contains("launch ema_encode"),
            "{name}: no launch: {log}"
        );
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn paths(ins: &[PathBuf]) -> impl Iterator<Item = String> + '_ {
    ins.iter().map(|p| p.to_str().unwrap().to_string())
}

#[test]
fn device_cuda_matches_the_cpu() {
    for command in ["ema", "swa"] {
        let dir = tmp();
        let ins = inputs(dir.path());
        let mut args = strings(&[command]);
        args.extend(paths(&ins));
        let log = agree(
            dir.path(),
            command,
            &args,
            ".safetensors",
            &[".safetensors"],
        );
        assert_ran_on_the_device(command, &log);
    }
}

#[test]
fn without_a_driver_the_error_names_the_libraries_looked_for() {
    if gpu_present() {
        return;
    }
    let dir = tmp();
    let (o, out) = fold(dir.path(), "ema", "cuda", &[]);
    let err = assert_clean_cuda_failure(&o, &out);
    if cfg!(feature = "cuda") {
        assert!(err.contains("libcuda.so, "), "{err}");
        assert!(err.contains("libcuda.so.1"), "{err}");
    } else {
        assert!(err.contains("built without CUDA support"), "{err}");
    }
}

#[test]
fn a_missing_device_fails_cleanly() {
    let dir = tmp();
    let (o, out) = fold(dir.path(), "ema", "cuda:99", &[]);
    assert_clean_cuda_failure(&o, &out);
}

#[test]
fn device_cpu_is_unaffected_by_the_cuda_feature() {
    let dir = tmp();
    let (o, out) = fold(dir.path(), "ema", "cpu", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
}

/// Stand-in driver libraries (`libcuda.so` in a directory of their own) that answer a few
/// calls as a driver would and lack every other function.
#[cfg(feature = "cuda")]
mod stand_in_driver {
    use super::*;

    const FAKE: &str = r#"
#include <stdlib.h>
typedef int CUresult;
static int mode(void) { const char* m = getenv("EMA_FAKE_CUDA"); return m ? atoi(m) : 0; }
CUresult cuInit(unsigned int flags) { (void)flags; return mode() == 0 ? 100 : 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN"; return 0;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == 100 ? "no CUDA-capable device is detected" : "unknown error"; return 0;
}
"#;

    /// The directory holding the stand-in `libcuda.so`, or `None` without a C compiler.
    fn driver(dir: &Path) -> Option<PathBuf> {
        let lib = dir.join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        let src = lib.join("fake.c");
        std::fs::write(&src, FAKE).unwrap();
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let ok = Command::new(&cc)
            .args(["-shared", "-fPIC", "-o"])
            .arg(lib.join("libcuda.so"))
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            common::missing_prerequisite(&format!(
                "a working C compiler ({cc}) for the stand-in driver library"
            ));
        }
        ok.then_some(lib)
    }

    fn with_driver(mode: &str, device: &str) -> Option<String> {
        let dir = tmp();
        let lib = driver(dir.path())?;
        let path = match std::env::var_os("LD_LIBRARY_PATH") {
            Some(p) => {
                let mut v = vec![lib.clone()];
                v.extend(std::env::split_paths(&p));
                std::env::join_paths(v).unwrap()
            }
            None => lib.clone().into_os_string(),
        };
        let path = PathBuf::from(path);
        let env = [
            ("LD_LIBRARY_PATH", path.as_path()),
            ("EMA_FAKE_CUDA", Path::new(mode)),
        ];
        let (o, out) = fold(dir.path(), "ema", device, &env);
        Some(assert_clean_cuda_failure(&o, &out))
    }

    #[test]
    fn a_driver_without_devices() {
        if let Some(err) = with_driver("0", "cuda") {
            assert!(err.contains("no CUDA-capable device is detected"), "{err}");
            assert!(err.contains("CUDA_ERROR_NO_DEVICE"), "{err}");
        }
    }

    #[test]
    fn a_device_number_past_the_last() {
        if let Some(err) = with_driver("1", "cuda:3") {
            assert!(
                err.contains("no device cuda:3: this machine has 1 CUDA device"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_driver_that_lacks_a_function_is_an_error_not_a_panic() {
        // cudarc panics on a missing symbol (here cuDeviceGet); the error names it.
        if let Some(err) = with_driver("1", "cuda:0") {
            assert!(err.contains("cuDeviceGet"), "{err}");
        }
    }
}

#[test]
fn a_sweep_on_the_device_matches_the_cpu() {
    let dir = tmp();
    let ins = inputs(dir.path());
    let mut args = strings(&["ema", "--decay", "0.5,0.9,0.99"]);
    args.extend(paths(&ins));
    let files = ["-0.5.safetensors", "-0.9.safetensors", "-0.99.safetensors"];
    let log = agree(dir.path(), "sweep", &args, "-{decay}.safetensors", &files);
    assert_ran_on_the_device("sweep", &log);
}

/// `n` checkpoints `DIR/<stem>_<k>.safetensors`, tensors `(name, dtype, shape, bytes)` made by
/// `tensors(k)`.
fn series(
    dir: &Path,
    stem: &str,
    n: usize,
    tensors: impl Fn(usize) -> Vec<(String, &'static str, Vec<usize>, Vec<u8>)>,
) -> Vec<String> {
    (0..n)
        .map(|k| {
            let ts = tensors(k);
            let specs: Vec<Spec> = ts
                .iter()
                .map(|(name, dt, shape, bytes)| Spec(name, dt, shape, bytes.clone()))
                .collect();
            let p = dir.join(format!("{stem}_{k}.safetensors"));
            let step = (100 * (k + 1)).to_string();
            std::fs::write(&p, file(&specs, &[("step", &step)])).unwrap();
            p.to_str().unwrap().to_string()
        })
        .collect()
}

fn f32s(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// A value in [-1, 1) for (checkpoint, element).
fn wave(k: usize, i: usize) -> f32 {
    ((i as f32 * 0.618 + k as f32 * 1.7).sin() * 0.9).clamp(-1.0, 0.999)
}

#[test]
fn non_finite_values_fail_as_on_the_cpu_or_pass_through_bit_for_bit() {
    let dir = tmp();
    let ins = series(dir.path(), "nan", 3, |k| {
        let mut v: Vec<f32> = (0..300).map(|i| wave(k, i)).collect();
        if k == 1 {
            v[7] = f32::NAN;
            v[8] = f32::from_bits(0x7fc0_1234); // a NaN with a payload
            v[9] = f32::INFINITY;
            v[250] = f32::NEG_INFINITY;
        }
        vec![
            ("a".into(), "F32", vec![300], f32s(v)),
            ("b".into(), "F32", vec![5], f32s((0..5).map(|i| wave(k, i)))),
        ]
    });
    for (name, check) in [("nan-checked", true), ("nan-through", false)] {
        let mut args = strings(&["ema", "--momentum", "0.3"]);
        if check {
            args.push("--check-finite".into());
        }
        args.extend(ins.iter().cloned());
        agree(dir.path(), name, &args, ".safetensors", &[".safetensors"]);
    }
}

#[test]
fn overflow_on_narrowing_fails_as_on_the_cpu() {
    let dir = tmp();
    let ins = series(dir.path(), "big", 2, |k| {
        let v: Vec<f32> = (0..100)
            .map(|i| if i == 42 { 1e30 } else { wave(k, i) })
            .collect();
        let d: Vec<u8> = (0..50)
            .flat_map(|i| if i == 3 { 1e300 } else { f64::from(wave(k, i)) }.to_le_bytes())
            .collect();
        vec![
            ("w".into(), "F32", vec![100], f32s(v)),
            ("d".into(), "F64", vec![50], d),
        ]
    });
    for dtype in ["f16", "bf16", "f32", "f64"] {
        let mut args = strings(&["ema", "--momentum", "0.5", "--dtype", dtype]);
        args.extend(ins.iter().cloned());
        agree(
            dir.path(),
            &format!("narrow-{dtype}"),
            &args,
            ".safetensors",
            &[".safetensors"],
        );
    }
}

#[test]
fn f8_and_mixed_dtype_inputs_match_the_cpu() {
    let dir = tmp();
    // Every f8 code in each f8 tensor; the mixed tensor is f32, bf16 and f16 in turn.
    let ins = series(dir.path(), "mixed", 3, |k| {
        let codes: Vec<u8> = (0..=255u8).map(|b| b.wrapping_add(k as u8 * 37)).collect();
        let mixed: (&'static str, Vec<u8>) = match k {
            0 => ("F32", f32s((0..77).map(|i| wave(k, i)))),
            1 => (
                "BF16",
                (0..77)
                    .flat_map(|i| half::bf16::from_f32(wave(k, i)).to_le_bytes())
                    .collect(),
            ),
            _ => (
                "F16",
                (0..77)
                    .flat_map(|i| half::f16::from_f32(wave(k, i)).to_le_bytes())
                    .collect(),
            ),
        };
        vec![
            ("e4m3".into(), "F8_E4M3", vec![256], codes.clone()),
            ("e5m2".into(), "F8_E5M2", vec![256], codes),
            ("mixed".into(), mixed.0, vec![77], mixed.1),
        ]
    });
    for (name, extra) in [("f8", &[][..]), ("f8-to-f32", &["--dtype", "f32"][..])] {
        let mut args = strings(&["ema", "--momentum", "0.25"]);
        args.extend(strings(extra));
        args.extend(ins.iter().cloned());
        let log = agree(dir.path(), name, &args, ".safetensors", &[".safetensors"]);
        assert_ran_on_the_device(name, &log);
    }
}

#[test]
fn more_small_tensors_than_a_batch_holds_match_the_cpu() {
    let dir = tmp();
    let n = 17_000; // past the 16 384 segments of a batch
    let ins = series(dir.path(), "many", 2, |k| {
        (0..n)
            .map(|t| {
                let v = f32s((0..3).map(|i| wave(k, t * 3 + i)));
                (format!("t{t}"), "F32", vec![3], v)
            })
            .collect()
    });
    let mut args = strings(&["swa"]);
    args.extend(ins.iter().cloned());
    let log = agree(dir.path(), "many", &args, ".safetensors", &[".safetensors"]);
    assert_ran_on_the_device("many", &log);
    if matches!(driver(), Driver::StandIn(_)) {
        assert!(log.matches("launch ema_encode").count() >= 2, "{log}");
    }
}

/// With little free device memory the batches shrink (more of them, a partial last one) and
/// the output is the same; below the floor it is a clear error.
#[test]
fn batches_shrink_to_the_free_device_memory() {
    if !matches!(driver(), Driver::StandIn(_)) {
        return; // the stand-in decides how much memory is free
    }
    let dir = tmp();
    let ins = series(dir.path(), "mem", 3, |k| {
        (0..4)
            .map(|t| {
                let n = 600_000 + t;
                let v = f32s((0..n).map(|i| wave(k, t + i)));
                (format!("w{t}"), "F32", vec![n], v)
            })
            .collect()
    });
    let mut args = strings(&["ema", "--momentum", "0.1"]);
    args.extend(ins.iter().cloned());
    let plenty = agree(
        dir.path(),
        "roomy",
        &args,
        ".safetensors",
        &[".safetensors"],
    );
    let tight = agree_with(
        dir.path(),
        "tight",
        &args,
        ".safetensors",
        &[".safetensors"],
        &[("EMA_STAND_IN_FREE", "24000000")],
    );
    let batches = |log: &str| log.matches("launch ema_encode").count();
    assert_eq!(batches(&plenty), 1, "{plenty}");
    assert!(batches(&tight) > 2, "{tight}");
    // Below the floor: one line, nothing written.
    let d = driver();
    let log = dir.path().join("floor.log");
    let out = dir.path().join("floor.safetensors");
    let mut a = args.clone();
    a.extend(strings(&["-o", out.to_str().unwrap(), "--device", "cuda"]));
    let env = d.env(&log, &[("EMA_STAND_IN_FREE", "1048576")]);
    let mut cmd = Command::new(common::bin());
    cmd.args(&a).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let err = assert_clean_cuda_failure(&o, &out);
    assert!(
        err.contains("out of memory on cuda:0: 1.0 MiB of device memory are free"),
        "{err}"
    );
}
