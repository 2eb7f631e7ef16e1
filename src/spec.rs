//! What the caller describes ([`AttentionSpec`]) and what the backends run ([`Plan`]).
//! Every shape error is found here, once; no backend re-validates.

use crate::error::{Error, Result};
use crate::recipe::{Recipe, VNvfp4, KV_BLOCK, Q_BLOCK};
use crate::sparsity::{NmSoftmax, SkipSoftmax, Sparsity};

/// Element type of q, k, v and o.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }
}

/// Memory layout of the four-dimensional tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// [batch, heads, tokens, head_dim] (PyTorch SDPA, SageAttention's "HND").
    Hnd,
    /// [batch, tokens, heads, head_dim] (FlashAttention's native layout, "NHD").
    Nhd,
}

/// Smallest and largest supported head dimension.
pub const HEAD_DIM_RANGE: (usize, usize) = (16, 256);

/// One attention problem: shapes, layout, dtype, masking and recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub seq_q: usize,
    pub seq_kv: usize,
    pub head_dim: usize,
    pub layout: Layout,
    pub dtype: DType,
    /// Causal mask aligned bottom-right: query i sees key j iff j <= i + seq_kv - seq_q.
    pub causal: bool,
    /// Softmax scale; None means 1/sqrt(head_dim).
    pub sm_scale: Option<f32>,
    pub recipe: Recipe,
    pub sparsity: Sparsity,
    /// Also return the log-sum-exp [batch, heads_q, seq_q] (natural log, f32).
    pub return_lse: bool,
    /// N:M sparse softmax (None: dense).
    pub nm_softmax: Option<NmSoftmax>,
    /// Skip-softmax tile pruning (BLASST), off by default.
    pub skip_softmax: Option<SkipSoftmax>,
    /// V → NVFP4 before P·V (ModelOpt's `v_qdq`), off by default.
    pub v_nvfp4: Option<VNvfp4>,
}

impl AttentionSpec {
    /// Self-attention (seq_q = seq_kv), MHA, HND, f16, exact, no mask, no LSE.
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        AttentionSpec {
            batch,
            heads_q: heads,
            heads_kv: heads,
            seq_q: seq,
            seq_kv: seq,
            head_dim,
            layout: Layout::Hnd,
            dtype: DType::F16,
            causal: false,
            sm_scale: None,
            recipe: Recipe::Exact,
            sparsity: Sparsity::None,
            return_lse: false,
            nm_softmax: None,
            skip_softmax: None,
            v_nvfp4: None,
        }
    }
    pub fn with_kv(mut self, heads_kv: usize, seq_kv: usize) -> Self {
        self.heads_kv = heads_kv;
        self.seq_kv = seq_kv;
        self
    }
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn with_recipe(mut self, recipe: Recipe) -> Self {
        self.recipe = recipe;
        self
    }
    pub fn with_sparsity(mut self, sparsity: Sparsity) -> Self {
        self.sparsity = sparsity;
        self
    }
    pub fn with_lse(mut self, return_lse: bool) -> Self {
        self.return_lse = return_lse;
        self
    }
    /// Skip-softmax: skip a KV tile for 16 query rows when it cannot matter (see [`SkipSoftmax`]).
    pub fn with_skip_softmax(mut self, skip: SkipSoftmax) -> Self {
        self.skip_softmax = Some(skip);
        self
    }

    /// Whether V is stored as NVFP4 codes (the Nvfp4 recipe, or V → NVFP4).
    pub(crate) fn v_nvfp4_codes(&self) -> bool {
        self.recipe == Recipe::Nvfp4 || self.v_nvfp4.is_some()
    }

    /// V → NVFP4 (see [`VNvfp4`]); `amax_v` sets the global scale (None: 1).
    pub fn with_v_nvfp4(mut self, amax_v: Option<f32>) -> Self {
        self.v_nvfp4 = Some(VNvfp4 { amax_v });
        self
    }

    pub fn with_nm_softmax(mut self, nm: NmSoftmax) -> Self {
        self.nm_softmax = Some(nm);
        self
    }
    pub fn with_sm_scale(mut self, sm_scale: f32) -> Self {
        self.sm_scale = Some(sm_scale);
        self
    }

    /// Check everything and derive the plan the backends run.
    pub fn plan(&self) -> Result<Plan> {
        for (what, n) in [
            ("batch", self.batch),
            ("heads_q", self.heads_q),
            ("heads_kv", self.heads_kv),
            ("seq_q", self.seq_q),
            ("seq_kv", self.seq_kv),
            ("head_dim", self.head_dim),
        ] {
            if n == 0 {
                return Err(Error::ZeroSized { what });
            }
        }
        if self.heads_q % self.heads_kv != 0 {
            return Err(Error::HeadsNotMultiple {
                heads_q: self.heads_q,
                heads_kv: self.heads_kv,
            });
        }
        let (min, max) = HEAD_DIM_RANGE;
        if !(min..=max).contains(&self.head_dim) {
            return Err(Error::HeadDimOutOfRange {
                head_dim: self.head_dim,
                min,
                max,
            });
        }
        let sm_scale = self.sm_scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt());
        if !(sm_scale.is_finite() && sm_scale > 0.0) {
            return Err(Error::BadScale(sm_scale));
        }
        self.recipe.validate()?;
        if let Some(nm) = &self.nm_softmax {
            nm.validate()?;
        }
        if let Some(vq) = &self.v_nvfp4 {
            vq.validate(self.recipe)?;
        }
        if let Some(skip) = &self.skip_softmax {
            skip.validate(self.seq_kv)?;
        }
        let q_blocks = self.seq_q.div_ceil(Q_BLOCK);
        let k_blocks = self.seq_kv.div_ceil(KV_BLOCK);
        self.sparsity
            .validate(self.batch, self.heads_q, q_blocks, k_blocks)?;
        // Element counts must fit the u32 indices the GPU kernels use.
        let q_len = checked_len(&[self.batch, self.heads_q, self.seq_q, self.head_dim])?;
        let kv_len = checked_len(&[self.batch, self.heads_kv, self.seq_kv, self.head_dim])?;
        Ok(Plan {
            spec: self.clone(),
            sm_scale,
            q_len,
            kv_len,
            q_blocks,
            k_blocks,
            q: Strides::new(self.layout, self.heads_q, self.seq_q, self.head_dim),
            kv: Strides::new(self.layout, self.heads_kv, self.seq_kv, self.head_dim),
        })
    }
}

