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
            // Two-level scaling (SageAttention 3) with a power-of-two first level: the row's
            // tile max ρ is lifted by 2^E = 1/ρ' (ρ' the least power of two ≥ ρ, so the lifted
            // max lies in (1/2, 1]), then quantized exactly as Nvfp4P with amax_p = 1 in f16:
            // x = RN_f16(p·2^E)·2688, NVFP4 blocks of 16 keys, value e2m1 · scale · ρ'/2688.
            // (A power of two keeps p·2^E exact and the quotient's ties those of Nvfp4P, whose
            // one-multiply rounding the CUDA kernel then shares.)
            let rho = p.iter().map(|&x| abs_bits(ftz(x))).max().unwrap_or(0);
            if rho == 0 || non_finite(rho) {
                out.iter_mut().for_each(|o| *o = 0.0);
                return;
            }
            let up = pow2_ceil_bits(rho);
            let lift = f32::from_bits((254 << 23) - up); // 1/ρ', exact
            let f = div_rn(f32::from_bits(up), NVFP4_RANGE) as f64;
            fp4_blocks(p, out, |x| round_f16(ftz(x) * lift) * NVFP4_RANGE, f);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of 64 probabilities whose largest is `rho` (a few exact zeros, the rest spread
    /// over 7 binades below it), from a small xorshift generator.
    fn row(seed: &mut u64, rho: f32) -> Vec<f32> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut p: Vec<f32> = (0..64)
            .map(|j| match j % 9 {
                0 => 0.0,
                _ => rho * (next() * 7.0 - 7.0).exp2(),
            })
            .collect();
        p[(next() * 63.0) as usize + 1] = rho;
        p
    }

    #[test]
    fn pow2_ceil_bits_is_the_least_power_of_two_at_or_above() {
        for bits in [
            0x0080_0000u32,
            0x3f80_0000,
            0x3f00_0001,
            0x3f7f_ffff,
            0x3e12_3456,
        ] {
            let up = f32::from_bits(pow2_ceil_bits(bits));
            let lift = f32::from_bits((254 << 23) - up.to_bits());
            let rho = f32::from_bits(bits);
            assert!(up >= rho && up / 2.0 < rho, "{rho:e} → {up:e}");
            assert_eq!(up.to_bits() & 0x007f_ffff, 0, "{up:e} not a power of two");
            assert_eq!(lift * up, 1.0);
        }
    }

    /// The Nvfp4 recipe's P is Nvfp4P's (amax_p = 1, f16) applied to the lifted row p·2^E, times
    /// ρ' = 2^-E: exactly, because ρ'/2688 rounds like 1/2688 (ρ' a power of two). Rows whose
    /// max is itself a power of two, just above one, and in between, over 40 binades.
    #[test]
    fn nvfp4_p_is_nvfp4p_of_the_lifted_row() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let (mut a, mut b) = (vec![0f64; 64], vec![0f64; 64]);
        for e in 0..40 {
            for frac in [1.0f32, 1.0 + f32::EPSILON, 1.37, 1.999_999] {
                let rho = frac * 2f32.powi(-e) / 2.0;
                let p = row(&mut seed, rho.min(1.0));
                for dtype in [DType::F16, DType::BF16, DType::F32] {
                    quantize_p_row(Recipe::Nvfp4, dtype, &p, &mut a);
                    let rho_bits = p.iter().map(|&x| abs_bits(x)).max().unwrap();
                    let up = f32::from_bits(pow2_ceil_bits(rho_bits));
                    let lift = 1.0 / up;
                    let lifted: Vec<f32> = p.iter().map(|&x| x * lift).collect();
                    assert!(lifted.iter().all(|&x| x <= 1.0) && lifted.iter().any(|&x| x > 0.5));
                    quantize_p_row(Recipe::nvfp4p(), DType::F16, &lifted, &mut b);
                    for j in 0..64 {
                        assert_eq!(a[j], b[j] * up as f64, "e {e} frac {frac} j {j}");
                    }
                    // Not an identity of zeros: most values survive.
                    assert!(a.iter().filter(|&&v| v > 0.0).count() > 20);
                }
            }
        }
    }

    /// A power of two on the whole row passes straight through: P(2^k·p) = 2^k·P(p) while the
    /// row stays normal (a tile's quantization does not depend on how far its max lies below
    /// the running max, only on the shape of its row).
    #[test]
    fn nvfp4_p_commutes_with_powers_of_two() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let (mut a, mut b) = (vec![0f64; 64], vec![0f64; 64]);
        for _ in 0..200 {
            let p = row(&mut seed, 0.3);
            quantize_p_row(Recipe::Nvfp4, DType::F16, &p, &mut a);
            for k in [-30, -7, -1, 1] {
                let q: Vec<f32> = p.iter().map(|&x| x * 2f32.powi(k)).collect();
                quantize_p_row(Recipe::Nvfp4, DType::F16, &q, &mut b);
                for j in 0..64 {
                    assert_eq!(b[j], a[j] * 2f64.powi(k), "k {k} j {j}");
                }
            }
        }
    }

    #[test]
    fn nvfp4_p_of_a_zero_or_nan_row_is_zero() {
        let mut out = vec![1f64; 64];
        quantize_p_row(Recipe::Nvfp4, DType::F16, &[0.0; 64], &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
        let mut p = vec![0.25f32; 64];
        p[3] = f32::NAN;
        out.iter_mut().for_each(|o| *o = 1.0);
        quantize_p_row(Recipe::Nvfp4, DType::F16, &p, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
