//! The fold kernels: `Σ_k w_k · x_k` over ranges of elements of any float dtypes, accumulated in
//! f64 and encoded once into the output dtype. Fused single loops over byte slices, no
//! allocation; the element conversions come from `codec::convert`.
//!
//! The loops are written so that the compiler vectorizes them. On x86-64, [`fold_into`] runs a
//! copy of them compiled for AVX-512 or AVX2 when the CPU has it: the f64 arithmetic is four or
//! two times as wide as with the baseline SSE2. Every copy performs the same IEEE operations in
//! the same order (Rust never fuses a multiply and an add into an FMA), so they give the same
//! bits. The fold of several outputs of one input dtype, a sweep's, runs the intrinsics of
//! its `avx512` module there instead.

use crate::codec::convert::{accumulate_impl, bf16_bytes_to_f64, encode_impl, f16_bytes_to_f64};
use crate::codec::dtype::DType;

// Built only by compilers that have its intrinsics (`cfg(ema_tool_avx512)`, from `build.rs`).
#[cfg(all(target_arch = "x86_64", ema_tool_avx512))]
#[clippy::msrv = "1.89"]
mod avx512;

/// Elements folded at a time through every input: 4 KiB of f64 accumulators stay in L1.
pub const BLOCK: usize = 512;

/// What sees the results of [`fold_into`] before they are encoded: `check(o, acc)` for every
/// block of results of output `o`. Without one, the fold may encode its sums without writing
/// them out as f64 first.
pub type Check<'a> = Option<&'a mut dyn FnMut(usize, &[f64])>;

/// `check` again, for a call that returns before `check` is used once more.
#[cfg(target_arch = "x86_64")]
fn reborrow<'b>(check: &'b mut Check<'_>) -> Check<'b> {
    match check {
        Some(check) => Some(&mut **check),
        None => None,
    }
}

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
/// the outputs. `check`, if any, sees every block of results of each output before it is
/// encoded.
pub fn fold_into(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    mut check: Check<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let again = reborrow(&mut check);
        if fold_into_avx512_if_available(dtypes, weights, inputs, out_dtype, outs, again) {
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

/// Runs [`fold_into_impl`] compiled for AVX-512 (eight f64 per operation) when the CPU has it
/// (and F16C, which every such CPU has), or the intrinsics of `avx512` for several outputs;
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
    check: Check<'_>,
) -> bool {
    if !has_avx512() {
        return false;
    }
    // SAFETY: `fold_into_avx512` needs these features, checked just above.
    unsafe { fold_into_avx512(dtypes, weights, inputs, out_dtype, outs, check) };
    true
}

/// Whether the CPU has what [`fold_into_avx512`] needs.
#[cfg(all(target_arch = "x86_64", ema_tool_avx512))]
fn has_avx512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("f16c")
}

/// Without Rust 1.89, no AVX-512 copy.
#[cfg(all(target_arch = "x86_64", not(ema_tool_avx512)))]
fn fold_into_avx512_if_available(
    _: &[DType],
    _: &[f64],
    _: &[&[u8]],
    _: DType,
    _: &mut [&mut [u8]],
    _: Check<'_>,
) -> bool {
    false
}

