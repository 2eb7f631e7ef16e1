//! Picks a backend (CUDA > wgpu adapter > CPU reference), logs the choice and why, honours
//! `TESSERA_BACKEND` and an explicit choice, and cross-checks two backends on request.

use crate::backend::wgsl::WgslBackend;
use crate::backend::{check_inputs, Backend, CpuBackend, Output};
use crate::error::{Error, Result};
use crate::metrics::Accuracy;
use crate::numerics::{QkCodes, Quantized, VCodes};
use crate::spec::AttentionSpec;
use crate::tensor::Tensor;
use crate::Recipe;
use std::sync::{Arc, OnceLock};

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// The best present: CUDA, then a wgpu adapter (hardware before CPU adapters), then the
    /// CPU reference.
    #[default]
    Auto,
    Cpu,
    Wgpu,
    Cuda,
    /// Auto, but never CUDA.
    NoCuda,
}

impl Choice {
    /// Read `TESSERA_BACKEND` (auto | cpu | wgpu | cuda | nocuda); unset or empty means Auto.
    pub fn from_env() -> Result<Choice> {
        match std::env::var("TESSERA_BACKEND") {
            Err(_) => Ok(Choice::Auto),
            Ok(v) => Choice::parse(&v),
        }
    }

    /// Parse a backend name as `TESSERA_BACKEND` takes it.
    pub fn parse(v: &str) -> Result<Choice> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Choice::Auto),
            "cpu" => Ok(Choice::Cpu),
            "wgpu" | "wgsl" => Ok(Choice::Wgpu),
            "cuda" => Ok(Choice::Cuda),
            "nocuda" | "no-cuda" => Ok(Choice::NoCuda),
            _ => Err(Error::BadBackendEnv(v.to_string())),
        }
    }
}

type Slot<T> = OnceLock<std::result::Result<Arc<T>, Error>>;

/// Holds the backends (created on first use) and routes calls to the chosen one.
pub struct Dispatcher {
    choice: Choice,
    wgpu: Slot<WgslBackend>,
    #[cfg(feature = "cuda")]
    cuda: Slot<crate::backend::cuda::CudaBackend>,
    chosen: Slot<dyn Backend>,
    /// TESSERA_CROSS_CHECK: a second backend every call is checked against.
    check_with: Option<Choice>,
}

impl Dispatcher {
    /// A dispatcher following `TESSERA_BACKEND` (Auto when unset) and `TESSERA_CROSS_CHECK`
    /// (a backend name: every call also runs there and fails if the two disagree past the
    /// recipe's tolerance).
    pub fn from_env() -> Result<Self> {
        let mut d = Self::with_choice(Choice::from_env()?);
        if let Ok(v) = std::env::var("TESSERA_CROSS_CHECK") {
            if !v.trim().is_empty() {
                d.check_with = Some(Choice::parse(&v)?);
            }
        }
        Ok(d)
    }

    /// A dispatcher with an explicit choice (ignores the environment).
    pub fn with_choice(choice: Choice) -> Self {
        Dispatcher {
            choice,
            wgpu: OnceLock::new(),
            #[cfg(feature = "cuda")]
            cuda: OnceLock::new(),
            chosen: OnceLock::new(),
            check_with: None,
        }
    }

    /// The wgpu backend on its own device (created once).
    pub fn wgpu(&self) -> Result<Arc<WgslBackend>> {
        self.wgpu
            .get_or_init(|| WgslBackend::new().map(Arc::new))
            .clone()
    }

    /// The CUDA backend on device 0 (created once).
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Result<Arc<crate::backend::cuda::CudaBackend>> {
        self.cuda
            .get_or_init(|| crate::backend::cuda::CudaBackend::new().map(Arc::new))
            .clone()
    }

