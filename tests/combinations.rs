//! ModelOpt's options combine with each other, with the precision recipes and with block masks
//! (issue 8): every GPU backend that runs a combination agrees with the CPU reference on it.

mod common;
use common::matrix::{mask_for, rows, tolerance, MaskKind};
use common::*;
use tessera::backend::cpu::reference;
use tessera::metrics::Accuracy;
use tessera::*;

#[test]
fn options_combine_on_every_backend() {
    let mut rng = Rng::new(fresh_seed("combinations"));
    let recipes = [
        Recipe::Exact,
        Recipe::Int8QkF16Pv,
        Recipe::nvfp4p(),
        Recipe::fp8p(),
    ];
    let mut runs = 0;
    for case in 0..16usize {
        let recipe = recipes[case % 4];
        let nm = (case / 4) % 2 == 1;
        let skip = (case / 8) % 2 == 1;
        let v_nvfp4 = case % 3 == 0;
        let causal = case % 5 < 2;
        let mask = if case % 2 == 0 {
            MaskKind::Random
        } else {
            MaskKind::None
        };
        let dtype = [DType::F16, DType::BF16][case % 2];
        // Head dims 64 and 128 (on sm_90a the wgmma kernel runs two and three warpgroups
        // there), each recipe at both, with and without N:M and skip-softmax.
        let d = [64, 128][(case ^ (case >> 2) ^ (case >> 3)) & 1];
        let mut spec = AttentionSpec::new(1, 4, 300, d)
            .with_kv(2, 450)
            .with_dtype(dtype)
            .with_causal(causal)
            .with_recipe(recipe)
            .with_lse(true);
        if nm {
            spec = spec.with_nm_softmax(NmSoftmax::new(2, 4));
        }
        if skip {
            spec = spec.with_skip_softmax(SkipSoftmax::Lambda(0.05));
        }
        if v_nvfp4 {
            spec = spec.with_v_nvfp4(Some(4.0));
        }
        spec.sparsity = mask_for(&spec, mask, &mut rng);
        let plan = spec.plan().unwrap();
        let (q, k, v) = qkv(&spec, &mut rng, 1.0);
        let want = reference(&plan, &q.to_f32(), &k.to_f32(), &v.to_f32(), None);
        for b in gpu_backends() {
            let ctx = format!(
                "{} {} d{d} nm={nm} skip={skip} v_nvfp4={v_nvfp4} causal={causal} {mask:?} {dtype:?}",
                b.describe(),
                recipe.name()
            );
            if let Err(e) = b.supports(&plan) {
                eprintln!("{ctx}: not run: {e}");
                continue;
            }
            let out = b.run(&plan, q.view(), k.view(), v.view()).unwrap();
            let acc = Accuracy::of(&out.o.to_f32(), &want.o);
            // The recipe's tolerance, plus room for a skip decision that f32 and f64 scores take
            // on different sides of the threshold (one tile, each of its weights < λ of the max).
            let (tol_l1, _) = tolerance(recipe, dtype, rows(&plan));
            let (tiles, want_tiles) = (out.tiles, want.tiles);
            assert_eq!(tiles.is_some(), skip, "{ctx}");
            let flips = match (tiles, want_tiles) {
                (Some(a), Some(b)) => {
                    assert_eq!(a.visited + a.skipped, b.visited + b.skipped, "{ctx}");
                    a.skipped.abs_diff(b.skipped)
                }
                _ => 0,
            };
            assert!(flips <= 2, "{ctx}: {flips} different skip decisions");
            assert_eq!(acc.non_finite_mismatch, 0, "{ctx}");
            assert!(acc.rel_l1 <= tol_l1 + 2e-3 * flips as f64, "{ctx}: {acc}");
            runs += 1;
        }
    }
    eprintln!("{runs} combination runs agree with the reference");
}
