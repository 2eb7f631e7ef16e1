//! The CUDA backend: every kernel specialization compiles with NVRTC for sm_80, sm_89 and
//! sm_90a, and the kernels match the CPU reference over the whole matrix (tests/common/matrix.rs)
//! with outputs poisoned before every run. Skipped with a printed reason where CUDA or NVRTC
//! is missing; a failure under TESSERA_REQUIRE_GPU=1.
#![cfg(feature = "cuda")]

mod common;
use common::matrix::check_matrix;
use common::*;
use tessera::backend::cuda::{all_modules, availability, nvrtc, CudaTensor, CudaTensorMut};
use tessera::*;

#[test]
fn every_kernel_compiles_for_sm80_sm89_sm90a() {
    // Needs NVRTC only, not a driver or GPU: it runs wherever libnvrtc loads.
    if !nvrtc::present() {
        let why = availability().err().unwrap_or_default();
        assert!(
            !gpu_required(),
            "TESSERA_REQUIRE_GPU=1 but no NVRTC ({why})"
        );
        eprintln!("skipped: no NVRTC library (libnvrtc.so) found");
        return;
    }
    // Every (arch, module) pair, compiled in parallel (NVRTC is thread-safe per program).
    let jobs: Vec<(&str, String, String)> = ["sm_80", "sm_89", "sm_90a"]
        .iter()
        .flat_map(|a| {
            all_modules()
                .into_iter()
                .filter(move |(_, _, hopper)| !hopper || *a == "sm_90a")
                .map(move |(n, s, _)| (*a, n, s))
        })
        .collect();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let jobs = &jobs;
                scope.spawn(move || {
                    jobs.iter()
                        .skip(w)
                        .step_by(workers)
                        .filter_map(|(arch, name, src)| {
                            match nvrtc::compile_verbose(name, src, arch) {
                                Err(e) => Some(e.to_string()),
                                // ptxas serializes every wgmma of a kernel when some path could
                                // touch an accumulator early (C7510-C7520): a silent 30-40% loss.
                                Ok((_, log)) if log.contains("are serialized") => Some(format!(
                                    "{name} ({arch}): ptxas serializes its wgmma:\n{}",
                                    log.lines()
                                        .filter(|l| l.contains("serialized"))
                                        .collect::<Vec<_>>()
                                        .join("\n")
                                )),
                                Ok(_) => None,
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{} kernel modules compiled for sm_80, sm_89 and sm_90a",
        jobs.len()
    );
}

/// Through the zero-copy API on the backend's stream, outputs poisoned with NaN first.
fn run_poisoned_cuda(
    spec: &AttentionSpec,
    q: &TensorBuf,
    k: &TensorBuf,
    v: &TensorBuf,
) -> (Vec<f32>, Vec<f32>) {
    run_poisoned_with(cuda().unwrap().attention(), spec, q, k, v)
}

fn run_poisoned_with(
    attn: &tessera::backend::cuda::CudaAttention,
    spec: &AttentionSpec,
    q: &TensorBuf,
    k: &TensorBuf,
    v: &TensorBuf,
) -> (Vec<f32>, Vec<f32>) {
    let st = cuda().unwrap().stream();
    let plan = spec.plan().unwrap();
    let bits = |t: &TensorBuf| -> Vec<u16> { bytemuck::cast_slice(t.view().bytes()).to_vec() };
    let mut lse = st.clone_htod(&vec![f32::NAN; plan.lse_len()]).unwrap();
    let o = if spec.dtype == DType::F32 {
        let (q, k, v) = (
            st.clone_htod(&q.to_f32()).unwrap(),
            st.clone_htod(&k.to_f32()).unwrap(),
            st.clone_htod(&v.to_f32()).unwrap(),
        );
        let mut o = st.clone_htod(&vec![f32::NAN; plan.q_len]).unwrap();
        attn.run(
            st,
            spec,
            CudaTensor::F32(&q),
            CudaTensor::F32(&k),
            CudaTensor::F32(&v),
            CudaTensorMut::F32(&mut o),
            Some(&mut lse),
        )
        .unwrap();
        st.clone_dtoh(&o).unwrap()
    } else {
        let (q, k, v) = (
            st.clone_htod(&bits(q)).unwrap(),
            st.clone_htod(&bits(k)).unwrap(),
            st.clone_htod(&bits(v)).unwrap(),
        );
        let mut o = st.clone_htod(&vec![0xffffu16; plan.q_len]).unwrap(); // NaN in f16 and bf16
        attn.run(
            st,
            spec,
            CudaTensor::Bits16(&q),
            CudaTensor::Bits16(&k),
            CudaTensor::Bits16(&v),
            CudaTensorMut::Bits16(&mut o),
            Some(&mut lse),
        )
        .unwrap();
        let out = st.clone_dtoh(&o).unwrap();
        TensorBuf::from_bytes(spec.dtype, bytemuck::cast_slice(&out), plan.q_len).to_f32()
    };
    let lse = st.clone_dtoh(&lse).unwrap();
    st.synchronize().unwrap();
    (o, lse)
}

/// The CUDA-core kernel alone (the CUDA numerics' definition), on the shared backend's context.
fn cuda_cores_only(
    c: &tessera::backend::cuda::CudaBackend,
) -> tessera::backend::cuda::CudaAttention {
    let simt = tessera::backend::cuda::CudaAttention::new(c.attention().context()).unwrap();
    simt.set_tensor_cores(false);
    simt
}

/// The tensor-core kernel with launch shape `cfg`, on the shared backend's context.
fn launch_shape(
    c: &tessera::backend::cuda::CudaBackend,
    cfg: tessera::backend::cuda::MmaConfig,
) -> tessera::backend::cuda::CudaAttention {
    tessera::backend::cuda::CudaAttention::new(c.attention().context())
        .unwrap()
        .with_mma_config(cfg)
}

/// A tensor-core output against the CUDA-core kernel's on the same inputs: every output written
/// and rel-L1 within the recipe's same-numerics tolerance (the same quantizers; f32 sums in
/// another order, and rarely a value rounding across a boundary: see `tolerance`'s terms).
/// Returns the accuracy for callers that print it.
fn assert_same_numerics(
    o_mma: &[f32],
    o_simt: &[f32],
    spec: &AttentionSpec,
    ctx: &str,
) -> tessera::metrics::Accuracy {
    let plan = spec.plan().unwrap();
    let acc = tessera::metrics::Accuracy::of(o_mma, o_simt);
    let (tol_l1, _) =
        common::matrix::tolerance(spec.recipe, spec.dtype, common::matrix::rows(&plan));
    assert_eq!(acc.non_finite_mismatch, 0, "unwritten outputs: {ctx}");
    assert!(
        acc.rel_l1 <= tol_l1,
        "rel-L1 {} > {tol_l1}: {ctx} ({acc})",
        acc.rel_l1
    );
    acc
}

fn check(recipe: Recipe) {
    if cuda().is_none() {
        return;
    }
    check_matrix("cuda", recipe, run_poisoned_cuda);
}

recipe_tests!(check);

/// The tensor-core kernel against the CUDA-core kernel (the CUDA numerics' definition) on the
/// same inputs: ragged lengths, Nq ≠ Nk, GQA, causal, block masks, both 16-bit dtypes, every
/// recipe the tensor cores run. Also checks that `kernel_for` picks the tensor cores here.
#[test]
fn tensor_cores_match_cuda_cores() {
    use common::matrix::{mask_for, MaskKind};
    use tessera::backend::cuda::{tensor_core_fit, CudaAttention, MmaConfig, Module};
    let Some(c) = cuda() else { return };
    let simt = cuda_cores_only(c);
    // Every launch shape: Q in shared memory, Q in registers (sm_86/89's), two m-tiles per
    // warp, and Hopper's warpgroup MMA (mma.sync's 4 × 2 elsewhere).
    let shapes: Vec<CudaAttention> = [
        MmaConfig::for_arch("sm_90a"),
        MmaConfig::for_arch("sm_89"),
        MmaConfig::parse("4,2,1,1").unwrap(),
        MmaConfig::hopper_wgmma(),
    ]
    .into_iter()
    .map(|cfg| launch_shape(c, cfg))
    .collect();
    let mut rng = Rng::new(fresh_seed("tensor cores vs cuda cores"));
    let recipes = [
        Recipe::Exact,
        Recipe::Int8QkF16Pv,
        Recipe::Int8QkFp8Pv {
            granularity: QkGranularity::PerThread,
        },
        Recipe::Nvfp4,
        Recipe::nvfp4p(),
        Recipe::fp8p(),
    ];
    let mut cases = 0;
    for recipe in recipes {
        for (i, (nq, nk, d, causal, mask)) in [
            (777usize, 1000usize, 128usize, true, MaskKind::None),
            (1000, 777, 64, false, MaskKind::Random),
            (300, 300, 96, true, MaskKind::AllMaskedRows),
            (5, 130, 128, false, MaskKind::None),
            // Head dims below their padding (56 → 64, 120 → 128: zero-filled columns) and 32.
            (100, 129, 56, true, MaskKind::None),
            (64, 200, 120, false, MaskKind::Random),
            (33, 65, 32, true, MaskKind::None),
        ]
        .into_iter()
        .enumerate()
        {
            let dtype = if i % 2 == 0 { DType::F16 } else { DType::BF16 };
            let mut spec = AttentionSpec::new(2, 4, nq, d)
                .with_kv(2, nk)
                .with_dtype(dtype)
                .with_causal(causal)
                .with_layout(if i % 2 == 0 { Layout::Nhd } else { Layout::Hnd })
                .with_recipe(recipe)
                .with_lse(true);
            spec.sparsity = mask_for(&spec, mask, &mut rng);
            let plan = spec.plan().unwrap();
            let (q, k, v) = qkv(&spec, &mut rng, 2.0);
            let (o_simt, lse_simt) = run_poisoned_with(&simt, &spec, &q, &k, &v);
            for attn in &shapes {
                let kernel = attn.kernel_for(&plan);
                assert!(
                    matches!(kernel, Module::Mma { .. }),
                    "{:?}",
                    tensor_core_fit(&plan, MmaConfig::for_arch("sm_90a"))
                );
                let (o_mma, lse_mma) = run_poisoned_with(attn, &spec, &q, &k, &v);
                let ctx = format!("{} ", kernel.label())
                    + &format!(
                        "{} nq{nq} nk{nk} d{d} causal={causal} {mask:?} {dtype:?}",
                        recipe.name()
                    );
                assert_same_numerics(&o_mma, &o_simt, &spec, &ctx);
                for (a, b) in lse_mma.iter().zip(&lse_simt) {
                    // Both are f32 log-sum-exps of the same scores: a few ulp, or both -inf.
                    assert!(
                        a == b || (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                        "LSE {a} vs {b}: {ctx}"
                    );
                }
                cases += 1;
            }
        }
    }
    eprintln!("tensor cores = CUDA cores on {cases} cases");
}

/// The zero-copy API records into a CUDA graph: every kernel, allocation and memset goes to the
/// caller's stream (none to the legacy default stream, which would run at once or break the
/// capture). Nothing runs while capturing (the poisoned output stays poisoned); replaying the
/// graph gives the same bits as the direct call.
#[test]
fn zero_copy_calls_are_captured_by_cuda_graphs() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use tessera::backend::cuda::CudaAttention;
    let Some(c) = cuda() else { return };
    let ctx = c.attention().context().clone();
    // cudarc's cross-stream event waits (on by default once a context has several streams) wait
    // on events recorded before the capture, which a capture may not depend on. A capturing
    // caller orders its streams itself. (Every test here uses one stream per buffer set.)
    // SAFETY: this test's buffers live on one stream; others synchronise their own stream.
    unsafe { ctx.disable_event_tracking() };
    let st = ctx.new_stream().unwrap();
    let attn = CudaAttention::new(&ctx).unwrap();
    let mut rng = Rng::new(fresh_seed("cuda graph capture"));
    for recipe in [Recipe::Int8QkF16Pv, Recipe::Nvfp4] {
        let spec = AttentionSpec::new(1, 4, 300, 128)
            .with_kv(2, 333)
            .with_causal(true)
            .with_recipe(recipe)
            .with_lse(true);
        let plan = spec.plan().unwrap();
        let (q, k, v) = qkv(&spec, &mut rng, 2.0);
        let (qd, kd, vd) = upload_16(&st, [&q, &k, &v]);
        let poison = vec![0xffffu16; plan.q_len];
        let mut o = st.clone_htod(&poison).unwrap();
        let mut lse = st.clone_htod(&vec![f32::NAN; plan.lse_len()]).unwrap();
        let call = |o: &mut cudarc::driver::CudaSlice<u16>,
                    lse: &mut cudarc::driver::CudaSlice<f32>| {
            attn.run(
                &st,
                &spec,
                CudaTensor::Bits16(&qd),
                CudaTensor::Bits16(&kd),
                CudaTensor::Bits16(&vd),
                CudaTensorMut::Bits16(o),
                Some(lse),
            )
            .unwrap()
        };
        call(&mut o, &mut lse); // direct call (also compiles and loads the modules)
        let direct = st.clone_dtoh(&o).unwrap();
        let direct_lse = st.clone_dtoh(&lse).unwrap();
        st.memcpy_htod(&poison, &mut o).unwrap();
        st.synchronize().unwrap();

        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        call(&mut o, &mut lse);
        let graph = st
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("the capture recorded the call");
        let before = st.clone_dtoh(&o).unwrap();
        assert!(
            before.iter().all(|&x| x == 0xffff),
            "{}: something ran while capturing",
            recipe.name()
        );
        graph.launch().unwrap();
        let replay = st.clone_dtoh(&o).unwrap();
        let replay_lse = st.clone_dtoh(&lse).unwrap();
        st.synchronize().unwrap();
        assert_eq!(direct, replay, "{}: graph replay differs", recipe.name());
        assert_eq!(
            direct_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            replay_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(direct.iter().all(|&x| x != 0xffff), "unwritten outputs");
    }
}

/// N:M sparse softmax on the tensor-core kernel against the CUDA-core kernel.
#[test]
fn nm_softmax_on_tensor_cores_matches_cuda_cores() {
    use tessera::backend::cuda::{MmaConfig, Module};
    let Some(c) = cuda() else { return };
    let simt = cuda_cores_only(c);
    let cfg = MmaConfig {
        nm: true,
        ..MmaConfig::for_arch("sm_90a")
    };
    let shape = |cfg| launch_shape(c, cfg);
    // mma.sync, and the wgmma shape of the head dim (two or three consumer warpgroups).
    let shapes_64 = [shape(cfg), shape(MmaConfig::hopper_wgmma())];
    let shapes_128 = [shape(cfg), shape(MmaConfig::hopper_wgmma3())];
    let mut rng = Rng::new(fresh_seed("nm on tensor cores"));
    for (i, (recipe, nm, causal)) in [
        (Recipe::Exact, NmSoftmax::new(2, 4), false),
        (Recipe::nvfp4p(), NmSoftmax::new(2, 4), true),
        (
            Recipe::fp8p(),
            NmSoftmax {
                n: 4,
                m: 8,
                dense_sink_tokens: 5,
                dense_recent_tokens: 16,
            },
            false,
        ),
        (Recipe::Int8QkF16Pv, NmSoftmax::new(1, 4), true),
        // K from INT8 codes and V from FP8 codes' f16 copies; Q, K, V from NVFP4 copies.
        (
            Recipe::Int8QkFp8Pv {
                granularity: tessera::QkGranularity::PerWarp,
            },
            NmSoftmax::new(2, 4),
            false,
        ),
        (Recipe::Nvfp4, NmSoftmax::new(2, 4), true),
        // Windows wider than a 64-key tile (the kernel tests them per tile first).
        (
            Recipe::Exact,
            NmSoftmax {
                n: 1,
                m: 8,
                dense_sink_tokens: 70,
                dense_recent_tokens: 130,
            },
            false,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dtype = if i % 2 == 0 { DType::F16 } else { DType::BF16 };
        // 500 keys: a ragged last tile (the producer copies it); 512: whole tiles. The wgmma
        // shape permutes K and V rows within 64-key tiles (KPERM, `kperm_fits`), HND or NHD.
        for (nk, d) in [(500, 64), (512, 64), (512, 128)] {
            let layout = if i % 3 == 1 { Layout::Nhd } else { Layout::Hnd };
            let spec = AttentionSpec::new(1, 4, 333, d)
                .with_kv(2, nk)
                .with_layout(layout)
                .with_dtype(dtype)
                .with_causal(causal)
                .with_recipe(recipe)
                .with_nm_softmax(nm)
                .with_lse(true);
            let plan = spec.plan().unwrap();
            let mmas = if d == 64 { &shapes_64 } else { &shapes_128 };
            for mma in mmas {
                assert!(matches!(
                    mma.kernel_for(&plan),
                    Module::Mma { nm: (_, 4 | 8), .. }
                ));
            }
            // The same selection up to scores that tie only after scaling (rare).
            let what = format!("{}:{} causal={causal} {dtype:?}", nm.n, nm.m);
            permuted_shapes_match_cuda_cores(&simt, mmas, &spec, &mut rng, &what);
        }
    }
}

/// `spec` on fresh inputs on each tensor-core launch shape of `mmas` against the CUDA-core
/// kernel `simt` (the same quantizers and selection; the sums differ in order, and rarely a
/// value rounds across a boundary): the recipe's same-numerics tolerance. The wgmma shape
/// (sm_90a) must permute the keys (KPERM, `kperm_fits`). `what` names the case.
fn permuted_shapes_match_cuda_cores(
    simt: &tessera::backend::cuda::CudaAttention,
    mmas: &[tessera::backend::cuda::CudaAttention],
    spec: &AttentionSpec,
    rng: &mut Rng,
    what: &str,
) {
    use tessera::backend::cuda::Module;
    let plan = spec.plan().unwrap();
    let (q, k, v) = qkv(spec, rng, 1.0);
    let (o_simt, _) = run_poisoned_with(simt, spec, &q, &k, &v);
    for mma in mmas {
        let kernel = mma.kernel_for(&plan);
        if let Module::Mma { cfg, kperm, .. } = kernel {
            // (On sm_90a; elsewhere kernel_for drops the wgmma shape.)
            assert_eq!(kperm, cfg.wgmma, "{}", kernel.label());
        }
        let (o_mma, _) = run_poisoned_with(mma, spec, &q, &k, &v);
        let ctx = format!("{} {} {what}", kernel.label(), spec.recipe.name());
        assert_same_numerics(&o_mma, &o_simt, spec, &ctx);
    }
}

/// NVFP4 P on the wgmma shape with K and V rows permuted (KPERM, `kperm_fits`: whole 64-key
/// tiles of contiguous K/V), where each thread quantizes its rows' 16-key blocks alone, against
/// the CUDA-core kernel (the same quantizer, blocks of 16 keys in key order): Nvfp4P by one
/// multiply (power-of-two amax_p) and by the general quotient (amax_p 0.75), the Nvfp4 recipe,
/// with V → NVFP4, skip-softmax and causal masks (whose keys are permuted too), head dims 64
/// and 128, HND and NHD; 500 keys end on a ragged tile, which the producer copies itself.
#[test]
fn nvfp4_p_blocks_on_permuted_keys_match_cuda_cores() {
    use tessera::backend::cuda::MmaConfig;
    let Some(c) = cuda() else { return };
    let simt = cuda_cores_only(c);
    let shape = |cfg| launch_shape(c, cfg);
    let shapes_64 = [
        shape(MmaConfig::hopper_wgmma()),
        shape(MmaConfig {
            min_blocks: 2,
            ..MmaConfig::hopper_wgmma()
        }),
    ];
    let shapes_128 = [shape(MmaConfig::hopper_wgmma3())];
    let mut rng = Rng::new(fresh_seed("nvfp4 p permuted"));
    for (i, (recipe, causal, vnv, skip)) in [
        (Recipe::nvfp4p(), false, false, false),
        (Recipe::Nvfp4P { amax_p: 0.75 }, true, false, false),
        (Recipe::Nvfp4, true, false, false),
        (Recipe::nvfp4p(), false, true, false),
        (Recipe::Nvfp4, false, false, true),
    ]
    .into_iter()
    .enumerate()
    {
        let dtype = if i % 2 == 0 { DType::F16 } else { DType::BF16 };
        // HND and NHD (each head's rows in the permuted maps' token rows at element 0 or h·d),
        // two batches.
        for (nk, d, layout) in [
            (500, 64, Layout::Hnd),
            (500, 128, Layout::Nhd),
            (512, 64, Layout::Hnd),
            (512, 64, Layout::Nhd),
            (512, 128, Layout::Hnd),
            (512, 128, Layout::Nhd),
        ] {
            let mut spec = AttentionSpec::new(2, 4, 333, d)
                .with_kv(2, nk)
                .with_layout(layout)
                .with_dtype(dtype)
                .with_causal(causal)
                .with_recipe(recipe)
                .with_lse(true);
            if vnv {
                spec = spec.with_v_nvfp4(Some(3.0));
            }
            if skip {
                spec = spec.with_skip_softmax(tessera::SkipSoftmax::Lambda(0.05));
            }
            // The same quantization on both (P's blocks and codes alike).
            let what =
                format!("nk={nk} {layout:?} causal={causal} vnv={vnv} skip={skip} {dtype:?}");
            let mmas = if d == 64 {
                &shapes_64[..]
            } else {
                &shapes_128[..]
            };
            permuted_shapes_match_cuda_cores(&simt, mmas, &spec, &mut rng, &what);
        }
    }
}

/// The Nvfp4 recipe's tile factor f = ρ' (a power of two ≤ 1 per row and tile) is multiplied
/// into P's operand scales on the tensor cores (`p_tile_fold`: exact for f ≥ 2^-7, rounded below
/// f16's range for smaller f, nothing below 2^-24), where the CUDA-core kernel rescales its
/// accumulator instead. Keys here come in 64-key tiles whose scores sit 0, 2, 5, 7, 9, 12 and 30
/// binades below the first tile's, then one 3 above it (the row max moves: the fold resets);
/// V grows as the scores fall (capped at 2^8), so that every tile down to f = 2^-12 carries a
/// visible share of O and a wrong factor would show. The same quantizers run on both, so the
/// recipe's same-numerics tolerance applies (the fold's rounding is below 2^-29 of a row's
/// largest operand); mma.sync and wgmma shapes, head dims 64 and 128, f16 and bf16 inputs.
#[test]
fn nvfp4_tile_factors_far_below_the_row_max_match_cuda_cores() {
    use tessera::backend::cuda::MmaConfig;
    let Some(c) = cuda() else { return };
    let simt = cuda_cores_only(c);
    let shape = |cfg| launch_shape(c, cfg);
    let mmas = [
        shape(MmaConfig::for_arch("sm_80")),
        shape(MmaConfig::hopper_wgmma()),
        shape(MmaConfig::hopper_wgmma3()),
    ];
    let levels = [0.0, -2.0, -5.0, -7.0, -9.0, -12.0, -30.0, 3.0];
    let mut rng = Rng::new(fresh_seed("nvfp4 tile factors"));
    for (d, dtype) in [(64, DType::F16), (128, DType::BF16), (128, DType::F16)] {
        let (heads, nq, nk) = (2usize, 100usize, 64 * levels.len());
        let spec = AttentionSpec::new(1, heads, nq, d)
            .with_kv(heads, nk)
            .with_dtype(dtype)
            .with_recipe(Recipe::Nvfp4);
        let plan = spec.plan().unwrap();
        // Scores ≈ c·d·sm_scale·log2(e) = c·√d·log2(e) binades for q ≈ 1 and k ≈ c per channel.
        let per_c = (d as f64).sqrt() * std::f64::consts::LOG2_E;
        let q = tensor(dtype, plan.q_len, |_| 1.0 + 0.3 * rng.normal());
        let k = tensor(dtype, plan.kv_len, |i| {
            let tile = (i / d) % nk / 64;
            levels[tile] / per_c + 0.3 * rng.normal()
        });
        let v = tensor(dtype, plan.kv_len, |i| {
            let tile = (i / d) % nk / 64;
            rng.normal() * (-levels[tile]).clamp(0.0, 8.0).exp2()
        });
        let (o_simt, _) = run_poisoned_with(&simt, &spec, &q, &k, &v);
        for mma in &mmas {
            let (o_mma, _) = run_poisoned_with(mma, &spec, &q, &k, &v);
            let ctx = format!("{} d={d} {dtype:?}", mma.kernel_for(&plan).label());
            assert_same_numerics(&o_mma, &o_simt, &spec, &ctx);
        }
    }
}

/// Int8QkFp8Pv's P·V on Hopper's FP8 tensor cores over long key sequences, against the CUDA-core
/// kernel. The FP8 MMA adds into its accumulator with fewer bits than f32, which over tens of
/// thousands of keys of a positive-mean V loses percents; the kernel gives each tile's product
/// its own accumulator and sums the tiles in f32, so it must stay within the recipe's
/// same-numerics tolerance (as in `tensor_cores_match_cuda_cores`). (Head dim 64 runs P·V in
/// f16 on the same codes: the same bound.)
#[test]
fn fp8_pv_sums_long_sequences_in_f32() {
    use tessera::backend::cuda::{MmaConfig, Module};
    let Some(c) = cuda() else { return };
    let simt = cuda_cores_only(c);
    let two_groups = launch_shape(c, MmaConfig::hopper_wgmma());
    let mut rng = Rng::new(fresh_seed("fp8 pv long"));
    let recipe = Recipe::Int8QkFp8Pv {
        granularity: QkGranularity::PerThread,
    };
    for (nq, nk, d, causal) in [
        (256usize, 32768usize, 128usize, false),
        (200, 20000, 64, true),
    ] {
        let spec = AttentionSpec::new(1, 2, nq, d)
            .with_kv(1, nk)
            .with_causal(causal)
            .with_recipe(recipe);
        let plan = spec.plan().unwrap();
        let (q, k, _) = qkv(&spec, &mut rng, 1.0);
        let v = tensor(spec.dtype, plan.kv_len, |_| 1.0 + 0.25 * rng.normal());
        let (o_simt, _) = run_poisoned_with(&simt, &spec, &q, &k, &v);
        // The default shape, and on sm_90a the two-warpgroup wgmma shape, which alone runs P·V
        // on the FP8 tensor cores at head dim 128 (the default's three warpgroups run it in f16).
        for mma in [c.attention(), &two_groups] {
            let kernel = mma.kernel_for(&plan);
            assert!(matches!(kernel, Module::Mma { .. }), "{}", kernel.label());
            let (o_mma, _) = run_poisoned_with(mma, &spec, &q, &k, &v);
            let ctx = format!("{} nq{nq} nk{nk} d{d} causal={causal}", kernel.label());
            let acc = assert_same_numerics(&o_mma, &o_simt, &spec, &ctx);
            eprintln!("{ctx}: {acc}");
        }
    }
}

/// The tensor-core kernel's NVFP4 P quantizer against the CPU, bit for bit. Rounding (a
/// faithful quotient and a magic-number FMA, with MUFU's approximate reciprocal) against the
/// exact E2M1 of a / s: every positive E4M3 scale (subnormal ones included: their blocks
/// saturate), values on and one to three ulps around each midpoint and step boundary, f16
/// probabilities times 2688 (Nvfp4P's a), random and saturating values, and zero. Scale codes
/// (max / 6 by a multiply and one FMA step) over random maxima of every magnitude.
#[test]
fn nvfp4_p_rounding_is_bit_exact_on_the_gpu() {
    use tessera::numerics::formats::{e2m1_code_of_ratio, e2m1_to_f32, e4m3_to_f32};
    use tessera::numerics::quant::nvfp4_block;
    let Some(c) = cuda() else { return };
    let mut rng = Rng::new(fresh_seed("nvfp4_p_rounding"));
    let (mut a, mut s) = (Vec::new(), Vec::new());
    let mut push = |x: f32, sc: f32| {
        a.push(x);
        s.push(sc);
    };
    let marks = [
        0.25f32, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0,
    ];
    for code in (1u8..0x7f).chain([0u8]) {
        let sc = e4m3_to_f32(code);
        for m in marks {
            let t = m * sc;
            for d in -3i32..=3 {
                push(f32::from_bits((t.to_bits() as i32 + d).max(0) as u32), sc);
            }
        }
        for _ in 0..300 {
            let u = rng.uniform() as f32;
            push(u * 7.0 * sc, sc);
            push(u * 1000.0 * sc, sc);
            // Nvfp4P's a: an f16 probability times 2688 (exact in f32).
            let p = half::f16::from_f32(u * sc.min(1.0)).to_f32();
            push(p * 2688.0, sc);
        }
        push(0.0, sc);
    }
    // Scale codes: block maxima over the whole range (below TINY, subnormal, huge, ∞, NaN).
    for _ in 0..20_000 {
        push(f32::from_bits(rng.next_u64() as u32 & 0x7fff_ffff), 1.0);
    }
    for x in [
        0.0f32,
        1e-30,
        6.0 * 448.0,
        f32::MAX,
        f32::INFINITY,
        f32::NAN,
    ] {
        push(x, 1.0);
    }
    let (got, codes, _) = c.attention().probe_p_nvfp4(&a, &s, 2688.0, false).unwrap();
    let mut bad = Vec::new();
    for (((&x, &sc), g), &code) in a.iter().zip(&s).zip(&got).zip(&codes) {
        let mut block = [0.0f32; 16];
        block[0] = x;
        let want_code = nvfp4_block(&block, &mut [0u8; 16]) as u32;
        if code & 0xff != want_code {
            bad.push(format!(
                "block max {x:e}: GPU scale code {code:#x}, CPU {want_code:#x}"
            ));
        }
        if x.is_nan() || x.is_infinite() {
            continue;
        }
        let want = e2m1_to_f32(e2m1_code_of_ratio(x, sc)) * sc;
        if g.to_bits() != want.to_bits() {
            bad.push(format!("a = {x:e}, s = {sc:e}: GPU {g:e}, CPU {want:e}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        a.len(),
        bad[..bad.len().min(10)].join("\n")
    );
}

/// The reason Nvfp4P's direct quotient is exact (kernels/attention_mma.cu, p_nvfp4 DIRECT), on
/// the CPU over every case: Q = 2688·p / s with p = i·2^e (i < 2^11: f16 and bf16 significands,
/// subnormals too) and s = j·2^f (j in 8..16: E4M3 significands), every shift near the E2M1
/// range. A Q that is not an E2M1 midpoint lies more than 2^-19 (relative) from every midpoint,
/// beyond the kernel's factor excess (≤ 2^-19.6) plus the product's rounding (2^-24); the
/// midpoints Q can equal are 0.75, 1.75 and 3.5 only, whose ties round up, as the excess does.
#[test]
fn nvfp4_p_direct_quotient_gap_holds() {
    // 4·midpoints: 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.
    let mids4 = [1u128, 3, 5, 7, 10, 14, 20];
    let mut tied = std::collections::BTreeSet::new();
    let mut checked = 0u64;
    for i in 1u128..2048 {
        for j in 8u128..16 {
            for d in -40i32..=10 {
                // 4Q = 10752·i·2^d / j, compared with M as A vs B: 4Q = M ⇔ A = B.
                let (x, shift) = (10752 * i, d.unsigned_abs());
                for &m in &mids4 {
                    let (a, b) = if d >= 0 {
                        (x << shift, m * j)
                    } else {
                        (x, (m * j) << shift)
                    };
                    if a > 2 * b || 2 * a < b {
                        continue; // Q is more than a factor 2 from this midpoint
                    }
                    checked += 1;
                    if a == b {
                        tied.insert(m);
                    } else {
                        assert!(
                            a.abs_diff(b) << 19 > b,
                            "i {i} j {j} d {d}: 4Q within 2^-19 of {m}"
                        );
                    }
                }
            }
        }
    }
    assert!(checked > 100_000, "{checked}");
    assert_eq!(tied.into_iter().collect::<Vec<_>>(), vec![3, 7, 14]);
}

/// int8_qk's rounding (kernels/quant.cu, int8_trunc_half_away): half away from zero as
/// trunc(RZ(y ± 0.5)), whose magnitude is trunc(RZ(|y| + 0.5)) (rounding toward zero is
/// symmetric in the sign), saturated at 127 (cvt.pack.sat; the kernel's domain, |y| ≤ 127·(1 +
/// 2^-23)², never reaches it), equals the reference's integer rounding for every f32 |y| ≤ 128,
/// emulated on the CPU: the sum is exact in f64, then rounded toward zero to f32.
#[test]
fn int8_rounding_by_a_toward_zero_add_is_half_away_from_zero() {
    use tessera::numerics::formats::int8_round;
    let rz_add_half = |a: f32| -> f32 {
        let exact = a as f64 + 0.5;
        let f = exact as f32;
        if f as f64 > exact {
            f32::from_bits(f.to_bits() - 1)
        } else {
            f
        }
    };
    let mut checked = 0u64;
    for bits in 0u32..=0x4300_0000 {
        let y = f32::from_bits(bits);
        let n = rz_add_half(y).trunc().min(127.0) as i32;
        let want = int8_round(y) as i32;
        assert_eq!(n, want, "y = {y:e} ({bits:#010x})");
        assert_eq!(-n, int8_round(-y) as i32, "y = -{y:e}");
        checked += 1;
    }
    assert_eq!(checked, 0x4300_0001);
    // The round-to-nearest add it replaces would fail here:
    let y = 0.5f32 - 2f32.powi(-25);
    assert_eq!((y + 0.5).trunc(), 1.0);
    assert_eq!(int8_round(y), 0);
}

/// The Nvfp4 recipe's tile factor f = 2^-k folded into the direct path's f16 operand scale
/// (mma_p.cuh: p_tile_fold, block_scale): for k ≤ 7 the scale s·2^7·f and every operand
/// E2M1·2^-14 · s·2^7·f are f16 values (so the fold is exact), over every E2M1 value and every
/// positive E4M3 scale; for larger k an operand rounds by at most half f16's least subnormal
/// (2^-25), under 2^-29 of the largest operand 6·448·2^-7.
#[test]
fn nvfp4_tile_fold_is_exact_down_to_two_to_the_minus_7() {
    use tessera::numerics::formats::e4m3_to_f32;
    let exact16 = |x: f64| half::f16::from_f64(x).to_f64() == x;
    let mut rounded = 0u32;
    for code in 1u8..0x7f {
        let s = e4m3_to_f32(code) as f64;
        for k in 0..=30 {
            let s2 = half::f16::from_f64(s * 2f64.powi(7 - k)).to_f64(); // HMUL2(s·2^7, f): RN
            assert!(
                k > 7 || (exact16(s * 2f64.powi(7 - k)) && s2 == s * 2f64.powi(7 - k)),
                "s {s} k {k}"
            );
            for e in [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] {
                let want = e * s * 2f64.powi(-7 - k);
                let got = half::f16::from_f64(e * 2f64.powi(-14) * s2).to_f64(); // fma.rn.f16x2
                if k <= 7 {
                    assert_eq!(got, want, "e {e} s {s} k {k}");
                } else {
                    rounded += u32::from(got != want);
                    assert!(
                        (got - want).abs() <= 2f64.powi(-25) + want * 2f64.powi(-11),
                        "e {e} s {s} k {k}"
                    );
                }
            }
        }
    }
    assert!(rounded > 0, "the check never saw a rounded operand");
}

/// The Nvfp4 recipe's tile factor in the tensor-core kernel (attention_mma.cu, softmax_mtile):
/// ρ' = 2^c, c = ⌈d⌉ for the exponent d of the row's largest p, built from c's bits as
/// `(c + (2^23 + 127)).to_bits() << 23`: exactly 2^c for every c the kernel uses (−60 to 1),
/// 0 for −∞ and NaN. And 2^⌈d⌉ is the least power of two ≥ p = 2^d (the CPU reference's ρ' of
/// its own p) except for d within ~2^-22 of an integer, the window docs/numerics.md states
/// (skipped here with a margin: 2^-21).
#[test]
fn nvfp4_tile_factor_from_the_exponent() {
    let factor = |c: f32| f32::from_bits((c + (8388608.0 + 127.0)).to_bits() << 23);
    for c in -60..=1 {
        assert_eq!(factor(c as f32), 2f32.powi(c), "c {c}");
    }
    assert_eq!(factor(f32::NEG_INFINITY), 0.0);
    assert_eq!(factor(f32::NAN), 0.0);
    let pow2_ceil = |x: f32| {
        let b = x.to_bits();
        f32::from_bits((b.min(0x7e80_0000) + 0x007f_ffff) & 0x7f80_0000)
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut near = 0u32;
    for _ in 0..200_000 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let d = -60.0 * ((rng >> 11) as f64 / (1u64 << 53) as f64) as f32; // (−60, 0]
        let p = (d as f64).exp2() as f32; // the reference's p, one rounding
        let frac = d - d.floor();
        if frac < 2f32.powi(-21) || 1.0 - frac < 2f32.powi(-21) {
            near += 1;
            continue;
        }
        assert_eq!(pow2_ceil(p), factor(d.ceil()), "d {d}");
    }
    assert!(near < 10, "{near} draws fell in the window");
}

/// Nvfp4P's direct path (attention_mma.cu: direct_factor, e2m1_direct_pair) emulated on the CPU
/// step by step, over every 16-bit p in [0, 1], every positive E4M3 scale, amax_P = 1, 1/2
/// and 2, the three combinations of p's type and the P·V operand's (f16/f16, bf16/bf16, and
/// bf16 p with an f16 operand under V → NVFP4), and MUFU's reciprocal anywhere within its ulp:
/// R = rcp(s)·RN(inv_g·(1 + 2^-20)·2^-K), t = RN(p·R) (f32, subnormals kept), toward zero to the
/// operand type, half up at the bit below E2M1's step, min 6·2^-K, times s·2^7 (f16) or s·2^119
/// (bf16), which must be exact, against E2M1(p·inv_g / s)·s. The GPU probe test below runs the
/// kernel's own code on the same domain; this one runs in CI.
#[test]
fn nvfp4_p_direct_rounding_emulated_on_the_cpu() {
    use tessera::numerics::formats::{e2m1_code_of_ratio, e2m1_to_f32, e4m3_to_f32};
    // x > 0 toward zero onto a binary format with `mant` stored bits whose least normal
    // exponent is `emin`; then that value as bits (through `bits`).
    fn toward_zero(x: f64, emin: i32, mant: i32) -> f64 {
        if x == 0.0 {
            return 0.0;
        }
        let e = ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023;
        let ulp = 2f64.powi(e.max(emin) - mant);
        (x / ulp).floor() * ulp
    }
    let scales: Vec<f32> = (1u8..0x7f).map(e4m3_to_f32).collect();
    let f16_ps: Vec<f32> = (0u16..=0x3c00)
        .map(|b| half::f16::from_bits(b).to_f32())
        .collect();
    let bf16_ps: Vec<f32> = (0u16..=0x3f80)
        .map(|b| half::bf16::from_bits(b).to_f32())
        .collect();
    let mut checked = 0u64;
    for (ps, operand_bf16) in [(&f16_ps, false), (&bf16_ps, true), (&bf16_ps, false)] {
        let k = if operand_bf16 { 126 } else { 14 };
        let excess = (1.0f32 + 2f32.powi(-20)) * 2f32.powi(-k);
        for inv_g in [2688.0f32, 5376.0, 1344.0] {
            let c = inv_g * excess;
            for &s in &scales {
                let r0 = 1.0f32 / s;
                let rcps = [
                    r0,
                    f32::from_bits(r0.to_bits() - 1),
                    f32::from_bits(r0.to_bits() + 1),
                ];
                for rcp in rcps {
                    let big_r = rcp * c;
                    for &p in ps.iter() {
                        let want = e2m1_to_f32(e2m1_code_of_ratio(p * inv_g, s)) * s; // p·inv_g: exact
                        let t = (p * big_r) as f64;
                        let got = if operand_bf16 {
                            let v = half::bf16::from_f64(toward_zero(t, -126, 7)).to_bits();
                            let v = half::bf16::from_bits(v.wrapping_add(0x20) & 0xffc0).to_f64();
                            let y = v.min(6.0 * 2f64.powi(-126)) * (s as f64 * 2f64.powi(119));
                            assert_eq!(half::bf16::from_f64(y).to_f64(), y, "bf16 product inexact");
                            y * 2f64.powi(7)
                        } else {
                            let v = half::f16::from_f64(toward_zero(t, -14, 10)).to_bits();
                            let v = half::f16::from_bits(v.wrapping_add(0x100) & 0xfe00).to_f64();
                            let y = v.min(6.0 * 2f64.powi(-14)) * (s as f64 * 2f64.powi(7));
                            assert_eq!(half::f16::from_f64(y).to_f64(), y, "f16 product inexact");
                            y * 2f64.powi(7)
                        };
                        assert_eq!(
                            got, want as f64,
                            "p {p:e} s {s:e} inv_g {inv_g} rcp {rcp:e} operand bf16 {operand_bf16}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 50_000_000, "{checked}");
}

/// Nvfp4P's direct quotient (FLAG_P_DIRECT: p·inv_g / s as one multiply by a slightly enlarged
/// factor, then E2M1 by a round toward zero into the 16-bit operand type and an integer
/// half-up; attention_mma.cu) against the exact E2M1(p·inv_g / s)·s: every f16 p in [0, 1]
/// through the f16 operand and every bf16 p in [0, 1] through the bf16 one (the rounded
/// probabilities: at most 11 significant bits), with every positive E4M3 scale, for amax_P = 1,
/// 1/2 and 2 (the argument: nvfp4_p_direct_quotient_gap_holds; this is the domain). The Nvfp4
/// recipe's P takes the same path with its lifted p/ρ' rounded to f16 and inv_g = 2688: inside
/// this domain. With them the path's block scale codes (direct_scale_codes: amax / 6 as one
/// exact multiply p·inv_g / 6) for every such p as a block max, and at the ends of the amax_P
/// range the path takes.
#[test]
fn nvfp4_p_direct_quotient_is_exact_for_every_16_bit_p() {
    use tessera::numerics::formats::{e2m1_code_of_ratio, e2m1_to_f32, e4m3_to_f32};
    use tessera::numerics::quant::nvfp4_block;
    let Some(c) = cuda() else { return };
    let scales: Vec<f32> = (1u8..0x7f).map(e4m3_to_f32).collect();
    for bf16 in [false, true] {
        let ps: Vec<f32> = if bf16 {
            (0u16..=0x3f80)
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect()
        } else {
            (0u16..=0x3c00)
                .map(|b| half::f16::from_bits(b).to_f32())
                .collect()
        };
        let (a, s): (Vec<f32>, Vec<f32>) = scales
            .iter()
            .flat_map(|&sc| ps.iter().map(move |&p| (p, sc)))
            .unzip();
        for inv_g in [2688.0f32, 5376.0, 1344.0] {
            let (_, codes, got) = c.attention().probe_p_nvfp4(&a, &s, inv_g, bf16).unwrap();
            // The direct path's scale code of a block whose largest p is p (codes' bits 8-15):
            // E4M3(min(p·inv_g / 6, 448)), as the CPU quantizer makes it.
            for (&p, &code) in a.iter().zip(&codes).take(ps.len()) {
                let want = nvfp4_block(&[p * inv_g], &mut [0u8; 1]) as u32;
                assert_eq!(
                    code >> 8,
                    want,
                    "bf16 {bf16}, inv_g {inv_g}: block max p {p:e}"
                );
            }
            let bad: Vec<String> = a
                .iter()
                .zip(&s)
                .zip(&got)
                .filter_map(|((&p, &sc), g)| {
                    let want = e2m1_to_f32(e2m1_code_of_ratio(p * inv_g, sc)) * sc; // p·inv_g: exact
                    (g.to_bits() != want.to_bits())
                        .then(|| format!("p = {p:e}, s = {sc:e}: GPU {g:e}, CPU {want:e}"))
                })
                .collect();
            assert!(
                bad.is_empty(),
                "bf16 {bf16}, inv_g {inv_g}: {} of {} differ:\n{}",
                bad.len(),
                a.len(),
                bad[..bad.len().min(10)].join("\n")
            );
        }
    }
    // The scale codes at the ends of the direct path's amax_P range (2^-116 to 2^127) and of a
    // NaN block max.
    let mut ps: Vec<f32> = (0u16..=0x3c00)
        .map(|b| half::f16::from_bits(b).to_f32())
        .collect();
    ps.push(f32::NAN);
    let ones = vec![1.0f32; ps.len()];
    for inv_g in [2688.0 * 2f32.powi(116), 2688.0 * 2f32.powi(-127)] {
        let (_, codes, _) = c
            .attention()
            .probe_p_nvfp4(&ps, &ones, inv_g, false)
            .unwrap();
        for (&p, &code) in ps.iter().zip(&codes) {
            let want = nvfp4_block(&[p * inv_g], &mut [0u8; 1]) as u32;
            assert_eq!(code >> 8, want, "inv_g {inv_g:e}: block max p {p:e}");
        }
    }
}

/// The f16 copies of NVFP4 code values the tensor cores read (the Nvfp4 recipe's Q, K and V;
/// V → NVFP4's V) are the same bits whether the quantizer passes also store the codes (as
/// `Backend::quantize` runs them, whose codes the CPU checks bit for bit) or skip them and
/// write the copy straight from the rounded quotient (the attention path, COPY_ONLY). Inputs
/// with every kind of block: random of both signs, all-zero, tiny (subnormal E4M3 scales),
/// large, and lone values beside zeros; ragged lengths; both 16-bit types.
#[test]
fn nvfp4_copies_are_the_same_with_and_without_codes() {
    let Some(c) = cuda() else { return };
    let mut rng = Rng::new(fresh_seed("nvfp4 copies"));
    for (dtype, vnv) in [
        (DType::F16, false),
        (DType::BF16, false),
        (DType::F16, true),
        (DType::BF16, true),
    ] {
        let recipe = if vnv { Recipe::Exact } else { Recipe::Nvfp4 };
        let mut spec = AttentionSpec::new(1, 2, 77, 128)
            .with_kv(2, 200)
            .with_dtype(dtype)
            .with_recipe(recipe);
        if vnv {
            spec = spec.with_v_nvfp4(None);
        }
        let plan = spec.plan().unwrap();
        // Per 16-value run, one kind: 0 random, 1 zeros, 2 tiny, 3 large, 4 one value.
        let mut gen = |n: usize| {
            let kinds: Vec<usize> = (0..n.div_ceil(16)).map(|_| rng.below(5)).collect();
            tensor(dtype, n, |i| {
                let x = rng.normal();
                match kinds[i / 16] {
                    1 => 0.0,
                    2 => x * 1e-6,
                    3 => x * 300.0,
                    4 if i % 16 != 3 => 0.0,
                    _ => x,
                }
            })
        };
        let (q, k, v) = (gen(plan.q_len), gen(plan.kv_len), gen(plan.kv_len));
        let with = c
            .probe_copies(&plan, q.view(), k.view(), v.view(), true)
            .unwrap();
        let without = c
            .probe_copies(&plan, q.view(), k.view(), v.view(), false)
            .unwrap();
        let expected = if vnv {
            [false, false, true]
        } else {
            [true, true, true]
        };
        for (i, (a, b)) in with.iter().zip(&without).enumerate() {
            assert_eq!(
                a.is_some(),
                expected[i],
                "{dtype:?} vnv {vnv}: operand {i} copy"
            );
            assert_eq!(a.is_some(), b.is_some());
            if let (Some(a), Some(b)) = (a, b) {
                let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
                assert_eq!(
                    diff,
                    0,
                    "{dtype:?} vnv {vnv}: operand {i}: {diff} of {} differ",
                    a.len()
                );
            }
        }
    }
}

/// The 2:4 sparse P·V groundwork (sm_90a; kernels/attention_mma.cu `sparse_p`): one
/// warpgroup's P, from the softmax's register layout, compressed into the sparse MMA's operand
/// and metadata, and two sparse wgmma for P·V, against the CPU. P holds every kind of 4-key
/// chunk the kernel can meet: two nonzeros at each of the six position pairs, one, none. f16
/// products are exact in f32, so the only error is the f32 sum over 64 keys (≤ 64·2^-24 of
/// Σ|p·v| per output).
#[test]
fn sparse_pv_probe_matches_cpu() {
    let Some(c) = cuda() else { return };
    let mut rng = Rng::new(fresh_seed("sparse pv"));
    let f16ed = |x: f64| half::f16::from_f64(x).to_f64();
    let mut p = vec![0f64; 64 * 64];
    for row in 0..64 {
        for chunk in 0..16 {
            let kept = [0, 1, 2, 2, 2, 2, 2, 2][rng.below(8)];
            let mut keys = [0usize, 1, 2, 3];
            for i in 0..kept {
                keys.swap(i, i + rng.below(4 - i));
            }
            for &k in &keys[..kept] {
                let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
                p[row * 64 + chunk * 4 + k] = f16ed(sign * (0.01 + rng.uniform()));
            }
        }
    }
    let v: Vec<f64> = (0..64 * 128).map(|_| f16ed(rng.normal())).collect();
    let bits = |x: &[f64]| -> Vec<u16> {
        x.iter()
            .map(|&y| half::f16::from_f64(y).to_bits())
            .collect()
    };
    let got = match c.attention().probe_sparse_pv(&bits(&p), &bits(&v)) {
        Err(Error::BackendUnavailable { why, .. }) => {
            eprintln!("skipped: {why}");
            return;
        }
        r => r.unwrap(),
    };
    let mut bad = Vec::new();
    for r in 0..64 {
        for ch in 0..128 {
            let terms = (0..64).map(|k| p[r * 64 + k] * v[k * 128 + ch]);
            let (want, size) = terms.fold((0.0, 0.0), |(s, m), x| (s + x, m + x.abs()));
            let g = got[r * 128 + ch] as f64;
            if (g - want).abs() > 64.0 * 2f64.powi(-24) * size {
                bad.push(format!("row {r} channel {ch}: GPU {g}, CPU {want}"));
            }
        }
    }
    assert_none_differ(&bad, 8192);
}

/// Q, K and V (16-bit tensors) on the device as raw bits, on `st`.
fn upload_16(
    st: &std::sync::Arc<cudarc::driver::CudaStream>,
    [q, k, v]: [&TensorBuf; 3],
) -> (
    cudarc::driver::CudaSlice<u16>,
    cudarc::driver::CudaSlice<u16>,
    cudarc::driver::CudaSlice<u16>,
) {
    let up = |t: &TensorBuf| {
        st.clone_htod(bytemuck::cast_slice::<u8, u16>(t.view().bytes()))
            .unwrap()
    };
    (up(q), up(k), up(v))
}

/// Fails listing the first of `bad`'s differences (of `total` values compared).
fn assert_none_differ(bad: &[String], total: usize) {
    assert!(
        bad.is_empty(),
        "{} of {total} differ:\n{}",
        bad.len(),
        bad[..bad.len().min(8)].join("\n")
    );
}

/// KPERM's key permutation by the tensor copy engine (docs/design.md): a 5-d tensor map with
/// row strides (1, 16, 2, 1) lands row R + 16t + 2n + e at shared row 8n + 2t + e of the box
/// from row R (any R). The probe returns the box raw, 128-byte swizzled (16-byte chunk c of
/// shared row r sits at chunk c ^ (r mod 8)); every element is compared.
#[test]
fn tma_permutes_key_rows_as_planned() {
    let Some(c) = cuda() else { return };
    let mut rng = Rng::new(fresh_seed("tma permutation"));
    let n = 256usize; // 4 tiles of 64 rows, 64 elements each
    let rows: Vec<u16> = (0..n * 64)
        .map(|_| half::f16::from_f64(rng.normal()).to_bits())
        .collect();
    for row0 in [0u32, 64, 37, 192] {
        let got = match c.attention().probe_tma_permuted_rows(&rows, row0) {
            Err(Error::BackendUnavailable { why, .. }) => {
                eprintln!("skipped: {why}");
                return;
            }
            r => r.unwrap(),
        };
        let mut bad = Vec::new();
        for r in 0..64usize {
            let (n, t, e) = (r / 8, (r % 8) / 2, r % 2);
            let key = row0 as usize + 16 * t + 2 * n + e;
            for col in 0..64usize {
                let at = r * 64 + ((col / 8) ^ (r % 8)) * 8 + col % 8;
                if got[at] != rows[key * 64 + col] {
                    bad.push(format!(
                        "box from row {row0}, shared row {r} column {col}: {:#06x}, key {key} has {:#06x}",
                        got[at],
                        rows[key * 64 + col]
                    ));
                }
            }
        }
        assert_none_differ(&bad, 4096);
    }
}

/// The scratch pool (src/backend/cuda/scratch.rs) keeps a call's scratch mapped across a
/// synchronisation (the default pool unmaps it there), gives it back on `trim_scratch`, and a
/// call after the trim computes the same bits.
#[test]
fn scratch_memory_is_kept_across_synchronisations_until_trimmed() {
    use tessera::backend::cuda::CudaAttention;
    let Some(c) = cuda() else { return };
    let ctx = c.attention().context().clone();
    let attn = CudaAttention::new(&ctx).unwrap();
    if std::env::var("TESSERA_SCRATCH_POOL").is_ok_and(|v| v == "0") {
        eprintln!("skipped: TESSERA_SCRATCH_POOL=0");
        return;
    }
    let st = ctx.new_stream().unwrap();
    let mut rng = Rng::new(fresh_seed("scratch pool"));
    // The Nvfp4 recipe's call holds f16 copies of Q, K and V as scratch (2 bytes per element).
    let spec = AttentionSpec::new(1, 4, 333, 128).with_recipe(Recipe::Nvfp4);
    let plan = spec.plan().unwrap();
    let (q, k, v) = qkv(&spec, &mut rng, 2.0);
    let (qd, kd, vd) = upload_16(&st, [&q, &k, &v]);
    let mut o = st.clone_htod(&vec![0xffffu16; plan.q_len]).unwrap();
    let mut call = || {
        attn.run(
            &st,
            &spec,
            CudaTensor::Bits16(&qd),
            CudaTensor::Bits16(&kd),
            CudaTensor::Bits16(&vd),
            CudaTensorMut::Bits16(&mut o),
            None,
        )
        .unwrap();
        st.synchronize().unwrap();
        st.clone_dtoh(&o).unwrap()
    };
    let first = call();
    let kept = attn
        .scratch_reserved_bytes()
        .unwrap()
        .expect("a scratch pool on a GPU with stream-ordered allocation");
    let copies = 2 * (plan.q_len + 2 * plan.kv_len) as u64;
    assert!(
        kept >= copies,
        "the pool keeps {kept} bytes after a synchronisation, less than the call's {copies} bytes of copies"
    );
    attn.trim_scratch().unwrap();
    assert_eq!(attn.scratch_reserved_bytes().unwrap(), Some(0));
    let second = call();
    assert!(first.iter().all(|&x| x != 0xffff), "unwritten outputs");
    assert_eq!(first, second, "a call after the trim differs");
}
