// quant.wgsl: the quantizers of Q, K and V (twins of src/numerics/quant.rs), writing codes and
// scales into the workspace `ws` at the offsets in Params. Also the f32 → f16/bf16 output pack.
// Layouts (u32 words; B, H, N, Dp as in quant.rs):
//   INT8 codes [B,H,N,Dp/4] (4 per word), scales [B,H,groups] f32
//   FP8 V codes [B,H,N,Dp/4], scales and reciprocals [B,H,Dp] f32
//   NVFP4 Q/K codes [B,H,N,Dp/4] (one E2M1 code per byte), scales [B,H,N,Dp/16] (one per word)
//   NVFP4 V codes [B,H,Dp,Np/4], scales [B,H,Dp,Np/16]

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> ws: array<u32>;

const MODE_Q: u32 = 0u;
const MODE_K: u32 = 1u;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

fn src_val(idx: u32) -> f32 {
    return decode(src[word_index(idx, P.dtype)], idx, P.dtype);
}

fn heads_of_mode() -> u32 {
    return select(P.heads_kv, P.heads_q, P.mode == MODE_Q);
}

// The value a Q/K quantizer sees: q · sm_scale · log2(e), or k − mean(k) when smoothing.
fn qk_value(bh: u32, t: u32, c: u32) -> f32 {
    let heads = heads_of_mode();
    let b = bh / heads;
    let h = bh % heads;
    if (P.mode == MODE_Q) {
        return ftz(src_val(b * P.q_sb + h * P.q_sh + t * P.q_st + c) * P.fold);
    }
    let x = src_val(b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c);
    if ((P.flags & FLAG_SMOOTH) != 0u) {
        return ftz(x - bitcast<f32>(ws[P.off_kmean + bh * P.head_dim + c]));
    }
    return x;
}

// Per-channel mean of K over tokens in two passes: each 64-token block's f32 sum in token order
// (partials [b·hk][block][d]); then the partials in block order, and RN(sum / N).
const MEAN_BLOCK: u32 = 64u;

@compute @workgroup_size(64)
fn k_block_sums(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    let nb = (P.seq_kv + MEAN_BLOCK - 1u) / MEAN_BLOCK;
    if (id >= P.batch * P.heads_kv * nb * P.head_dim) { return; }
    let c = id % P.head_dim;
    let blk = (id / P.head_dim) % nb;
    let bh = id / P.head_dim / nb;
    let b = bh / P.heads_kv;
    let h = bh % P.heads_kv;
    let t_end = min(blk * MEAN_BLOCK + MEAN_BLOCK, P.seq_kv);
    var sum = 0.0;
    for (var t = blk * MEAN_BLOCK; t < t_end; t++) {
        sum = sum + src_val(b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c);
    }
    ws[P.off_kpart + id] = bitcast<u32>(sum);
}

@compute @workgroup_size(64)
fn k_mean(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    if (id >= P.batch * P.heads_kv * P.head_dim) { return; }
    let bh = id / P.head_dim;
    let c = id % P.head_dim;
    let nb = (P.seq_kv + MEAN_BLOCK - 1u) / MEAN_BLOCK;
    var sum = 0.0;
    for (var blk = 0u; blk < nb; blk++) {
        sum = sum + bitcast<f32>(ws[P.off_kpart + (bh * nb + blk) * P.head_dim + c]);
    }
    ws[P.off_kmean + id] = bitcast<u32>(ftz(div_rn(sum, f32(P.seq_kv))));
}

// Per query row, the base-2 score shift that smoothing K removed: (q·fold)·mean(K).
@compute @workgroup_size(64)
fn q_delta(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    if (id >= P.batch * P.heads_q * P.seq_q) { return; }
    let bh = id / P.seq_q;
    let i = id % P.seq_q;
    let bkv = (bh / P.heads_q) * P.heads_kv + (bh % P.heads_q) / P.group;
    var d = 0.0;
    for (var c = 0u; c < P.head_dim; c++) {
        d = d + qk_value(bh, i, c) * bitcast<f32>(ws[P.off_kmean + bkv * P.head_dim + c]);
    }
    ws[P.off_qdelta + id] = bitcast<u32>(d);
}

var<workgroup> group_scale: vec2<f32>;

