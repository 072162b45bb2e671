//! What the integration tests share: building safetensors files byte by byte, running the real
//! binary, and checking that a directory holds nothing it should not.
#![allow(dead_code)]

pub mod corpus;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ema-tool"))
}

/// Runs the binary with `args`; no stdin.
pub fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the binary runs")
}

/// Exit code, or 128 + signal.
pub fn code(out: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    out.status
        .code()
        .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Little-endian bytes of f32 values.
pub fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file from a header given as JSON text and the data that follows it.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A tensor of a well-formed file: name, dtype name, shape, data.
pub struct T<'a>(pub &'a str, pub &'a str, pub &'a [usize], pub Vec<u8>);

/// A well-formed safetensors file holding `tensors` in the order given, with string metadata.
pub fn file(tensors: &[T], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        obj.insert("__metadata__".into(), m.into());
    }
    let mut data = Vec::new();
    for T(name, dtype, shape, bytes) in tensors {
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

/// A deterministic pseudo-random sequence (xorshift64*), seeded from `EMA_TOOL_SEED` or the
/// clock; the seed is printed so that a failure can be replayed.
pub struct Rng(u64);

impl Rng {
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
                    f32s(&v)
                })
                .collect();
            let names: Vec<String> = (0..tensors).map(|t| format!("layer{t}.weight")).collect();
            let shape = [numel];
            let ts: Vec<T> = names
                .iter()
                .zip(data)
                .map(|(n, d)| T(n, "F32", &shape, d))
                .collect();
            let step = (k * 1000).to_string();
            let path = dir.join(format!("iter_{}.safetensors", k * 1000));
            std::fs::write(&path, file(&ts, &[("step", &step)])).unwrap();
            path
        })
        .collect()
}
