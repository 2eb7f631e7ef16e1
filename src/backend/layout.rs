//! What the GPU kernels (WGSL and CUDA alike) read: the parameter block and where each
//! quantized operand lives in the workspace. `Params` matches `struct Params` in
//! shaders/common.wgsl and kernels/common.cuh field for field.

use crate::numerics::p::NVFP4_RANGE;
use crate::numerics::{padded_dim, QkCodes, Quantized, VCodes, MEAN_BLOCK};
use crate::recipe::{Groups, Recipe};
use crate::spec::{AttentionSpec, DType, Plan};

/// The recipe number the shaders switch on (R_* in common.wgsl).
pub fn recipe_id(r: Recipe) -> u32 {
    match r {
        Recipe::Exact => 0,
        Recipe::Int8QkF16Pv => 1,
        Recipe::Int8QkFp8Pv { .. } => 2,
        Recipe::Nvfp4 => 3,
        Recipe::Nvfp4P { .. } => 4,
        Recipe::Fp8P { .. } => 5,
    }
}

/// The parameter block of the kernels' `Params`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub batch: u32,
    pub heads_q: u32,
    pub heads_kv: u32,
    pub seq_q: u32,
    pub seq_kv: u32,
    pub head_dim: u32,
    pub dp: u32,
    pub group: u32,
    pub q_sb: u32,
    pub q_sh: u32,
    pub q_st: u32,
    pub kv_sb: u32,
    pub kv_sh: u32,
    pub kv_st: u32,
    pub dtype: u32,
    pub flags: u32,
    pub q_blocks: u32,
    pub k_blocks: u32,
    pub fold: f32,
    pub score_scale: f32,
    pub inv_g: f32,
    pub g: f32,
    pub mode: u32,
    pub count: u32,
    pub off_kmean: u32,
    pub off_qdelta: u32,
    pub off_qcodes: u32,
    pub off_qscales: u32,
    pub off_kcodes: u32,
    pub off_kscales: u32,
    pub off_vcodes: u32,
    pub off_vscales: u32,
    pub q_gblock: u32,
    pub q_ginter: u32,
    pub k_gblock: u32,
    pub k_ginter: u32,
    pub np: u32,
    pub off_vinv: u32,
    pub recipe: u32,
    /// K-mean partial sums, one per 64-token block and channel (before the mean).
    pub off_kpart: u32,
    /// N:M sparse softmax (nm_n = 0: dense), and its dense windows.
    pub nm_n: u32,
    pub nm_m: u32,
    pub nm_sink: u32,
    pub nm_recent: u32,
    /// Skip-softmax (skip_on = 1): log2 λ, and the per-query-tile (visited, skipped) counters.
    pub skip_log2: f32,
    pub off_tiles: u32,
    pub skip_on: u32,
    pub pad1: u32,
    /// V → NVFP4 (FLAG_VNVFP4): the quantizer's multiplier 1/g and the output's g.
    pub v_inv_g: f32,
    pub v_g: f32,
    /// FP8 P (Int8QkFp8Pv, Fp8P): log2 of P's multiplier before E4M3 (448, inv_g), which the
    /// tensor-core kernel adds in the exponent instead of multiplying every p (0 otherwise).
    pub p_log2: f32,
    pub pad3: u32,
}

pub const FLAG_CAUSAL: u32 = 1;
pub const FLAG_LSE: u32 = 2;
pub const FLAG_MASK: u32 = 4;
pub const FLAG_SMOOTH: u32 = 8;
pub const FLAG_VNVFP4: u32 = 16;
/// The tensor-core kernel's grid is (b·h, query blocks), last query block first (CUDA, causal).
pub const FLAG_HEAVY_FIRST: u32 = 32;
/// Nvfp4P on 16-bit inputs with a power-of-two amax_P (the default 1): p·inv_g is exact, and
/// the tensor-core kernel takes p·inv_g / s as one multiply (kernels/attention_mma.cu).
pub const FLAG_P_DIRECT: u32 = 64;
pub const MODE_Q: u32 = 0;
pub const MODE_K: u32 = 1;

