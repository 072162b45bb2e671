//! The fold kernel per dtype, in bytes of input folded per second, on one thread, on one work
//! item of the CPU executor (8 inputs, 1 MiB of input in all: 32 Ki f32 elements each), in
//! cache. Run `cargo bench --bench kernels`; criterion reports GiB/s and flags regressions
//! against the previous run. `mixed` folds inputs of four dtypes into bf16 (the path for
//! inputs of different dtypes and for `--dtype`). `sweep` folds the same f32 item into 1, 4
//! and 8 outputs at once (a sweep's arithmetic), in elements of output per second: what each
//! output of a sweep adds in CPU time, beside the writing of it.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ema_tool::codec::convert::encode;
use ema_tool::codec::DType;
use ema_tool::fold::kernels::fold_into;

const INPUTS: usize = 8;
/// Bytes of all inputs together, as in one work item of the CPU executor.
const ITEM_BYTES: usize = 1 << 20;

/// `n` values in [-1, 1) encoded as `dtype`.
fn values(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let vals: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f64 / (1u64 << 23) as f64 - 1.0
        })
        .collect();
    let mut out = vec![0u8; n * dtype.size()];
    encode(dtype, &vals, &mut out);
    out
}

fn fold(c: &mut Criterion) {
    let mut group = c.benchmark_group("fold");
    for dtype in [
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::F64,
        DType::F8E4M3,
    ] {
        let n = ITEM_BYTES / INPUTS / dtype.size();
        let data: Vec<Vec<u8>> = (0..INPUTS)
            .map(|k| values(dtype, n, k as u64 + 1))
            .collect();
        let inputs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let dtypes = vec![dtype; INPUTS];
        let weights: Vec<f64> = (0..INPUTS).map(|k| 1.0 / (k + 1) as f64).collect();
        let mut out = vec![0u8; n * dtype.size()];
        group.throughput(Throughput::Bytes((INPUTS * n * dtype.size()) as u64));
        group.bench_function(BenchmarkId::new("8 inputs", dtype), |b| {
            b.iter(|| fold_into(&dtypes, &weights, &inputs, dtype, &mut [&mut out], None))
        });
    }
    // Inputs of four dtypes, into bf16.
    let dtypes: Vec<DType> = [DType::F32, DType::BF16, DType::F16, DType::F64]
        .into_iter()
        .cycle()
        .take(INPUTS)
        .collect();
    let n = ITEM_BYTES / dtypes.iter().map(|d| d.size()).sum::<usize>();
    let data: Vec<Vec<u8>> = dtypes
        .iter()
        .enumerate()
        .map(|(k, &d)| values(d, n, k as u64 + 1))
        .collect();
    let inputs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let weights: Vec<f64> = (0..INPUTS).map(|k| 1.0 / (k + 1) as f64).collect();
    let mut out = vec![0u8; n * 2];
    group.throughput(Throughput::Bytes(data.iter().map(|d| d.len() as u64).sum()));
    group.bench_function("8 inputs/mixed", |b| {
        b.iter(|| {
            fold_into(
                &dtypes,
                &weights,
                &inputs,
                DType::BF16,
                &mut [&mut out],
                None,
            )
        })
    });
    group.finish();
}

fn sweep(c: &mut Criterion) {
    let mut group = c.benchmark_group("sweep");
    let n = ITEM_BYTES / INPUTS / 4;
    let data: Vec<Vec<u8>> = (0..INPUTS)
        .map(|k| values(DType::F32, n, k as u64 + 1))
        .collect();
    let inputs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let dtypes = vec![DType::F32; INPUTS];
    for k in [1, 4, 8] {
        let weights: Vec<f64> = (0..INPUTS * k).map(|i| 1.0 / (i + 1) as f64).collect();
        let mut outs = vec![vec![0u8; n * 4]; k];
        group.throughput(Throughput::Elements((n * k) as u64));
        group.bench_function(BenchmarkId::new("8 inputs f32, outputs", k), |b| {
            b.iter(|| {
                let mut refs: Vec<&mut [u8]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                fold_into(&dtypes, &weights, &inputs, DType::F32, &mut refs, None)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fold, sweep);
criterion_main!(benches);
