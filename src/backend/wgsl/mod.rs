//! The WGSL backend: shaders/*.wgsl through wgpu, on any adapter.
//!
//! [`WgslAttention`] is the zero-copy API for wgpu apps: the caller's device, queue and buffers,
//! recorded into the caller's encoder. [`WgslBackend`] is the host API on tessera's own device.

mod context;
pub mod kernels;

pub use context::GpuContext;

use crate::backend::{check_inputs, Backend, BackendKind, Output};
use crate::error::{Error, Result};
use crate::numerics::{padded_dim, Quantized};
use crate::recipe::Recipe;
use crate::spec::{AttentionSpec, DType, Plan};
use crate::tensor::{Tensor, TensorBuf};
use kernels::*;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// The caller's buffers for one zero-copy call. q, k, v, o hold the spec's dtype in its layout
/// (16-bit elements packed two to a 4-byte word, as on the host); lse holds f32 [B, Hq, Nq].
/// All need `BufferUsages::STORAGE`.
pub struct Buffers<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub o: &'a wgpu::Buffer,
    pub lse: Option<&'a wgpu::Buffer>,
}

/// Workspace buffers reused from call to call (grown when a larger problem comes).
#[derive(Default)]
struct Scratch {
    ws: Option<Arc<wgpu::Buffer>>,
    o32: Option<Arc<wgpu::Buffer>>,
    dummy_ro: Option<Arc<wgpu::Buffer>>,
    dummy_rw: Option<Arc<wgpu::Buffer>>,
}

/// Attention on a wgpu device: pipelines compiled once per configuration and cached,
/// workspace reused, no host round trip.
pub struct WgslAttention {
    device: wgpu::Device,
    queue: wgpu::Queue,
    description: String,
    kernels: Kernels,
    scratch: Mutex<Scratch>,
}

fn bytes4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

impl WgslAttention {
    /// Use the caller's device and queue (cheap clones of wgpu handles).
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Self {
        Self::with_description(device, queue, "caller's wgpu device".into())
    }

    fn with_description(device: &wgpu::Device, queue: &wgpu::Queue, description: String) -> Self {
        WgslAttention {
            device: device.clone(),
            queue: queue.clone(),
            description,
            kernels: Kernels::new(device),
            scratch: Mutex::default(),
        }
    }

    /// How many pipelines this instance has compiled (each configuration is compiled once).
    pub fn compiled_pipelines(&self) -> usize {
        self.kernels.compiled()
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Record the whole attention for `spec` into `encoder`: quantization passes, the attention
    /// kernel, and the output pack. Nothing is submitted and nothing waits.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &AttentionSpec,
        bufs: &Buffers,
    ) -> Result<()> {
        let plan = spec.plan()?;
        self.check_buffers(&plan, bufs)?;
        self.encode_plan(encoder, &plan, bufs)?;
        Ok(())
    }

    /// As [`encode`](Self::encode), and with skip-softmax also copy its counters into `tiles`
    /// (COPY_DST, at least [`tile_counter_bytes`](Self::tile_counter_bytes)): one
    /// (visited, skipped) u32 pair per (batch·head, 16-row query tile), batch·head outermost.
    pub fn encode_with_tiles(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &AttentionSpec,
        bufs: &Buffers,
        tiles: &wgpu::Buffer,
    ) -> Result<()> {
        let plan = spec.plan()?;
        self.check_buffers(&plan, bufs)?;
        let need = Self::tile_counter_bytes(spec)?;
        if need == 0 {
            return Err(Error::BadBuffer {
                buffer: "tiles",
                problem: "the spec has no skip-softmax, so there are no tile counters: use encode"
                    .into(),
            });
        }
        if tiles.size() < need || !tiles.usage().contains(wgpu::BufferUsages::COPY_DST) {
            return Err(Error::BadBuffer {
                buffer: "tiles",
                problem: format!(
                    "needs COPY_DST usage and {need} bytes; it has {} bytes, usage {:?}",
                    tiles.size(),
                    tiles.usage()
                ),
            });
        }
        if let Some((ws, offset, bytes)) = self.encode_plan(encoder, &plan, bufs)? {
            encoder.copy_buffer_to_buffer(&ws, offset, tiles, 0, bytes);
        }
        Ok(())
    }

    /// Bytes of skip-softmax's tile counters for `spec` (0 without skip-softmax).
    pub fn tile_counter_bytes(spec: &AttentionSpec) -> Result<u64> {
        Ok(tile_count_words(&spec.plan()?) as u64 * 4)
    }

