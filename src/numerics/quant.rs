//! The quantizers of Q, K and V, defined on the host. `shaders/quant.wgsl` computes the same
//! bits; `tests/quantizers.rs` checks that it does.
//!
//! Canonical layouts (independent of the caller's layout), with Dp = head_dim rounded up to 16
//! and padded channels zero:
//! - INT8 Q/K codes [B, H, N, Dp], scales [B, H, groups(N)]
//! - FP8 V codes [B, H, N, Dp], scales [B, H, Dp] (per channel)
//! - NVFP4 Q/K codes [B, H, N, Dp] (one E2M1 code per byte), E4M3 scales [B, H, N, Dp/16]
//! - NVFP4 V codes [B, H, Dp, Np] (channel-major, Np = N rounded up to 16), scales [B, H, Dp, Np/16]

use super::formats::*;
use crate::recipe::{Groups, Recipe, E4M3_MAX, FP4_BLOCK};
use crate::spec::{Plan, Strides};

/// head_dim rounded up to a whole number of 16-element blocks.
pub fn padded_dim(d: usize) -> usize {
    d.div_ceil(FP4_BLOCK) * FP4_BLOCK
}

/// The scale of one INT8 or FP8 group, from the largest magnitude in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GroupScale {
    /// amax < 2^-96 (all zero, or negligibly small): codes 0, scale 0.
    Zero,
    /// The group holds a NaN or ±Inf: codes 0, scale NaN, so the scores it feeds become NaN
    /// as they would in exact arithmetic.
    NonFinite,
    /// code = round(x · inv), x ≈ code · scale.
    Finite { inv: f32, scale: f32 },
}

impl GroupScale {
    /// Scale for the largest magnitude `amax_bits` (as bits) and format maximum `qmax` (127 or 448):
    /// inv = RN(qmax / amax), scale = RN(amax / qmax).
    pub fn new(amax_bits: u32, qmax: f32) -> Self {
        if non_finite(amax_bits) {
            GroupScale::NonFinite
        } else if amax_bits < TINY.to_bits() {
            GroupScale::Zero
        } else {
            let amax = f32::from_bits(amax_bits);
            GroupScale::Finite {
                inv: div_rn(qmax, amax),
                scale: div_rn(amax, qmax),
            }
        }
    }
    /// The scale as stored (0, NaN or the dequantization factor).
    pub fn stored(&self) -> f32 {
        match *self {
            GroupScale::Zero => 0.0,
            GroupScale::NonFinite => f32::NAN,
            GroupScale::Finite { scale, .. } => scale,
        }
    }
}

/// Largest |x| of a group, as bits (NaN sorts above Inf above every finite value).
pub fn amax_bits(xs: impl IntoIterator<Item = f32>) -> u32 {
    xs.into_iter().map(abs_bits).max().unwrap_or(0)
}

/// INT8 code of x in a group with scale `g`.
pub fn int8_code(x: f32, g: GroupScale) -> i8 {
    match g {
        GroupScale::Finite { inv, .. } => int8_round(x * inv),
        _ => 0,
    }
}

/// FP8 E4M3 code of x in a group with scale `g`.
pub fn fp8_code(x: f32, g: GroupScale) -> u8 {
    match g {
        GroupScale::Finite { inv, .. } => e4m3_from_f32(x * inv),
        _ => 0,
    }
}

/// One NVFP4 block: its E4M3 scale code from amax/6, and each element's E2M1 code of x / scale.
/// A block holding NaN/Inf gets the E4M3 NaN scale and zero codes.
pub fn nvfp4_block(xs: &[f32], codes: &mut [u8]) -> u8 {
    let a = amax_bits(xs.iter().copied());
    let sc = if non_finite(a) {
        E4M3_NAN
    } else if a < TINY.to_bits() {
        0
    } else {
        e4m3_from_f32(div_rn(f32::from_bits(a), 6.0))
    };
    let s = if sc == E4M3_NAN { 0.0 } else { e4m3_to_f32(sc) };
    for (c, &x) in codes.iter_mut().zip(xs) {
        *c = e2m1_code_of_ratio(x, s);
    }
    sc
}

/// Everything the quantized recipes derive from Q, K and V before the attention loop.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Quantized {
    /// Per-channel mean of K over tokens [B, Hkv, D] (recipes that smooth K).
    pub k_mean: Option<Vec<f32>>,
    /// Per query row, q·sm_scale·log2(e)·mean(K) [B, Hq, Nq]: the base-2 shift that smoothing
    /// took out of every score of the row, added back to the LSE.
    pub q_delta: Option<Vec<f32>>,
    pub q: QkCodes,
    pub k: QkCodes,
    pub v: VCodes,
}

