//! The CUDA backend: kernels/*.cu compiled at run time with NVRTC for the device's exact arch
//! and launched with cudarc, always on an explicit stream (never the legacy default stream,
//! which would escape CUDA-graph capture).
//!
//! [`CudaAttention`] is the zero-copy API: the caller's stream and device slices, nothing
//! synchronised. [`CudaBackend`] is the host API on its own context and stream.

pub mod nvrtc;
mod scratch;
mod tma;
use tma::TmaMap;

use crate::backend::layout::*;
use crate::backend::{check_inputs, Backend, BackendKind, Output};
use crate::error::{Error, Result};
use crate::numerics::{padded_dim, Quantized};
use crate::spec::{AttentionSpec, DType, Plan};
use crate::tensor::{Tensor, TensorBuf};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

// SAFETY: Params is repr(C) plain data, the layout of `struct Params` in common.cuh.
unsafe impl DeviceRepr for Params {}

/// Where the tensor-core kernel reads its 16-bit Q, K, V (element strides: batch, head, token):
/// `struct Strides16` in kernels/attention_mma.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Strides16 {
    q: [u32; 3],
    k: [u32; 3],
    v: [u32; 3],
}

// SAFETY: repr(C), nine u32, the layout of `struct Strides16`.
unsafe impl DeviceRepr for Strides16 {}

/// Query rows per thread block of the CUDA-core kernel (a divisor of 128; the tiles fit the
/// 48 KiB of static shared memory up to head_dim 256).
const BQ: u32 = 16;

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// Is a CUDA driver and NVRTC present? The reason when not (cudarc would panic otherwise).
pub fn availability() -> std::result::Result<(), String> {
    // SAFETY: only probes for the shared libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) found".into());
    }
    if !nvrtc::present() {
        return Err("no NVRTC library (libnvrtc.so) found: install the CUDA toolkit's NVRTC or put it on LD_LIBRARY_PATH".into());
    }
    Ok(())
}

/// The NVRTC arch name for a compute capability (sm_90a on Hopper for its own instructions).
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (9, 0) => "sm_90a",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (10, 0) => "sm_100a",
        (12, 0) => "sm_120a",
        (m, n) if m >= 8 => return Err(Error::BackendUnavailable { backend: "cuda", why: format!("compute capability {m}.{n} is not in tessera's arch table yet") }),
        (m, n) => return Err(Error::BackendUnavailable { backend: "cuda", why: format!("compute capability {m}.{n} is below 8.0 (Ampere); tessera's CUDA kernels need sm_80 or newer") }),
    })
}

/// The launch shape of the tensor-core kernel. Its blocks hold warps · 16 · m_tiles query rows:
/// 128 (the block mask's query block) with mma.sync, 64 or 128 with wgmma.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaConfig {
    /// Warps per block.
    pub warps: u32,
    /// 16-row m-tiles per warp (each K/V fragment feeds this many mma).
    pub m_tiles: u32,
    /// Q's fragments in shared memory (read by ldmatrix) rather than in registers.
    pub q_in_shared: bool,
    /// Blocks per SM the register allocation must allow (__launch_bounds__).
    pub min_blocks: u32,
    /// Run N:M sparse softmax on tensor cores (false: the CUDA-core kernel runs it).
    pub nm: bool,
    /// Hopper warpgroup MMA (wgmma, sm_90a) instead of mma.sync: whole warpgroups, one m-tile
    /// per warp, Q in shared memory.
    pub wgmma: bool,
}

impl MmaConfig {
    /// Hopper and Ampere A100 (≥ 163 KiB of shared memory per SM): Q in shared memory, so
    /// registers fit two blocks per SM. Smaller parts (sm_86/89, 100 KiB): Q in registers.
    pub fn for_arch(arch: &str) -> MmaConfig {
        let big_smem = arch.starts_with("sm_90") || arch == "sm_80" || arch.starts_with("sm_100");
        MmaConfig {
            warps: 8,
            m_tiles: 1,
            q_in_shared: big_smem,
            min_blocks: if big_smem { 2 } else { 1 },
            nm: true,
            wgmma: false,
        }
    }

    /// Hopper's warpgroup shape: 2 warpgroups of 64 rows and a TMA producer warp, one block per
    /// SM (TESSERA_MMA_CONFIG=8,1,1,1,1 or `with_mma_config`). The sm_90a default at head dims
    /// 128 and 64, the dims it runs (docs/design.md, "The wgmma shape").
    pub fn hopper_wgmma() -> MmaConfig {
        MmaConfig {
            warps: 8,
            m_tiles: 1,
            q_in_shared: true,
            min_blocks: 1,
            nm: true,
            wgmma: true,
        }
    }

    /// `hopper_wgmma` with three consumer warpgroups (192 query rows per block, 13 warps): the
    /// sm_90a default at head dim 128 (TESSERA_MMA_CONFIG=12,1,1,1,1). The kernels there are
    /// bound by their warps' CUDA-core work and latency, not the tensor cores: a third warpgroup
    /// gives each scheduler a third warp to issue from (ptxas fits them in 128 registers, no
    /// spills). Measured on the H200 at H=24 N=16384: exact 6.48 → 5.75 ms, int8qk-f16pv 7.03 →
    /// 5.99, fp8-p 6.81 → 5.76, nvfp4-p 9.99 → 9.27 (docs/benchmarks.md, ninth session).
    /// Int8QkFp8Pv runs its P·V in f16 here (E4M3 values are f16 values): FP8 P·V's per-tile
    /// accumulator needs the registers that only the two-warpgroup shape's producer warpgroup
    /// can hand over (TESSERA_MMA_CONFIG=8,1,1,1,1 runs it). Block masks keep two warpgroups
    /// (`tensor_core_fit`).
    pub fn hopper_wgmma3() -> MmaConfig {
        MmaConfig {
            warps: 12,
            ..MmaConfig::hopper_wgmma()
        }
    }

    /// Hopper's mma.sync shape at head dim 128: 4 warps × 2 m-tiles (each K/V fragment feeds two
    /// mma), Q in shared memory, one block per SM.
    pub fn hopper_wide() -> MmaConfig {
        MmaConfig {
            warps: 4,
            m_tiles: 2,
            q_in_shared: true,
            min_blocks: 1,
            nm: true,
            wgmma: false,
        }
    }

    /// The default for `plan` on `arch`. sm_90a: `hopper_wgmma3` at head dim 128, `hopper_wgmma`
    /// at 64 with two blocks per SM except for dense Exact
    /// (measured on the H100 at H=48 N=16384: exact 286 → 424 TOPS over 8 × 1 mma.sync; the
    /// other recipes 8–22% faster with two blocks, exact 1–3% slower; fp8-p was too until
    /// its one-block build slowed to 12.0 ms (eighth session; 8.4 ms with two blocks). Other Hopper
    /// plans at 128: `hopper_wide`, measured 3–13% faster than 8 × 1 for every recipe but Nvfp4
    /// (+3%, its per-row factor state) (docs/benchmarks.md, tuning log).
    pub fn for_plan(arch: &str, plan: &Plan) -> MmaConfig {
        let dp = padded_dim(plan.spec.head_dim);
        if arch == "sm_90a" && dp == 128 {
            return MmaConfig::hopper_wgmma3();
        }
        if arch == "sm_90a" && dp == 64 {
            // Dense Exact fits two blocks per SM (94 registers) with one asked; with
            // skip-softmax or N:M it took 108-113 and ran one block per SM: asked for two,
            // 94-95, no spills (exact at H=48 N=16384: skip 11.05 → 7.64-7.73 ms, 4:8 14.78 →
            // 12.03, 2:4 unchanged; dense asked for two ran 3% slower).
            let s = &plan.spec;
            let light = s.recipe == crate::Recipe::Exact
                && s.skip_softmax.is_none()
                && s.nm_softmax.is_none();
            return MmaConfig {
                min_blocks: if light { 1 } else { 2 },
                ..MmaConfig::hopper_wgmma()
            };
        }
        if arch.starts_with("sm_90") && dp == 128 && plan.spec.recipe != crate::Recipe::Nvfp4 {
            return MmaConfig::hopper_wide();
        }
        MmaConfig::for_arch(arch)
    }

    /// "warps,m_tiles,q_in_shared,min_blocks[,wgmma]", e.g. "4,2,1,1" or "8,1,1,1,1"
    /// (TESSERA_MMA_CONFIG, for tuning).
    pub fn parse(s: &str) -> Option<MmaConfig> {
        let v: Vec<u32> = s.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        let (w, mt, q, b, wg) = match v[..] {
            [w, mt, q, b] => (w, mt, q, b, 0),
            [w, mt, q, b, wg] => (w, mt, q, b, wg),
            _ => return None,
        };
        // mma.sync blocks hold 128 rows; a wgmma block one or two warpgroups (64 or 128 rows).
        let ok = b >= 1
            && if wg == 0 {
                w * mt * 16 == 128
            } else {
                mt == 1 && (w == 4 || w == 8 || w == 12) && q != 0
            };
        ok.then_some(MmaConfig {
            warps: w,
            m_tiles: mt,
            q_in_shared: q != 0,
            min_blocks: b,
            nm: true,
            wgmma: wg != 0,
        })
    }

    /// Dynamic shared memory: [Q tile] then `stages` stages of (K tile, V tile, K scales), rows
    /// padded by 16 bytes for mma.sync (kernels/attention_mma.cu, Q_TILE and STAGE_BYTES), then
    /// wgmma's P tiles.
    fn shared_bytes(&self, recipe: u32, dp: u32) -> u32 {
        let int8_qk = recipe == 1 || recipe == 2;
        let pad = if self.wgmma { 0 } else { 16 };
        let qk_row = if int8_qk { dp } else { 2 * dp } + pad;
        let rows = 16 * self.warps * self.m_tiles;
        let q = if self.q_in_shared { rows * qk_row } else { 0 };
        // wgmma: each warpgroup's P tile (64 rows × 64 keys, 16-bit), two deep. TMA: K scales
        // padded to 1024 bytes (stages stay 1024-byte aligned), and 1024 bytes of room to align.
        let p = if self.wgmma {
            2 * (self.warps / 4) * 64 * 64 * 2
        } else {
            0
        };
        let (scales, room) = if self.wgmma {
            (1024, 1024)
        } else {
            (4 * 64, 0)
        };
        q + self.stages() * (64 * qk_row + 64 * (2 * dp + pad) + scales) + p + room
    }

    /// The mma.sync shape that stands in for wgmma where wgmma cannot run a plan (not sm_90a,
    /// a tensor map the driver refuses): Hopper's 4 × 2, a compile-checked module.
    fn without_wgmma(self) -> MmaConfig {
        MmaConfig {
            nm: self.nm,
            ..MmaConfig::hopper_wide()
        }
    }

    /// K/V stages in shared memory (kernels: `STAGES`): three where a TMA producer warp runs ahead.
    fn stages(&self) -> u32 {
        if self.wgmma {
            3
        } else {
            2
        }
    }

    /// Threads per block (kernels: `THREADS`): the row-owning warps, plus wgmma's TMA producer
    /// warp, or with FP8 P·V (Int8QkFp8Pv on wgmma at head dim 128) a producer warpgroup, whose registers
    /// setmaxnreg hands to the consumers.
    pub fn threads(&self, fp8_pv: bool) -> u32 {
        32 * self.warps
            + match (self.wgmma, fp8_pv) {
                (false, _) => 0,
                (true, false) => 32,
                (true, true) => 128,
            }
    }

