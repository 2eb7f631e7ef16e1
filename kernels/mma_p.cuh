// mma_p.cuh (attention_mma.cu includes it after the tile primitives; it uses that file's macros):
// the recipe's P as the P·V operand — 16-bit, FP8 and NVFP4 (the direct path), and P's factor.

// ---- the recipe's P ------------------------------------------------------------------------

// Two p (adjacent keys of a row) rounded to a 16-bit type in one conversion: hardware RNE;
// p comes from ex2.approx.ftz, so it is never subnormal and round_to's flush has nothing to do.
template <bool IS_BF16> __device__ __forceinline__ void round16_pair(float& lo, float& hi) {
    u32 h2 = pack16<IS_BF16>(lo, hi);
    if (IS_BF16) {
        lo = u2f(h2 << 16);
        hi = u2f(h2 & 0xffff0000u);
    } else {
        lo = cvt_f16(h2 & 0xffffu);
        hi = cvt_f16(h2 >> 16);
    }
}
__device__ __forceinline__ void round_dtype_pair(float& lo, float& hi) { round16_pair<BF16>(lo, hi); }

// Two values → E4M3 (RNE, saturating at ±448) → their values as one packed 16-bit register.
// sm_89+ converts in hardware (the same bits as e4m3_from_f32); sm_80 in software.
template <bool IS_BF16> __device__ __forceinline__ u32 e4m3_pair(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    u32 h2 = e4m3x2_to_f16x2(e4m3x2_codes(lo, hi));
    if (!IS_BF16) return h2;
    return pack16<true>(f16_bits_to_f32(h2 & 0xffffu), f16_bits_to_f32(h2 >> 16));
#else
    return pack16<IS_BF16>(e4m3_to_f32(e4m3_from_f32(lo)), e4m3_to_f32(e4m3_from_f32(hi)));
#endif
}

// Four E4M3 codes (one per byte) → their values.
__device__ __forceinline__ void e4m3x4_values(u32 codes, float (&out)[4]) {
#if __CUDA_ARCH__ >= 890
#pragma unroll
    for (u32 h = 0; h < 2u; h++) {
        u32 h2 = e4m3x2_to_f16x2(codes >> (16u * h));
        out[2u * h] = cvt_f16(h2 & 0xffffu);
        out[2u * h + 1u] = cvt_f16(h2 >> 16);
    }
#else
#pragma unroll
    for (u32 i = 0; i < 4u; i++) out[i] = e4m3_to_f32(byte_of(codes, i));
#endif
}

// E2M1(a / s) · s: steps 1 and 2 are e2m1_unsaturated (common.cuh); step 3 for two values of
// one block, in the packed 16-bit pair the P·V MMA reads (lo first):
// pack (exact for E2M1 values; a larger value stays ≥ 6, possibly ∞), min 6, times s2 = (s, s)
// by an FMA with −0 (exact: every E2M1·E4M3 product is an f16 and a bf16 value; +0 stays +0).
// Two values per instruction instead of an f32 min and multiply each, then a pack.
// (Saturation is not only for a caller's amax below p: a block of tiny p gets a subnormal E4M3
// scale, up to 1.5× below max / 6, so q reaches 9.)
template <bool IS_BF16> __device__ __forceinline__ u32 e2m1_pair_times_scale(float v0, float v1, u32 s2) {
    u32 v = pack16<IS_BF16>(v0, v1), r;
    if (IS_BF16)
        asm("{\n.reg .b32 t;\nmin.bf16x2 t, %1, %3;\nfma.rn.bf16x2 %0, t, %2, %4;\n}\n"
            : "=r"(r)
            : "r"(v), "r"(s2), "r"(0x40C040C0u), "r"(0x80008000u));
    else
        asm("{\n.reg .b32 t;\nmin.f16x2 t, %1, %3;\nfma.rn.f16x2 %0, t, %2, %4;\n}\n"
            : "=r"(r)
            : "r"(v), "r"(s2), "r"(0x46004600u), "r"(0x80008000u));
    return r;
}

