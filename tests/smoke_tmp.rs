mod common;
use common::*;
use tessera::*;
use tessera::backend::cpu::reference;
use tessera::metrics::Accuracy;

#[test]
fn smoke() {
    let Some(w) = wgpu() else { return };
    eprintln!("{}", w.describe());
    for recipe in Recipe::ALL {
        let spec = AttentionSpec::new(1, 2, 77, 64).with_kv(1, 100).with_recipe(recipe).with_lse(true).with_causal(true);
        let mut rng = Rng::new(1);
        let (q, k, v) = qkv(&spec, &mut rng, 0.0);
        let plan = spec.plan().unwrap();
        let r = reference(&plan, &q.view().to_f32(), &k.view().to_f32(), &v.view().to_f32(), None);
        let qz = w.quantize(&plan, q.view(), k.view(), v.view()).unwrap();
        let cq = CpuBackend.quantize(&plan, q.view(), k.view(), v.view()).unwrap();
        eprintln!("{}: kmean {} qdelta {} q {} k {} v {}", recipe.name(), qz.k_mean == cq.k_mean, qz.q_delta == cq.q_delta, qz.q == cq.q, qz.k == cq.k, qz.v == cq.v);
        let out = w.run(&plan, q.view(), k.view(), v.view()).unwrap();
        let acc = Accuracy::of(&out.o.to_f32(), &r.o);
        let lacc = Accuracy::of(out.lse.as_ref().unwrap(), &r.lse);
        eprintln!("{}: o {acc} | lse {lacc}", recipe.name());
    }
}