    /// The head dims (padded) the wgmma shape runs: K and V come by the tensor copy engine in
    /// 64- or 128-byte swizzle panels (rows of 64 to 256 bytes). Elsewhere it stands down to
    /// mma.sync (`CudaAttention::kernel_for`).
    pub fn wgmma_dim(dp: u32) -> bool {
        dp == 128 || dp == 64
    }
}

/// One compiled module: the quantizers, or a specialization of an attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Quant,
    /// The CUDA-core kernel (kernels/attention.cu): every recipe, dtype and head dim.
    Simt {
        recipe: u32,
        dp: u32,
    },
    /// The tensor-core kernel (kernels/attention_mma.cu): see [`tensor_core_fit`].
    Mma {
        recipe: u32,
        dp: u32,
        bf16: bool,
        cfg: MmaConfig,
        /// Skip-softmax compiled in (its test would cost the dense kernel registers).
        skip: bool,
        /// N:M sparse softmax's (N, M) compiled in ((0, 0): none).
        nm: (u32, u32),
        /// V → NVFP4: V read from f16 copies of its codes' values, the output times v_g.
        vnv: bool,
        /// K's and V's rows permuted within each 64-key tile by the tensor maps, so that a
        /// thread's scores of a row are 16 consecutive keys ([`kperm_fits`]).
        kperm: bool,
        /// Nvfp4P's P path compiled in ([`nvfp4p_path`]): `None` both, FLAG_P_DIRECT picks at
        /// run time; `Some(true)` the direct path only; `Some(false)` the general one only.
        p_direct: Option<bool>,
    },
}

impl Module {
    pub fn label(&self) -> String {
        match self {
            Module::Quant => "quant".into(),
            Module::Simt { recipe, dp } => format!("attention-r{recipe}-d{dp}"),
            Module::Mma {
                recipe,
                dp,
                bf16,
                cfg,
                skip,
                nm,
                vnv,
                kperm,
                p_direct,
            } => format!(
                "attention-mma-r{recipe}-d{dp}-{}-w{}m{}q{}b{}{}{}{}{}{}{}",
                if *bf16 { "bf16" } else { "f16" },
                cfg.warps,
                cfg.m_tiles,
                cfg.q_in_shared as u32,
                cfg.min_blocks,
                if *skip { "-skip" } else { "" },
                if nm.1 > 0 {
                    format!("-nm{}of{}", nm.0, nm.1)
                } else {
                    String::new()
                },
                if *vnv { "-vnv" } else { "" },
                if *kperm { "-kp" } else { "" },
                match p_direct {
                    None => "",
                    Some(true) => "-pd1",
                    Some(false) => "-pd0",
                },
                if cfg.wgmma { "-wgmma" } else { "" }
            ),
        }
    }
}

/// Source of a module.
pub fn module_source(m: Module) -> String {
    match m {
        Module::Quant => nvrtc::source(&[], &nvrtc::kernel_text("quant.cu", nvrtc::QUANT)),
        Module::Simt { recipe, dp } => nvrtc::source(
            &[
                ("RECIPE", recipe),
                ("DP", dp),
                ("BQ", BQ),
                ("NCH", dp.div_ceil(64)),
            ],
            &nvrtc::kernel_text("attention.cu", nvrtc::ATTENTION),
        ),
        Module::Mma {
            recipe,
            dp,
            bf16,
            cfg,
            skip,
            nm,
            vnv,
            kperm,
            p_direct,
        } => nvrtc::source(
            &[
                ("RECIPE", recipe),
                ("PDIR", p_direct.map_or(2, |d| d as u32)),
                ("DP", dp),
                ("BF16", bf16 as u32),
                ("SKIP", skip as u32),
                ("NM", nm.1),
                ("NM_N", nm.0),
                ("VNV", vnv as u32),
                ("KPERM", kperm as u32),
                ("WARPS", cfg.warps),
                ("MT", cfg.m_tiles),
                ("QSMEM", cfg.q_in_shared as u32),
                ("MINB", cfg.min_blocks),
                ("WGMMA", cfg.wgmma as u32),
            ],
            &nvrtc::attention_mma_body(),
        ),
    }
}

/// The recipes and padded head dims the tensor-core kernel is built for.
const MMA_RECIPES: [u32; 6] = [0, 1, 2, 3, 4, 5];
const MMA_DIMS: [u32; 4] = [32, 64, 96, 128];

/// Every module specialization (for compile checks): label, source, and whether it is for
/// sm_90a only (the wgmma shape).
pub fn all_modules() -> Vec<(String, String, bool)> {
    let mut mods = vec![Module::Quant];
    for recipe in 0..6 {
        for dp in (16..=256).step_by(16) {
            mods.push(Module::Simt { recipe, dp });
        }
    }
    // The default launch shapes (shared-memory Q with 8 × 1 or 4 × 2 warps × m-tiles, register Q).
    // (skip-softmax variants with Hopper's shapes only: the code path is the same.)
    let sm90 = MmaConfig::for_arch("sm_90a");
    let sm90_wide = MmaConfig::hopper_wide();
    // (recipes, launch shape, skip-softmax, N:M's (N, M), V → NVFP4), each over every dim and dtype.
    type Variant = (Vec<u32>, MmaConfig, bool, (u32, u32), bool);
    let mut variants: Vec<Variant> = Vec::new();
    for (cfg, skip) in [
        (sm90, false),
        (sm90_wide, false),
        (MmaConfig::hopper_wgmma(), false),
        (MmaConfig::for_arch("sm_89"), false),
        (sm90, true),
        (sm90_wide, true),
        (MmaConfig::hopper_wgmma(), true),
        (MmaConfig::for_arch("sm_89"), true),
    ] {
        variants.push((MMA_RECIPES.to_vec(), cfg, skip, (0, 0), false));
    }
    // N:M with ModelOpt's P modes; V → NVFP4 with the recipes that allow it.
    // (N:M with each N of M = 4 and a few of M = 8: N is compiled in.)
    let nms = [
        (0, (2, 4)),
        (4, (3, 8)),
        (5, (2, 4)),
        (0, (1, 4)),
        (0, (3, 4)),
        (0, (7, 8)),
        (1, (1, 8)),
    ];
    for &(recipe, nm) in &nms[..4] {
        variants.push((vec![recipe], sm90, false, nm, false));
    }
    variants.push((vec![0, 1, 4, 5], sm90, false, (0, 0), true));
    for (recipe, nm) in nms {
        variants.push((vec![recipe], MmaConfig::hopper_wgmma(), false, nm, false));
        variants.push((vec![recipe], MmaConfig::hopper_wgmma3(), false, nm, false));
    }
    for skip in [false, true] {
        variants.push((
            MMA_RECIPES.to_vec(),
            MmaConfig::hopper_wgmma3(),
            skip,
            (0, 0),
            false,
        ));
    }
    variants.push((
        vec![0, 1, 2, 4, 5],
        MmaConfig::hopper_wgmma3(),
        false,
        (0, 0),
        true,
    ));
    variants.push((
        vec![0, 1, 4, 5],
        MmaConfig::hopper_wgmma(),
        false,
        (0, 0),
        true,
    ));
    let mut kperm_variants = Vec::new();
    for cfg in [
        MmaConfig::hopper_wgmma(),
        MmaConfig::hopper_wgmma3(),
        MmaConfig {
            min_blocks: 2,
            ..MmaConfig::hopper_wgmma()
        },
    ] {
        kperm_variants.push((MMA_RECIPES.to_vec(), cfg, false, (2, 4), false));
        kperm_variants.push((vec![0, 4], cfg, false, (4, 8), false));
        kperm_variants.push((vec![0], cfg, false, (1, 4), false));
        kperm_variants.push((vec![5], cfg, false, (3, 8), false));
        // NVFP4 P without N:M: dense, with skip-softmax, with V → NVFP4.
        kperm_variants.push((vec![3, 4], cfg, false, (0, 0), false));
        kperm_variants.push((vec![3, 4], cfg, true, (0, 0), false));
        kperm_variants.push((vec![4], cfg, false, (0, 0), true));
    }
    let all = variants
        .into_iter()
        .map(|v| (v, false))
        .chain(kperm_variants.into_iter().map(|v| (v, true)));
    for ((recipes, cfg, skip, nm, vnv), kperm) in all {
        for recipe in recipes {
            for dp in MMA_DIMS
                .into_iter()
                .filter(|&d| !cfg.wgmma || MmaConfig::wgmma_dim(d))
                .filter(|&d| cfg.warps <= 8 || d == 128)
                .filter(|&d| !(kperm && fp8_pv(recipe, vnv, cfg, d)))
                // (Two blocks per SM is head dim 64's default only.)
                .filter(|&d| !(kperm && cfg.min_blocks == 2 && d != 64))
            {
                for bf16 in [false, true] {
                    mods.push(Module::Mma {
                        recipe,
                        dp,
                        bf16,
                        cfg,
                        skip,
                        nm,
                        vnv,
                        kperm,
                        p_direct: None,
                    });
                }
            }
        }
    }
    // sm_90a's default at head dim 64 for all but dense Exact: two wgmma blocks per SM
    // (`for_plan`).
    for recipe in [0, 1, 2, 3, 4, 5] {
        for (bf16, skip) in [(false, false), (true, false), (false, true), (true, true)] {
            if recipe == 0 && !skip {
                continue;
            }
            mods.push(Module::Mma {
                recipe,
                dp: 64,
                bf16,
                cfg: MmaConfig {
                    min_blocks: 2,
                    ..MmaConfig::hopper_wgmma()
                },
                skip,
                nm: (0, 0),
                vnv: false,
                kperm: false,
                p_direct: None,
            });
        }
    }
    // Nvfp4P's modules with one P path compiled in (`nvfp4p_path`, the default) beside those
    // with both (TESSERA_NVFP4P_PATH_MODULES=0): every Nvfp4P shape above, each way.
    let one_path: Vec<Module> = mods
        .iter()
        .filter(|m| {
            matches!(
                m,
                Module::Mma {
                    recipe: 4,
                    p_direct: None,
                    ..
                }
            )
        })
        .flat_map(|&m| {
            [true, false].map(|direct| {
                let mut one = m;
                if let Module::Mma { p_direct, .. } = &mut one {
                    *p_direct = Some(direct);
                }
                one
            })
        })
        .collect();
    mods.extend(one_path);
    let mut seen = std::collections::HashSet::new();
    mods.retain(|m| seen.insert(*m)); // (a shape two lists above share compiles once)
    mods.into_iter()
        .map(|m| {
            let hopper = matches!(m, Module::Mma { cfg, .. } if cfg.wgmma);
            (m.label(), module_source(m), hopper)
        })
        .collect()
}