// Nvfp4P on one m-tile. A group of 16 keys of a row is n-tiles 2i and 2i+1: a thread holds 4 of
// its values, its quad the rest, so the quad shares 8 blocks (4 per row). The block maxima are
// reduce-scattered over the quad (each thread ends with 2 blocks' maxima, computes their scale
// codes) and the codes all-gathered as bytes: a quarter of the scale work per thread.
// p ≥ 0 (so is every a = p·mul, NaN aside), so maxima compare raw bits; a NaN wins and makes
// the scale NaN.
// mul[i]: the factor of row g + 8i (inv_g for Nvfp4P; unused for Nvfp4, whose p arrive lifted
// to p/ρ' and whose inv_g is 2688); Nvfp4P first rounds p to the input dtype, Nvfp4 to f16.
// Leaves the P·V operand pairs in pk: pk[n][i] = keys 2t, 2t+1 of n-tile n, row g + 8i.
//
// DIRECT (Nvfp4 always; Nvfp4P with FLAG_P_DIRECT: 16-bit inputs, amax_P a power of two, inv_g =
// 2688·2^-k): p has at most 11 significant bits, so p·inv_g is exact; the block maxima are taken
// over p and scaled once, and the quotient p·inv_g / s is one multiply, q = p·R with R = inv_g / s
// made 2^-21 to 2^-19.6 too large (direct_factor): three instructions per value fewer. Exact
// because a quotient of an 11-bit p and a 4-bit s (times 2688) that is not an E2M1 midpoint lies at
// least 2^-14.78 (relative) from every midpoint, and the only midpoints it can equal are 0.75, 1.75
// and 3.5, whose ties go up: where R's excess puts them (tests/cuda.rs: the gap over every
// significand pair, and the whole path below emulated, on the CPU; every f16 and bf16 p ≤ 1 with
// every E4M3 scale through the GPU probe, which reads direct_tab as the kernel does).
//
// The quotient then goes to E2M1 without finding its binade (e2m1_direct_pair): R also carries
// 2^-K, K = 14 for an f16 operand (126 for bf16), so that q = 1 sits at the 16-bit format's
// smallest normal. Converted toward zero to that format, q < 2 lands where the spacing at
// mantissa bit 9 (bf16: bit 6) is 0.5, and every binade above keeps one such bit: E2M1's grid
// in every range. Rounding half up at that bit (an integer add and mask on both halves) is
// then E2M1's rounding: toward zero, a quotient just above a midpoint becomes the midpoint, and
// one that was exactly a midpoint was one of the three that round up; a quotient below a
// midpoint stays below. Then min 6·2^-K and one multiply by s·2^7 (f16: E2M1·s·2^-7 is always
// an f16 value, 0.5·2^-9·2^-7 = 2^-17 up to 21) or by s·2^119 (bf16: E2M1·s·2^-7 is normal),
// and the final normalisation multiplies by 2^7: direct_unscale. (f16's 2^-7 rather than the
// 2^-14 the grid leaves keeps room below: the Nvfp4 recipe folds its tile factor f ≥ 2^-7
// into s exactly, p_tile_fold.)
__device__ __forceinline__ float direct_unscale() { return 0x1p7f; }

__device__ __forceinline__ float direct_factor(float inv_g, float s) {
    // rcp(s)·RN(inv_g·(1 + 2^-20)·2^-K): three roundings of ≤ 2^-23, 2^-24, 2^-24 leave the excess
    // over inv_g / s within 2^-20 ± 2^-22; the second factor is the same for every block (one
    // multiply per block). R·2^-K stays normal (R ≥ 5.6: s ≤ 1.07·block max·inv_g / 6).
    const float excess = PV_BF16 ? (1.0f + 0x1p-20f) * 0x1p-126f : (1.0f + 0x1p-20f) * 0x1p-14f;
    return __fmul_rn(scale_rcp(s), __fmul_rn(inv_g, excess));  // rcp: ≤ 1 ulp
}

// The operand multiplier for e2m1_direct_pair: (s·2^7, s·2^7) as f16 (≤ 57344, exact), or
// (s·2^119, s·2^119) as bf16 (≤ 448·2^119, finite).
__device__ __forceinline__ u32 direct_scale2(float s) {
    return PV_BF16 ? pack16<true>(s * 0x1p119f, s * 0x1p119f) : pack16<false>(s * 0x1p7f, s * 0x1p7f);
}