/// Quantized Q or K.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum QkCodes {
    /// Not quantized: the recipe reads the input.
    #[default]
    None,
    Int8 {
        codes: Vec<i8>,
        scales: Vec<f32>,
    },
    Nvfp4 {
        codes: Vec<u8>,
        scales: Vec<u8>,
    },
}

/// Quantized V.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum VCodes {
    #[default]
    None,
    Fp8 {
        codes: Vec<u8>,
        scales: Vec<f32>,
    },
    Nvfp4 {
        codes: Vec<u8>,
        scales: Vec<u8>,
    },
}

/// Tokens per partial sum of the K mean.
pub const MEAN_BLOCK: usize = 64;

/// Per-channel mean over tokens, [B, H, D]: f32 sums of blocks of [`MEAN_BLOCK`] tokens in
/// token order, those block sums added in order, then RN(sum / N), subnormals flushed. The
/// order is part of the definition (the GPUs sum the blocks in parallel, then the same way).
pub fn token_mean(
    x: &[f32],
    st: &Strides,
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; batch * heads * d];
    for b in 0..batch {
        for h in 0..heads {
            for c in 0..d {
                // Blocks of MEAN_BLOCK tokens summed in order, then the block sums in order:
                // the GPUs compute the block sums in parallel and get the same bits.
                let mut sum = 0f32;
                for t0 in (0..n).step_by(MEAN_BLOCK) {
                    let mut block = 0f32;
                    for t in t0..(t0 + MEAN_BLOCK).min(n) {
                        block += x[st.row(b, h, t) + c];
                    }
                    sum += block;
                }
                out[(b * heads + h) * d + c] = ftz(div_rn(sum, n as f32));
            }
        }
    }
    out
}

/// The value each recipe quantizes for Q: q · sm_scale · log2(e), flushed.
#[inline]
pub fn fold_q(q: f32, fold: f32) -> f32 {
    ftz(q * fold)
}

/// The value each smoothing recipe quantizes for K: k − mean, flushed.
#[inline]
pub fn smooth_k(k: f32, mean: f32) -> f32 {
    ftz(k - mean)
}

/// Quantize q, k, v (decoded to f32, subnormals flushed, in the caller's layout) for `plan`'s recipe.
pub fn quantize(plan: &Plan, q: &[f32], k: &[f32], v: &[f32]) -> Quantized {
    let s = &plan.spec;
    let (bn, hq, hk, nq, nk, d) = (
        s.batch, s.heads_q, s.heads_kv, s.seq_q, s.seq_kv, s.head_dim,
    );
    let dp = padded_dim(d);
    let fold = plan.q_fold();
    let mut out = Quantized::default();
    if s.recipe.smooths_k() {
        let mean = token_mean(k, &plan.kv, bn, hk, nk, d);
        let mut delta = vec![0f32; bn * hq * nq];
        for b in 0..bn {
            for h in 0..hq {
                let m = &mean[(b * hk + h / plan.group()) * d..][..d];
                for i in 0..nq {
                    let row = &q[plan.q.row(b, h, i)..][..d];
                    // An f32 sum in channel order, as the shaders compute it (they may fuse the
                    // multiply-add, so this one is compared with a tolerance, not bit for bit).
                    let dot = row
                        .iter()
                        .zip(m)
                        .fold(0f32, |acc, (&x, &mu)| acc + fold_q(x, fold) * mu);
                    delta[(b * hq + h) * nq + i] = dot;
                }
            }
        }
        out.k_mean = Some(mean);
        out.q_delta = Some(delta);
    }
    let mean = out.k_mean.as_deref();
    let k_val = |b: usize, h: usize, t: usize, c: usize| -> f32 {
        let x = k[plan.kv.row(b, h, t) + c];
        mean.map_or(x, |m| smooth_k(x, m[(b * hk + h) * d + c]))
    };
    let q_val = |b: usize, h: usize, t: usize, c: usize| fold_q(q[plan.q.row(b, h, t) + c], fold);
    match s.recipe {
        Recipe::Int8QkF16Pv | Recipe::Int8QkFp8Pv { .. } => {
            let (qg, kg) = (s.recipe.q_groups().unwrap(), s.recipe.k_groups().unwrap());
            out.q = int8_tokens(bn, hq, nq, d, dp, qg, &q_val);
            out.k = int8_tokens(bn, hk, nk, d, dp, kg, &k_val);
        }
        Recipe::Nvfp4 => {
            out.q = nvfp4_tokens(bn, hq, nq, d, dp, &q_val);
            out.k = nvfp4_tokens(bn, hk, nk, d, dp, &k_val);
        }
        _ => {}
    }
    let v_val = |b: usize, h: usize, t: usize, c: usize| v[plan.kv.row(b, h, t) + c];
    match (s.recipe, s.v_nvfp4) {
        (Recipe::Int8QkFp8Pv { .. }, _) => out.v = fp8_channels(bn, hk, nk, d, dp, &v_val),
        (Recipe::Nvfp4, _) => out.v = nvfp4_channels(bn, hk, nk, d, dp, &v_val),
        (_, Some(vq)) => {
            // The quantizer sees v / g as RN(v · (1/g)); g multiplies the output.
            let (inv_g, _) = vq.global_scale();
            let scaled = |b: usize, h: usize, t: usize, c: usize| ftz(v_val(b, h, t, c) * inv_g);
            out.v = nvfp4_channels(bn, hk, nk, d, dp, &scaled);
        }
        _ => {}
    }
    out
}

