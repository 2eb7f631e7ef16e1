//! Run-time compilation of kernels/*.cu with NVRTC, cached in memory by the caller and on disk
//! here (keyed by source, options, arch, driver and NVRTC versions; written atomically, so
//! concurrent processes never see a partial file).

use crate::error::{Error, Result};
use cudarc::nvrtc::{result, sys};
use std::path::PathBuf;

pub const COMMON: &str = include_str!("../../../kernels/common.cuh");
pub const QUANT: &str = include_str!("../../../kernels/quant.cu");
pub const ATTENTION: &str = include_str!("../../../kernels/attention.cu");
pub const ATTENTION_MMA: &str = include_str!("../../../kernels/attention_mma.cu");
/// The headers attention_mma.cu includes, by the names its `#include` lines use.
pub const ATTENTION_MMA_HEADERS: [(&str, &str); 5] = [
    ("wgmma.cuh", include_str!("../../../kernels/wgmma.cuh")),
    ("mma_p.cuh", include_str!("../../../kernels/mma_p.cuh")),
    (
        "mma_staging.cuh",
        include_str!("../../../kernels/mma_staging.cuh"),
    ),
    ("mma_nm.cuh", include_str!("../../../kernels/mma_nm.cuh")),
    (
        "mma_sparse_pv.cuh",
        include_str!("../../../kernels/mma_sparse_pv.cuh"),
    ),
];

/// Kernel development: `TESSERA_KERNELS_DIR=DIR` reads each kernel file from DIR (e.g. a copy
/// of kernels/ with an edit) instead of the copy built into the library, so one binary can A/B
/// kernel variants (`benches/gpu/run.sh kab`). A file DIR lacks keeps the built-in text, with a
/// warning. (The on-disk cache is keyed by the source, so variants never share a CUBIN.)
pub fn kernel_text(name: &str, built_in: &'static str) -> std::borrow::Cow<'static, str> {
    let dir = std::env::var_os("TESSERA_KERNELS_DIR").map(PathBuf::from);
    kernel_text_in(dir.as_deref(), name, built_in)
}

fn kernel_text_in(
    dir: Option<&std::path::Path>,
    name: &str,
    built_in: &'static str,
) -> std::borrow::Cow<'static, str> {
    let Some(dir) = dir else {
        return built_in.into();
    };
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.into(),
        Err(e) => {
            eprintln!(
                "tessera: TESSERA_KERNELS_DIR: {} ({e}); using the built-in {name}",
                path.display()
            );
            built_in.into()
        }
    }
}

/// attention_mma.cu with each `#include "…"` replaced by the header's text (the program is
/// compiled from one string).
pub fn attention_mma_body() -> String {
    ATTENTION_MMA_HEADERS.iter().fold(
        kernel_text("attention_mma.cu", ATTENTION_MMA).into_owned(),
        |body, (name, text)| {
            body.replace(&format!("#include \"{name}\""), &kernel_text(name, text))
        },
    )
}

