// attention.wgsl: the tiled online-softmax attention, one kernel for every recipe.
// The host prepends the specialization: RECIPE, DP (head_dim rounded up to 16), BQ (query rows
// per workgroup, a divisor of 128), NCH (channels per thread = ceil(DP / 64)), and the Q tile's
// storage with its accessors q_put / q_get (f32 values) and q_put_word / q_get_word (INT8
// codes, 4 per word): u32 words, or f16 where the adapter has shader-f16 and Q is f16 (exact,
// half the workgroup memory, so more rows fit per workgroup).
//
// A workgroup of 64 threads owns BQ query rows of one (batch, head) and walks the KV tiles of
// 64 keys. Per tile:
//   scores   thread j computes s[r][j] for its key j and every row r (base-2 units)
//   softmax  thread r updates row r's running max m and sum l, turns s into p = exp2(s - m),
//            and quantizes p into the P·V operand the recipe defines (in place)
//   P·V      thread t owns channels t, t+64, ...: partial = Σ_j P[r][j]·V[j][c] in f32, then
//            acc = acc·alpha + partial·factor (two-level accumulation)
// Skipped tiles (block mask 0, or wholly above the causal diagonal) load nothing. Skip-softmax
// (BQ = 16: one workgroup is one skip tile) drops a tile after its scores when no row needs it.

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q_in: array<u32>;
@group(0) @binding(2) var<storage, read> k_in: array<u32>;
@group(0) @binding(3) var<storage, read> v_in: array<u32>;
@group(0) @binding(4) var<storage, read_write> ws: array<u32>;
@group(0) @binding(5) var<storage, read> mask: array<u32>;
@group(0) @binding(6) var<storage, read_write> o_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> lse_out: array<f32>;

const BK: u32 = 64u;
const DW: u32 = DP / 4u;
const MASKED: f32 = -3.0e38;        // score of a key that is not visible (below any real score)

var<workgroup> s_sh: array<f32, BQ * BK>;   // scores, then the P·V operands
var<workgroup> m_sh: array<f32, BQ>;
var<workgroup> l_sh: array<f32, BQ>;
var<workgroup> alpha_sh: array<f32, BQ>;
var<workgroup> factor_sh: array<f32, BQ>;
var<workgroup> qscale_sh: array<f32, BQ>;
var<workgroup> skip_sh: u32;
var<workgroup> need_sh: array<u32, BQ>;   // skip-softmax: 2 = row sees a key, | 1 = and needs the tile

fn is_int8() -> bool { return RECIPE == R_INT8_F16 || RECIPE == R_INT8_FP8; }
fn reads_raw_qk() -> bool { return RECIPE == R_EXACT || RECIPE == R_NVFP4P || RECIPE == R_FP8P; }

fn load_q(b: u32, h: u32, i: u32, c: u32) -> f32 {
    let idx = b * P.q_sb + h * P.q_sh + i * P.q_st + c;
    return decode(q_in[word_index(idx, P.dtype)], idx, P.dtype);
}
fn load_k(b: u32, h: u32, j: u32, c: u32) -> f32 {
    let idx = b * P.kv_sb + h * P.kv_sh + j * P.kv_st + c;
    return decode(k_in[word_index(idx, P.dtype)], idx, P.dtype);
}

// An NVFP4 element of a token-major code array, dequantized (e2m1 · e4m3, exact in f32).
fn fp4_token(codes: u32, scales: u32, row: u32, c: u32) -> f32 {
    let e = row * DP + c;
    let sc = ws[scales + row * (DP / 16u) + c / 16u];
    return e2m1_to_f32(byte_of(ws[codes + e / 4u], e)) * e4m3_to_f32(sc);
}

// V[j][c] as the P·V product reads it (FP8: the E4M3 value; its channel scale comes at the end).
fn load_v(b: u32, h: u32, bkv: u32, j: u32, c: u32) -> f32 {
    if (RECIPE == R_INT8_FP8) {
        let e = (bkv * P.seq_kv + j) * DP + c;
        return e4m3_to_f32(byte_of(ws[P.off_vcodes + e / 4u], e));
    }
    if (RECIPE == R_NVFP4 || (P.flags & FLAG_VNVFP4) != 0u) {
        let chan = bkv * DP + c;
        let e = chan * P.np + j;
        let sc = ws[P.off_vscales + chan * (P.np / 16u) + j / 16u];
        return e2m1_to_f32(byte_of(ws[P.off_vcodes + e / 4u], e)) * e4m3_to_f32(sc);
    }
    let idx = b * P.kv_sb + h * P.kv_sh + j * P.kv_st + c;
    return decode(v_in[word_index(idx, P.dtype)], idx, P.dtype);
}

