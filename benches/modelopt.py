#!/usr/bin/env python3
"""tessera against NVIDIA ModelOpt's attention kernel, mode by mode, on the same inputs (issue 8).

    python3 benches/modelopt.py <modelopt_compare binary> [--wheels DIR] [--quick]

ModelOpt is not installed on the GPU machine: its wheel travels in DIR (default .gpu/wheels;
`pip download --no-deps nvidia-modelopt==0.47.0 -d DIR` on a machine with network) and is
installed with `pip install --no-deps --target`. Its package __init__ imports much that the GPU
machine lacks, so the parents of `modelopt/torch/kernels/...` are registered as bare packages
and only the Triton kernel (`triton_fa.attention`) and its helpers are imported.

Per mode (dense, P → FP8, P → NVFP4, P and V → NVFP4, V → NVFP4, 2:4 sparse softmax, skip-softmax λ = 0.1),
per input kind (random normal; K with a per-channel bias; locally structured tokens) and causal
or not: error against an fp32 reference for ModelOpt and for tessera (CUDA, and WGSL on the same
GPU) side by side, the fraction of tiles skipped by each, and the speed ratio at
B=1 H=24 N=16384 D=128. Its output is in docs/benchmarks.md.
"""
import json, os, subprocess, sys, tempfile

import torch
import triton

args = sys.argv[1:]
binary = args[0]
wheels = args[args.index("--wheels") + 1] if "--wheels" in args else ".gpu/wheels"
quick = "--quick" in args

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wheels import modelopt_attention  # noqa: E402

mo = modelopt_attention(wheels)

MODES = {
    "dense": {},
    "p_fp8": {"p_qdq": "fp8"},
    "p_nvfp4": {"p_qdq": "nvfp4"},
    "pv_nvfp4": {"p_qdq": "nvfp4", "v_qdq": "nvfp4"},
    "v_nvfp4": {"v_qdq": "nvfp4"},
    "nm_2_4": {"sparsity_n": 2, "sparsity_m": 4},
    "skip_0.1": {"skip_softmax_threshold": 0.1, "measure_sparsity": True},
}


def modelopt(q, k, v, causal, mode, measure=True):
    """ModelOpt's varlen layout: [tokens, heads, D] (B = 1). `measure`: count skipped tiles
    (slows ModelOpt's kernel down: off when timing)."""
    n = q.shape[0]
    loc = torch.zeros(1, dtype=torch.int32, device="cuda")
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    opts = dict(MODES[mode])
    if not measure:
        opts.pop("measure_sparsity", None)
    return mo.attention(q, k, v, loc, lens, n, is_causal=causal, **opts)


def reference(q, k, v, causal):
    """fp32 attention, query blocks of 1024 (NHD in, NHD out)."""
    n, h, d = q.shape
    qf, kf, vf = (x.float().transpose(0, 1) for x in (q, k, v))  # [H, N, D]
    out = torch.empty_like(qf)
    for i in range(0, n, 1024):
        s = qf[:, i:i + 1024] @ kf.transpose(1, 2) / d ** 0.5
        if causal:
            rows = torch.arange(i, min(i + 1024, n), device="cuda")[:, None]
            s = s.masked_fill(torch.arange(n, device="cuda")[None, :] > rows, float("-inf"))
        out[:, i:i + 1024] = torch.softmax(s, dim=-1) @ vf
    return out.transpose(0, 1)


def errors(got, want):
    g, w = got.float().flatten(), want.float().flatten()
    cos = torch.nn.functional.cosine_similarity(g, w, dim=0).item()
    return cos, ((g - w).abs().sum() / w.abs().sum()).item()


