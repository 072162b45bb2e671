//! The fold kernels: `Σ_k w_k · x_k` over ranges of elements of any float dtypes, accumulated in
//! f64 and encoded once into the output dtype. Fused single loops over byte slices, no
//! allocation; the element conversions come from `codec::convert`.
//!
//! The loops are written so that the compiler vectorizes them. On x86-64, [`fold_into`] runs a
//! copy of them compiled for AVX-512 or AVX2 when the CPU has it: the f64 arithmetic is four or
//! two times as wide as with the baseline SSE2. Every copy performs the same IEEE operations in
//! the same order (Rust never fuses a multiply and an add into an FMA), so they give the same
//! bits.

use crate::codec::convert::{accumulate_impl, bf16_bytes_to_f64, encode_impl, f16_bytes_to_f64};
use crate::codec::dtype::DType;

/// Elements folded at a time through every input: 4 KiB of f64 accumulators stay in L1.
pub const BLOCK: usize = 512;

/// `outs[o] = encode(Σ_k weights[o·S + k] · x_k)` for every output `o` (`S` inputs): the fold
/// of one range of elements into one or several outputs.
///
/// Input `k` is `inputs[k]`, `n` elements of `dtypes[k]`, where `n` is the number of elements
/// of each output (encoded as `out_dtype`). Each element is computed as
/// `((w_0·x_0) + w_1·x_1) + …` in f64, in input order, and rounded once to `out_dtype`, so the
/// result depends neither on how a tensor is split into ranges nor on the other outputs.
///
/// The accumulators of [`BLOCK`] elements go through every input before being encoded, so they
/// never leave L1: accumulating a whole range input by input made the loop bound by the loads
/// and stores of its accumulators. The block of every input is read from memory once for all
/// the outputs. `check(o, acc)` sees every block of results of output `o` before it is encoded.
pub fn fold_into(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    mut check: impl FnMut(usize, &[f64]),
) {
    #[cfg(target_arch = "x86_64")]
    {
        if fold_into_avx512_if_available(dtypes, weights, inputs, out_dtype, outs, &mut check) {
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: `fold_into_avx2` only needs the CPU to have AVX2, checked just above.
            unsafe { fold_into_avx2(dtypes, weights, inputs, out_dtype, outs, check) };
            return;
        }
    }
    fold_into_impl(dtypes, weights, inputs, out_dtype, outs, check)
}

/// Runs [`fold_into_impl`] compiled for AVX-512 (eight f64 per operation) when the CPU has it;
/// returns whether it ran. The fold of 8 × 256 MB bf16 checkpoints took 0.32 s of CPU instead
/// of 0.48 s with AVX2 (f32: 0.17 s instead of 0.19 s, bound by memory). AVX-512 code needs
/// Rust 1.89; older compilers build without it.
#[cfg(all(target_arch = "x86_64", ema_tool_avx512))]
fn fold_into_avx512_if_available(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    check: impl FnMut(usize, &[f64]),
) -> bool {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx512f") && has!("avx512bw") && has!("avx512vl")) {
        return false;
    }
    // SAFETY: `fold_into_avx512` needs these features, checked just above.
    unsafe { fold_into_avx512(dtypes, weights, inputs, out_dtype, outs, check) };
    true
}

/// Without Rust 1.89, no AVX-512 copy.
#[cfg(all(target_arch = "x86_64", not(ema_tool_avx512)))]
fn fold_into_avx512_if_available(
    _: &[DType],
    _: &[f64],
    _: &[&[u8]],
    _: DType,
    _: &mut [&mut [u8]],
    _: impl FnMut(usize, &[f64]),
) -> bool {
    false
}

/// [`fold_into_impl`] compiled for AVX-512.
#[cfg(all(target_arch = "x86_64", ema_tool_avx512))]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fold_into_avx512(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    check: impl FnMut(usize, &[f64]),
) {
    fold_into_impl(dtypes, weights, inputs, out_dtype, outs, check)
}

/// [`fold_into_impl`] compiled for AVX2 (the features the CPU must have to run it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fold_into_avx2(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    check: impl FnMut(usize, &[f64]),
) {
    fold_into_impl(dtypes, weights, inputs, out_dtype, outs, check)
}

