//! Element conversions: any dtype to f64 (optionally weighted into accumulators), and f64 to
//! any float dtype with that format's rounding (to nearest, ties to even). Loops over byte
//! slices, no allocation; data is little-endian, as in every checkpoint format we read.
//!
//! The conversions are written with selects, not branches, so that loops over them vectorize;
//! the fold kernels (`fold::kernels`) inline them into their fused loops.

use half::{bf16, f16};

use super::dtype::DType;

/// `acc[i] (=|+=) w · x[i]` for the elements `x` of `src`, stored as `dtype`.
///
/// With `first`, the accumulators are overwritten rather than added to, which saves zeroing.
/// `src.len()` must be `acc.len() × dtype.size()`.
pub fn accumulate(dtype: DType, src: &[u8], w: f64, acc: &mut [f64], first: bool) {
    accumulate_impl(dtype, src, w, acc, first)
}

#[inline(always)]
pub(crate) fn accumulate_impl(dtype: DType, src: &[u8], w: f64, acc: &mut [f64], first: bool) {
    debug_assert_eq!(src.len(), acc.len() * dtype.size());
    macro_rules! fold {
        ($n:literal, $conv:expr) => {{
            let conv = $conv;
            if first {
                for (a, c) in acc.iter_mut().zip(src.chunks_exact($n)) {
                    *a = w * conv(c.try_into().unwrap());
                }
            } else {
                for (a, c) in acc.iter_mut().zip(src.chunks_exact($n)) {
                    *a += w * conv(c.try_into().unwrap());
                }
            }
        }};
    }
    match dtype {
        DType::F32 => fold!(4, |b: [u8; 4]| f32::from_le_bytes(b) as f64),
        DType::F64 => fold!(8, f64::from_le_bytes),
        DType::BF16 => fold!(2, |b: [u8; 2]| {
            f32::from_bits((u16::from_le_bytes(b) as u32) << 16) as f64
        }),
        DType::F16 => fold!(2, |b: [u8; 2]| f16_to_f32(u16::from_le_bytes(b)) as f64),
        DType::F8E4M3 => fold!(1, |b: [u8; 1]| F8E4M3_TABLE[b[0] as usize] as f64),
        DType::F8E5M2 => fold!(1, |b: [u8; 1]| F8E5M2_TABLE[b[0] as usize] as f64),
        other => unreachable!("accumulate called on non-float dtype {other}"),
    }
}

/// A bf16 element as f64.
#[inline(always)]
pub(crate) fn bf16_bytes_to_f64(b: [u8; 2]) -> f64 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16) as f64
}

/// An f16 element as f64.
#[inline(always)]
pub(crate) fn f16_bytes_to_f64(b: [u8; 2]) -> f64 {
    f16_to_f32(u16::from_le_bytes(b)) as f64
}

/// Decodes `src` (elements of `dtype`, any dtype) into `out` as f64.
pub fn decode(dtype: DType, src: &[u8], out: &mut [f64]) {
    macro_rules! dec {
        ($n:literal, $conv:expr) => {{
            let conv = $conv;
            for (o, c) in out.iter_mut().zip(src.chunks_exact($n)) {
                *o = conv(c.try_into().unwrap());
            }
        }};
    }
    match dtype {
        DType::Bool | DType::U8 => dec!(1, |b: [u8; 1]| b[0] as f64),
        DType::I8 => dec!(1, |b: [u8; 1]| b[0] as i8 as f64),
        DType::I16 => dec!(2, |b| i16::from_le_bytes(b) as f64),
        DType::U16 => dec!(2, |b| u16::from_le_bytes(b) as f64),
        DType::I32 => dec!(4, |b| i32::from_le_bytes(b) as f64),
        DType::U32 => dec!(4, |b| u32::from_le_bytes(b) as f64),
        DType::I64 => dec!(8, |b| i64::from_le_bytes(b) as f64),
        DType::U64 => dec!(8, |b| u64::from_le_bytes(b) as f64),
        _ => accumulate(dtype, src, 1.0, out, true),
    }
}

