//! tessera's side of benches/modelopt.py: runs ModelOpt's attention modes on inputs written by
//! the script and writes the outputs back, with CUDA timings and skip-softmax tile counts.
//!
//!     modelopt_compare <dir> <heads> <seq> <head_dim> <causal 0|1> [--no-wgpu] [--no-out]
//!
//! Reads `<dir>/{q,k,v}.f16` (B = 1, NHD: [seq, heads, head_dim], raw f16), writes
//! `<dir>/out_<backend>_<mode>.f16` in the same layout, and prints one JSON line per run.

use half::f16;
use tessera::backend::cuda::{CudaBackend, CudaTensor, CudaTensorMut};
use tessera::backend::wgsl::WgslBackend;
use tessera::*;

/// ModelOpt's modes as tessera specs (names shared with benches/modelopt.py).
fn modes(base: &AttentionSpec) -> Vec<(&'static str, AttentionSpec)> {
    vec![
        ("dense", base.clone()),
        ("p_fp8", base.clone().with_recipe(Recipe::fp8p())),
        ("p_nvfp4", base.clone().with_recipe(Recipe::nvfp4p())),
        (
            "pv_nvfp4",
            base.clone()
                .with_recipe(Recipe::nvfp4p())
                .with_v_nvfp4(None),
        ),
        ("v_nvfp4", base.clone().with_v_nvfp4(None)),
        ("nm_2_4", base.clone().with_nm_softmax(NmSoftmax::new(2, 4))),
        (
            "skip_0.1",
            base.clone().with_skip_softmax(SkipSoftmax::Lambda(0.1)),
        ),
    ]
}

fn read_f16(path: &std::path::Path) -> Vec<f16> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytemuck::cast_slice::<u8, f16>(&bytes).to_vec()
}

/// Median ms of the zero-copy call on the backend's stream (CUDA events), after a warm-up.
fn time_cuda(
    c: &CudaBackend,
    spec: &AttentionSpec,
    q: &[f16],
    k: &[f16],
    v: &[f16],
) -> Option<f64> {
    let st = c.stream();
    let bits = |x: &[f16]| -> Vec<u16> { x.iter().map(|h| h.to_bits()).collect() };
    let (qd, kd, vd) = (
        st.clone_htod(&bits(q)).ok()?,
        st.clone_htod(&bits(k)).ok()?,
        st.clone_htod(&bits(v)).ok()?,
    );
    let mut o = st.clone_htod(&vec![0u16; q.len()]).ok()?;
    let mut run = || {
        c.attention().run(
            st,
            spec,
            CudaTensor::Bits16(&qd),
            CudaTensor::Bits16(&kd),
            CudaTensor::Bits16(&vd),
            CudaTensorMut::Bits16(&mut o),
            None,
        )
    };
    run().ok()?;
    run().ok()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::new();
    for _ in 0..7 {
        let a = st.record_event(flags).ok()?;
        run().ok()?;
        let b = st.record_event(flags).ok()?;
        b.synchronize().ok()?;
        times.push(a.elapsed_ms(&b).ok()? as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Some(times[times.len() / 2])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: modelopt_compare <dir> <heads> <seq> <head_dim> <causal 0|1> [--no-wgpu] [--no-out]");
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let num = |i: usize| -> usize { args[i].parse().expect("a number") };
    let (h, n, d, causal) = (num(2), num(3), num(4), args[5] == "1");
    let flag = |f: &str| args.iter().any(|a| a == f);
    let (q, k, v) = (
        read_f16(&dir.join("q.f16")),
        read_f16(&dir.join("k.f16")),
        read_f16(&dir.join("v.f16")),
    );
    let base = AttentionSpec::new(1, h, n, d)
        .with_layout(Layout::Nhd)
        .with_causal(causal);
    let cuda = CudaBackend::new()
        .map_err(|e| eprintln!("no CUDA: {e}"))
        .ok();
    let wgpu = if flag("--no-wgpu") {
        None
    } else {
        WgslBackend::new()
            .map_err(|e| eprintln!("no wgpu: {e}"))
            .ok()
    };
    let mut backends: Vec<(&str, &dyn Backend)> = Vec::new();
    if let Some(c) = &cuda {
        backends.push(("cuda", c));
    }
    if let Some(w) = &wgpu {
        backends.push(("wgpu", w));
    }
    for (mode, spec) in modes(&base) {
        let plan = match spec.plan() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{mode}: {e}");
                continue;
            }
        };
        for (name, b) in &backends {
            if let Err(e) = b.supports(&plan) {
                eprintln!("{name} {mode}: not run: {e}");
                continue;
            }
            let out = match b.run(&plan, Tensor::F16(&q), Tensor::F16(&k), Tensor::F16(&v)) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("{name} {mode}: {e}");
                    continue;
                }
            };
            if !flag("--no-out") {
                let path = dir.join(format!("out_{name}_{mode}.f16"));
                std::fs::write(&path, out.o.view().bytes()).expect("write the output");
            }
            let ms = match (&cuda, *name) {
                (Some(c), "cuda") => time_cuda(c, &spec, &q, &k, &v),
                _ => None,
            };
            let (visited, skipped) = out.tiles.map_or((0, 0), |t| (t.visited, t.skipped));
            println!(
                "{{\"backend\":\"{name}\",\"mode\":\"{mode}\",\"ms\":{},\"visited\":{visited},\"skipped\":{skipped}}}",
                ms.map_or("null".to_string(), |m| format!("{m}"))
            );
        }
    }
}