#[inline(always)]
fn fold_into_impl(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    mut check: impl FnMut(usize, &[f64]),
) {
    let osize = out_dtype.size();
    let (k, sources) = (outs.len(), inputs.len());
    let n = outs.first().map_or(0, |o| o.len() / osize);
    debug_assert_eq!(dtypes.len(), sources);
    debug_assert_eq!(weights.len(), k * sources);
    debug_assert!(outs.iter().all(|o| o.len() == n * osize));
    debug_assert!(dtypes
        .iter()
        .zip(inputs)
        .all(|(d, x)| x.len() == n * d.size()));
    let same = dtypes.iter().all(|&d| d == dtypes[0]);
    if k > 1 && same {
        let conv = match dtypes[0] {
            DType::F32 => Some(Conv::F32),
            DType::BF16 => Some(Conv::BF16),
            DType::F16 => Some(Conv::F16),
            DType::F64 => Some(Conv::F64),
            _ => None,
        };
        if let Some(conv) = conv {
            return fold_multi(conv, weights, inputs, n, out_dtype, outs, &mut check);
        }
    }
    let mut acc = [0f64; BLOCK];
    for b in (0..n).step_by(BLOCK) {
        let e = (b + BLOCK).min(n);
        let acc = &mut acc[..e - b];
        for (o, out) in outs.iter_mut().enumerate() {
            let weights = &weights[o * sources..(o + 1) * sources];
            if same {
                let conv = |b: [u8; 4]| f32::from_le_bytes(b) as f64;
                match dtypes[0] {
                    DType::F32 => fold_block_same(conv, weights, inputs, b, acc),
                    DType::BF16 => fold_block_same(bf16_bytes_to_f64, weights, inputs, b, acc),
                    DType::F16 => fold_block_same(f16_bytes_to_f64, weights, inputs, b, acc),
                    DType::F64 => fold_block_same(f64::from_le_bytes, weights, inputs, b, acc),
                    _ => fold_block_mixed(dtypes, weights, inputs, b, acc),
                }
            } else {
                fold_block_mixed(dtypes, weights, inputs, b, acc);
            }
            check(o, acc);
            encode_impl(out_dtype, acc, &mut out[b * osize..e * osize]);
        }
    }
}

/// Elements summed at a time through every input by [`fold_block_same`]: four AVX-512 (eight
/// AVX2) registers of f64, independent chains of additions enough to hide their latency (16
/// lanes left the bf16 fold waiting on it: 0.37 s of CPU instead of 0.32 s).
const LANES: usize = 32;

/// Folds elements `b .. b + acc.len()` of inputs that all have the `S`-byte dtype that `conv`
/// decodes: [`LANES`] elements at a time go through every input with their sums in registers,
/// so the accumulators are not loaded and stored once per input (a third of the time of the
/// fold of 8 f32 inputs).
#[inline(always)]
fn fold_block_same<const S: usize>(
    conv: impl Fn([u8; S]) -> f64,
    weights: &[f64],
    inputs: &[&[u8]],
    b: usize,
    acc: &mut [f64],
) {
    let len = acc.len();
    let full = len - len % LANES;
    let input = |k: usize, i: usize, count: usize| {
        let start = (b + i) * S;
        &inputs[k][start..start + count * S]
    };
    for g in (0..full).step_by(LANES) {
        let mut a = [0f64; LANES];
        let x = input(0, g, LANES);
        for (j, a) in a.iter_mut().enumerate() {
            *a = weights[0] * conv(x[j * S..j * S + S].try_into().unwrap());
        }
        for (k, &w) in weights.iter().enumerate().skip(1) {
            let x = input(k, g, LANES);
            for (j, a) in a.iter_mut().enumerate() {
                *a += w * conv(x[j * S..j * S + S].try_into().unwrap());
            }
        }
        acc[g..g + LANES].copy_from_slice(&a);
    }
    for (i, a) in acc.iter_mut().enumerate().skip(full) {
        *a = weights[0] * conv(input(0, i, 1).try_into().unwrap());
        for (k, &w) in weights.iter().enumerate().skip(1) {
            *a += w * conv(input(k, i, 1).try_into().unwrap());
        }
    }
}

/// The input dtypes [`fold_multi`] decodes.
#[derive(Clone, Copy)]
enum Conv {
    F32,
    BF16,
    F16,
    F64,
}

/// Outputs folded together by [`fold_block_multi`]: their sums of a group of elements stay in
/// registers while the group of every input is decoded once for all of them.
const GROUP: usize = 4;