/// Encodes the accumulators into `out` as `dtype` (a float dtype), rounding to nearest even.
pub fn encode(dtype: DType, acc: &[f64], out: &mut [u8]) {
    encode_impl(dtype, acc, out)
}

#[inline(always)]
pub(crate) fn encode_impl(dtype: DType, acc: &[f64], out: &mut [u8]) {
    debug_assert_eq!(out.len(), acc.len() * dtype.size());
    macro_rules! enc {
        ($n:literal, $conv:expr) => {{
            #[allow(unused_mut)]
            let mut conv = $conv;
            for (c, &a) in out.chunks_exact_mut($n).zip(acc) {
                c.copy_from_slice(&conv(a));
            }
        }};
    }
    match dtype {
        DType::F32 => enc!(4, |a: f64| (a as f32).to_le_bytes()),
        DType::F64 => enc!(8, |a: f64| a.to_le_bytes()),
        DType::BF16 => {
            let mut special = false;
            enc!(2, |a: f64| {
                let (bits, s) = f64_to_bf16(a);
                special |= s;
                bits.to_le_bytes()
            });
            if special {
                // Subnormal, infinite or NaN results: rare enough for half.
                for (c, &a) in out.chunks_exact_mut(2).zip(acc) {
                    if f64_to_bf16(a).1 {
                        c.copy_from_slice(&bf16::from_f64(a).to_bits().to_le_bytes());
                    }
                }
            }
        }
        DType::F16 => enc!(2, |a: f64| f32_to_f16(a as f32).to_le_bytes()),
        DType::F8E4M3 => enc!(1, |a: f64| [f8_encode(&F8E4M3, a)]),
        DType::F8E5M2 => enc!(1, |a: f64| [f8_encode(&F8E5M2, a)]),
        other => unreachable!("encode called on non-float dtype {other}"),
    }
}

/// f16 → f32, exactly: the bits of `half::f16::to_f32` (F16C's `vcvtph2ps` on x86), NaN
/// payloads included. Written with selects so that loops over it vectorize: `half` checks the
/// CPU's features on every call, which held the fold of f16 checkpoints to 0.35 GB/s.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    let man = em & 0x03FF;
    // Normal: move exponent and mantissa into place and rebias the exponent from 15 to 127.
    let normal = (em << 13) + ((127 - 15) << 23);
    // Infinity and NaN (quieted, payload kept).
    let special = 0x7F80_0000 | (man << 13) | if man != 0 { 0x0040_0000 } else { 0 };
    // Zero and subnormals: man · 2^-24, exact in f32.
    let small = (em as f32 * (1.0 / 16_777_216.0)).to_bits();
    let bits = if em < 0x0400 {
        small
    } else if em >= 0x7C00 {
        special
    } else {
        normal
    };
    f32::from_bits(sign | bits)
}

/// f32 → f16, rounding to nearest even: the bits of `half::f16::from_f32` (F16C's
/// `vcvtps2ph`), NaN payloads included, with selects instead of branches so that it vectorizes.
///
/// The f16 output of a fold is `f32_to_f16(acc as f32)`: what `half::f16::from_f64` computes on
/// every x86-64 CPU with F16C (it converts through f32 there), which is what ema-tool wrote
/// before this encoder, now the same on every machine.
#[inline(always)]
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let a = x & 0x7FFF_FFFF;
    // NaN: quieted, the top of the payload kept; infinity and values ≥ 2^16 overflow.
    let nan = (0x7E00 | ((a >> 13) & 0x03FF)) as u16;
    // Below 2^-14 the result is subnormal: adding 0.5 aligns the 10 mantissa bits at the bottom
    // of the f32 and the FPU rounds to nearest even.
    let small = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3F00_0000) as u16;
    // Normal: rebias the exponent and round to nearest even by hand (+0xFFF, +1 when odd).
    let odd = (a >> 13) & 1;
    let normal =
        (a.wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xFFF + odd)) >> 13) as u16;
    let bits = if a > 0x7F80_0000 {
        nan
    } else if a >= 0x4780_0000 {
        0x7C00
    } else if a < 0x3880_0000 {
        small
    } else {
        normal
    };
    sign | bits
}

