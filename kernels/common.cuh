// common.cuh: the parameters every kernel reads, and the bit-level numerics: the twins of
// src/numerics/formats.rs and shaders/common.wgsl, function for function. Quantizer multiplies
// use __fmul_rn (never fused into an add) and divisions __fdiv_rn (correctly rounded), with
// subnormals flushed explicitly, so the bits match the CPU definition on every GPU.
#pragma once

typedef unsigned int u32;
typedef int i32;

struct Params {
    u32 batch, heads_q, heads_kv, seq_q;
    u32 seq_kv, head_dim, dp, group;
    u32 q_sb, q_sh, q_st, kv_sb;
    u32 kv_sh, kv_st, dtype, flags;
    u32 q_blocks, k_blocks; float fold, score_scale;
    float inv_g, g; u32 mode, count;
    u32 off_kmean, off_qdelta, off_qcodes, off_qscales;
    u32 off_kcodes, off_kscales, off_vcodes, off_vscales;
    u32 q_gblock, q_ginter, k_gblock, k_ginter;
    u32 np, off_vinv, recipe, off_kpart;
    u32 nm_n, nm_m, nm_sink, nm_recent;
    float skip_log2; u32 off_tiles, skip_on, pad1;
    float v_inv_g, v_g, p_log2; u32 pad3;
};

#define DT_F16 0u
#define DT_BF16 1u
#define DT_F32 2u
#define R_EXACT 0u
#define R_INT8_F16 1u
#define R_INT8_FP8 2u
#define R_NVFP4 3u
#define R_NVFP4P 4u
#define R_FP8P 5u
#define FLAG_CAUSAL 1u
#define FLAG_LSE 2u
#define FLAG_MASK 4u
#define FLAG_SMOOTH 8u
#define FLAG_VNVFP4 16u
#define FLAG_HEAVY_FIRST 32u  // attention_mma: grid (b·h, query blocks), last query block first
#define FLAG_P_DIRECT 64u     // attention_mma: Nvfp4P's quotient by one multiply (p_nvfp4)
#define TINY_BITS 0x0f800000u
#define E4M3_NAN 0x7fu
#define E4M3_MAX_CODE 0x7eu

__device__ __forceinline__ u32 f2u(float x) { return __float_as_uint(x); }
__device__ __forceinline__ float u2f(u32 x) { return __uint_as_float(x); }
__device__ __forceinline__ float f32_nan() { return u2f(0x7fc00000u); }
__device__ __forceinline__ float f32_neg_inf() { return u2f(0xff800000u); }
__device__ __forceinline__ u32 abs_bits(float x) { return f2u(x) & 0x7fffffffu; }
__device__ __forceinline__ bool non_finite(u32 a) { return a >= 0x7f800000u; }
__device__ __forceinline__ bool is_nan(float x) { return abs_bits(x) > 0x7f800000u; }
__device__ __forceinline__ float nan_max(float a, float b) { return (is_nan(a) || is_nan(b)) ? f32_nan() : fmaxf(a, b); }

// The least power of two ≥ a normal |x| given as bits (at most 2^126), as bits: the mantissa
// mask's add carries into the exponent unless x already is one.
__device__ __forceinline__ u32 pow2_ceil_bits(u32 a) { return (min(a, 0x7e800000u) + 0x007fffffu) & 0x7f800000u; }

__device__ __forceinline__ float ftz(float x) {
    u32 b = f2u(x);
    return (b & 0x7f800000u) == 0u ? u2f(b & 0x80000000u) : x;
}

__device__ __forceinline__ u32 rne_shift_right(u32 sig, u32 shift) {
    if (shift >= 32u) return 0u;
    u32 q = sig >> shift;
    u32 rem = sig & ((1u << shift) - 1u);
    u32 half = 1u << (shift - 1u);
    return (rem > half || (rem == half && (q & 1u))) ? q + 1u : q;
}

__device__ __forceinline__ u32 round_minifloat(u32 a, u32 mant, i32 emin) {
    i32 field = (i32)(a >> 23);
    if (field == 0) return 0u;
    i32 e = field - 127;
    u32 sig = (a & 0x7fffffu) | 0x800000u;
    i32 big_e = max(e, emin);
    u32 shift = (u32)(23 - (i32)mant + big_e - e);
    return ((u32)(big_e - emin) << mant) + rne_shift_right(sig, shift);
}

__device__ __forceinline__ u32 e4m3_from_f32(float x) {
    u32 bits = f2u(x);
    u32 sign = (bits >> 24) & 0x80u;
    u32 a = bits & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | E4M3_NAN;
    u32 code = E4M3_MAX_CODE;
    if (a < 0x7f800000u) code = min(round_minifloat(a, 3u, -6), E4M3_MAX_CODE);
    return sign | code;
}

// Two values → their E4M3 codes (RNE, saturating at ±448; = e4m3_from_f32 on finite values),
// lo in bits 0-7: one conversion on sm_89+.
__device__ __forceinline__ u32 e4m3x2_codes(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short e;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(e) : "f"(hi), "f"(lo));
    return e;