// Quantize 16 P values x[0..16) of row r (starting at key j0) to NVFP4 in place: each becomes
// e2m1 · e4m3 (the block scale); the caller folds the remaining factor out.
fn p_fp4_block(r: u32, j0: u32, mul: f32, round_dtype: u32) {
    var amax = 0u;
    for (var j = j0; j < j0 + 16u; j++) {
        amax = max(amax, abs_bits(round_to(round_dtype, s_sh[r * BK + j]) * mul));
    }
    let sc = nvfp4_scale_code(amax);
    var s = f32_nan();
    if (sc != E4M3_NAN) { s = e4m3_to_f32(sc); }
    for (var j = j0; j < j0 + 16u; j++) {
        let x = round_to(round_dtype, s_sh[r * BK + j]) * mul;
        s_sh[r * BK + j] = e2m1_to_f32(e2m1_code_of_ratio(x, s)) * s;
    }
}

// Turn row r's probabilities p (in s_sh) into the recipe's P·V operand; return the factor
// that multiplies this tile's partial product.
fn quantize_p_row(r: u32) -> f32 {
    if (RECIPE == R_EXACT || RECIPE == R_INT8_F16) {
        // Exact: the input dtype; Int8QkF16Pv: V's 16-bit type (bf16 for bf16, else f16).
        var dt = P.dtype;
        if (RECIPE == R_INT8_F16 && dt == DT_F32) { dt = DT_F16; }
        for (var j = 0u; j < BK; j++) { s_sh[r * BK + j] = round_to(dt, s_sh[r * BK + j]); }
        return 1.0;
    }
    if (RECIPE == R_INT8_FP8) {
        for (var j = 0u; j < BK; j++) { s_sh[r * BK + j] = e4m3_to_f32(e4m3_from_f32(s_sh[r * BK + j] * 448.0)); }
        return 1.0 / 448.0;
    }
    if (RECIPE == R_NVFP4) {
        // Two-level: the row's tile max rho is lifted by 1/rho' (rho' the least power of two
        // >= rho), then NVFP4 as Nvfp4P with amax_p = 1 in f16; the factor is rho' / 2688.
        var rho = 0u;
        for (var j = 0u; j < BK; j++) { rho = max(rho, abs_bits(ftz(s_sh[r * BK + j]))); }
        if (rho == 0u || non_finite(rho)) {
            for (var j = 0u; j < BK; j++) { s_sh[r * BK + j] = 0.0; }
            return 0.0;
        }
        let up = pow2_ceil_bits(rho);
        let lift = bitcast<f32>((254u << 23u) - up);
        for (var j = 0u; j < BK; j++) { s_sh[r * BK + j] = ftz(s_sh[r * BK + j]) * lift; }
        for (var j0 = 0u; j0 < BK; j0 += 16u) { p_fp4_block(r, j0, 2688.0, DT_F16); }
        return div_rn(bitcast<f32>(up), 2688.0);
    }
    if (RECIPE == R_FP8P) {
        // ModelOpt P → FP8: E4M3(p / s) with s = amax_p / 448 folded out.
        for (var j = 0u; j < BK; j++) { s_sh[r * BK + j] = e4m3_to_f32(e4m3_from_f32(s_sh[r * BK + j] * P.inv_g)); }
        return P.g;
    }
    // R_NVFP4P: ModelOpt: p rounded to the input dtype, global scale g.
    for (var j0 = 0u; j0 < BK; j0 += 16u) { p_fp4_block(r, j0, P.inv_g, P.dtype); }
    return P.g;
}