/// f64 → bf16 as `half::bf16::from_f64` computes it, for the values whose result is zero or
/// normal; the flag marks the others (subnormal, infinite or NaN results: `bits` is then wrong
/// and the caller asks `half`). Written with selects so that loops over it vectorize: `half`'s
/// branches held the bf16 fold to 1.5 GB/s.
///
/// Kept bit for bit, quirk included: `half` drops the low 32 bits of the f64 mantissa before
/// rounding, so a value just above a tie rounds to even instead of up (off by one unit in the
/// last place for about 1 value in 16 000; within `docs/accuracy.md`).
#[inline(always)]
pub fn f64_to_bf16(v: f64) -> (u16, bool) {
    let x = (v.to_bits() >> 32) as u32;
    let sign = (x >> 16) & 0x8000;
    let mag = x & 0x7FFF_FFFF;
    // The f64 exponent field; the bf16 one is exp - (1023 - 127).
    let exp = mag >> 20;
    let man = x & 0x000F_FFFF;
    // Round half to even on the 20 mantissa bits `half` looks at.
    let round = (man >> 12) & 1 & ((man & 0x2FFF) != 0) as u32;
    // Exponent and mantissa shift into place together; rebias the exponent.
    let normal = (sign | ((mag >> 13).wrapping_sub((1023 - 127) << 7))).wrapping_add(round);
    // bf16 exponents below -14 (f64 exponent field below 882) underflow to a signed zero.
    let bits = if exp < 882 { sign } else { normal };
    // Subnormal results (bf16 exponent -14..=0), overflow, infinity and NaN.
    let special = (882..=896).contains(&exp) || exp >= 1023 + 128;
    (bits as u16, special)
}

/// Number of values in `acc` that are not finite after encoding as `dtype` although they were
/// finite before (overflow of a narrower type).
pub fn count_overflow(dtype: DType, acc: &[f64]) -> usize {
    let max = match dtype {
        DType::F64 => return 0,
        DType::F32 => f32::MAX as f64,
        DType::BF16 => bf16::MAX.to_f64(),
        DType::F16 => f16::MAX.to_f64(),
        DType::F8E4M3 => 448.0,
        DType::F8E5M2 => 57344.0,
        _ => return 0,
    };
    // Values past max + half an ulp round to infinity (or NaN for e4m3fn); a value that rounds
    // down to max is not an overflow. Counting |a| > max over-reports only within half an ulp.
    acc.iter()
        .filter(|a| a.is_finite() && a.abs() > max && !rounds_to_finite(dtype, **a))
        .count()
}

fn rounds_to_finite(dtype: DType, a: f64) -> bool {
    let mut b = vec![0u8; dtype.size()];
    encode(dtype, &[a], &mut b);
    let mut back = [0f64];
    decode(dtype, &b, &mut back);
    back[0].is_finite()
}

/// Counts NaN and infinite values among `vals`.
pub fn count_non_finite(vals: &[f64]) -> (usize, usize) {
    let mut nan = 0;
    let mut inf = 0;
    for v in vals {
        if v.is_nan() {
            nan += 1;
        } else if v.is_infinite() {
            inf += 1;
        }
    }
    (nan, inf)
}

/// A float8 format, for encoding: its decode table, its largest finite code and what a value
/// past the largest finite one becomes.
struct F8 {
    table: &'static [f32; 256],
    top: u8,
    overflow: u8,
    /// Mantissa bits and exponent bias.
    mbits: u32,
    bias: i32,
}

/// e4m3fn has no infinity: past 448 is NaN.
static F8E4M3: F8 = F8 {
    table: &F8E4M3_TABLE,
    top: 0x7E,
    overflow: 0x7F,
    mbits: 3,
    bias: 7,
};
/// e5m2: past 57344 is +inf.
static F8E5M2: F8 = F8 {
    table: &F8E5M2_TABLE,
    top: 0x7B,
    overflow: 0x7C,
    mbits: 2,
    bias: 15,
};

