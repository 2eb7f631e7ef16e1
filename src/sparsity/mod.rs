//! Block sparsity: which (128-query, 64-key) blocks are computed at all.

use crate::error::{Error, Result};
use std::sync::Arc;

mod nm;
mod skip;
pub use nm::NmSoftmax;
pub use skip::{decide as skip_decision, SkipSoftmax, TileCounts, SKIP_ROWS};

/// How much of the attention matrix is computed. More modes (predicted sparsity) will join;
/// the enum is non-exhaustive so adding them breaks no caller.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub enum Sparsity {
    /// Every block (subject to the causal rule).
    #[default]
    None,
    /// A user block mask.
    BlockMask(BlockMask),
}

/// A 0/1 map per (batch, query head) of shape [ceil(seq_q/128), ceil(seq_kv/64)], row-major,
/// batches then heads outermost: entry `((b * heads_q + h) * q_blocks + qb) * k_blocks + kb`.
/// 1 means computed, 0 skipped (and, on the GPU paths, never loaded). The layout of
/// SpargeAttn's `block_sparse_sage2_attn_cuda` and Sparse_SageAttention_API.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMask {
    data: Arc<[u8]>,
}

impl BlockMask {
    /// A mask from 0/1 bytes (any non-zero byte counts as 1).
    pub fn new(data: impl Into<Vec<u8>>) -> Self {
        let v: Vec<u8> = data.into().into_iter().map(|x| (x != 0) as u8).collect();
        BlockMask { data: v.into() }
    }
    /// The entries, each 0 or 1.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// Fraction of blocks skipped.
    pub fn sparsity(&self) -> f64 {
        if self.data.is_empty() {
            return 0.0;
        }
        self.data.iter().filter(|&&x| x == 0).count() as f64 / self.data.len() as f64
    }
}

impl Sparsity {
    pub(crate) fn validate(
        &self,
        batch: usize,
        heads_q: usize,
        q_blocks: usize,
        k_blocks: usize,
    ) -> Result<()> {
        match self {
            Sparsity::None => Ok(()),
            Sparsity::BlockMask(m) => {
                let expected = batch * heads_q * q_blocks * k_blocks;
                if m.data.len() != expected {
                    return Err(Error::MaskShape {
                        expected,
                        got: m.data.len(),
                        batch,
                        heads_q,
                        q_blocks,
                        k_blocks,
                    });
                }
                Ok(())
            }
        }
    }

    /// Whether block (b, h, qb, kb) is computed.
    #[inline]
    pub fn keeps(&self, plan: &crate::Plan, b: usize, h: usize, qb: usize, kb: usize) -> bool {
        match self {
            Sparsity::None => true,
            Sparsity::BlockMask(m) => {
                m.data[((b * plan.spec.heads_q + h) * plan.q_blocks + qb) * plan.k_blocks + kb] != 0
            }
        }
    }
}