/// [`fold_into_impl`] for several outputs of inputs of one dtype: each element of every input
/// is loaded and decoded once for [`GROUP`] outputs, instead of once per output. Same
/// operations in the same order as the one-output fold, so the same bits.
#[inline(always)]
fn fold_multi(
    conv: Conv,
    weights: &[f64],
    inputs: &[&[u8]],
    n: usize,
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    check: &mut impl FnMut(usize, &[f64]),
) {
    let osize = out_dtype.size();
    let sources = inputs.len();
    let mut accs = [[0f64; BLOCK]; GROUP];
    // The weights of each group of outputs, input by input: `wt[first·S + k·G + j]` for
    // output `first + j` of the group of `G` outputs from `first`.
    let k = outs.len();
    let groups = || (0..k).step_by(GROUP).map(move |f| (f, GROUP.min(k - f)));
    let mut wt = Vec::with_capacity(weights.len());
    for (first, g) in groups() {
        for k in 0..sources {
            wt.extend((first..first + g).map(|o| weights[o * sources + k]));
        }
    }
    for b in (0..n).step_by(BLOCK) {
        let e = (b + BLOCK).min(n);
        // Every group folds the same block of the inputs, from L1 after the first.
        for (first, g) in groups() {
            let wt = &wt[first * sources..(first + g) * sources];
            let accs = &mut accs[..g];
            macro_rules! run {
                ($g:literal) => {{
                    let accs: &mut [[f64; BLOCK]; $g] = accs.try_into().unwrap();
                    let f32c = |b: [u8; 4]| f32::from_le_bytes(b) as f64;
                    match conv {
                        Conv::F32 => fold_block_multi::<4, $g>(f32c, wt, inputs, b, e, accs),
                        Conv::BF16 => {
                            fold_block_multi::<2, $g>(bf16_bytes_to_f64, wt, inputs, b, e, accs)
                        }
                        Conv::F16 => {
                            fold_block_multi::<2, $g>(f16_bytes_to_f64, wt, inputs, b, e, accs)
                        }
                        Conv::F64 => {
                            fold_block_multi::<8, $g>(f64::from_le_bytes, wt, inputs, b, e, accs)
                        }
                    }
                }};
            }
            match g {
                1 => run!(1),
                2 => run!(2),
                3 => run!(3),
                _ => run!(4),
            }
            for (j, acc) in accs.iter().enumerate() {
                let acc = &acc[..e - b];
                check(first + j, acc);
                encode_impl(out_dtype, acc, &mut outs[first + j][b * osize..e * osize]);
            }
        }
    }
}

/// Elements of a group of [`fold_block_multi`]: with four outputs, eight AVX-512 registers
/// of sums.
const MULTI_LANES: usize = 16;

/// Folds elements `b .. e` of inputs of the `S`-byte dtype that `conv` decodes into the `K`
/// accumulators `accs`, with the weights `wt[k·K + j]` of input `k` and output `j`.
#[inline(always)]
fn fold_block_multi<const S: usize, const K: usize>(
    conv: impl Fn([u8; S]) -> f64,
    wt: &[f64],
    inputs: &[&[u8]],
    b: usize,
    e: usize,
    accs: &mut [[f64; BLOCK]; K],
) {
    let len = e - b;
    let full = len - len % MULTI_LANES;
    let (w0, wt) = wt.split_at(K);
    let w0: &[f64; K] = w0.try_into().unwrap();
    for g in (0..full).step_by(MULTI_LANES) {
        let start = (b + g) * S;
        let decode = |x: &[u8]| -> [f64; MULTI_LANES] {
            let x = &x[start..start + MULTI_LANES * S];
            std::array::from_fn(|j| conv(x[j * S..j * S + S].try_into().unwrap()))
        };
        let x = decode(inputs[0]);
        let mut a: [[f64; MULTI_LANES]; K] = std::array::from_fn(|o| {
            let w = w0[o];
            std::array::from_fn(|j| w * x[j])
        });
        for (input, w) in inputs[1..].iter().zip(wt.chunks_exact(K)) {
            let x = decode(input);
            for (a, &w) in a.iter_mut().zip(w) {
                for (a, &x) in a.iter_mut().zip(&x) {
                    *a += w * x;
                }
            }
        }
        for (acc, a) in accs.iter_mut().zip(&a) {
            acc[g..g + MULTI_LANES].copy_from_slice(a);
        }
    }
    for i in full..len {
        let at = |x: &[u8]| conv(x[(b + i) * S..(b + i + 1) * S].try_into().unwrap());
        let x = at(inputs[0]);
        for (acc, &w) in accs.iter_mut().zip(w0) {
            acc[i] = w * x;
        }
        for (input, w) in inputs[1..].iter().zip(wt.chunks_exact(K)) {
            let x = at(input);
            for (acc, &w) in accs.iter_mut().zip(w) {
                acc[i] += w * x;
            }
        }
    }
}

