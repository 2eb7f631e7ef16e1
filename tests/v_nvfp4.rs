//! V → NVFP4 (ModelOpt's `v_qdq="nvfp4"`): the V codes and scales are bit-identical on every
//! backend, outputs agree within the recipe tolerance, the accuracy matches ModelOpt's, and bad
//! parameters are typed errors.

mod common;
use common::matrix::{rows, tolerance};
use common::*;
use tessera::backend::cpu::reference;
use tessera::metrics::Accuracy;
use tessera::*;

#[test]
fn codes_are_bit_identical_and_outputs_agree() {
    let mut rng = Rng::new(fresh_seed("v_nvfp4 backends"));
    for (recipe, amax_v, dtype, causal) in [
        (Recipe::Exact, None, DType::F16, false),
        (Recipe::nvfp4p(), Some(4.0), DType::BF16, true),
        (Recipe::fp8p(), Some(2.5), DType::F32, false),
        (Recipe::Int8QkF16Pv, None, DType::F16, true),
        // bf16 with a 16-bit P: P is the input dtype's (bf16) though P·V runs in f16 (the
        // tensor-core kernel rounded P to f16 only, until the seventh session).
        (Recipe::Int8QkF16Pv, Some(4.0), DType::BF16, false),
        (Recipe::Exact, None, DType::BF16, true),
    ] {
        let spec = AttentionSpec::new(1, 4, 200, 96)
            .with_kv(2, 333)
            .with_dtype(dtype)
            .with_causal(causal)
            .with_recipe(recipe)
            .with_v_nvfp4(amax_v)
            .with_lse(true);
        let plan = spec.plan().unwrap();
        let (q, k, v) = qkv(&spec, &mut rng, 1.0);
        let (qf, kf, vf) = (q.to_f32(), k.to_f32(), v.to_f32());
        let want = reference(&plan, &qf, &kf, &vf, None);
        assert!(matches!(
            want.quantized.v,
            tessera::numerics::VCodes::Nvfp4 { .. }
        ));
        for b in gpu_backends() {
            let ctx = format!(
                "{} {} amax_v {amax_v:?} {dtype:?}",
                b.describe(),
                recipe.name()
            );
            let got = b.quantize(&plan, q.view(), k.view(), v.view()).unwrap();
            assert_eq!(got.v, want.quantized.v, "{ctx}: V codes or scales differ");
            if let Err(e) = b.supports(&plan) {
                eprintln!("{ctx}: attention not run: {e}");
                continue;
            }
            let out = b.run(&plan, q.view(), k.view(), v.view()).unwrap();
            let acc = Accuracy::of(&out.o.to_f32(), &want.o);
            // Same V codes, same P format: the recipe's own tolerance (f32 sums, P rounding).
            let (tol_l1, _) = tolerance(recipe, dtype, rows(&plan));
            assert_eq!(acc.non_finite_mismatch, 0, "{ctx}");
            assert!(acc.rel_l1 <= tol_l1, "{ctx}: {acc}");
        }
    }
}

/// On random normal inputs (B=1 H=4 N=1024 D=128, f16), against exact attention in f64.
/// ModelOpt's kernel measured, on such inputs (issue 8): P → NVFP4 alone cos 0.99580 / rel-L1
/// 0.0917; P and V → NVFP4 0.99133 / 0.1317. tessera must be no worse than ModelOpt plus 5% of
/// its error: rel-L1 ≤ 1.05 · 0.1317, and 1 − cos ≤ 1.05 · (1 − 0.99133). One draw varies by
/// about ±2% (rel-L1 0.1308–0.1363 over five seeds), so the figures are the mean of three.
#[test]
fn p_and_v_nvfp4_match_modelopts_accuracy() {
    let mut rng = Rng::new(fresh_seed("v_nvfp4 accuracy"));
    let draws = 3;
    let (mut rel_l1, mut cos) = (0.0, 0.0);
    for _ in 0..draws {
        let base = AttentionSpec::new(1, 4, 1024, 128).with_dtype(DType::F16);
        let (q, k, v) = qkv(&base, &mut rng, 0.0);
        let (qf, kf, vf) = (q.to_f32(), k.to_f32(), v.to_f32());
        let exact = reference(
            &base.clone().with_dtype(DType::F32).plan().unwrap(),
            &qf,
            &kf,
            &vf,
            None,
        );
        let spec = base.with_recipe(Recipe::nvfp4p()).with_v_nvfp4(None);
        let got = reference(&spec.plan().unwrap(), &qf, &kf, &vf, None);
        let acc = Accuracy::of(&got.o, &exact.o);
        eprintln!("P and V → NVFP4: {acc}");
        rel_l1 += acc.rel_l1 / draws as f64;
        cos += acc.cos / draws as f64;
    }
    eprintln!(
        "mean of {draws}: cos {cos:.5} rel-L1 {rel_l1:.4} (ModelOpt: cos 0.99133, rel-L1 0.1317)"
    );
    assert!(rel_l1 <= 1.05 * 0.1317, "rel-L1 {rel_l1}");
    assert!(1.0 - cos <= 1.05 * (1.0 - 0.99133), "cos {cos}");
}

#[test]
fn bad_parameters_are_typed_errors() {
    for (recipe, amax) in [
        (Recipe::Exact, Some(0.0)),
        (Recipe::Exact, Some(f32::NAN)),
        (Recipe::Exact, Some(1e9)),
        (Recipe::Nvfp4, None),
        (
            Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerWarp,
            },
            None,
        ),
    ] {
        let spec = AttentionSpec::new(1, 1, 64, 64)
            .with_recipe(recipe)
            .with_v_nvfp4(amax);
        match spec.plan() {
            Err(Error::BadRecipeParam { name, .. }) => {
                assert!(name == "amax_v" || name == "v_nvfp4", "{name}")
            }
            other => panic!("{recipe:?} {amax:?}: {other:?}"),
        }
    }
}
