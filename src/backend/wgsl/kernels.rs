//! WGSL sources, their specializations, the pipeline cache and the parameter block.

pub use crate::backend::layout::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub const COMMON: &str = include_str!("../../../shaders/common.wgsl");
pub const QUANT: &str = include_str!("../../../shaders/quant.wgsl");
pub const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
pub const REDUCE_SHARED: &str = include_str!("../../../shaders/reduce_shared.wgsl");
pub const REDUCE_SUBGROUP: &str = include_str!("../../../shaders/reduce_subgroup.wgsl");

/// The Q tile in u32 words: f32 bits, or 4 INT8 codes per word.
const Q_TILE_WORDS: &str = "
var<workgroup> q_sh: array<u32, BQ * DP>;
fn q_put(i: u32, x: f32) { q_sh[i] = bitcast<u32>(x); }
fn q_get(i: u32) -> f32 { return bitcast<f32>(q_sh[i]); }
fn q_put_word(i: u32, w: u32) { q_sh[i] = w; }
fn q_get_word(i: u32) -> u32 { return q_sh[i]; }
";

/// The Q tile in f16 (only for recipes that read Q as given, with f16 inputs: the conversion
/// is exact). The word accessors exist so the INT8 branches type-check; they are never taken.
const Q_TILE_F16: &str = "
var<workgroup> q_sh: array<f16, BQ * DP>;
fn q_put(i: u32, x: f32) { q_sh[i] = f16(x); }
fn q_get(i: u32) -> f32 { return f32(q_sh[i]); }
fn q_put_word(i: u32, w: u32) { }
fn q_get_word(i: u32) -> u32 { return 0u; }
";

/// Threads per workgroup in every kernel.
pub const WG: u32 = 64;

/// Specialization of the attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttnKey {
    pub recipe: u32,
    pub dp: u32,
    pub bq: u32,
    /// Q tile held in f16 (needs the SHADER_F16 feature).
    pub f16_tile: bool,
}

/// The attention kernel's source for one specialization.
pub fn attention_source(key: AttnKey) -> String {
    let nch = key.dp.div_ceil(WG);
    let (enable, tile) = if key.f16_tile {
        ("enable f16;\n", Q_TILE_F16)
    } else {
        ("", Q_TILE_WORDS)
    };
    format!(
        "{enable}const RECIPE: u32 = {}u;\nconst DP: u32 = {}u;\nconst BQ: u32 = {}u;\nconst NCH: u32 = {nch}u;\n{tile}\n{COMMON}\n{ATTENTION}",
        key.recipe, key.dp, key.bq
    )
}

/// The quantization kernels' source (not specialized but for the reduction: they read
/// everything else from Params). `subgroups` needs the SUBGROUP feature.
pub fn quant_source(subgroups: bool) -> String {
    let reduce = if subgroups {
        REDUCE_SUBGROUP
    } else {
        REDUCE_SHARED
    };
    format!("{COMMON}\n{reduce}\n{QUANT}")
}

/// Query rows per workgroup: the most (16, 8 or 4, divisors of 128) whose tiles fit the
/// device's workgroup memory (the Q tile takes `q_bytes` bytes per element).
pub fn pick_bq(dp: u32, q_bytes: u32, workgroup_bytes: u32) -> Option<u32> {
    [16u32, 8, 4]
        .into_iter()
        .find(|&bq| bq * dp * q_bytes + bq * 64 * 4 + 5 * bq * 4 + 16 <= workgroup_bytes)
}

/// Bind group layouts and compiled pipelines, created once per device and specialization.
pub struct Kernels {
    pub quant_layout: wgpu::BindGroupLayout,
    pub attn_layout: wgpu::BindGroupLayout,
    quant_pl: wgpu::PipelineLayout,
    attn_pl: wgpu::PipelineLayout,
    quant_module: Mutex<Option<wgpu::ShaderModule>>,
    /// The device offers SHADER_F16 / SUBGROUP (used when present; portable path otherwise).
    pub f16: bool,
    pub subgroups: bool,
    cache: Mutex<PipelineCache>,
}

