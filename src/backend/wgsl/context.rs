//! The wgpu device tessera runs on: its own (the host API), or the caller's (zero-copy API).

use crate::error::{Error, Result};

/// A device and queue with what tessera needs to know about them.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// "name (backend, device type)" for logs.
    pub description: String,
}

/// Rank adapters: native APIs before GL, hardware before CPU.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    (api, kind)
}

/// Describe an adapter for logs.
pub fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

impl GpuContext {
    /// Wrap a device the caller already has.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, description: String) -> Self {
        GpuContext {
            device,
            queue,
            description,
        }
    }

    /// Open the best adapter present (WGPU_BACKEND and friends are honoured).
    pub fn new() -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        if adapters.is_empty() {
            return Err(Error::NoAdapter("wgpu enumerated no adapter".into()));
        }
        adapters.sort_by_key(|a| rank(&a.get_info()));
        let adapter = adapters.swap_remove(0);
        let info = adapter.get_info();
        // Optional features tessera uses when offered (each has a portable path).
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        let desc = wgpu::DeviceDescriptor {
            label: Some("tessera"),
            required_features: adapter.features() & wanted,
            // The adapter's own limits: larger storage bindings and workgroup memory than the defaults.
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::Wgpu(format!("request_device on {}: {e}", describe(&info))))?;
        let f = device.features();
        let mut description = describe(&info);
        for (feature, name) in [
            (wgpu::Features::SHADER_F16, " +f16"),
            (wgpu::Features::SUBGROUP, " +subgroups"),
        ] {
            if f.contains(feature) {
                description += name;
            }
        }
        Ok(GpuContext {
            device,
            queue,
            description,
        })
    }
}
