// The fold kernels of the CUDA executor. gen_ptx.py compiles them with NVRTC into kernels.ptx,
// which ema-tool embeds and the CUDA driver compiles for the device (fold/cuda/device.rs).
//
// One launch of ema_accumulate per (batch, input): acc_o[e] (=|+=) w_o * x[e] for every output
// o of the fold (a sweep has several), decoding x from the raw little-endian bytes of the input
// as they were read from the file, once for all the outputs. One launch of ema_encode per
// (batch, output): the accumulators rounded to each tensor's output dtype. The arithmetic
// is the CPU path's (fold/kernels/) operation for operation: f64 accumulators, unfused
// multiply then add, the same encoders, so the two paths write the same bytes.
//
// A batch packs segments (element ranges of one or many tensors) into one launch; the layout
// of the segment table and of the buffers is fold/packing.rs's, which keeps the constants and
// the Seg struct below in step (a test checks them).
//
// This file is also compiled as plain C by the host compiler in packing.rs's tests
// (EMA_HOST_TEST), which emulate the launches on the CPU; it needs no CUDA header.

#ifdef EMA_HOST_TEST
#include <string.h>
#define EMA_KERNEL
#define EMA_DEVICE static
static struct { unsigned int x; } blockIdx, threadIdx;
#define __dmul_rn(a, b) ((a) * (b))
#define __dadd_rn(a, b) ((a) + (b))
#define atomicAdd(p, v) (*(p) += (v))
static float u32_as_f32(unsigned int b) { float f; memcpy(&f, &b, 4); return f; }
static unsigned int f32_as_u32(float f) { unsigned int b; memcpy(&b, &f, 4); return b; }
static double u64_as_f64(unsigned long long b) { double d; memcpy(&d, &b, 8); return d; }
static unsigned long long f64_as_u64(double d) { unsigned long long b; memcpy(&b, &d, 8); return b; }
#else
#define EMA_KERNEL extern "C" __global__
#define EMA_DEVICE static __device__ __forceinline__
#define u32_as_f32(b) __uint_as_float(b)
#define f32_as_u32(f) __float_as_uint(f)
#define u64_as_f64(b) __longlong_as_double((long long)(b))
#define f64_as_u64(d) ((unsigned long long)__double_as_longlong(d))
#endif

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// Element types (packing.rs: dtype_code).
#define DT_NONE 0
#define DT_F32 1
#define DT_F16 2
#define DT_BF16 3
#define DT_F64 4
#define DT_F8E4M3 5
#define DT_F8E5M2 6

// Threads per block, elements per thread: a block covers BLOCK * ITEMS elements of a segment.
#define BLOCK 256
#define ITEMS 8

// Seg.flags
#define FLAG_FIRST 1u    // the segment's first input: assign instead of add
#define FLAG_CONVERTS 2u // some input dtype differs from the output dtype: count overflows

// One segment of a batch as the kernels of one launch see it (56 bytes, packing.rs: Seg).
typedef struct {
    u64 acc;         // index of its first accumulator
    u64 src;         // byte offset of its input data in the piece buffer
    u64 out;         // byte offset of its encoded output in the output buffer
    u64 weights;     // byte offset in the piece of this input's weight in every output (f64s)
    u32 count;       // elements
    u32 first_block; // first block of the launch that works on it
    u32 in_dtype;    // DT_* of this input; DT_NONE: the tensor has no input in this piece
    u32 out_dtype;   // DT_* of the output
    u32 flags;       // FLAG_*
    u32 pad;
} Seg;

// ---- decoding -------------------------------------------------------------------------------

EMA_DEVICE double f16_to_f64(u32 h) {
    u32 sign = (h & 0x8000u) << 16;
    u32 exp = (h >> 10) & 0x1fu;
    u32 man = h & 0x3ffu;
    if (exp == 0x1fu) return (double)u32_as_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        double v = (double)man * (1.0 / 16777216.0); // man * 2^-24, exact
        return sign ? -v : v;
    }
    return (double)u32_as_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

EMA_DEVICE double f8e4m3_to_f64(u32 b) {
    u32 exp = (b >> 3) & 0xfu;
    u32 man = b & 7u;
    double v;
    if (exp == 0xfu && man == 7u) return u64_as_f64(0x7ff8000000000000ull); // e4m3fn NaN
    if (exp == 0) v = (double)man * (1.0 / 512.0);                         // man * 2^-9
    else v = u64_as_f64(((u64)(exp + 1016u) << 52) | ((u64)man << 49));    // (8+man) * 2^(exp-10)
    return (b & 0x80u) ? -v : v;
}