/// Whether the NVRTC library can be loaded (cudarc panics on first use otherwise).
pub fn present() -> bool {
    // SAFETY: only probes for the shared library.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version as (major, minor).
pub fn version() -> Result<(i32, i32)> {
    let (mut a, mut b) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    unsafe { sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok((a, b))
}

/// The CUDA include directory, from CUDA_HOME / CUDA_PATH or /usr/local/cuda, if it exists.
pub fn include_dir() -> Option<PathBuf> {
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .map(PathBuf::from)
        .chain([PathBuf::from("/usr/local/cuda")]);
    roots
        .map(|r| r.join("include"))
        .find(|p| p.join("cuda.h").exists() || p.join("cuda_fp16.h").exists())
}

/// Full source of a module: the specialization defines, then common.cuh, then the kernels.
pub fn source(defines: &[(&str, u32)], body: &str) -> String {
    let mut s = String::new();
    for (k, v) in defines {
        s += &format!("#define {k} {v}u\n");
    }
    s + kernel_text("common.cuh", COMMON)
        .replace("#pragma once", "")
        .as_str()
        + "\n"
        + body
}

/// Compile `src` for `arch` (e.g. "sm_90a") to a CUBIN.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    compile_logged(name, src, arch, false).map(|(cubin, _)| cubin)
}

/// [`compile`] with ptxas's verbose report (registers, spills, and its performance notes such
/// as wgmma serialization), returned with the CUBIN.
pub fn compile_verbose(name: &str, src: &str, arch: &str) -> Result<(Vec<u8>, String)> {
    compile_logged(name, src, arch, true)
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    // SAFETY: prog is live; the log is a NUL-terminated buffer.
    unsafe { result::get_program_log(prog) }
        .map(|l| {
            unsafe { std::ffi::CStr::from_ptr(l.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

fn compile_logged(name: &str, src: &str, arch: &str, verbose: bool) -> Result<(Vec<u8>, String)> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
    ];
    if verbose {
        opts.push("--ptxas-options=-v".into());
    }
    if let Some(dir) = include_dir() {
        opts.push(format!("--include-path={}", dir.display()));
    }
    let csrc = std::ffi::CString::new(src)
        .map_err(|_| Error::Cuda("kernel source holds a NUL byte".into()))?;
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    let prog = result::create_program(&csrc, Some(&cname))
        .map_err(|e| Error::Cuda(format!("nvrtcCreateProgram: {e:?}")))?;
    // SAFETY: prog is a live program; options are valid C strings.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Err(_) => Err(Error::Nvrtc {
            kernel: name.into(),
            arch: arch.into(),
            log: program_log(prog),
        }),
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: prog compiled; size and buffer come from NVRTC itself.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| Error::Cuda(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut cubin = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _) }
                .result()
                .map_err(|e| Error::Cuda(format!("nvrtcGetCUBIN: {e:?}")))?;
            Ok((
                cubin,
                if verbose {
                    program_log(prog)
                } else {
                    String::new()
                },
            ))
        }
    };
    // SAFETY: prog is not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// FNV-1a, 64 bits: a stable hash for cache file names (std's hasher may change between releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where compiled modules are kept: TESSERA_CACHE_DIR, else $XDG_CACHE_HOME/tessera, else
/// ~/.cache/tessera; None disables the disk cache.
fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("TESSERA_CACHE_DIR") {
        return (!d.is_empty()).then(|| PathBuf::from(d));
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .ok()
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("tessera"))
}

/// Compile through the disk cache. `driver` identifies the driver version in the key.
pub fn compile_cached(name: &str, src: &str, arch: &str, driver: i32) -> Result<Vec<u8>> {
    let nv = version().unwrap_or((0, 0));
    let key = fnv1a(&[
        src.as_bytes(),
        arch.as_bytes(),
        format!("{driver} {}.{} v1", nv.0, nv.1).as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("{name}-{arch}-{key:016x}.cubin")));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            log::debug!("tessera: CUDA module {name} from {}", p.display());
            return Ok(bytes);
        }
    }
    let t = std::time::Instant::now();
    let cubin = compile(name, src, arch)?;
    log::debug!(
        "tessera: NVRTC compiled {name} for {arch} in {:.0?}",
        t.elapsed()
    );
    if let Some(p) = &path {
        // Write to a unique temporary name, then rename: readers see all or nothing.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!(
            "tmp{}-{}",
            std::process::id(),
            t.elapsed().as_nanos()
        ));
        if std::fs::write(&tmp, &cubin).is_ok() && std::fs::rename(&tmp, p).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(cubin)
}

#[cfg(test)]
mod tests {
    /// Every header attention_mma.cu includes is registered in `ATTENTION_MMA_HEADERS` (NVRTC
    /// gets one string: an unresolved `#include` fails only at run time, on a GPU machine).
    #[test]
    fn attention_mma_body_resolves_every_include() {
        let body = super::attention_mma_body();
        let left: Vec<&str> = body
            .lines()
            .filter(|l| l.trim_start().starts_with("#include"))
            .collect();
        assert!(left.is_empty(), "unresolved: {left:?}");
        for (name, _) in super::ATTENTION_MMA_HEADERS {
            assert!(
                super::ATTENTION_MMA.contains(&format!("#include \"{name}\"")),
                "{name} is registered but not included"
            );
        }
    }

    /// TESSERA_KERNELS_DIR's lookup: a file the directory holds replaces the built-in text, one
    /// it lacks keeps it.
    #[test]
    fn kernel_text_reads_the_directory_and_falls_back() {
        let dir = std::env::temp_dir().join(format!("tessera-kdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("common.cuh"), "// edited\n").unwrap();
        assert_eq!(
            super::kernel_text_in(Some(&dir), "common.cuh", super::COMMON),
            "// edited\n"
        );
        assert_eq!(
            super::kernel_text_in(Some(&dir), "quant.cu", super::QUANT),
            super::QUANT
        );
        assert_eq!(
            super::kernel_text_in(None, "common.cuh", super::COMMON),
            super::COMMON
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