/// Can the tensor-core kernel run `plan`? `Err` says why not (the CUDA-core kernel runs it then).
pub fn tensor_core_fit(plan: &Plan, cfg: MmaConfig) -> std::result::Result<Module, String> {
    let s = &plan.spec;
    let dp = padded_dim(s.head_dim) as u32;
    let recipe = recipe_id(s.recipe);
    if s.dtype == DType::F32 {
        return Err("f32 inputs (the tensor cores take 16-bit operands)".into());
    }
    if !MMA_RECIPES.contains(&recipe) {
        return Err(format!(
            "recipe {} (not on tensor cores yet)",
            s.recipe.name()
        ));
    }
    if s.nm_softmax.is_some() && !cfg.nm {
        return Err("N:M sparse softmax (this MmaConfig turns it off on tensor cores)".into());
    }
    if !MMA_DIMS.contains(&dp) || s.head_dim % 8 != 0 {
        return Err(format!(
            "head_dim {} (tensor cores: a multiple of 8 whose 16-padding is one of {MMA_DIMS:?})",
            s.head_dim
        ));
    }
    if cfg.wgmma && !MmaConfig::wgmma_dim(dp) {
        return Err(format!(
            "head_dim {} on the wgmma shape (head dims 64 and 128)",
            s.head_dim
        ));
    }
    let strides = [
        plan.q.batch,
        plan.q.head,
        plan.q.token,
        plan.kv.batch,
        plan.kv.head,
        plan.kv.token,
    ];
    if strides.iter().any(|x| x % 8 != 0) {
        return Err("strides that are not multiples of 8 elements (16-byte rows)".into());
    }
    // Block masks: rows of 128 queries, and a block reads one mask row: two warpgroups.
    let block_mask = matches!(s.sparsity, crate::Sparsity::BlockMask(_));
    let cfg = if block_mask && cfg.warps > 8 {
        MmaConfig { warps: 8, ..cfg }
    } else {
        cfg
    };
    let vnv = s.v_nvfp4.is_some();
    Ok(Module::Mma {
        recipe,
        dp,
        bf16: s.dtype == DType::BF16,
        cfg,
        skip: s.skip_softmax.is_some(),
        nm: s.nm_softmax.map_or((0, 0), |n| (n.n, n.m)),
        vnv,
        kperm: kperm_fits(plan, cfg, recipe, dp, vnv),
        p_direct: nvfp4p_path(s, nvfp4p_direct(), nvfp4p_path_modules()),
    })
}

/// Which of Nvfp4P's P paths a module compiles in (`Module::Mma::p_direct`): with
/// `specialize`, only the one the call takes (the direct path where `direct_on` and the spec
/// allow it, FLAG_P_DIRECT; else the general one); otherwise both, the flag deciding at run
/// time. One path per module frees the registers and schedule of the other (nineteenth session,
/// H200, A/B against both paths: nvfp4-p −1 to −4% dense, and with skip-softmax its λ = 1e-30
/// run 6.72 → 6.25 ms at 24,16384,128, below its dense build; docs/benchmarks.md). On by
/// default; `TESSERA_NVFP4P_PATH_MODULES=0` compiles both paths (A/B).
pub fn nvfp4p_path(s: &AttentionSpec, direct_on: bool, specialize: bool) -> Option<bool> {
    if !specialize || !matches!(s.recipe, crate::Recipe::Nvfp4P { .. }) {
        return None;
    }
    Some(direct_on && p_direct_allowed(s))
}

fn nvfp4p_path_modules() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TESSERA_NVFP4P_PATH_MODULES").map_or(true, |v| v != "0"))
}

/// K's and V's rows permuted within each 64-key tile by the tensor maps (KPERM,
/// kernels/attention_mma.cu `key_in_tile`) so that a thread's 16 scores of a row are 16
/// consecutive keys: N:M's 4- and 8-key groups and NVFP4 P's 16-key blocks are then one
/// thread's, and neither needs shuffles (N:M, static common path at D = 128: 2:4 exact 709 →
/// 640 instructions per tile, dense 533; Nvfp4P's P blocks: 797 → 722, the shuffles and six of
/// the eight scale lookups gone). Where: the wgmma shape with 16-bit P·V, N:M or an NVFP4 P
/// recipe, at least 64 keys (the producer copies a ragged last tile itself: a box would read
/// past the head), and K and V whose heads lie within token rows ([`perm_rows`]: HND and NHD,
/// dense or with padded rows; tessera's own INT8 codes and f16 copies always). A rank-5 map has
/// no dimension left for heads, so the kernel finds each head's first row and element itself.
/// `TESSERA_KPERM=0` turns it off (A/B).
pub fn kperm_fits(plan: &Plan, cfg: MmaConfig, recipe: u32, dp: u32, vnv: bool) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("TESSERA_KPERM").map_or(true, |v| v != "0"));
    let s = &plan.spec;
    let nvfp4_p = recipe == 3 || recipe == 4;
    if !on
        || !(s.nm_softmax.is_some() || nvfp4_p)
        || !cfg.wgmma
        || fp8_pv(recipe, vnv, cfg, dp)
        || s.seq_kv < 64
    {
        return false;
    }
    // The caller's K/V rows (tessera's own codes and copies are [b·hk][N][d], which fit).
    let kv = &plan.kv;
    let user_rows_fit = perm_rows(
        (kv.batch as u64, kv.head as u64, kv.token as u64),
        s.batch as u64,
        s.heads_kv as u64,
        s.seq_kv as u64,
        s.head_dim as u64,
    )
    .is_some();
    // K from INT8 codes (Int8Qk*) or f16 copies (Nvfp4); V from f16 copies (FP8 V, NVFP4 V).
    let own_k = matches!(recipe, 1..=3);
    let own_v = recipe == 2 || recipe == 3 || vnv;
    user_rows_fit || (own_k && own_v)
}

/// KPERM's tensor maps run over a tensor's token rows, `strides.2` elements apart: head (b, h)'s
/// token 0 is element off = b·strides.0 + h·strides.1, i.e. row ⌊off / strides.2⌋ of the map
/// at element off mod strides.2 (the kernel's `perm_coord`). That works when each head's `d`
/// elements lie within the token row there (HND: element 0 of the head's own rows; NHD:
/// element h·d of the shared rows). Returns the map's row count (the last head's first row
/// plus N), or None; also None past 2³¹ rows (the copy engine's coordinates are 32-bit signed).
/// (The kernel copies a ragged last tile itself, so N is free.)
pub(crate) fn perm_rows(strides: (u64, u64, u64), b: u64, h: u64, n: u64, d: u64) -> Option<u64> {
    let (sb, sh, st) = strides;
    if n == 0 || st < d {
        return None;
    }
    let mut last = 0;
    for bi in 0..b {
        for hi in 0..h {
            let off = bi * sb + hi * sh;
            if off % st + d > st {
                return None;
            }
            last = last.max(off / st);
        }
    }
    Some(last + n).filter(|&rows| rows <= i32::MAX as u64)
}