    fn check_buffers(&self, plan: &Plan, bufs: &Buffers) -> Result<()> {
        let esize = plan.spec.dtype.size() as u64;
        let need_q = bytes4(plan.q_len as u64 * esize);
        let need_kv = bytes4(plan.kv_len as u64 * esize);
        let mut list = vec![
            ("q", bufs.q, need_q),
            ("k", bufs.k, need_kv),
            ("v", bufs.v, need_kv),
            ("o", bufs.o, need_q),
        ];
        match (plan.spec.return_lse, bufs.lse) {
            (true, Some(l)) => list.push(("lse", l, plan.lse_len() as u64 * 4)),
            (true, None) => return Err(Error::BadBuffer { buffer: "lse", problem: "the spec asks for the LSE (return_lse) but no lse buffer was given: pass one of batch*heads_q*seq_q f32".into() }),
            _ => {}
        }
        let max = self.device.limits().max_storage_buffer_binding_size;
        for (name, b, need) in list {
            if b.size() < need {
                return Err(Error::BadBuffer {
                    buffer: name,
                    problem: format!("holds {} bytes but the spec needs {need}", b.size()),
                });
            }
            if !b.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::BadBuffer {
                    buffer: name,
                    problem: format!(
                        "usage {:?} lacks STORAGE: create it with BufferUsages::STORAGE",
                        b.usage()
                    ),
                });
            }
            if need > max {
                return Err(Error::TooLarge(format!("{name} needs a {need}-byte storage binding but this device allows {max}: split the heads or the batch into several calls")));
            }
        }
        Ok(())
    }

    fn scratch_buffer(
        &self,
        slot: fn(&mut Scratch) -> &mut Option<Arc<wgpu::Buffer>>,
        bytes: u64,
        usage: wgpu::BufferUsages,
    ) -> Arc<wgpu::Buffer> {
        let mut s = self.scratch.lock().unwrap();
        let entry = slot(&mut s);
        match entry {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                let b = Arc::new(self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tessera scratch"),
                    size: bytes.max(16),
                    usage,
                    mapped_at_creation: false,
                }));
                *entry = Some(b.clone());
                b
            }
        }
    }

    fn uniform(&self, p: &Params) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("tessera params"),
                contents: bytemuck::bytes_of(p),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    fn bind<'a>(b: &'a wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'a> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: b,
            offset: 0,
            size: NonZeroU64::new(bytes4(bytes).max(4)),
        })
    }

    /// Record the quantization kernels; returns the workspace and its layout.
    fn encode_quantize(
        &self,
        pass: &mut wgpu::ComputePass,
        plan: &Plan,
        q: (&wgpu::Buffer, u64),
        k: (&wgpu::Buffer, u64),
        v: (&wgpu::Buffer, u64),
    ) -> Result<(Arc<wgpu::Buffer>, Workspace)> {
        let layout = Workspace::new(plan);
        let ws_bytes = layout.words * 4;
        let max = self.device.limits().max_storage_buffer_binding_size;
        if ws_bytes > max {
            return Err(Error::TooLarge(format!("the quantized operands need {ws_bytes} bytes but this device binds at most {max}: split the heads or the batch into several calls")));
        }
        let ws = self.scratch_buffer(
            |s| &mut s.ws,
            ws_bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let base = params(plan, &layout);
        let run = |pass: &mut wgpu::ComputePass,
                   entry: &str,
                   mode: u32,
                   src: (&wgpu::Buffer, u64),
                   workgroups: u32| {
            let p = Params { mode, ..base };
            let ub = self.uniform(&p);
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &self.kernels.quant_layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: ub.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: Self::bind(src.0, src.1),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: Self::bind(&ws, ws_bytes),
                    },
                ],
            });
            let (x, y) = grid(workgroups);
            pass.set_pipeline(&self.kernels.quant(&self.device, entry));
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(x, y, 1);
        };
        for step in quant_steps(plan) {
            let src = match step.src {
                Source::Q => q,
                Source::K => k,
                Source::V => v,
            };
            run(pass, step.entry, step.mode, src, step.workgroups());
        }
        Ok((ws, layout))
    }

    /// Query rows per workgroup for `plan` on this device, and whether the Q tile is kept in f16;
    /// a typed error when the workgroup memory is too small (or, with skip-softmax, too small
    /// for 16 rows).
    fn tile_rows(&self, plan: &Plan) -> Result<(u32, bool)> {
        let s = &plan.spec;
        let dp = padded_dim(s.head_dim) as u32;
        // Q as given and in f16: keep the tile in f16 where the device can (exact; half the memory).
        let f16_tile = self.kernels.f16
            && s.dtype == DType::F16
            && matches!(
                s.recipe,
                Recipe::Exact | Recipe::Nvfp4P { .. } | Recipe::Fp8P { .. }
            );
        let q_bytes = if f16_tile { 2 } else { 4 };
        let bq = pick_bq(dp, q_bytes, self.device.limits().max_compute_workgroup_storage_size).ok_or_else(|| Error::MissingFeature {
            adapter: self.description.clone(),
            missing: "enough workgroup memory".into(),
            fix: format!("head_dim {} needs at least {} bytes of workgroup memory; use a smaller head_dim or another adapter", s.head_dim, 4 * dp * 4 + 4 * 64 * 4 + 36),
        })?;
        if s.skip_softmax.is_some() && bq != crate::sparsity::SKIP_ROWS as u32 {
            return Err(Error::MissingFeature {
                adapter: self.description.clone(),
                missing: "workgroup memory for 16 query rows (skip-softmax decides per 16 rows)".into(),
                fix: format!("head_dim {} needs more workgroup memory than this adapter has with skip-softmax; use a smaller head_dim, f16 inputs, or another backend", s.head_dim),
            });
        }
        Ok((bq, f16_tile))
    }

    /// Record the whole call. With skip-softmax, returns where its tile counters are: the
    /// workspace buffer and the byte range (valid until the next call on this device).
    fn encode_plan(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        plan: &Plan,
        bufs: &Buffers,
    ) -> Result<Option<(Arc<wgpu::Buffer>, u64, u64)>> {
        let s = &plan.spec;
        if s.batch * s.heads_q > 65535 {
            return Err(Error::TooLarge(format!(
                "batch * heads_q = {} exceeds 65535 workgroups: split the batch into several calls",
                s.batch * s.heads_q
            )));
        }
        let dp = padded_dim(s.head_dim) as u32;
        let (bq, f16_tile) = self.tile_rows(plan)?;
        let esize = s.dtype.size() as u64;
        let q_bytes = plan.q_len as u64 * esize;
        let kv_bytes = plan.kv_len as u64 * esize;
        let mask_words: Vec<u32> = match &s.sparsity {
            crate::Sparsity::BlockMask(m) => m.data().iter().map(|&x| x as u32).collect(),
            _ => Vec::new(),
        };
        let dummy_ro = self.scratch_buffer(|s| &mut s.dummy_ro, 16, wgpu::BufferUsages::STORAGE);
        let mask_buf = (!mask_words.is_empty()).then(|| {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("tessera mask"),
                    contents: bytemuck::cast_slice(&mask_words),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        });
        // f32 outputs go straight to the caller's buffer; 16-bit ones through an f32 scratch.
        let o32 = if s.dtype == DType::F32 {
            None
        } else {
            Some(self.scratch_buffer(
                |s| &mut s.o32,
                plan.q_len as u64 * 4,
                wgpu::BufferUsages::STORAGE,
            ))
        };
        let lse_dummy = if bufs.lse.is_none() {
            Some(self.scratch_buffer(|s| &mut s.dummy_rw, 16, wgpu::BufferUsages::STORAGE))
        } else {
            None
        };

        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("tessera attention"),
            timestamp_writes: None,
        });
        let (ws, layout) = self.encode_quantize(
            &mut pass,
            plan,
            (bufs.q, q_bytes),
            (bufs.k, kv_bytes),
            (bufs.v, kv_bytes),
        )?;
        let p = params(plan, &layout);
        let ub = self.uniform(&p);
        let o_target: &wgpu::Buffer = o32.as_deref().unwrap_or(bufs.o);
        let (mask_b, mask_bytes) = match &mask_buf {
            Some(m) => (m, mask_words.len() as u64 * 4),
            None => (&*dummy_ro, 16),
        };
        let (lse_b, lse_bytes) = match (bufs.lse, &lse_dummy) {
            (Some(l), _) => (l, plan.lse_len() as u64 * 4),
            (None, Some(d)) => (&**d, 16),
            (None, None) => unreachable!("lse_dummy is made when no lse buffer is given"),
        };
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("tessera attention"),
            layout: &self.kernels.attn_layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ub.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: Self::bind(bufs.q, q_bytes),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: Self::bind(bufs.k, kv_bytes),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: Self::bind(bufs.v, kv_bytes),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: Self::bind(&ws, layout.words * 4),
                },
                wgpu::BindGroupEntry {
                    binding: 5,
                    resource: Self::bind(mask_b, mask_bytes),
                },
                wgpu::BindGroupEntry {
                    binding: 6,
                    resource: Self::bind(o_target, plan.q_len as u64 * 4),
                },
                wgpu::BindGroupEntry {
                    binding: 7,
                    resource: Self::bind(lse_b, lse_bytes),
                },
            ],
        });
        let key = AttnKey {
            recipe: recipe_id(s.recipe),
            dp,
            bq,
            f16_tile,
        };
        pass.set_pipeline(&self.kernels.attention(&self.device, key));
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(
            (s.seq_q as u32).div_ceil(bq),
            (s.batch * s.heads_q) as u32,
            1,
        );

        if let Some(o32) = &o32 {
            let words = (plan.q_len as u32).div_ceil(2);
            let pp = Params { count: words, ..p };
            let ub = self.uniform(&pp);
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("tessera pack"),
                layout: &self.kernels.quant_layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: ub.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: Self::bind(o32, plan.q_len as u64 * 4),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: Self::bind(bufs.o, q_bytes),
                    },
                ],
            });
            let (x, y) = grid(words.div_ceil(WG));
            pass.set_pipeline(&self.kernels.quant(&self.device, "pack_out"));
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
        let words = tile_count_words(plan) as u64;
        Ok((words > 0).then(|| (ws.clone(), layout.tiles as u64 * 4, words * 4)))
    }
}

