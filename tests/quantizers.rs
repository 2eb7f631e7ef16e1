//! The quantizers are bit-exact between the CPU definition and the WGSL shaders: every scalar
//! helper on edge values, and whole Q/K/V quantizations on random tensors of every recipe.

mod common;
use common::*;
use half::{bf16, f16};
use tessera::backend::wgsl::probe_scalars;
use tessera::numerics::formats::*;
use tessera::numerics::{QkCodes, Quantized, VCodes};
use tessera::*;

/// Edge values: zeros, subnormals, each format's midpoints and their neighbours, values past
/// each maximum, Inf, NaN, plus random bit patterns.
fn edge_values(rng: &mut Rng) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x007f_ffff),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        -f32::MAX,
    ];
    let with_neighbours = |x: f32, v: &mut Vec<f32>| {
        for y in [
            x,
            -x,
            f32::from_bits(x.to_bits() + 1),
            f32::from_bits(x.to_bits().saturating_sub(1)),
        ] {
            v.push(y);
            v.push(-y);
        }
    };
    // E4M3: every code's value and every midpoint between neighbours, and past 448.
    let e4: Vec<f32> = (0u8..=0x7E).map(e4m3_to_f32).collect();
    for w in e4.windows(2) {
        with_neighbours(w[0], &mut v);
        with_neighbours((w[0] + w[1]) / 2.0, &mut v);
    }
    for x in [
        448.0,
        464.0,
        480.0,
        1e4,
        0.5 * 2f32.powi(-9),
        1.5 * 2f32.powi(-9),
    ] {
        with_neighbours(x, &mut v);
    }
    // E2M1 midpoints, INT8 half-integers, 127.5 and beyond.
    for x in [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0] {
        with_neighbours(x, &mut v);
    }
    for k in 0..130 {
        with_neighbours(k as f32 + 0.5, &mut v);
    }
    // f16 / bf16 midpoints: a random value's half-ulp points, and around 65504 / 65520.
    for _ in 0..500 {
        let h = f16::from_bits((rng.next_u64() & 0x7bff) as u16).to_f32();
        with_neighbours(h, &mut v);
        with_neighbours(f32::from_bits(h.to_bits() + (1 << 12)), &mut v);
        let b = bf16::from_bits((rng.next_u64() & 0x7f7f) as u16).to_f32();
        with_neighbours(f32::from_bits(b.to_bits() + (1 << 15)), &mut v);
    }
    for x in [
        65504.0f32,
        65519.0,
        65520.0,
        65536.0,
        2f32.powi(-24),
        2f32.powi(-25),
        3.0 * 2f32.powi(-26),
    ] {
        with_neighbours(x, &mut v);
    }
    for _ in 0..20_000 {
        v.push(f32::from_bits(rng.next_u64() as u32));
    }
    v
}

fn same_bits_or_both_nan(a: u32, b: u32) -> bool {
    a == b || (f32::from_bits(a).is_nan() && f32::from_bits(b).is_nan())
}

#[test]
fn scalar_helpers_are_bit_exact_on_edge_values() {
    let Some(w) = wgpu() else { return };
    let mut rng = Rng::new(fresh_seed("scalar_helpers"));
    let xs = edge_values(&mut rng);
    let s = e4m3_to_f32(0x33); // an E4M3 scale other than 1
    for divisor in [6.0f32, 127.0, 448.0, 2688.0, 3.0, 0.3] {
        let got = probe_scalars(w, &xs, s, divisor).unwrap();
        for (&x, g) in xs.iter().zip(&got) {
            let ctx = format!("x = {x:e} ({:#010x})", x.to_bits());
            assert_eq!(g[0], e4m3_from_f32(x) as u32, "e4m3 {ctx}");
            assert_eq!(g[1] as i32, int8_round(x) as i32, "int8 {ctx}");
            assert_eq!(g[2], e2m1_code_of_ratio(x, 1.0) as u32, "e2m1 {ctx}");
            assert_eq!(g[3], e2m1_code_of_ratio(x, s) as u32, "e2m1 / s {ctx}");
            let h = f16::from_f32(ftz(x)).to_bits() as u32;
            assert!(
                g[4] == h || (x.is_nan() && f16::from_bits(g[4] as u16).is_nan()),
                "f16 {ctx}: {:#x} vs {h:#x}",
                g[4]
            );
            let b = bf16::from_f32(ftz(x)).to_bits() as u32;
            assert!(
                g[5] == b || (x.is_nan() && bf16::from_bits(g[5] as u16).is_nan()),
                "bf16 {ctx}: {:#x} vs {b:#x}",
                g[5]
            );
            assert!(
                same_bits_or_both_nan(g[6], div_rn(x, divisor).to_bits()),
                "div_rn(x, {divisor}) {ctx}"
            );
            let lo = f16::from_bits(x.to_bits() as u16).to_f32();
            assert!(
                same_bits_or_both_nan(g[7], lo.to_bits()),
                "f16 decode {ctx}"
            );
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() })
        .collect()
}