/// Where each quantized operand lives in the workspace (u32 words), and its total size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Workspace {
    pub kmean: u32,
    pub qdelta: u32,
    pub qcodes: u32,
    pub qscales: u32,
    pub kcodes: u32,
    pub kscales: u32,
    pub vcodes: u32,
    pub vscales: u32,
    pub vinv: u32,
    pub kpart: u32,
    /// Skip-softmax counters: (visited, skipped) per (batch·head, 16-row query tile).
    pub tiles: u32,
    pub words: u64,
}

impl Workspace {
    pub fn new(plan: &Plan) -> Workspace {
        let s = &plan.spec;
        let (b, hq, hk, nq, nk, d) = (
            s.batch as u64,
            s.heads_q as u64,
            s.heads_kv as u64,
            s.seq_q as u64,
            s.seq_kv as u64,
            s.head_dim as u64,
        );
        let dp = padded_dim(s.head_dim) as u64;
        let np = padded_dim(s.seq_kv) as u64;
        let mut w = Workspace::default();
        let mut at = 0u64;
        // Every operand starts on a 16-byte boundary: the tensor-core kernel copies 16 bytes at a time.
        let mut take = |n: u64| {
            let o = at.next_multiple_of(4);
            at = o + n;
            o as u32
        };
        if s.recipe.smooths_k() {
            w.kmean = take(b * hk * d);
            w.qdelta = take(b * hq * nq);
            w.kpart = take(b * hk * nk.div_ceil(MEAN_BLOCK as u64) * d);
        }
        match s.recipe {
            Recipe::Int8QkF16Pv | Recipe::Int8QkFp8Pv { .. } => {
                let (qg, kg) = (s.recipe.q_groups().unwrap(), s.recipe.k_groups().unwrap());
                w.qcodes = take(b * hq * nq * dp / 4);
                w.qscales = take(b * hq * qg.count(s.seq_q) as u64);
                w.kcodes = take(b * hk * nk * dp / 4);
                w.kscales = take(b * hk * kg.count(s.seq_kv) as u64);
            }
            Recipe::Nvfp4 => {
                w.qcodes = take(b * hq * nq * dp / 4);
                w.qscales = take(b * hq * nq * dp / 16);
                w.kcodes = take(b * hk * nk * dp / 4);
                w.kscales = take(b * hk * nk * dp / 16);
            }
            _ => {}
        }
        match s.recipe {
            Recipe::Int8QkFp8Pv { .. } => {
                w.vcodes = take(b * hk * nk * dp / 4);
                w.vscales = take(b * hk * dp);
                w.vinv = take(b * hk * dp);
            }
            _ if s.v_nvfp4_codes() => {
                w.vcodes = take(b * hk * dp * np / 4);
                w.vscales = take(b * hk * dp * np / 16);
            }
            _ => {}
        }
        if s.skip_softmax.is_some() {
            w.tiles = take(2 * b * hq * nq.div_ceil(crate::sparsity::SKIP_ROWS as u64));
        }
        w.words = at.max(1);
        w
    }
}

/// Whether Nvfp4P's P may take the direct path (FLAG_P_DIRECT; kernels/mma_p.cuh, p_nvfp4):
/// 16-bit inputs and an amax_P that is a power of two whose inv_g = 2688 / amax_P (as `params`
/// passes it) is finite, i.e. amax_P ≥ 2^-116: the path's scale codes take amax / 6 as
/// p·inv_g / 6, exact only then.
pub fn p_direct_allowed(s: &AttentionSpec) -> bool {
    let Recipe::Nvfp4P { amax_p } = s.recipe else {
        return false;
    };
    let power_of_two = amax_p.is_normal() && amax_p > 0.0 && amax_p.to_bits() & 0x7f_ffff == 0;
    s.dtype != DType::F32
        && power_of_two
        && crate::numerics::div_rn(NVFP4_RANGE, amax_p).is_finite()
}

