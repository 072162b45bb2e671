//! Helpers shared by the integration tests: run the built binary, read safetensors files with
//! the reference `safetensors` crate, compare values within the tolerances of `docs/accuracy.md`; build
//! (broken) safetensors files byte by byte, check that a directory holds nothing it should not.

#![allow(dead_code)]

pub mod corpus;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixtures directory.
pub fn fixtures() -> PathBuf {
    root().join("fixtures")
}

/// The binary under test.
pub fn bin() -> PathBuf {
    // A prepared test binary carried to another machine (bench/gpu-check.sh) names its
    // ema-tool there.
    std::env::var_os("EMA_TOOL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ema-tool")))
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

/// Runs `ema-tool` with `args` in directory `dir`; stdin is closed.
pub fn run_in<I, S>(dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_ema-tool"))
        .args(args)
        .current_dir(dir)
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
/// f32/f64 within rtol 1e-5 / atol 1e-6, bf16/f16 within one ulp (`docs/accuracy.md`). Returns a
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

/// Exit code, or 128 + signal.
pub fn code(out: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    out.status
        .code()
        .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0))
}

/// A safetensors file from a header given as JSON text and the data that follows it.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A tensor of a file to write by hand: name, dtype name, shape, data.
pub struct Spec<'a>(pub &'a str, pub &'a str, pub &'a [usize], pub Vec<u8>);

/// A well-formed safetensors file holding `tensors` in the order given, with string metadata.
pub fn file(tensors: &[Spec], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        obj.insert("__metadata__".into(), m.into());
    }
    let mut data = Vec::new();
    for Spec(name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        obj.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut header = serde_json::Value::Object(obj).to_string();
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    raw_file(&header, &data)
}

/// Names of everything in `dir`.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("a readable directory")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Names of the temporary files of ema-tool in `dir`.
pub fn temporaries(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.starts_with(".ema-tool-"))
        .collect()
}

/// Asserts that `stderr` is one line `ema-tool: ...` that contains `fragment`.
pub fn assert_one_line_error(stderr: &str, fragment: &str, context: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    let last = lines.last().copied().unwrap_or("");
    assert!(
        last.starts_with("ema-tool: ") && last.contains(fragment),
        "{context}: expected an error containing {fragment:?}, got {stderr:?}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{context}: panic: {stderr}"
    );
    // Warnings may come first; the error itself is one line.
    assert!(
        lines.iter().all(|l| l.starts_with("ema-tool: ")),
        "{context}: every line of stderr starts with `ema-tool: `, got {stderr:?}"
    );
}

/// A deterministic pseudo-random sequence (xorshift64*): the one generator of the tests.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `EMA_TOOL_SEED` or the clock; the seed is printed so that a failure can be
    /// replayed.
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("EMA_TOOL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: EMA_TOOL_SEED={seed}");
        Rng(seed | 1)
    }

    /// Seeded with `seed`: the same sequence on every run.
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Whether missing prerequisites fail the tests that need them (`EMA_TOOL_TEST_STRICT=1`, as
/// CI runs them) instead of being skipped with a note.
pub fn strict() -> bool {
    std::env::var_os("EMA_TOOL_TEST_STRICT").is_some_and(|v| v == "1")
}

/// Says that a test cannot check what it is for because `what` is missing here: a note, or
/// under [`strict`], a failure.
pub fn missing_prerequisite(what: &str) {
    assert!(
        !strict(),
        "EMA_TOOL_TEST_STRICT=1 and this test needs {what}"
    );
    eprintln!("note: skipped, this machine lacks {what} (EMA_TOOL_TEST_STRICT=1 fails instead)");
}

/// Whether this machine has an NVIDIA GPU: `nvidia-smi -L` lists one, or the driver library
/// (`libcuda.so.1` on the loader's path) counts at least one device.
pub fn gpu_present() -> bool {
    let smi = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU"));
    smi || driver_device_count() > 0
}

/// The devices that the driver library counts (`cuInit`, `cuDeviceGetCount`); 0 without one.
/// A stand-in driver put on `LD_LIBRARY_PATH` for a child process is not seen here: this
/// process's loader path is the test runner's.
fn driver_device_count() -> i32 {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type Count = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: dlopen and dlsym with NUL-terminated names; the symbols, when found, are the
    // driver API's `CUresult cuInit(unsigned)` and `CUresult cuDeviceGetCount(int*)`, called
    // with a valid pointer. The library stays loaded (no dlclose).
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return 0;
        }
        let init = libc::dlsym(lib, c"cuInit".as_ptr());
        let count = libc::dlsym(lib, c"cuDeviceGetCount".as_ptr());
        if init.is_null() || count.is_null() {
            return 0;
        }
        let init: Init = std::mem::transmute(init);
        let count: Count = std::mem::transmute(count);
        let mut n = 0;
        if init(0) != 0 || count(&mut n) != 0 {
            return 0;
        }
        n
    }
}