    fn cuda_dyn(&self) -> Result<Arc<dyn Backend>> {
        #[cfg(feature = "cuda")]
        {
            self.cuda().map(|c| c as Arc<dyn Backend>)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::BackendUnavailable {
                backend: "cuda",
                why: "tessera was built without the `cuda` feature".into(),
            })
        }
    }

    /// The backend for an explicit choice (Auto and NoCuda pick the best present).
    pub fn backend_for(&self, choice: Choice) -> Result<Arc<dyn Backend>> {
        match choice {
            Choice::Cpu => Ok(Arc::new(CpuBackend)),
            Choice::Wgpu => self.wgpu().map(|w| w as Arc<dyn Backend>),
            Choice::Cuda => self.cuda_dyn(),
            Choice::Auto | Choice::NoCuda => {
                if choice == Choice::Auto {
                    match self.cuda_dyn() {
                        Ok(c) => return Ok(c),
                        Err(e) => log::info!("tessera: CUDA not used: {e}"),
                    }
                }
                match self.wgpu() {
                    Ok(w) => Ok(w),
                    Err(e) => {
                        log::warn!("tessera: falling back to the CPU reference (slow): {e}");
                        Ok(Arc::new(CpuBackend))
                    }
                }
            }
        }
    }

    /// The backend this dispatcher runs on, chosen once and logged.
    pub fn backend(&self) -> Result<Arc<dyn Backend>> {
        self.chosen
            .get_or_init(|| {
                let b = self.backend_for(self.choice)?;
                let why = if matches!(self.choice, Choice::Auto | Choice::NoCuda) {
                    "best present"
                } else {
                    "asked for"
                };
                log::info!("tessera: backend {} ({why})", b.describe());
                Ok(b)
            })
            .clone()
    }

    /// Check the inputs against the spec and run on the chosen backend (and, with
    /// TESSERA_CROSS_CHECK set, on the second backend too, failing on disagreement).
    pub fn run<'a>(
        &self,
        spec: &AttentionSpec,
        q: impl Into<Tensor<'a>>,
        k: impl Into<Tensor<'a>>,
        v: impl Into<Tensor<'a>>,
    ) -> Result<Output> {
        let plan = spec.plan()?;
        let (q, k, v) = (q.into(), k.into(), v.into());
        check_inputs(&plan, &q, &k, &v)?;
        let mut b = self.backend()?;
        if let Err(e) = b.supports(&plan) {
            if !matches!(self.choice, Choice::Auto) {
                return Err(e);
            }
            log::info!("tessera: {e}; this call falls back");
            b = self.backend_for(Choice::NoCuda)?;
        }
        log::debug!(
            "tessera: {} {:?} on {}",
            spec.recipe.name(),
            (
                spec.batch,
                spec.heads_q,
                spec.seq_q,
                spec.seq_kv,
                spec.head_dim
            ),
            b.describe()
        );
        if let Some(other) = self.check_with {
            let report = self.cross_check_on(&b, &self.backend_for(other)?, spec, q, k, v)?;
            log::info!("tessera: cross-check {report}");
            if !report.passed {
                return Err(Error::CrossCheck(report.to_string()));
            }
        }
        b.run(&plan, q, k, v)
    }

    /// Run one request on two backends and compare them.
    pub fn cross_check<'a>(
        &self,
        spec: &AttentionSpec,
        a: Choice,
        b: Choice,
        q: impl Into<Tensor<'a>>,
        k: impl Into<Tensor<'a>>,
        v: impl Into<Tensor<'a>>,
    ) -> Result<CrossCheck> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        check_inputs(&spec.plan()?, &q, &k, &v)?;
        self.cross_check_on(&self.backend_for(a)?, &self.backend_for(b)?, spec, q, k, v)
    }

    fn cross_check_on(
        &self,
        a: &Arc<dyn Backend>,
        b: &Arc<dyn Backend>,
        spec: &AttentionSpec,
        q: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> Result<CrossCheck> {
        let plan = spec.clone().with_lse(true).plan()?;
        let (oa, ob) = (a.run(&plan, q, k, v)?, b.run(&plan, q, k, v)?);
        let (qa, qb) = (a.quantize(&plan, q, k, v)?, b.quantize(&plan, q, k, v)?);
        let (la, lb) = (oa.lse.unwrap_or_default(), ob.lse.unwrap_or_default());
        let lse_max_abs = la
            .iter()
            .zip(&lb)
            .filter(|(x, y)| x != y)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        let output = Accuracy::of(&oa.o.to_f32(), &ob.o.to_f32());
        let (bits_equal, bits_total) = compare_codes(&qa, &qb);
        let (tol_l1, tol_cos) = tolerance(spec.recipe, spec.dtype);
        let passed = output.rel_l1 <= tol_l1
            && output.cos >= tol_cos
            && output.non_finite_mismatch == 0
            && bits_equal == bits_total
            && !lse_max_abs.is_nan()
            && lse_max_abs <= 1e-3;
        Ok(CrossCheck {
            a: oa.backend,
            b: ob.backend,
            recipe: spec.recipe,
            output,
            lse_max_abs,
            bits_equal,
            bits_total,
            tiles: oa.tiles.zip(ob.tiles),
            passed,
        })
    }
}

