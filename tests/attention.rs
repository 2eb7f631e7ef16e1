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

recipe_tests!(check);
