//! The backend seam: every backend runs a [`Plan`] on host tensors and can show its quantized
//! operands, so the dispatcher can run any request anywhere and compare two backends.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod layout;
pub mod wgsl;

use crate::error::{Error, Result};
use crate::numerics::Quantized;
use crate::spec::Plan;
use crate::tensor::{Tensor, TensorBuf};

/// Which implementation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The f64 reference on the host.
    Cpu,
    /// WGSL shaders through wgpu.
    Wgpu,
    /// CUDA kernels through NVRTC and cudarc.
    Cuda,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// The result of a host call.
#[derive(Debug, Clone)]
pub struct Output {
    /// The attention output, in the input dtype and layout.
    pub o: TensorBuf,
    /// The log-sum-exp [B, Hq, Nq] (natural log), when the spec asked for it. A row whose every
    /// key is masked has LSE = -inf (and o = 0).
    pub lse: Option<Vec<f32>>,
    /// Which backend ran, with its device (e.g. "wgpu: llvmpipe (Vulkan)").
    pub backend: String,
    /// Skip-softmax's tile counts, when the spec asks for skip-softmax.
    pub tiles: Option<crate::sparsity::TileCounts>,
}

/// One implementation of the attention.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// A one-line description: the backend and its device.
    fn describe(&self) -> String;
    /// Run the plan on host tensors (already checked against it).
    fn run(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Output>;
    /// The quantized operands the recipe derives from q, k, v (for bit-exact checks).
    fn quantize(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Quantized>;
    /// Whether this backend runs every option of the plan (Err says which one it lacks).
    fn supports(&self, _plan: &Plan) -> Result<()> {
        Ok(())
    }
}

/// Check host tensors against a plan: lengths and dtypes.
pub fn check_inputs(plan: &Plan, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let s = &plan.spec;
    let shape = |h: usize, n: usize| match s.layout {
        crate::Layout::Hnd => format!("[{}, {h}, {n}, {}] (HND)", s.batch, s.head_dim),
        crate::Layout::Nhd => format!("[{}, {n}, {h}, {}] (NHD)", s.batch, s.head_dim),
    };
    for (tensor, t, expected, sh) in [
        ("q", q, plan.q_len, shape(s.heads_q, s.seq_q)),
        ("k", k, plan.kv_len, shape(s.heads_kv, s.seq_kv)),
        ("v", v, plan.kv_len, shape(s.heads_kv, s.seq_kv)),
    ] {
        if t.dtype() != s.dtype {
            return Err(Error::WrongDtype {
                tensor,
                expected: s.dtype,
                got: t.dtype(),
            });
        }
        if t.len() != expected {
            return Err(Error::WrongLength {
                tensor,
                expected,
                got: t.len(),
                shape: sh,
            });
        }
    }
    Ok(())
}

/// The CPU reference as a backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }
    fn describe(&self) -> String {
        "cpu: f64 reference".into()
    }
    fn run(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Output> {
        let r = cpu::reference(plan, &q.to_f32(), &k.to_f32(), &v.to_f32(), None);
        Ok(Output {
            o: TensorBuf::from_f32(plan.spec.dtype, &r.o),
            lse: plan.spec.return_lse.then_some(r.lse),
            backend: self.describe(),
            tiles: r.tiles,
        })
    }
    fn quantize(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Quantized> {
        Ok(crate::numerics::quantize(
            plan,
            &q.to_f32(),
            &k.to_f32(),
            &v.to_f32(),
        ))
    }
}
