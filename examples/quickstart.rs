//! Quickstart: every recipe on one realistic problem, timed, and checked against exact attention.
//!
//!     cargo run --release --example quickstart
//!     TESSERA_BACKEND=cpu RUST_LOG=info cargo run --release --example quickstart
//!     cargo run --release --example quickstart -- 1024      # another sequence length
//!
//! B=1, H=8, N=4096, D=128, f16, HND, q/k/v ~ N(0, 1). The accuracy is measured on 16 query
//! rows (the same rows in every head) against the f64 reference of the *Exact* recipe run on the
//! f32-decoded inputs, so it shows each recipe's own error against exact attention.

use half::f16;
use std::time::Instant;
use tessera::backend::cpu::reference;
use tessera::metrics::Accuracy;
use tessera::{AttentionSpec, BackendKind, DType, Dispatcher, Recipe, Tensor};

/// SplitMix64 with Box-Muller: a tiny seeded normal generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn tensor(&mut self, n: usize) -> Vec<f16> {
        (0..n).map(|_| f16::from_f64(self.normal())).collect()
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}"); // tessera's errors say what to change
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init(); // RUST_LOG=info shows which backend the dispatcher picked and why
    let dispatcher = Dispatcher::from_env()?; // honours TESSERA_BACKEND=cpu|wgpu
    let backend = dispatcher.backend()?;

    let (batch, heads, head_dim) = (1, 8, 128);
    let arg: Option<usize> = std::env::args().nth(1).map(|s| s.parse()).transpose()?; // optional N
    let mut seq = arg.unwrap_or(4096);
    if arg.is_none() && backend.kind() == BackendKind::Cpu {
        seq = 512;
        println!("note: running on the f64 CPU reference: N reduced to {seq}");
    } else if arg.is_none() && backend.describe().contains(", Cpu)") {
        // A wgpu CPU adapter (e.g. lavapipe) runs this kernel at well under 1 GFLOP/s.
        seq = 512;
        println!(
            "note: {} is a CPU adapter: N reduced to {seq}",
            backend.describe()
        );
    }

    let spec = AttentionSpec::new(batch, heads, seq, head_dim); // HND, f16, no mask
    let plan = spec.plan()?;
    let mut rng = Rng(0x7e55e7a);
    let (q, k, v) = (
        rng.tensor(plan.q_len),
        rng.tensor(plan.kv_len),
        rng.tensor(plan.kv_len),
    );

    // The reference: Exact in f64 on the decoded inputs, with P kept in f32 (dtype F32), on a
    // sample of 16 query rows (the reference leaves every other row NaN).
    let rows: Vec<usize> = (0..16)
        .map(|i| i * seq / 16 + (i * 37) % (seq / 16))
        .collect();
    let ref_plan = spec
        .clone()
        .with_dtype(DType::F32)
        .with_recipe(Recipe::Exact)
        .plan()?;
    let (qf, kf, vf) = (
        Tensor::from(&q).to_f32(),
        Tensor::from(&k).to_f32(),
        Tensor::from(&v).to_f32(),
    );
    let t = Instant::now();
    let exact = reference(&ref_plan, &qf, &kf, &vf, Some(&rows));
    let ref_s = t.elapsed().as_secs_f64();

    // The sampled rows of an output [B, H, N, D] (any layout: Plan's strides find each row).
    let sample = |o: &[f32]| -> Vec<f32> {
        let mut out = Vec::with_capacity(batch * heads * rows.len() * head_dim);
        for b in 0..batch {
            for h in 0..heads {
                for &i in &rows {
                    out.extend_from_slice(&o[plan.q.row(b, h, i)..][..head_dim]);
                }
            }
        }
        out
    };
    let want = sample(&exact.o);

    println!("problem: B={batch} H={heads} N={seq} D={head_dim} f16 HND, q/k/v ~ N(0,1)");
    println!(
        "reference: exact attention in f64 on {} sampled rows per head ({ref_s:.2} s)",
        rows.len()
    );
    let flops = 4.0 * (batch * heads) as f64 * (seq as f64).powi(2) * head_dim as f64;
    let mut ran_on = None;
    println!(
        "{:<14} {:>10} {:>9}  {:>10} {:>9} {:>10}",
        "recipe", "time", "GFLOP/s", "cos", "rel-L1", "rmse"
    );
    for recipe in Recipe::ALL {
        let spec = spec.clone().with_recipe(recipe);
        dispatcher.run(&spec, &q, &k, &v)?; // warm-up: pipeline compilation, workspace allocation
        let t = Instant::now();
        let out = dispatcher.run(&spec, &q, &k, &v)?;
        let secs = t.elapsed().as_secs_f64();
        let acc = Accuracy::of(&sample(&out.o.to_f32()), &want);
        println!(
            "{:<14} {:>8.1}ms {:>9.1}  {:>10.6} {:>9.5} {:>10.3e}",
            recipe.name(),
            secs * 1e3,
            flops / secs / 1e9,
            acc.cos,
            acc.rel_l1,
            acc.rmse
        );
        ran_on.get_or_insert(out.backend);
    }
    println!("backend: {}", ran_on.unwrap_or_default());
    println!("(time: one call after a warm-up, including upload and download; accuracy: sampled rows vs exact f64)");
    Ok(())
}
