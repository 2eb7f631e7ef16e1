//! WGSL vs the CPU reference over the whole matrix (tests/common/matrix.rs), outputs poisoned
//! before every run.

mod common;
use common::matrix::check_matrix;
use common::*;
use tessera::*;

fn check(recipe: Recipe) {
    let Some(w) = wgpu() else { return };
    check_matrix("wgpu", recipe, |spec, q, k, v| {
        let (o, lse) = run_poisoned(w, spec, q, k, v);
        (o, lse.unwrap())
    });
}

#[test]
fn exact_matches_reference() {
    check(Recipe::Exact);
}
#[test]
fn int8qk_f16pv_matches_reference() {
    check(Recipe::Int8QkF16Pv);
}
#[test]
fn int8qk_fp8pv_per_warp_matches_reference() {
    check(Recipe::Int8QkFp8Pv {
        granularity: QkGranularity::PerWarp,
    });
}
#[test]
fn int8qk_fp8pv_per_thread_matches_reference() {
    check(Recipe::Int8QkFp8Pv {
        granularity: QkGranularity::PerThread,
    });
}
#[test]
fn nvfp4_matches_reference() {
    check(Recipe::Nvfp4);
}
#[test]
fn nvfp4p_matches_reference() {
    check(Recipe::nvfp4p());
}
