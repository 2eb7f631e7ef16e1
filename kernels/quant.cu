// quant.cu: the quantizers of Q, K and V (twins of src/numerics/quant.rs and
// shaders/quant.wgsl), writing codes and scales into the workspace `ws` at the offsets in
// Params, with the same layouts. Also the f32 → f16/bf16 output pack.

#define MODE_Q 0u
#define MODE_K 1u

__device__ __forceinline__ u32 linear_id() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u32 heads_of_mode(const Params& P) { return P.mode == MODE_Q ? P.heads_q : P.heads_kv; }

// The value a Q/K quantizer sees: q · sm_scale · log2(e), or k − mean(k) when smoothing.
__device__ __forceinline__ float qk_value(const Params& P, const void* src, const u32* ws, u32 bh, u32 t, u32 c) {
    u32 heads = heads_of_mode(P);
    u32 b = bh / heads, h = bh % heads;
    if (P.mode == MODE_Q) return ftz(__fmul_rn(load_elem(src, b * P.q_sb + h * P.q_sh + t * P.q_st + c, P.dtype), P.fold));
    float x = load_elem(src, b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c, P.dtype);
    if (P.flags & FLAG_SMOOTH) return ftz(__fsub_rn(x, u2f(ws[P.off_kmean + bh * P.head_dim + c])));
    return x;
}

// The K mean in two passes (the CPU's order, in parallel): each 64-token block's sum per channel,
// partials [b·hk][block][d]; then the partials in block order, divided by N.
#define MEAN_BLOCK 64u

extern "C" __global__ void k_block_sums(Params P, const void* src, u32* ws) {
    u32 id = linear_id();
    u32 nb = (P.seq_kv + MEAN_BLOCK - 1u) / MEAN_BLOCK;
    if (id >= P.batch * P.heads_kv * nb * P.head_dim) return;
    u32 c = id % P.head_dim, blk = (id / P.head_dim) % nb, bh = id / P.head_dim / nb;
    u32 b = bh / P.heads_kv, h = bh % P.heads_kv;
    u32 t_end = min(blk * MEAN_BLOCK + MEAN_BLOCK, P.seq_kv);
    float sum = 0.0f;
    // Unrolled so that the loads are in flight together (the adds stay in token order): one
    // load at a time had made this pass latency-bound (~100 µs at N = 16384).
    const u32 row0 = b * P.kv_sb + h * P.kv_sh + c;
    u32 t = blk * MEAN_BLOCK;
    if (t_end - t == MEAN_BLOCK && P.dtype != DT_F32) {
        const unsigned short* s16 = (const unsigned short*)src + row0 + t * P.kv_st;
        u32 bits[MEAN_BLOCK];
#pragma unroll
        for (u32 i = 0; i < MEAN_BLOCK; i++) bits[i] = s16[i * P.kv_st];
#pragma unroll
        for (u32 i = 0; i < MEAN_BLOCK; i++)
            sum = __fadd_rn(sum, P.dtype == DT_F16 ? cvt_f16(bits[i]) : ftz(u2f(bits[i] << 16)));  // = load_elem
    } else {
        for (; t < t_end; t++) sum = __fadd_rn(sum, load_elem(src, row0 + t * P.kv_st, P.dtype));
    }
    ws[P.off_kpart + id] = f2u(sum);
}

extern "C" __global__ void k_mean(Params P, const void* src, u32* ws) {
    u32 id = linear_id();
    if (id >= P.batch * P.heads_kv * P.head_dim) return;
    u32 bh = id / P.head_dim, c = id % P.head_dim;
    u32 nb = (P.seq_kv + MEAN_BLOCK - 1u) / MEAN_BLOCK;
    // The adds run in block order (the definition); the loads go 32 at a time, so that the
    // pass waits for memory nb / 32 times instead of nb / 8.
    float sum = 0.0f;
    const u32* part = ws + P.off_kpart + bh * nb * P.head_dim + c;
    u32 blk = 0;
    for (; blk + 32u <= nb; blk += 32u) {
        u32 x[32];
#pragma unroll
        for (u32 i = 0; i < 32u; i++) x[i] = part[(blk + i) * P.head_dim];
#pragma unroll
        for (u32 i = 0; i < 32u; i++) sum = __fadd_rn(sum, u2f(x[i]));
    }
    for (; blk < nb; blk++) sum = __fadd_rn(sum, u2f(part[blk * P.head_dim]));
    ws[P.off_kmean + id] = f2u(ftz(div_rn(sum, (float)P.seq_kv)));
}