/// The parameter block for `plan` (mode and count are set per dispatch).
pub fn params(plan: &Plan, ws: &Workspace) -> Params {
    let s = &plan.spec;
    let groups = |g: Option<Groups>| g.map_or((1, 1), |g| (g.block as u32, g.interleave as u32));
    let (q_gblock, q_ginter) = groups(s.recipe.q_groups());
    let (k_gblock, k_ginter) = groups(s.recipe.k_groups());
    let mut flags = 0;
    if s.causal {
        flags |= FLAG_CAUSAL;
    }
    if s.return_lse {
        flags |= FLAG_LSE;
    }
    if matches!(s.sparsity, crate::Sparsity::BlockMask(_)) {
        flags |= FLAG_MASK;
    }
    if s.recipe.smooths_k() {
        flags |= FLAG_SMOOTH;
    }
    if s.v_nvfp4.is_some() {
        flags |= FLAG_VNVFP4;
    }
    let (v_inv_g, v_g) = s.v_nvfp4.map_or((1.0, 1.0), |vq| vq.global_scale());
    // P's global scale: g = amax_p / (6·448) for NVFP4, s = amax_p / 448 for FP8; the kernels
    // multiply p by inv_g and fold g out of the product.
    let (amax_p, range) = match s.recipe {
        Recipe::Nvfp4P { amax_p } => (amax_p, NVFP4_RANGE),
        Recipe::Fp8P { amax_p } => (amax_p, crate::recipe::E4M3_MAX),
        _ => (1.0, NVFP4_RANGE),
    };
    if p_direct_allowed(s) {
        flags |= FLAG_P_DIRECT;
    }
    Params {
        batch: s.batch as u32,
        heads_q: s.heads_q as u32,
        heads_kv: s.heads_kv as u32,
        seq_q: s.seq_q as u32,
        seq_kv: s.seq_kv as u32,
        head_dim: s.head_dim as u32,
        dp: padded_dim(s.head_dim) as u32,
        group: plan.group() as u32,
        q_sb: plan.q.batch as u32,
        q_sh: plan.q.head as u32,
        q_st: plan.q.token as u32,
        kv_sb: plan.kv.batch as u32,
        kv_sh: plan.kv.head as u32,
        kv_st: plan.kv.token as u32,
        dtype: match s.dtype {
            DType::F16 => 0,
            DType::BF16 => 1,
            DType::F32 => 2,
        },
        flags,
        q_blocks: plan.q_blocks as u32,
        k_blocks: plan.k_blocks as u32,
        fold: plan.q_fold(),
        score_scale: plan.q_fold(),
        inv_g: crate::numerics::div_rn(range, amax_p),
        g: crate::numerics::div_rn(amax_p, range),
        mode: 0,
        count: 0,
        off_kmean: ws.kmean,
        off_qdelta: ws.qdelta,
        off_qcodes: ws.qcodes,
        off_qscales: ws.qscales,
        off_kcodes: ws.kcodes,
        off_kscales: ws.kscales,
        off_vcodes: ws.vcodes,
        off_vscales: ws.vscales,
        q_gblock,
        q_ginter,
        k_gblock,
        k_ginter,
        np: padded_dim(s.seq_kv) as u32,
        off_vinv: ws.vinv,
        recipe: recipe_id(s.recipe),
        off_kpart: ws.kpart,
        nm_n: s.nm_softmax.map_or(0, |n| n.n),
        nm_m: s.nm_softmax.map_or(4, |n| n.m),
        nm_sink: s
            .nm_softmax
            .map_or(0, |n| n.dense_sink_tokens.min(i32::MAX as usize) as u32),
        nm_recent: s
            .nm_softmax
            .map_or(0, |n| n.dense_recent_tokens.min(i32::MAX as usize) as u32),
        skip_log2: s
            .skip_softmax
            .map_or(0.0, |k| k.log2_lambda(s.seq_kv) as f32),
        off_tiles: ws.tiles,
        skip_on: s.skip_softmax.is_some() as u32,
        pad1: 0,
        v_inv_g,
        v_g,
        p_log2: match s.recipe {
            Recipe::Int8QkFp8Pv { .. } => f64::from(crate::recipe::E4M3_MAX).log2() as f32,
            Recipe::Fp8P { .. } => f64::from(crate::numerics::div_rn(range, amax_p)).log2() as f32,
            _ => 0.0,
        },
        pad3: 0,
    }
}