fn checked_len(dims: &[usize]) -> Result<usize> {
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if n <= u32::MAX as usize / 4 => Ok(n),
        _ => Err(Error::TooLarge(format!(
            "a tensor of shape {dims:?} has more than 2^30 elements; split the batch or the heads into several calls"
        ))),
    }
}

/// Element strides of a [batch, head, token, dim] index in one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub batch: usize,
    pub head: usize,
    pub token: usize,
}

impl Strides {
    pub fn new(layout: Layout, heads: usize, tokens: usize, dim: usize) -> Self {
        match layout {
            Layout::Hnd => Strides {
                batch: heads * tokens * dim,
                head: tokens * dim,
                token: dim,
            },
            Layout::Nhd => Strides {
                batch: tokens * heads * dim,
                head: dim,
                token: heads * dim,
            },
        }
    }
    /// Offset of element 0 of row (b, h, t).
    #[inline]
    pub fn row(&self, b: usize, h: usize, t: usize) -> usize {
        b * self.batch + h * self.head + t * self.token
    }
}

/// A validated spec with everything derived that a backend needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub spec: AttentionSpec,
    /// The softmax scale actually used.
    pub sm_scale: f32,
    /// Elements of q (and o).
    pub q_len: usize,
    /// Elements of k (and of v).
    pub kv_len: usize,
    /// ceil(seq_q / 128): block-mask rows.
    pub q_blocks: usize,
    /// ceil(seq_kv / 64): KV tiles and block-mask columns.
    pub k_blocks: usize,
    pub q: Strides,
    pub kv: Strides,
}

impl Plan {
    /// Elements of the LSE.
    pub fn lse_len(&self) -> usize {
        self.spec.batch * self.spec.heads_q * self.spec.seq_q
    }
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.spec.heads_q / self.spec.heads_kv
    }
    /// sm_scale · log2(e) as the f32 every backend folds into Q (scores are in base 2).
    pub fn q_fold(&self) -> f32 {
        (self.sm_scale as f64 * std::f64::consts::LOG2_E) as f32
    }
    /// Bottom-right causal offset: query i sees keys j <= i + offset.
    pub fn causal_offset(&self) -> i64 {
        self.spec.seq_kv as i64 - self.spec.seq_q as i64
    }
    /// Whether key j is visible to query i under the causal rule (true when not causal).
    #[inline]
    pub fn causal_visible(&self, i: usize, j: usize) -> bool {
        !self.spec.causal || (j as i64) <= i as i64 + self.causal_offset()
    }
}