// Element e of a buffer of dtype `dt`, as f64.
EMA_DEVICE double load(const u8* src, u64 e, u32 dt) {
    switch (dt) {
    case DT_F32: return (double)u32_as_f32(((const u32*)src)[e]);
    case DT_F16: return f16_to_f64(((const u16*)src)[e]);
    case DT_BF16: return (double)u32_as_f32((u32)((const u16*)src)[e] << 16);
    case DT_F64: return u64_as_f64(((const u64*)src)[e]);
    case DT_F8E4M3: return f8e4m3_to_f64(src[e]);
    case DT_F8E5M2: // the top byte of an f16; its NaNs are the CPU table's, positive and quiet
        if ((src[e] & 0x7fu) > 0x7cu) return u64_as_f64(0x7ff8000000000000ull);
        return f16_to_f64((u32)src[e] << 8);
    default: return 0.0;
    }
}

// ---- encoding -------------------------------------------------------------------------------

// The nearest value to `d` (neither NaN nor infinite) with `mbits` mantissa bits and minimum
// normal exponent `emin`, ties to even, as the code of an IEEE-like format without its sign:
// ((E - emin) << mbits) + n, where n counts quanta of 2^(E - mbits), E = max(exponent, emin).
// A carry into the next binade comes out right by itself. Codes past the format's largest
// finite one mean overflow.
EMA_DEVICE u64 round_code(u64 bits, int mbits, int emin) {
    u64 mag = bits & 0x7fffffffffffffffull;
    int de = (int)(mag >> 52);
    if (de == 0) return 0; // f64 subnormals are far below every format's smallest subnormal
    int e = de - 1023;
    if (e > 64) return ~0ull >> 1; // overflows every format
    u64 sig = (mag & 0xfffffffffffffull) | (1ull << 52);
    int E = e > emin ? e : emin;
    int shift = 52 + E - mbits - e; // sig / 2^shift quanta; >= 52 - mbits > 0
    u64 n;
    if (shift >= 64) {
        n = 0;
    } else {
        u64 rem = sig & ((1ull << shift) - 1);
        u64 half = 1ull << (shift - 1);
        n = sig >> shift;
        if (rem > half || (rem == half && (n & 1))) n++;
    }
    return ((u64)(E - emin) << mbits) + n;
}

// float8: nearest code, ties to even, as codec/convert.rs f8_encode: past the largest finite
// value, e4m3fn gives NaN (0x7f) and e5m2 infinity (0x7c), with the sign; NaN gives 0x7f.
EMA_DEVICE u32 f64_to_f8(double d, int mbits, int emin, u64 max_code, u32 overflow) {
    u64 bits = f64_as_u64(d);
    u32 sign = (u32)(bits >> 56) & 0x80u;
    u64 mag = bits & 0x7fffffffffffffffull;
    if (mag > 0x7ff0000000000000ull) return 0x7fu;
    if (mag == 0x7ff0000000000000ull) return sign | overflow;
    u64 code = round_code(bits, mbits, emin);
    return code > max_code ? (sign | overflow) : (sign | (u32)code);
}

// f16 through f32, as the CPU path's `half::f16::from_f64` on x86 with F16C (f64 -> f32 -> f16,
// each to nearest even; NaN keeps its sign and top payload bits, made quiet).
EMA_DEVICE u32 f64_to_f16(double d) {
    u32 f = f32_as_u32((float)d);
    u32 sign = (f >> 16) & 0x8000u;
    u32 mag = f & 0x7fffffffu;
    if (mag > 0x7f800000u) return sign | 0x7e00u | ((mag >> 13) & 0x3ffu);
    if (mag == 0x7f800000u) return sign | 0x7c00u;
    u64 code = round_code(f64_as_u64((double)u32_as_f32(mag)), 10, -14);
    return code > 0x7bffu ? (sign | 0x7c00u) : (sign | (u32)code);
}

// bf16 exactly as the CPU path's `half::bf16::from_f64`: the f64 truncated to its top 32 bits,
// then rounded to nearest even (bit for bit the same, including its rare double rounding).
EMA_DEVICE u32 f64_to_bf16(double d) {
    u64 val = f64_as_u64(d);
    u32 x = (u32)(val >> 32);
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7ff00000u;
    u32 man = x & 0x000fffffu;
    if (exp == 0x7ff00000u) {
        u32 nan_bit = (man == 0 && (u32)val == 0) ? 0 : 0x0040u;
        return (sign >> 16) | 0x7f80u | nan_bit | (man >> 13);
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 20) - 1023 + 127;
    if (half_exp >= 0xff) return half_sign | 0x7f80u;
    if (half_exp <= 0) {
        if (7 - half_exp > 21) return half_sign;
        u32 m = man | 0x00100000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
        return half_sign | half_man;
    }
    u32 r = half_sign | ((u32)half_exp << 7) | (man >> 13);
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) r += 1;
    return r;
}