/// Per-recipe agreement two backends must reach (rel-L1, cos): both compute the recipe's exact
/// quantized operands; they differ by output rounding (≤ 1 ulp of the dtype, 2^-8 relative for
/// bf16) and by rare P elements that round one step apart (an ulp of the P format on one term).
pub fn tolerance(recipe: Recipe, dtype: crate::DType) -> (f64, f64) {
    let out = if dtype == crate::DType::BF16 {
        4e-3
    } else {
        1e-3
    };
    match recipe {
        Recipe::Exact | Recipe::Int8QkF16Pv => (out + 1e-4, 0.99999),
        Recipe::Int8QkFp8Pv { .. } => (out + 5e-4, 0.9999),
        _ => (out + 2e-3, 0.9995),
    }
}

/// Count of quantized-operand bytes (codes and scales) that match between two backends.
fn compare_codes(a: &Quantized, b: &Quantized) -> (usize, usize) {
    let mut tally = (0usize, 0usize);
    let mut bytes = |x: &[u8], y: &[u8]| {
        tally.1 += x.len().max(y.len());
        tally.0 += x.iter().zip(y).filter(|(p, q)| p == q).count();
    };
    if let (Some(x), Some(y)) = (&a.k_mean, &b.k_mean) {
        bytes(&f32_bytes(x), &f32_bytes(y));
    }
    for (x, y) in [(&a.q, &b.q), (&a.k, &b.k)] {
        match (x, y) {
            (
                QkCodes::Int8 {
                    codes: c1,
                    scales: s1,
                },
                QkCodes::Int8 {
                    codes: c2,
                    scales: s2,
                },
            ) => {
                bytes(bytemuck::cast_slice(c1), bytemuck::cast_slice(c2));
                bytes(&f32_bytes(s1), &f32_bytes(s2));
            }
            (
                QkCodes::Nvfp4 {
                    codes: c1,
                    scales: s1,
                },
                QkCodes::Nvfp4 {
                    codes: c2,
                    scales: s2,
                },
            ) => {
                bytes(c1, c2);
                bytes(s1, s2);
            }
            _ => {}
        }
    }
    match (&a.v, &b.v) {
        (
            VCodes::Fp8 {
                codes: c1,
                scales: s1,
            },
            VCodes::Fp8 {
                codes: c2,
                scales: s2,
            },
        ) => {
            bytes(c1, c2);
            bytes(&f32_bytes(s1), &f32_bytes(s2));
        }
        (
            VCodes::Nvfp4 {
                codes: c1,
                scales: s1,
            },
            VCodes::Nvfp4 {
                codes: c2,
                scales: s2,
            },
        ) => {
            bytes(c1, c2);
            bytes(s1, s2);
        }
        _ => {}
    }
    tally
}

/// f32 values as bytes, every NaN canonical (scales of non-finite groups are NaN on all sides).
fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| {
            if x.is_nan() {
                0x7fc0_0000u32
            } else {
                x.to_bits()
            }
            .to_le_bytes()
        })
        .collect()
}

/// What a cross-check found.
#[derive(Debug, Clone)]
pub struct CrossCheck {
    pub a: String,
    pub b: String,
    pub recipe: Recipe,
    /// Output of a against output of b.
    pub output: Accuracy,
    /// Largest LSE difference (equal infinities count as 0).
    pub lse_max_abs: f64,
    /// Quantized-operand bytes (codes and scales) equal between the two, of all compared.
    pub bits_equal: usize,
    pub bits_total: usize,
    /// Skip-softmax's tile counts on a and on b (None without skip-softmax).
    pub tiles: Option<(crate::TileCounts, crate::TileCounts)>,
    /// Within the recipe's tolerance, quantized operands bit-identical.
    pub passed: bool,
}

impl std::fmt::Display for CrossCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} vs {} [{}]: {}; LSE max-abs {:.2e}; quantized bytes equal {}/{}{}; {}",
            self.a,
            self.b,
            self.recipe.name(),
            self.output,
            self.lse_max_abs,
            self.bits_equal,
            self.bits_total,
            self.tiles.map_or(String::new(), |(a, b)| format!(
                "; tiles skipped {}/{} vs {}/{}",
                a.skipped,
                a.visited + a.skipped,
                b.skipped,
                b.visited + b.skipped
            )),
            if self.passed { "PASS" } else { "FAIL" }
        )
    }
}

/// One call on host data, on the best available backend (or the one `TESSERA_BACKEND` names).
pub fn attention<'a>(
    spec: &AttentionSpec,
    q: impl Into<Tensor<'a>>,
    k: impl Into<Tensor<'a>>,
    v: impl Into<Tensor<'a>>,
) -> Result<Output> {
    static GLOBAL: OnceLock<std::result::Result<Dispatcher, Error>> = OnceLock::new();
    match GLOBAL.get_or_init(Dispatcher::from_env) {
        Ok(d) => d.run(spec, q, k, v),
        Err(e) => Err(e.clone()),
    }
}
