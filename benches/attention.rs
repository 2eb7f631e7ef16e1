//! tessera's speed on the GPU machine: per shape and recipe, the median kernel time over many
//! runs after warm-up (CUDA events, timed as triton.testing.do_bench times the peers: an L2
//! flush before each call, no host wait between calls; the host µs to enqueue a call beside it;
//! for WGSL, wall time around submit + wait) and the TOPS
//! (4·B·H·Nq·Nk·D / time, half when causal). Prints a table, and JSON lines with --json for
//! benches/peers.py. Filters: --shape H,N,D, --recipe NAME, --no-wgpu, --dense; --vnv adds V →
//! NVFP4 to every call; --skip and --nm time skip-softmax and N:M sparse softmax instead.
//!   cargo bench --bench attention -- [--json] [--quick]

use half::f16;
use std::time::Instant;
use tessera::backend::wgsl::{Buffers, WgslBackend};
use tessera::*;
use wgpu::util::DeviceExt;

struct Row {
    backend: &'static str,
    recipe: &'static str,
    n: usize,
    h: usize,
    d: usize,
    causal: bool,
    sparsity: f64,
    ms: f64,
    /// Host time per call to enqueue it (CUDA; the call returns before the GPU runs it).
    host_us: Option<f64>,
}

/// One CUDA timing: the GPU's median ms per call and the host's median µs to enqueue one.
#[cfg(feature = "cuda")]
struct Timing {
    ms: f64,
    host_us: f64,
}

fn work(b: usize, h: usize, n: usize, d: usize, causal: bool) -> f64 {
    4.0 * (b * h) as f64 * (n as f64) * (n as f64) * d as f64 * if causal { 0.5 } else { 1.0 }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn random_f16(n: usize, seed: u64) -> Vec<f16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Sum of uniforms: roughly normal, never all zeros.
            let u =
                ((s >> 11) as f64 / (1u64 << 53) as f64) + ((s & 0xffff) as f64 / 65536.0) - 1.0;
            f16::from_f64(u * 1.7)
        })
        .collect()
}

fn block_mask(spec: &AttentionSpec, keep: f64, seed: u64) -> Sparsity {
    let n = spec.batch * spec.heads_q * spec.seq_q.div_ceil(128) * spec.seq_kv.div_ceil(64);
    let mut s = seed | 1;
    let m: Vec<u8> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 1000) as f64 / 1000.0 < keep) as u8
        })
        .collect();
    Sparsity::BlockMask(BlockMask::new(m))
}

/// Locally structured tokens (HND, B = 1): clusters of 64 consecutive tokens share a direction,
/// so a query's scores are high inside its own cluster and low elsewhere (skip-softmax's case).
fn clustered_f16(n: usize, d: usize, heads: usize, seed: u64) -> Vec<f16> {
    let noise = random_f16(heads * n * d, seed);
    let dirs = random_f16(n.div_ceil(64) * d * heads, 99);
    (0..heads * n * d)
        .map(|e| {
            let (h, t, c) = (e / (n * d), (e / d) % n, e % d);
            let u = dirs[(h * n.div_ceil(64) + t / 64) * d + c].to_f64();
            f16::from_f64(1.2 * u / 1.7 + 0.3 * noise[e].to_f64() / 1.7)
        })
        .collect()
}

#[cfg(feature = "cuda")]
fn time_cuda(
    c: &tessera::backend::cuda::CudaBackend,
    spec: &AttentionSpec,
    reps: usize,
) -> Option<Timing> {
    let plan = spec.plan().ok()?;
    let inputs = (
        random_f16(plan.q_len, 1),
        random_f16(plan.kv_len, 2),
        random_f16(plan.kv_len, 3),
    );
    time_cuda_on(c, spec, reps, inputs)
}

