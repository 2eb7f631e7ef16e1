// attention.cu: the tiled online-softmax attention, one kernel for every recipe; the twin of
// shaders/attention.wgsl (see its header for the walk through a tile). The host prepends
// RECIPE, DP, BQ and NCH. This is the portable CUDA-core path that defines the CUDA numerics;
// the tensor-core kernels are checked against it and against the CPU reference.

#define BK 64u
#define DW (DP / 4u)
#define MASKED (-3.0e38f)

__device__ __forceinline__ bool is_int8() { return RECIPE == R_INT8_F16 || RECIPE == R_INT8_FP8; }

__device__ __forceinline__ float fp4_token(const u32* ws, u32 codes, u32 scales, u32 row, u32 c) {
    u32 e = row * DP + c;
    u32 sc = ws[scales + row * (DP / 16u) + c / 16u];
    return e2m1_to_f32(byte_of(ws[codes + e / 4u], e)) * e4m3_to_f32(sc);
}

__device__ __forceinline__ float load_v(const Params& P, const void* v, const u32* ws, u32 b, u32 h, u32 bkv, u32 j, u32 c) {
    if (RECIPE == R_INT8_FP8) {
        u32 e = (bkv * P.seq_kv + j) * DP + c;
        return e4m3_to_f32(byte_of(ws[P.off_vcodes + e / 4u], e));
    }
    if (RECIPE == R_NVFP4 || (P.flags & FLAG_VNVFP4)) {
        u32 chan = bkv * DP + c;
        u32 e = chan * P.np + j;
        u32 sc = ws[P.off_vscales + chan * (P.np / 16u) + j / 16u];
        return e2m1_to_f32(byte_of(ws[P.off_vcodes + e / 4u], e)) * e4m3_to_f32(sc);
    }
    return load_elem(v, b * P.kv_sb + h * P.kv_sh + j * P.kv_st + c, P.dtype);
}

// NVFP4-quantize 16 P values of row r in place (value = e2m1 · e4m3 block scale).
__device__ void p_fp4_block(float* srow, u32 j0, float mul, u32 round_dtype) {
    u32 amax = 0u;
    for (u32 j = j0; j < j0 + 16u; j++) amax = max(amax, abs_bits(__fmul_rn(round_to(round_dtype, srow[j]), mul)));
    u32 sc = nvfp4_scale_code(amax);
    float s = sc != E4M3_NAN ? e4m3_to_f32(sc) : f32_nan();
    for (u32 j = j0; j < j0 + 16u; j++) {
        float x = __fmul_rn(round_to(round_dtype, srow[j]), mul);
        srow[j] = e2m1_to_f32(e2m1_code_of_ratio(x, s)) * s;
    }
}

// Turn row probabilities into the recipe's P·V operand; return this tile's factor.
__device__ float quantize_p_row(const Params& P, float* srow) {
    if (RECIPE == R_EXACT || RECIPE == R_INT8_F16) {
        u32 dt = P.dtype;
        if (RECIPE == R_INT8_F16 && dt == DT_F32) dt = DT_F16;
        for (u32 j = 0; j < BK; j++) srow[j] = round_to(dt, srow[j]);
        return 1.0f;
    }
    if (RECIPE == R_INT8_FP8) {
        for (u32 j = 0; j < BK; j++) srow[j] = e4m3_to_f32(e4m3_from_f32(__fmul_rn(srow[j], 448.0f)));
        return 1.0f / 448.0f;
    }
    if (RECIPE == R_NVFP4) {
        // Two-level: lift the row by 1/ρ' (ρ' the least power of two ≥ its max ρ), then NVFP4
        // as Nvfp4P with amax_p = 1 in f16; the tile's factor is ρ'/2688.
        u32 rho = 0u;
        for (u32 j = 0; j < BK; j++) rho = max(rho, abs_bits(ftz(srow[j])));
        if (rho == 0u || non_finite(rho)) {
            for (u32 j = 0; j < BK; j++) srow[j] = 0.0f;
            return 0.0f;
        }
        u32 up = pow2_ceil_bits(rho);
        float lift = u2f((254u << 23) - up);
        for (u32 j = 0; j < BK; j++) srow[j] = __fmul_rn(ftz(srow[j]), lift);
        for (u32 j0 = 0; j0 < BK; j0 += 16u) p_fp4_block(srow, j0, 2688.0f, DT_F16);
        return div_rn(u2f(up), 2688.0f);
    }
    if (RECIPE == R_FP8P) {
        for (u32 j = 0; j < BK; j++) srow[j] = e4m3_to_f32(e4m3_from_f32(__fmul_rn(srow[j], P.inv_g)));
        return P.g;
    }
    for (u32 j0 = 0; j0 < BK; j0 += 16u) p_fp4_block(srow, j0, P.inv_g, P.dtype);
    return P.g;
}