// INT8 Q or K: one workgroup per token group.
@compute @workgroup_size(64)
fn int8_qk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let is_q = P.mode == MODE_Q;
    let n = select(P.seq_kv, P.seq_q, is_q);
    let block = select(P.k_gblock, P.q_gblock, is_q);
    let inter = select(P.k_ginter, P.q_ginter, is_q);
    let ng = group_count(n, block, inter);
    let wg = wid.x + wid.y * nwg.x;
    let valid = wg < heads_of_mode() * P.batch * ng;   // uniform across the workgroup
    let bh = wg / ng;
    let gi = wg % ng;
    let t0 = (gi / inter) * block + gi % inter;
    let per = block / inter;            // tokens per group (fewer at the ragged end)
    let dw = P.dp / 4u;
    var amax = 0u;
    if (valid) {
        for (var e = lid; e < per * P.head_dim; e += 64u) {
            let t = t0 + (e / P.head_dim) * inter;
            if (t < n) { amax = max(amax, abs_bits(qk_value(bh, t, e % P.head_dim))); }
        }
    }
    // A max over bit patterns: the same bits whatever the reduction order.
    let a = workgroup_max_u32(amax, lid);
    if (lid == 0u && valid) {
        var inv = 0.0;
        var scale = 0.0;
        if (non_finite(a)) {
            scale = f32_nan();
        } else if (a >= TINY_BITS) {
            inv = div_rn(127.0, bitcast<f32>(a));
            scale = div_rn(bitcast<f32>(a), 127.0);
        }
        group_scale = vec2<f32>(inv, scale);
        let off = select(P.off_kscales, P.off_qscales, is_q);
        ws[off + bh * ng + gi] = bitcast<u32>(scale);
    }
    workgroupBarrier();
    if (!valid) { return; }
    let gs = group_scale;
    let finite = gs.y > 0.0;          // false for zero and NaN scales: codes 0
    let off = select(P.off_kcodes, P.off_qcodes, is_q);
    for (var e = lid; e < per * dw; e += 64u) {
        let t = t0 + (e / dw) * inter;
        if (t >= n) { continue; }
        let w = e % dw;
        var word = 0u;
        for (var k = 0u; k < 4u; k++) {
            let c = w * 4u + k;
            if (c < P.head_dim && finite) {
                word = word | ((u32(int8_round(qk_value(bh, t, c) * gs.x)) & 0xffu) << (8u * k));
            }
        }
        ws[off + (bh * n + t) * dw + w] = word;
    }
}

// FP8 V, pass 1: per-channel scale amax/448 and reciprocal 448/amax (serial over tokens).
@compute @workgroup_size(64)
fn fp8_v_scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    if (id >= P.batch * P.heads_kv * P.dp) { return; }
    let bh = id / P.dp;
    let c = id % P.dp;
    let b = bh / P.heads_kv;
    let h = bh % P.heads_kv;
    var amax = 0u;
    if (c < P.head_dim) {
        for (var t = 0u; t < P.seq_kv; t++) {
            amax = max(amax, abs_bits(src_val(b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c)));
        }
    }
    var inv = 0.0;
    var scale = 0.0;
    if (non_finite(amax)) {
        scale = f32_nan();
    } else if (amax >= TINY_BITS) {
        inv = div_rn(448.0, bitcast<f32>(amax));
        scale = div_rn(bitcast<f32>(amax), 448.0);
    }
    ws[P.off_vscales + id] = bitcast<u32>(scale);
    ws[P.off_vinv + id] = bitcast<u32>(inv);
}

// FP8 V, pass 2: one word (4 channels) per invocation.
@compute @workgroup_size(64)
fn fp8_v_codes(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    let dw = P.dp / 4u;
    if (id >= P.batch * P.heads_kv * P.seq_kv * dw) { return; }
    let w = id % dw;
    let row = id / dw;               // bh * N + t
    let t = row % P.seq_kv;
    let bh = row / P.seq_kv;
    let b = bh / P.heads_kv;
    let h = bh % P.heads_kv;
    var word = 0u;
    for (var k = 0u; k < 4u; k++) {
        let c = w * 4u + k;
        if (c < P.head_dim) {
            let scale = bitcast<f32>(ws[P.off_vscales + bh * P.dp + c]);
            if (scale > 0.0) {
                let x = src_val(b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c);
                word = word | (e4m3_from_f32(x * bitcast<f32>(ws[P.off_vinv + bh * P.dp + c])) << (8u * k));
            }
        }
    }
    ws[P.off_vcodes + id] = word;
}

