//! The fold of several outputs at once, written with AVX-512 intrinsics: the loop that a sweep
//! spends its arithmetic in.
//!
//! Each output of a sweep costs one f64 multiplication and one addition per element and input
//! (rounded separately, as in every other copy of the fold). With 8 outputs, the portable
//! `fold_multi` of `kernels` runs at 62% of this kernel's rate on an AMD EPYC: the compiler
//! keeps the sums of only four outputs in registers, so the inputs are decoded once per group
//! of four, and the sums go through memory before they are encoded. Here the sums of [`GROUP`]
//! outputs over 16 elements are sixteen registers (fewer outputs: over more elements), each
//! input's elements are decoded once for all of them, and an f32 or f64 output is encoded from
//! the registers straight into its buffer when nothing has to see the sums (see
//! `bench/results/kernels-sweep.txt` and BENCHMARKS.md for the figures). Every input is fetched
//! into the cache a little ahead of the elements being folded ([`PREFETCH_BYTES`]).
//!
//! Same operations in the same order as the one-output fold, so the same bits: the tests of
//! `kernels` compare them, every f16 bit pattern included. (Where the NaNs of two inputs meet,
//! the sum is a NaN with the payload of one of them, which one the compiler's choice in every
//! copy of the fold.)

use std::arch::x86_64::*;

use super::{weights_by_group, Check, Conv, BLOCK};
use crate::codec::convert::{bf16_bytes_to_f64, encode_impl, f16_bytes_to_f64};
use crate::codec::dtype::DType;

/// Outputs whose sums stay in registers together: eight outputs × two registers of eight f64.
const GROUP: usize = 8;

/// An input dtype, decoded eight elements at a time into one register of f64, or one at a time
/// (for the elements after the last full group of lanes).
trait Decode {
    /// Bytes per element.
    const SIZE: usize;
    /// The eight elements at `p` as f64.
    ///
    /// # Safety
    /// `p` must point to `8 · SIZE` readable bytes, and the CPU must have the features of
    /// [`fold_multi`].
    unsafe fn eight(p: *const u8) -> __m512d;
    /// The element at the start of `b` as f64, with the same bits as [`Decode::eight`].
    fn one(b: &[u8]) -> f64;
}

struct F32;
struct Bf16;
struct F16;
struct F64;

impl Decode for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn eight(p: *const u8) -> __m512d {
        // SAFETY: what the caller guarantees.
        unsafe { _mm512_cvtps_pd(_mm256_loadu_ps(p.cast())) }
    }
    #[inline(always)]
    fn one(b: &[u8]) -> f64 {
        f32::from_le_bytes(b[..4].try_into().unwrap()) as f64
    }
}

impl Decode for Bf16 {
    const SIZE: usize = 2;
    /// A bf16 is the upper half of an f32.
    #[inline(always)]
    unsafe fn eight(p: *const u8) -> __m512d {
        // SAFETY: what the caller guarantees.
        unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)))
        }
    }
    #[inline(always)]
    fn one(b: &[u8]) -> f64 {
        bf16_bytes_to_f64(b[..2].try_into().unwrap())
    }
}

impl Decode for F16 {
    const SIZE: usize = 2;
    /// F16C's conversion, whose bits `codec::convert::f16_to_f32` reproduces (NaN payloads
    /// included).
    #[inline(always)]
    unsafe fn eight(p: *const u8) -> __m512d {
        // SAFETY: what the caller guarantees.
        unsafe { _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(p.cast()))) }
    }
    #[inline(always)]
    fn one(b: &[u8]) -> f64 {
        f16_bytes_to_f64(b[..2].try_into().unwrap())
    }
}

impl Decode for F64 {
    const SIZE: usize = 8;
    #[inline(always)]
    unsafe fn eight(p: *const u8) -> __m512d {
        // SAFETY: what the caller guarantees.
        unsafe { _mm512_loadu_pd(p.cast()) }
    }
    #[inline(always)]
    fn one(b: &[u8]) -> f64 {
        f64::from_le_bytes(b[..8].try_into().unwrap())
    }
}

/// `outs[o] = encode(Σ_k weights[o·S + k] · x_k)` for every output `o` of inputs that all have
/// the dtype `conv` decodes: [`super::fold_into`] for two outputs or more on a CPU with AVX-512,
/// with the same arguments (and the same checks of their lengths).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL, and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn fold_multi(
    conv: Conv,
    weights: &[f64],
    inputs: &[&[u8]],
    n: usize,
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    check: Check<'_>,
) {
    // SAFETY: the CPU has the features, which `fold_groups` needs.
    unsafe {
        match conv {
            Conv::F32 => fold_groups::<F32>(weights, inputs, n, out_dtype, outs, check),
            Conv::BF16 => fold_groups::<Bf16>(weights, inputs, n, out_dtype, outs, check),
            Conv::F16 => fold_groups::<F16>(weights, inputs, n, out_dtype, outs, check),
            Conv::F64 => fold_groups::<F64>(weights, inputs, n, out_dtype, outs, check),
        }
    }
}

