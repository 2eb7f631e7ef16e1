//! The public API: the host call, the dispatcher's choices, the zero-copy wgpu path used the
//! way a wgpu app would, and a typed error (never a panic) for every kind of bad input.

mod common;
use common::*;
use half::f16;
use tessera::backend::cpu::reference;
use tessera::backend::wgsl::{Buffers, WgslAttention};
use tessera::metrics::Accuracy;
use tessera::*;
use wgpu::util::DeviceExt;

fn f16s(n: usize, rng: &mut Rng) -> Vec<f16> {
    (0..n).map(|_| f16::from_f64(rng.normal())).collect()
}

#[test]
fn shape_errors_are_typed_and_say_what_to_fix() {
    let base = AttentionSpec::new(1, 4, 64, 64);
    type Case = (AttentionSpec, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            AttentionSpec {
                batch: 0,
                ..base.clone()
            },
            |e| matches!(e, Error::ZeroSized { what: "batch" }),
        ),
        (
            AttentionSpec {
                seq_kv: 0,
                ..base.clone()
            },
            |e| matches!(e, Error::ZeroSized { what: "seq_kv" }),
        ),
        (
            AttentionSpec {
                head_dim: 0,
                ..base.clone()
            },
            |e| matches!(e, Error::ZeroSized { .. }),
        ),
        (base.clone().with_kv(3, 64), |e| {
            matches!(
                e,
                Error::HeadsNotMultiple {
                    heads_q: 4,
                    heads_kv: 3
                }
            )
        }),
        (
            AttentionSpec {
                head_dim: 15,
                ..base.clone()
            },
            |e| matches!(e, Error::HeadDimOutOfRange { head_dim: 15, .. }),
        ),
        (
            AttentionSpec {
                head_dim: 257,
                ..base.clone()
            },
            |e| matches!(e, Error::HeadDimOutOfRange { head_dim: 257, .. }),
        ),
        (base.clone().with_sm_scale(f32::NAN), |e| {
            matches!(e, Error::BadScale(_))
        }),
        (base.clone().with_sm_scale(0.0), |e| {
            matches!(e, Error::BadScale(_))
        }),
        (base.clone().with_sm_scale(-1.0), |e| {
            matches!(e, Error::BadScale(_))
        }),
        (
            base.clone().with_recipe(Recipe::Nvfp4P { amax_p: 0.0 }),
            |e| matches!(e, Error::BadRecipeParam { name: "amax_p", .. }),
        ),
        (
            base.clone().with_recipe(Recipe::Nvfp4P {
                amax_p: f32::INFINITY,
            }),
            |e| matches!(e, Error::BadRecipeParam { .. }),
        ),
        (
            base.clone()
                .with_sparsity(Sparsity::BlockMask(BlockMask::new(vec![1u8; 3]))),
            |e| {
                matches!(
                    e,
                    Error::MaskShape {
                        expected: 4,
                        got: 3,
                        ..
                    }
                )
            },
        ),
        (AttentionSpec::new(1 << 16, 1 << 8, 1 << 10, 64), |e| {
            matches!(e, Error::TooLarge(_))
        }),
    ];
    for (spec, is_expected) in cases {
        let err = spec.plan().expect_err("bad spec accepted");
        assert!(is_expected(&err), "unexpected error {err:?}");
        assert!(err.to_string().len() > 30, "terse message: {err}");
    }
}

#[test]
fn input_errors_are_typed() {
    let spec = AttentionSpec::new(1, 2, 10, 16);
    let plan = spec.plan().unwrap();
    let mut rng = Rng::new(1);
    let good = f16s(plan.q_len, &mut rng);
    let short = f16s(plan.q_len - 1, &mut rng);
    let f32s = vec![0.5f32; plan.q_len];
    let d = Dispatcher::with_choice(Choice::Cpu);
    assert!(matches!(
        d.run(&spec, &short, &good, &good),
        Err(Error::WrongLength { tensor: "q", .. })
    ));
    assert!(matches!(
        d.run(&spec, &good, &good, &short),
        Err(Error::WrongLength { tensor: "v", .. })
    ));
    assert!(matches!(
        d.run(&spec, &good, &f32s, &good),
        Err(Error::WrongDtype { tensor: "k", .. })
    ));
    assert!(d.run(&spec, &good, &good, &good).is_ok());
}