/// The host API on tessera's own wgpu device.
pub struct WgslBackend {
    attn: WgslAttention,
    /// wgpu's error scopes are per device, not per thread: host calls take turns.
    calls: Mutex<()>,
}

impl WgslBackend {
    /// Open the best adapter present.
    pub fn new() -> Result<Self> {
        let ctx = GpuContext::new()?;
        Ok(WgslBackend {
            attn: WgslAttention::with_description(&ctx.device, &ctx.queue, ctx.description),
            calls: Mutex::new(()),
        })
    }

    /// The zero-copy interface on this backend's device.
    pub fn attention(&self) -> &WgslAttention {
        &self.attn
    }

    fn upload(&self, t: &Tensor, name: &str) -> wgpu::Buffer {
        let mut bytes = t.bytes().to_vec();
        bytes.resize(bytes4(bytes.len() as u64).max(4) as usize, 0);
        self.attn
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(name),
                contents: &bytes,
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    fn download(
        &self,
        encoder: wgpu::CommandEncoder,
        reads: &[(&wgpu::Buffer, u64)],
    ) -> Result<Vec<Vec<u8>>> {
        let dev = &self.attn.device;
        let mut encoder = encoder;
        let staging: Vec<wgpu::Buffer> = reads
            .iter()
            .map(|&(b, n)| {
                let s = dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tessera readback"),
                    size: bytes4(n).max(4),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.copy_buffer_to_buffer(b, 0, &s, 0, bytes4(n).max(4));
                s
            })
            .collect();
        self.attn.queue.submit([encoder.finish()]);
        let mut out = Vec::new();
        for (s, &(_, n)) in staging.iter().zip(reads) {
            let slice = s.slice(..);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            dev.poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::Wgpu(format!("poll: {e}")))?;
            rx.recv()
                .map_err(|e| Error::Wgpu(format!("map: {e}")))?
                .map_err(|e| Error::Wgpu(format!("map: {e}")))?;
            let data = slice
                .get_mapped_range()
                .map_err(|e| Error::Wgpu(format!("mapped range: {e:?}")))?;
            out.push(data[..n as usize].to_vec());
            drop(data);
            s.unmap();
        }
        Ok(out)
    }