/// Folds elements `b .. b + acc.len()` of inputs of any dtypes, one input at a time.
#[inline(always)]
fn fold_block_mixed(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    b: usize,
    acc: &mut [f64],
) {
    let e = b + acc.len();
    for (k, ((&dtype, &w), x)) in dtypes.iter().zip(weights).zip(inputs).enumerate() {
        let size = dtype.size();
        accumulate_impl(dtype, &x[b * size..e * size], w, acc, k == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::convert::encode;
    use crate::testing::Rng;

    #[test]
    fn every_compiled_copy_of_the_fold_gives_the_same_bits() {
        // fold_into runs the AVX2 copy where the CPU has it; the baseline copy must agree.
        let mut rng = Rng::new(7);
        let mut next = || rng.next();
        for dtype in [
            DType::F32,
            DType::BF16,
            DType::F16,
            DType::F64,
            DType::F8E5M2,
        ] {
            for n in [1, 15, 16, 17, 511, 512, 513, 5000] {
                let inputs: Vec<Vec<u8>> = (0..5)
                    .map(|_| {
                        let vals: Vec<f64> = (0..n)
                            .map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0)
                            .collect();
                        let mut b = vec![0u8; n * dtype.size()];
                        encode(dtype, &vals, &mut b);
                        b
                    })
                    .collect();
                let inputs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
                let dtypes = vec![dtype; 5];
                let weights = [0.1, 0.2, 0.3, 0.15, 0.25];
                let fold = |f: &dyn Fn(&mut [u8])| {
                    let mut out = vec![0xAAu8; n * dtype.size()];
                    f(&mut out);
                    out
                };
                let want = fold(&|o| {
                    fold_into_impl(&dtypes, &weights, &inputs, dtype, &mut [o], |_, _| {})
                });
                #[cfg(target_arch = "x86_64")]
                {
                    use std::arch::is_x86_feature_detected as has;
                    if has!("avx2") {
                        // SAFETY: the CPU has AVX2.
                        let got = fold(&|o| unsafe {
                            fold_into_avx2(&dtypes, &weights, &inputs, dtype, &mut [o], |_, _| {})
                        });
                        assert_eq!(got, want, "AVX2, {dtype} × {n}");
                    }
                    // Where the CPU has no AVX-512, nothing to compare.
                    let got = fold(&|o| {
                        if !fold_into_avx512_if_available(
                            &dtypes,
                            &weights,
                            &inputs,
                            dtype,
                            &mut [&mut *o],
                            |_, _| {},
                        ) {
                            o.copy_from_slice(&want);
                        }
                    });
                    assert_eq!(got, want, "AVX-512, {dtype} × {n}");
                }
                let got =
                    fold(&|o| fold_into(&dtypes, &weights, &inputs, dtype, &mut [o], |_, _| {}));
                assert_eq!(got, want, "{dtype} × {n}");
            }
        }
    }

    #[test]
    fn several_outputs_are_each_the_fold_of_their_own_weights() {
        // Nine outputs: two full groups of the fused kernel and one of one output; lengths
        // that end inside a group of lanes and inside a block.
        let mut rng = Rng::new(11);
        let mut next = || rng.float(0.5);
        let rows: Vec<[f64; 3]> = (0..9)
            .map(|o| match o {
                0 => [0.2, 0.3, 0.5],
                1 => [0.9, 0.05, 0.05],
                2 => [0.0, 0.0, 1.0],
                3 => [-0.0, 1e-4, 0.9999],
                _ => [0.1 * o as f64, 0.5, 1.0 - 0.1 * o as f64 - 0.5],
            })
            .collect();
        for dtypes in [
            vec![DType::F32; 3],
            vec![DType::BF16; 3],
            vec![DType::F16; 3],
            vec![DType::F64; 3],
            vec![DType::BF16, DType::F32, DType::F16],
        ] {
            for n in [1, 17, 1300] {
                let inputs: Vec<Vec<u8>> = dtypes
                    .iter()
                    .map(|&d| {
                        let vals: Vec<f64> = (0..n).map(|_| next()).collect();
                        let mut b = vec![0u8; n * d.size()];
                        encode(d, &vals, &mut b);
                        b
                    })
                    .collect();
                let inputs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
                let one = |w: &[f64]| {
                    let mut out = vec![0u8; n * 4];
                    fold_into(&dtypes, w, &inputs, DType::F32, &mut [&mut out], |_, _| {});
                    out
                };
                for k in [2, 4, 9] {
                    let mut outs = vec![vec![0u8; n * 4]; k];
                    let mut refs: Vec<&mut [u8]> =
                        outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    let flat: Vec<f64> = rows[..k].iter().flatten().copied().collect();
                    let mut seen = vec![0usize; k];
                    fold_into(&dtypes, &flat, &inputs, DType::F32, &mut refs, |o, acc| {
                        seen[o] += acc.len()
                    });
                    for (o, w) in rows[..k].iter().enumerate() {
                        let what = format!("{dtypes:?} × {n}, output {o} of {k}");
                        assert_eq!(outs[o], one(w), "{what}");
                        assert_eq!(seen[o], n, "{what}: checked once per element");
                    }
                }
            }
        }
    }
}
