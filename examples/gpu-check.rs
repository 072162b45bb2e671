//! Helpers of `bench/gpu-check.sh`: generate checkpoint series, compare two outputs bit for
//! bit, and run every fixture case on two devices.
//!
//! ```text
//! gpu-check gen DIR [--count N] [--tensors T] [--elems E] [--small S] [--dtype f32|bf16|f16|f64]
//! gpu-check compare A B
//! gpu-check cases FIXTURES EMA_TOOL OUT_DIR [DEVICE]
//! ```
//!
//! `gen` writes `DIR/step_<1000·(k+1)>.safetensors` (`step` metadata): `T` tensors of `E`
//! elements plus `S` small ones (256 elements) and an int64 counter, values a deterministic
//! function of (checkpoint, tensor, element) in [-1, 1).
//!
//! `compare` checks that B holds the same tensors as A with the same dtypes and shapes, and
//! the same bytes for every element: the design promises bit-identical outputs, NaN payloads
//! included. `EMA_NAN_NESS=1` relaxes NaN against NaN to NaN-ness only (for a device whose
//! arithmetic canonicalises NaN payloads, which must then be documented); such elements are
//! counted apart. Exit status 1 when any element differs.
//!
//! `cases` runs each case of `FIXTURES/cases.json` (and `pth_cases.json`) with `--device cpu`
//! and `--device DEVICE` (default `cuda`) and compares the two outputs. Where the CPU path
//! fails, the device must fail with the same message.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use ema_tool::checkpoint::{Checkpoint, Open};
use ema_tool::codec::convert;
use ema_tool::codec::safetensors::encode_header;
use ema_tool::codec::DType;
use ema_tool::codec::TensorSpec;
use rayon::prelude::*;

