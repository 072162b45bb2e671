//! `--device cuda`: on a machine without a usable GPU (no driver, no device, a build without
//! the `cuda` feature) it fails in one line with exit status 1 and writes nothing; on a machine
//! with one it writes the same bytes as `--device cpu`. With the `cuda` feature, stand-in
//! driver libraries built by the host C compiler check the messages for a driver without
//! devices, a missing device and a driver that lacks a function.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

fn ema_tool(args: &[&str], env: &[(&str, &Path)]) -> Output {
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

/// On a machine with a GPU and a build with the `cuda` feature, `--device cuda` must work.
fn gpu_required() -> bool {
    cfg!(feature = "cuda") && gpu_present()
}

#[test]
fn device_cuda_fails_cleanly_or_matches_the_cpu() {
    for command in ["ema", "swa"] {
        let dir = tmp();
        let (cpu, cpu_out) = fold(dir.path(), command, "cpu", &[]);
        assert!(cpu.status.success(), "{}", stderr(&cpu));
        let (gpu, gpu_out) = fold(dir.path(), command, "cuda", &[]);
        assert!(
            gpu.status.success() || !gpu_required(),
            "{command} --device cuda fails on a machine with a GPU: {}",
            stderr(&gpu)
        );
        if gpu.status.success() {
            // A machine with a GPU: the same bytes as the CPU path.
            let (a, b) = (
                std::fs::read(cpu_out).unwrap(),
                std::fs::read(gpu_out).unwrap(),
            );
            assert!(
                a == b,
                "{command}: --device cuda and --device cpu outputs differ"
            );
        } else {
            let err = assert_clean_cuda_failure(&gpu, &gpu_out);
            if !cfg!(feature = "cuda") {
                assert!(err.contains("built without CUDA support"), "{err}");
            }
        }
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
fn a_sweep_on_the_device_fails_cleanly_or_matches_the_cpu() {
    let dir = tmp();
    let ins = inputs(dir.path());
    let decays = ["0.5", "0.9", "0.99"];
    let run = |device: &str| {
        let template = dir
            .path()
            .join(format!("sweep-{device}-{{decay}}.safetensors"));
        let mut args = vec![
            "ema".to_string(),
            "--decay".into(),
            decays.join(","),
            "-o".into(),
            template.to_str().unwrap().into(),
            "--device".into(),
            device.into(),
        ];
        args.extend(ins.iter().map(|p| p.to_str().unwrap().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let outs: Vec<PathBuf> = decays
            .iter()
            .map(|d| dir.path().join(format!("sweep-{device}-{d}.safetensors")))
            .collect();
        (ema_tool(&args, &[]), outs)
    };
    let (cpu, cpu_outs) = run("cpu");
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    let (gpu, gpu_outs) = run("cuda");
    assert!(
        gpu.status.success() || !gpu_required(),
        "a sweep with --device cuda fails on a machine with a GPU: {}",
        stderr(&gpu)
    );
    if gpu.status.success() {
        for (c, g) in cpu_outs.iter().zip(&gpu_outs) {
            assert!(
                std::fs::read(c).unwrap() == std::fs::read(g).unwrap(),
                "{}: --device cuda and --device cpu differ",
                g.display()
            );
        }
    } else {
        for g in &gpu_outs {
            assert_clean_cuda_failure(&gpu, g);
        }
    }
}
