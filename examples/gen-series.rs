//! Writes a series of synthetic safetensors checkpoints for benchmarks and tests.
//!
//! ```text
//! cargo run --release --example gen-series -- --dir D --count 8 --tensors 64 --elems 1048576 --dtype f32
//! cargo run --release --example gen-series -- --dir D --count 8 --mix 4096x1024,16x1048576 --dtype bf16
//! ```
//!
//! Checkpoint `k` is `D/step_<1000·(k+1)>.safetensors` with `step` metadata; tensor values are a
//! deterministic function of (checkpoint, tensor, element), different in every file, in
//! [-1, 1). `--mix` is a comma-separated list of `COUNTxELEMS` groups of tensors.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use ema_tool::codec::safetensors::encode_header;
use ema_tool::codec::DType;
use ema_tool::codec::TensorSpec;

struct Opts {
    dir: PathBuf,
    count: usize,
    mix: Vec<(usize, usize)>,
    dtype: DType,
    seed: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: gen-series --dir DIR [--count N] [--tensors T --elems E | --mix TxE,TxE...] \
         [--dtype f32|bf16|f16|f64] [--seed S]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut count, mut tensors, mut elems, mut mix, mut dtype, mut seed) =
        (None, 8, 64, 1 << 20, None, DType::F32, 1u64);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--dir" => dir = Some(PathBuf::from(val())),
            "--count" => count = val().parse().unwrap_or_else(|_| usage()),
            "--tensors" => tensors = val().parse().unwrap_or_else(|_| usage()),
            "--elems" => elems = val().parse().unwrap_or_else(|_| usage()),
            "--seed" => seed = val().parse().unwrap_or_else(|_| usage()),
            "--mix" => {
                let groups = val()
                    .split(',')
                    .map(|g| {
                        let (t, e) = g.split_once('x')?;
                        Some((t.parse().ok()?, e.parse().ok()?))
                    })
                    .collect::<Option<Vec<(usize, usize)>>>()
                    .unwrap_or_else(|| usage());
                mix = Some(groups);
            }
            "--dtype" => {
                dtype = match val().to_ascii_lowercase().as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    "f64" => DType::F64,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    Opts {
        dir: dir.unwrap_or_else(|| usage()),
        count,
        mix: mix.unwrap_or(vec![(tensors, elems)]),
        dtype,
        seed,
    }
}

/// splitmix64: a fast, well-mixed deterministic stream.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() -> std::io::Result<()> {
    let o = parse();
    std::fs::create_dir_all(&o.dir)?;
    let mut tensors = Vec::new();
    for (g, &(n, elems)) in o.mix.iter().enumerate() {
        for i in 0..n {
            tensors.push(TensorSpec {
                name: format!("model.group{g}.layer{i}.weight"),
                dtype: o.dtype,
                shape: vec![elems],
            });
        }
    }
    let mut buf = Vec::new();
    for k in 0..o.count {
        let step = 1000 * (k as u64 + 1);
        let meta = BTreeMap::from([("step".to_string(), step.to_string())]);
        let (header, _) = encode_header(&tensors, &meta);
        let path = o.dir.join(format!("step_{step}.safetensors"));
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&path)?);
        w.write_all(&header)?;
        for (ti, t) in tensors.iter().enumerate() {
            let mut state = o.seed ^ ((k as u64) << 40) ^ ((ti as u64) << 8);
            buf.clear();
            for _ in 0..t.shape[0] {
                // 24 random bits → [-1, 1), exactly representable in f32.
                let v = (splitmix(&mut state) >> 40) as f32 / (1u32 << 23) as f32 - 1.0;
                match o.dtype {
                    DType::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                    DType::F64 => buf.extend_from_slice(&(v as f64).to_le_bytes()),
                    DType::BF16 => {
                        buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes())
                    }
                    DType::F16 => {
                        buf.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
                    }
                    _ => unreachable!(),
                }
            }
            w.write_all(&buf)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok(())
}
