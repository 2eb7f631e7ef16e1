//! Quantization of the softmax probabilities P before the P·V product.
//!
//! p is the online softmax's unnormalised probability of the KV tile being processed,
//! p = exp2(s − m) with m the running row max including this tile (tiles of 64 keys), so
//! 0 ≤ p ≤ 1. The row sum l always adds the unquantised p; only the P·V operand is quantized.

use super::formats::*;
use super::quant::nvfp4_block;
use crate::recipe::{Recipe, E2M1_MAX, E4M3_MAX, FP4_BLOCK};
use crate::spec::DType;

/// 6 · 448: the NVFP4 range of (E2M1 max) × (E4M3 max).
pub const NVFP4_RANGE: f32 = E2M1_MAX * E4M3_MAX;

/// Round p to the precision of `dtype` (f32 stays).
#[inline]
pub fn round_to(dtype: DType, p: f32) -> f32 {
    match dtype {
        DType::F16 => round_f16(p),
        DType::BF16 => round_bf16(p),
        DType::F32 => p,
    }
}

/// The 16-bit type P is rounded to in Int8QkF16Pv: V's type (bf16 for bf16 inputs), else f16.
pub fn pv16(dtype: DType) -> DType {
    if dtype == DType::BF16 {
        DType::BF16
    } else {
        DType::F16
    }
}

/// Quantize one row of one KV tile: `p` holds the tile's probabilities (keys that are masked or
/// past the end hold 0), `out` receives the value each p contributes to P·V.
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x > 0.0)` is meant to hold for NaN too
pub fn quantize_p_row(recipe: Recipe, dtype: DType, p: &[f32], out: &mut [f64]) {
    match recipe {
        Recipe::Exact => p
            .iter()
            .zip(out)
            .for_each(|(&x, o)| *o = round_to(dtype, x) as f64),
        Recipe::Int8QkF16Pv => p
            .iter()
            .zip(out)
            .for_each(|(&x, o)| *o = round_to(pv16(dtype), x) as f64),
        Recipe::Int8QkFp8Pv { .. } => {
            // P·448 into E4M3's range; the 1/448 is folded out of the product.
            p.iter().zip(out).for_each(|(&x, o)| {
                *o = e4m3_to_f32(e4m3_from_f32(x * E4M3_MAX)) as f64 / E4M3_MAX as f64
            })
        }
        Recipe::Nvfp4 => {
            // Two-level scaling (SageAttention 3): the row's tile max ρ maps to 6·448, then
            // NVFP4 blocks of 16 keys; the dequantized value is e2m1 · scale · ρ/2688.
            let rho = f32::from_bits(p.iter().map(|&x| abs_bits(x)).max().unwrap_or(0));
            if !(rho > 0.0) {
                out.iter_mut().for_each(|o| *o = 0.0);
                return;
            }
            let inv_f = div_rn(NVFP4_RANGE, rho);
            let f = div_rn(rho, NVFP4_RANGE) as f64;
            fp4_blocks(p, out, |x| x * inv_f, f);
        }
        Recipe::Fp8P { amax_p } => {
            // ModelOpt: E4M3(clamp(p / s, ±448)) · s with s = amax_p / 448 (p·RN(448/amax_p)).
            let inv = div_rn(E4M3_MAX, amax_p);
            let s = div_rn(amax_p, E4M3_MAX) as f64;
            p.iter()
                .zip(out)
                .for_each(|(&x, o)| *o = e4m3_to_f32(e4m3_from_f32(x * inv)) as f64 * s)
        }
        Recipe::Nvfp4P { amax_p } => {
            // ModelOpt: p rounded to the input dtype, global scale g = amax_p / 2688.
            let inv_g = div_rn(NVFP4_RANGE, amax_p);
            let g = div_rn(amax_p, NVFP4_RANGE) as f64;
            fp4_blocks(p, out, |x| round_to(dtype, x) * inv_g, g);
        }
    }
}

/// NVFP4-quantize `scale_in(p)` in blocks of 16 and write e2m1 · e4m3 · `factor`.
fn fp4_blocks(p: &[f32], out: &mut [f64], scale_in: impl Fn(f32) -> f32, factor: f64) {
    let mut xs = [0f32; FP4_BLOCK];
    let mut codes = [0u8; FP4_BLOCK];
    for (pc, oc) in p.chunks(FP4_BLOCK).zip(out.chunks_mut(FP4_BLOCK)) {
        xs.iter_mut().for_each(|x| *x = 0.0);
        for (x, &v) in xs.iter_mut().zip(pc) {
            *x = scale_in(v);
        }
        let sc = nvfp4_block(&xs, &mut codes);
        let s = if sc == E4M3_NAN {
            f64::NAN
        } else {
            e4m3_to_f32(sc) as f64
        };
        for (o, &c) in oc.iter_mut().zip(&codes) {
            *o = e2m1_to_f32(c) as f64 * s * factor;
        }
    }
}
