//! placeholder
use crate::backend::{Backend, BackendKind, Output};
use crate::error::{Error, Result};
use crate::numerics::Quantized;
use crate::spec::Plan;
use crate::tensor::Tensor;
pub struct WgslBackend;
impl WgslBackend { pub fn new() -> Result<Self> { Err(Error::NoAdapter("todo".into())) } }
impl Backend for WgslBackend {
    fn kind(&self) -> BackendKind { BackendKind::Wgpu }
    fn describe(&self) -> String { "wgpu".into() }
    fn run(&self, _: &Plan, _: Tensor, _: Tensor, _: Tensor) -> Result<Output> { todo!() }
    fn quantize(&self, _: &Plan, _: Tensor, _: Tensor, _: Tensor) -> Result<Quantized> { todo!() }
}
