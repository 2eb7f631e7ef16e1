//! The precision recipes and the block sizes they are defined with.
//! docs/numerics.md writes each one down as formulas; `numerics/` implements them.

use crate::error::{Error, Result};

/// Query tokens per quantization block of Int8QkF16Pv and per block-mask row.
pub const Q_BLOCK: usize = 128;
/// Keys per KV tile: the online softmax's running max advances once per tile, the int8 K
/// quantization groups and the block-mask columns all have this width.
pub const KV_BLOCK: usize = 64;
/// Query tokens per "warp" quantization block of Int8QkFp8Pv.
pub const Q_WARP_BLOCK: usize = 32;
/// Elements per NVFP4 block (along each product's reduction dimension).
pub const FP4_BLOCK: usize = 16;
/// Tokens in a block of Int8QkFp8Pv's per-thread groups: tokens t and t' of one block share a
/// group when t ≡ t' (mod 8), the rows one thread holds in an m16n8k32 MMA fragment.
pub const THREAD_INTERLEAVE: usize = 8;

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest E2M1 value.
pub const E2M1_MAX: f32 = 6.0;

/// Q/K quantization granularity of [`Recipe::Int8QkFp8Pv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QkGranularity {
    /// One scale per 32 query tokens and per 64 keys (SageAttention 2's per-warp).
    #[default]
    PerWarp,
    /// One scale per group of tokens that one MMA thread holds: within each 32-query block the
    /// tokens with equal index mod 8, within each 64-key block likewise (SageAttention 2's per-thread).
    PerThread,
}

/// How the attention is computed. Every recipe combines with every sparsity mode.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Recipe {
    /// FlashAttention-2 semantics: f32 QK^T, online softmax, P rounded to the input dtype, f32 P·V.
    Exact,
    /// SageAttention 1: K smoothed, Q (128-token blocks) and K (64-token blocks) in INT8, P in 16 bits.
    Int8QkF16Pv,
    /// SageAttention 2: INT8 Q/K at per-warp (or per-thread) granularity, V and P in FP8 E4M3.
    Int8QkFp8Pv { granularity: QkGranularity },
    /// SageAttention 3 simulated: Q, K, P and V in NVFP4 (E2M1 + E4M3 scale per 16), P two-level
    /// scaled (a power of two per row and tile, then Nvfp4P's quantizer; docs/numerics.md).
    Nvfp4,
    /// ModelOpt `quantize_p`: Q, K, V in the input dtype; P quantized to NVFP4 with the global
    /// scale g = amax_p / (6·448).
    Nvfp4P { amax_p: f32 },
    /// ModelOpt P → FP8: Q, K, V in the input dtype; P quantized to E4M3 with the static
    /// per-tensor scale s = amax_p / 448.
    Fp8P { amax_p: f32 },
}

impl Recipe {
    /// All recipes with their default options, in the order the docs list them.
    pub const ALL: [Recipe; 6] = [
        Recipe::Exact,
        Recipe::Int8QkF16Pv,
        Recipe::Int8QkFp8Pv {
            granularity: QkGranularity::PerWarp,
        },
        Recipe::Nvfp4,
        Recipe::Nvfp4P { amax_p: 1.0 },
        Recipe::Fp8P { amax_p: 1.0 },
    ];

    /// `Nvfp4P` with ModelOpt's default amax_P = 1 (p ≤ 1 always).
    pub const fn nvfp4p() -> Recipe {
        Recipe::Nvfp4P { amax_p: 1.0 }
    }

    /// `Fp8P` with amax_P = 1.
    pub const fn fp8p() -> Recipe {
        Recipe::Fp8P { amax_p: 1.0 }
    }