/// A device tensor of the spec's dtype: 16-bit elements as raw bits, or f32.
pub enum CudaTensor<'a> {
    Bits16(&'a CudaSlice<u16>),
    F32(&'a CudaSlice<f32>),
}

/// A writable device tensor (the output).
pub enum CudaTensorMut<'a> {
    Bits16(&'a mut CudaSlice<u16>),
    F32(&'a mut CudaSlice<f32>),
}

/// The attention kernel a plan runs on a GPU of `arch` (an [`arch_for`] name), tensor cores
/// on, with `mma` as the launch shape for every plan (None: per plan). The choice a
/// [`CudaAttention`] makes, without a device: `examples/kernel_sass.rs` compiles it for reading.
pub fn kernel_for_arch(arch: &str, plan: &Plan, mma: Option<MmaConfig>) -> Module {
    let mut cfg = mma.unwrap_or_else(|| MmaConfig::for_plan(arch, plan));
    if cfg.wgmma
        && (arch != "sm_90a" || !MmaConfig::wgmma_dim(padded_dim(plan.spec.head_dim) as u32))
    {
        // wgmma is sm_90a's, and runs the head dims whose rows TMA cuts into swizzle panels.
        cfg = cfg.without_wgmma();
    }
    match tensor_core_fit(plan, cfg) {
        Ok(m) => m,
        Err(why) => {
            log::debug!("cuda: CUDA-core kernel for {why}");
            Module::Simt {
                recipe: recipe_id(plan.spec.recipe),
                dp: padded_dim(plan.spec.head_dim) as u32,
            }
        }
    }
}

/// Kernels on one CUDA context, compiled once per configuration.
pub struct CudaAttention {
    ctx: Arc<CudaContext>,
    arch: &'static str,
    driver: i32,
    description: String,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    tensor_cores: std::sync::atomic::AtomicBool,
    /// A launch shape for every plan (TESSERA_MMA_CONFIG or `with_mma_config`); None: per plan.
    mma: Option<MmaConfig>,
    /// Where per-call scratch comes from (scratch.rs); None: the device's default pool
    /// (no stream-ordered allocator, the driver refused, or TESSERA_SCRATCH_POOL=0).
    pool: Option<scratch::ScratchPool>,
}

/// Quantization groups per 256-thread block of int8_qk (kernels/quant.cu): a group of `rows`
/// tokens gets the smallest power-of-two run of threads that holds its 16-byte chunks at
/// QK_CHUNKS = 8 per thread and at least one row's chunks, so that small groups (SageAttention
/// 2's per-warp and per-thread scales: 32 or 4 tokens) share a block instead of leaving most of
/// it idle. Head dims that are not whole chunks take the general path: one group per block.
fn int8_groups_per_block(rows: u32, head_dim: u32) -> u32 {
    if head_dim % 8 != 0 || head_dim / 8 > 32 || !(head_dim / 8).is_power_of_two() {
        return 1;
    }
    let cpr = head_dim / 8;
    let tpg = (rows * cpr)
        .div_ceil(8)
        .next_power_of_two()
        .max(cpr.next_power_of_two());
    (256 / tpg).max(1)
}

/// What a call needs from the quantizer passes: Q's LSE shift (only an LSE reads it), f16
/// copies of code values for the tensor-core kernel, and the codes of the operands that get a
/// copy (only `Backend::quantize` reads those: a pass that writes a copy skips them otherwise).
#[derive(Clone, Copy, Default)]
struct Wants {
    qdelta: bool,
    q16: bool,
    k16: bool,
    v16: bool,
    codes: bool,
}

/// f16 copies of the values of codes the tensor cores cannot read directly (FP8 V; the Nvfp4
/// recipe's Q, K, V; V → NVFP4), rows [b·h][n][dp], exact. A quantizer pass writes one on the
/// way where its input allows (16-byte rows); the rest come from conversion passes.
#[derive(Default)]
struct Copies {
    q: Option<CudaSlice<u16>>,
    k: Option<CudaSlice<u16>>,
    v: Option<CudaSlice<u16>>,
}

/// Nvfp4P's quotient by one multiply where FLAG_P_DIRECT allows (kernels/attention_mma.cu,
/// p_nvfp4): on by default (GPU-checked: the probe test
/// `nvfp4_p_direct_quotient_is_exact_for_every_16_bit_p` and the matrices; on the CPU,
/// `nvfp4_p_direct_quotient_gap_holds` and `nvfp4_p_direct_rounding_emulated_on_the_cpu`);
/// `TESSERA_NVFP4P_DIRECT=0` turns it off for A/B runs.
fn nvfp4p_direct() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TESSERA_NVFP4P_DIRECT").map_or(true, |v| v != "0"))
}

/// Int8QkFp8Pv multiplies P·V on the FP8 tensor cores (reading V transposed) on the
/// two-warpgroup wgmma shape at head dim 128 (kernels: PV_FP8).
fn fp8_pv(recipe: u32, vnv: bool, cfg: MmaConfig, dp: u32) -> bool {
    recipe == 2 && !vnv && cfg.wgmma && dp == 128 && cfg.warps == 8
}

/// (batch, heads_q, heads_kv, seq_q, seq_kv) as the kernels' u32.
fn sizes(s: &AttentionSpec) -> (u32, u32, u32, u32, u32) {
    let u = |x: usize| x as u32;
    (
        u(s.batch),
        u(s.heads_q),
        u(s.heads_kv),
        u(s.seq_q),
        u(s.seq_kv),
    )
}

fn threads(n: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(64).max(1), 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaAttention {
    /// Kernels for the caller's context.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))?;
        let arch = arch_for(major, minor)?;
        let mut driver = 0;
        // SAFETY: one out-pointer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        Ok(CudaAttention {
            ctx: ctx.clone(),
            arch,
            driver,
            description: format!("{name} ({arch})"),
            modules: Mutex::new(HashMap::new()),
            tensor_cores: std::sync::atomic::AtomicBool::new(
                std::env::var("TESSERA_CUDA_TENSOR_CORES").map_or(true, |v| v != "0"),
            ),
            mma: std::env::var("TESSERA_MMA_CONFIG")
                .ok()
                .and_then(|v| MmaConfig::parse(&v)),
            pool: if std::env::var("TESSERA_SCRATCH_POOL").is_ok_and(|v| v == "0") {
                None
            } else {
                scratch::ScratchPool::new(ctx)
                    .map_err(|why| log::info!("cuda: scratch from the default pool: {why}"))
                    .ok()
            },
        })
    }

    /// `len` elements of scratch on `stream`, stream ordered, from tessera's pool (scratch.rs).
    ///
    /// # Safety
    /// The memory is unset: the caller writes every element before any read.
    unsafe fn scratch<T: cudarc::driver::DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        // Under CUDA-graph capture the allocation becomes a graph memory node, whose memory
        // the graph owns whatever the pool: the default pool there, as before.
        let mut capture = cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: a live stream and an out-pointer to a local.
        unsafe { cudarc::driver::sys::cuStreamIsCapturing(stream.cu_stream(), &mut capture) }
            .result()
            .map_err(cuda_err("stream capture status"))?;
        let capturing =
            capture != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        match &self.pool {
            // SAFETY: forwarded to the caller.
            Some(pool) if !capturing => unsafe { pool.alloc(stream, len) }.map_err(Error::Cuda),
            _ => unsafe { stream.alloc(len) }.map_err(cuda_err("alloc")),
        }
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Bytes of device memory tessera's scratch pool keeps mapped between calls (the largest
    /// call's workspace and copies so far); None when calls draw from the default pool
    /// (scratch.rs: no stream-ordered allocator, or TESSERA_SCRATCH_POOL=0).
    pub fn scratch_reserved_bytes(&self) -> Result<Option<u64>> {
        self.pool
            .as_ref()
            .map(|p| p.reserved_bytes().map_err(Error::Cuda))
            .transpose()
    }

    /// Give the scratch pool's unused memory back to the device (e.g. after a call much larger
    /// than the ones that follow); the next call maps what it needs again.
    pub fn trim_scratch(&self) -> Result<()> {
        match &self.pool {
            Some(p) => p.trim().map_err(Error::Cuda),
            None => Ok(()),
        }
    }

    /// Use the tensor-core kernel where it fits (the default; TESSERA_CUDA_TENSOR_CORES=0 turns
    /// it off). Off, every call runs the CUDA-core kernel: useful to compare the two.
    pub fn set_tensor_cores(&self, on: bool) {
        self.tensor_cores
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Another launch shape for the tensor-core kernel (the default comes from the arch, or
    /// TESSERA_MMA_CONFIG).
    pub fn with_mma_config(mut self, cfg: MmaConfig) -> Self {
        self.mma = Some(cfg);
        self
    }

    /// The attention kernel a plan runs on this context.
    pub fn kernel_for(&self, plan: &Plan) -> Module {
        if !self.tensor_cores.load(std::sync::atomic::Ordering::Relaxed) {
            return Module::Simt {
                recipe: recipe_id(plan.spec.recipe),
                dp: padded_dim(plan.spec.head_dim) as u32,
            };
        }
        kernel_for_arch(self.arch, plan, self.mma)
    }

    fn function(&self, module: Module, name: &str) -> Result<CudaFunction> {
        let attn = module;
        let module = {
            let mut m = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&attn) {
                Some(x) => x.clone(),
                None => {
                    let label = attn.label();
                    let cubin = nvrtc::compile_cached(
                        &label,
                        &module_source(attn),
                        self.arch,
                        self.driver,
                    )?;
                    let module = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                        .map_err(cuda_err("load module"))?;
                    m.insert(attn, module.clone());
                    module
                }
            }
        };
        module
            .load_function(name)
            .map_err(cuda_err("load function"))
    }

    /// The tensor-core kernel's NVFP4 P quantizer on the GPU, for tests, which hold it to the
    /// CPU bit for bit: per i, E2M1(a / s)·s (a ≥ 0, s an E4M3 value), the block scale code
    /// of a block whose max is a, and E2M1(a·inv_g / s)·s by the kernel's direct path (a: a
    /// 16-bit p, inv_g = 2688·2^-k; through the bf16 P·V operand when `bf16`, else f16). Waits
    /// for its results.
    #[doc(hidden)]
    pub fn probe_p_nvfp4(
        &self,
        a: &[f32],
        s: &[f32],
        inv_g: f32,
        bf16: bool,
    ) -> Result<(Vec<f32>, Vec<u32>, Vec<f32>)> {
        let module = Module::Mma {
            recipe: 4,
            dp: 128,
            bf16,
            cfg: MmaConfig::for_arch(self.arch),
            skip: false,
            nm: (0, 0),
            vnv: false,
            kperm: false,
            p_direct: None,
        };
        let f = self.function(module, "probe_p_nvfp4")?;
        // Its own stream: nothing of tessera's goes to the legacy default stream.
        let stream = self.ctx.new_stream().map_err(cuda_err("new stream"))?;
        let n = a.len().min(s.len());
        let (da, ds) = (
            stream.clone_htod(&a[..n]).map_err(cuda_err("htod"))?,
            stream.clone_htod(&s[..n]).map_err(cuda_err("htod"))?,
        );
        let mut out = stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(cuda_err("alloc"))?;
        let mut codes = stream
            .alloc_zeros::<u32>(n.max(1))
            .map_err(cuda_err("alloc"))?;
        let mut direct = stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(cuda_err("alloc"))?;
        let n32 = n as u32;
        let mut l = stream.launch_builder(&f);
        l.arg(&da).arg(&ds).arg(&mut out).arg(&mut codes);
        l.arg(&mut direct).arg(&inv_g).arg(&n32);
        // SAFETY: (const float*, const float*, float*, u32*, float*, float, u32 n), n elements each.
        unsafe { l.launch(threads(n32)) }.map_err(cuda_err("probe"))?;
        let mut v = stream.clone_dtoh(&out).map_err(cuda_err("dtoh"))?;
        let mut c = stream.clone_dtoh(&codes).map_err(cuda_err("dtoh"))?;
        let mut d = stream.clone_dtoh(&direct).map_err(cuda_err("dtoh"))?;
        v.truncate(n);
        c.truncate(n);
        d.truncate(n);
        Ok((v, c, d))
    }

    /// A test probe of the wgmma build (kernels/attention_mma.cu, sm_90a only) of `recipe` at
    /// head dim `dp`, and a fresh stream to run it on; BackendUnavailable on other GPUs.
    fn hopper_probe(
        &self,
        recipe: u32,
        dp: u32,
        entry: &str,
    ) -> Result<(CudaFunction, Arc<CudaStream>)> {
        if self.arch != "sm_90a" {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                why: format!(
                    "{entry} uses sm_90a's wgmma and tensor copies; this GPU is {}",
                    self.arch
                ),
            });
        }
        let module = Module::Mma {
            recipe,
            dp,
            bf16: false,
            cfg: MmaConfig::hopper_wgmma(),
            skip: false,
            nm: (0, 0),
            vnv: false,
            kperm: false,
            p_direct: None,
        };
        let f = self.function(module, entry)?;
        let stream = self.ctx.new_stream().map_err(cuda_err("new stream"))?;
        Ok((f, stream))
    }

    /// The 2:4 sparse P·V groundwork on the GPU (sm_90a only), for tests: O = P·V for one
    /// 64 × 64 P (f16 bits, row-major, at most two nonzeros in every 4 consecutive keys of a
    /// row) and 64 × 128 V (f16 bits, row-major) through the sparse warpgroup MMA with P
    /// compressed from the softmax's register layout (kernels/attention_mma.cu, `sparse_p`).
    /// Returns O as 64 × 128 f32. Waits for its result.
    #[doc(hidden)]
    pub fn probe_sparse_pv(&self, p: &[u16], v: &[u16]) -> Result<Vec<f32>> {
        if p.len() != 64 * 64 || v.len() != 64 * 128 {
            return Err(Error::BadBuffer {
                buffer: "p/v",
                problem: format!(
                    "need 4096 and 8192 elements, got {} and {}",
                    p.len(),
                    v.len()
                ),
            });
        }
        let (f, stream) = self.hopper_probe(4, 128, "probe_sparse_pv")?;
        let (dp, dv) = (
            stream.clone_htod(p).map_err(cuda_err("htod"))?,
            stream.clone_htod(v).map_err(cuda_err("htod"))?,
        );
        let mut out = stream
            .alloc_zeros::<f32>(64 * 128)
            .map_err(cuda_err("alloc"))?;
        let mut l = stream.launch_builder(&f);
        l.arg(&dp).arg(&dv).arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (const unsigned short*, const unsigned short*, float*) of 4096, 8192, 8192.
        unsafe { l.launch(cfg) }.map_err(cuda_err("probe"))?;
        stream.clone_dtoh(&out).map_err(cuda_err("dtoh"))
    }

    /// The probe `probe_tma_rows`: 16-bit `rows` of 64 elements each (row-major) through
    /// `TmaMap::permuted_rows`, the box of 64 rows from row `row0` as the copy engine leaves
    /// it in shared memory (128-byte swizzled, raw). Checks KPERM's key permutation by TMA
    /// (docs/design.md). Waits for its result.
    #[doc(hidden)]
    pub fn probe_tma_permuted_rows(&self, rows: &[u16], row0: u32) -> Result<Vec<u16>> {
        let n = rows.len() / 64;
        if rows.len() % 64 != 0 || row0 as usize + 64 > n {
            return Err(Error::BadBuffer {
                buffer: "rows",
                problem: format!(
                    "need rows of 64 elements, 64 of them from row {row0}; got {} elements",
                    rows.len()
                ),
            });
        }
        let (f, stream) = self.hopper_probe(0, 64, "probe_tma_rows")?;
        let src = stream.clone_htod(rows).map_err(cuda_err("htod"))?;
        let map = {
            use cudarc::driver::DevicePtr;
            let (ptr, _sync) = src.device_ptr(&stream);
            TmaMap::permuted_rows(ptr, 2, 64, 64, 128, n as u64).map_err(Error::Cuda)?
        };
        let mut out = stream
            .alloc_zeros::<u16>(64 * 64)
            .map_err(cuda_err("alloc"))?;
        let mut l = stream.launch_builder(&f);
        l.arg(&map).arg(&mut out).arg(&row0);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (TmaMap, unsigned short*, u32): the map covers `src`, live until the wait
        // below; out holds 4096 elements.
        unsafe { l.launch(cfg) }.map_err(cuda_err("probe"))?;
        let got = stream.clone_dtoh(&out).map_err(cuda_err("dtoh"))?;
        drop(src);
        Ok(got)
    }

    /// How many modules have been compiled or loaded (each configuration once).
    pub fn compiled_modules(&self) -> usize {
        self.modules.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Enqueue the attention on `stream`: quantization, attention, output pack. Returns without
    /// waiting; workspace comes from the stream-ordered allocator.
    #[allow(clippy::too_many_arguments)] // stream, spec, q, k, v, o, lse: FlashAttention's call
    pub fn run(
        &self,
        stream: &Arc<CudaStream>,
        spec: &AttentionSpec,
        q: CudaTensor,
        k: CudaTensor,
        v: CudaTensor,
        o: CudaTensorMut,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let plan = spec.plan()?;
        let s = &plan.spec;
        let check = |name: &'static str, len: usize, is_f32: bool, need: usize| -> Result<()> {
            if is_f32 != (s.dtype == DType::F32) {
                return Err(Error::BadBuffer {
                    buffer: name,
                    problem: format!(
                        "holds {} elements but the spec's dtype is {:?}",
                        if is_f32 { "f32" } else { "16-bit" },
                        s.dtype
                    ),
                });
            }
            if len < need {
                return Err(Error::BadBuffer {
                    buffer: name,
                    problem: format!("holds {len} elements but the spec needs {need}"),
                });
            }
            Ok(())
        };
        let info = |t: &CudaTensor| match t {
            CudaTensor::Bits16(x) => (x.len(), false),
            CudaTensor::F32(x) => (x.len(), true),
        };
        for (name, t, need) in [
            ("q", &q, plan.q_len),
            ("k", &k, plan.kv_len),
            ("v", &v, plan.kv_len),
        ] {
            let (len, f) = info(t);
            check(name, len, f, need)?;
        }
        let (olen, of) = match &o {
            CudaTensorMut::Bits16(x) => (x.len(), false),
            CudaTensorMut::F32(x) => (x.len(), true),
        };
        check("o", olen, of, plan.q_len)?;
        match (&lse, s.return_lse) {
            (None, true) => return Err(Error::BadBuffer { buffer: "lse", problem: "the spec asks for the LSE but no lse slice was given: pass batch*heads_q*seq_q f32".into() }),
            (Some(l), true) if l.len() < plan.lse_len() => return Err(Error::BadBuffer { buffer: "lse", problem: format!("holds {} elements but needs {}", l.len(), plan.lse_len()) }),
            _ => {}
        }
        self.enqueue(stream, &plan, q, k, v, o, lse).map(|_| ())
    }

    /// The quantization kernels; returns the workspace, its layout, and the f16 copies of code
    /// values that `wants` asks for and the passes could write on the way (see `Copies`).
    fn quantize(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        [q, k, v]: [&CudaTensor; 3],
        wants: Wants,
    ) -> Result<(CudaSlice<u32>, Workspace, Copies)> {
        let layout = Workspace::new(plan);
        let mut copies = Copies::default();
        // SAFETY: every word the kernels read is written by an earlier kernel in this stream.
        let mut ws = unsafe { self.scratch::<u32>(stream, layout.words as usize) }?;
        let base = params(plan, &layout);
        let steps = quant_steps(plan);
        if steps.iter().any(|st| st.entry == "fp8_v_scale") {
            // fp8_v_amax maxes into the (zeroed) vinv words; see the loop below.
            let s = &plan.spec;
            let chans = s.batch * s.heads_kv * padded_dim(s.head_dim);
            stream
                .memset_zeros(&mut ws.slice_mut(layout.vinv as usize..layout.vinv as usize + chans))
                .map_err(cuda_err("memset"))?;
        }
        // (`count`: int8_qk's groups per block, 0 elsewhere; `out`: the f16 copy a pass also
        // writes, as a device address, 0 for none, for the kernels that take one.)
        let mut launch = |name: &str,
                          mode: u32,
                          src: &CudaTensor,
                          cfg: LaunchConfig,
                          count: u32,
                          out: Option<u64>|
         -> Result<()> {
            let f = self.function(Module::Quant, name)?;
            // int8_qk's Q pass writes Q's LSE shift (q·mean(K)) when K is smoothed: with no
            // LSE asked for, nothing reads it, so the pass skips it (an FMA per value and a
            // shuffle tree per row chunk).
            let skip_shift = name == "int8_qk" && mode == MODE_Q && !wants.qdelta;
            let p = Params {
                mode,
                count,
                flags: if skip_shift {
                    base.flags & !FLAG_SMOOTH
                } else {
                    base.flags
                },
                ..base
            };
            let mut l = stream.launch_builder(&f);
            l.arg(&p);
            match src {
                CudaTensor::Bits16(x) => l.arg(*x),
                CudaTensor::F32(x) => l.arg(*x),
            };
            l.arg(&mut ws);
            if let Some(o) = &out {
                l.arg(o);
            }
            // SAFETY: the argument list matches the kernel's signature (Params, const void*, u32*
            // [, unsigned short*]); `out` is a live allocation of the copy's size or 0.
            unsafe { l.launch(cfg) }.map_err(cuda_err(name)).map(|_| ())
        };
        // 16-bit operands in whole 16-byte chunks (8 channels): the FP8 V passes and the
        // NVFP4 passes with copies load 16 bytes at a time.
        let chunked = |t: &CudaTensor, st: &crate::spec::Strides| {
            use cudarc::driver::DevicePtr;
            let ptr = match t {
                CudaTensor::Bits16(x) => x.device_ptr(stream).0,
                CudaTensor::F32(_) => 1,
            };
            plan.spec.head_dim % 8 == 0
                && [st.batch, st.head, st.token].iter().all(|x| x % 8 == 0)
                && ptr % 16 == 0
        };
        // (Asked only by the passes that need it, once: each asks cudarc for a device address.)
        let v_once = std::cell::OnceCell::new();
        let (q_chunks, k_chunks, v_chunks) = (
            || chunked(q, &plan.q),
            || chunked(k, &plan.kv),
            || *v_once.get_or_init(|| chunked(v, &plan.kv)),
        );
        let s = &plan.spec;
        let (b, hq, hk, nq, nk) = sizes(s);
        let dp = padded_dim(s.head_dim) as u32;
        // (`count` of the passes that write a copy: 1 = COPY_ONLY, their codes unstored.)
        let copy_only = u32::from(!wants.codes);
        let copy = |n: u32| -> Result<(CudaSlice<u16>, u64)> {
            use cudarc::driver::DevicePtrMut;
            // SAFETY: the pass that takes it writes all n elements before any read.
            let mut c = unsafe { self.scratch::<u16>(stream, n as usize) }?;
            let at = c.device_ptr_mut(stream).0;
            Ok((c, at))
        };
        for step in steps {
            let src = match step.src {
                Source::Q => q,
                Source::K => k,
                Source::V => v,
            };
            if step.entry == "nvfp4_qk" {
                let (want, ok, rows) = if step.mode == 0 {
                    (wants.q16, q_chunks(), b * hq * nq)
                } else {
                    (wants.k16, k_chunks(), b * hk * nk)
                };
                if want && ok {
                    let (c, at) = copy(rows * dp)?;
                    launch(
                        "nvfp4_qk_f16",
                        step.mode,
                        src,
                        threads(rows * dp / 16),
                        copy_only,
                        Some(at),
                    )?;
                    *if step.mode == 0 {
                        &mut copies.q
                    } else {
                        &mut copies.k
                    } = Some(c);
                    continue;
                }
            }
            if step.entry == "nvfp4_v" && wants.v16 && v_chunks() {
                let np = padded_dim(s.seq_kv) as u32;
                let (c, at) = copy(b * hk * nk * dp)?;
                launch(
                    "nvfp4_v_f16",
                    step.mode,
                    src,
                    threads(b * hk * (np / 16) * (dp / 2)),
                    copy_only,
                    Some(at),
                )?;
                copies.v = Some(c);
                continue;
            }
            if step.entry == "fp8_v_scale" {
                // One thread per channel walking every token is latency-bound (~7 ms at
                // N = 16384): amax per 64-token block in parallel instead, then the scales.
                let s = &plan.spec;
                let chans = (s.batch * s.heads_kv) as u32 * padded_dim(s.head_dim) as u32;
                let rows = (s.batch * s.heads_kv * s.seq_kv.div_ceil(64)) as u32;
                if v_chunks() && s.head_dim <= 256 {
                    // kernels/quant.cu: 256 threads, 8 tokens each, per block of one head.
                    let per_block = (256 / (s.head_dim as u32 / 8)) * 8;
                    let cfg = LaunchConfig {
                        grid_dim: (
                            (s.batch * s.heads_kv) as u32 * (s.seq_kv as u32).div_ceil(per_block),
                            1,
                            1,
                        ),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    launch("fp8_v_amax_chunks", step.mode, src, cfg, 0, None)?;
                } else {
                    launch(
                        "fp8_v_amax",
                        step.mode,
                        src,
                        threads(rows * s.head_dim as u32),
                        0,
                        None,
                    )?;
                }
                launch(
                    "fp8_v_scale_from_amax",
                    step.mode,
                    src,
                    threads(chans),
                    0,
                    None,
                )?;
                continue;
            }
            if step.entry == "fp8_v_codes" && v_chunks() {
                let s = &plan.spec;
                let n = (s.batch * s.heads_kv * s.seq_kv.div_ceil(4) * padded_dim(s.head_dim) / 8)
                    as u32;
                let out = if wants.v16 {
                    let (c, at) = copy(b * hk * nk * dp)?;
                    copies.v = Some(c);
                    at
                } else {
                    0
                };
                launch(
                    "fp8_v_codes_chunks",
                    step.mode,
                    src,
                    threads(n),
                    copy_only,
                    Some(out),
                )?;
                continue;
            }
            if step.entry == "q_delta" && (plan.spec.recipe.int8_qk() || !wants.qdelta) {
                // int8_qk's Q pass writes Q's LSE shift here (it holds Q in registers anyway);
                // without an LSE output nothing reads it.
                continue;
            }
            if step.entry == "q_delta" {
                // One warp per query row (coalesced), 8 rows per block.
                let s = &plan.spec;
                let rows = (s.batch * s.heads_q * s.seq_q) as u32;
                let cfg = LaunchConfig {
                    grid_dim: (rows.div_ceil(8), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch("q_delta", step.mode, src, cfg, 0, None)?;
                continue;
            }
            if step.entry == "int8_qk" {
                // 256 threads, several small groups per block.
                let s = &plan.spec;
                let g = if step.mode == 0 {
                    s.recipe.q_groups()
                } else {
                    s.recipe.k_groups()
                };
                let rows = g.map_or(1, |g| g.block / g.interleave) as u32;
                let gpb = int8_groups_per_block(rows, s.head_dim as u32);
                let cfg = LaunchConfig {
                    grid_dim: (step.workgroups().div_ceil(gpb), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch(step.entry, step.mode, src, cfg, gpb, None)?;
                continue;
            }
            let cfg = LaunchConfig {
                grid_dim: (step.workgroups(), 1, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            };
            launch(step.entry, step.mode, src, cfg, 0, None)?;
        }
        Ok((ws, layout, copies))
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        q: CudaTensor,
        k: CudaTensor,
        v: CudaTensor,
        o: CudaTensorMut,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<Option<CudaSlice<u32>>> {
        let s = &plan.spec;
        if s.batch * s.heads_q > 65535 {
            return Err(Error::TooLarge(format!(
                "batch * heads_q = {} exceeds 65535 blocks: split the batch into several calls",
                s.batch * s.heads_q
            )));
        }
        let kernel = self.kernel_for(plan);
        let wants = match kernel {
            Module::Mma {
                recipe,
                dp,
                cfg,
                vnv,
                ..
            } => Wants {
                qdelta: s.return_lse,
                q16: recipe == 3,
                k16: recipe == 3,
                v16: recipe == 3 || vnv || (recipe == 2 && !fp8_pv(recipe, vnv, cfg, dp)),
                // (an operand without a copy keeps its codes: a conversion pass reads them)
                codes: false,
            },
            _ => Wants {
                qdelta: s.return_lse,
                ..Wants::default()
            },
        };
        let (ws, layout, mut copies) = self.quantize(stream, plan, [&q, &k, &v], wants)?;
        let p = params(plan, &layout);
        let dp = padded_dim(s.head_dim) as u32;
        // A block mask is uploaded per call (a host copy: not capturable in a CUDA graph). With no
        // mask nothing is copied: the kernels never read the mask then, so the workspace stands in.
        let uploaded = match &s.sparsity {
            crate::Sparsity::BlockMask(m) => {
                let words: Vec<u32> = m.data().iter().map(|&x| x as u32).collect();
                Some(stream.clone_htod(&words).map_err(cuda_err("upload mask"))?)
            }
            _ => None,
        };
        let mask: &CudaSlice<u32> = uploaded.as_ref().unwrap_or(&ws);
        let mut lse_dummy = None;
        let lse: &mut CudaSlice<f32> = match lse {
            Some(l) => l,
            None => lse_dummy.insert(unsafe { self.scratch::<f32>(stream, 1) }?),
        };
        let o = match (kernel, o) {
            (Module::Mma { .. }, CudaTensorMut::Bits16(out)) => {
                self.enqueue_mma(
                    stream,
                    plan,
                    kernel,
                    [&q, &k, &v],
                    &mut copies,
                    &ws,
                    &layout,
                    mask,
                    out,
                    lse,
                )?;
                return tile_counters(stream, plan, &ws, &layout);
            }
            (_, o) => o,
        };
        let f = self.function(
            Module::Simt {
                recipe: recipe_id(s.recipe),
                dp,
            },
            "attention",
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                (s.seq_q as u32).div_ceil(BQ),
                (s.batch * s.heads_q) as u32,
                1,
            ),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut o32_scratch = None;
        {
            let mut l = stream.launch_builder(&f);
            l.arg(&p);
            for t in [&q, &k, &v] {
                match t {
                    CudaTensor::Bits16(x) => l.arg(*x),
                    CudaTensor::F32(x) => l.arg(*x),
                };
            }
            l.arg(&ws).arg(mask);
            match &o {
                CudaTensorMut::F32(x) => {
                    l.arg(&**x);
                }
                CudaTensorMut::Bits16(_) => {
                    // SAFETY: the attention kernel writes every element of the scratch.
                    let scratch =
                        o32_scratch.insert(unsafe { self.scratch::<f32>(stream, plan.q_len) }?);
                    l.arg(&*scratch);
                }
            }
            l.arg(&mut *lse);
            // SAFETY: the arguments match attention()'s signature.
            unsafe { l.launch(cfg) }.map_err(cuda_err("attention"))?;
        }
        if let (CudaTensorMut::Bits16(out), Some(scratch)) = (o, &o32_scratch) {
            let f = self.function(Module::Quant, "pack_out")?;
            let pp = Params {
                count: plan.q_len as u32,
                ..p
            };
            let mut l = stream.launch_builder(&f);
            l.arg(&pp).arg(scratch).arg(out);
            // SAFETY: (Params, const float*, unsigned short*).
            unsafe { l.launch(threads(plan.q_len as u32)) }.map_err(cuda_err("pack_out"))?;
        }
        tile_counters(stream, plan, &ws, &layout)
    }

    /// The tensor-core kernel: writes the 16-bit output directly (no f32 scratch, no pack).
    #[allow(clippy::too_many_arguments)]
    fn enqueue_mma(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        kernel: Module,
        qkv: [&CudaTensor; 3],
        copies: &mut Copies,
        ws: &CudaSlice<u32>,
        layout: &Workspace,
        mask: &CudaSlice<u32>,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let Module::Mma {
            recipe,
            dp,
            cfg,
            vnv,
            ..
        } = kernel
        else {
            return Err(Error::Cuda(
                "enqueue_mma called with a non-tensor-core module".into(),
            ));
        };
        let s = &plan.spec;
        let mut p = params(plan, layout);
        if !nvfp4p_direct() {
            p.flags &= !FLAG_P_DIRECT;
        }
        let (b, hq, hk, nq, nk) = sizes(s);
        // Operands whose codes the tensor cores cannot take directly (FP8 V; the Nvfp4 recipe's
        // Q, K, V) go through f16 copies of their values, rows [b·h][n][dp]: exact.
        let scratch = |n: u32| {
            // SAFETY: the conversion kernel below writes all n elements before any read.
            unsafe { self.scratch::<u16>(stream, n as usize) }
        };
        let convert =
            |name: &str, out: &mut CudaSlice<u16>, cfg: LaunchConfig, extra: Option<[u32; 3]>| {
                let f = self.function(kernel, name)?;
                let mut l = stream.launch_builder(&f);
                l.arg(&p).arg(ws).arg(out);
                if let Some(e) = &extra {
                    l.arg(&e[0]).arg(&e[1]).arg(&e[2]);
                }
                // SAFETY: (Params, const u32*, unsigned short*[, u32 codes, u32 scales, u32 rows]).
                unsafe { l.launch(cfg) }.map_err(cuda_err("convert"))
            };
        // nvfp4_v_to_f16: 64 tokens × 32 channels per block (the head dims here are multiples of 32).
        let v_nvfp4_grid = LaunchConfig {
            grid_dim: ((nk.div_ceil(64)).max(1), dp / 32, b * hk),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let q_rows = (hq * nq * dp, nq * dp, dp);
        let kv_rows = (hk * nk * dp, nk * dp, dp);
        // Int8QkFp8Pv's FP8 P·V reads V transposed (kernels/attention_mma.cu, PV_FP8):
        // [b·hk][dp][np64] codes, np64 = nk rounded up to 64 (held in a u16 buffer: np64 is even).
        let pv_fp8 = fp8_pv(recipe, vnv, cfg, dp);
        let np64 = nk.div_ceil(64).max(1) * 64;
        let mut vt = None;
        if pv_fp8 {
            let mut v = scratch(b * hk * dp * np64 / 2)?;
            let grid = LaunchConfig {
                grid_dim: (np64 / 64, dp / 64, b * hk),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            convert("v_fp8_transpose", &mut v, grid, None)?;
            vt = Some(v);
        } else if recipe == 2 && !vnv && copies.v.is_none() {
            let mut v = scratch(b * hk * nk * dp)?;
            convert("v_fp8_to_f16", &mut v, threads(b * hk * nk * dp / 8), None)?;
            copies.v = Some(v);
        }
        // (8 values per thread)
        if recipe == 3 && copies.q.is_none() {
            let mut q = scratch(b * hq * nq * dp)?;
            let qa = [layout.qcodes, layout.qscales, b * hq * nq];
            convert(
                "nvfp4_qk_to_f16",
                &mut q,
                threads(b * hq * nq * dp / 8),
                Some(qa),
            )?;
            copies.q = Some(q);
        }
        if recipe == 3 && copies.k.is_none() {
            let mut k = scratch(b * hk * nk * dp)?;
            let ka = [layout.kcodes, layout.kscales, b * hk * nk];
            convert(
                "nvfp4_qk_to_f16",
                &mut k,
                threads(b * hk * nk * dp / 8),
                Some(ka),
            )?;
            copies.k = Some(k);
        }
        if (recipe == 3 || vnv) && copies.v.is_none() {
            let mut v = scratch(b * hk * nk * dp)?;
            convert("nvfp4_v_to_f16", &mut v, v_nvfp4_grid, None)?;
            copies.v = Some(v);
        }
        let (q16, k16) = (&copies.q, &copies.k);
        let v16 = if pv_fp8 { &vt } else { &copies.v };
        let user_q = (plan.q.batch as u32, plan.q.head as u32, plan.q.token as u32);
        let user_kv = (
            plan.kv.batch as u32,
            plan.kv.head as u32,
            plan.kv.token as u32,
        );
        let pick =
            |scr: &Option<CudaSlice<u16>>, rows, user| if scr.is_some() { rows } else { user };
        let (qs, ks, vs) = (
            pick(q16, q_rows, user_q),
            pick(k16, kv_rows, user_kv),
            pick(v16, kv_rows, user_kv),
        );
        let strides = Strides16 {
            q: [qs.0, qs.1, qs.2],
            k: [ks.0, ks.1, ks.2],
            v: [vs.0, vs.1, vs.2],
        };
        // The wgmma shape at head dims 128 and 64 loads K and V by TMA, through tensor maps over the
        // operands it would otherwise copy itself; a map the driver refuses (an unaligned view)
        // sends the call to the mma.sync shape.
        let (mut kmap, mut vmap) = (TmaMap::unused(), TmaMap::unused());
        if cfg.wgmma {
            use cudarc::driver::DevicePtr;
            let ptr16 = |scr: &Option<CudaSlice<u16>>, t: &CudaTensor| -> u64 {
                match (scr, t) {
                    (Some(x), _) => x.device_ptr(stream).0,
                    (None, CudaTensor::Bits16(x)) => x.device_ptr(stream).0,
                    (None, CudaTensor::F32(x)) => x.device_ptr(stream).0,
                }
            };
            let rows16 = |ptr: u64, st: (u32, u32, u32), heads: u32, n: u32| {
                // Byte strides of tokens, heads, batch (a unit dim's stride is never used).
                let nz = |x: u32, unit: bool| {
                    if unit {
                        (2 * x as u64).max(16)
                    } else {
                        2 * x as u64
                    }
                };
                TmaMap::rows(
                    ptr,
                    2,
                    [s.head_dim as u64, n as u64, heads as u64, b as u64],
                    [nz(st.2, n == 1), nz(st.1, heads == 1), nz(st.0, b == 1)],
                    64,
                )
            };
            let kperm = matches!(kernel, Module::Mma { kperm: true, .. });
            // KPERM: 5-d maps over a tensor's token rows, permuted within 64-row tiles; the
            // kernel finds each head's first row and element (`perm_rows`, kperm_fits).
            let permuted = |ptr: u64, elem: u32, st: (u32, u32, u32)| {
                let st64 = (st.0 as u64, st.1 as u64, st.2 as u64);
                let rows = perm_rows(st64, b as u64, hk as u64, nk as u64, s.head_dim as u64)
                    .ok_or_else(|| {
                        format!("K/V strides {st:?}: a head's rows cross token rows (KPERM)")
                    })?;
                // Boxes as the 4-d maps: 64 16-bit elements, or INT8 rows up to 128 bytes.
                let box_inner = if elem == 1 { dp.min(128) } else { 64 };
                TmaMap::permuted_rows(ptr, elem, st64.2, box_inner, st64.2 * elem as u64, rows)
            };
            let maps = (|| -> std::result::Result<(TmaMap, TmaMap), String> {
                if kperm {
                    let k = if recipe == 1 || recipe == 2 {
                        // INT8 codes: [b·hk][nk][dp] bytes (the kernel's INT8 case of perm_coord).
                        let base = ws.device_ptr(stream).0 + 4 * layout.kcodes as u64;
                        permuted(base, 1, (hk * nk * dp, nk * dp, dp))?
                    } else {
                        permuted(ptr16(k16, qkv[1]), 2, ks)?
                    };
                    let v = permuted(ptr16(v16, qkv[2]), 2, vs)?;
                    return Ok((k, v));
                }
                let k = if recipe == 1 || recipe == 2 {
                    let (d, n, h) = (dp as u64, nk as u64, hk as u64);
                    let base = ws.device_ptr(stream).0 + 4 * layout.kcodes as u64;
                    // INT8 codes: rows of dp bytes, one panel each at 64 (64-byte swizzle).
                    TmaMap::rows(
                        base,
                        1,
                        [d, n, h, b as u64],
                        [d, n * d, h * n * d],
                        dp.min(128),
                    )?
                } else {
                    rows16(ptr16(k16, qkv[1]), ks, hk, nk)?
                };
                let v = if pv_fp8 {
                    // Vᵀ: rows of np64 key bytes, one per channel; boxes of 64 keys (64-byte swizzle).
                    let (d, n, h) = (dp as u64, np64 as u64, hk as u64);
                    TmaMap::rows(
                        ptr16(v16, qkv[2]),
                        1,
                        [n, d, h, b as u64],
                        [n, d * n, h * d * n],
                        64,
                    )?
                } else {
                    rows16(ptr16(v16, qkv[2]), vs, hk, nk)?
                };
                Ok((k, v))
            })();
            match maps {
                Ok((k, v)) => (kmap, vmap) = (k, v),
                Err(why) => {
                    log::debug!("cuda: {why}: the mma.sync shape runs instead of wgmma");
                    let Module::Mma { bf16, skip, nm, .. } = kernel else {
                        unreachable!("matched above")
                    };
                    let fallback = Module::Mma {
                        recipe,
                        dp,
                        bf16,
                        cfg: cfg.without_wgmma(),
                        skip,
                        nm,
                        vnv,
                        kperm: false,
                        p_direct: None,
                    };
                    return self.enqueue_mma(
                        stream, plan, fallback, qkv, copies, ws, layout, mask, out, lse,
                    );
                }
            }
        }
        let f = self.function(kernel, "attention_mma")?;
        let smem = cfg.shared_bytes(recipe, dp);
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(cuda_err("shared memory attribute"))?;
        if pv_fp8 {
            // The kernel moves registers from its producer warpgroup to its consumers
            // (setmaxnreg): that only balances when it launches with the most registers its
            // bounds allow (kernels/attention_mma.cu, PV_FP8_CONSUMER_REGS); with fewer the
            // consumers would wait forever. ptxas gives such kernels exactly that.
            let want = (65536 / (cfg.min_blocks * cfg.threads(true))) / 8 * 8;
            let regs = f.num_regs().map_err(cuda_err("register count"))?;
            if regs as u32 != want {
                return Err(Error::Cuda(format!(
                    "{}: launches with {regs} registers per thread, not the {want} its register hand-over needs",
                    kernel.label()
                )));
            }
        }
        // Causal: the grid is (b·h, query blocks), walked from the last query block, so the
        // heaviest blocks (most visible keys) of every head start first and the grid ends on
        // light ones: a shorter tail (longest-processing-time first). Otherwise (query blocks,
        // b·h): a head's blocks run together and share its K/V in L2.
        let (q_blocks, heads) = (
            (s.seq_q as u32).div_ceil(16 * cfg.warps * cfg.m_tiles),
            (s.batch * s.heads_q) as u32,
        );
        // (FP8 P·V opts out: the remap slowed that kernel by 6% everywhere, attention_mma.cu.
        // Int8QkFp8Pv's default three-warpgroup shape, P·V in f16, takes it since the tenth
        // session: its causal N = 4096 call was 1.6× int8qk-f16pv's, which has it.)
        let heavy_first = s.causal && q_blocks <= 65535 && !pv_fp8;
        if heavy_first {
            p.flags |= FLAG_HEAVY_FIRST;
        }
        let cfg = LaunchConfig {
            grid_dim: if heavy_first {
                (heads, q_blocks, 1)
            } else {
                (q_blocks, heads, 1)
            },
            block_dim: (cfg.threads(pv_fp8), 1, 1),
            shared_mem_bytes: smem,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&p);
        for (t, scr) in qkv.iter().zip([q16, k16, v16]) {
            match (scr, t) {
                (Some(x), _) => l.arg(x),
                (None, CudaTensor::Bits16(x)) => l.arg(*x),
                (None, CudaTensor::F32(x)) => l.arg(*x),
            };
        }
        l.arg(&strides).arg(ws).arg(mask).arg(out).arg(lse);
        l.arg(&kmap).arg(&vmap);
        log::debug!("cuda: tensor-core kernel {}", kernel.label());
        // SAFETY: the arguments match attention_mma()'s signature.
        unsafe { l.launch(cfg) }.map_err(cuda_err("attention_mma"))?;
        Ok(())
    }
}

/// With skip-softmax, a copy of the workspace's tile counters (the workspace is freed with the
/// call); None otherwise.
fn tile_counters(
    stream: &Arc<CudaStream>,
    plan: &Plan,
    ws: &CudaSlice<u32>,
    layout: &Workspace,
) -> Result<Option<CudaSlice<u32>>> {
    let words = tile_count_words(plan);
    if words == 0 {
        return Ok(None);
    }
    let at = layout.tiles as usize;
    stream
        .clone_dtod(&ws.slice(at..at + words))
        .map(Some)
        .map_err(cuda_err("copy tile counters"))
}

/// The host API on its own context and stream.
pub struct CudaBackend {
    attn: CudaAttention,
    stream: Arc<CudaStream>,
    calls: Mutex<()>,
}

/// The f16 copies of Q, K and V (`CudaBackend::probe_copies`), where an operand has one.
pub type OperandCopies = [Option<Vec<u16>>; 3];

impl CudaBackend {
    /// Device 0, or a typed error saying why CUDA cannot be used.
    pub fn new() -> Result<Self> {
        availability().map_err(|why| Error::BackendUnavailable {
            backend: "cuda",
            why,
        })?;
        let ctx = CudaContext::new(0).map_err(|e| Error::BackendUnavailable {
            backend: "cuda",
            why: format!("no usable CUDA device: {e}"),
        })?;
        let attn = CudaAttention::new(&ctx)?;
        let stream = ctx.new_stream().map_err(cuda_err("new stream"))?;
        Ok(CudaBackend {
            attn,
            stream,
            calls: Mutex::new(()),
        })
    }

    pub fn attention(&self) -> &CudaAttention {
        &self.attn
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The f16 copies of code values the quantizer passes give the tensor-core kernel (Q, K, V;
    /// `None` for an operand that gets none), with the codes stored beside them (`codes`, as
    /// `Backend::quantize` runs the passes) or not (the attention path), for tests: the two
    /// must be the same bits. Waits for its results.
    #[doc(hidden)]
    pub fn probe_copies(
        &self,
        plan: &Plan,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        codes: bool,
    ) -> Result<OperandCopies> {
        let wants = Wants {
            qdelta: false,
            q16: true,
            k16: true,
            v16: true,
            codes,
        };
        let _turn = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let (_, _, copies) = self.quantize_on_device(plan, q, k, v, wants)?;
        let st = &self.stream;
        let down = |c: Option<CudaSlice<u16>>| -> Result<Option<Vec<u16>>> {
            c.map(|c| st.clone_dtoh(&c).map_err(cuda_err("download")))
                .transpose()
        };
        let out = [down(copies.q)?, down(copies.k)?, down(copies.v)?];
        st.synchronize().map_err(cuda_err("synchronize"))?;
        Ok(out)
    }

    /// Q, K and V uploaded and run through the quantizer passes `wants` asks for, on this
    /// backend's stream (not waited for; the caller holds its turn, `calls`).
    fn quantize_on_device(
        &self,
        plan: &Plan,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        wants: Wants,
    ) -> Result<(CudaSlice<u32>, Workspace, Copies)> {
        check_inputs(plan, &q, &k, &v)?;
        let (qd, kd, vd) = (self.upload(&q)?, self.upload(&k)?, self.upload(&v)?);
        self.attn.quantize(
            &self.stream,
            plan,
            [&view(&qd), &view(&kd), &view(&vd)],
            wants,
        )
    }

    fn upload(&self, t: &Tensor) -> Result<Uploaded> {
        let st = &self.stream;
        Ok(match t {
            Tensor::F32(x) => (None, Some(st.clone_htod(*x).map_err(cuda_err("upload"))?)),
            Tensor::F16(x) => (
                Some(
                    st.clone_htod(bytemuck::cast_slice::<_, u16>(x))
                        .map_err(cuda_err("upload"))?,
                ),
                None,
            ),
            Tensor::BF16(x) => (
                Some(
                    st.clone_htod(bytemuck::cast_slice::<_, u16>(x))
                        .map_err(cuda_err("upload"))?,
                ),
                None,
            ),
        })
    }
}

/// A host tensor on the device: 16-bit bits, or f32.
type Uploaded = (Option<CudaSlice<u16>>, Option<CudaSlice<f32>>);

fn view(t: &Uploaded) -> CudaTensor<'_> {
    match t {
        (Some(x), _) => CudaTensor::Bits16(x),
        (_, Some(x)) => CudaTensor::F32(x),
        _ => unreachable!("upload returns one of the two"),
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn describe(&self) -> String {
        format!("cuda: {}", self.attn.description)
    }

    fn run(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Output> {
        check_inputs(plan, &q, &k, &v)?;
        let _turn = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let st = &self.stream;
        let (qd, kd, vd) = (self.upload(&q)?, self.upload(&k)?, self.upload(&v)?);
        let mut lse = if plan.spec.return_lse {
            Some(unsafe { st.alloc::<f32>(plan.lse_len()) }.map_err(cuda_err("alloc"))?)
        } else {
            None
        };
        let counters;
        let o = if plan.spec.dtype == DType::F32 {
            let mut o = unsafe { st.alloc::<f32>(plan.q_len) }.map_err(cuda_err("alloc"))?;
            counters = self.attn.enqueue(
                st,
                plan,
                view(&qd),
                view(&kd),
                view(&vd),
                CudaTensorMut::F32(&mut o),
                lse.as_mut(),
            )?;
            TensorBuf::F32(st.clone_dtoh(&o).map_err(cuda_err("download"))?)
        } else {
            let mut o = unsafe { st.alloc::<u16>(plan.q_len) }.map_err(cuda_err("alloc"))?;
            counters = self.attn.enqueue(
                st,
                plan,
                view(&qd),
                view(&kd),
                view(&vd),
                CudaTensorMut::Bits16(&mut o),
                lse.as_mut(),
            )?;
            let bits = st.clone_dtoh(&o).map_err(cuda_err("download"))?;
            TensorBuf::from_bytes(plan.spec.dtype, bytemuck::cast_slice(&bits), plan.q_len)
        };
        let lse = match lse {
            Some(l) => Some(st.clone_dtoh(&l).map_err(cuda_err("download"))?),
            None => None,
        };
        let tiles = match counters {
            Some(c) => Some(sum_tile_counts(
                &st.clone_dtoh(&c).map_err(cuda_err("download"))?,
            )),
            None => None,
        };
        st.synchronize().map_err(cuda_err("synchronize"))?;
        Ok(Output {
            o,
            lse,
            backend: self.describe(),
            tiles,
        })
    }

    fn quantize(&self, plan: &Plan, q: Tensor, k: Tensor, v: Tensor) -> Result<Quantized> {
        // Every pass the attention path may run, copies included (so that the bit-exact checks
        // of the codes cover the passes that write copies too).
        let wants = Wants {
            qdelta: true,
            q16: true,
            k16: true,
            v16: true,
            codes: true,
        };
        let _turn = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let (ws, layout, _) = self.quantize_on_device(plan, q, k, v, wants)?;
        let st = &self.stream;
        let words = st.clone_dtoh(&ws).map_err(cuda_err("download"))?;
        st.synchronize().map_err(cuda_err("synchronize"))?;
        Ok(unpack_workspace(plan, &layout, &words))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        all_modules, int8_groups_per_block, kernel_for_arch, module_source, nvfp4p_path,
        p_direct_allowed, perm_rows, tensor_core_fit, MmaConfig, Module,
    };
    use crate::{AttentionSpec, DType, Recipe};

    /// KPERM's maps over token rows: HND heads start at element 0 of their own rows, NHD heads
    /// at element h·d of shared rows; both fit with N a multiple of 64, with the tile count the
    /// last head's first tile plus N / 64. Ragged N, rows shorter than d and heads that cross a
    /// token row do not fit.
    #[test]
    fn permuted_maps_fit_hnd_and_nhd_rows() {
        let (b, h, n, d) = (2u64, 3u64, 100u64, 64u64);
        let hnd = (h * n * d, n * d, d);
        let nhd = (n * h * d, d, h * d);
        // HND: head (1, 2) starts at row (1·3 + 2)·100; NHD: batch 1 at row 100. N is free.
        assert_eq!(perm_rows(hnd, b, h, n, d), Some(500 + 100));
        assert_eq!(perm_rows(nhd, b, h, n, d), Some(100 + 100));
        // Padded HND rows (token stride 72): element 0 of each head's rows still.
        assert_eq!(
            perm_rows((h * n * 72, n * 72, 72), b, h, n, d),
            Some(500 + 100)
        );
        assert_eq!(
            perm_rows((h * n * d, n * d, 32), b, h, n, d),
            None,
            "rows shorter than d"
        );
        // A head offset of 32 elements into 64-element rows: its row would cross into the next.
        assert_eq!(
            perm_rows((h * n * d, 32, d), b, h, n, d),
            None,
            "head rows cross"
        );
        // Rows past the copy engine's signed 32-bit coordinates.
        assert_eq!(
            perm_rows((1 << 37, 0, d), 2, 1, n, d),
            None,
            "rows past 2^31"
        );
    }

    /// What `kernel_for` picks by default on each arch is among the modules the compile check
    /// builds (tests/cuda.rs), so a new default cannot reach users uncompiled.
    #[test]
    fn default_shapes_are_compile_checked() {
        let labels: std::collections::HashSet<String> = all_modules()
            .into_iter()
            .map(|(label, _, _)| label)
            .collect();
        for arch in ["sm_90a", "sm_89", "sm_80"] {
            for recipe in Recipe::ALL {
                for d in [32, 64, 96, 128, 120] {
                    for (dtype, skip) in [
                        (DType::F16, false),
                        (DType::BF16, false),
                        (DType::F16, true),
                        (DType::BF16, true),
                    ] {
                        // 256 keys: whole tiles, where N:M and NVFP4 P permute K and V (KPERM).
                        let seq = if skip { 256 } else { 200 };
                        let mut spec = AttentionSpec::new(1, 2, seq, d)
                            .with_dtype(dtype)
                            .with_recipe(recipe);
                        if skip {
                            spec = spec.with_skip_softmax(crate::SkipSoftmax::Lambda(0.1));
                        }
                        let plan = spec.plan().unwrap();
                        let module = tensor_core_fit(&plan, MmaConfig::for_plan(arch, &plan))
                            .unwrap_or_else(|why| panic!("{arch} {recipe:?} d{d}: {why}"));
                        assert!(
                            labels.contains(&module.label()),
                            "{arch} {recipe:?} d{d} {dtype:?} skip {skip}: {} is not compile-checked",
                            module.label()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn int8_groups_share_blocks() {
        // (rows, head dim) → groups per block: per-warp Q (32), K (64), Int8QkF16Pv's Q (128),
        // per-thread (4 rows), head dim 64, and the general path's head dims.
        for (rows, d, gpb) in [
            (32, 128, 4),
            (64, 128, 2),
            (128, 128, 1),
            (4, 128, 16),
            (32, 64, 8),
            (128, 64, 2),
            (32, 96, 1),
            (32, 56, 1),
        ] {
            assert_eq!(int8_groups_per_block(rows, d), gpb, "rows {rows} d {d}");
        }
    }

    #[test]
    fn launch_shapes_parse_and_reject() {
        let wide = MmaConfig::parse("4,2,1,1").unwrap();
        assert_eq!((wide.warps, wide.m_tiles, wide.wgmma), (4, 2, false));
        assert_eq!(
            MmaConfig::parse("8,1,1,1,1"),
            Some(MmaConfig::hopper_wgmma())
        );
        // A wgmma block is one or two whole warpgroups of one m-tile per warp, Q in shared memory.
        assert!(MmaConfig::parse("4,1,1,2,1").is_some());
        for bad in [
            "4,2,1,1,1",
            "8,1,0,1,1",
            "2,1,1,1,1",
            "8,2,1,1",
            "8,1,1,0",
            "8,1,1",
        ] {
            assert_eq!(MmaConfig::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn wgmma_shared_memory_and_threads() {
        // Q 128 rows, then three stages of K and V (64 rows each) by TMA, whose K scales take
        // 1024 bytes; two 64 × 64 f16 P tiles per warpgroup and 1024 bytes of room to align
        // the tiles; a producer warp joins the 8. mma.sync: two stages of padded rows.
        let wg = MmaConfig::hopper_wgmma();
        assert_eq!(
            wg.shared_bytes(1, 64),
            128 * 64 + 3 * (64 * 64 + 64 * 128 + 1024) + 2 * 2 * 8192 + 1024
        );
        assert_eq!(
            wg.shared_bytes(0, 128),
            128 * 256 + 3 * (2 * 64 * 256 + 1024) + 2 * 2 * 8192 + 1024
        );
        let sync = MmaConfig::parse("4,2,1,1").unwrap();
        assert_eq!(
            (wg.threads(false), wg.threads(true), sync.threads(false)),
            (288, 384, 128)
        );
        assert_eq!(
            sync.shared_bytes(0, 128),
            128 * 272 + 2 * (2 * 64 * 272 + 256)
        );
    }

    /// sm_90a at head dim 64: one block per SM asked only for dense Exact (it fits two in its
    /// registers anyway); skip-softmax, N:M and every other recipe ask for two, which their
    /// register counts need to run two (`for_plan`).
    #[test]
    fn head_dim_64_asks_two_blocks_but_for_dense_exact() {
        use crate::{NmSoftmax, SkipSoftmax};
        let blocks =
            |spec: AttentionSpec| MmaConfig::for_plan("sm_90a", &spec.plan().unwrap()).min_blocks;
        let exact = AttentionSpec::new(1, 2, 256, 64);
        assert_eq!(blocks(exact.clone()), 1);
        assert_eq!(
            blocks(exact.clone().with_skip_softmax(SkipSoftmax::Lambda(0.1))),
            2
        );
        assert_eq!(
            blocks(exact.clone().with_nm_softmax(NmSoftmax::new(4, 8))),
            2
        );
        assert_eq!(blocks(exact.with_recipe(Recipe::nvfp4p())), 2);
        assert_eq!(blocks(AttentionSpec::new(1, 2, 256, 128)), 1);
    }

    /// Nvfp4P's P path per module: compiled in only when asked, and then the one FLAG_P_DIRECT
    /// would pick (16-bit inputs and a power-of-two amax_P, and the direct path not turned off),
    /// so a module never lacks the path its call takes.
    #[test]
    fn nvfp4p_modules_hold_the_path_the_flag_picks() {
        let f16 = AttentionSpec::new(1, 2, 256, 128).with_recipe(Recipe::nvfp4p());
        let odd_amax = f16.clone().with_recipe(Recipe::Nvfp4P { amax_p: 0.75 });
        let bf16 = f16.clone().with_dtype(DType::BF16);
        // (2688 / 2^-116 is finite, 2688 / 2^-117 is not: the direct scale codes need inv_g)
        let tiny = |e: i32| {
            f16.clone().with_recipe(Recipe::Nvfp4P {
                amax_p: 2f32.powi(e),
            })
        };
        let (small, too_small) = (tiny(-116), tiny(-117));
        for (spec, allowed) in [
            (&f16, true),
            (&bf16, true),
            (&odd_amax, false),
            (&small, true),
            (&too_small, false),
        ] {
            assert_eq!(p_direct_allowed(spec), allowed);
            assert_eq!(nvfp4p_path(spec, true, false), None);
            assert_eq!(nvfp4p_path(spec, true, true), Some(allowed));
            assert_eq!(nvfp4p_path(spec, false, true), Some(false));
        }
        let exact = AttentionSpec::new(1, 2, 256, 128);
        assert_eq!(nvfp4p_path(&exact, true, true), None);
        // The three are three modules.
        let module = |p_direct| Module::Mma {
            recipe: 4,
            dp: 128,
            bf16: false,
            cfg: MmaConfig::hopper_wgmma3(),
            skip: false,
            nm: (0, 0),
            vnv: false,
            kperm: true,
            p_direct,
        };
        let labels: std::collections::HashSet<String> = [None, Some(true), Some(false)]
            .map(|d| module(d).label())
            .into();
        assert_eq!(labels.len(), 3);
        assert!(module_source(module(Some(true))).contains("#define PDIR 1u"));
        assert!(module_source(module(None)).contains("#define PDIR 2u"));
    }

    /// A wgmma launch shape asked for where wgmma cannot run (before sm_90a, or a head dim TMA
    /// does not cut into panels) falls back to mma.sync, and the plan's options reach the module.
    #[test]
    fn kernel_for_arch_runs_wgmma_only_where_it_can() {
        for arch in ["sm_80", "sm_89", "sm_90a"] {
            for d in [64, 96, 128] {
                let spec = AttentionSpec::new(1, 2, 300, d)
                    .with_recipe(Recipe::Int8QkF16Pv)
                    .with_skip_softmax(crate::SkipSoftmax::Lambda(0.1));
                let plan = spec.plan().unwrap();
                for mma in [None, Some(MmaConfig::hopper_wgmma())] {
                    match kernel_for_arch(arch, &plan, mma) {
                        Module::Mma {
                            cfg, recipe, skip, ..
                        } => {
                            let can = arch == "sm_90a" && MmaConfig::wgmma_dim(d as u32);
                            assert!(!cfg.wgmma || can, "{arch} d{d} {mma:?}: {cfg:?}");
                            assert_eq!((recipe, skip), (1, true), "{arch} d{d}");
                        }
                        m => panic!("{arch} d{d}: {}", m.label()),
                    }
                }
            }
        }
    }
}