// The Nvfp4 recipe's tile factor f = ρ' (a power of two ≤ 1) for one row's operand multiplier:
// (f, f) as f16, multiplied into the block's s2 (p_nvfp4), so that the accumulator holds O in
// the running max's units and needs no rescale when only f changes. Exact for f ≥ 2^-7:
// s·2^7·f is then an f16 value (≥ s ≥ 2^-9, 4 significant bits), and so is E2M1·s·f·2^-7 (its
// lowest bit is at least 2^-10·2^-14 = 2^-24, f16's least subnormal). A smaller f (the tile's
// p all below 2^-8 of the running max) rounds the operands that fall below f16's range: by at
// most 2^-25, under 2^-29 of the row's largest operand (21); f < 2^-24 gives (0, 0), and the
// tile adds nothing to O (its p stay in the row sum).
__device__ __forceinline__ u32 p_tile_fold(float f) { return pack16<false>(f, f); }
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// DIRECT's per-scale factors for every positive E4M3 scale code (0x7f: NaN, R = 0, s2 NaN):
// (R, s2), filled once per block (direct_table_fill, before the kernel's first barrier), so that
// a block's R and operand pair are one shared-memory load instead of decoding the code, a
// reciprocal, a select, a multiply and a pack (the same values: the same two functions).
__shared__ uint2 direct_tab[128];
__device__ __forceinline__ void direct_table_fill(float inv_g) {
    for (u32 c = threadIdx.x; c < 128u; c += blockDim.x) {
        float s = e4m3_to_f32(c);
        direct_tab[c] = make_uint2(f2u(direct_factor(inv_g, s)), direct_scale2(s));
    }
}

// Whether P takes the direct path (p_nvfp4<true>): always for the Nvfp4 recipe (its lifted p
// is rounded to f16 and its global scale is 1/2688), for Nvfp4P where FLAG_P_DIRECT allows.
// PDIR (Nvfp4P): 2 both paths, FLAG_P_DIRECT picking at run time; 1 the direct path only (the
// host sets the flag's condition), 0 the general one only (src/backend/cuda, nvfp4p_path).
__device__ __forceinline__ bool p_direct(const Params& P) {
    if (RECIPE != R_NVFP4P) return RECIPE == R_NVFP4;
    return PDIR == 2u ? (P.flags & FLAG_P_DIRECT) != 0u : PDIR == 1u;
}
__device__ __forceinline__ float direct_inv_g(const Params& P) { return RECIPE == R_NVFP4 ? 2688.0f : P.inv_g; }

// Two quotients t = q·2^-K (f32) → E2M1(q)·s / direct_unscale() as the P·V operand pair.
__device__ __forceinline__ u32 e2m1_direct_pair(float t_lo, float t_hi, u32 s2) {
    u32 v, r;
    if (PV_BF16) {
        asm("cvt.rz.bf16x2.f32 %0, %1, %2;\n" : "=r"(v) : "f"(t_hi), "f"(t_lo));
        v = (v + 0x00200020u) & 0xffc0ffc0u;  // half up at bit 5, keep bit 6 up
        asm("{\n.reg .b32 t;\nmin.bf16x2 t, %1, %3;\nfma.rn.bf16x2 %0, t, %2, %4;\n}\n"
            : "=r"(r)
            : "r"(v), "r"(s2), "r"(0x01c001c0u), "r"(0x80008000u));  // 6·2^-126
    } else {
        asm("cvt.rz.f16x2.f32 %0, %1, %2;\n" : "=r"(v) : "f"(t_hi), "f"(t_lo));
        v = (v + 0x01000100u) & 0xfe00fe00u;  // half up at bit 8, keep bit 9 up
        asm("{\n.reg .b32 t;\nmin.f16x2 t, %1, %3;\nfma.rn.f16x2 %0, t, %2, %4;\n}\n"
            : "=r"(r)
            : "r"(v), "r"(s2), "r"(0x0e000e00u), "r"(0x80008000u));  // 6·2^-14
    }
    return r;
}

// DIRECT's scale codes of two blocks from their largest p (16-bit values, ≤ 1, or NaN): the
// block max over 6g is p·inv_g / 6 = p·448·2^-k (inv_g = 2688·2^-k), exact in one multiply (p
// of ≤ 11 significant bits times 448's 3), so the division scale_code_pair makes correctly
// rounded (div6_rn), its clamps into [TINY, max] and the fix-ups of their codes go: the
// hardware's E4M3 rounding of an exact value is the definition, satfinite its min(·, 448), a
// value below TINY/6 rounds to 0 as the clamp's code did, NaN → NaN (masked to 0x7f: a code
// indexes direct_tab). An infinite inv_g (amax_P ≤ 2^-117) never takes the direct path
// (p_direct_allowed). sm_89+ (the E4M3 conversion); before, the general codes of p·inv_g.
__device__ __forceinline__ u32 direct_scale_codes(float p_lo, float p_hi, float inv_g) {
#if __CUDA_ARCH__ >= 890
    // 448·2^-k: 2688·RN(1/6) = 448·(1 + 2^-25) rounds to 448 (half an ulp is 2^-24), and so
    // at every power of two.
    const float c = RECIPE == R_NVFP4 ? 448.0f : __fmul_rn(inv_g, 1.0f / 6.0f);
    unsigned short e;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(e) : "f"(__fmul_rn(p_hi, c)), "f"(__fmul_rn(p_lo, c)));
    return e & 0x7f7fu;