/// Sum the per-query-tile skip-softmax counters (the `tiles` words of a workspace).
pub fn sum_tile_counts(words: &[u32]) -> crate::sparsity::TileCounts {
    let mut t = crate::sparsity::TileCounts::default();
    for pair in words.chunks_exact(2) {
        t.visited += pair[0] as u64;
        t.skipped += pair[1] as u64;
    }
    t
}

/// How many counter words the workspace holds (2 per (batch·head, query tile)).
pub fn tile_count_words(plan: &Plan) -> usize {
    let s = &plan.spec;
    if s.skip_softmax.is_none() {
        return 0;
    }
    2 * s.batch * s.heads_q * s.seq_q.div_ceil(crate::sparsity::SKIP_ROWS)
}

/// Read a workspace (downloaded from either GPU backend) into the host [`Quantized`].
pub fn unpack_workspace(plan: &Plan, l: &Workspace, ws: &[u32]) -> Quantized {
    let s = &plan.spec;
    let (b, hq, hk, nq, nk, d) = (
        s.batch, s.heads_q, s.heads_kv, s.seq_q, s.seq_kv, s.head_dim,
    );
    let dp = padded_dim(d);
    let np = padded_dim(nk);
    let f32s = |off: u32, n: usize| -> Vec<f32> {
        ws[off as usize..][..n]
            .iter()
            .map(|&w| f32::from_bits(w))
            .collect()
    };
    let bytes = |off: u32, n: usize| -> Vec<u8> {
        bytemuck::cast_slice::<u32, u8>(&ws[off as usize..][..n / 4]).to_vec()
    };
    let low_bytes = |off: u32, n: usize| -> Vec<u8> {
        ws[off as usize..][..n].iter().map(|&w| w as u8).collect()
    };
    let mut out = Quantized::default();
    if s.recipe.smooths_k() {
        out.k_mean = Some(f32s(l.kmean, b * hk * d));
        out.q_delta = Some(f32s(l.qdelta, b * hq * nq));
    }
    match s.recipe {
        Recipe::Int8QkF16Pv | Recipe::Int8QkFp8Pv { .. } => {
            let (qg, kg) = (s.recipe.q_groups().unwrap(), s.recipe.k_groups().unwrap());
            let i8s = |v: Vec<u8>| v.into_iter().map(|x| x as i8).collect();
            out.q = QkCodes::Int8 {
                codes: i8s(bytes(l.qcodes, b * hq * nq * dp)),
                scales: f32s(l.qscales, b * hq * qg.count(nq)),
            };
            out.k = QkCodes::Int8 {
                codes: i8s(bytes(l.kcodes, b * hk * nk * dp)),
                scales: f32s(l.kscales, b * hk * kg.count(nk)),
            };
        }
        Recipe::Nvfp4 => {
            out.q = QkCodes::Nvfp4 {
                codes: bytes(l.qcodes, b * hq * nq * dp),
                scales: low_bytes(l.qscales, b * hq * nq * dp / 16),
            };
            out.k = QkCodes::Nvfp4 {
                codes: bytes(l.kcodes, b * hk * nk * dp),
                scales: low_bytes(l.kscales, b * hk * nk * dp / 16),
            };
        }
        _ => {}
    }
    match s.recipe {
        Recipe::Int8QkFp8Pv { .. } => {
            out.v = VCodes::Fp8 {
                codes: bytes(l.vcodes, b * hk * nk * dp),
                scales: f32s(l.vscales, b * hk * dp),
            }
        }
        _ if s.v_nvfp4_codes() => {
            out.v = VCodes::Nvfp4 {
                codes: bytes(l.vcodes, b * hk * dp * np),
                scales: low_bytes(l.vscales, b * hk * dp * np / 16),
            }
        }
        _ => {}
    }
    out
}

