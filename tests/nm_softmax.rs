//! N:M sparse softmax: the surviving keys are exactly the N largest of each group of M (ties to
//! the lower key), sink and recent keys stay dense, the weights renormalise; WGSL agrees with
//! the reference for every recipe on WGSL and CUDA.

mod common;
use common::matrix::{rows, tolerance};
use common::*;
use tessera::backend::cpu::reference;
use tessera::metrics::Accuracy;
use tessera::*;

/// Checks o against the rule, with V = identity (Nk = D): o_i is row i's softmax weights, so
/// which keys survived is visible. `sum_tol`: the weights' sum vs 1 (the output's rounding).
#[allow(clippy::too_many_arguments)]
fn check_survivors(
    name: &str,
    o: &[f32],
    q: &[f32],
    k: &[f32],
    nm: NmSoftmax,
    causal: bool,
    nk: usize,
    sum_tol: f64,
) {
    let nq = q.len() / nk;
    let (n, m) = (nm.n as usize, nm.m as usize);
    let offset = nk as i64 - nq as i64;
    for i in 0..nq {
        let score = |j: usize| {
            (0..nk)
                .map(|c| q[i * nk + c] as f64 * k[j * nk + c] as f64)
                .sum::<f64>()
        };
        let visible = |j: usize| !causal || j as i64 <= i as i64 + offset;
        let mut total = 0f64;
        for j in 0..nk {
            let g = j / m * m;
            let rank = (g..g + m)
                .filter(|&kk| {
                    visible(kk) && (score(kk) > score(j) || (score(kk) == score(j) && kk < j))
                })
                .count();
            let kept = visible(j) && (nm.dense(i, j, offset) || rank < n);
            let wgt = o[i * nk + j];
            assert_eq!(
                wgt > 0.0,
                kept,
                "{name} {nm:?} causal {causal}: row {i} key {j} weight {wgt}"
            );
            total += wgt as f64;
        }
        assert!(
            (total - 1.0).abs() < sum_tol,
            "{name}: row {i} weights sum to {total}"
        );
    }
}

#[test]
fn survivors_are_the_n_largest_of_each_group() {
    let mut rng = Rng::new(fresh_seed("nm_survivors"));
    let (nq, nk) = (48usize, 64usize);
    for (n, m, sink, recent, causal) in [
        (2u32, 4u32, 0usize, 0usize, false),
        (1, 4, 0, 0, false),
        (4, 8, 8, 16, true),
        (2, 8, 3, 64, true),
    ] {
        let nm = NmSoftmax {
            n,
            m,
            dense_sink_tokens: sink,
            dense_recent_tokens: recent,
        };
        let spec = AttentionSpec::new(1, 1, nq, nk)
            .with_kv(1, nk)
            .with_dtype(DType::F32)
            .with_causal(causal)
            .with_nm_softmax(nm);
        let plan = spec.plan().unwrap();
        let q: Vec<f32> = (0..plan.q_len).map(|_| rng.normal() as f32).collect();
        let k: Vec<f32> = (0..plan.kv_len).map(|_| rng.normal() as f32).collect();
        let v: Vec<f32> = (0..plan.kv_len)
            .map(|e| (e / nk == e % nk) as u8 as f32)
            .collect();
        let mut outputs = vec![("cpu", reference(&plan, &q, &k, &v, None).o)];
        if let Some(w) = wgpu() {
            outputs.push((
                "wgpu",
                w.run(&plan, Tensor::F32(&q), Tensor::F32(&k), Tensor::F32(&v))
                    .unwrap()
                    .o
                    .to_f32(),
            ));
        }
        for (name, o) in outputs {
            // f32 output: the weights' sum is 1 to a few ulps per weight.
            check_survivors(name, &o, &q, &k, nm, causal, nk, 1e-5);
        }
    }
}