/// Compare every quantized operand bit for bit, and q_delta (only used in the LSE and computed
/// in f64 on the CPU, f32 on the GPU) to 1e-5 relative to the row's magnitude.
fn assert_same(got: &Quantized, want: &Quantized, delta_bounds: &[f64], ctx: &str) {
    assert_eq!(
        got.k_mean.as_deref().map(bits),
        want.k_mean.as_deref().map(bits),
        "k_mean {ctx}"
    );
    for (name, g, w) in [("q", &got.q, &want.q), ("k", &got.k, &want.k)] {
        match (g, w) {
            (
                QkCodes::Int8 {
                    codes: a,
                    scales: s,
                },
                QkCodes::Int8 {
                    codes: b,
                    scales: t,
                },
            ) => {
                assert_eq!(bits(s), bits(t), "{name} scales {ctx}");
                assert!(a == b, "{name} codes {ctx}");
            }
            (a, b) => assert!(a == b, "{name} {ctx}"),
        }
    }
    match (&got.v, &want.v) {
        (
            VCodes::Fp8 {
                codes: a,
                scales: s,
            },
            VCodes::Fp8 {
                codes: b,
                scales: t,
            },
        ) => {
            assert_eq!(bits(s), bits(t), "v scales {ctx}");
            assert!(a == b, "v codes {ctx}");
        }
        (a, b) => assert!(a == b, "v {ctx}"),
    }
    // q_delta = Σ_c (q·fold)_c·mean_c feeds only the LSE and is summed in f32 on both sides,
    // but the GPU may fuse each multiply-add: they agree to the f32 error bound of a D-term sum,
    // D·2^-24·Σ_c |term_c| (per row, from `delta_bounds`). Non-finite inputs make both non-finite.
    if let (Some(a), Some(b)) = (&got.q_delta, &want.q_delta) {
        for ((x, y), bound) in a.iter().zip(b).zip(delta_bounds) {
            let ok = x == y
                || (!x.is_finite() && !y.is_finite())
                || ((x - y).abs() as f64) <= 2.0 * bound + 1e-30;
            assert!(ok, "q_delta {x} vs {y} (bound {bound}) {ctx}");
        }
    }
}

/// Per query row, the f32 error bound of q_delta: D·2^-24·Σ_c |(q·fold)_c·mean_c|.
fn delta_bounds(plan: &Plan, q: &[f32], want: &Quantized) -> Vec<f64> {
    let Some(mean) = &want.k_mean else {
        return Vec::new();
    };
    let s = &plan.spec;
    let d = s.head_dim;
    let mut out = Vec::new();
    for b in 0..s.batch {
        for h in 0..s.heads_q {
            let m = &mean[(b * s.heads_kv + h / plan.group()) * d..][..d];
            for i in 0..s.seq_q {
                let row = &q[plan.q.row(b, h, i)..][..d];
                let sum: f64 = row
                    .iter()
                    .zip(m)
                    .map(|(&x, &mu)| (ftz(x) as f64 * plan.q_fold() as f64 * mu as f64).abs())
                    .sum();
                out.push(d as f64 * 2f64.powi(-24) * sum);
            }
        }
    }
    out
}

const RECIPES: [Recipe; 6] = [
    Recipe::Exact,
    Recipe::Int8QkF16Pv,
    Recipe::Int8QkFp8Pv {
        granularity: QkGranularity::PerWarp,
    },
    Recipe::Int8QkFp8Pv {
        granularity: QkGranularity::PerThread,
    },
    Recipe::Nvfp4,
    Recipe::nvfp4p(),
];

#[test]
fn quantized_operands_are_bit_exact_on_random_tensors() {
    for w in gpu_backends() {
        quantized_operands_on(w);
    }
}

