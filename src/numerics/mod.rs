//! The single definition of every recipe's numerics. The CPU backend calls these directly;
//! the WGSL and CUDA functions carry the same names.

pub mod formats;
pub mod p;
pub mod quant;

pub use formats::{
    div_rn, e2m1_code_of_ratio, e2m1_to_f32, e4m3_from_f32, e4m3_to_f32, ftz, int8_round,
};
pub use quant::{padded_dim, quantize, QkCodes, Quantized, VCodes, MEAN_BLOCK};
