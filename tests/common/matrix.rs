//! The cross-backend matrix: every recipe × {no mask, random block mask, block mask with
//! all-masked rows} × {causal, not} × {HND, NHD} × {MHA, GQA} × {Nq = Nk, Nq ≠ Nk}, with ragged
//! lengths (1, 77, 200, 1000), head dims 64/96/128/40/256 and all three dtypes rotated through
//! the cases, each checked against the CPU reference with its recipe's tolerance.

use super::*;
use tessera::backend::cpu::reference;
use tessera::metrics::Accuracy;
use tessera::*;

#[derive(Debug, Clone, Copy)]
pub enum MaskKind {
    None,
    Random,
    AllMaskedRows,
}

/// Tolerances of a GPU backend (f32 arithmetic, output in the input dtype) against the f64
/// reference, as (rel-L1, max-abs relative to max |o|):
/// - Output rounding: half an ulp of the output dtype, relative (f16 2^-12, bf16 2^-9).
/// - f32 vs f64 arithmetic (dot products, exp2 to a few ulp, the sums): ~1e-5 relative.
/// - A P element whose f32 and f64 values straddle a rounding boundary of the P format is
///   quantized one step apart: one ulp of that format on one term of one row (E4M3 2^-3,
///   E2M1 up to 1/3, f16 2^-11 relative to that p). Rare (f32 and f64 p agree to ~1e-7), so it
///   barely moves rel-L1, but it bounds the worst element. With a 16-bit P grid, flips are
///   common enough (~1 in 2000 elements) that a one-row problem can carry one: 2^-11 of a
///   weight of a few percent, over |o| ≈ 0.15, is ~1e-4 of rel-L1 (seen once at 6e-5).
/// - In a problem of few output rows one flip of a coarse P format is not averaged away: it
///   moves one row by up to the format's step (E4M3 2^-3, E2M1 1/3) times the weight of that
///   p times |v|/|o| (≈ 1 here), i.e. up to step / rows of rel-L1. (Seen: fp8-p on WGSL, 4 rows
///   of 77 keys, F32: 6.5e-4 against the 2e-4 of large problems.) `rows` = batch·heads_q·seq_q.
pub fn tolerance(recipe: Recipe, dtype: DType, rows: usize) -> (f64, f64) {
    let out = match dtype {
        DType::F16 => 2f64.powi(-12),
        DType::BF16 => 2f64.powi(-9),
        DType::F32 => 0.0,
    };
    let (flip_l1, flip_max, step) = match recipe {
        Recipe::Exact | Recipe::Int8QkF16Pv => (2e-4, 2f64.powi(-8), 0.0),
        Recipe::Int8QkFp8Pv { .. } | Recipe::Fp8P { .. } => (2e-4, 2f64.powi(-3), 2f64.powi(-3)),
        _ => (1e-3, 0.34, 1.0 / 3.0),
    };
    let one_flip = step / rows.max(1) as f64;
    (out + 1e-5 + flip_l1 + one_flip, 2.0 * out + flip_max)
}

/// The output rows of a plan (batch · heads_q · seq_q), for [`tolerance`].
pub fn rows(plan: &Plan) -> usize {
    plan.spec.batch * plan.spec.heads_q * plan.spec.seq_q
}

pub fn mask_for(spec: &AttentionSpec, kind: MaskKind, rng: &mut Rng) -> Sparsity {
    let (qb, kb) = (spec.seq_q.div_ceil(128), spec.seq_kv.div_ceil(64));
    let n = spec.batch * spec.heads_q * qb * kb;
    match kind {
        MaskKind::None => Sparsity::None,
        MaskKind::Random => Sparsity::BlockMask(BlockMask::new(
            (0..n).map(|_| rng.below(2) as u8).collect::<Vec<_>>(),
        )),
        MaskKind::AllMaskedRows => {
            // Random, but the last q-block row of every head is all zero: its queries see nothing.
            let m: Vec<u8> = (0..n)
                .map(|i| {
                    if (i / kb) % qb == qb - 1 {
                        0
                    } else {
                        (rng.below(4) != 0) as u8
                    }
                })
                .collect();
            Sparsity::BlockMask(BlockMask::new(m))
        }
    }
}