    /// Run `f` inside validation and out-of-memory error scopes, so wgpu errors become values.
    fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _turn = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let dev = &self.attn.device;
        let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = f();
        let ve = pollster::block_on(val.pop());
        let oe = pollster::block_on(oom.pop());
        if let Some(e) = ve.or(oe) {
            return Err(Error::Wgpu(e.to_string()));
        }
        r
    }
}

/// The scalar helpers of `shaders/common.wgsl` applied to `xs` on the device, for bit-exact tests.
/// Per input: E4M3 code, INT8 code, E2M1 code of x/1, E2M1 code of x/`s`, f16 bits, bf16 bits,
/// div_rn(x, `divisor`) bits, and the f16 in the input's low half decoded.
#[doc(hidden)]
pub fn probe_scalars(
    backend: &WgslBackend,
    xs: &[f32],
    s: f32,
    divisor: f32,
) -> Result<Vec<[u32; 8]>> {
    let a = &backend.attn;
    backend.scoped(|| {
        let dev = &a.device;
        let src = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("probe in"),
            contents: bytemuck::cast_slice(xs),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let n = xs.len() as u64 * 32;
        let out = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("probe out"),
            size: n,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let p = Params {
            count: xs.len() as u32,
            fold: s,
            score_scale: divisor,
            ..Params::default()
        };
        let ub = a.uniform(&p);
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("probe"),
            layout: &a.kernels.quant_layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ub.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: src.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: out.as_entire_binding(),
                },
            ],
        });
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("probe"),
        });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("probe"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&a.kernels.quant(dev, "scalar_probe"));
            pass.set_bind_group(0, &bg, &[]);
            let (x, y) = grid((xs.len() as u32).div_ceil(WG));
            pass.dispatch_workgroups(x, y, 1);
        }
        let data = backend.download(enc, &[(&out, n)])?;
        let words: &[u32] = bytemuck::cast_slice(&data[0]);
        Ok(words.chunks(8).map(|c| c.try_into().unwrap()).collect())
    })
}