#[test]
fn backend_names_parse() {
    assert_eq!(Choice::parse("cpu").unwrap(), Choice::Cpu);
    assert_eq!(Choice::parse(" WGPU ").unwrap(), Choice::Wgpu);
    assert_eq!(Choice::parse("").unwrap(), Choice::Auto);
    assert!(matches!(Choice::parse("tpu"), Err(Error::BadBackendEnv(_))));
    assert_eq!(Choice::parse("cuda").unwrap(), Choice::Cuda);
    assert_eq!(Choice::parse("nocuda").unwrap(), Choice::NoCuda);
    // Asking for CUDA where there is none is a typed error, not a panic.
    if tessera::backend::cuda::availability().is_err() {
        let e = Dispatcher::with_choice(Choice::Cuda)
            .backend()
            .err()
            .expect("CUDA reported present");
        assert!(
            matches!(
                e,
                Error::BackendUnavailable {
                    backend: "cuda",
                    ..
                }
            ),
            "{e}"
        );
    }
    // The no-adapter error tells the user how to get one.
    assert!(Error::NoAdapter("none".into())
        .to_string()
        .contains("mesa-vulkan-drivers"));
}

#[test]
fn random_specs_never_panic() {
    let mut rng = Rng::new(fresh_seed("random_specs"));
    let dims = [
        0usize,
        1,
        2,
        3,
        7,
        16,
        64,
        127,
        128,
        129,
        256,
        257,
        1 << 20,
        usize::MAX / 2,
    ];
    for _ in 0..20_000 {
        let mut pick = || dims[rng.below(dims.len())];
        let spec = AttentionSpec {
            batch: pick(),
            heads_q: pick(),
            heads_kv: pick(),
            seq_q: pick(),
            seq_kv: pick(),
            head_dim: pick(),
            ..AttentionSpec::new(1, 1, 1, 16)
        };
        let _ = spec.plan(); // Ok or a typed error; a panic fails the test
    }
}

#[test]
fn host_call_and_dispatcher_choices_agree() {
    let mut rng = Rng::new(fresh_seed("host_call"));
    let spec = AttentionSpec::new(1, 2, 100, 64)
        .with_kv(1, 150)
        .with_causal(true)
        .with_lse(true)
        .with_recipe(Recipe::Int8QkF16Pv);
    let plan = spec.plan().unwrap();
    let (q, k, v) = (
        f16s(plan.q_len, &mut rng),
        f16s(plan.kv_len, &mut rng),
        f16s(plan.kv_len, &mut rng),
    );
    let cpu = Dispatcher::with_choice(Choice::Cpu)
        .run(&spec, &q, &k, &v)
        .unwrap();
    assert!(cpu.backend.starts_with("cpu"));
    let best = tessera::attention(&spec, &q, &k, &v).unwrap();
    eprintln!("tessera::attention ran on {}", best.backend);
    // f16 outputs of the two: each within half an f16 ulp of the same f64 value, so at most one
    // ulp (2^-10 relative) apart, plus a rare P rounding flip (see tests/attention.rs).
    let acc = Accuracy::of(&best.o.to_f32(), &cpu.o.to_f32());
    assert!(acc.rel_l1 < 2e-3 && acc.non_finite_mismatch == 0, "{acc}");
    assert_eq!(best.lse.as_ref().unwrap().len(), plan.lse_len());
}

