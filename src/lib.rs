//! # tessera
//!
//! Tiled (flash-style) attention with simulated INT8 / FP8 / NVFP4 quantization (the
//! SageAttention recipes and ModelOpt's NVFP4 P quantization) and block sparsity, on three
//! backends that compute the same numerics: a CPU reference (quantizers bit-exact, attention
//! in f64), WGSL shaders on any wgpu adapter, and CUDA.
//!
//! ```no_run
//! use tessera::{AttentionSpec, Recipe, Layout, DType};
//! use half::f16;
//! let spec = AttentionSpec::new(1, 8, 1024, 128).with_recipe(Recipe::Int8QkF16Pv).with_lse(true);
//! let n = 8 * 1024 * 128;
//! let q: Vec<f16> = (0..n).map(|i| f16::from_f32(((i * 7919) % 13) as f32 / 13.0 - 0.5)).collect();
//! let out = tessera::attention(&spec, &q, &q, &q).unwrap();
//! println!("ran on {}", out.backend);
//! ```

pub mod backend;
pub mod dispatch;
pub mod error;
pub mod metrics;
pub mod numerics;
pub mod recipe;
pub mod sparsity;
pub mod spec;
pub mod tensor;

pub use backend::{Backend, BackendKind, CpuBackend, Output};
pub use dispatch::{attention, Choice, CrossCheck, Dispatcher};
pub use error::{Error, Result};
pub use recipe::{QkGranularity, Recipe, VNvfp4};
pub use sparsity::{BlockMask, NmSoftmax, SkipSoftmax, Sparsity, TileCounts};
pub use spec::{AttentionSpec, DType, Layout, Plan};
pub use tensor::{Tensor, TensorBuf};