/// Which input a quantization kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Q,
    K,
    V,
}

/// One launch of a quantization kernel: its entry point, the `mode` it reads Params with, the
/// input it reads, and how many work items it covers: `threads` items of one invocation each,
/// or `groups` items of one 64-wide workgroup each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantStep {
    pub entry: &'static str,
    pub mode: u32,
    pub src: Source,
    pub threads: u32,
    pub groups: u32,
}

impl QuantStep {
    /// Workgroups / thread blocks of 64 to launch.
    pub fn workgroups(&self) -> u32 {
        if self.groups > 0 {
            self.groups
        } else {
            self.threads.div_ceil(64).max(1)
        }
    }
}

/// The quantization kernels a recipe runs before the attention, in order (the same on every
/// GPU backend; the entry points exist in shaders/quant.wgsl and kernels/quant.cu, except that
/// CUDA runs `fp8_v_scale` as two parallel kernels, fp8_v_amax and fp8_v_scale_from_amax).
pub fn quant_steps(plan: &Plan) -> Vec<QuantStep> {
    let s = &plan.spec;
    let (b, hq, hk, nq, nk, d) = (
        s.batch as u32,
        s.heads_q as u32,
        s.heads_kv as u32,
        s.seq_q as u32,
        s.seq_kv as u32,
        s.head_dim as u32,
    );
    let dp = padded_dim(s.head_dim) as u32;
    let np = padded_dim(s.seq_kv) as u32;
    let t = |entry, mode, src, threads| QuantStep {
        entry,
        mode,
        src,
        threads,
        groups: 0,
    };
    let mut steps = Vec::new();
    if s.recipe.smooths_k() {
        let blocks = nk.div_ceil(MEAN_BLOCK as u32);
        steps.push(t("k_block_sums", MODE_K, Source::K, b * hk * blocks * d));
        steps.push(t("k_mean", MODE_K, Source::K, b * hk * d));
        steps.push(t("q_delta", MODE_Q, Source::Q, b * hq * nq));
    }
    match s.recipe {
        Recipe::Int8QkF16Pv | Recipe::Int8QkFp8Pv { .. } => {
            let (qg, kg) = (
                s.recipe.q_groups().unwrap_or(Groups {
                    block: 1,
                    interleave: 1,
                }),
                s.recipe.k_groups().unwrap_or(Groups {
                    block: 1,
                    interleave: 1,
                }),
            );
            steps.push(QuantStep {
                entry: "int8_qk",
                mode: MODE_Q,
                src: Source::Q,
                threads: 0,
                groups: b * hq * qg.count(s.seq_q) as u32,
            });
            steps.push(QuantStep {
                entry: "int8_qk",
                mode: MODE_K,
                src: Source::K,
                threads: 0,
                groups: b * hk * kg.count(s.seq_kv) as u32,
            });
        }
        Recipe::Nvfp4 => {
            steps.push(t("nvfp4_qk", MODE_Q, Source::Q, b * hq * nq * dp / 16));
            steps.push(t("nvfp4_qk", MODE_K, Source::K, b * hk * nk * dp / 16));
        }
        _ => {}
    }
    match s.recipe {
        Recipe::Int8QkFp8Pv { .. } => {
            steps.push(t("fp8_v_scale", MODE_K, Source::V, b * hk * dp));
            steps.push(t("fp8_v_codes", MODE_K, Source::V, b * hk * nk * dp / 4));
        }
        _ if s.v_nvfp4_codes() => {
            steps.push(t("nvfp4_v", MODE_K, Source::V, b * hk * dp * np / 16))
        }
        _ => {}
    }
    steps
}