impl Backend for WgslBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wgpu
    }
    fn supports(&self, plan: &Plan) -> Result<()> {
        self.attn.tile_rows(plan).map(|_| ())
    }
    fn describe(&self) -> String {
        format!("wgpu: {}", self.attn.description)
    }

    fn run(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Output> {
        check_inputs(plan, &q, &k, &v)?;
        self.scoped(|| {
            let dev = &self.attn.device;
            let (qb, kb, vb) = (
                self.upload(&q, "q"),
                self.upload(&k, "k"),
                self.upload(&v, "v"),
            );
            let o_bytes = plan.q_len as u64 * plan.spec.dtype.size() as u64;
            let o = dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("o"),
                size: bytes4(o_bytes),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let lse = plan.spec.return_lse.then(|| {
                dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("lse"),
                    size: plan.lse_len() as u64 * 4,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            });
            let bufs = Buffers {
                q: &qb,
                k: &kb,
                v: &vb,
                o: &o,
                lse: lse.as_ref(),
            };
            self.attn.check_buffers(plan, &bufs)?;
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("tessera"),
            });
            let counters = self.attn.encode_plan(&mut enc, plan, &bufs)?;
            // Skip-softmax's counters: copied out of the workspace into a buffer of their own.
            let tiles = counters.map(|(ws, offset, bytes)| {
                let t = dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tile counters"),
                    size: bytes,
                    usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                enc.copy_buffer_to_buffer(&ws, offset, &t, 0, bytes);
                (t, bytes)
            });
            let mut reads = vec![(&o, o_bytes)];
            if let Some(l) = &lse {
                reads.push((l, plan.lse_len() as u64 * 4));
            }
            if let Some((t, bytes)) = &tiles {
                reads.push((t, *bytes));
            }
            let data = self.download(enc, &reads)?;
            Ok(Output {
                o: TensorBuf::from_bytes(plan.spec.dtype, &data[0], plan.q_len),
                lse: lse.as_ref().map(|_| bytemuck::pod_collect_to_vec(&data[1])),
                backend: self.describe(),
                tiles: tiles.map(|_| sum_tile_counts(bytemuck::cast_slice(&data[data.len() - 1]))),
            })
        })
    }

    fn quantize(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Quantized> {
        check_inputs(plan, &q, &k, &v)?;
        self.scoped(|| {
            let dev = &self.attn.device;
            let (qb, kb, vb) = (
                self.upload(&q, "q"),
                self.upload(&k, "k"),
                self.upload(&v, "v"),
            );
            let esize = plan.spec.dtype.size() as u64;
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("tessera quantize"),
            });
            let (ws, layout) = {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("tessera quantize"),
                    timestamp_writes: None,
                });
                self.attn.encode_quantize(
                    &mut pass,
                    plan,
                    (&qb, plan.q_len as u64 * esize),
                    (&kb, plan.kv_len as u64 * esize),
                    (&vb, plan.kv_len as u64 * esize),
                )?
            };
            let data = self.download(enc, &[(&ws, layout.words * 4)])?;
            Ok(unpack_workspace(
                plan,
                &layout,
                bytemuck::cast_slice(&data[0]),
            ))
        })
    }
}