fn usage() -> ExitCode {
    eprintln!(
        "usage: gpu-check gen DIR [--count N] [--tensors T] [--elems E] [--small S] [--dtype D]\n       \
         gpu-check compare A B\n       gpu-check cases FIXTURES EMA_TOOL OUT_DIR [DEVICE]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("gen") if args.len() >= 2 => gen(&args[1..]),
        Some("compare") if args.len() == 3 => compare(Path::new(&args[1]), Path::new(&args[2]))
            .map(|report| {
                println!("{report}");
                report.ok()
            }),
        Some("cases") if args.len() == 4 || args.len() == 5 => cases(
            Path::new(&args[1]),
            Path::new(&args[2]),
            Path::new(&args[3]),
            args.get(4).map_or("cuda", String::as_str),
        ),
        _ => return usage(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gpu-check: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

fn parse<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<T> {
    v.and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{flag} needs a number"))
}

/// `gen DIR ...`.
fn gen(args: &[String]) -> Result<bool> {
    let dir = PathBuf::from(&args[0]);
    let (mut count, mut tensors, mut elems, mut small, mut dtype) =
        (8usize, 64usize, 1usize << 20, 0usize, DType::F32);
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--count" => count = parse(flag, it.next())?,
            "--tensors" => tensors = parse(flag, it.next())?,
            "--elems" => elems = parse(flag, it.next())?,
            "--small" => small = parse(flag, it.next())?,
            "--dtype" => {
                dtype = match it.next().map(String::as_str) {
                    Some("f32") => DType::F32,
                    Some("bf16") => DType::BF16,
                    Some("f16") => DType::F16,
                    Some("f64") => DType::F64,
                    _ => return Err("--dtype is f32, bf16, f16 or f64".into()),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut specs: Vec<TensorSpec> = (0..tensors)
        .map(|t| TensorSpec {
            name: format!("layers.{t}.weight"),
            dtype,
            shape: vec![elems],
        })
        .collect();
    specs.extend((0..small).map(|t| TensorSpec {
        name: format!("layers.{t}.norm.bias"),
        dtype,
        shape: vec![256],
    }));
    specs.push(TensorSpec {
        name: "num_batches_tracked".into(),
        dtype: DType::I64,
        shape: vec![1],
    });
    // One checkpoint per thread: series of many GB are made in seconds.
    (0..count).into_par_iter().try_for_each(|k| {
        let (mut vals, mut bytes) = (Vec::new(), Vec::new());
        let step = 1000 * (k + 1);
        let meta = BTreeMap::from([("step".to_string(), step.to_string())]);
        let path = dir.join(format!("step_{step}.safetensors"));
        let io = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut w = BufWriter::with_capacity(8 << 20, File::create(&path).map_err(io)?);
        w.write_all(&encode_header(&specs, &meta).0).map_err(io)?;
        for (t, spec) in specs.iter().enumerate() {
            if spec.dtype == DType::I64 {
                w.write_all(&(step as i64).to_le_bytes()).map_err(io)?;
                continue;
            }
            let n = spec.shape[0];
            vals.clear();
            vals.extend((0..n).map(|i| value(k, t, i)));
            bytes.resize(n * dtype.size(), 0);
            convert::encode(dtype, &vals, &mut bytes);
            w.write_all(&bytes).map_err(io)?;
        }
        w.flush().map_err(io)
    })?;
    Ok(true)
}

/// A value in [-1, 1) from (checkpoint, tensor, element): a base per element that changes a
/// little from one checkpoint to the next, as weights do during training.
fn value(k: usize, t: usize, i: usize) -> f64 {
    let mix = |mut x: u64| {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    };
    let unit = |x: u64| (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    let base = unit(mix(((t as u64) << 32) ^ i as u64));
    let drift = unit(mix(((k as u64) << 48)
        ^ ((t as u64) << 32)
        ^ i as u64
        ^ 0x9e37));
    (base * 0.9 + drift * 0.1).clamp(-1.0, 0.999_999)
}

/// What `compare` found.
#[derive(Default)]
struct Report {
    tensors: usize,
    elements: u64,
    identical: u64,
    /// NaN against a NaN of other bits, accepted with `EMA_NAN_NESS=1`.
    nan_ness: u64,
    /// Different bits: (tensor, element, a, b).
    bad: Vec<(String, usize, f64, f64)>,
    bad_count: u64,
    problems: Vec<String>,
}

impl Report {
    fn ok(&self) -> bool {
        self.bad_count == 0 && self.problems.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tensors, {} elements: {} bit-identical, {} differ",
            self.tensors, self.elements, self.identical, self.bad_count
        )?;
        if self.nan_ness > 0 {
            write!(f, ", {} NaN against NaN of other bits", self.nan_ness)?;
        }
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        for (name, i, a, b) in &self.bad {
            write!(f, "\n  {name}[{i}]: {a:e} vs {b:e}")?;
        }
        Ok(())
    }
}

fn compare(a: &Path, b: &Path) -> Result<Report> {
    let nan_ness = std::env::var_os("EMA_NAN_NESS").is_some_and(|v| v == "1");
    let open = |p: &Path| Checkpoint::open(p, Open::Readable).map_err(|e| e.to_string());
    let (ca, cb) = (open(a)?, open(b)?);
    let mut r = Report::default();
    for ta in ca.tensors() {
        let Some(tb) = cb.get(&ta.name) else {
            r.problems
                .push(format!("{}: missing from {}", ta.name, b.display()));
            continue;
        };
        if (ta.dtype, &ta.shape) != (tb.dtype, &tb.shape) {
            r.problems.push(format!(
                "{}: {} {:?} vs {} {:?}",
                ta.name, ta.dtype, ta.shape, tb.dtype, tb.shape
            ));
            continue;
        }
        let read = |c: &Checkpoint, t| {
            let mut v = vec![0u8; ta.len as usize];
            c.read_at(t, 0, &mut v)
                .map(|()| v)
                .map_err(|e| e.to_string())
        };
        let (ba, bb) = (read(&ca, ta)?, read(&cb, tb)?);
        let size = ta.dtype.size();
        let n = ta.numel() as usize;
        let (mut va, mut vb) = (vec![0.0; n], vec![0.0; n]);
        convert::decode(ta.dtype, &ba, &mut va);
        convert::decode(ta.dtype, &bb, &mut vb);
        r.tensors += 1;
        r.elements += n as u64;
        for i in 0..n {
            let (ea, eb) = (&ba[i * size..][..size], &bb[i * size..][..size]);
            if ea == eb {
                r.identical += 1;
                continue;
            }
            let (x, y) = (va[i], vb[i]);
            let within = nan_ness && x.is_nan() && y.is_nan();
            r.nan_ness += u64::from(within);
            if !within {
                r.bad_count += 1;
                if r.bad.len() < 10 {
                    r.bad.push((ta.name.clone(), i, x, y));
                }
            }
        }
    }
    for tb in cb.tensors() {
        if ca.get(&tb.name).is_none() {
            r.problems
                .push(format!("{}: not in {}", tb.name, a.display()));
        }
    }
    Ok(r)
}

/// `cases FIXTURES EMA_TOOL OUT_DIR DEVICE`.
fn cases(fixtures: &Path, bin: &Path, out: &Path, device: &str) -> Result<bool> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let (mut passed, mut failed) = (0, 0);
    for file in ["cases.json", "pth_cases.json"] {
        let path = fixtures.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let list = doc["cases"].as_array().cloned().unwrap_or_default();
        for case in list {
            let name = case["name"].as_str().unwrap_or("?").to_string();
            let strs = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let args = strs(&case["args"]);
            let inputs: Vec<PathBuf> = strs(&case["inputs"])
                .iter()
                .map(|i| fixtures.join(i))
                .collect();
            let run = |dev: &str| -> std::result::Result<PathBuf, String> {
                let o = out.join(format!("{name}.{}.safetensors", dev.replace(':', "-")));
                let _ = std::fs::remove_file(&o);
                let res = Command::new(bin)
                    .args(&args)
                    .args(&inputs)
                    .arg("-o")
                    .arg(&o)
                    .args(["--device", dev, "--quiet"])
                    .output()
                    .map_err(|e| format!("{}: {e}", bin.display()))?;
                if res.status.success() {
                    Ok(o)
                } else {
                    Err(String::from_utf8_lossy(&res.stderr).trim().to_string())
                }
            };
            let cpu = match run("cpu") {
                Ok(p) => p,
                Err(cpu_err) => {
                    match run(device) {
                        Err(e) if e == cpu_err => {
                            println!("ok    {name}: both fail: {e}");
                            passed += 1;
                        }
                        Err(e) => {
                            println!("FAIL  {name}: cpu fails with {cpu_err}, {device} with {e}");
                            failed += 1;
                        }
                        Ok(_) => {
                            println!("FAIL  {name}: cpu fails with {cpu_err}, {device} succeeds");
                            failed += 1;
                        }
                    }
                    continue;
                }
            };
            match run(device).and_then(|gpu| compare(&cpu, &gpu)) {
                Ok(r) if r.ok() => {
                    println!("ok    {name}: {r}");
                    passed += 1;
                }
                Ok(r) => {
                    println!("FAIL  {name}: {r}");
                    failed += 1;
                }
                Err(e) => {
                    println!("FAIL  {name}: {e}");
                    failed += 1;
                }
            }
        }
    }
    println!("cases: {passed} agree, {failed} disagree");
    Ok(failed == 0 && passed > 0)
}