/// float8 e4m3fn: bias 7, no infinities, 0x7F/0xFF are NaN, largest finite 448.
static F8E4M3_TABLE: [f32; 256] = f8_table(4, 3, 7, true);
/// float8 e5m2: bias 15, IEEE-like with infinities and NaNs (the top byte of an f16).
static F8E5M2_TABLE: [f32; 256] = f8_table(5, 2, 15, false);

const fn pow2(e: i32) -> f32 {
    let mut v = 1.0f32;
    let mut i = 0;
    if e >= 0 {
        while i < e {
            v *= 2.0;
            i += 1;
        }
    } else {
        while i < -e {
            v *= 0.5;
            i += 1;
        }
    }
    v
}

const fn f8_table(ebits: u32, mbits: u32, bias: i32, fn_variant: bool) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0usize;
    while i < 256 {
        let sign = if i & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((i >> mbits) & ((1 << ebits) - 1)) as i32;
        let m = (i & ((1 << mbits) - 1)) as i32;
        let emax = (1 << ebits) - 1;
        let v = if fn_variant && e == emax && m == (1 << mbits) - 1 {
            f32::NAN
        } else if !fn_variant && e == emax {
            if m == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else if e == 0 {
            m as f32 * pow2(1 - bias - mbits as i32)
        } else {
            (1.0 + m as f32 / (1 << mbits) as f32) * pow2(e - bias)
        };
        t[i] = sign * v;
        i += 1;
    }
    t
}

