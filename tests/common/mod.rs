//! Helpers shared by the integration tests: run the built binary, read safetensors files with
//! the reference `safetensors` crate, compare values within SPEC §7's tolerances.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixtures directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Runs `ema-tool` with `args`; stdin is closed.
pub fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_ema-tool"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the binary runs")
}

/// Stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts exit status 0, printing stderr otherwise.
pub fn ok(o: &Output) {
    assert!(o.status.success(), "failed: {:?}\n{}", o.status, stderr(o));
}

/// One tensor read back: dtype name, shape, raw bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct T {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl T {
    /// Values as f64 (floats and integers).
    pub fn values(&self) -> Vec<f64> {
        let d = &self.data;
        match self.dtype.as_str() {
            "F32" => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            "F64" => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "BF16" => d
                .chunks_exact(2)
                .map(|c| {
                    f32::from_bits((u16::from_le_bytes(c.try_into().unwrap()) as u32) << 16) as f64
                })
                .collect(),
            "F16" => d
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
                .collect(),
            "I64" => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            "I32" => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            "U8" | "BOOL" => d.iter().map(|&b| b as f64).collect(),
            other => panic!("test helper: dtype {other} not handled"),
        }
    }
}

/// Reads a safetensors file with the reference crate: tensors and metadata.
pub fn load(path: &Path) -> (BTreeMap<String, T>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            (
                name,
                T {
                    dtype: format!("{:?}", v.dtype()),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    (tensors, metadata)
}

/// Writes a safetensors file with the reference crate from (name, dtype, shape, bytes).
pub fn save(
    path: &Path,
    tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    metadata: &[(&str, &str)],
) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: Option<std::collections::HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(
            metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One unit in the last place of `x` in a float format with `mant` stored mantissa bits and
/// minimum normal exponent `emin`.
fn ulp(x: f64, mant: i32, emin: i32) -> f64 {
    let e = if x == 0.0 {
        emin
    } else {
        (x.abs().log2().floor() as i32).max(emin)
    };
    2f64.powi(e - mant)
}

/// Checks `got` (output of dtype `dtype`) against `want` (expected values computed in f32):
/// f32/f64 within rtol 1e-5 / atol 1e-6, bf16/f16 within one ulp (SPEC §7). Returns a
/// description of the first failure.
pub fn close(name: &str, dtype: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{name}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = match dtype {
            "F32" | "F64" => 1e-6 + 1e-5 * w.abs(),
            "BF16" => ulp(w, 7, -126),
            "F16" => ulp(w, 10, -14),
            _ => 0.0,
        };
        if (g - w).abs().is_nan() || (g - w).abs() > tol {
            return Err(format!(
                "{name}[{i}]: got {g}, expected {w} (tolerance {tol:e}, {dtype})"
            ));
        }
    }
    Ok(())
}