    /// A short stable name, used in logs, cache keys and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Recipe::Exact => "exact",
            Recipe::Int8QkF16Pv => "int8qk-f16pv",
            Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerWarp,
            } => "int8qk-fp8pv",
            Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerThread,
            } => "int8qk-fp8pv-thread",
            Recipe::Nvfp4 => "nvfp4",
            Recipe::Nvfp4P { .. } => "nvfp4-p",
            Recipe::Fp8P { .. } => "fp8-p",
        }
    }

    /// Whether Q and K are quantized to INT8 (and K smoothed).
    pub fn int8_qk(&self) -> bool {
        matches!(self, Recipe::Int8QkF16Pv | Recipe::Int8QkFp8Pv { .. })
    }

    /// Whether K is smoothed (its per-channel mean subtracted) before quantization.
    pub fn smooths_k(&self) -> bool {
        self.int8_qk() || matches!(self, Recipe::Nvfp4)
    }

    /// Query-token grouping of the INT8 Q scales: (block, interleave).
    pub(crate) fn q_groups(&self) -> Option<Groups> {
        match self {
            Recipe::Int8QkF16Pv => Some(Groups {
                block: Q_BLOCK,
                interleave: 1,
            }),
            Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerWarp,
            } => Some(Groups {
                block: Q_WARP_BLOCK,
                interleave: 1,
            }),
            Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerThread,
            } => Some(Groups {
                block: Q_WARP_BLOCK,
                interleave: THREAD_INTERLEAVE,
            }),
            _ => None,
        }
    }

    /// Key grouping of the INT8 K scales.
    pub(crate) fn k_groups(&self) -> Option<Groups> {
        match self {
            Recipe::Int8QkF16Pv
            | Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerWarp,
            } => Some(Groups {
                block: KV_BLOCK,
                interleave: 1,
            }),
            Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerThread,
            } => Some(Groups {
                block: KV_BLOCK,
                interleave: THREAD_INTERLEAVE,
            }),
            _ => None,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Recipe::Nvfp4P { amax_p } | Recipe::Fp8P { amax_p } = *self {
            if !(amax_p.is_finite() && (1e-6..=1e6).contains(&amax_p)) {
                return Err(Error::BadRecipeParam {
                    name: "amax_p",
                    value: amax_p,
                    fix: "use the largest |p| expected, in [1e-6, 1e6]; 1.0 (the default) always covers p = exp(s - max) <= 1",
                });
            }
        }
        Ok(())
    }
}

/// V → NVFP4 (ModelOpt's `v_qdq="nvfp4"`), an option of the recipes that read V as given
/// (Exact, Int8QkF16Pv, Nvfp4P, Fp8P): signed E2M1 values, one E4M3 scale per 16 consecutive keys
/// of a channel, a global scale g = amax_v / (6·448) (1 when amax_v is None). As for Nvfp4P's P,
/// the quantizer sees x = RN(v · RN(2688 / amax_v)) and g multiplies the output.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VNvfp4 {
    pub amax_v: Option<f32>,
}

impl VNvfp4 {
    /// (1/g, g) as f32 (both 1 without amax_v).
    pub fn global_scale(&self) -> (f32, f32) {
        use crate::numerics::{formats::div_rn, p::NVFP4_RANGE};
        match self.amax_v {
            None => (1.0, 1.0),
            Some(a) => (div_rn(NVFP4_RANGE, a), div_rn(a, NVFP4_RANGE)),
        }
    }

    pub(crate) fn validate(&self, recipe: Recipe) -> Result<()> {
        if let Some(a) = self.amax_v {
            if !(a.is_finite() && (1e-6..=1e6).contains(&a)) {
                return Err(Error::BadRecipeParam {
                    name: "amax_v",
                    value: a,
                    fix: "use the largest |v| expected, in [1e-6, 1e6], or None for a global scale of 1",
                });
            }
        }
        if matches!(recipe, Recipe::Int8QkFp8Pv { .. } | Recipe::Nvfp4) {
            return Err(Error::BadRecipeParam {
                name: "v_nvfp4",
                value: 1.0,
                fix: "this recipe quantizes V itself: use V → NVFP4 with Exact, Int8QkF16Pv, Nvfp4P or Fp8P",
            });
        }
        Ok(())
    }
}

/// Token grouping of INT8 scales: tokens of one `block` that are equal modulo `interleave`
/// share a scale (interleave 1: the whole block shares one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Groups {
    pub block: usize,
    pub interleave: usize,
}

impl Groups {
    /// Number of groups for `n` tokens.
    pub fn count(&self, n: usize) -> usize {
        n.div_ceil(self.block) * self.interleave
    }
    /// The group of token `t`.
    pub fn of(&self, t: usize) -> usize {
        (t / self.block) * self.interleave + (t % self.interleave)
    }
}