#else
    return scale_code_pair(f2u(__fmul_rn(p_lo, inv_g)), f2u(__fmul_rn(p_hi, inv_g)));
#endif
}

// One pair of a block before its scale is known: p rounded as the recipe says (Nvfp4P: to the
// input dtype; the Nvfp4 recipe's DIRECT p' to f16), times the row's multiplier (not DIRECT),
// and the block's running max (as bits: p ≥ 0).
// (KPERM passes pairs of two rows' block maxima through the same rounding and multiply.)
template <bool DIRECT> __device__ __forceinline__ void p_round_pair(float& lo, float& hi, float mul_lo, float mul_hi) {
    if (RECIPE == R_NVFP4P) round_dtype_pair(lo, hi);
    if (DIRECT && RECIPE == R_NVFP4) round16_pair<false>(lo, hi);  // p' (lifted)
    if (!DIRECT) {
        lo = __fmul_rn(lo, mul_lo);
        hi = __fmul_rn(hi, mul_hi);
    }
}
template <bool DIRECT>
__device__ __forceinline__ void p_block_pair(float& lo, float& hi, float mul, u32& amax) {
    p_round_pair<DIRECT>(lo, hi, mul, mul);
    amax = max(amax, max(f2u(lo), f2u(hi)));
}

// What a block's scale code gives its pairs: DIRECT: (R, s2) from direct_tab; else from the
// scale's value s (e4m3x4_values): s, 1/s and (s, s) packed.
struct BlockScale {
    float r, s;
    u32 s2;
};
// `fold`: the row's p_tile_fold (the Nvfp4 recipe only).
template <bool DIRECT> __device__ __forceinline__ BlockScale block_scale(u32 code, float value, u32 fold) {
    BlockScale b;
    if (DIRECT) {
        uint2 e = direct_tab[code];  // codes < 128
        b.r = u2f(e.x);
        b.s2 = RECIPE == R_NVFP4 ? hmul2(e.y, fold) : e.y;
        b.s = 0.0f;
    } else {
        b.s = value;
        b.r = scale_rcp(b.s);
        b.s2 = pack16<PV_BF16>(b.s, b.s);
    }
    return b;
}

// One pair of a block → its two P·V operand values, packed.
template <bool DIRECT> __device__ __forceinline__ u32 p_quant_pair(float lo, float hi, const BlockScale& b) {
    if (DIRECT) return e2m1_direct_pair(__fmul_rn(lo, b.r), __fmul_rn(hi, b.r), b.s2);
    return e2m1_pair_times_scale<PV_BF16>(e2m1_unsaturated(lo, b.s, b.r), e2m1_unsaturated(hi, b.s, b.r), b.s2);
}