/// Run `recipe` over the whole matrix with `run` (which returns o as f32 and the LSE, from
/// outputs poisoned before the run) and check every case against the reference.
pub fn check_matrix(
    backend: &str,
    recipe: Recipe,
    mut run: impl FnMut(&AttentionSpec, &TensorBuf, &TensorBuf, &TensorBuf) -> (Vec<f32>, Vec<f32>),
) {
    let mut rng = Rng::new(fresh_seed(&format!("{backend} {}", recipe.name())));
    let lens_eq = [1usize, 77, 200, 1000];
    let lens_ne = [(1usize, 77usize), (77, 200), (200, 77), (1000, 333)];
    let dims = [64usize, 96, 128, 40, 256];
    let dtypes = [DType::F16, DType::BF16, DType::F32];
    let mut case = 0usize;
    let mut worst = (0f64, 0f64);
    for mask in [MaskKind::None, MaskKind::Random, MaskKind::AllMaskedRows] {
        for causal in [false, true] {
            for layout in [Layout::Hnd, Layout::Nhd] {
                for (hq, hk) in [(2usize, 2usize), (4, 2)] {
                    for same_len in [true, false] {
                        case += 1;
                        let (nq, nk) = if same_len {
                            (lens_eq[case % 4], lens_eq[case % 4])
                        } else {
                            lens_ne[case % 4]
                        };
                        // Keep the largest head dim off the largest problems (CI time).
                        let d = if nq.max(nk) >= 1000 {
                            dims[case % 4]
                        } else {
                            dims[case % 5]
                        };
                        let dtype = dtypes[case % 3];
                        let mut spec = AttentionSpec::new(1, hq, nq, d)
                            .with_kv(hk, nk)
                            .with_layout(layout)
                            .with_dtype(dtype)
                            .with_causal(causal)
                            .with_recipe(recipe)
                            .with_lse(true);
                        spec.sparsity = mask_for(&spec, mask, &mut rng);
                        let (q, k, v) = qkv(&spec, &mut rng, 2.0);
                        let plan = spec.plan().unwrap();
                        let want = reference(
                            &plan,
                            &q.view().to_f32(),
                            &k.view().to_f32(),
                            &v.view().to_f32(),
                            None,
                        );
                        let (o, lse) = run(&spec, &q, &k, &v);
                        let ctx = format!("{backend} {} {mask:?} causal={causal} {layout:?} hq{hq} hk{hk} nq{nq} nk{nk} d{d} {dtype:?}", recipe.name());
                        let acc = Accuracy::of(&o, &want.o);
                        let scale = want.o.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
                        let (tol_l1, tol_max) = tolerance(recipe, dtype, rows(&plan));
                        assert_eq!(
                            acc.non_finite_mismatch, 0,
                            "unwritten or non-finite outputs: {ctx}"
                        );
                        assert!(
                            acc.rel_l1 <= tol_l1,
                            "rel-L1 {} > {tol_l1}: {ctx} ({acc})",
                            acc.rel_l1
                        );
                        assert!(
                            acc.max_abs <= tol_max * scale.max(1e-30),
                            "max-abs {} > {}: {ctx} ({acc})",
                            acc.max_abs,
                            tol_max * scale
                        );
                        // LSE: f32 vs f64 sums and logs; rows with no visible key must be -inf on both.
                        for (i, (g, r)) in lse.iter().zip(&want.lse).enumerate() {
                            let ok = (g == r)
                                || ((g - r).abs() as f64) <= 1e-4 * (r.abs() as f64).max(1.0);
                            assert!(ok, "lse[{i}] {g} vs {r}: {ctx}");
                        }
                        worst = (
                            worst.0.max(acc.rel_l1),
                            worst.1.max(acc.max_abs / scale.max(1e-30)),
                        );
                    }
                }
            }
        }
    }
    eprintln!(
        "{backend} {}: {case} cases, worst rel-L1 {:.2e}, worst max-abs/max|o| {:.2e}",
        recipe.name(),
        worst.0,
        worst.1
    );
}

/// One #[test] per recipe, each calling `$check(recipe)`.
#[macro_export]
macro_rules! recipe_tests {
    ($check:ident) => {
        #[test]
        fn exact_matches_reference() {
            $check(Recipe::Exact);
        }
        #[test]
        fn int8qk_f16pv_matches_reference() {
            $check(Recipe::Int8QkF16Pv);
        }
        #[test]
        fn int8qk_fp8pv_per_warp_matches_reference() {
            $check(Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerWarp,
            });
        }
        #[test]
        fn int8qk_fp8pv_per_thread_matches_reference() {
            $check(Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerThread,
            });
        }
        #[test]
        fn nvfp4_matches_reference() {
            $check(Recipe::Nvfp4);
        }
        #[test]
        fn nvfp4p_matches_reference() {
            $check(Recipe::nvfp4p());
        }
        #[test]
        fn fp8p_matches_reference() {
            $check(Recipe::fp8p());
        }
    };
}