// Stores `v` as element e of `dst` in dtype `dt`; returns whether the stored value is NaN or
// infinite.
EMA_DEVICE int store(u8* dst, u64 e, u32 dt, double v) {
    u32 c;
    switch (dt) {
    case DT_F32: {
        u32 b = f32_as_u32((float)v);
        ((u32*)dst)[e] = b;
        return (b & 0x7f800000u) == 0x7f800000u;
    }
    case DT_F64:
        ((double*)dst)[e] = v;
        return (f64_as_u64(v) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    case DT_F16:
        c = f64_to_f16(v);
        ((u16*)dst)[e] = (u16)c;
        return (c & 0x7c00u) == 0x7c00u;
    case DT_BF16:
        c = f64_to_bf16(v);
        ((u16*)dst)[e] = (u16)c;
        return (c & 0x7f80u) == 0x7f80u;
    case DT_F8E4M3:
        c = f64_to_f8(v, 3, -6, 0x7eu, 0x7fu);
        dst[e] = (u8)c;
        return (c & 0x7fu) == 0x7fu;
    case DT_F8E5M2:
        c = f64_to_f8(v, 2, -14, 0x7bu, 0x7cu);
        dst[e] = (u8)c;
        return (c & 0x7cu) == 0x7cu;
    default: return 0;
    }
}

// ---- kernels --------------------------------------------------------------------------------

EMA_DEVICE u32 is_finite(double v) {
    return (f64_as_u64(v) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// The segment that block `b` works on: the last one whose first_block is <= b.
EMA_DEVICE u32 find_seg(const Seg* segs, u32 nseg, u32 b) {
    u32 lo = 0, hi = nseg;
    while (hi - lo > 1) {
        u32 mid = lo + (hi - lo) / 2;
        if (segs[mid].first_block <= b) lo = mid;
        else hi = mid;
    }
    return lo;
}

// acc_o (=|+=) weight_o * x for every segment of one input's piece and every output o < nout:
// `piece` starts with the segment table, then the weights, then the input data at each
// segment's `src`; output o's accumulators start at acc + o * stride.
EMA_KERNEL void ema_accumulate(const u8* piece, u32 nseg, u32 nout, double* acc, u64 stride) {
    const Seg* segs = (const Seg*)piece;
    const Seg* g = &segs[find_seg(segs, nseg, blockIdx.x)];
    u32 dt = g->in_dtype;
    if (dt == DT_NONE) return;
    const u8* src = piece + g->src;
    double* a = acc + g->acc;
    const double* w = (const double*)(piece + g->weights);
    u64 begin = (u64)(blockIdx.x - g->first_block) * (BLOCK * ITEMS) + threadIdx.x;
    u32 first = g->flags & FLAG_FIRST;
    for (u32 i = 0; i < ITEMS; i++) {
        u64 e = begin + (u64)i * BLOCK;
        if (e >= g->count) break;
        double x = load(src, e, dt);
        for (u32 o = 0; o < nout; o++) {
            double wx = __dmul_rn(w[o], x);
            double* p = a + o * stride + e;
            *p = first ? wx : __dadd_rn(*p, wx);
        }
    }
}

// Encodes the accumulators of every segment into `out` (at each segment's `out`), counting in
// counts[0] the non-finite accumulators (when `check_finite`) and in counts[1] the finite ones
// that overflow their output dtype (segments with FLAG_CONVERTS), as the CPU path checks.
EMA_KERNEL void ema_encode(const u8* piece, u32 nseg, const double* acc, u8* out, u32* counts,
                           u32 check_finite) {
    const Seg* segs = (const Seg*)piece;
    const Seg* g = &segs[find_seg(segs, nseg, blockIdx.x)];
    const double* a = acc + g->acc;
    u8* dst = out + g->out;
    u32 dt = g->out_dtype;
    u32 converts = g->flags & FLAG_CONVERTS;
    u64 begin = (u64)(blockIdx.x - g->first_block) * (BLOCK * ITEMS) + threadIdx.x;
    for (u32 i = 0; i < ITEMS; i++) {
        u64 e = begin + (u64)i * BLOCK;
        if (e >= g->count) break;
        double v = a[e];
        int bad = store(dst, e, dt, v);
        u32 finite = is_finite(v);
        if (check_finite && !finite) atomicAdd(&counts[0], 1u);
        if (converts && finite && bad) atomicAdd(&counts[1], 1u);
    }
}