// `pmax` (KPERM): each row's largest p of the thread, made as its p were (softmax_mtile).
template <bool DIRECT>
__device__ __forceinline__ void p_nvfp4(float (&p)[NT_S][4], const float (&mul)[2], const u32 (&fold)[2], const float (&pmax)[2],
                                        u32 (&pk)[NT_S][2]) {
    const float inv_g = RECIPE == R_NVFP4 ? 2688.0f : mul[0];
#if KPERM
    // A row's 16 values here are one block (key_in_tile): rows g and g + 8, no exchange. Its max
    // is the ex2 of the thread's largest score of the row, rounded and multiplied as every p
    // is: the same bits as the largest of the 16, as ex2.approx, the rounding and the multiply
    // never decrease (benches/gpu/ex2_monotone.py), without 32 compares. (A NaN score is not
    // the max here, unlike in the compares; its own p still makes the row's o NaN.)
#pragma unroll
    for (u32 n = 0; n < NT_S; n++)
#pragma unroll
        for (u32 half = 0; half < 2u; half++) p_round_pair<DIRECT>(p[n][2u * half], p[n][2u * half + 1u], mul[half], mul[half]);
    float m2[2] = {pmax[0], pmax[1]};
    p_round_pair<DIRECT>(m2[0], m2[1], mul[0], mul[1]);
    u32 c2 = DIRECT ? direct_scale_codes(m2[0], m2[1], inv_g) : scale_code_pair(f2u(m2[0]), f2u(m2[1]));
    float scale[4];
    if (!DIRECT) e4m3x4_values(c2, scale);
#pragma unroll
    for (u32 half = 0; half < 2u; half++) {
        BlockScale bs = block_scale<DIRECT>((c2 >> (8u * half)) & 0xffu, scale[half], fold[half]);
#pragma unroll
        for (u32 n = 0; n < NT_S; n++) pk[n][half] = p_quant_pair<DIRECT>(p[n][2u * half], p[n][2u * half + 1u], bs);
    }
#else
    // Block j = 2·blk + half: keys 16·blk.., row g + 8·half; element i of it is p[2blk + i/2][2half + i%2].
    u32 amax[8];
#pragma unroll
    for (u32 j = 0; j < 8u; j++) {
        u32 blk = j / 2u, half = j % 2u;
        amax[j] = 0u;
#pragma unroll
        for (u32 n = 2u * blk; n < 2u * blk + 2u; n++) p_block_pair<DIRECT>(p[n][2u * half], p[n][2u * half + 1u], mul[half], amax[j]);
    }
    // Reduce-scatter: after the xor-1 step a thread holds 4 blocks (odd lanes 4-7), after xor-2 2.
    u32 t = threadIdx.x % 4u;
    bool odd = t & 1u, upper = t & 2u;
    u32 r1[4], r2[2];
#pragma unroll
    for (u32 i = 0; i < 4u; i++) {
        u32 give = odd ? amax[i] : amax[4u + i], keep = odd ? amax[4u + i] : amax[i];
        r1[i] = max(keep, __shfl_xor_sync(0xffffffffu, give, 1));
    }
#pragma unroll
    for (u32 i = 0; i < 2u; i++) {
        u32 give = upper ? r1[i] : r1[2u + i], keep = upper ? r1[2u + i] : r1[i];
        r2[i] = max(keep, __shfl_xor_sync(0xffffffffu, give, 2));
    }
    // This thread's codes: blocks 4·odd + 2·upper + {0, 1}. All-gather them as bytes.
    u32 c2 = DIRECT ? direct_scale_codes(u2f(r2[0]), u2f(r2[1]), inv_g) : scale_code_pair(r2[0], r2[1]);
    u32 other = __shfl_xor_sync(0xffffffffu, c2, 2);
    u32 c4 = upper ? (other | (c2 << 16)) : (c2 | (other << 16));  // blocks 4·odd + 0..3
    other = __shfl_xor_sync(0xffffffffu, c4, 1);
    u32 codes[2] = {odd ? other : c4, odd ? c4 : other};  // byte j % 4 of codes[j / 4]: block j
    float scale[8];
    if (!DIRECT) {
        e4m3x4_values(codes[0], *(float(*)[4])&scale[0]);
        e4m3x4_values(codes[1], *(float(*)[4])&scale[4]);
    }
#pragma unroll
    for (u32 j = 0; j < 8u; j++) {
        u32 blk = j / 2u, half = j % 2u;
        BlockScale bs = block_scale<DIRECT>((codes[j / 4u] >> (8u * (j % 4u))) & 0xffu, scale[j], fold[half]);
#pragma unroll
        for (u32 n = 2u * blk; n < 2u * blk + 2u; n++) pk[n][half] = p_quant_pair<DIRECT>(p[n][2u * half], p[n][2u * half + 1u], bs);
    }
#endif
}

// Test probe (tests/cuda.rs): per i, the P·V operand value the kernel gives for (a[i], s[i])
// (f16 pair path, read back exactly), the scale code scale_code_pair gives a block whose max
// is a[i] (as bits; bits 8-15: direct_scale_codes' for a block whose largest p is a[i], with
// `inv_g`), and the DIRECT path's value for p = a[i] with `inv_g` (in the module's
// P·V type: f16, or bf16 when built for bf16).
extern "C" __global__ void probe_p_nvfp4(const float* a, const float* s, float* out, u32* codes, float* direct, float inv_g, u32 n) {
    direct_table_fill(inv_g);
    __syncthreads();
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float r = scale_rcp(s[i]), v = e2m1_unsaturated(a[i], s[i], r);
    u32 s2 = pack16<false>(s[i], s[i]);
    out[i] = cvt_f16(e2m1_pair_times_scale<false>(v, v, s2) & 0xffffu);
    codes[i] = (scale_code_pair(f2u(a[i]), 0u) & 0xffu) | (direct_scale_codes(a[i], 0.0f, inv_g) & 0xffu) << 8u;
    // s[i] is an E4M3 value: its code is exact (sm_89+ in hardware, else the software quantizer).
    uint2 e = direct_tab[e4m3x2_codes(s[i], 0.0f) & 0x7fu];  // s[i]: an E4M3 value, its code exact
    float d = __fmul_rn(a[i], u2f(e.x));
    u32 pair = e2m1_direct_pair(d, d, e.y);  // the module's P·V type
    direct[i] = (PV_BF16 ? u2f(pair << 16) : cvt_f16(pair & 0xffffu)) * direct_unscale();
}