// N:M sparse softmax on one row of the tile: in each group of nm_m keys only the nm_n largest
// scores survive (an equal score at a lower key outranks); sink and recent keys stay dense.
__device__ void nm_select(const Params& P, float* srow, u32 row, u32 kb, i32 offset) {
    bool keep[BK];
    for (u32 jj = 0; jj < BK; jj++) {
        float x = srow[jj];
        bool k = true;
        if (x != MASKED) {
            u32 key = kb * BK + jj;
            i32 dist = (i32)row + offset - (i32)key;
            bool dense = key < P.nm_sink || (dist >= 0 && dist < (i32)P.nm_recent);
            if (!dense) {
                u32 g = (jj / P.nm_m) * P.nm_m, rank = 0u;
                for (u32 kk = g; kk < g + P.nm_m; kk++) {
                    float y = srow[kk];
                    if (y != MASKED && (y > x || (y == x && kk < jj))) rank++;
                }
                k = rank < P.nm_n;
            }
        }
        keep[jj] = k;
    }
    for (u32 jj = 0; jj < BK; jj++)
        if (!keep[jj]) srow[jj] = MASKED;
}

extern "C" __global__ void __launch_bounds__(64) attention(Params P, const void* q_in, const void* k_in, const void* v_in,
                                                           const u32* ws, const u32* mask, float* o_out, float* lse_out) {
    __shared__ u32 q_sh[BQ * DP];
    __shared__ float s_sh[BQ * BK];
    __shared__ float m_sh[BQ], l_sh[BQ], alpha_sh[BQ], factor_sh[BQ], qscale_sh[BQ];
    __shared__ u32 skip_sh, need_sh[BQ];
    u32 lid = threadIdx.x;
    u32 bh = blockIdx.y;
    u32 b = bh / P.heads_q, h = bh % P.heads_q;
    u32 hkv = h / P.group, bkv = b * P.heads_kv + hkv;
    u32 row0 = blockIdx.x * BQ;
    bool causal = (P.flags & FLAG_CAUSAL) != 0u;
    i32 offset = (i32)P.seq_kv - (i32)P.seq_q;

    if (is_int8()) {
        u32 ngq = group_count(P.seq_q, P.q_gblock, P.q_ginter);
        for (u32 e = lid; e < BQ * DW; e += 64u) {
            u32 row = row0 + e / DW;
            q_sh[e] = row < P.seq_q ? ws[P.off_qcodes + (bh * P.seq_q + row) * DW + e % DW] : 0u;
        }
        if (lid < BQ) {
            u32 row = row0 + lid;
            qscale_sh[lid] = row < P.seq_q ? u2f(ws[P.off_qscales + bh * ngq + group_of(row, P.q_gblock, P.q_ginter)]) : 0.0f;
        }
    } else {
        for (u32 e = lid; e < BQ * DP; e += 64u) {
            u32 row = row0 + e / DP, c = e % DP;
            float x = 0.0f;
            if (row < P.seq_q && c < P.head_dim) {
                x = RECIPE == R_NVFP4 ? fp4_token(ws, P.off_qcodes, P.off_qscales, bh * P.seq_q + row, c)
                                      : load_elem(q_in, b * P.q_sb + h * P.q_sh + row * P.q_st + c, P.dtype);
            }
            q_sh[e] = f2u(x);
        }
    }
    if (lid < BQ) { m_sh[lid] = MASKED; l_sh[lid] = 0.0f; }
    float acc[BQ * NCH];
#pragma unroll
    for (u32 i = 0; i < BQ * NCH; i++) acc[i] = 0.0f;
    u32 last_row = min(row0 + BQ, P.seq_q) - 1u;
    u32 ngk = group_count(P.seq_kv, P.k_gblock, P.k_ginter);
    u32 tiles_visited = 0u, tiles_skipped = 0u;  // skip-softmax counters (thread 0's)
    __syncthreads();

    for (u32 kb = 0; kb < P.k_blocks; kb++) {
        if (lid == 0u) {
            u32 skip = 0u;
            if (P.flags & FLAG_MASK) skip = mask[(bh * P.q_blocks + row0 / 128u) * P.k_blocks + kb] == 0u;
            if (causal && (i32)(kb * BK) > (i32)last_row + offset) skip = 1u;
            skip_sh = skip;
        }
        __syncthreads();
        u32 skip = skip_sh;
        __syncthreads();
        if (skip) continue;

        u32 j = kb * BK + lid;
        float s[BQ];
#pragma unroll
        for (u32 r = 0; r < BQ; r++) s[r] = 0.0f;
        if (j < P.seq_kv) {
            if (is_int8()) {
                i32 dots[BQ];
#pragma unroll
                for (u32 r = 0; r < BQ; r++) dots[r] = 0;
                for (u32 w = 0; w < DW; w++) {
                    u32 kw = ws[P.off_kcodes + (bkv * P.seq_kv + j) * DW + w];
#pragma unroll
                    for (u32 r = 0; r < BQ; r++) dots[r] = __dp4a((i32)q_sh[r * DW + w], (i32)kw, dots[r]);
                }
                float ks = u2f(ws[P.off_kscales + bkv * ngk + group_of(j, P.k_gblock, P.k_ginter)]);
#pragma unroll
                for (u32 r = 0; r < BQ; r++) s[r] = (float)dots[r] * qscale_sh[r] * ks;
            } else {
                for (u32 c = 0; c < P.head_dim; c++) {
                    float kc = RECIPE == R_NVFP4 ? fp4_token(ws, P.off_kcodes, P.off_kscales, bkv * P.seq_kv + j, c)
                                                 : load_elem(k_in, b * P.kv_sb + hkv * P.kv_sh + j * P.kv_st + c, P.dtype);
#pragma unroll
                    for (u32 r = 0; r < BQ; r++) s[r] += u2f(q_sh[r * DP + c]) * kc;
                }
                if (RECIPE == R_EXACT || RECIPE == R_NVFP4P || RECIPE == R_FP8P) {
#pragma unroll
                    for (u32 r = 0; r < BQ; r++) s[r] *= P.score_scale;
                }
            }
        }
#pragma unroll
        for (u32 r = 0; r < BQ; r++) {
            u32 row = row0 + r;
            bool visible = j < P.seq_kv && row < P.seq_q && (!causal || (i32)j <= (i32)row + offset);
            s_sh[r * BK + lid] = visible ? s[r] : MASKED;
        }
        __syncthreads();

        // Skip-softmax (BQ = 16 rows: one block is one skip tile): drop the tile when every row
        // that sees a key of it has 2^(tile max − running max) < λ.
        if (P.skip_on) {
            if (lid < BQ) {
                float tmax = MASKED;
                for (u32 jj = 0; jj < BK; jj++) tmax = nan_max(tmax, s_sh[lid * BK + jj]);
                u32 f = 0u;
                if (tmax != MASKED) f = (m_sh[lid] != MASKED && tmax - m_sh[lid] < P.skip_log2) ? 2u : 3u;
                need_sh[lid] = f;
            }
            __syncthreads();
            if (lid == 0u) {
                u32 f = 0u;
                for (u32 r = 0; r < BQ; r++) f |= need_sh[r];
                tiles_visited += f == 3u;
                tiles_skipped += f == 2u;
                skip_sh = f == 2u;
            }
            __syncthreads();
            u32 drop = skip_sh;
            __syncthreads();
            if (drop) continue;
        }

        if (lid < BQ) {
            u32 r = lid;
            float* srow = s_sh + r * BK;
            if (P.nm_n != 0u) nm_select(P, srow, row0 + r, kb, offset);
            float tmax = MASKED;
            for (u32 jj = 0; jj < BK; jj++) tmax = nan_max(tmax, srow[jj]);
            if (tmax == MASKED) {
                for (u32 jj = 0; jj < BK; jj++) srow[jj] = 0.0f;
                alpha_sh[r] = 1.0f;
                factor_sh[r] = 0.0f;
            } else {
                float m_old = m_sh[r];
                float m_new = nan_max(m_old, tmax);
                float alpha = m_old != MASKED ? exp2f(m_old - m_new) : 0.0f;
                float sum = 0.0f;
                for (u32 jj = 0; jj < BK; jj++) {
                    float sv = srow[jj];
                    float p = sv != MASKED ? exp2f(sv - m_new) : 0.0f;
                    sum += p;
                    srow[jj] = p;
                }
                l_sh[r] = l_sh[r] * alpha + sum;
                m_sh[r] = m_new;
                alpha_sh[r] = alpha;
                factor_sh[r] = quantize_p_row(P, srow);
            }
        }
        __syncthreads();

        float part[BQ * NCH];
#pragma unroll
        for (u32 i = 0; i < BQ * NCH; i++) part[i] = 0.0f;
        u32 kend = min(BK, P.seq_kv - kb * BK);
        for (u32 jj = 0; jj < kend; jj++) {
#pragma unroll
            for (u32 u = 0; u < NCH; u++) {
                u32 c = lid + 64u * u;
                if (c < P.head_dim) {
                    float vv = load_v(P, v_in, ws, b, hkv, bkv, kb * BK + jj, c);
#pragma unroll
                    for (u32 r = 0; r < BQ; r++) part[r * NCH + u] += s_sh[r * BK + jj] * vv;
                }
            }
        }
#pragma unroll
        for (u32 r = 0; r < BQ; r++)
#pragma unroll
            for (u32 u = 0; u < NCH; u++) acc[r * NCH + u] = acc[r * NCH + u] * alpha_sh[r] + part[r * NCH + u] * factor_sh[r];
        __syncthreads();
    }

    if (P.skip_on && lid == 0u) {
        u32 slot = P.off_tiles + 2u * (bh * ((P.seq_q + 15u) / 16u) + blockIdx.x);
        ((u32*)ws)[slot] = tiles_visited;  // the workspace is writable; the kernel reads it as const elsewhere
        ((u32*)ws)[slot + 1u] = tiles_skipped;
    }
#pragma unroll
    for (u32 r = 0; r < BQ; r++) {
        u32 row = row0 + r;
        if (row >= P.seq_q) break;
        float l = l_sh[r];
#pragma unroll
        for (u32 u = 0; u < NCH; u++) {
            u32 c = lid + 64u * u;
            if (c < P.head_dim) {
                float o = 0.0f;
                if (l != 0.0f) {
                    o = acc[r * NCH + u] / l;
                    if (RECIPE == R_INT8_FP8) o *= u2f(ws[P.off_vscales + bkv * DP + c]);
                    if (P.flags & FLAG_VNVFP4) o *= P.v_g;
                }
                o_out[b * P.q_sb + h * P.q_sh + row * P.q_st + c] = o;
            }
        }
        if (lid == 0u && (P.flags & FLAG_LSE)) {
            float lse = f32_neg_inf();
            if (l != 0.0f) {
                float shift = (P.flags & FLAG_SMOOTH) ? u2f(ws[P.off_qdelta + bh * P.seq_q + row]) : 0.0f;
                lse = (m_sh[r] + log2f(l) + shift) * 0.6931471805599453f;
            }
            lse_out[bh * P.seq_q + row] = lse;
        }
    }
}