/// Compiled pipelines by (entry point, attention specialization).
type PipelineCache = HashMap<(String, Option<AttnKey>), Arc<wgpu::ComputePipeline>>;

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Kernels {
    pub fn new(device: &wgpu::Device) -> Self {
        let quant_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("tessera quant"),
            entries: &[uniform(0), storage(1, true), storage(2, false)],
        });
        let attn_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("tessera attention"),
            entries: &[
                uniform(0),
                storage(1, true),
                storage(2, true),
                storage(3, true),
                storage(4, false), // the workspace: skip-softmax writes its tile counters there
                storage(5, true),
                storage(6, false),
                storage(7, false),
            ],
        });
        let pl = |l: &wgpu::BindGroupLayout| {
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[Some(l)],
                immediate_size: 0,
            })
        };
        Kernels {
            quant_pl: pl(&quant_layout),
            attn_pl: pl(&attn_layout),
            quant_layout,
            attn_layout,
            quant_module: Mutex::new(None),
            f16: device.features().contains(wgpu::Features::SHADER_F16),
            subgroups: device.features().contains(wgpu::Features::SUBGROUP),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How many pipelines have been compiled so far (each configuration once).
    pub fn compiled(&self) -> usize {
        self.cache.lock().unwrap().len()
    }

    /// A quantization kernel by entry point name.
    pub fn quant(&self, device: &wgpu::Device, entry: &str) -> Arc<wgpu::ComputePipeline> {
        let key = (entry.to_string(), None);
        if let Some(p) = self.cache.lock().unwrap().get(&key) {
            return p.clone();
        }
        let module = {
            let mut m = self.quant_module.lock().unwrap();
            m.get_or_insert_with(|| {
                device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some("tessera quant.wgsl"),
                    source: wgpu::ShaderSource::Wgsl(quant_source(self.subgroups).into()),
                })
            })
            .clone()
        };
        let p = Arc::new(self.pipeline(device, &self.quant_pl, &module, entry));
        self.cache.lock().unwrap().insert(key, p.clone());
        p
    }

    /// The attention kernel for one specialization.
    pub fn attention(&self, device: &wgpu::Device, key: AttnKey) -> Arc<wgpu::ComputePipeline> {
        let ckey = ("attention".to_string(), Some(key));
        if let Some(p) = self.cache.lock().unwrap().get(&ckey) {
            return p.clone();
        }
        log::debug!("tessera: compiling WGSL attention {key:?}");
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("tessera attention.wgsl"),
            source: wgpu::ShaderSource::Wgsl(attention_source(key).into()),
        });
        let p = Arc::new(self.pipeline(device, &self.attn_pl, &module, "attention"));
        self.cache.lock().unwrap().insert(ckey, p.clone());
        p
    }

    fn pipeline(
        &self,
        device: &wgpu::Device,
        layout: &wgpu::PipelineLayout,
        module: &wgpu::ShaderModule,
        entry: &str,
    ) -> wgpu::ComputePipeline {
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(layout),
            module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    }
}

/// Workgroup counts (x, y) covering `n` workgroups within the 65535-per-dimension limit.
pub fn grid(n: u32) -> (u32, u32) {
    let x = n.clamp(1, 65535);
    (x, n.div_ceil(x).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_per_workgroup_follow_the_memory_limit() {
        // wgpu's default 16 KiB: D = 256 fits 8 rows in f32, 16 in f16; 4 KiB fits none.
        assert_eq!(pick_bq(256, 4, 16384), Some(8));
        assert_eq!(pick_bq(256, 2, 16384), Some(16));
        assert_eq!(pick_bq(128, 4, 32768), Some(16));
        assert_eq!(pick_bq(256, 4, 4096), None);
        // Every choice divides 128, so a workgroup never straddles a 128-row mask block.
        for dp in (16..=256).step_by(16) {
            if let Some(bq) = pick_bq(dp, 4, 16384) {
                assert_eq!(128 % bq, 0);
            }
        }
    }
}