fn quantized_operands_on(w: &dyn Backend) {
    let mut rng = Rng::new(fresh_seed("quantized_operands"));
    let shapes = [
        (1, 2, 2, 77, 200, 64),
        (2, 4, 2, 200, 77, 96),
        (1, 3, 1, 1, 1000, 128),
        (1, 2, 1, 333, 129, 40),
        (1, 1, 1, 130, 65, 256),
    ];
    for (i, recipe) in RECIPES.into_iter().enumerate() {
        for (j, &(b, hq, hk, nq, nk, d)) in shapes.iter().enumerate() {
            let dtype = [DType::F16, DType::BF16, DType::F32][(i + j) % 3];
            let layout = if (i + j) % 2 == 0 {
                Layout::Hnd
            } else {
                Layout::Nhd
            };
            let spec = AttentionSpec {
                batch: b,
                heads_q: hq,
                heads_kv: hk,
                seq_q: nq,
                seq_kv: nk,
                head_dim: d,
                ..AttentionSpec::new(1, 1, 1, d)
            }
            .with_dtype(dtype)
            .with_layout(layout)
            .with_recipe(recipe);
            let plan = spec.plan().unwrap();
            // Scale varies per case so the groups' scales span many binades.
            let (sq, sk, sv) = (
                2f64.powi(rng.below(20) as i32 - 10),
                2f64.powi(rng.below(10) as i32 - 5),
                rng.uniform() * 100.0,
            );
            let bias: Vec<f64> = (0..d).map(|_| rng.normal() * 4.0).collect();
            let q = tensor(dtype, plan.q_len, |_| rng.normal() * sq);
            let k = tensor(dtype, plan.kv_len, |e| (rng.normal() + bias[e % d]) * sk);
            let v = tensor(dtype, plan.kv_len, |_| rng.normal() * sv);
            let ctx = format!(
                "{} {dtype:?} {layout:?} b{b} hq{hq} hk{hk} nq{nq} nk{nk} d{d}",
                recipe.name()
            );
            let got = w.quantize(&plan, q.view(), k.view(), v.view()).unwrap();
            let want = CpuBackend
                .quantize(&plan, q.view(), k.view(), v.view())
                .unwrap();
            assert_same(
                &got,
                &want,
                &delta_bounds(&plan, &q.view().to_f32(), &want),
                &ctx,
            );
        }
    }
}

#[test]
fn quantizers_agree_on_edge_tensors() {
    // f32 inputs holding zeros blocks, subnormals, huge values and a NaN/Inf: the group rules
    // (zero group, non-finite group, saturation) must give the same bits on both sides.
    for w in gpu_backends() {
        edge_tensors_on(w);
    }
}

fn edge_tensors_on(w: &dyn Backend) {
    let mut rng = Rng::new(fresh_seed("edge_tensors"));
    let specials = [
        0.0f32,
        -0.0,
        f32::from_bits(3),
        1e-30,
        1e30,
        -1e30,
        65504.0,
        448.0,
        464.0,
        6.0,
        5.0,
        0.25,
    ];
    // 16-bit too: CUDA reads whole 16-byte chunks of those (a path of its own).
    for (recipe, dtype) in RECIPES
        .into_iter()
        .flat_map(|r| [DType::F32, DType::F16, DType::BF16].map(|d| (r, d)))
    {
        for poison in [None, Some(f32::NAN), Some(f32::INFINITY)] {
            let spec = AttentionSpec::new(1, 2, 150, 64)
                .with_kv(1, 90)
                .with_dtype(dtype)
                .with_recipe(recipe);
            let plan = spec.plan().unwrap();
            let gen = |n: usize, rng: &mut Rng| -> Vec<f32> {
                (0..n)
                    .map(|i| {
                        if (i / 64) % 7 == 3 {
                            0.0 // whole zero rows: zero groups and blocks
                        } else if rng.below(10) == 0 {
                            specials[rng.below(specials.len())]
                        } else {
                            rng.normal() as f32
                        }
                    })
                    .collect()
            };
            let q = gen(plan.q_len, &mut rng);
            let mut k = gen(plan.kv_len, &mut rng);
            let mut v = gen(plan.kv_len, &mut rng);
            if let Some(p) = poison {
                k[100] = p;
                v[200] = p;
            }
            let ctx = format!(
                "{} {} {dtype:?} poison {poison:?}",
                w.describe(),
                recipe.name()
            );
            let (got, want, q) = if dtype == DType::F32 {
                let got = w
                    .quantize(&plan, Tensor::F32(&q), Tensor::F32(&k), Tensor::F32(&v))
                    .unwrap();
                let want = CpuBackend
                    .quantize(&plan, Tensor::F32(&q), Tensor::F32(&k), Tensor::F32(&v))
                    .unwrap();
                (got, want, q)
            } else {
                let [q, k, v] = [&q, &k, &v].map(|x| TensorBuf::from_f32(dtype, x));
                let got = w.quantize(&plan, q.view(), k.view(), v.view()).unwrap();
                let want = CpuBackend
                    .quantize(&plan, q.view(), k.view(), v.view())
                    .unwrap();
                (got, want, q.view().to_f32())
            };
            assert_same(&got, &want, &delta_bounds(&plan, &q, &want), &ctx);
        }
    }
}