type Val<'a> = &'a dyn Fn(usize, usize, usize, usize) -> f32;

/// INT8 codes per token group (all channels of the group's tokens share one scale).
fn int8_tokens(bn: usize, h: usize, n: usize, d: usize, dp: usize, g: Groups, val: Val) -> QkCodes {
    let ng = g.count(n);
    let mut codes = vec![0i8; bn * h * n * dp];
    let mut scales = vec![0f32; bn * h * ng];
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); ng];
    for t in 0..n {
        members[g.of(t)].push(t);
    }
    for b in 0..bn {
        for hh in 0..h {
            for (gi, toks) in members.iter().enumerate() {
                let a = amax_bits(
                    toks.iter()
                        .flat_map(|&t| (0..d).map(move |c| val(b, hh, t, c))),
                );
                let gs = GroupScale::new(a, 127.0);
                scales[(b * h + hh) * ng + gi] = gs.stored();
                for &t in toks {
                    for c in 0..d {
                        codes[((b * h + hh) * n + t) * dp + c] = int8_code(val(b, hh, t, c), gs);
                    }
                }
            }
        }
    }
    QkCodes::Int8 { codes, scales }
}

/// NVFP4 codes in blocks of 16 channels per token.
fn nvfp4_tokens(bn: usize, h: usize, n: usize, d: usize, dp: usize, val: Val) -> QkCodes {
    let nb = dp / FP4_BLOCK;
    let mut codes = vec![0u8; bn * h * n * dp];
    let mut scales = vec![0u8; bn * h * n * nb];
    let mut xs = [0f32; FP4_BLOCK];
    for b in 0..bn {
        for hh in 0..h {
            for t in 0..n {
                let row = (b * h + hh) * n + t;
                for blk in 0..nb {
                    for (i, x) in xs.iter_mut().enumerate() {
                        let c = blk * FP4_BLOCK + i;
                        *x = if c < d { val(b, hh, t, c) } else { 0.0 };
                    }
                    let out = &mut codes[row * dp + blk * FP4_BLOCK..][..FP4_BLOCK];
                    scales[row * nb + blk] = nvfp4_block(&xs, out);
                }
            }
        }
    }
    QkCodes::Nvfp4 { codes, scales }
}

/// FP8 E4M3 codes with one scale per channel (amax over all tokens / 448).
fn fp8_channels(bn: usize, h: usize, n: usize, d: usize, dp: usize, val: Val) -> VCodes {
    let mut codes = vec![0u8; bn * h * n * dp];
    let mut scales = vec![0f32; bn * h * dp];
    for b in 0..bn {
        for hh in 0..h {
            for c in 0..d {
                let gs = GroupScale::new(amax_bits((0..n).map(|t| val(b, hh, t, c))), E4M3_MAX);
                scales[(b * h + hh) * dp + c] = gs.stored();
                for t in 0..n {
                    codes[((b * h + hh) * n + t) * dp + c] = fp8_code(val(b, hh, t, c), gs);
                }
            }
        }
    }
    VCodes::Fp8 { codes, scales }
}

/// NVFP4 codes of V in blocks of 16 tokens per channel, channel-major.
fn nvfp4_channels(bn: usize, h: usize, n: usize, d: usize, dp: usize, val: Val) -> VCodes {
    let np = padded_dim(n);
    let nb = np / FP4_BLOCK;
    let mut codes = vec![0u8; bn * h * dp * np];
    let mut scales = vec![0u8; bn * h * dp * nb];
    let mut xs = [0f32; FP4_BLOCK];
    for b in 0..bn {
        for hh in 0..h {
            for c in 0..d {
                let chan = (b * h + hh) * dp + c;
                for blk in 0..nb {
                    for (i, x) in xs.iter_mut().enumerate() {
                        let t = blk * FP4_BLOCK + i;
                        *x = if t < n { val(b, hh, t, c) } else { 0.0 };
                    }
                    let out = &mut codes[chan * np + blk * FP4_BLOCK..][..FP4_BLOCK];
                    scales[chan * nb + blk] = nvfp4_block(&xs, out);
                }
            }
        }
    }
    VCodes::Nvfp4 { codes, scales }
}
