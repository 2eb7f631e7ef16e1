//! N:M sparse softmax (ModelOpt's `attention_sparsity`): before the softmax, in each group of
//! M consecutive keys of a row only the N largest scores survive; the rest become −∞, so the
//! denominator renormalises over the survivors.

use crate::error::{Error, Result};

/// N:M sparse softmax, M ∈ {4, 8}, 0 < N < M.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NmSoftmax {
    pub n: u32,
    pub m: u32,
    /// Keys before this index stay dense (attention sinks). Default 0.
    pub dense_sink_tokens: usize,
    /// Keys at distance 0 ≤ (query position aligned bottom-right) − key < this stay dense.
    /// Default 64.
    pub dense_recent_tokens: usize,
}

impl NmSoftmax {
    /// N:M with the default dense windows (no sink, the 64 most recent keys).
    pub fn new(n: u32, m: u32) -> Self {
        NmSoftmax {
            n,
            m,
            dense_sink_tokens: 0,
            dense_recent_tokens: 64,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.m == 4 || self.m == 8) || self.n == 0 || self.n >= self.m {
            return Err(Error::BadRecipeParam {
                name: "nm_softmax",
                value: self.n as f32 / self.m as f32,
                fix: "use N:M with M = 4 or 8 and 0 < N < M (e.g. NmSoftmax::new(2, 4))",
            });
        }
        Ok(())
    }

    /// Whether key `j` of query `i` is exempt (sink or recent window); `offset` = Nk − Nq.
    #[inline]
    pub fn dense(&self, i: usize, j: usize, offset: i64) -> bool {
        let dist = i as i64 + offset - j as i64;
        j < self.dense_sink_tokens || (dist >= 0 && dist < self.dense_recent_tokens as i64)
    }

    /// Apply to one row of one 64-key tile: `s[jj]` is the score of key `first_key + jj`, None
    /// where the key is not visible. A visible, non-dense key survives when fewer than N keys
    /// of its group outrank it (a higher score, or an equal score at a lower index).
    pub fn apply(&self, s: &mut [Option<f64>], first_key: usize, i: usize, offset: i64) {
        let m = self.m as usize;
        let orig: Vec<Option<f64>> = s.to_vec();
        for g in (0..s.len()).step_by(m) {
            for jj in g..(g + m).min(s.len()) {
                let Some(x) = orig[jj] else { continue };
                if self.dense(i, first_key + jj, offset) {
                    continue;
                }
                let rank = (g..(g + m).min(s.len()))
                    .filter(|&kk| matches!(orig[kk], Some(y) if y > x || (y == x && kk < jj)))
                    .count();
                if rank >= self.n as usize {
                    s[jj] = None;
                }
            }
        }
    }
}