// Quantize 16 values to NVFP4: 4 code words at ws[code_off..], the scale at ws[scale_at].
fn nvfp4_store(xs: ptr<function, array<f32, 16>>, code_off: u32, scale_at: u32) {
    var amax = 0u;
    for (var i = 0u; i < 16u; i++) { amax = max(amax, abs_bits((*xs)[i])); }
    let sc = nvfp4_scale_code(amax);
    var s = 0.0;
    if (sc != E4M3_NAN) { s = e4m3_to_f32(sc); }
    for (var w = 0u; w < 4u; w++) {
        var word = 0u;
        for (var k = 0u; k < 4u; k++) {
            word = word | (e2m1_code_of_ratio((*xs)[w * 4u + k], s) << (8u * k));
        }
        ws[code_off + w] = word;
    }
    ws[scale_at] = sc;
}

// NVFP4 Q or K: one block of 16 channels of one token per invocation.
@compute @workgroup_size(64)
fn nvfp4_qk(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    let is_q = P.mode == MODE_Q;
    let n = select(P.seq_kv, P.seq_q, is_q);
    let nb = P.dp / 16u;
    if (id >= P.batch * heads_of_mode() * n * nb) { return; }
    let blk = id % nb;
    let row = id / nb;              // bh * n + t
    let t = row % n;
    let bh = row / n;
    var xs: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        let c = blk * 16u + i;
        xs[i] = 0.0;
        if (c < P.head_dim) { xs[i] = qk_value(bh, t, c); }
    }
    let code_off = select(P.off_kcodes, P.off_qcodes, is_q) + row * (P.dp / 4u) + blk * 4u;
    let scale_at = select(P.off_kscales, P.off_qscales, is_q) + id;
    nvfp4_store(&xs, code_off, scale_at);
}

// NVFP4 V: one block of 16 tokens of one channel per invocation (channel-major).
@compute @workgroup_size(64)
fn nvfp4_v(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    let nb = P.np / 16u;
    if (id >= P.batch * P.heads_kv * P.dp * nb) { return; }
    let tb = id % nb;
    let chan = id / nb;             // bh * dp + c
    let c = chan % P.dp;
    let bh = chan / P.dp;
    let b = bh / P.heads_kv;
    let h = bh % P.heads_kv;
    var xs: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        let t = tb * 16u + i;
        xs[i] = 0.0;
        // V → NVFP4 quantizes v / g as RN(v · (1/g)) (v_inv_g = 1 for the Nvfp4 recipe).
        if (t < P.seq_kv && c < P.head_dim) { xs[i] = ftz(src_val(b * P.kv_sb + h * P.kv_sh + t * P.kv_st + c) * P.v_inv_g); }
    }
    nvfp4_store(&xs, P.off_vcodes + chan * (P.np / 4u) + tb * 4u, P.off_vscales + id);
}

// Output pack: f32 (src) → f16/bf16 words (ws is the caller's output here), nearest-even.
@compute @workgroup_size(64)
fn pack_out(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    if (id >= P.count) { return; }
    let n = P.batch * P.heads_q * P.seq_q * P.head_dim;
    var word = 0u;
    for (var k = 0u; k < 2u; k++) {
        let e = id * 2u + k;
        if (e < n) {
            let x = bitcast<f32>(src[e]);
            let h = select(f32_to_bf16_bits(x), f32_to_f16_bits(x), P.dtype == DT_F16);
            word = word | (h << (16u * k));
        }
    }
    ws[id] = word;
}

// Test probe: every scalar helper applied to raw f32 inputs (no flushing), so tests can check
// them bit for bit against src/numerics/formats.rs on edge values. 8 words per input.
@compute @workgroup_size(64)
fn scalar_probe(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = linear_id(gid, nwg);
    if (id >= P.count) { return; }
    let x = bitcast<f32>(src[id]);
    let o = id * 8u;
    ws[o + 0u] = e4m3_from_f32(x);
    ws[o + 1u] = u32(int8_round(x));
    ws[o + 2u] = e2m1_code_of_ratio(x, 1.0);
    ws[o + 3u] = e2m1_code_of_ratio(x, P.fold);
    ws[o + 4u] = f32_to_f16_bits(x);
    ws[o + 5u] = f32_to_bf16_bits(x);
    ws[o + 6u] = bitcast<u32>(div_rn(x, P.score_scale));
    ws[o + 7u] = bitcast<u32>(decode(src[id], 0u, DT_F16));
}
