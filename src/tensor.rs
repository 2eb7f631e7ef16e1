//! Host tensors: borrowed inputs and owned outputs in f16, bf16 or f32.

use crate::spec::DType;
use half::{bf16, f16};

/// A borrowed host tensor (flat, in the spec's layout).
#[derive(Debug, Clone, Copy)]
pub enum Tensor<'a> {
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    F32(&'a [f32]),
}

/// An owned host tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorBuf {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
}

impl<'a> From<&'a [f16]> for Tensor<'a> {
    fn from(s: &'a [f16]) -> Self {
        Tensor::F16(s)
    }
}
impl<'a> From<&'a [bf16]> for Tensor<'a> {
    fn from(s: &'a [bf16]) -> Self {
        Tensor::BF16(s)
    }
}
impl<'a> From<&'a [f32]> for Tensor<'a> {
    fn from(s: &'a [f32]) -> Self {
        Tensor::F32(s)
    }
}
impl<'a> From<&'a Vec<f16>> for Tensor<'a> {
    fn from(s: &'a Vec<f16>) -> Self {
        Tensor::F16(s)
    }
}
impl<'a> From<&'a Vec<bf16>> for Tensor<'a> {
    fn from(s: &'a Vec<bf16>) -> Self {
        Tensor::BF16(s)
    }
}
impl<'a> From<&'a Vec<f32>> for Tensor<'a> {
    fn from(s: &'a Vec<f32>) -> Self {
        Tensor::F32(s)
    }
}

impl<'a> Tensor<'a> {
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::F32(_) => DType::F32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Tensor::F16(s) => s.len(),
            Tensor::BF16(s) => s.len(),
            Tensor::F32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw bytes (little-endian elements), for upload.
    pub fn bytes(&self) -> &'a [u8] {
        match *self {
            Tensor::F16(s) => bytemuck::cast_slice(s),
            Tensor::BF16(s) => bytemuck::cast_slice(s),
            Tensor::F32(s) => bytemuck::cast_slice(s),
        }
    }
    /// Decoded to f32 with subnormals flushed (the input every recipe is defined on).
    pub fn to_f32(&self) -> Vec<f32> {
        let f = crate::numerics::ftz;
        match self {
            Tensor::F16(s) => s.iter().map(|x| f(x.to_f32())).collect(),
            Tensor::BF16(s) => s.iter().map(|x| f(x.to_f32())).collect(),
            Tensor::F32(s) => s.iter().map(|&x| f(x)).collect(),
        }
    }
}

impl TensorBuf {
    /// Round f32 values to `dtype` (nearest-even).
    pub fn from_f32(dtype: DType, xs: &[f32]) -> Self {
        match dtype {
            DType::F16 => TensorBuf::F16(xs.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => TensorBuf::BF16(xs.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F32 => TensorBuf::F32(xs.to_vec()),
        }
    }
    /// Reinterpret little-endian bytes as `dtype` elements.
    pub fn from_bytes(dtype: DType, bytes: &[u8], len: usize) -> Self {
        let b = &bytes[..len * dtype.size()];
        match dtype {
            DType::F16 => TensorBuf::F16(bytemuck::pod_collect_to_vec(b)),
            DType::BF16 => TensorBuf::BF16(bytemuck::pod_collect_to_vec(b)),
            DType::F32 => TensorBuf::F32(bytemuck::pod_collect_to_vec(b)),
        }
    }
    pub fn view(&self) -> Tensor<'_> {
        match self {
            TensorBuf::F16(v) => Tensor::F16(v),
            TensorBuf::BF16(v) => Tensor::BF16(v),
            TensorBuf::F32(v) => Tensor::F32(v),
        }
    }
    pub fn dtype(&self) -> DType {
        self.view().dtype()
    }
    pub fn len(&self) -> usize {
        self.view().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decoded to f32 (exactly; no flushing).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            TensorBuf::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorBuf::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorBuf::F32(v) => v.clone(),
        }
    }
}