#[cfg(feature = "cuda")]
fn time_cuda_on(
    c: &tessera::backend::cuda::CudaBackend,
    spec: &AttentionSpec,
    reps: usize,
    (q, k, v): (Vec<f16>, Vec<f16>, Vec<f16>),
) -> Option<Timing> {
    use tessera::backend::cuda::{CudaTensor, CudaTensorMut};
    use tessera::Backend;
    let st = c.stream();
    let plan = spec.plan().ok()?;
    if let Err(e) = c.supports(&plan) {
        eprintln!("skipped on CUDA: {e}");
        return None;
    }
    // The inputs as the spec's 16-bit type (bf16: the same values, rounded).
    let bf16 = spec.dtype == tessera::DType::BF16;
    let bits = |v: Vec<f16>| -> Vec<u16> {
        v.into_iter()
            .map(|x| {
                if bf16 {
                    half::bf16::from_f32(x.to_f32()).to_bits()
                } else {
                    x.to_bits()
                }
            })
            .collect()
    };
    let q = st.clone_htod(&bits(q)).ok()?;
    let k = st.clone_htod(&bits(k)).ok()?;
    let v = st.clone_htod(&bits(v)).ok()?;
    let mut o = st.clone_htod(&vec![0u16; plan.q_len]).ok()?;
    let mut host_us = Vec::with_capacity(reps);
    let mut run = || {
        let t = Instant::now();
        c.attention()
            .run(
                st,
                spec,
                CudaTensor::Bits16(&q),
                CudaTensor::Bits16(&k),
                CudaTensor::Bits16(&v),
                CudaTensorMut::Bits16(&mut o),
                None,
            )
            .unwrap();
        host_us.push(t.elapsed().as_secs_f64() * 1e6);
    };
    for _ in 0..2 {
        run();
    }
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    if std::env::var("TESSERA_BENCH_SYNC_EACH").is_ok_and(|v| v == "1") {
        // The method of sessions 1–13: the host waits after every call, so each timing
        // includes the host's launch work after the first event (the GPU idles meanwhile) and
        // the data stays in L2 between calls.
        let mut times = Vec::new();
        for _ in 0..reps {
            let a = st.record_event(flags).ok()?;
            run();
            let b = st.record_event(flags).ok()?;
            b.synchronize().ok()?;
            times.push(a.elapsed_ms(&b).ok()? as f64);
        }
        return Some(Timing {
            ms: median(times),
            host_us: median(host_us),
        });
    }
    // triton.testing.do_bench's method, which benches/peers.py times the peers with: before
    // each call a 256 MB memset evicts L2 (the inputs start cold, as in a model), events around
    // the call, no host wait until the end, so the host enqueues the next call while the GPU
    // runs the memset and the host's launch work is hidden, as on a busy production stream.
    let mut flush = st.alloc_zeros::<u8>(256 << 20).ok()?;
    let mut events = Vec::with_capacity(reps);
    for _ in 0..reps {
        st.memset_zeros(&mut flush).ok()?;
        let a = st.record_event(flags).ok()?;
        run();
        let b = st.record_event(flags).ok()?;
        events.push((a, b));
    }
    st.synchronize().ok()?;
    let mut times = Vec::with_capacity(reps);
    for (a, b) in &events {
        times.push(a.elapsed_ms(b).ok()? as f64);
    }
    Some(Timing {
        ms: median(times),
        host_us: median(host_us),
    })
}

