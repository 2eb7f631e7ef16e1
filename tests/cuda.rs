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
    if let Err(why) = availability() {
        assert!(!gpu_required(), "TESSERA_REQUIRE_GPU=1 but {why}");
        eprintln!("skipped: {why}");
        return;
    }
    // Every (arch, module) pair, compiled in parallel (NVRTC is thread-safe per program).
    let jobs: Vec<(&str, String, String)> = ["sm_80", "sm_89", "sm_90a"]
        .iter()
        .flat_map(|a| all_modules().into_iter().map(move |(n, s)| (*a, n, s)))
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
                            nvrtc::compile(name, src, arch).err().map(|e| e.to_string())
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
    let c = cuda().unwrap();
    let st = c.stream();
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
        c.attention()
            .run(
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
        c.attention()
            .run(
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

fn check(recipe: Recipe) {
    let Some(c) = cuda() else { return };
    let probe = AttentionSpec::new(1, 1, 1, 64)
        .with_recipe(recipe)
        .plan()
        .unwrap();
    if let Err(e) = c.supports(&probe) {
        eprintln!("not run on CUDA: {e}");
        return;
    }
    check_matrix("cuda", recipe, run_poisoned_cuda);
}

recipe_tests!(check);