/// A tmpfs of `size` (`4m`) mounted on a new directory, unmounted when dropped; `None`, through
/// [`missing_prerequisite`], where mounting is not allowed.
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match o {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            Ok(o) => {
                missing_prerequisite(&format!(
                    "the right to mount a tmpfs ({})",
                    stderr(&o).trim()
                ));
                None
            }
            Err(e) => {
                missing_prerequisite(&format!("mount ({e})"));
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// `n` checkpoints of `tensors` f32 tensors of `numel` elements each, values depending on the
/// checkpoint, written as `dir/iter_<k>.safetensors` with step metadata. Returns their paths.
pub fn big_inputs(dir: &Path, n: usize, tensors: usize, numel: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|k| {
            let data: Vec<Vec<u8>> = (0..tensors)
                .map(|t| {
                    let v: Vec<f32> = (0..numel)
                        .map(|i| ((i * 31 + t * 7 + k * 13) % 1000) as f32 * 0.001 + k as f32)
                        .collect();
                    f32_bytes(&v)
                })
                .collect();
            let names: Vec<String> = (0..tensors).map(|t| format!("layer{t}.weight")).collect();
            let shape = [numel];
            let ts: Vec<Spec> = names
                .iter()
                .zip(data)
                .map(|(n, d)| Spec(n, "F32", &shape, d))
                .collect();
            let step = (k * 1000).to_string();
            let path = dir.join(format!("iter_{}.safetensors", k * 1000));
            std::fs::write(&path, file(&ts, &[("step", &step)])).unwrap();
            path
        })
        .collect()
}

/// Makes `cmd` run with RLIMIT_FSIZE at `limit` bytes.
pub fn with_file_size_limit(cmd: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe, fit for the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Every tensor of a checkpoint as ema-tool's readers give it: name → (dtype, shape, bytes).
pub fn read_tensors(path: &str) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    use ema_tool::checkpoint::{Checkpoint, Open};
    let c = Checkpoint::open(Path::new(path), Open::Readable).unwrap_or_else(|e| panic!("{e}"));
    c.tensors()
        .iter()
        .map(|t| {
            let mut b = vec![0u8; t.len as usize];
            c.read_at(t, 0, &mut b).unwrap();
            (t.name.clone(), (t.dtype.to_string(), t.shape.clone(), b))
        })
        .collect()
}

/// Runs the binary in `dir` and expects success; returns stdout.
pub fn ok_in(dir: &Path, args: &[&str]) -> String {
    let o = run_in(dir, args);
    assert!(
        o.status.success(),
        "ema-tool {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The strings of the JSON array `v` (a case's `args`, say).
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("not a string: {x}"))
                .to_string()
        })
        .collect()
}

/// The command of a fixture case: its `args`, then its `inputs` as paths under `base`.
pub fn case_args(case: &serde_json::Value, base: &Path) -> Vec<String> {
    let mut args = strings(&case["args"]);
    args.extend(
        strings(&case["inputs"])
            .iter()
            .map(|i| base.join(i).to_string_lossy().into_owned()),
    );
    args
}
