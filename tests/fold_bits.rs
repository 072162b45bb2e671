//! The CPU executor gives, bit for bit, what a straightforward scalar fold gives: every element
//! `((w_0·x_0) + w_1·x_1) + …` in f64, in input order, rounded once to the output dtype, the
//! decoding and rounding of the implementation before the speed work (`half`'s conversions,
//! f16 rounded through f32 as `half` does on every x86-64 CPU with F16C). Checked on generated
//! checkpoints of every float dtype, mixed dtypes and conversions, tensor sizes around every
//! block and chunk boundary, special values, with 1, 2, 3 and 8 threads, and with the inputs
//! mapped, read with `pread`, and both.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use common::Rng;
use ema_tool::checkpoint::{Checkpoint, Open};
use ema_tool::codec::safetensors::encode_header;
use ema_tool::codec::{DType, TensorSpec};
use ema_tool::fold::{self, Device, Progress, Sink};
use ema_tool::plan::{Make, Order, Output, Plan, Src, Tensor};
use ema_tool::runtime::Runtime;
use half::{bf16, f16};

/// Sizes around the kernel's 16-element groups and 512-element blocks, and the executor's
/// chunks (4 Ki to 64 Ki elements per item).
const SIZES: [usize; 10] = [1, 7, 16, 511, 513, 4099, 8192, 32769, 65537, 131_075];

