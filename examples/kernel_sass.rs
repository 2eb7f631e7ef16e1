//! The CUDA kernel a plan runs, compiled for reading: no GPU needed, only NVRTC.
//!
//!     cargo run --release --features cuda --example kernel_sass -- \
//!         --recipe int8qk-f16pv --shape 24,16384,128 --skip 0.1 --out /tmp/sass
//!
//! Picks the module exactly as the CUDA backend would on a GPU of compute capability `--cc`
//! (default 9.0: sm_90a; launch shape from TESSERA_MMA_CONFIG if set), writes its source
//! `<label>.cu` under `--out` (default target/sass), and, when the NVRTC library loads (a CUDA
//! toolkit, or the `nvidia-cuda-nvrtc` wheel's lib/ on LD_LIBRARY_PATH), its `<label>.cubin`
//! and ptxas's report (registers, spills). Kernel sources come from TESSERA_KERNELS_DIR when
//! set, so an edited copy of kernels/ can be compared with the built-in one. Then: `nvdisasm -c
//! <label>.cubin` (the `nvidia-cuda-nvdisasm` wheel), and `python3 benches/gpu/sass_loop.py
//! <label>.cubin` for the hot loop's instruction mix.
//!
//! Flags: --recipe NAME (exact, int8qk-f16pv, int8qk-fp8pv, nvfp4, nvfp4-p, fp8-p), --shape
//! H,N,D, --causal, --bf16, --skip LAMBDA, --nm N:M, --vnv (V → NVFP4), --cc 8.9, --out DIR.

use std::path::PathBuf;
use tessera::backend::cuda::{arch_for, kernel_for_arch, module_source, nvrtc, MmaConfig};
use tessera::{AttentionSpec, DType, NmSoftmax, Recipe, SkipSoftmax};

fn main() {
    if let Err(e) = run() {
        eprintln!("kernel_sass: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| -> Option<&str> {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).map(String::as_str)
    };
    let has = |flag: &str| args.iter().any(|a| a == flag);

    let name = value("--recipe").unwrap_or("exact");
    let recipe = Recipe::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .ok_or_else(|| format!("unknown --recipe {name}: one of {}", names()))?;
    let shape: Vec<usize> = value("--shape")
        .unwrap_or("24,16384,128")
        .split(',')
        .map(|x| {
            x.parse()
                .map_err(|_| format!("--shape wants H,N,D, got {x:?}"))
        })
        .collect::<Result<_, _>>()?;
    let [h, n, d] = shape[..] else {
        return Err("--shape wants three numbers: H,N,D".into());
    };
    let mut spec = AttentionSpec::new(1, h, n, d)
        .with_recipe(recipe)
        .with_causal(has("--causal"));
    if has("--bf16") {
        spec = spec.with_dtype(DType::BF16);
    }
    if let Some(l) = value("--skip") {
        let l: f64 = l
            .parse()
            .map_err(|_| format!("--skip wants λ, got {l:?}"))?;
        spec = spec.with_skip_softmax(SkipSoftmax::Lambda(l));
    }
    if let Some(nm) = value("--nm") {
        let (a, b) = nm
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| format!("--nm wants N:M, got {nm:?}"))?;
        spec = spec.with_nm_softmax(NmSoftmax::new(a, b));
    }
    if has("--vnv") {
        spec = spec.with_v_nvfp4(None);
    }
    let plan = spec.plan().map_err(|e| e.to_string())?;

    let cc = value("--cc").unwrap_or("9.0");
    let (major, minor) = cc
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| format!("--cc wants a compute capability MAJOR.MINOR, got {cc:?}"))?;
    let arch = arch_for(major, minor).map_err(|e| e.to_string())?;
    let mma = std::env::var("TESSERA_MMA_CONFIG")
        .ok()
        .and_then(|s| MmaConfig::parse(&s));
    let module = kernel_for_arch(arch, &plan, mma);
    let label = module.label();
    let out = PathBuf::from(value("--out").unwrap_or("target/sass"));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let src = module_source(module);
    let write = |ext: &str, bytes: &[u8]| -> Result<PathBuf, String> {
        let path = out.join(format!("{label}.{ext}"));
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    };
    println!("{arch}: {label}");
    println!("source: {}", write("cu", src.as_bytes())?.display());
    if !nvrtc::present() {
        println!("no NVRTC library found: source only (LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel's lib/)");
        return Ok(());
    }
    let (cubin, log) = nvrtc::compile_verbose(&label, &src, arch).map_err(|e| e.to_string())?;
    println!("cubin: {}", write("cubin", &cubin)?.display());
    // ptxas reports every entry of the module; the attention kernel's lines follow its name.
    let mut ours = false;
    for line in log.lines() {
        if line.contains("Compiling entry function") {
            ours = line.contains("'attention");
        }
        if ours && (line.contains("Used") || line.contains("spill")) {
            println!("{}", line.trim());
        }
    }
    Ok(())
}

fn names() -> String {
    Recipe::ALL.map(|r| r.name()).join(", ")
}
