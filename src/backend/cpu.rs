//! The CPU reference: the recipes' quantizers bit-exact (from `numerics`), the attention in f64.
//! It defines what every other backend must compute.

use crate::numerics::formats::{e2m1_to_f32, e4m3_to_f32, E4M3_NAN};
use crate::numerics::p::quantize_p_row;
use crate::numerics::quant::{padded_dim, quantize, QkCodes, Quantized, VCodes};
use crate::recipe::{FP4_BLOCK, KV_BLOCK, Q_BLOCK};
use crate::sparsity::{skip_decision, TileCounts, SKIP_ROWS};
use crate::spec::Plan;

/// Output of the reference: o in the caller's layout (f32), the LSE [B, Hq, Nq] and the
/// quantized operands.
#[derive(Debug, Clone)]
pub struct Reference {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
    pub quantized: Quantized,
    /// Skip-softmax's tile counts, when the spec asks for it.
    pub tiles: Option<TileCounts>,
}

/// One (batch, head)'s operand of a product, as f64: `rows` [N, Dp] holds INT8 codes or
/// dequantized values, `scale` a per-token multiplier (the INT8 group scale, else 1).
struct Operand {
    rows: Vec<f64>,
    scale: Vec<f64>,
    dp: usize,
    /// Whether sm_scale·log2(e) is already inside (quantized Q); else the scores are scaled after.
    folded: bool,
}

impl Operand {
    fn row(&self, t: usize) -> &[f64] {
        &self.rows[t * self.dp..][..self.dp]
    }
}