#else
    return e4m3_from_f32(lo) | (e4m3_from_f32(hi) << 8);
#endif
}

__device__ __forceinline__ float e4m3_to_f32(u32 c) {
    u32 sign = (c & 0x80u) << 24;
    if ((c & 0x7fu) == E4M3_NAN) return f32_nan();
    u32 e = (c >> 3) & 0xfu, m = c & 7u;
    if (e == 0u) return u2f(sign | f2u(__fmul_rn((float)m, 0.001953125f)));
    return u2f(sign | ((e + 120u) << 23) | (m << 20));
}

__device__ __forceinline__ float e2m1_to_f32(u32 c) {
    u32 sign = (c & 8u) << 28;
    u32 e = (c >> 1) & 3u, m = c & 1u;
    if (e == 0u) return u2f(sign | f2u(0.5f * (float)m));
    return u2f(sign | ((e + 126u) << 23) | (m << 22));
}

// E2M1 code of the exact quotient x / s: midpoint·s is exact in f32, a tie goes to the even code.
__device__ __forceinline__ u32 e2m1_code_of_ratio(float x, float s) {
    if (!(s > 0.0f)) return 0u;
    const float mids[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    u32 sign = (f2u(x) >> 28) & 8u;
    float a = u2f(abs_bits(x));
    u32 code = 0u;
#pragma unroll
    for (u32 i = 0; i < 7u; i++) {
        float t = __fmul_rn(mids[i], s);
        if (a > t || (a == t && ((i + 1u) & 1u) == 0u)) code = i + 1u;
    }
    return code == 0u ? 0u : (sign | code);
}

__device__ __forceinline__ i32 int8_round(float y) {
    u32 bits = f2u(y);
    u32 a = bits & 0x7fffffffu;
    i32 e = (i32)(a >> 23) - 127;
    u32 n = 0u;
    if (a >= 0x7f800000u || e >= 7) {
        n = 127u;
    } else if (e >= -1) {
        u32 sig = (a & 0x7fffffu) | 0x800000u;
        u32 shift = (u32)(23 - e);
        n = min((sig + (1u << (shift - 1u))) >> shift, 127u);
    }
    return (bits >> 31) ? -(i32)n : (i32)n;
}

// a / b correctly rounded (b positive, normal), subnormal inputs and results flushed.
__device__ __forceinline__ float div_rn(float a, float b) { return ftz(__fdiv_rn(ftz(a), b)); }

__device__ __forceinline__ float f16_bits_to_f32(u32 h) {
    u32 sign = (h & 0x8000u) << 16;
    u32 e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0u) return u2f(sign | f2u(__fmul_rn((float)m, 5.9604644775390625e-8f)));
    if (e == 31u) return u2f(sign | 0x7f800000u | (m << 13));
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

// f16 bits → f32 by the hardware conversion: exact (a NaN comes out as the canonical NaN, as
// every f32 operation after it would make it anyway).
__device__ __forceinline__ float cvt_f16(u32 bits) {
    float x;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(x) : "h"((unsigned short)bits));
    return x;
}

__device__ __forceinline__ u32 f32_to_f16_bits(float x) {
    u32 b = f2u(x);
    u32 sign = (b >> 16) & 0x8000u;
    u32 a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;
    return sign | min(round_minifloat(a, 10u, -14), 0x7c00u);
}

// E4M3 code → f16 bits, exactly (every E4M3 value is an f16): a normal code's exponent moves
// from bias 7 to 15 (+8); a subnormal m·2^-9 is an f16 normal; NaN as f32_to_f16_bits gives it.
__device__ __forceinline__ u32 e4m3_to_f16_bits(u32 c) {
    u32 sign = (c & 0x80u) << 8, a = c & 0x7fu;
    if (a == E4M3_NAN) return sign | 0x7e00u;
    if (a >= 8u) return sign | ((a << 7) + (8u << 10));
    return sign | (a == 0u ? 0u : f32_to_f16_bits(__fmul_rn((float)a, 0.001953125f)));
}

// Two E4M3 codes (bits 0-7, 8-15) → their f16 values, packed (lo first): exact (the NaN code
// gives an f16 NaN); one conversion on sm_89+.
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 codes) {
#if __CUDA_ARCH__ >= 890
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"((unsigned short)codes));
    return h2;
#else
    return e4m3_to_f16_bits(codes & 0xffu) | (e4m3_to_f16_bits((codes >> 8) & 0xffu) << 16);
#endif
}

