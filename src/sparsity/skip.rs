//! Skip-softmax (BLASST, arXiv 2512.12087; ModelOpt's `skip_softmax`): a KV tile is skipped for
//! a tile of query rows when none of them could gain from it: every row r that sees a key of the
//! tile has exp(tile_max_r − m_r) < λ, m_r its running max before the tile. A skipped tile does
//! no softmax, no V load and no P·V.
//!
//! Tiles: [`SKIP_ROWS`] = 16 consecutive query rows (from row 0) × 64 keys (the online softmax's
//! KV tile). Rows past the end of the sequence and rows without a visible key in the tile never
//! prevent a skip; a row that has seen nothing yet (m_r = −∞) always does. The running max only
//! moves on visited tiles. A (query tile, KV tile) pair is *considered* when some row of it sees
//! some key of it (after the causal rule and the block mask); each considered pair is either
//! visited or skipped, and the call reports both counts.

use crate::error::{Error, Result};

/// Query rows per skip decision.
pub const SKIP_ROWS: usize = 16;

/// Skip-softmax's threshold λ ∈ (0, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SkipSoftmax {
    /// λ itself.
    Lambda(f64),
    /// ModelOpt's calibrated form: λ = a / seq_kv.
    PerKey(f64),
}

impl SkipSoftmax {
    /// λ for a key sequence of `seq_kv` tokens.
    pub fn lambda(&self, seq_kv: usize) -> f64 {
        match *self {
            SkipSoftmax::Lambda(l) => l,
            SkipSoftmax::PerKey(a) => a / seq_kv as f64,
        }
    }

    /// log2(λ), the threshold in the kernels' base-2 score units (a tile is skipped for a row when
    /// tile_max − m < log2 λ).
    pub fn log2_lambda(&self, seq_kv: usize) -> f64 {
        self.lambda(seq_kv).log2()
    }

    pub(crate) fn validate(&self, seq_kv: usize) -> Result<()> {
        let l = self.lambda(seq_kv);
        if !(l > 0.0 && l < 1.0) {
            return Err(Error::BadRecipeParam {
                name: "skip_softmax lambda",
                value: l as f32,
                fix: "use 0 < lambda < 1 (SkipSoftmax::Lambda(0.1), or PerKey(a) with 0 < a < seq_kv)",
            });
        }
        Ok(())
    }
}

/// How many (16-row, 64-key) tile pairs a call considered, and how many of those it skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TileCounts {
    pub visited: u64,
    pub skipped: u64,
}

impl TileCounts {
    /// The fraction of considered tiles that were skipped.
    pub fn skipped_fraction(&self) -> f64 {
        let all = self.visited + self.skipped;
        if all == 0 {
            0.0
        } else {
            self.skipped as f64 / all as f64
        }
    }
}

impl std::ops::AddAssign for TileCounts {
    fn add_assign(&mut self, o: TileCounts) {
        self.visited += o.visited;
        self.skipped += o.skipped;
    }
}

/// The skip decision for one KV tile of one query tile. `tile_max[r]`: row r's largest visible
/// score in the tile (−∞ when it sees none; rows past the end pass −∞); `running[r]`: its
/// running max before the tile. Returns None when the pair is not considered, else Some(skip).
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(t - m < λ)` is meant to hold for NaN too
pub fn decide(tile_max: &[f64], running: &[f64], log2_lambda: f64) -> Option<bool> {
    let mut considered = false;
    let mut skip = true;
    for (&t, &m) in tile_max.iter().zip(running) {
        if t == f64::NEG_INFINITY {
            continue;
        }
        considered = true;
        if m == f64::NEG_INFINITY || !(t - m < log2_lambda) {
            skip = false;
        }
    }
    considered.then_some(skip)
}
