//! N:M sparse softmax: the surviving keys are exactly the N largest of each group of M (ties to
//! the lower key), sink and recent keys stay dense, the weights renormalise; WGSL agrees with
//! the reference for every recipe on WGSL and CUDA.

mod common;
use common::matrix::tolerance;
use common::*;
use tessera::backend::cpu::reference;
use tessera::metrics::Accuracy;
use tessera::*;

/// With V = identity (Nk = D), o_i is row i's softmax weights, so which keys survived is visible.
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
        let offset = nk as i64 - nq as i64;
        for (name, o) in outputs {
            for i in 0..nq {
                let score = |j: usize| {
                    (0..nk)
                        .map(|c| q[i * nk + c] as f64 * k[j * nk + c] as f64)
                        .sum::<f64>()
                };
                let visible = |j: usize| !causal || j as i64 <= i as i64 + offset;
                let mut total = 0f64;
                for j in 0..nk {
                    let g = j / m as usize * m as usize;
                    let rank = (g..g + m as usize)
                        .filter(|&kk| {
                            visible(kk)
                                && (score(kk) > score(j) || (score(kk) == score(j) && kk < j))
                        })
                        .count();
                    let kept = visible(j) && (nm.dense(i, j, offset) || rank < n as usize);
                    let wgt = o[i * nk + j];
                    assert_eq!(wgt > 0.0, kept, "{name} {n}:{m} sink {sink} recent {recent} causal {causal}: row {i} key {j} weight {wgt}");
                    total += wgt as f64;
                }
                assert!(
                    (total - 1.0).abs() < 1e-5,
                    "{name}: row {i} weights sum to {total}"
                );
            }
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
            let (tol, _) = tolerance(recipe, dtype);
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