/// Nearest float8 code to `a`, ties to even: `|a|` divided by the spacing of the float8 values
/// of its binade (a power of two, so exactly), rounded to an integer `n`, is the code's
/// mantissa with its implicit bit, and the code follows by arithmetic (`n` reaching the next
/// binade carries into the exponent, as the next code does). No branch depends on the value's
/// digits: the table search this replaces ran at 0.1 GiB/s.
fn f8_encode(f: &F8, a: f64) -> u8 {
    if a.is_nan() {
        return 0x7F;
    }
    let sign = if a.is_sign_negative() { 0x80u8 } else { 0 };
    let x = a.abs();
    let max = f.table[f.top as usize] as f64;
    if x >= max {
        // Past max the next representable step would be max + ulp(max); halfway rounds up.
        let ulp = max - f.table[f.top as usize - 1] as f64;
        let top = f.top;
        return if x < max + ulp / 2.0 || (x == max + ulp / 2.0 && top % 2 == 0) {
            sign | top
        } else {
            sign | f.overflow
        };
    }
    // The binade of x (f64 subnormals and zero fall below the float8 normals), clamped to the
    // float8 subnormals' spacing.
    let e = ((x.to_bits() >> 52) as i32 - 1023).max(1 - f.bias);
    let quantum = f64::from_bits(((e - f.mbits as i32 + 1023) as u64) << 52);
    let n = (x / quantum).round_ties_even() as u32;
    // Normal: (e + bias) · 2^m + n − 2^m; subnormal (e = 1 − bias): n.
    let code = ((e + f.bias - 1) as u32) * (1 << f.mbits) + n;
    sign | code as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn round_trip(dtype: DType, vals: &[f64]) -> Vec<f64> {
        let mut bytes = vec![0u8; vals.len() * dtype.size()];
        encode(dtype, vals, &mut bytes);
        let mut out = vec![0.0; vals.len()];
        decode(dtype, &bytes, &mut out);
        out
    }

    #[test]
    fn accumulate_is_a_weighted_sum() {
        let xs: Vec<u8> = [1.0f32, 2.0, -4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let ys: Vec<u8> = [3.0f32, 0.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut acc = vec![f64::NAN; 3];
        accumulate(DType::F32, &xs, 0.25, &mut acc, true);
        accumulate(DType::F32, &ys, 0.75, &mut acc, false);
        assert_eq!(acc, vec![2.5, 0.5, 2.0]);
    }

    #[test]
    fn half_types_round_to_nearest() {
        // 1 + 2^-8 is exactly halfway between two bf16 values; ties go to even (1.0).
        assert_eq!(round_trip(DType::BF16, &[1.0 + 2f64.powi(-8)]), vec![1.0]);
        assert_eq!(
            round_trip(DType::BF16, &[1.0 + 3.0 * 2f64.powi(-8)]),
            vec![1.015625]
        );
        assert_eq!(
            round_trip(DType::F16, &[0.1]),
            vec![f16::from_f64(0.1).to_f64()]
        );
        assert_eq!(round_trip(DType::F32, &[0.1]), vec![0.1f32 as f64]);
    }

    /// The encoding by search of the decode table's positive half, as it was
    /// (codes 0..0x80 increase with value up to the first non-finite one).
    fn f8_encode_by_table(f: &F8, a: f64) -> u8 {
        if a.is_nan() {
            return 0x7F;
        }
        let (table, top, overflow) = (f.table, f.top, f.overflow);
        let sign = if a.is_sign_negative() { 0x80u8 } else { 0 };
        let x = a.abs();
        let max = table[top as usize] as f64;
        if x >= max {
            // Past max the next representable step would be max + ulp(max); halfway rounds up.
            let ulp = max - table[top as usize - 1] as f64;
            return if x < max + ulp / 2.0 || (x == max + ulp / 2.0 && top % 2 == 0) {
                sign | top
            } else {
                sign | overflow
            };
        }
        // Binary search for the first code whose value is >= x.
        let (mut lo, mut hi) = (0u8, top);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if (table[mid as usize] as f64) < x {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let up = lo;
        if up == 0 || table[up as usize] as f64 == x {
            return sign | up;
        }
        let down = up - 1;
        let (dv, uv) = (table[down as usize] as f64, table[up as usize] as f64);
        let code = if x - dv < uv - x || (x - dv == uv - x && down % 2 == 0) {
            down
        } else {
            up
        };
        sign | code
    }

    #[test]
    fn f8_encoding_by_arithmetic_is_the_table_search() {
        for f in [&F8E4M3, &F8E5M2] {
            let mut probes = vec![0.0, -0.0, f64::INFINITY, f64::MIN_POSITIVE / 4.0, 1e-300];
            for c in 0..0x80usize {
                let v = f.table[c] as f64;
                if !v.is_finite() {
                    continue;
                }
                probes.push(v);
                let next = f.table[c + 1] as f64;
                if next.is_finite() {
                    // The midpoint (a tie) and values on either side of it.
                    let mid = (v + next) / 2.0;
                    // (Neighbours by bits: `next_up` needs a newer Rust than the crate's.)
                    let up = |x: f64| f64::from_bits(x.to_bits() + 1);
                    let down = |x: f64| f64::from_bits(x.to_bits() - 1);
                    probes.extend([mid, up(mid), down(mid), up(v)]);
                }
            }
            let mut rng = Rng::new(1);
            for _ in 0..200_000 {
                let state = rng.next();
                // Magnitudes from 2^-30 to 2^20, any mantissa.
                let e = (state % 51) as i32 - 30;
                let m = 1.0 + (state >> 11) as f64 / (1u64 << 53) as f64;
                probes.push(m * 2f64.powi(e));
            }
            for p in probes {
                for v in [p, -p] {
                    assert_eq!(f8_encode(f, v), f8_encode_by_table(f, v), "{v:e}");
                }
            }
        }
    }

    #[test]
    fn f8_top_is_the_largest_finite_code() {
        for f in [&F8E4M3, &F8E5M2] {
            let top = (0..0x80u8)
                .rev()
                .find(|&c| f.table[c as usize].is_finite())
                .unwrap();
            assert_eq!(f.top, top);
        }
    }

    #[test]
    fn f8_tables_match_the_formats() {
        assert_eq!(F8E4M3_TABLE[0x7E], 448.0);
        assert!(F8E4M3_TABLE[0x7F].is_nan());
        assert_eq!(F8E4M3_TABLE[0x01], 2f32.powi(-9));
        assert_eq!(F8E4M3_TABLE[0x38], 1.0);
        assert_eq!(F8E5M2_TABLE[0x7B], 57344.0);
        assert_eq!(F8E5M2_TABLE[0x7C], f32::INFINITY);
        assert_eq!(F8E5M2_TABLE[0x3C], 1.0);
        // e5m2 is the top byte of f16.
        for c in 0..0x7Cu16 {
            assert_eq!(F8E5M2_TABLE[c as usize], f16::from_bits(c << 8).to_f32());
        }
    }

    #[test]
    fn f8_encode_rounds_and_overflows() {
        for c in 0..0x7Fu8 {
            let v = F8E4M3_TABLE[c as usize] as f64;
            assert_eq!(f8_encode(&F8E4M3, v), c);
            assert_eq!(f8_encode(&F8E4M3, -v) & 0x7F, c);
        }
        assert_eq!(round_trip(DType::F8E4M3, &[1.0625]), vec![1.0]); // tie to even
        assert_eq!(round_trip(DType::F8E4M3, &[1.1]), vec![1.125]);
        assert!(round_trip(DType::F8E4M3, &[1000.0])[0].is_nan());
        assert_eq!(round_trip(DType::F8E4M3, &[450.0]), vec![448.0]);
        assert_eq!(round_trip(DType::F8E5M2, &[1e6]), vec![f64::INFINITY]);
        assert_eq!(count_overflow(DType::F16, &[70000.0, 1.0, 65504.0]), 1);
        assert_eq!(count_overflow(DType::F32, &[1e39]), 1);
    }

    /// Bit patterns covering every sign and exponent, with low bits that exercise rounding.
    fn f64_patterns() -> impl Iterator<Item = u64> {
        let lows: [u64; 9] = [
            0,
            1,
            0xFFFF_FFFF,
            0x1_0000_0000,
            0x1000_0000_0000,
            0x0FFF_FFFF_FFFF,
            0x1FFF_FFFF_FFFF,
            0x2000_0000_0000,
            0x3000_0000_0001,
        ];
        let mut rng = Rng::new(2);
        (0..1u64 << 12).flat_map(move |top| {
            let randoms: Vec<u64> = (0..24).map(|_| rng.next()).collect();
            lows.into_iter()
                .chain(randoms)
                .map(move |low| (top << 52) | (low & ((1 << 52) - 1)))
        })
    }

    #[test]
    fn f16_decode_matches_half_on_every_value() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            assert_eq!(f16_to_f32(h).to_bits(), want.to_bits(), "{h:#06x}");
            assert_eq!(
                (f16_to_f32(h) as f64).to_bits(),
                f16::from_bits(h).to_f64().to_bits(),
                "{h:#06x}"
            );
        }
    }

    #[test]
    fn f16_encode_matches_half() {
        // Every sign, exponent and top mantissa bits, with the low 13 bits (those rounded
        // away) at every interesting value.
        let lows = [0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x17FF, 0x1FFF, 0x0800];
        for top in 0..1u32 << 19 {
            for low in lows {
                let f = f32::from_bits((top << 13) | low);
                assert_eq!(
                    f32_to_f16(f),
                    f16::from_f32(f).to_bits(),
                    "{:#010x}",
                    f.to_bits()
                );
            }
        }
        // What ema-tool wrote before, on CPUs where half converts f64 through f32.
        if cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("f16c") {
            for bits in f64_patterns() {
                let a = f64::from_bits(bits);
                assert_eq!(
                    f32_to_f16(a as f32),
                    f16::from_f64(a).to_bits(),
                    "{bits:#018x}"
                );
            }
        }
    }

    #[test]
    fn bf16_encode_matches_half() {
        for bits in f64_patterns() {
            let a = f64::from_bits(bits);
            let mut out = [0u8; 2];
            encode(DType::BF16, &[a], &mut out);
            assert_eq!(
                u16::from_le_bytes(out),
                bf16::from_f64(a).to_bits(),
                "{bits:#018x}"
            );
        }
    }
}