/// [`fold_multi`] for inputs of dtype `D`: block by block, group by group of outputs.
///
/// # Safety
/// The CPU must have the features of [`fold_multi`].
#[inline(always)]
unsafe fn fold_groups<D: Decode>(
    weights: &[f64],
    inputs: &[&[u8]],
    n: usize,
    out_dtype: DType,
    outs: &mut [&mut [u8]],
    mut check: Check<'_>,
) {
    let osize = out_dtype.size();
    let (k, sources) = (outs.len(), inputs.len());
    // The loads and stores below read and write through pointers: these make them in bounds.
    assert!(sources > 0 && weights.len() == k * sources);
    assert!(inputs.iter().all(|x| x.len() == n * D::SIZE));
    assert!(outs.iter().all(|o| o.len() == n * osize));
    // Sums encoded from the registers, when nothing is to see them and the encoding is a
    // conversion of the register.
    let direct = check.is_none() && matches!(out_dtype, DType::F32 | DType::F64);
    let groups = || (0..k).step_by(GROUP).map(move |f| (f, GROUP.min(k - f)));
    let wt = weights_by_group::<GROUP>(weights, k, sources);
    let mut accs = [[0f64; BLOCK]; GROUP];
    for b in (0..n).step_by(BLOCK) {
        let e = (b + BLOCK).min(n);
        // Every group folds the same block of the inputs, from L1 after the first.
        for (first, g) in groups() {
            let wt = &wt[first * sources..(first + g) * sources];
            let outs = &mut outs[first..first + g];
            let block = Block {
                wt,
                inputs,
                b,
                e,
                out_dtype,
                direct,
            };
            // K · L registers of sums: sixteen for 2, 4 and 8 outputs, 8 to 14 for the others.
            // SAFETY: the block is within every input and output, whose lengths are asserted
            // above, and the CPU has the features (the caller's guarantee).
            unsafe {
                match g {
                    1 => block.fold::<D, 1, 8>(&mut accs, outs),
                    2 => block.fold::<D, 2, 8>(&mut accs, outs),
                    3 => block.fold::<D, 3, 4>(&mut accs, outs),
                    4 => block.fold::<D, 4, 4>(&mut accs, outs),
                    5 => block.fold::<D, 5, 2>(&mut accs, outs),
                    6 => block.fold::<D, 6, 2>(&mut accs, outs),
                    7 => block.fold::<D, 7, 2>(&mut accs, outs),
                    _ => block.fold::<D, 8, 2>(&mut accs, outs),
                }
            }
            if !direct {
                for (j, (acc, out)) in accs.iter().zip(outs.iter_mut()).enumerate() {
                    let acc = &acc[..e - b];
                    if let Some(check) = check.as_deref_mut() {
                        check(first + j, acc);
                    }
                    encode_impl(out_dtype, acc, &mut out[b * osize..e * osize]);
                }
            }
        }
    }
}

/// How far ahead of the elements being folded their inputs are fetched into the cache, in bytes.
/// The kernel is bound by its arithmetic; with 8 inputs and 8 outputs it likely also waited on
/// the reads of its inputs from the page cache: on an Intel Xeon these hints cut the user time
/// of an 8-value sweep of 8 f32 inputs by 3–8% and its wall time by 2–3%
/// (`bench/results/ab-sweep-prefetch.md`; other dtypes not measured). In throwaway builds, not
/// kept, 2 KiB ahead did no better and fetching the outputs' lines ahead too did not help.
const PREFETCH_BYTES: usize = 1024;

/// Asks the CPU to fetch into the cache every line of 64 bytes that starts among the `len`
/// bytes lying [`PREFETCH_BYTES`] after `p`: successive calls over consecutive ranges ask for
/// each line once, however short the ranges. A hint, which changes nothing the program sees
/// and never faults (an address past the end of the input, or not mapped yet, is ignored).
#[inline(always)]
fn prefetch_ahead(p: *const u8, len: usize) {
    let ahead = p.wrapping_add(PREFETCH_BYTES);
    let first = (64 - (ahead as usize) % 64) % 64;
    for off in (first..len).step_by(64) {
        // SAFETY: a prefetch dereferences nothing; SSE, which has it, is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast()) };
    }
}

