//! Shared test helpers: seeded random inputs, the GPU backend (or a printed skip), comparisons.
#![allow(dead_code)]

pub mod matrix;

use half::{bf16, f16};
use std::sync::OnceLock;
use tessera::backend::wgsl::WgslBackend;
use tessera::{AttentionSpec, DType, TensorBuf};

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A seed that differs from run to run (fresh inputs every time), printed so a failure can be
/// replayed with TESSERA_SEED.
pub fn fresh_seed(test: &str) -> u64 {
    let seed = std::env::var("TESSERA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed} (replay with TESSERA_SEED={seed})");
    seed
}

/// A tensor of `n` values drawn by `f`, in `dtype`.
pub fn tensor(dtype: DType, n: usize, mut f: impl FnMut(usize) -> f64) -> TensorBuf {
    let v: Vec<f32> = (0..n).map(|i| f(i) as f32).collect();
    match dtype {
        DType::F16 => TensorBuf::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
        DType::BF16 => TensorBuf::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        DType::F32 => TensorBuf::F32(v),
    }
}

/// Random normal q, k, v for a spec; `k_bias` adds a per-channel offset to K (the case
/// smoothing exists for).
pub fn qkv(spec: &AttentionSpec, rng: &mut Rng, k_bias: f64) -> (TensorBuf, TensorBuf, TensorBuf) {
    let plan = spec.plan().unwrap();
    let d = spec.head_dim;
    let bias: Vec<f64> = (0..d).map(|_| rng.normal() * k_bias).collect();
    let q = tensor(spec.dtype, plan.q_len, |_| rng.normal());
    let k = tensor(spec.dtype, plan.kv_len, |i| rng.normal() + bias[i % d]);
    let v = tensor(spec.dtype, plan.kv_len, |_| rng.normal());
    (q, k, v)
}

/// Whether GPU tests must fail instead of skipping: TESSERA_REQUIRE_GPU=1 (the GPU machine)
/// requires CUDA and a wgpu adapter.
pub fn gpu_required() -> bool {
    std::env::var("TESSERA_REQUIRE_GPU")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// TESSERA_REQUIRE_WGPU=1 (CI, with lavapipe and no CUDA) requires a wgpu adapter only.
pub fn wgpu_required() -> bool {
    gpu_required()
        || std::env::var("TESSERA_REQUIRE_WGPU")
            .map(|v| v == "1")
            .unwrap_or(false)
}

/// The wgpu backend, or None with a printed reason (a panic when TESSERA_REQUIRE_GPU=1).
pub fn wgpu() -> Option<&'static WgslBackend> {
    static B: OnceLock<Result<WgslBackend, String>> = OnceLock::new();
    match B.get_or_init(|| WgslBackend::new().map_err(|e| e.to_string())) {
        Ok(b) => Some(b),
        Err(e) if wgpu_required() => {
            panic!("TESSERA_REQUIRE_GPU=1 or TESSERA_REQUIRE_WGPU=1 but no wgpu adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

/// Run through the zero-copy API with o and lse poisoned (all NaN) beforehand, so an element
/// the kernels never write shows up as NaN. Returns o decoded to f32 and the LSE.
pub fn run_poisoned(
    w: &WgslBackend,
    spec: &AttentionSpec,
    q: &TensorBuf,
    k: &TensorBuf,
    v: &TensorBuf,
) -> (Vec<f32>, Option<Vec<f32>>) {
    use tessera::backend::wgsl::Buffers;
    use wgpu::util::DeviceExt;
    let attn = w.attention();
    let (dev, queue) = (attn.device(), attn.queue());
    let plan = spec.plan().unwrap();
    let upload = |t: &TensorBuf, usage: wgpu::BufferUsages| {
        let mut bytes = t.view().bytes().to_vec();
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &bytes,
            usage,
        })
    };
    let st = wgpu::BufferUsages::STORAGE;
    let (qb, kb, vb) = (upload(q, st), upload(k, st), upload(v, st));
    let poison_o = tensor(spec.dtype, plan.q_len, |_| f64::NAN);
    let ob = upload(&poison_o, st | wgpu::BufferUsages::COPY_SRC);
    let lb = spec.return_lse.then(|| {
        upload(
            &TensorBuf::F32(vec![f32::NAN; plan.lse_len()]),
            st | wgpu::BufferUsages::COPY_SRC,
        )
    });
    let mut enc = dev.create_command_encoder(&Default::default());
    attn.encode(
        &mut enc,
        spec,
        &Buffers {
            q: &qb,
            k: &kb,
            v: &vb,
            o: &ob,
            lse: lb.as_ref(),
        },
    )
    .unwrap();
    let read = |enc: &mut wgpu::CommandEncoder, b: &wgpu::Buffer| {
        let s = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: b.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.copy_buffer_to_buffer(b, 0, &s, 0, b.size());
        s
    };
    let os = read(&mut enc, &ob);
    let ls = lb.as_ref().map(|l| read(&mut enc, l));
    queue.submit([enc.finish()]);
    let fetch = |s: &wgpu::Buffer| -> Vec<u8> {
        s.slice(..).map_async(wgpu::MapMode::Read, |r| r.unwrap());
        dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let v = s.slice(..).get_mapped_range().unwrap().to_vec();
        s.unmap();
        v
    };
    let o = TensorBuf::from_bytes(spec.dtype, &fetch(&os), plan.q_len).to_f32();
    let lse = ls
        .as_ref()
        .map(|s| bytemuck::pod_collect_to_vec(&fetch(s)[..plan.lse_len() * 4]));
    (o, lse)
}

/// The CUDA backend, or None with a printed reason (a panic when TESSERA_REQUIRE_GPU=1).
pub fn cuda() -> Option<&'static tessera::backend::cuda::CudaBackend> {
    use tessera::backend::cuda::CudaBackend;
    static B: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match B.get_or_init(|| CudaBackend::new().map_err(|e| e.to_string())) {
        Ok(b) => Some(b),
        Err(e) if gpu_required() => panic!("TESSERA_REQUIRE_GPU=1 but CUDA is unusable: {e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Every GPU backend present (each missing one printed, or a panic under TESSERA_REQUIRE_GPU=1).
pub fn gpu_backends() -> Vec<&'static dyn tessera::Backend> {
    let mut v: Vec<&'static dyn tessera::Backend> = Vec::new();
    if let Some(w) = wgpu() {
        v.push(w);
    }
    if let Some(c) = cuda() {
        v.push(c);
    }
    v
}