/// [`fold_into_impl`] compiled for AVX-512, or [`avx512::fold_multi`] for several outputs of
/// one input dtype.
#[cfg(all(target_arch = "x86_64", ema_tool_avx512))]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn fold_into_avx512(
    dtypes: &[DType],
    weights: &[f64],
    inputs: &[&[u8]],
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    check: Check<'_>,
) {
    match multi_conv(dtypes, outs.len()) {
        Some(conv) => {
            let n = outs.first().map_or(0, |o| o.len() / out_dtype.size());
            // SAFETY: the CPU has this function's features, those of `fold_multi`.
            unsafe { avx512::fold_multi(conv, weights, inputs, n, out_dtype, outs, check) }
        }
        None => fold_into_impl(dtypes, weights, inputs, out_dtype, outs, check),
    }
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
    check: Check<'_>,
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
    mut check: Check<'_>,
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
    if let Some(conv) = multi_conv(dtypes, k) {
        return fold_multi(conv, weights, inputs, n, out_dtype, outs, check);
    }
    let same = dtypes.iter().all(|&d| d == dtypes[0]);
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
            if let Some(check) = check.as_deref_mut() {
                check(o, acc);
            }
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

/// The dtype of the inputs, when [`fold_multi`] folds them: several outputs (`k`) of inputs
/// of one dtype that it decodes.
fn multi_conv(dtypes: &[DType], k: usize) -> Option<Conv> {
    let first = *dtypes.first()?;
    if k < 2 || dtypes.iter().any(|&d| d != first) {
        return None;
    }
    match first {
        DType::F32 => Some(Conv::F32),
        DType::BF16 => Some(Conv::BF16),
        DType::F16 => Some(Conv::F16),
        DType::F64 => Some(Conv::F64),
        _ => None,
    }
}

/// The weights of the fold (`weights[o·S + s]` for output `o` of `k` and input `s` of the `S`,
/// `sources`) by group of `G` outputs, input by input: `wt[first·S + s·g + j]` for output
/// `first + j` of the group of `g` outputs from `first` (the last group may have fewer).
fn weights_by_group<const G: usize>(weights: &[f64], k: usize, sources: usize) -> Vec<f64> {
    let mut wt = Vec::with_capacity(weights.len());
    for first in (0..k).step_by(G) {
        for s in 0..sources {
            wt.extend((first..k.min(first + G)).map(|o| weights[o * sources + s]));
        }
    }
    wt
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
    mut check: Check<'_>,
) {
    let osize = out_dtype.size();
    let sources = inputs.len();
    let mut accs = [[0f64; BLOCK]; GROUP];
    let k = outs.len();
    let groups = || (0..k).step_by(GROUP).map(move |f| (f, GROUP.min(k - f)));
    let wt = weights_by_group::<GROUP>(weights, k, sources);
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
                if let Some(check) = check.as_deref_mut() {
                    check(first + j, acc);
                }
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

    /// A copy of the fold, with the arguments of [`fold_into`].
    type Copy = fn(&[DType], &[f64], &[&[u8]], DType, &mut [&mut [u8]], Check<'_>);

    /// Every compiled copy of the fold that this CPU runs, by name: `fold_into` (which picks
    /// one), the baseline copy, and the AVX2 and AVX-512 copies where the CPU has them. With
    /// several outputs of one input dtype, the portable several-output fold runs in the baseline
    /// and AVX2 copies, the intrinsics of `avx512` in the AVX-512 one.
    fn copies() -> Vec<(&'static str, Copy)> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut copies: Vec<(&'static str, Copy)> =
            vec![("fold_into", fold_into), ("baseline", fold_into_impl)];
        // A copy compiled for CPU features, as a `Copy` to list where the CPU has them.
        #[cfg(target_arch = "x86_64")]
        macro_rules! listed_if_the_cpu_has_them {
            ($copy:ident) => {{
                fn copy(
                    d: &[DType],
                    w: &[f64],
                    x: &[&[u8]],
                    o: DType,
                    outs: &mut [&mut [u8]],
                    c: Check<'_>,
                ) {
                    // SAFETY: listed only where the CPU has the features of the copy.
                    unsafe { $copy(d, w, x, o, outs, c) }
                }
                copy as Copy
            }};
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            copies.push(("AVX2", listed_if_the_cpu_has_them!(fold_into_avx2)));
        }
        #[cfg(all(target_arch = "x86_64", ema_tool_avx512))]
        {
            if has_avx512() {
                copies.push(("AVX-512", listed_if_the_cpu_has_them!(fold_into_avx512)));
            } else {
                eprintln!("note: no AVX-512 on this CPU: its copy of the fold is not compared");
            }
        }
        copies
    }

    #[test]
    fn every_compiled_copy_of_the_fold_gives_the_same_bits() {
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
                let fold = |f: Copy| {
                    let mut out = vec![0xAAu8; n * dtype.size()];
                    f(&dtypes, &weights, &inputs, dtype, &mut [&mut out], None);
                    out
                };
                let want = fold(fold_into_impl);
                for (copy, f) in copies() {
                    assert_eq!(fold(f), want, "{copy}, {dtype} × {n}");
                }
            }
        }
    }

    #[test]
    fn several_outputs_are_each_the_fold_of_their_own_weights() {
        // Up to 17 outputs (two full groups of the AVX-512 kernel and one of one output, and
        // each size of group), checked or not, into each float dtype; one input (a copy that
        // converts) and three; lengths that end inside a group of lanes and inside a block.
        let mut rng = Rng::new(11);
        let mut next = || rng.float(0.5);
        let row = |o: usize, sources: usize| -> Vec<f64> {
            match (o, sources) {
                (_, 1) => vec![1.0 - 0.01 * o as f64],
                (0, _) => vec![0.2, 0.3, 0.5],
                (1, _) => vec![0.9, 0.05, 0.05],
                (2, _) => vec![0.0, 0.0, 1.0],
                (3, _) => vec![-0.0, 1e-4, 0.9999],
                _ => {
                    let a = 0.05 * o as f64;
                    vec![a, 0.5, 1.0 - a - 0.5]
                }
            }
        };
        for dtypes in [
            vec![DType::F32; 3],
            vec![DType::BF16; 3],
            vec![DType::F16; 3],
            vec![DType::F64; 3],
            vec![DType::F32],
            vec![DType::BF16, DType::F32, DType::F16],
        ] {
            for n in [1, 15, 16, 17, 511, 512, 513, 1300] {
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
                for out_dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
                    let size = out_dtype.size();
                    // The bytes of the one-output fold, and the bits of the sums it checks.
                    let one = |w: &[f64]| {
                        let mut out = vec![0u8; n * size];
                        let mut sums = Vec::new();
                        let mut keep = |_: usize, acc: &[f64]| {
                            sums.extend(acc.iter().map(|x| x.to_bits()));
                        };
                        fold_into(
                            &dtypes,
                            w,
                            &inputs,
                            out_dtype,
                            &mut [&mut out],
                            Some(&mut keep),
                        );
                        (out, sums)
                    };
                    for k in [2, 3, 4, 5, 6, 7, 8, 9, 17] {
                        let rows: Vec<Vec<f64>> = (0..k).map(|o| row(o, dtypes.len())).collect();
                        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
                        let runs = copies()
                            .into_iter()
                            .flat_map(|(copy, fold)| [(copy, fold, false), (copy, fold, true)]);
                        for (copy, fold, checked) in runs {
                            let mut outs = vec![vec![0xAAu8; n * size]; k];
                            let mut refs: Vec<&mut [u8]> =
                                outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                            let mut seen = vec![Vec::new(); k];
                            let mut keep = |o: usize, acc: &[f64]| {
                                seen[o].extend(acc.iter().map(|x| x.to_bits()));
                            };
                            let check: Check<'_> = checked.then_some(&mut keep);
                            fold(&dtypes, &flat, &inputs, out_dtype, &mut refs, check);
                            for (o, w) in rows.iter().enumerate() {
                                let what = format!(
                                    "{copy}: {dtypes:?} × {n} into {out_dtype}, output {o} of \
                                     {k}, checked: {checked}"
                                );
                                let (bytes, sums) = one(w);
                                assert_eq!(outs[o], bytes, "{what}");
                                // Every sum, in order, checked once (none unchecked).
                                let want = if checked { sums } else { Vec::new() };
                                assert!(seen[o] == want, "{what}: the sums checked");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn several_outputs_of_every_f16_are_the_bits_of_one_output() {
        // Every f16 bit pattern but three (NaNs with their payloads, infinities, subnormals) in
        // each of two inputs, folded into 3 and 8 outputs at once and one at a time. Where both
        // inputs are NaN, the sum keeps the payload of one of them, and which one is the
        // compiler's choice (an addition's operands commute): there both must be NaN, elsewhere
        // the bits must be the same.
        let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let shifted: Vec<u8> = (0..=u16::MAX)
            .flat_map(|h| h.rotate_left(5).to_le_bytes())
            .collect();
        let f16_nan = |h: u16| h & 0x7c00 == 0x7c00 && h & 0x03ff != 0;
        let both_nan = |i: usize| f16_nan(i as u16) && f16_nan((i as u16).rotate_left(5));
        let nan = |dtype: DType, b: &[u8]| match dtype {
            DType::F16 => f16_nan(u16::from_le_bytes([b[0], b[1]])),
            _ => f32::from_le_bytes(b.try_into().unwrap()).is_nan(),
        };
        // All but the last 3 patterns (NaNs): the last 13 to 29 elements, NaNs among them, go
        // through the kernels' scalar tails.
        let n = (1 << 16) - 3;
        let inputs = [&all[..2 * n], &shifted[..2 * n]];
        let dtypes = [DType::F16; 2];
        for out_dtype in [DType::F16, DType::F32] {
            for k in [3, 8] {
                let rows: Vec<[f64; 2]> = (0..k).map(|o| [1.0 - 0.1 * o as f64, 0.25]).collect();
                let flat: Vec<f64> = rows.iter().flatten().copied().collect();
                for (copy, fold) in copies() {
                    let mut outs = vec![vec![0u8; n * out_dtype.size()]; k];
                    let mut refs: Vec<&mut [u8]> =
                        outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    fold(&dtypes, &flat, &inputs, out_dtype, &mut refs, None);
                    for (o, w) in rows.iter().enumerate() {
                        let mut one = vec![0u8; n * out_dtype.size()];
                        fold_into(&dtypes, w, &inputs, out_dtype, &mut [&mut one], None);
                        let size = out_dtype.size();
                        let what = format!("{copy}: into {out_dtype}, output {o} of {k}");
                        let got = outs[o].chunks_exact(size);
                        for (i, (g, w)) in got.zip(one.chunks_exact(size)).enumerate() {
                            let same = if both_nan(i) {
                                nan(out_dtype, g) && nan(out_dtype, w)
                            } else {
                                g == w
                            };
                            assert!(same, "{what}, element {i:#06x}");
                        }
                    }
                }
            }
        }
    }
}