// Two f32 → one register of two 16-bit values (lo = first), round to nearest even.
template <bool IS_BF16> __device__ __forceinline__ u32 pack16(float lo, float hi) {
    u32 r;
    if (IS_BF16)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 f32_to_bf16_bits(float x) {
    u32 b = f2u(x);
    u32 sign = (b >> 16) & 0x8000u;
    u32 a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7fc0u;
    return sign | min(round_minifloat(a, 7u, -126), 0x7f80u);
}

__device__ __forceinline__ float round_to(u32 dtype, float x) {
    if (dtype == DT_F16) return f16_bits_to_f32(f32_to_f16_bits(x));
    if (dtype == DT_BF16) return u2f(f32_to_bf16_bits(x) << 16);
    return x;
}

// Element idx of a tensor of `dtype` (subnormals flushed).
__device__ __forceinline__ float load_elem(const void* p, u32 idx, u32 dtype) {
    if (dtype == DT_F32) return ftz(((const float*)p)[idx]);
    u32 h = ((const unsigned short*)p)[idx];
    if (dtype == DT_F16) return f16_bits_to_f32(h);
    return ftz(u2f(h << 16));
}

__device__ __forceinline__ u32 byte_of(u32 word, u32 idx) { return (word >> ((idx & 3u) * 8u)) & 0xffu; }
__device__ __forceinline__ u32 group_of(u32 t, u32 block, u32 inter) { return (t / block) * inter + (t % inter); }
__device__ __forceinline__ u32 group_count(u32 n, u32 block, u32 inter) { return ((n + block - 1u) / block) * inter; }

__device__ __forceinline__ u32 nvfp4_scale_code(u32 amax) {
    if (non_finite(amax)) return E4M3_NAN;
    if (amax < TINY_BITS) return 0u;
    return e4m3_from_f32(div_rn(u2f(amax), 6.0f));
}

// x / 6 correctly rounded for x in [TINY, max finite] (checked there exhaustively against IEEE
// division): x·RN(1/6) and one FMA residual step, without div_rn's range check and slow path.
__device__ __forceinline__ float div6_rn(float x) {
    const float y = 1.0f / 6.0f;
    float q = __fmul_rn(x, y);
    return __fmaf_rn(__fmaf_rn(-q, 6.0f, x), y, q);
}

// Two block maxima → their NVFP4 scale codes, E4M3(max / 6) (lo in bits 0-7, hi in 8-15); NaN
// or ∞ → the NaN code, below TINY → 0 (nvfp4_scale_code). sm_89+ rounds in hardware.
__device__ __forceinline__ u32 scale_code_pair(u32 amax_lo, u32 amax_hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short e;
    // amax clamped into [TINY, max finite] (the codes of the others are set below); satfinite
    // clamps at 448 like min().
    float lo = div6_rn(u2f(min(max(amax_lo, TINY_BITS), 0x7f7fffffu))), hi = div6_rn(u2f(min(max(amax_hi, TINY_BITS), 0x7f7fffffu)));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(e) : "f"(hi), "f"(lo));
    u32 c = e;
    if (amax_lo < TINY_BITS) c &= 0xff00u;
    if (amax_hi < TINY_BITS) c &= 0x00ffu;
    if (non_finite(amax_lo)) c = (c & 0xff00u) | E4M3_NAN;
    if (non_finite(amax_hi)) c = (c & 0x00ffu) | (E4M3_NAN << 8);
    return c;
#else
    return nvfp4_scale_code(amax_lo) | (nvfp4_scale_code(amax_hi) << 8);
#endif
}

// 1/s for e2m1_unsaturated: MUFU's approximation (≤ 1 ulp), 0 for a zero or NaN scale (q = 0).
__device__ __forceinline__ float scale_rcp(float s) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(s));
    return s > 0.0f ? r : 0.0f;
}

// E2M1(a / s) · s for a ≥ 0 and an E4M3 block scale s, bit-exact without comparing a against
// seven thresholds (which cost ~14 instructions per value):
// 1. q = a / s, faithfully rounded: q0 = a·rcp(s) is within ~1.5 ulp, one FMA residual step
//    brings it within 0.5 ulp + 2⁻²² ulp. Every E2M1 midpoint m (0.25, 0.75, …, 5) has few
//    bits; a ≠ m·s puts a / s at least 0.53 ulp(m) from m (a's own ulp over s, s of 4 bits),
//    so q lies on the same side of every midpoint as a / s, and equals m on an exact tie.
// 2. Round q to the E2M1 step by adding C = 2²²·max(2^⌊log2 q⌋, 1): C + q lands in the binade
//    whose ulp is the step (0.5 below 2, 1 below 4, 2 below 8; 4 or more past 8, which
//    saturates anyway), so the FMA's RNE is the E2M1 rounding, ties to even (C is an even
//    multiple of the step); subtracting C is exact.
// 3. Saturate at 6 and scale (attention_mma.cu's e2m1_pair_times_scale), or take the code
//    (quant.cu's e2m1_code). s = 0 (an all-tiny block) gives 0; a NaN s gives NaN.
// Step 2: the E2M1 value of q ≥ 0 before saturation.
__device__ __forceinline__ float e2m1_round(float q) {
    float c = fmaxf(u2f(f2u(q) & 0x7f800000u), 1.0f);
    return __fmaf_rn(c, -4194304.0f, __fmaf_rn(c, 4194304.0f, q));
}

// Steps 1 and 2: the E2M1 value of a / s before saturation.
__device__ __forceinline__ float e2m1_unsaturated(float a, float s, float rcp_s) {
    float q0 = __fmul_rn(a, rcp_s);
    return e2m1_round(__fmaf_rn(__fmaf_rn(-q0, s, a), rcp_s, q0));
}
