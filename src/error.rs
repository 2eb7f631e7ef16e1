//! One error type for the whole crate. Every variant says what is wrong and how to fix it.

use thiserror::Error;

/// Everything that can go wrong in tessera. No function of this crate panics on bad input;
/// it returns one of these instead.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A dimension of the problem is zero.
    #[error("{what} is 0: every dimension (batch, heads, sequence lengths, head dim) must be at least 1")]
    ZeroSized { what: &'static str },

    /// Hq is not a multiple of Hkv.
    #[error("heads_q = {heads_q} is not a multiple of heads_kv = {heads_kv}: GQA/MQA needs every kv head shared by the same number of query heads (e.g. heads_q = 32, heads_kv = 8)")]
    HeadsNotMultiple { heads_q: usize, heads_kv: usize },

    /// The head dimension is outside what the kernels support.
    #[error("head_dim = {head_dim} is outside the supported range {min}..={max}: split or pad the head dimension")]
    HeadDimOutOfRange {
        head_dim: usize,
        min: usize,
        max: usize,
    },

    /// A host slice or device buffer has the wrong number of elements.
    #[error("{tensor} holds {got} elements but the spec needs {expected} ({shape}): check batch, heads, sequence length, head_dim and the layout")]
    WrongLength {
        tensor: &'static str,
        expected: usize,
        got: usize,
        shape: String,
    },

    /// A host slice has a different element type from the spec.
    #[error("{tensor} has dtype {got:?} but the spec says {expected:?}: pass all of q, k and v in the spec's dtype")]
    WrongDtype {
        tensor: &'static str,
        expected: crate::DType,
        got: crate::DType,
    },

    /// The sm_scale is not a finite positive number.
    #[error("sm_scale = {0} must be finite and > 0 (leave it None for 1/sqrt(head_dim))")]
    BadScale(f32),

    /// A recipe parameter is out of range.
    #[error("recipe parameter {name} = {value} is invalid: {fix}")]
    BadRecipeParam {
        name: &'static str,
        value: f32,
        fix: &'static str,
    },

    /// The block mask has the wrong shape.
    #[error("block mask has {got} entries but needs {expected} = batch {batch} x heads_q {heads_q} x ceil(seq_q/128) = {q_blocks} x ceil(seq_kv/64) = {k_blocks}")]
    MaskShape {
        expected: usize,
        got: usize,
        batch: usize,
        heads_q: usize,
        q_blocks: usize,
        k_blocks: usize,
    },

    /// A device buffer is too small or lacks a usage flag.
    #[error("buffer {buffer}: {problem}")]
    BadBuffer {
        buffer: &'static str,
        problem: String,
    },

    /// The problem does not fit the device (e.g. a binding larger than the adapter allows).
    #[error("{0}")]
    TooLarge(String),

    /// No wgpu adapter at all.
    #[error("no wgpu adapter found ({0}); install a Vulkan driver, or on Linux the CPU one: `apt-get install mesa-vulkan-drivers` (Mesa lavapipe); or use TESSERA_BACKEND=cpu")]
    NoAdapter(String),

    /// The adapter lacks something tessera needs.
    #[error("wgpu adapter '{adapter}' lacks {missing}: {fix}")]
    MissingFeature {
        adapter: String,
        missing: String,
        fix: String,
    },

    /// A wgpu call failed (device lost, validation, out of memory).
    #[error("wgpu: {0}")]
    Wgpu(String),

    /// A CUDA driver call failed.
    #[error("cuda: {0}")]
    Cuda(String),

    /// NVRTC rejected a kernel; the log says why.
    #[error("NVRTC failed to compile {kernel} for {arch}:\n{log}")]
    Nvrtc {
        kernel: String,
        arch: String,
        log: String,
    },

    /// A backend that was asked for by name is not available.
    #[error("backend {backend} is not available: {why}")]
    BackendUnavailable { backend: &'static str, why: String },

    /// TESSERA_BACKEND holds a value that names no backend.
    #[error("TESSERA_BACKEND = '{0}' names no backend: use cpu, wgpu or cuda (or leave it unset)")]
    BadBackendEnv(String),

    /// A cross-check found the two backends disagree past the recipe's tolerance.
    #[error("cross-check failed: {0}")]
    CrossCheck(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
