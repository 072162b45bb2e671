//! The element kernels: decode any float dtype into f64 accumulators with a weight, and encode
//! accumulators into any dtype. Fused single loops over byte slices, no allocation.
//!
//! Data is little-endian, as in every checkpoint format we read.

use half::{bf16, f16};

use crate::dtype::DType;

/// `acc[i] (=|+=) w · x[i]` for the elements `x` of `src`, stored as `dtype`.
///
/// With `first`, the accumulators are overwritten rather than added to, which saves zeroing.
/// `src.len()` must be `acc.len() × dtype.size()`.
pub fn accumulate(dtype: DType, src: &[u8], w: f64, acc: &mut [f64], first: bool) {
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
        DType::F16 => fold!(2, |b: [u8; 2]| f16::from_bits(u16::from_le_bytes(b))
            .to_f64()),
        DType::F8E4M3 => fold!(1, |b: [u8; 1]| F8E4M3_TABLE[b[0] as usize] as f64),
        DType::F8E5M2 => fold!(1, |b: [u8; 1]| F8E5M2_TABLE[b[0] as usize] as f64),
        other => unreachable!("accumulate called on non-float dtype {other}"),
    }
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
    debug_assert_eq!(out.len(), acc.len() * dtype.size());
    macro_rules! enc {
        ($n:literal, $conv:expr) => {{
            let conv = $conv;
            for (c, &a) in out.chunks_exact_mut($n).zip(acc) {
                c.copy_from_slice(&conv(a));
            }
        }};
    }
    match dtype {
        DType::F32 => enc!(4, |a: f64| (a as f32).to_le_bytes()),
        DType::F64 => enc!(8, |a: f64| a.to_le_bytes()),
        DType::BF16 => enc!(2, |a: f64| bf16::from_f64(a).to_bits().to_le_bytes()),
        DType::F16 => enc!(2, |a: f64| f16::from_f64(a).to_bits().to_le_bytes()),
        DType::F8E4M3 => enc!(1, |a: f64| [f8_encode(&F8E4M3_TABLE, a, F8E4M3_OVERFLOW)]),
        DType::F8E5M2 => enc!(1, |a: f64| [f8_encode(&F8E5M2_TABLE, a, F8E5M2_OVERFLOW)]),
        other => unreachable!("encode called on non-float dtype {other}"),
    }
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

/// What a value past the largest finite one becomes.
const F8E4M3_OVERFLOW: u8 = 0x7F; // e4m3fn has no infinity: NaN
const F8E5M2_OVERFLOW: u8 = 0x7C; // +inf

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

/// Nearest float8 code to `a`, ties to even, using the decode table's positive half
/// (codes 0..0x80 increase with value up to the first non-finite one).
fn f8_encode(table: &[f32; 256], a: f64, overflow: u8) -> u8 {
    if a.is_nan() {
        return 0x7F;
    }
    let sign = if a.is_sign_negative() { 0x80u8 } else { 0 };
    let x = a.abs();
    // Largest finite positive code.
    let top = (0..0x80u8)
        .rev()
        .find(|&c| table[c as usize].is_finite())
        .unwrap_or(0);
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

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(f8_encode(&F8E4M3_TABLE, v, F8E4M3_OVERFLOW), c);
            assert_eq!(f8_encode(&F8E4M3_TABLE, -v, F8E4M3_OVERFLOW) & 0x7F, c);
        }
        assert_eq!(round_trip(DType::F8E4M3, &[1.0625]), vec![1.0]); // tie to even
        assert_eq!(round_trip(DType::F8E4M3, &[1.1]), vec![1.125]);
        assert!(round_trip(DType::F8E4M3, &[1000.0])[0].is_nan());
        assert_eq!(round_trip(DType::F8E4M3, &[450.0]), vec![448.0]);
        assert_eq!(round_trip(DType::F8E5M2, &[1e6]), vec![f64::INFINITY]);
        assert_eq!(count_overflow(DType::F16, &[70000.0, 1.0, 65504.0]), 1);
        assert_eq!(count_overflow(DType::F32, &[1e39]), 1);
    }
}