// One warp per query row (the host launches 256 threads = 8 rows per block): lanes take every
// 32nd channel, coalesced, then a fixed shuffle tree. The shift only enters the LSE, so its
// summation order is free (the CPU sums in f64; the error is f32 rounding either way).
extern "C" __global__ void q_delta(Params P, const void* src, u32* ws) {
    u32 id = blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u, lane = threadIdx.x % 32u;
    if (id >= P.batch * P.heads_q * P.seq_q) return;  // uniform across the warp
    u32 bh = id / P.seq_q, i = id % P.seq_q;
    u32 bkv = (bh / P.heads_q) * P.heads_kv + (bh % P.heads_q) / P.group;
    u32 row = (bh / P.heads_q) * P.q_sb + (bh % P.heads_q) * P.q_sh + i * P.q_st;
    const u32* mean = ws + P.off_kmean + bkv * P.head_dim;
    float d = 0.0f;
    for (u32 c = lane; c < P.head_dim; c += 32u) d += ftz(__fmul_rn(load_elem(src, row + c, P.dtype), P.fold)) * u2f(mean[c]);
    for (u32 o = 16u; o > 0u; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    if (lane == 0u) ws[P.off_qdelta + id] = f2u(d);
}

#define QK_CHUNKS 8u

// A group's amax (over bit patterns: order-free) → its scale, written to the workspace by the
// group's first thread (if `live`); returns 127/amax (0 for a zero, tiny or non-finite group,
// whose codes are all 0). The group is held by `tpg` threads (a power of two; the block holds
// blockDim.x / tpg groups side by side): a shuffle tree, plus shared memory across the warps
// of a group when it spans several (then every thread of the block must call this, and
// `red` is free again only after a later barrier).
__device__ __forceinline__ float group_scale(const Params& P, u32* ws, u32* red, u32 amax, bool is_q, u32 slot, u32 tpg, bool live) {
    u32 lid = threadIdx.x;
#pragma unroll
    for (u32 o = 16u; o > 0u; o >>= 1)
        if (o < tpg) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (tpg > 32u) {
        if (lid % 32u == 0u) red[lid / 32u] = amax;
        __syncthreads();
        u32 w0 = (lid / tpg) * (tpg / 32u);
        for (u32 w = 0; w < tpg / 32u; w++) amax = max(amax, red[w0 + w]);
    }
    float inv = 0.0f;
    if (!non_finite(amax) && amax >= TINY_BITS) inv = div_rn(127.0f, u2f(amax));
    if (live && lid % tpg == 0u) {
        float scale = non_finite(amax) ? f32_nan() : amax >= TINY_BITS ? div_rn(u2f(amax), 127.0f) : 0.0f;
        ws[(is_q ? P.off_qscales : P.off_kscales) + slot] = f2u(scale);
    }
    return inv;
}

// f32 multiply / subtract with subnormal results flushed (= ftz(__fmul_rn(a, b)) and
// ftz(__fsub_rn(a, b)) for normal or zero inputs, in one instruction).
__device__ __forceinline__ float mul_ftz(float a, float b) {
    float y;
    asm("mul.rn.ftz.f32 %0, %1, %2;\n" : "=f"(y) : "f"(a), "f"(b));
    return y;
}
__device__ __forceinline__ float sub_ftz(float a, float b) {
    float y;
    asm("sub.rn.ftz.f32 %0, %1, %2;\n" : "=f"(y) : "f"(a), "f"(b));
    return y;
}

// Four values y (finite, |y| ≤ 127·(1 + 2^-23)², as x·(127/amax) rounded twice is for |x| ≤
// amax) → int8_round's codes as the bytes of one word: half away from zero is trunc(y ± 0.5)
// with the add rounded toward zero (the integer below the exact |y| + 0.5 is an f32, so
// rounding toward zero cannot pass it, where a round-to-nearest add would lift 0.5 − 2^-25 to
// 1); an f32 → s32 conversion truncates, and the pack saturates to ±127 (never reached: |y| +
// 0.5 < 128). No float min, no sign copy, no magic-number add: three instructions and a half
// per value instead of about six.
__device__ __forceinline__ i32 int8_trunc_half_away(float y) {
    float w = __fadd_rz(y, copysignf(0.5f, y));
    i32 n;
    asm("cvt.rzi.s32.f32 %0, %1;\n" : "=r"(n) : "f"(w));
    return n;
}
__device__ __forceinline__ u32 int8_bytes4(const float (&y)[4]) {
    u32 lo, w;
    // cvt.pack.sat.s8.s32.b32 d, a, b, c: d = c << 16 | sat(a) << 8 | sat(b) (bytes).
    asm("cvt.pack.sat.s8.s32.b32 %0, %1, %2, 0;\n" : "=r"(lo) : "r"(int8_trunc_half_away(y[3])), "r"(int8_trunc_half_away(y[2])));
    asm("cvt.pack.sat.s8.s32.b32 %0, %1, %2, %3;\n" : "=r"(w) : "r"(int8_trunc_half_away(y[1])), "r"(int8_trunc_half_away(y[0])), "r"(lo));
    return w;
}

// Q's LSE shift sm_scale·q·mean(K) (q_delta's value, any summation order: it only enters the
// LSE) for rows [t0, t0 + per·inter) of one group, a warp per row.
__device__ __forceinline__ void q_delta_rows(const Params& P, const void* src, u32* ws, u32 bh, u32 t0, u32 per, u32 inter) {
    u32 lane = threadIdx.x % 32u;
    u32 bkv = (bh / P.heads_q) * P.heads_kv + (bh % P.heads_q) / P.group;
    const u32* mean = ws + P.off_kmean + bkv * P.head_dim;
    for (u32 r = threadIdx.x / 32u; r < per; r += blockDim.x / 32u) {
        u32 t = t0 + r * inter;
        if (t >= P.seq_q) continue;  // uniform across the warp
        u32 row = (bh / P.heads_q) * P.q_sb + (bh % P.heads_q) * P.q_sh + t * P.q_st;
        float d = 0.0f;
        for (u32 c = lane; c < P.head_dim; c += 32u) d = fmaf(mul_ftz(load_elem(src, row + c, P.dtype), P.fold), u2f(mean[c]), d);
        for (u32 o = 16u; o > 0u; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (lane == 0u) ws[P.off_qdelta + bh * P.seq_q + t] = f2u(d);
    }
}

// int8_qk's fast path (see there): each chunk loaded once, coalesced, kept in registers for
// both passes. IS_Q: values q·fold (and, SMOOTH, Q's LSE shift q·mean(K)); else k, minus mean(K)
// when SMOOTH. F16: f16 input (else bf16). The same values and codes as the general path.
// The group is held by `tpg` threads (this thread is lid of them); a group past the end
// (!live) loads and stores nothing but joins the shuffles and barriers.
template <bool IS_Q, bool F16, bool SMOOTH>
__device__ __forceinline__ void int8_qk_chunks(const Params& P, const unsigned short* src, u32* ws, u32* red, u32 bh, u32 g, u32 t0,
                                               u32 per, u32 inter, u32 n, u32 tstride, const u32* mean, u32 lid, u32 tpg, bool live) {
    u32 nthreads = tpg;
    u32 cpr = P.head_dim / 8u, dw = P.dp / 4u;
    u32 c0 = (lid & (cpr - 1u)) * 8u;  // this thread's channels, in every chunk it holds
    // Chunk i of this thread is row r0 + i·rstep of the group (cpr, a power of two, divides
    // the block): shifts, not divisions.
    u32 cshift = __ffs(cpr) - 1u, r0 = lid >> cshift, rstep = nthreads >> cshift;
    float mu[8];
#pragma unroll
    for (u32 k = 0; k < 8u; k++) mu[k] = SMOOTH ? u2f(mean[c0 + k]) : 0.0f;
    auto value16 = [&](u32 bits, u32 k) -> float {
        float x = F16 ? cvt_f16(bits) : ftz(u2f(bits << 16));
        if (IS_Q) return mul_ftz(x, P.fold);
        return SMOOTH ? sub_ftz(x, mu[k]) : x;
    };
    uint4 buf[QK_CHUNKS];
    u32 amax = 0u, amax16 = 0u;  // Q: the max of |q| as raw 16-bit pairs (see below)
#pragma unroll
    for (u32 i = 0; i < QK_CHUNKS; i++) {
        u32 r = r0 + i * rstep, t = t0 + r * inter;
        buf[i] = make_uint4(0u, 0u, 0u, 0u);
        if (live && r < per && t < n) buf[i] = *(const uint4*)(src + t * tstride + c0);
    }
#pragma unroll
    for (u32 i = 0; i < QK_CHUNKS; i++) {
        u32 r = r0 + i * rstep, t = t0 + r * inter;
        const u32 w[4] = {buf[i].x, buf[i].y, buf[i].z, buf[i].w};
        bool in = live && r < per && t < n;  // (a zero chunk past the end is not 0 once smoothed)
        if (IS_Q) {
            // |q|·fold rounded (and flushed) is monotone in |q|, and |q|'s order is its bits'
            // (a NaN's above ∞'s, as in abs_bits): the max of the values is the value of the
            // max of the magnitudes' bits, taken two per instruction and scaled once below.
            u32 m2 = __vmaxu2(__vmaxu2(w[0] & 0x7fff7fffu, w[1] & 0x7fff7fffu), __vmaxu2(w[2] & 0x7fff7fffu, w[3] & 0x7fff7fffu));
            if (in) amax16 = __vmaxu2(amax16, m2);
        } else {
            u32 m = 0u;
#pragma unroll
            for (u32 k = 0; k < 8u; k++) m = max(m, abs_bits(value16((w[k / 2u] >> (16u * (k % 2u))) & 0xffffu, k)));
            if (in) amax = max(amax, m);
        }
        float d = 0.0f;
        if (IS_Q && SMOOTH) {
#pragma unroll
            for (u32 k = 0; k < 8u; k++) d = fmaf(value16((w[k / 2u] >> (16u * (k % 2u))) & 0xffffu, k), mu[k], d);
        }
        if (IS_Q && SMOOTH && i * rstep < per) {  // uniform across the block (all groups alike)
#pragma unroll
            for (u32 o = 16u; o > 0u; o >>= 1)
                if (o < cpr) d += __shfl_xor_sync(0xffffffffu, d, o);
            if ((lid & (cpr - 1u)) == 0u && in) ws[P.off_qdelta + bh * P.seq_q + t] = f2u(d);
        }
    }
    if (IS_Q) amax = abs_bits(value16(max(amax16 & 0xffffu, amax16 >> 16), 0u));
    float inv = group_scale(P, ws, red, amax, IS_Q, g, tpg, live);
    u32 off = IS_Q ? P.off_qcodes : P.off_kcodes;
#pragma unroll
    for (u32 i = 0; i < QK_CHUNKS; i++) {
        u32 r = r0 + i * rstep, t = t0 + r * inter;
        if (live && r < per && t < n) {
            u32 w[4] = {buf[i].x, buf[i].y, buf[i].z, buf[i].w};
            // Recompute the values from the raw chunk: kept from the first pass they would be
            // 64 live floats (spills) instead of 32 words.
#pragma unroll
            for (u32 k = 0; k < 4u; k++) asm volatile("" : "+r"(w[k]));
            u32 codes[2];
#pragma unroll
            for (u32 h = 0; h < 2u; h++) {
                float y[4];
#pragma unroll
                for (u32 k = 0; k < 4u; k++) {
                    u32 c = 4u * h + k;
                    y[k] = mul_ftz(value16((w[c / 2u] >> (16u * (c % 2u))) & 0xffffu, c), inv);
                }
                codes[h] = int8_bytes4(y);
            }
            // A zero, tiny or non-finite group (inv = 0) has zero codes: x·0 is ±0 for finite x.
            if (!(inv > 0.0f)) codes[0] = codes[1] = 0u;
            *(uint2*)(ws + off + (bh * n + t) * dw + c0 / 4u) = make_uint2(codes[0], codes[1]);
        }
    }
    // Codes of the padded channels (head_dim..dp) are zero.
    u32 padw = dw - P.head_dim / 4u;
    for (u32 e = lid; live && e < per * padw; e += nthreads) {
        u32 t = t0 + (e / padw) * inter;
        if (t < n) ws[off + (bh * n + t) * dw + P.head_dim / 4u + e % padw] = 0u;
    }
}

// INT8 Q or K. A block of 256 threads quantizes P.count groups of tokens (the host's choice,
// int8_groups_per_block: small groups, e.g. SageAttention 2's per-warp 32 queries, would leave
// most of a block idle behind two barriers); amax is a max over bit patterns, so the reduction
// order does not matter. With K smoothing the Q pass also writes Q's LSE shift (q_delta's
// job, done here while Q is in registers), unless the host clears FLAG_SMOOTH for it (no LSE
// asked for: nothing reads the shift).
extern "C" __global__ void __launch_bounds__(256, 3) int8_qk(Params P, const void* src, u32* ws) {
    __shared__ u32 red[32];
    u32 lid = threadIdx.x, nthreads = blockDim.x;
    bool is_q = P.mode == MODE_Q;
    u32 n = is_q ? P.seq_q : P.seq_kv;
    u32 block = is_q ? P.q_gblock : P.k_gblock, inter = is_q ? P.q_ginter : P.k_ginter;
    u32 ng = group_count(n, block, inter);
    u32 heads = heads_of_mode(P), total = heads * P.batch * ng;
    u32 gpb = max(P.count, 1u), tpg = nthreads / gpb;
    u32 per = block / inter, dw = P.dp / 4u;
    u32 tstride = is_q ? P.q_st : P.kv_st;
    bool smooth = !is_q && (P.flags & FLAG_SMOOTH);
    bool shift = is_q && (P.flags & FLAG_SMOOTH);  // write Q's LSE shift
    // Fast path: 16-bit inputs whose rows are whole 16-byte chunks (8 channels), a group that
    // fits QK_CHUNKS chunks per thread of its tpg, and a row's chunks on a power-of-two run of
    // lanes within the group's (so each thread always holds the same 8 channels):
    // int8_qk_chunks, specialised on Q/K, f16/bf16 and smoothing. (Every head's base offset is
    // a multiple of 8 elements when both head strides are.)
    u32 cpr = P.head_dim / 8u, nchunks = per * cpr;
    u32 sb = is_q ? P.q_sb : P.kv_sb, sh = is_q ? P.q_sh : P.kv_sh;
    bool fast = P.dtype != DT_F32 && P.head_dim % 8u == 0u && sb % 8u == 0u && sh % 8u == 0u && tstride % 8u == 0u &&
                ((size_t)src & 15u) == 0u && nchunks <= QK_CHUNKS * tpg && cpr <= 32u && (cpr & (cpr - 1u)) == 0u &&
                cpr <= tpg && (tpg & (tpg - 1u)) == 0u && tpg * gpb == nthreads;
    if (fast) {
        u32 wg = blockIdx.x * gpb + lid / tpg;
        bool live = wg < total;
        u32 gw = live ? wg : 0u, bh = gw / ng, gi = gw % ng;
        u32 t0 = (gi / inter) * block + gi % inter;
        u32 b = bh / heads, h = bh % heads;
        u32 bkv = is_q ? (bh / P.heads_q) * P.heads_kv + (bh % P.heads_q) / P.group : bh;
        const u32* mean = ws + P.off_kmean + bkv * P.head_dim;
        const unsigned short* s16 = (const unsigned short*)src + (b * sb + h * sh);
        bool f16 = P.dtype == DT_F16, smoothing = (P.flags & FLAG_SMOOTH) != 0u;
        u32 l = lid % tpg;
#define INT8_QK_CASE(Q, F, S) int8_qk_chunks<Q, F, S>(P, s16, ws, red, bh, gw, t0, per, inter, n, tstride, mean, l, tpg, live)
        switch ((is_q ? 4u : 0u) | (f16 ? 2u : 0u) | (smoothing ? 1u : 0u)) {
            case 0u: INT8_QK_CASE(false, false, false); break;
            case 1u: INT8_QK_CASE(false, false, true); break;
            case 2u: INT8_QK_CASE(false, true, false); break;
            case 3u: INT8_QK_CASE(false, true, true); break;
            case 4u: INT8_QK_CASE(true, false, false); break;
            case 5u: INT8_QK_CASE(true, false, true); break;
            case 6u: INT8_QK_CASE(true, true, false); break;
            default: INT8_QK_CASE(true, true, true); break;
        }
#undef INT8_QK_CASE
        return;
    }
    // General path: the block's groups one after another, each by the whole block.
    for (u32 k = 0; k < gpb; k++) {
        u32 wg = blockIdx.x * gpb + k;
        if (wg >= total) return;  // uniform across the block
        u32 bh = wg / ng, gi = wg % ng;
        u32 t0 = (gi / inter) * block + gi % inter;
        u32 b = bh / heads, h = bh % heads;
        u32 base = b * sb + h * sh;
        u32 bkv = is_q ? (bh / P.heads_q) * P.heads_kv + (bh % P.heads_q) / P.group : bh;
        const u32* mean = ws + P.off_kmean + bkv * P.head_dim;
        auto value = [&](u32 t, u32 c) -> float {  // qk_value, with the index arithmetic hoisted
            float x = load_elem(src, base + t * tstride + c, P.dtype);
            if (is_q) return ftz(__fmul_rn(x, P.fold));
            return smooth ? ftz(__fsub_rn(x, u2f(mean[c]))) : x;
        };
        u32 amax = 0u;
        for (u32 e = lid; e < per * P.head_dim; e += nthreads) {
            u32 t = t0 + (e / P.head_dim) * inter;
            if (t < n) amax = max(amax, abs_bits(value(t, e % P.head_dim)));
        }
        float inv = group_scale(P, ws, red, amax, is_q, wg, nthreads, true);
        bool finite = inv > 0.0f;
        u32 off = is_q ? P.off_qcodes : P.off_kcodes;
        for (u32 e = lid; e < per * dw; e += nthreads) {
            u32 t = t0 + (e / dw) * inter;
            if (t >= n) continue;
            u32 w = e % dw, word = 0u;
            for (u32 kk = 0; kk < 4u; kk++) {
                u32 c = w * 4u + kk;
                if (c < P.head_dim && finite) word |= ((u32)int8_round(__fmul_rn(value(t, c), inv)) & 0xffu) << (8u * kk);
            }
            ws[off + (bh * n + t) * dw + w] = word;
        }
        if (shift) q_delta_rows(P, src, ws, bh, t0, per, inter);
        __syncthreads();  // `red` is reused by the next group
    }
}

// FP8 V scale per channel (the step quant_steps calls fp8_v_scale; WGSL walks each channel's
// tokens in one thread), here in two steps since max is order-free and the bits the same:
// per (b·hk, 64-token block, channel) a partial amax, atomically maxed into vinv (zeroed by the
// host); then fp8_v_scale_from_amax turns it into the scale and its inverse.
extern "C" __global__ void fp8_v_amax(Params P, const void* src, u32* ws) {
    u32 id = linear_id();
    u32 nb = (P.seq_kv + 63u) / 64u;
    if (id >= P.batch * P.heads_kv * nb * P.head_dim) return;
    u32 c = id % P.head_dim, blk = (id / P.head_dim) % nb, bh = id / P.head_dim / nb;
    u32 b = bh / P.heads_kv, h = bh % P.heads_kv;
    u32 amax = 0u, t_end = min(blk * 64u + 64u, P.seq_kv);
    for (u32 t = blk * 64u; t < t_end; t++) amax = max(amax, abs_bits(load_elem(src, b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c, P.dtype)));
    atomicMax(ws + P.off_vinv + bh * P.dp + c, amax);
}

extern "C" __global__ void fp8_v_scale_from_amax(Params P, const void* src, u32* ws) {
    u32 id = linear_id();
    if (id >= P.batch * P.heads_kv * P.dp) return;
    u32 amax = ws[P.off_vinv + id];
    float inv = 0.0f, scale = 0.0f;
    if (non_finite(amax)) scale = f32_nan();
    else if (amax >= TINY_BITS) { inv = div_rn(448.0f, u2f(amax)); scale = div_rn(u2f(amax), 448.0f); }
    ws[P.off_vscales + id] = f2u(scale);
    ws[P.off_vinv + id] = f2u(inv);
}

extern "C" __global__ void fp8_v_codes(Params P, const void* src, u32* ws) {
    u32 id = linear_id();
    u32 dw = P.dp / 4u;
    if (id >= P.batch * P.heads_kv * P.seq_kv * dw) return;
    u32 w = id % dw, row = id / dw;
    u32 t = row % P.seq_kv, bh = row / P.seq_kv;
    u32 b = bh / P.heads_kv, h = bh % P.heads_kv;
    u32 word = 0u;
    for (u32 k = 0; k < 4u; k++) {
        u32 c = w * 4u + k;
        if (c < P.head_dim) {
            float scale = u2f(ws[P.off_vscales + bh * P.dp + c]);
            if (scale > 0.0f) {
                float x = load_elem(src, b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c, P.dtype);
                word |= e4m3_from_f32(__fmul_rn(x, u2f(ws[P.off_vinv + bh * P.dp + c]))) << (8u * k);
            }
        }
    }
    ws[P.off_vcodes + id] = word;
}

// fp8_v_amax and fp8_v_codes for 16-bit V whose rows are whole 16-byte chunks (8 channels;
// the host checks strides and alignment): a thread takes one chunk of consecutive tokens,
// 16-byte loads, its 8 channels' factors loaded once. Same bits as the general kernels.
#define V_AMAX_ROWS 8u  // tokens per thread of fp8_v_amax_chunks
#define V_CODE_ROWS 4u
#define COPY_ONLY 1u  // P.count of the passes that write an f16 copy: skip the codes
__device__ __forceinline__ void chunk_values(uint4 x, bool f16, float (&v)[8]) {
    const u32 w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (u32 k = 0; k < 8u; k++) {
        u32 bits = (w[k / 2u] >> (16u * (k % 2u))) & 0xffffu;
        v[k] = f16 ? cvt_f16(bits) : ftz(u2f(bits << 16));
    }
}

// fp8_v_amax_chunks: a 256-thread block takes V_AMAX_ROWS·(256 / chunks per row) tokens
// of one head, each thread V_AMAX_ROWS tokens of one 8-channel chunk (all its loads in flight
// at once); the block's maxima meet in shared memory, then one global atomic per channel.
// (Was a thread per 64 tokens × chunk, 8 dependent rounds of loads and 8 global atomics per
// thread: 384 blocks at N = 4096, 8% occupancy, 44 µs under ncu.)
#define V_AMAX_BLOCK 256u
extern "C" __global__ void __launch_bounds__(V_AMAX_BLOCK) fp8_v_amax_chunks(Params P, const void* src, u32* ws) {
    __shared__ u32 red[256];  // head_dim ≤ 256 (the host's condition)
    u32 cpr = P.head_dim / 8u, groups = V_AMAX_BLOCK / cpr, tokens = groups * V_AMAX_ROWS;
    u32 nb = (P.seq_kv + tokens - 1u) / tokens, bh = blockIdx.x / nb, blk = blockIdx.x % nb;
    for (u32 c = threadIdx.x; c < P.head_dim; c += V_AMAX_BLOCK) red[c] = 0u;
    __syncthreads();
    u32 ch = threadIdx.x % cpr, grp = threadIdx.x / cpr, t0 = blk * tokens + grp * V_AMAX_ROWS;
    if (grp < groups && t0 < P.seq_kv) {
        u32 b = bh / P.heads_kv, h = bh % P.heads_kv, rows = min(V_AMAX_ROWS, P.seq_kv - t0);
        const unsigned short* row = (const unsigned short*)src + b * P.kv_sb + h * P.kv_sh + ch * 8u;
        uint4 x[V_AMAX_ROWS];
#pragma unroll
        for (u32 i = 0; i < V_AMAX_ROWS; i++) x[i] = i < rows ? *(const uint4*)(row + (t0 + i) * P.kv_st) : make_uint4(0u, 0u, 0u, 0u);
        u32 amax[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
#pragma unroll
        for (u32 i = 0; i < V_AMAX_ROWS; i++) {
            float v[8];
            chunk_values(x[i], P.dtype == DT_F16, v);
#pragma unroll
            for (u32 k = 0; k < 8u; k++) amax[k] = max(amax[k], abs_bits(v[k]));
        }
#pragma unroll
        for (u32 k = 0; k < 8u; k++) atomicMax(red + ch * 8u + k, amax[k]);
    }
    __syncthreads();
    for (u32 c = threadIdx.x; c < P.head_dim; c += V_AMAX_BLOCK) atomicMax(ws + P.off_vinv + bh * P.dp + c, red[c]);
}

// `v16` (null: none): also the codes' f16 values, rows [b·hk][seq_kv][dp] (exact), which the
// tensor-core kernel reads when it multiplies P·V in f16 (else a separate v_fp8_to_f16 pass).
// P.count = 1 (COPY_ONLY, the attention path with a copy): the codes are not stored, as
// nothing reads them then.
extern "C" __global__ void fp8_v_codes_chunks(Params P, const void* src, u32* ws, unsigned short* v16) {
    u32 id = linear_id();
    u32 cpr = P.dp / 8u, nrb = (P.seq_kv + V_CODE_ROWS - 1u) / V_CODE_ROWS;
    if (id >= P.batch * P.heads_kv * nrb * cpr) return;
    u32 ch = id % cpr, rb = (id / cpr) % nrb, bh = id / cpr / nrb;
    u32 b = bh / P.heads_kv, h = bh % P.heads_kv, c0 = ch * 8u;
    // A channel with a zero or NaN scale (inv = 0) has zero codes; padded channels too.
    float inv[8];
    u32 keep[2] = {0u, 0u};
#pragma unroll
    for (u32 k = 0; k < 8u; k++) {
        inv[k] = c0 + k < P.head_dim ? u2f(ws[P.off_vinv + bh * P.dp + c0 + k]) : 0.0f;
        if (inv[k] > 0.0f) keep[k / 4u] |= 0xffu << (8u * (k % 4u));
    }
    const unsigned short* row = (const unsigned short*)src + b * P.kv_sb + h * P.kv_sh + c0;
#pragma unroll
    for (u32 r = 0; r < V_CODE_ROWS; r++) {
        u32 t = rb * V_CODE_ROWS + r;
        if (t >= P.seq_kv) break;
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (c0 < P.head_dim) chunk_values(*(const uint4*)(row + t * P.kv_st), P.dtype == DT_F16, v);
        u32 codes[2];
#pragma unroll
        for (u32 k = 0; k < 2u; k++)
            codes[k] = (e4m3x2_codes(__fmul_rn(v[4u * k], inv[4u * k]), __fmul_rn(v[4u * k + 1u], inv[4u * k + 1u])) |
                        (e4m3x2_codes(__fmul_rn(v[4u * k + 2u], inv[4u * k + 2u]), __fmul_rn(v[4u * k + 3u], inv[4u * k + 3u])) << 16)) &
                       keep[k];
        if (!(v16 && P.count == COPY_ONLY))
            *(uint2*)(ws + P.off_vcodes + ((bh * P.seq_kv + t) * P.dp + c0) / 4u) = make_uint2(codes[0], codes[1]);
        if (v16) {
            u32 h[4];
#pragma unroll
            for (u32 k = 0; k < 4u; k++) h[k] = e4m3x2_to_f16x2(codes[k / 2u] >> (16u * (k % 2u)));
            *(uint4*)(v16 + (size_t)(bh * P.seq_kv + t) * P.dp + c0) = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
}

__device__ void nvfp4_store(const float* xs, u32* ws, u32 code_off, u32 scale_at) {
    u32 amax = 0u;
    for (u32 i = 0; i < 16u; i++) amax = max(amax, abs_bits(xs[i]));
    u32 sc = nvfp4_scale_code(amax);
    float s = sc != E4M3_NAN ? e4m3_to_f32(sc) : 0.0f;
    for (u32 w = 0; w < 4u; w++) {
        u32 word = 0u;
        for (u32 k = 0; k < 4u; k++) word |= e2m1_code_of_ratio(xs[w * 4u + k], s) << (8u * k);
        ws[code_off + w] = word;
    }
    ws[scale_at] = sc;
}

extern "C" __global__ void nvfp4_qk(Params P, const void* src, u32* ws) {
    u32 id = linear_id();
    bool is_q = P.mode == MODE_Q;
    u32 n = is_q ? P.seq_q : P.seq_kv;
    u32 nb = P.dp / 16u;
    if (id >= P.batch * heads_of_mode(P) * n * nb) return;
    u32 blk = id % nb, row = id / nb;
    u32 t = row % n, bh = row / n;
    float xs[16];
    for (u32 i = 0; i < 16u; i++) {
        u32 c = blk * 16u + i;
        xs[i] = c < P.head_dim ? qk_value(P, src, ws, bh, t, c) : 0.0f;
    }
    nvfp4_store(xs, ws, (is_q ? P.off_qcodes : P.off_kcodes) + row * (P.dp / 4u) + blk * 4u, (is_q ? P.off_qscales : P.off_kscales) + id);
}

extern "C" __global__ void nvfp4_v(Params P, const void* src, u32* ws) {
    u32 id = linear_id();
    u32 nb = P.np / 16u;
    if (id >= P.batch * P.heads_kv * P.dp * nb) return;
    // Consecutive threads take consecutive channels of one 16-token group: coalesced reads.
    u32 c = id % P.dp, tb = (id / P.dp) % nb, bh = id / P.dp / nb;
    u32 chan = bh * P.dp + c;
    u32 b = bh / P.heads_kv, h = bh % P.heads_kv;
    float xs[16];
    for (u32 i = 0; i < 16u; i++) {
        u32 t = tb * 16u + i;
        // V → NVFP4 quantizes v / g as RN(v · (1/g)) (v_inv_g = 1 for the Nvfp4 recipe).
        xs[i] = (t < P.seq_kv && c < P.head_dim) ? ftz(__fmul_rn(load_elem(src, b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c, P.dtype), P.v_inv_g)) : 0.0f;
    }
    nvfp4_store(xs, ws, P.off_vcodes + chan * (P.np / 4u) + tb * 4u, P.off_vscales + chan * nb + tb);
}

// f32 (src) → f16/bf16 (dst), nearest-even, one element per thread (CUDA stores 16 bits).
extern "C" __global__ void pack_out(Params P, const float* src, unsigned short* dst) {
    u32 id = linear_id();
    if (id >= P.count) return;
    float x = src[id];
    dst[id] = (unsigned short)(P.dtype == DT_F16 ? f32_to_f16_bits(x) : f32_to_bf16_bits(x));
}

// ---- NVFP4 with the f16 copy, one pass per tensor --------------------------------------------
// For 16-bit inputs whose rows are whole 16-byte chunks (the FP8 V passes' condition, head dim a
// multiple of 8): the codes and scales nvfp4_qk / nvfp4_v write, the same bits, and in the same
// pass the f16 copy of the values (E2M1 · E4M3, exact) that the tensor-core kernel reads, rows
// [b·h][n][dp] (else nvfp4_qk_to_f16 / nvfp4_v_to_f16 make it from the codes). The E2M1 code by
// quotient and rounding (e2m1_unsaturated) instead of seven comparisons per value. With
// P.count = COPY_ONLY (the attention path) the codes and scales are not stored: the tensor
// cores read only the copy.

// The E2M1 code of x / s (s: the block's scale value, 0 for a zero or NaN block, r = scale_rcp(s)):
// = e2m1_code_of_ratio(x, s). |x| is clamped to 8s first (q ≥ 8 saturates either way; the clamp
// keeps the rounding constant finite).
__device__ __forceinline__ u32 e2m1_code(float x, float s, float r) {
    float v = e2m1_unsaturated(fminf(u2f(abs_bits(x)), 8.0f * s), s, r);
    u32 code = (u32)fminf(v <= 2.0f ? 2.0f * v : v + 2.0f, 7.0f);  // 0, .5, …, 2 → 0-4; 3, 4 → 5, 6; 6+ → 7
    return code == 0u || !(s > 0.0f) ? 0u : code | ((f2u(x) >> 28) & 8u);
}

// E2M1 code → its value times the block's scale value (NaN for a NaN block, as the copy passes give).
__device__ __forceinline__ float e2m1_times(u32 code, float s) { return e2m1_to_f32(code) * s; }

// 16 values of one block → codes (4 words) and the scale code; `vals` becomes the copy's values.
// !CODES (COPY_ONLY): the copy's values only, straight from the rounded quotient v: ±min(v, 6)·s
// (the code's value times s: v is 0, 0.5, …, 2, 3, 4, 6 or 8; a zero code's value is +0; a NaN
// block gives NaN either way), without forming the code and converting it back.
template <bool CODES> __device__ __forceinline__ u32 nvfp4_block_fast(float (&vals)[16], u32 (&words)[4]) {
    u32 amax = 0u;
#pragma unroll
    for (u32 i = 0; i < 16u; i++) amax = max(amax, abs_bits(vals[i]));
    u32 sc = scale_code_pair(amax, 0u) & 0xffu;  // = nvfp4_scale_code(amax), by hardware on sm_89+
    float s_val = e4m3_to_f32(sc), s = sc != E4M3_NAN ? s_val : 0.0f, r = scale_rcp(s);
#pragma unroll
    for (u32 w = 0; w < 4u; w++) words[w] = 0u;
#pragma unroll
    for (u32 i = 0; i < 16u; i++) {
        if (CODES) {
            u32 code = e2m1_code(vals[i], s, r);
            words[i / 4u] |= code << (8u * (i % 4u));
            vals[i] = e2m1_times(code, s_val);
        } else {
            float x = vals[i], v = e2m1_unsaturated(fminf(u2f(abs_bits(x)), 8.0f * s), s, r);
            float y = fminf(v, 6.0f) * s_val;
            vals[i] = v > 0.0f ? copysignf(y, x) : y;
        }
    }
    return sc;
}

// Q or K (P.mode): one thread per 16-value block of a row (two 16-byte loads; the codes as one
// 16-byte store, the scale word, the copy as two 16-byte stores).
extern "C" __global__ void nvfp4_qk_f16(Params P, const void* src, u32* ws, unsigned short* out) {
    u32 id = linear_id();
    bool is_q = P.mode == MODE_Q;
    u32 n = is_q ? P.seq_q : P.seq_kv, heads = heads_of_mode(P), nb = P.dp / 16u;
    if (id >= P.batch * heads * n * nb) return;
    u32 blk = id % nb, row = id / nb, t = row % n, bh = row / n;
    u32 b = bh / heads, h = bh % heads;
    const unsigned short* in = (const unsigned short*)src + (is_q ? b * P.q_sb + h * P.q_sh + t * P.q_st : b * P.kv_sb + h * P.kv_sh + t * P.kv_st);
    // = qk_value per channel. The head dim is a multiple of 8 (the host's condition), so a
    // chunk lies wholly inside the row or wholly past it (zeros); the branches below are uniform
    // and outside the per-value loops, so K's eight mean loads per chunk are in flight together
    // (inside a per-value branch they had gone one at a time).
    float xs[16];
#pragma unroll
    for (u32 half = 0; half < 2u; half++) {
        u32 c0 = blk * 16u + 8u * half;
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (c0 < P.head_dim) {
            chunk_values(*(const uint4*)(in + c0), P.dtype == DT_F16, v);
            if (is_q) {
#pragma unroll
                for (u32 k = 0; k < 8u; k++) v[k] = mul_ftz(v[k], P.fold);  // = ftz(__fmul_rn(·)): v and fold normal or zero
            } else if (P.flags & FLAG_SMOOTH) {
                const u32* mean = ws + P.off_kmean + bh * P.head_dim + c0;
                u32 m[8];
#pragma unroll
                for (u32 k = 0; k < 8u; k++) m[k] = mean[k];
#pragma unroll
                for (u32 k = 0; k < 8u; k++) v[k] = sub_ftz(v[k], u2f(m[k]));  // the mean is flushed (k_mean)
            }
        }
#pragma unroll
        for (u32 k = 0; k < 8u; k++) xs[8u * half + k] = v[k];
    }
    u32 words[4];
    u32 sc = P.count != COPY_ONLY ? nvfp4_block_fast<true>(xs, words) : nvfp4_block_fast<false>(xs, words);
    if (P.count != COPY_ONLY) {
        *(uint4*)(ws + (is_q ? P.off_qcodes : P.off_kcodes) + row * (P.dp / 4u) + blk * 4u) = make_uint4(words[0], words[1], words[2], words[3]);
        ws[(is_q ? P.off_qscales : P.off_kscales) + id] = sc;
    }
    u32 hv[8];
#pragma unroll
    for (u32 k = 0; k < 8u; k++) hv[k] = pack16<false>(xs[2u * k], xs[2u * k + 1u]);
    uint4* o = (uint4*)(out + (size_t)row * P.dp + blk * 16u);
    o[0] = make_uint4(hv[0], hv[1], hv[2], hv[3]);
    o[1] = make_uint4(hv[4], hv[5], hv[6], hv[7]);
}

// V (the Nvfp4 recipe's, or V → NVFP4's, v · (1/g)): one thread per 2 channels × one 16-token
// group: sixteen 4-byte loads (a warp's lanes take adjacent channel pairs: 128 contiguous bytes
// per token), the codes of each channel as nvfp4_v lays them out, the copy's words. (Was 8
// channels per thread with sixteen 16-byte loads: 166 registers, 19% occupancy, 62 µs under
// ncu at N = 4096.)
extern "C" __global__ void nvfp4_v_f16(Params P, const void* src, u32* ws, unsigned short* out) {
    u32 id = linear_id();
    u32 cpp = P.dp / 2u, nb = P.np / 16u;
    if (id >= P.batch * P.heads_kv * nb * cpp) return;
    u32 kp = id % cpp, tb = (id / cpp) % nb, bh = id / cpp / nb;
    u32 b = bh / P.heads_kv, h = bh % P.heads_kv, c0 = kp * 2u;
    const unsigned short* in = (const unsigned short*)src + b * P.kv_sb + h * P.kv_sh + c0;
    u32 x[16];
#pragma unroll
    for (u32 i = 0; i < 16u; i++) {
        u32 t = tb * 16u + i;
        x[i] = t < P.seq_kv && c0 < P.head_dim ? *(const u32*)(in + (size_t)t * P.kv_st) : 0u;
    }
    // Channel e's input is half e of x[i]; once quantized, its copy's f16 takes that half.
#pragma unroll
    for (u32 e = 0; e < 2u; e++) {
        float xs[16];
#pragma unroll
        for (u32 i = 0; i < 16u; i++) {
            u32 bits = (x[i] >> (16u * e)) & 0xffffu;
            float v = P.dtype == DT_F16 ? cvt_f16(bits) : ftz(u2f(bits << 16));
            xs[i] = mul_ftz(v, P.v_inv_g);  // 1/g ≥ 2688/max f32: normal
        }
        u32 words[4], chan = bh * P.dp + c0 + e;
        u32 sc = P.count != COPY_ONLY ? nvfp4_block_fast<true>(xs, words) : nvfp4_block_fast<false>(xs, words);
        if (P.count != COPY_ONLY) {
            // One 16-byte store (np is a multiple of 16, workspace offsets of 4 words).
            *(uint4*)(ws + P.off_vcodes + chan * (P.np / 4u) + tb * 4u) = make_uint4(words[0], words[1], words[2], words[3]);
            ws[P.off_vscales + chan * nb + tb] = sc;
        }
#pragma unroll
        for (u32 i = 0; i < 16u; i++) {
            u32 h = pack16<false>(xs[i], xs[i]) & 0xffffu;
            x[i] = e == 0u ? (x[i] & 0xffff0000u) | h : (x[i] & 0xffffu) | (h << 16);
        }
    }
#pragma unroll
    for (u32 i = 0; i < 16u; i++) {
        u32 t = tb * 16u + i;
        if (t < P.seq_kv) *(u32*)(out + ((size_t)bh * P.seq_kv + t) * P.dp + c0) = x[i];
    }
}