// The tile's P (unnormalised probabilities of one m-tile) as the A fragments of the P·V mma,
// in the recipe's format divided by the constant factor applied at the end (the Nvfp4 recipe's:
// times its rows' tile factors, `fold`).
__device__ __forceinline__ void p_fragments(const Params& P, float (&p)[NT_S][4], u32 (&pa)[BK / 16u][4], const float (&row_mul)[2],
                                            const u32 (&fold)[2], const float (&pmax)[2]) {
    if (RECIPE == R_NVFP4P || RECIPE == R_NVFP4) {
        u32 pk[NT_S][2];
        if (p_direct(P))
            p_nvfp4<true>(p, row_mul, fold, pmax, pk);
        else
            p_nvfp4<false>(p, row_mul, fold, pmax, pk);
#pragma unroll
        for (u32 kk = 0; kk < BK / 16u; kk++)
#pragma unroll
            for (u32 r = 0; r < 4u; r++) pa[kk][r] = pk[2u * kk + r / 2u][r % 2u];
        return;
    }
#if PV_FP8
    // E4M3 codes, 32 keys per P·V step; register r of step kk is row g + 8(r%2) of the 16-key
    // chunk c = 2kk + r/2, bytes (keys 2t, 2t+1 of n-tile 2c, keys 2t, 2t+1 of n-tile 2c+1):
    // stmatrix puts them at bytes 4t..4t+3 of the chunk's row, so P's key order within a chunk
    // is 0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15, and Vᵀ's keys are stored in that order
    // (v_fp8_transpose).
#pragma unroll
    for (u32 kk = 0; kk < PV_STEPS; kk++)
#pragma unroll
        for (u32 r = 0; r < 4u; r++) {
            u32 c = 2u * kk + r / 2u, i = r % 2u;
            pa[kk][r] = e4m3x2_codes(p[2u * c][2u * i], p[2u * c][2u * i + 1u]) |
                        (e4m3x2_codes(p[2u * c + 1u][2u * i], p[2u * c + 1u][2u * i + 1u]) << 16);  // p: mul·p (P_FOLD)
        }
    return;
#endif
#pragma unroll
    for (u32 kk = 0; kk < BK / 16u; kk++)
#pragma unroll
        for (u32 r = 0; r < 4u; r++) {
            // r: (row g, keys 2t..) (row g+8) of n-tile 2kk, then the same of n-tile 2kk+1.
            float lo = p[2u * kk + r / 2u][2u * (r % 2u)], hi = p[2u * kk + r / 2u][2u * (r % 2u) + 1u];
            if (P_FOLD)
                pa[kk][r] = e4m3_pair<PV_BF16>(lo, hi);  // mul·p already
            else {
                // Exact, Int8QkF16Pv: RNE to the 16-bit type (NVFP4: exact). With V → NVFP4 the
                // product runs in f16 even for bf16 inputs, but P is still the input dtype's:
                // rounded to bf16 first (then exact in f16 down to 2^-17; below, p is < 2^-17
                // of the row max and a second rounding is far inside the tolerance).
                if (VNV && BF16 && (RECIPE == R_EXACT || RECIPE == R_INT8_F16)) round_dtype_pair(lo, hi);
                pa[kk][r] = pack16<PV_BF16>(lo, hi);
            }
        }
}

__device__ __forceinline__ float p_factor(const Params& P) {
    if (RECIPE == R_NVFP4P) return (P.flags & FLAG_P_DIRECT) ? P.g * direct_unscale() : P.g;
    if (RECIPE == R_NVFP4) return direct_unscale() / 2688.0f;
    return 1.0f;  // (P_FOLD: the row sums carry the multiplier)
}