/// A wgpu app: its own device with default limits (16 KiB of workgroup memory), its own
/// buffers, the attention recorded into its own encoder between its own commands.
#[test]
fn zero_copy_api_runs_in_the_callers_encoder() {
    if wgpu().is_none() {
        return;
    }
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .expect("adapter");
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
            .expect("device");
    let attn = WgslAttention::new(&device, &queue);

    let mut rng = Rng::new(fresh_seed("zero_copy"));
    let spec = AttentionSpec::new(2, 4, 130, 128)
        .with_kv(2, 200)
        .with_layout(Layout::Nhd)
        .with_lse(true)
        .with_recipe(Recipe::Int8QkFp8Pv {
            granularity: QkGranularity::PerWarp,
        });
    let plan = spec.plan().unwrap();
    let (q, k, v) = (
        f16s(plan.q_len, &mut rng),
        f16s(plan.kv_len, &mut rng),
        f16s(plan.kv_len, &mut rng),
    );
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let buf = |data: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: data,
            usage,
        })
    };
    let (qb, kb, vb) = (
        buf(bytemuck::cast_slice(&q)),
        buf(bytemuck::cast_slice(&k)),
        buf(bytemuck::cast_slice(&v)),
    );
    let ob = buf(&vec![0xffu8; plan.q_len * 2]); // poisoned: f16 NaN
    let lb = buf(&vec![0xffu8; plan.lse_len() * 4]);
    let read_o = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: ob.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });

    let bufs = Buffers {
        q: &qb,
        k: &kb,
        v: &vb,
        o: &ob,
        lse: Some(&lb),
    };
    let mut after_first = 0;
    for round in 0..2 {
        let mut enc = device.create_command_encoder(&Default::default());
        attn.encode(&mut enc, &spec, &bufs).unwrap();
        enc.copy_buffer_to_buffer(&ob, 0, &read_o, 0, ob.size()); // the app's own command after ours
        queue.submit([enc.finish()]);
        read_o
            .slice(..)
            .map_async(wgpu::MapMode::Read, |r| r.unwrap());
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let o: Vec<f32> =
            bytemuck::cast_slice::<u8, f16>(&read_o.slice(..).get_mapped_range().unwrap())
                .iter()
                .map(|x| x.to_f32())
                .collect();
        read_o.unmap();
        let to32 = |x: &[f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let want = reference(&plan, &to32(&q), &to32(&k), &to32(&v), None);
        let acc = Accuracy::of(&o, &want.o);
        // FP8 P and V: the f16 output rounding plus rare P flips (tests/attention.rs).
        assert!(
            acc.rel_l1 < 2e-3 && acc.non_finite_mismatch == 0,
            "round {round}: {acc}"
        );
        let compiled = attn.compiled_pipelines();
        if round == 0 {
            assert!(compiled > 0);
            after_first = compiled;
        } else {
            assert_eq!(
                compiled, after_first,
                "the second call recompiled a pipeline"
            );
        }
    }

    // Bad buffers: too small, missing STORAGE, missing LSE.
    let small = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage,
        mapped_at_creation: false,
    });
    let no_storage = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: ob.size(),
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    let e = attn
        .encode(
            &mut enc,
            &spec,
            &Buffers {
                q: &small,
                ..Buffers {
                    q: &qb,
                    k: &kb,
                    v: &vb,
                    o: &ob,
                    lse: Some(&lb),
                }
            },
        )
        .unwrap_err();
    assert!(matches!(e, Error::BadBuffer { buffer: "q", .. }), "{e}");
    let e = attn
        .encode(
            &mut enc,
            &spec,
            &Buffers {
                q: &qb,
                k: &kb,
                v: &vb,
                o: &no_storage,
                lse: Some(&lb),
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::BadBuffer { buffer: "o", .. }) && e.to_string().contains("STORAGE"),
        "{e}"
    );
    let e = attn
        .encode(
            &mut enc,
            &spec,
            &Buffers {
                q: &qb,
                k: &kb,
                v: &vb,
                o: &ob,
                lse: None,
            },
        )
        .unwrap_err();
    assert!(matches!(e, Error::BadBuffer { buffer: "lse", .. }), "{e}");
}

/// The dispatcher's cross-check: every pair of backends present agrees on every recipe, with
/// bit-identical quantized operands.
#[test]
fn cross_check_reports_agreement() {
    let mut rng = Rng::new(fresh_seed("cross_check"));
    let d = Dispatcher::with_choice(Choice::Cpu);
    let mut pairs = vec![];
    if wgpu().is_some() {
        pairs.push((Choice::Cpu, Choice::Wgpu));
    }
    if cuda().is_some() {
        pairs.push((Choice::Cpu, Choice::Cuda));
        pairs.push((Choice::Wgpu, Choice::Cuda));
    }
    for (a, b) in pairs {
        for recipe in [
            Recipe::Exact,
            Recipe::Int8QkF16Pv,
            Recipe::Int8QkFp8Pv {
                granularity: QkGranularity::PerThread,
            },
            Recipe::Nvfp4,
            Recipe::nvfp4p(),
        ] {
            let spec = AttentionSpec::new(1, 4, 150, 96)
                .with_kv(2, 300)
                .with_causal(true)
                .with_recipe(recipe);
            let plan = spec.plan().unwrap();
            let (q, k, v) = (
                f16s(plan.q_len, &mut rng),
                f16s(plan.kv_len, &mut rng),
                f16s(plan.kv_len, &mut rng),
            );
            let r = d.cross_check(&spec, a, b, &q, &k, &v).unwrap();
            eprintln!("{r}");
            assert!(r.passed, "{r}");
            if !matches!(recipe, Recipe::Exact | Recipe::Nvfp4P { .. }) {
                assert!(r.bits_total > 0, "no quantized operands compared: {r}");
            }
        }
    }
}