/// Mostly values of a few magnitudes, with zeros, subnormal-making and special values.
fn value(rng: &mut Rng) -> f64 {
    let r = rng.next();
    let mant = (r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    match r % 64 {
        0 => 0.0,
        1 => -0.0,
        2 => mant * 1e-39,         // bf16/f32 subnormal territory after weighting
        3 => mant * 3e-7,          // f16 subnormals
        4 => mant * 6e4,           // near f16's largest
        5 => 1.0 + 2f64.powi(-8),  // bf16 tie
        6 => 1.0 + 2f64.powi(-11), // f16 tie
        _ => mant * [1.0, 0.01, 30.0][(r % 3) as usize],
    }
}

/// The value of `bits` (one element of `dtype`), as the implementation before decoded it.
fn decode(dtype: DType, b: &[u8]) -> f64 {
    match dtype {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
        DType::BF16 => {
            f32::from_bits((u16::from_le_bytes(b.try_into().unwrap()) as u32) << 16) as f64
        }
        DType::F16 => f16::from_bits(u16::from_le_bytes(b.try_into().unwrap())).to_f64(),
        DType::F8E4M3 | DType::F8E5M2 => f8_value(dtype, b[0]),
        _ => unreachable!(),
    }
}

/// float8 by its definition: e4m3fn (bias 7, no infinities, S.1111.111 is NaN) and e5m2
/// (bias 15, IEEE-like).
fn f8_value(dtype: DType, c: u8) -> f64 {
    let (ebits, mbits, bias) = if dtype == DType::F8E4M3 {
        (4, 3, 7)
    } else {
        (5, 2, 15)
    };
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((c >> mbits) & ((1 << ebits) - 1)) as i32;
    let m = (c & ((1 << mbits) - 1)) as f64;
    let emax = (1 << ebits) - 1;
    let v = if dtype == DType::F8E4M3 && e == emax && m == 7.0 {
        f64::NAN
    } else if dtype == DType::F8E5M2 && e == emax {
        if m == 0.0 {
            f64::INFINITY
        } else {
            f64::NAN
        }
    } else if e == 0 {
        m * 2f64.powi(1 - bias - mbits)
    } else {
        (1.0 + m / (1 << mbits) as f64) * 2f64.powi(e - bias)
    };
    sign * v
}

fn encode(dtype: DType, a: f64) -> Vec<u8> {
    match dtype {
        DType::F32 => (a as f32).to_le_bytes().to_vec(),
        DType::F64 => a.to_le_bytes().to_vec(),
        DType::BF16 => bf16::from_f64(a).to_bits().to_le_bytes().to_vec(),
        DType::F16 => f16::from_f32(a as f32).to_bits().to_le_bytes().to_vec(),
        _ => unreachable!(),
    }
}

/// Writes `count` checkpoints holding one tensor per entry of `SIZES`, checkpoint `k` in
/// `dtypes[k % dtypes.len()]`.
fn write_series(dir: &Path, count: usize, dtypes: &[DType], seed: u64) -> Vec<Checkpoint> {
    let mut rng = Rng::seeded(seed);
    (0..count)
        .map(|k| {
            let dtype = dtypes[k % dtypes.len()];
            let tensors: Vec<TensorSpec> = SIZES
                .iter()
                .map(|&n| TensorSpec {
                    name: format!("t{n}"),
                    dtype,
                    shape: vec![n],
                })
                .collect();
            let (mut bytes, _) = encode_header(&tensors, &BTreeMap::new());
            for &n in &SIZES {
                for _ in 0..n {
                    let v = value(&mut rng);
                    match dtype {
                        DType::F8E4M3 | DType::F8E5M2 => {
                            // Every finite code.
                            let mut c = (rng.next() >> 24) as u8;
                            while !f8_value(dtype, c).is_finite() {
                                c = c.wrapping_add(1);
                            }
                            bytes.push(c);
                        }
                        _ => bytes.extend(encode(dtype, v)),
                    }
                }
            }
            let path = dir.join(format!("c{k}.safetensors"));
            std::fs::write(&path, bytes).unwrap();
            Checkpoint::open(&path, Open::Readable).unwrap()
        })
        .collect()
}

/// The scalar reference: one element at a time, inputs in order.
fn reference(ckpts: &[Checkpoint], ti: usize, weights: &[f64], out: DType) -> Vec<u8> {
    let datas: Vec<(DType, Vec<u8>)> = ckpts
        .iter()
        .map(|c| {
            let t = &c.tensors()[ti];
            let mut buf = vec![0u8; t.len as usize];
            c.read_at(t, 0, &mut buf).unwrap();
            (t.dtype, buf)
        })
        .collect();
    let n = ckpts[0].tensors()[ti].numel() as usize;
    let mut result = Vec::new();
    for i in 0..n {
        let mut a = 0.0;
        for (k, ((dtype, data), &w)) in datas.iter().zip(weights).enumerate() {
            let s = dtype.size();
            let x = decode(*dtype, &data[i * s..(i + 1) * s]);
            if k == 0 {
                a = w * x;
            } else {
                a += w * x;
            }
        }
        result.extend(encode(out, a));
    }
    result
}

struct Memory(Vec<Mutex<Vec<u8>>>);
impl Sink for Memory {
    fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> ema_tool::Result<()> {
        let mut t = self.0[tensor].lock().unwrap();
        t[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

/// The plan of a fold of every tensor of `ckpts` into one output per weight vector of
/// `weights`, as `out`.
fn plan(ckpts: Vec<Checkpoint>, weights: &[Vec<f64>], out: DType) -> Plan {
    let tensors = (0..SIZES.len())
        .map(|ti| Tensor {
            name: format!("t{}", SIZES[ti]),
            dtype: out,
            shape: vec![SIZES[ti]],
            make: Make::Fold {
                sources: (0..ckpts.len())
                    .map(|input| Src { input, tensor: ti })
                    .collect(),
            },
        })
        .collect();
    let outputs = weights
        .iter()
        .enumerate()
        .map(|(k, w)| Output {
            target: format!("out{k}.safetensors").into(),
            params: Vec::new(),
            weights: w.clone(),
        })
        .collect();
    Plan {
        inputs: ckpts,
        order: Order::Given,
        outputs,
        tensors,
    }
}

/// Runs `plan` on `threads` threads, mapping the first `mapped` inputs: every output's tensors.
fn fold(plan: &Plan, out: DType, threads: usize, mapped: usize) -> Vec<Vec<Vec<u8>>> {
    let sinks: Vec<Memory> = plan
        .outputs
        .iter()
        .map(|_| {
            Memory(
                SIZES
                    .iter()
                    .map(|&n| Mutex::new(vec![0xAA; n * out.size()]))
                    .collect(),
            )
        })
        .collect();
    let refs: Vec<&dyn Sink> = sinks.iter().map(|s| s as &dyn Sink).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let opts = fold::Options {
        mapped_inputs: mapped,
        ..fold::Options::default()
    };
    pool.install(|| {
        fold::execute(
            plan,
            &refs,
            Device::Cpu,
            opts,
            &Progress::default(),
            &Runtime::new(),
        )
    })
    .unwrap();
    sinks
        .into_iter()
        .map(|s| s.0.into_iter().map(|m| m.into_inner().unwrap()).collect())
        .collect()
}

/// EMA-like weights over `count` inputs: not round numbers, none zero.
fn ema_weights(count: usize, m: f64) -> Vec<f64> {
    (0..count)
        .map(|k| {
            if k == 0 {
                (1.0f64 - m).powi(count as i32 - 1)
            } else {
                m * (1.0f64 - m).powi((count - 1 - k) as i32)
            }
        })
        .collect()
}

fn check(dtypes: &[DType], count: usize, out: DType, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = write_series(dir.path(), count, dtypes, seed);
    let weights = ema_weights(count, 0.37);
    let want: Vec<Vec<u8>> = (0..SIZES.len())
        .map(|ti| reference(&ckpts, ti, &weights, out))
        .collect();
    let plan = plan(ckpts, std::slice::from_ref(&weights), out);
    for threads in [1, 2, 3, 8] {
        for mapped in [0, count / 2, usize::MAX] {
            let got = fold(&plan, out, threads, mapped).remove(0);
            for (ti, (g, w)) in got.iter().zip(&want).enumerate() {
                if g != w {
                    let size = out.size();
                    let i = (0..g.len() / size)
                        .find(|&i| g[i * size..(i + 1) * size] != w[i * size..(i + 1) * size])
                        .unwrap();
                    panic!(
                        "{dtypes:?} → {out}: tensor of {} elements, {threads} threads, \
                         {mapped} mapped: element {i} is {:02x?}, expected {:02x?}",
                        SIZES[ti],
                        &g[i * size..(i + 1) * size],
                        &w[i * size..(i + 1) * size]
                    );
                }
            }
        }
    }
}

#[test]
fn several_outputs_from_one_read_are_each_the_scalar_fold() {
    let dir = tempfile::tempdir().unwrap();
    let mixed = [DType::BF16, DType::F32, DType::F16];
    let ckpts = write_series(dir.path(), 5, &mixed, 12);
    let sets: Vec<Vec<f64>> = [0.37, 0.01, 0.9]
        .iter()
        .map(|&m| ema_weights(5, m))
        .collect();
    let want: Vec<Vec<Vec<u8>>> = sets
        .iter()
        .map(|w| {
            (0..SIZES.len())
                .map(|ti| reference(&ckpts, ti, w, DType::BF16))
                .collect()
        })
        .collect();
    let plan = plan(ckpts, &sets, DType::BF16);
    for threads in [1, 3] {
        assert_eq!(
            fold(&plan, DType::BF16, threads, 2),
            want,
            "{threads} threads"
        );
    }
}

#[test]
fn f32_matches_the_scalar_fold() {
    check(&[DType::F32], 5, DType::F32, 1);
}

#[test]
fn bf16_matches_the_scalar_fold() {
    check(&[DType::BF16], 5, DType::BF16, 2);
}

#[test]
fn f16_matches_the_scalar_fold() {
    check(&[DType::F16], 5, DType::F16, 3);
}

#[test]
fn f64_matches_the_scalar_fold() {
    check(&[DType::F64], 3, DType::F64, 4);
}

#[test]
fn float8_matches_the_scalar_fold() {
    check(&[DType::F8E4M3], 3, DType::F32, 5);
    check(&[DType::F8E5M2], 3, DType::BF16, 6);
}

#[test]
fn mixed_dtypes_and_conversions_match_the_scalar_fold() {
    let mixed = [DType::F32, DType::BF16, DType::F16, DType::F64];
    check(&mixed, 6, DType::BF16, 7);
    check(&mixed, 6, DType::F16, 8);
    check(&[DType::F32], 4, DType::BF16, 9);
    check(&[DType::BF16], 4, DType::F32, 10);
}

#[test]
fn a_single_input_is_copied_through_the_fold() {
    // One input, weight 1: the conversion path of copies.
    check(&[DType::BF16], 1, DType::F16, 11);
}
