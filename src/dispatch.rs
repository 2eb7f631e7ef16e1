//! Picks a backend, logs the choice and why, honours `TESSERA_BACKEND` and an explicit choice.

use crate::backend::wgsl::WgslBackend;
use crate::backend::{check_inputs, Backend, CpuBackend, Output};
use crate::error::{Error, Result};
use crate::spec::AttentionSpec;
use crate::tensor::Tensor;
use std::sync::{Arc, OnceLock};

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// The best present: a wgpu hardware adapter, then a wgpu CPU adapter, then the CPU reference.
    #[default]
    Auto,
    Cpu,
    Wgpu,
}

impl Choice {
    /// Read `TESSERA_BACKEND` (cpu | wgpu | auto); unset or empty means Auto.
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
            "cuda" => Err(Error::BackendUnavailable {
                backend: "cuda",
                why: "this build has no CUDA backend yet; use TESSERA_BACKEND=wgpu or cpu".into(),
            }),
            _ => Err(Error::BadBackendEnv(v.to_string())),
        }
    }
}

/// Holds the backends (created on first use) and routes calls to the chosen one.
pub struct Dispatcher {
    choice: Choice,
    wgpu: OnceLock<std::result::Result<Arc<WgslBackend>, Error>>,
    chosen: OnceLock<std::result::Result<Arc<dyn Backend>, Error>>,
}

impl Dispatcher {
    /// A dispatcher following `TESSERA_BACKEND` (Auto when unset).
    pub fn from_env() -> Result<Self> {
        Ok(Self::with_choice(Choice::from_env()?))
    }

    /// A dispatcher with an explicit choice (ignores the environment).
    pub fn with_choice(choice: Choice) -> Self {
        Dispatcher {
            choice,
            wgpu: OnceLock::new(),
            chosen: OnceLock::new(),
        }
    }

    /// The wgpu backend on its own device (created once).
    pub fn wgpu(&self) -> Result<Arc<WgslBackend>> {
        self.wgpu
            .get_or_init(|| WgslBackend::new().map(Arc::new))
            .clone()
    }

    /// The backend this dispatcher runs on, chosen once and logged.
    pub fn backend(&self) -> Result<Arc<dyn Backend>> {
        self.chosen
            .get_or_init(|| {
                let b: Arc<dyn Backend> = match self.choice {
                    Choice::Cpu => {
                        log::info!("tessera: backend cpu (asked for)");
                        Arc::new(CpuBackend)
                    }
                    Choice::Wgpu => {
                        let w = self.wgpu()?;
                        log::info!("tessera: backend {} (asked for)", w.describe());
                        w
                    }
                    Choice::Auto => match self.wgpu() {
                        Ok(w) => {
                            log::info!("tessera: backend {} (best present)", w.describe());
                            w
                        }
                        Err(e) => {
                            log::warn!("tessera: backend cpu, the f64 reference (slow): no wgpu adapter: {e}");
                            Arc::new(CpuBackend)
                        }
                    },
                };
                Ok(b)
            })
            .clone()
    }

    /// Check the inputs against the spec and run on the chosen backend.
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
        let b = self.backend()?;
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
        b.run(&plan, q, k, v)
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