def inputs(kind, h, n, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda: torch.randn(n, h, d, device="cuda", generator=g)
    q, k, v = r(), r(), r()
    if kind == "k_bias":
        k = k + 8.0 * torch.randn(1, h, d, device="cuda", generator=g)
    if kind == "structured":  # clusters of 64 tokens sharing a direction
        dirs = torch.randn(n // 64 + 1, h, d, device="cuda", generator=g)
        c = dirs[torch.arange(n, device="cuda") // 64]
        q, k = 1.2 * c + 0.3 * q, 1.2 * c + 0.3 * k
    return q.half().contiguous(), k.half().contiguous(), v.half().contiguous()


def tessera(q, k, v, causal, extra=()):
    with tempfile.TemporaryDirectory() as dir:
        for name, x in (("q", q), ("k", k), ("v", v)):
            x.cpu().numpy().tofile(os.path.join(dir, name + ".f16"))
        n, h, d = q.shape
        out = subprocess.run([binary, dir, str(h), str(n), str(d), "1" if causal else "0", *extra], capture_output=True, text=True)
        sys.stderr.write(out.stderr)
        runs = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
        outs = {}
        for r in runs:
            path = os.path.join(dir, f"out_{r['backend']}_{r['mode']}.f16")
            if os.path.exists(path):
                import numpy as np
                outs[(r["backend"], r["mode"])] = torch.from_numpy(np.fromfile(path, dtype=np.float16).reshape(n, h, d)).cuda()
        return runs, outs


print("| inputs | causal | mode | ModelOpt cos / rel-L1 | tessera CUDA | tessera WGSL | skipped ModelOpt / tessera |")
print("|---|---|---|---|---|---|---|")
h, n, d = (4, 2048, 128) if quick else (4, 4096, 128)
for kind in ("normal", "k_bias", "structured"):
    for causal in (False, True):
        q, k, v = inputs(kind, h, n, d, 1)
        want = reference(q, k, v, causal)
        runs, outs = tessera(q, k, v, causal)
        for mode in MODES:
            o = modelopt(q, k, v, causal, mode)
            mo_err = errors(o, want)
            mo_skip = (o._sparsity_skipped / max(o._sparsity_total, 1)) if hasattr(o, "_sparsity_total") else None
            cells = []
            for b in ("cuda", "wgpu"):
                t = outs.get((b, mode))
                cells.append("%.5f / %.4f" % errors(t, want) if t is not None else "-")
            ts = [r for r in runs if r["mode"] == mode and r["backend"] == "cuda"] or [r for r in runs if r["mode"] == mode]
            t_skip = ts[0]["skipped"] / max(ts[0]["visited"] + ts[0]["skipped"], 1) if ts and mode.startswith("skip") else None
            skip = f"{mo_skip:.1%} / {t_skip:.1%}" if mo_skip is not None and t_skip is not None else "-"
            print(f"| {kind} | {causal} | {mode} | {mo_err[0]:.5f} / {mo_err[1]:.4f} | {cells[0]} | {cells[1]} | {skip} |")

# Speed: H=24 N=16384 D=128 (random normal; structured for skip-softmax), ModelOpt vs tessera CUDA.
h, n, d = (24, 4096, 128) if quick else (24, 16384, 128)
print(f"\n| mode | inputs | ModelOpt ms | tessera CUDA ms | tessera / ModelOpt speed | TOPS tessera |\n|---|---|---|---|---|---|")
for kind in ("normal", "structured"):
    q, k, v = inputs(kind, h, n, d, 2)
    runs, _ = tessera(q, k, v, False, ("--no-wgpu", "--no-out"))
    for mode in MODES:
        if kind == "structured" and not mode.startswith("skip"):
            continue
        mo_ms = triton.testing.do_bench(lambda: modelopt(q, k, v, False, mode, measure=False), warmup=25, rep=200, return_mode="median")
        t = [r for r in runs if r["mode"] == mode and r["backend"] == "cuda" and r["ms"] is not None]
        if t:
            ms = t[0]["ms"]
            print(f"| {mode} | {kind} | {mo_ms:.2f} | {ms:.2f} | {mo_ms / ms:.2f}x | {4 * h * n * n * d / (ms * 1e-3) / 1e12:.0f} |")
        else:
            print(f"| {mode} | {kind} | {mo_ms:.2f} | - | - | - |")