fn time_wgpu(w: &WgslBackend, spec: &AttentionSpec, reps: usize) -> Option<f64> {
    let a = w.attention();
    let (dev, queue) = (a.device(), a.queue());
    let plan = spec.plan().ok()?;
    let buf = |v: Vec<f16>| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&v),
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let (q, k, v) = (
        buf(random_f16(plan.q_len, 1)),
        buf(random_f16(plan.kv_len, 2)),
        buf(random_f16(plan.kv_len, 3)),
    );
    let o = buf(vec![f16::ZERO; plan.q_len + 2]);
    let bufs = Buffers {
        q: &q,
        k: &k,
        v: &v,
        o: &o,
        lse: None,
    };
    let run = || {
        let mut enc = dev.create_command_encoder(&Default::default());
        a.encode(&mut enc, spec, &bufs).unwrap();
        queue.submit([enc.finish()]);
        dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    };
    run();
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        run();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Some(median(times))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    #[cfg(feature = "cuda")]
    let cuda = tessera::backend::cuda::CudaBackend::new()
        .map_err(|e| eprintln!("no CUDA: {e}"))
        .ok();
    let wgpu = WgslBackend::new()
        .map_err(|e| eprintln!("no wgpu: {e}"))
        .ok();
    let mut shapes: Vec<(usize, usize, usize)> = vec![
        (24, 4096, 128),
        (24, 16384, 128),
        (24, 32768, 128),
        (48, 16384, 64),
    ];
    if quick {
        shapes.truncate(1);
    }
    // Filters: --shape H,N,D (repeatable), --recipe NAME (repeatable), --no-wgpu, --dense.
    let values = |flag: &str| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    };
    let only_shapes: Vec<(usize, usize, usize)> = values("--shape")
        .iter()
        .filter_map(|s| {
            let v: Vec<usize> = s.split(',').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect();
    if !only_shapes.is_empty() {
        shapes = only_shapes;
    }
    let only_recipes = values("--recipe");
    let no_wgpu = args.iter().any(|a| a == "--no-wgpu");
    let dense_only = args.iter().any(|a| a == "--dense");
    // --vnv: every call with V → NVFP4 (rows labelled recipe+vnv). --bf16: bf16 inputs and
    // output (CUDA only; rows labelled recipe+bf16).
    let v_nvfp4 = args.iter().any(|a| a == "--vnv");
    let bf16 = args.iter().any(|a| a == "--bf16");
    let label = |r: Recipe| -> &'static str {
        let suffix = format!(
            "{}{}",
            if v_nvfp4 { "+vnv" } else { "" },
            if bf16 { "+bf16" } else { "" }
        );
        if suffix.is_empty() {
            r.name()
        } else {
            Box::leak(format!("{}{suffix}", r.name()).into_boxed_str())
        }
    };
    let mut rows = Vec::new();
    // Skip-softmax on clustered tokens: dense, λ so small nothing is skipped (the test's own
    // cost), and λ = 0.1; the fraction of tiles skipped comes from one host-API run.
    #[cfg(feature = "cuda")]
    if let (Some(c), true) = (&cuda, args.iter().any(|a| a == "--skip")) {
        use tessera::{Backend, SkipSoftmax, Tensor};
        for &(h, n, d) in &shapes {
            for recipe in [Recipe::Exact, Recipe::Int8QkF16Pv, Recipe::nvfp4p()] {
                let dense = AttentionSpec::new(1, h, n, d).with_recipe(recipe);
                let inputs = (
                    clustered_f16(n, d, h, 1),
                    clustered_f16(n, d, h, 2),
                    random_f16(h * n * d, 3),
                );
                for (label, spec) in [
                    ("dense", dense.clone()),
                    (
                        "λ=1e-30",
                        dense.clone().with_skip_softmax(SkipSoftmax::Lambda(1e-30)),
                    ),
                    (
                        "λ=0.1",
                        dense.clone().with_skip_softmax(SkipSoftmax::Lambda(0.1)),
                    ),
                ] {
                    let ms = time_cuda_on(c, &spec, 5, inputs.clone()).map(|t| t.ms);
                    let plan = spec.plan().unwrap();
                    let frac = c
                        .run(
                            &plan,
                            Tensor::F16(&inputs.0),
                            Tensor::F16(&inputs.1),
                            Tensor::F16(&inputs.2),
                        )
                        .ok()
                        .and_then(|o| o.tiles)
                        .map_or(0.0, |t| t.skipped_fraction());
                    if let Some(ms) = ms {
                        println!(
                            "| skip-softmax | {} | 1,{h},{n},{d} | {label} | {:.1}% skipped | {ms:.3} | {:.1} |",
                            recipe.name(),
                            100.0 * frac,
                            work(1, h, n, d, false) / (ms * 1e-3) / 1e12
                        );
                    }
                }
            }
        }
        return;
    }
    // N:M sparse softmax on random inputs: dense against 2:4 and 4:8 (the selection's cost;
    // P·V stays dense). --recipe filters; --nm-only LABEL (repeatable: dense, 2:4, 4:8) keeps
    // those rows (e.g. for one profiled launch: `run.sh stalls --nm --nm-only 2:4 ...`).
    #[cfg(feature = "cuda")]
    if let (Some(c), true) = (&cuda, args.iter().any(|a| a == "--nm")) {
        let nm_only = values("--nm-only");
        for &(h, n, d) in &shapes {
            for recipe in [Recipe::Exact, Recipe::Int8QkF16Pv, Recipe::nvfp4p()] {
                if !only_recipes.is_empty() && !only_recipes.iter().any(|r| r == recipe.name()) {
                    continue;
                }
                let dense = AttentionSpec::new(1, h, n, d).with_recipe(recipe);
                for (label, spec) in [
                    ("dense", dense.clone()),
                    ("2:4", dense.clone().with_nm_softmax(NmSoftmax::new(2, 4))),
                    ("4:8", dense.clone().with_nm_softmax(NmSoftmax::new(4, 8))),
                ] {
                    if !nm_only.is_empty() && !nm_only.iter().any(|l| l == label) {
                        continue;
                    }
                    if let Some(ms) = time_cuda(c, &spec, 5).map(|t| t.ms) {
                        println!(
                            "| nm-softmax | {} | 1,{h},{n},{d} | {label} | {ms:.3} | {:.1} |",
                            recipe.name(),
                            work(1, h, n, d, false) / (ms * 1e-3) / 1e12
                        );
                    }
                }
            }
        }
        return;
    }
    // --causal-only / --non-causal-only: one of the two.
    let (only_causal, only_non_causal) = (
        args.iter().any(|a| a == "--causal-only"),
        args.iter().any(|a| a == "--non-causal-only"),
    );
    let causal_modes: Vec<bool> = [false, true]
        .into_iter()
        .filter(|&c| if c { !only_non_causal } else { !only_causal })
        .collect();
    for &(h, n, d) in &shapes {
        for &causal in &causal_modes {
            for (recipe, masks) in Recipe::ALL
                .iter()
                .filter(|r| only_recipes.is_empty() || only_recipes.iter().any(|x| x == r.name()))
                .map(|r| {
                    (
                        *r,
                        if *r == Recipe::Int8QkF16Pv && !dense_only {
                            vec![1.0, 0.5, 0.2]
                        } else {
                            vec![1.0]
                        },
                    )
                })
            {
                for keep in masks {
                    let mut spec = AttentionSpec::new(1, h, n, d)
                        .with_causal(causal)
                        .with_recipe(recipe);
                    if keep < 1.0 {
                        spec.sparsity = block_mask(&spec, keep, 7);
                    }
                    if v_nvfp4 {
                        spec = spec.with_v_nvfp4(None);
                    }
                    if bf16 {
                        spec = spec.with_dtype(tessera::DType::BF16);
                    }
                    let reps = if n >= 16384 { 10 } else { 40 };
                    #[cfg(feature = "cuda")]
                    if let Some(c) = &cuda {
                        if let Some(t) = time_cuda(c, &spec, reps) {
                            rows.push(Row {
                                backend: "cuda",
                                recipe: label(recipe),
                                n,
                                h,
                                d,
                                causal,
                                sparsity: 1.0 - keep,
                                ms: t.ms,
                                host_us: Some(t.host_us),
                            });
                        }
                    }
                    // WGSL on the same GPU at the smallest shape (it is the portable oracle, not the fast path).
                    if let (Some(w), true) = (&wgpu, !no_wgpu && !bf16 && n <= 4096 && keep == 1.0)
                    {
                        if let Some(ms) = time_wgpu(w, &spec, 5) {
                            rows.push(Row {
                                backend: "wgpu",
                                recipe: label(recipe),
                                n,
                                h,
                                d,
                                causal,
                                sparsity: 1.0 - keep,
                                ms,
                                host_us: None,
                            });
                        }
                    }
                }
            }
        }
    }
    println!("| backend | recipe | B,H,N,D | causal | mask sparsity | median ms | TOPS | host µs per call |\n|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let tops = work(1, r.h, r.n, r.d, r.causal) / (r.ms * 1e-3) / 1e12;
        println!(
            "| {} | {} | 1,{},{},{} | {} | {:.0}% | {:.3} | {:.1} | {} |",
            r.backend,
            r.recipe,
            r.h,
            r.n,
            r.d,
            r.causal,
            r.sparsity * 100.0,
            r.ms,
            tops,
            r.host_us.map_or("-".into(), |u| format!("{u:.0}"))
        );
        if json {
            eprintln!("{{\"backend\":\"{}\",\"recipe\":\"{}\",\"h\":{},\"n\":{},\"d\":{},\"causal\":{},\"sparsity\":{},\"ms\":{},\"tops\":{}}}", r.backend, r.recipe, r.h, r.n, r.d, r.causal, r.sparsity, r.ms, tops);
        }
    }
}