// N:M sparse softmax on row r of the tile: in each group of nm_m keys only the nm_n largest
// scores survive (an equal score at a lower key outranks); sink and recent keys stay dense.
fn nm_select(r: u32, row: u32, kb: u32, offset: i32) {
    var keep: array<bool, 64>;
    for (var jj = 0u; jj < BK; jj++) {
        let x = s_sh[r * BK + jj];
        var k = true;
        if (x != MASKED) {
            let key = kb * BK + jj;
            let dist = i32(row) + offset - i32(key);
            let dense = key < P.nm_sink || (dist >= 0 && dist < i32(P.nm_recent));
            if (!dense) {
                let g = (jj / P.nm_m) * P.nm_m;
                var rank = 0u;
                for (var kk = g; kk < g + P.nm_m; kk++) {
                    let y = s_sh[r * BK + kk];
                    if (y != MASKED && (y > x || (y == x && kk < jj))) { rank++; }
                }
                k = rank < P.nm_n;
            }
        }
        keep[jj] = k;
    }
    for (var jj = 0u; jj < BK; jj++) {
        if (!keep[jj]) { s_sh[r * BK + jj] = MASKED; }
    }
}

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bh = wid.y;
    let b = bh / P.heads_q;
    let h = bh % P.heads_q;
    let hkv = h / P.group;
    let bkv = b * P.heads_kv + hkv;
    let row0 = wid.x * BQ;
    let causal = (P.flags & FLAG_CAUSAL) != 0u;
    let offset = i32(P.seq_kv) - i32(P.seq_q);   // bottom-right alignment

    // The Q tile.
    if (is_int8()) {
        let ngq = group_count(P.seq_q, P.q_gblock, P.q_ginter);
        for (var e = lid; e < BQ * DW; e += 64u) {
            let row = row0 + e / DW;
            var w = 0u;
            if (row < P.seq_q) { w = ws[P.off_qcodes + (bh * P.seq_q + row) * DW + e % DW]; }
            q_put_word(e, w);
        }
        if (lid < BQ) {
            let row = row0 + lid;
            var s = 0.0;
            if (row < P.seq_q) { s = bitcast<f32>(ws[P.off_qscales + bh * ngq + group_of(row, P.q_gblock, P.q_ginter)]); }
            qscale_sh[lid] = s;
        }
    } else {
        for (var e = lid; e < BQ * DP; e += 64u) {
            let row = row0 + e / DP;
            let c = e % DP;
            var x = 0.0;
            if (row < P.seq_q && c < P.head_dim) {
                if (RECIPE == R_NVFP4) {
                    x = fp4_token(P.off_qcodes, P.off_qscales, bh * P.seq_q + row, c);
                } else {
                    x = load_q(b, h, row, c);
                }
            }
            q_put(e, x);
        }
    }
    if (lid < BQ) {
        m_sh[lid] = MASKED;
        l_sh[lid] = 0.0;
    }
    var acc: array<f32, BQ * NCH>;
    for (var i = 0u; i < BQ * NCH; i++) { acc[i] = 0.0; }
    let last_row = min(row0 + BQ, P.seq_q) - 1u;
    let ngk = group_count(P.seq_kv, P.k_gblock, P.k_ginter);
    var tiles_visited = 0u;   // skip-softmax counters (thread 0's)
    var tiles_skipped = 0u;
    workgroupBarrier();

    for (var kb = 0u; kb < P.k_blocks; kb++) {
        if (lid == 0u) {
            var skip = 0u;
            if ((P.flags & FLAG_MASK) != 0u) {
                let qb = row0 / 128u;
                skip = select(0u, 1u, mask[(bh * P.q_blocks + qb) * P.k_blocks + kb] == 0u);
            }
            if (causal && i32(kb * BK) > i32(last_row) + offset) { skip = 1u; }
            skip_sh = skip;
        }
        let skip = workgroupUniformLoad(&skip_sh);
        if (skip != 0u) {
            workgroupBarrier();   // nobody rewrites skip_sh before everyone has read it
            continue;
        }

        // Scores: thread j owns key kb*64 + j.
        let j = kb * BK + lid;
        var s: array<f32, BQ>;
        for (var r = 0u; r < BQ; r++) { s[r] = 0.0; }
        if (j < P.seq_kv) {
            if (is_int8()) {
                var dots: array<i32, BQ>;
                for (var r = 0u; r < BQ; r++) { dots[r] = 0; }
                for (var w = 0u; w < DW; w++) {
                    let kw = ws[P.off_kcodes + (bkv * P.seq_kv + j) * DW + w];
                    for (var r = 0u; r < BQ; r++) { dots[r] += dot4I8Packed(q_get_word(r * DW + w), kw); }
                }
                let ks = bitcast<f32>(ws[P.off_kscales + bkv * ngk + group_of(j, P.k_gblock, P.k_ginter)]);
                for (var r = 0u; r < BQ; r++) { s[r] = f32(dots[r]) * qscale_sh[r] * ks; }
            } else {
                for (var c = 0u; c < P.head_dim; c++) {
                    var kc: f32;
                    if (RECIPE == R_NVFP4) {
                        kc = fp4_token(P.off_kcodes, P.off_kscales, bkv * P.seq_kv + j, c);
                    } else {
                        kc = load_k(b, hkv, j, c);
                    }
                    for (var r = 0u; r < BQ; r++) { s[r] += q_get(r * DP + c) * kc; }
                }
                if (reads_raw_qk()) {
                    for (var r = 0u; r < BQ; r++) { s[r] *= P.score_scale; }
                }
            }
        }
        for (var r = 0u; r < BQ; r++) {
            let row = row0 + r;
            let visible = j < P.seq_kv && row < P.seq_q && (!causal || i32(j) <= i32(row) + offset);
            s_sh[r * BK + lid] = select(MASKED, s[r], visible);
        }
        workgroupBarrier();

        // Skip-softmax: drop the tile when every row that sees a key of it has
        // 2^(tile max − running max) < λ (a row with no running max yet always needs it).
        if (P.skip_on != 0u) {
            if (lid < BQ) {
                let r = lid;
                var tmax = MASKED;
                for (var jj = 0u; jj < BK; jj++) { tmax = nan_max(tmax, s_sh[r * BK + jj]); }
                var f = 0u;
                if (tmax != MASKED) {
                    f = 3u;
                    let m_old = m_sh[r];
                    if (m_old != MASKED && tmax - m_old < P.skip_log2) { f = 2u; }
                }
                need_sh[r] = f;
            }
            workgroupBarrier();
            if (lid == 0u) {
                var f = 0u;
                for (var r = 0u; r < BQ; r++) { f |= need_sh[r]; }
                if (f == 3u) { tiles_visited++; }
                if (f == 2u) { tiles_skipped++; }
                skip_sh = select(0u, 1u, f == 2u);
            }
            if (workgroupUniformLoad(&skip_sh) != 0u) {
                workgroupBarrier();   // nobody rewrites skip_sh before everyone has read it
                continue;
            }
        }

        // Online softmax: thread r owns row r.
        if (lid < BQ) {
            let r = lid;
            if (P.nm_n != 0u) { nm_select(r, row0 + r, kb, offset); }
            var tmax = MASKED;
            for (var jj = 0u; jj < BK; jj++) { tmax = nan_max(tmax, s_sh[r * BK + jj]); }
            if (tmax == MASKED) {
                // No visible key for this row in this tile: its state is unchanged.
                for (var jj = 0u; jj < BK; jj++) { s_sh[r * BK + jj] = 0.0; }
                alpha_sh[r] = 1.0;
                factor_sh[r] = 0.0;
            } else {
                let m_old = m_sh[r];
                let m_new = nan_max(m_old, tmax);
                var alpha = 0.0;
                if (m_old != MASKED) { alpha = exp2(m_old - m_new); }
                var sum = 0.0;
                for (var jj = 0u; jj < BK; jj++) {
                    let sv = s_sh[r * BK + jj];
                    var p = 0.0;
                    if (sv != MASKED) { p = exp2(sv - m_new); }
                    sum += p;
                    s_sh[r * BK + jj] = p;
                }
                l_sh[r] = l_sh[r] * alpha + sum;
                m_sh[r] = m_new;
                alpha_sh[r] = alpha;
                factor_sh[r] = quantize_p_row(r);
            }
        }
        workgroupBarrier();

        // P·V: thread lid owns channels lid + 64u·u.
        var part: array<f32, BQ * NCH>;
        for (var i = 0u; i < BQ * NCH; i++) { part[i] = 0.0; }
        let kend = min(BK, P.seq_kv - kb * BK);
        for (var jj = 0u; jj < kend; jj++) {
            for (var u = 0u; u < NCH; u++) {
                let c = lid + 64u * u;
                if (c < P.head_dim) {
                    let vv = load_v(b, hkv, bkv, kb * BK + jj, c);
                    for (var r = 0u; r < BQ; r++) { part[r * NCH + u] += s_sh[r * BK + jj] * vv; }
                }
            }
        }
        for (var r = 0u; r < BQ; r++) {
            for (var u = 0u; u < NCH; u++) {
                acc[r * NCH + u] = acc[r * NCH + u] * alpha_sh[r] + part[r * NCH + u] * factor_sh[r];
            }
        }
        workgroupBarrier();
    }

    if (P.skip_on != 0u && lid == 0u) {
        let slot = P.off_tiles + 2u * (bh * ((P.seq_q + 15u) / 16u) + wid.x);
        ws[slot] = tiles_visited;
        ws[slot + 1u] = tiles_skipped;
    }

    // Normalise and store.
    for (var r = 0u; r < BQ; r++) {
        let row = row0 + r;
        if (row >= P.seq_q) { break; }
        let l = l_sh[r];
        for (var u = 0u; u < NCH; u++) {
            let c = lid + 64u * u;
            if (c < P.head_dim) {
                var o = 0.0;     // a row with no visible key gives 0
                if (l != 0.0) {
                    o = acc[r * NCH + u] / l;
                    if (RECIPE == R_INT8_FP8) { o *= bitcast<f32>(ws[P.off_vscales + bkv * DP + c]); }
                    if ((P.flags & FLAG_VNVFP4) != 0u) { o *= P.v_g; }
                }
                o_out[b * P.q_sb + h * P.q_sh + row * P.q_st + c] = o;
            }
        }
        if (lid == 0u && (P.flags & FLAG_LSE) != 0u) {
            var lse = f32_neg_inf();
            if (l != 0.0) {
                var shift = 0.0;
                if ((P.flags & FLAG_SMOOTH) != 0u) { shift = bitcast<f32>(ws[P.off_qdelta + bh * P.seq_q + row]); }
                lse = (m_sh[r] + log2(l) + shift) * 0.6931471805599453;
            }
            lse_out[bh * P.seq_q + row] = lse;
        }
    }
}