/// Q and K with entries in {−1, 0, 1}, in f16/bf16: scores are small integers, so groups often
/// hold equal scores at the N-th place, and the tensor-core kernels (16-bit inputs) must break
/// each tie toward the lower key like the reference (their fast path keeps s ≥ τ and falls back
/// to ranks when the (N+1)-th score equals τ).
#[test]
fn ties_go_to_the_lower_key_on_every_backend() {
    let mut rng = Rng::new(fresh_seed("nm_ties"));
    let (nq, nk) = (50usize, 64usize);
    for (n, m, sink, recent, causal, dtype) in [
        (2u32, 4u32, 0usize, 0usize, false, DType::F16),
        (1, 4, 0, 16, true, DType::BF16),
        (3, 4, 0, 0, true, DType::F16),
        (3, 8, 2, 0, false, DType::F16),
        (6, 8, 0, 8, false, DType::BF16),
    ] {
        let nm = NmSoftmax {
            n,
            m,
            dense_sink_tokens: sink,
            dense_recent_tokens: recent,
        };
        let spec = AttentionSpec::new(1, 1, nq, nk)
            .with_kv(1, nk)
            .with_dtype(dtype)
            .with_causal(causal)
            .with_nm_softmax(nm);
        let plan = spec.plan().unwrap();
        let q = tensor(dtype, plan.q_len, |_| rng.below(3) as f64 - 1.0);
        let k = tensor(dtype, plan.kv_len, |_| rng.below(3) as f64 - 1.0);
        let v = tensor(dtype, plan.kv_len, |e| (e / nk == e % nk) as u8 as f64);
        let (qf, kf) = (q.view().to_f32(), k.view().to_f32());
        // The test is only worth something if ties at the boundary happen: count them.
        let mut ties = 0;
        for i in 0..nq {
            for g in (0..nk).step_by(m as usize) {
                let mut s: Vec<f32> = (g..g + m as usize)
                    .map(|j| (0..nk).map(|c| qf[i * nk + c] * kf[j * nk + c]).sum())
                    .collect();
                s.sort_by(|a, b| b.total_cmp(a));
                ties += (s[n as usize - 1] == s[n as usize]) as usize;
            }
        }
        assert!(ties > 20, "{nm:?}: only {ties} ties at the boundary");
        let mut outputs = vec![(
            "cpu",
            reference(&plan, &qf, &kf, &v.view().to_f32(), None).o,
        )];
        if let Some(w) = wgpu() {
            outputs.push(("wgpu", run_poisoned(w, &spec, &q, &k, &v).0));
        }
        if let Some(c) = cuda() {
            let out = c.run(&plan, q.view(), k.view(), v.view()).unwrap();
            outputs.push(("cuda", out.o.to_f32()));
        }
        for (name, o) in outputs {
            // 16-bit output: each weight rounded to 2^-8 (bf16) / 2^-11 (f16) relative, so
            // the sum of the weights is 1 within that (the CPU reference: f64, rounded once).
            let sum_tol = if dtype == DType::BF16 { 8e-3 } else { 1e-3 };
            check_survivors(name, &o, &qf, &kf, nm, causal, nk, sum_tol);
        }
    }
}

/// Every recipe with N:M against the reference on one GPU backend; `run` returns o (f32) and the LSE.
fn check_nm(
    name: &str,
    mut run: impl FnMut(&AttentionSpec, &TensorBuf, &TensorBuf, &TensorBuf) -> (Vec<f32>, Vec<f32>),
) {
    let mut rng = Rng::new(fresh_seed(&format!("nm {name}")));
    let configs = [
        NmSoftmax::new(2, 4),
        NmSoftmax {
            n: 3,
            m: 8,
            dense_sink_tokens: 4,
            dense_recent_tokens: 32,
        },
    ];
    for (i, recipe) in Recipe::ALL.into_iter().enumerate() {
        for (c, nm) in configs.into_iter().enumerate() {
            let dtype = [DType::F16, DType::BF16, DType::F32][(i + c) % 3];
            let spec = AttentionSpec::new(1, 4, 200, 64)
                .with_kv(2, 333)
                .with_causal(c == 1)
                .with_dtype(dtype)
                .with_recipe(recipe)
                .with_nm_softmax(nm)
                .with_lse(true);
            let (q, k, v) = qkv(&spec, &mut rng, 1.0);
            let plan = spec.plan().unwrap();
            let want = reference(
                &plan,
                &q.view().to_f32(),
                &k.view().to_f32(),
                &v.view().to_f32(),
                None,
            );
            let (o, lse) = run(&spec, &q, &k, &v);
            let acc = Accuracy::of(&o, &want.o);
            // As in the matrix, plus: a near-tie between two scores of one group (f32 vs f64)
            // can pick a different survivor; with random normal scores that is vanishingly rare.
            let (tol, _) = tolerance(recipe, dtype, rows(&plan));
            assert!(
                acc.non_finite_mismatch == 0 && acc.rel_l1 <= tol,
                "{name} {} {nm:?} {dtype:?}: {acc}",
                recipe.name()
            );
            for (g, r) in lse.iter().zip(&want.lse) {
                assert!(
                    g == r || (g - r).abs() <= 1e-4 * r.abs().max(1.0),
                    "{name} lse {g} vs {r}"
                );
            }
        }
    }
}

#[test]
fn wgsl_matches_reference_with_nm() {
    let Some(w) = wgpu() else { return };
    check_nm("wgpu", |spec, q, k, v| {
        let (o, lse) = run_poisoned(w, spec, q, k, v);
        (o, lse.unwrap())
    });
}

#[test]
fn cuda_matches_reference_with_nm() {
    let Some(c) = cuda() else { return };
    check_nm("cuda", |spec, q, k, v| {
        let out = c
            .run(&spec.plan().unwrap(), q.view(), k.view(), v.view())
            .unwrap();
        (out.o.to_f32(), out.lse.unwrap())
    });
}

#[test]
fn bad_nm_is_a_typed_error() {
    for (n, m) in [(0, 4), (4, 4), (2, 6), (5, 4)] {
        let e = AttentionSpec::new(1, 1, 8, 16)
            .with_nm_softmax(NmSoftmax::new(n, m))
            .plan()
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::BadRecipeParam {
                    name: "nm_softmax",
                    ..
                }
            ),
            "{e}"
        );
    }
}