/// Run the reference on decoded inputs (f32, subnormals flushed, caller's layout).
/// `rows`: when Some, only these query indices are computed (for every batch and head); the
/// other outputs stay NaN.
pub fn reference(
    plan: &Plan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: Option<&[usize]>,
) -> Reference {
    let s = &plan.spec;
    let quantized = quantize(plan, q, k, v);
    let all: Vec<usize> = (0..s.seq_q).collect();
    let rows = rows.unwrap_or(&all);
    let jobs: Vec<(usize, usize)> = (0..s.batch)
        .flat_map(|b| (0..s.heads_q).map(move |h| (b, h)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    type RowOut = (usize, usize, usize, Vec<f64>, f64);
    let results: Vec<(Vec<RowOut>, TileCounts)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (jobs, quantized) = (&jobs, &quantized);
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut counts = TileCounts::default();
                    for &(b, h) in jobs.iter().skip(t).step_by(threads) {
                        let hkv = h / plan.group();
                        let qo = q_operand(plan, quantized, q, b, h);
                        let ko = k_operand(plan, quantized, k, b, hkv);
                        let vo = v_operand(plan, quantized, v, b, hkv);
                        let skip = skip_table(plan, &qo, &ko, b, h, &mut counts);
                        for &i in rows {
                            let tile = &skip[(i / SKIP_ROWS) * plan.k_blocks..][..plan.k_blocks];
                            let (o, lse) =
                                attend_row(plan, &qo, &ko, &vo, quantized, b, h, i, tile);
                            out.push((b, h, i, o, lse));
                        }
                    }
                    (out, counts)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut o = vec![f32::NAN; plan.q_len];
    let mut lse = vec![f32::NAN; plan.lse_len()];
    let mut tiles = TileCounts::default();
    for (b, h, i, row, l) in results.into_iter().flat_map(|(rows, counts)| {
        tiles += counts;
        rows
    }) {
        let at = plan.q.row(b, h, i);
        for (dst, x) in o[at..at + s.head_dim].iter_mut().zip(&row) {
            *dst = *x as f32;
        }
        lse[(b * s.heads_q + h) * s.seq_q + i] = l as f32;
    }
    Reference {
        o,
        lse,
        quantized,
        tiles: s.skip_softmax.map(|_| tiles),
    }
}

/// A query row's factor on its dot products: σq (INT8) times sm_scale·log2(e) where the recipe
/// reads raw inputs (the quantized ones folded it into Q before quantizing).
fn q_factor(plan: &Plan, qo: &Operand, i: usize) -> f64 {
    let post = if qo.folded { 1.0 } else { plan.q_fold() as f64 };
    qo.scale.get(i).copied().unwrap_or(1.0) * post
}

/// The base-2 score of query i and key j.
fn score(qo: &Operand, ko: &Operand, i: usize, j: usize, q_factor: f64) -> f64 {
    let dot: f64 = qo.row(i).iter().zip(ko.row(j)).map(|(a, c)| a * c).sum();
    dot * q_factor * ko.scale.get(j).copied().unwrap_or(1.0)
}

/// Skip-softmax's decisions for one (batch, head): `true` at [query tile · k_blocks + kb] when
/// KV tile kb is skipped for that tile of SKIP_ROWS rows (all false without skip-softmax).
/// Walks each query tile's KV tiles in order with the running maxima of the visited ones.
fn skip_table(
    plan: &Plan,
    qo: &Operand,
    ko: &Operand,
    b: usize,
    h: usize,
    counts: &mut TileCounts,
) -> Vec<bool> {
    let s = &plan.spec;
    let q_tiles = s.seq_q.div_ceil(SKIP_ROWS);
    let mut skip = vec![false; q_tiles * plan.k_blocks];
    let Some(rule) = s.skip_softmax else {
        return skip;
    };
    let log2_lambda = rule.log2_lambda(s.seq_kv);
    for qt in 0..q_tiles {
        let rows = qt * SKIP_ROWS..((qt + 1) * SKIP_ROWS).min(s.seq_q);
        let factors: Vec<f64> = rows.clone().map(|i| q_factor(plan, qo, i)).collect();
        let mut running = vec![f64::NEG_INFINITY; rows.len()];
        let mut tile_max = vec![f64::NEG_INFINITY; rows.len()];
        for kb in 0..plan.k_blocks {
            if !s.sparsity.keeps(plan, b, h, rows.start / Q_BLOCK, kb) {
                continue;
            }
            for (r, i) in rows.clone().enumerate() {
                // The max survives N:M selection (it ranks first), so it is taken over all
                // visible keys.
                tile_max[r] = (kb * KV_BLOCK..((kb + 1) * KV_BLOCK).min(s.seq_kv))
                    .filter(|&j| plan.causal_visible(i, j))
                    .map(|j| score(qo, ko, i, j, factors[r]))
                    .fold(f64::NEG_INFINITY, nan_max);
            }
            match skip_decision(&tile_max, &running, log2_lambda) {
                None => {}
                Some(true) => {
                    skip[qt * plan.k_blocks + kb] = true;
                    counts.skipped += 1;
                }
                Some(false) => {
                    counts.visited += 1;
                    for (m, &t) in running.iter_mut().zip(&tile_max) {
                        *m = nan_max(*m, t);
                    }
                }
            }
        }
    }
    skip
}

/// The online softmax over KV tiles of 64 keys for one query row, in f64.
/// Returns the output row and the LSE (natural log).
#[allow(clippy::too_many_arguments)]
fn attend_row(
    plan: &Plan,
    qo: &Operand,
    ko: &Operand,
    vo: &Operand,
    qz: &Quantized,
    b: usize,
    h: usize,
    i: usize,
    skipped: &[bool],
) -> (Vec<f64>, f64) {
    let s = &plan.spec;
    let (nk, d) = (s.seq_kv, s.head_dim);
    // Exact-input recipes scale the dot product by sm_scale·log2(e), the f32 every backend uses
    // (base-2 scores); the quantized ones folded it into Q before quantizing.
    let qs = q_factor(plan, qo, i);
    let (mut m, mut l) = (f64::NEG_INFINITY, 0f64);
    let mut acc = vec![0f64; d];
    let mut sc = [0f64; KV_BLOCK];
    let mut valid = [false; KV_BLOCK];
    let mut p32 = [0f32; KV_BLOCK];
    let mut pq = [0f64; KV_BLOCK];
    for (kb, &skip) in skipped.iter().enumerate().take(plan.k_blocks) {
        if !s.sparsity.keeps(plan, b, h, i / Q_BLOCK, kb) || skip {
            continue;
        }
        let mut tile_max = f64::NEG_INFINITY;
        let mut any = false;
        for jj in 0..KV_BLOCK {
            let j = kb * KV_BLOCK + jj;
            valid[jj] = j < nk && plan.causal_visible(i, j);
            if !valid[jj] {
                continue;
            }
            sc[jj] = score(qo, ko, i, j, qs);
            tile_max = nan_max(tile_max, sc[jj]);
            any = true;
        }
        if !any {
            continue;
        }
        if let Some(nm) = &s.nm_softmax {
            // N:M selection on the scaled scores; the tile max survives it (rank 0).
            let mut opt: Vec<Option<f64>> = (0..KV_BLOCK)
                .map(|jj| valid[jj].then_some(sc[jj]))
                .collect();
            nm.apply(&mut opt, kb * KV_BLOCK, i, plan.causal_offset());
            for (v, o) in valid.iter_mut().zip(&opt) {
                *v = o.is_some();
            }
        }
        let m_new = nan_max(m, tile_max);
        let alpha = if m == f64::NEG_INFINITY {
            0.0
        } else {
            (m - m_new).exp2()
        };
        let mut tile_sum = 0f64;
        for jj in 0..KV_BLOCK {
            let p = if valid[jj] {
                (sc[jj] - m_new).exp2()
            } else {
                0.0
            };
            tile_sum += p;
            p32[jj] = p as f32;
        }
        quantize_p_row(s.recipe, s.dtype, &p32, &mut pq);
        l = l * alpha + tile_sum;
        acc.iter_mut().for_each(|a| *a *= alpha);
        for jj in 0..KV_BLOCK {
            if valid[jj] && pq[jj] != 0.0 {
                let vr = vo.row(kb * KV_BLOCK + jj);
                for (a, x) in acc.iter_mut().zip(vr) {
                    *a += pq[jj] * x;
                }
            }
        }
        m = m_new;
    }
    if l == 0.0 {
        // Every key masked: o = 0, LSE = -inf (documented).
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let shift = qz
        .q_delta
        .as_ref()
        .map_or(0.0, |dl| dl[(b * s.heads_q + h) * s.seq_q + i] as f64);
    let lse = (m + l.log2() + shift) * std::f64::consts::LN_2;
    (acc.iter().map(|a| a / l).collect(), lse)
}

/// max that propagates NaN (f64::max drops it).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn int8_operand(
    codes: &[i8],
    scales: &[f32],
    groups: crate::recipe::Groups,
    bh: usize,
    n: usize,
    dp: usize,
) -> Operand {
    let ng = groups.count(n);
    Operand {
        rows: codes[bh * n * dp..][..n * dp]
            .iter()
            .map(|&c| c as f64)
            .collect(),
        scale: (0..n)
            .map(|t| scales[bh * ng + groups.of(t)] as f64)
            .collect(),
        dp,
        folded: true,
    }
}

fn fp4_token_operand(codes: &[u8], scales: &[u8], bh: usize, n: usize, dp: usize) -> Operand {
    let nb = dp / FP4_BLOCK;
    let mut rows = vec![0f64; n * dp];
    for t in 0..n {
        for c in 0..dp {
            let sc = scales[(bh * n + t) * nb + c / FP4_BLOCK];
            let s = if sc == E4M3_NAN {
                f64::NAN
            } else {
                e4m3_to_f32(sc) as f64
            };
            rows[t * dp + c] = e2m1_to_f32(codes[(bh * n + t) * dp + c]) as f64 * s;
        }
    }
    Operand {
        rows,
        scale: Vec::new(),
        dp,
        folded: true,
    }
}

fn plain_operand(
    x: &[f32],
    plan: &Plan,
    st: &crate::spec::Strides,
    b: usize,
    h: usize,
    n: usize,
) -> Operand {
    let d = plan.spec.head_dim;
    let mut rows = vec![0f64; n * d];
    for t in 0..n {
        for c in 0..d {
            rows[t * d + c] = x[st.row(b, h, t) + c] as f64;
        }
    }
    Operand {
        rows,
        scale: Vec::new(),
        dp: d,
        folded: false,
    }
}

fn q_operand(plan: &Plan, qz: &Quantized, q: &[f32], b: usize, h: usize) -> Operand {
    let s = &plan.spec;
    let (dp, bh) = (padded_dim(s.head_dim), b * s.heads_q + h);
    match &qz.q {
        QkCodes::Int8 { codes, scales } => {
            int8_operand(codes, scales, s.recipe.q_groups().unwrap(), bh, s.seq_q, dp)
        }
        QkCodes::Nvfp4 { codes, scales } => fp4_token_operand(codes, scales, bh, s.seq_q, dp),
        QkCodes::None => plain_operand(q, plan, &plan.q, b, h, s.seq_q),
    }
}

fn k_operand(plan: &Plan, qz: &Quantized, k: &[f32], b: usize, h: usize) -> Operand {
    let s = &plan.spec;
    let (dp, bh) = (padded_dim(s.head_dim), b * s.heads_kv + h);
    match &qz.k {
        QkCodes::Int8 { codes, scales } => int8_operand(
            codes,
            scales,
            s.recipe.k_groups().unwrap(),
            bh,
            s.seq_kv,
            dp,
        ),
        QkCodes::Nvfp4 { codes, scales } => fp4_token_operand(codes, scales, bh, s.seq_kv, dp),
        QkCodes::None => plain_operand(k, plan, &plan.kv, b, h, s.seq_kv),
    }
}

/// V as f64 rows [N, D] (dequantized where the recipe quantizes V).
fn v_operand(plan: &Plan, qz: &Quantized, v: &[f32], b: usize, h: usize) -> Operand {
    let s = &plan.spec;
    let (n, d, dp, bh) = (
        s.seq_kv,
        s.head_dim,
        padded_dim(s.head_dim),
        b * s.heads_kv + h,
    );
    let mut rows = vec![0f64; n * d];
    match &qz.v {
        VCodes::Fp8 { codes, scales } => {
            for t in 0..n {
                for c in 0..d {
                    rows[t * d + c] = e4m3_to_f32(codes[(bh * n + t) * dp + c]) as f64
                        * scales[bh * dp + c] as f64;
                }
            }
        }
        VCodes::Nvfp4 { codes, scales } => {
            let np = padded_dim(n);
            let nb = np / FP4_BLOCK;
            // V → NVFP4's global scale (1 for the Nvfp4 recipe).
            let g = s.v_nvfp4.map_or(1.0, |vq| vq.global_scale().1 as f64);
            for c in 0..d {
                for t in 0..n {
                    let sc = scales[(bh * dp + c) * nb + t / FP4_BLOCK];
                    let sv = if sc == E4M3_NAN {
                        f64::NAN
                    } else {
                        e4m3_to_f32(sc) as f64
                    };
                    rows[t * d + c] = e2m1_to_f32(codes[(bh * dp + c) * np + t]) as f64 * sv * g;
                }
            }
        }
        VCodes::None => return plain_operand(v, plan, &plan.kv, b, h, n),
    }
    Operand {
        rows,
        scale: Vec::new(),
        dp: d,
        folded: false,
    }
}