/// Elements `b .. e` of every input, folded into one group of outputs with the weights `wt`
/// (`wt[k·K + j]` for input `k` and output `j` of the `K` of the group).
struct Block<'a> {
    wt: &'a [f64],
    inputs: &'a [&'a [u8]],
    b: usize,
    e: usize,
    out_dtype: DType,
    /// Encode into `outs` here, rather than leave the sums in `accs` for the caller.
    direct: bool,
}

impl Block<'_> {
    /// Folds the block into `K` outputs, `8 · L` elements at a time with `K · L` registers of
    /// sums; the elements after the last full group one at a time. With `direct`, the sums go
    /// into `outs` (elements `b .. e`, f32 or f64), otherwise into `accs[j][.. e - b]`.
    ///
    /// # Safety
    /// Every input holds `e` elements of `D` at least, every output (of `K`) `e` elements of
    /// `out_dtype`, and the CPU has the features of [`fold_multi`].
    #[inline(always)]
    unsafe fn fold<D: Decode, const K: usize, const L: usize>(
        &self,
        accs: &mut [[f64; BLOCK]; GROUP],
        outs: &mut [&mut [u8]],
    ) {
        let Block {
            wt,
            inputs,
            b,
            e,
            out_dtype,
            direct,
        } = *self;
        let (w0, rest) = wt.split_at(K);
        let step = 8 * L;
        let full = b + (e - b) / step * step;
        let mut at = b;
        while at < full {
            for input in inputs {
                prefetch_ahead(input.as_ptr().wrapping_add(at * D::SIZE), step * D::SIZE);
            }
            // SAFETY: elements `at .. at + 8·L` (`at + 8·L <= full <= e`) are within every
            // input and output (the caller's guarantee) and, less `b`, within `accs[j]`
            // (`e - b <= BLOCK`); the CPU has the features of the intrinsics.
            unsafe {
                // Plain loops rather than closures, which would not have the CPU features of this
                // function for the intrinsics.
                let mut x = [_mm512_setzero_pd(); L];
                for (l, x) in x.iter_mut().enumerate() {
                    *x = D::eight(inputs[0].as_ptr().add((at + 8 * l) * D::SIZE));
                }
                let mut a = [[_mm512_setzero_pd(); L]; K];
                for (a, &w) in a.iter_mut().zip(w0) {
                    let w = _mm512_set1_pd(w);
                    for (a, &x) in a.iter_mut().zip(&x) {
                        *a = _mm512_mul_pd(w, x);
                    }
                }
                for (input, w) in inputs[1..].iter().zip(rest.chunks_exact(K)) {
                    for (l, x) in x.iter_mut().enumerate() {
                        *x = D::eight(input.as_ptr().add((at + 8 * l) * D::SIZE));
                    }
                    for (a, &w) in a.iter_mut().zip(w) {
                        let w = _mm512_set1_pd(w);
                        for (a, &x) in a.iter_mut().zip(&x) {
                            *a = _mm512_add_pd(*a, _mm512_mul_pd(w, x));
                        }
                    }
                }
                for (j, a) in a.iter().enumerate() {
                    for (l, &a) in a.iter().enumerate() {
                        let i = at + 8 * l;
                        if !direct {
                            _mm512_storeu_pd(accs[j].as_mut_ptr().add(i - b), a);
                        } else if out_dtype == DType::F32 {
                            _mm256_storeu_ps(
                                outs[j].as_mut_ptr().add(i * 4).cast(),
                                _mm512_cvtpd_ps(a),
                            );
                        } else {
                            _mm512_storeu_pd(outs[j].as_mut_ptr().add(i * 8).cast(), a);
                        }
                    }
                }
            }
            at += step;
        }
        for i in full..e {
            let at = |x: &[u8]| D::one(&x[i * D::SIZE..]);
            let x = at(inputs[0]);
            for (acc, &w) in accs.iter_mut().zip(w0) {
                acc[i - b] = w * x;
            }
            for (input, w) in inputs[1..].iter().zip(rest.chunks_exact(K)) {
                let x = at(input);
                for (acc, &w) in accs.iter_mut().zip(w) {
                    acc[i - b] += w * x;
                }
            }
        }
        if direct && full < e {
            let osize = out_dtype.size();
            for (acc, out) in accs.iter().zip(outs.iter_mut()) {
                let tail = &acc[full - b..e - b];
                encode_impl(out_dtype, tail, &mut out[full * osize..e * osize]);
            }
        }
    }
}
