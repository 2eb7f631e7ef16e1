#!/usr/bin/env python3
"""PyTorch peers on tessera's benchmark shapes, and one table with tessera's ratio to each.

    python3 benches/peers.py [path/to/tessera-bench-binary] [--quick] [--flash-only] [-- bench args, e.g. --no-wgpu]

Runs SDPA (flash, cuDNN, efficient backends), FlexAttention (dense, and with the same
block-mask sparsity as tessera's masked rows), SageAttention 1 and NVIDIA ModelOpt's attention
kernel (dense, P → FP8, P → NVFP4; both from wheels in .gpu/wheels, see benches/wheels.py) on B=1 H=24 N in {4096, 16384, 32768} D=128 and
B=1 H=48 N=16384 D=64, causal and not; median of CUDA-event timings after warm-up
(triton.testing.do_bench). If a tessera bench binary is given, runs it with --json and prints
tessera's TOPS next to each peer's.
"""
import json, os, subprocess, sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import triton

own_args = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
bench_args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
quick = "--quick" in own_args
# --flash-only: SDPA flash as the one peer (issue 3's "faster than flash" line), no wheels, no flex.
flash_only = "--flash-only" in own_args
shapes = [(24, 4096, 128), (24, 16384, 128), (24, 32768, 128), (48, 16384, 64)]
if quick:
    shapes = shapes[:1]
# The bench binary's --shape H,N,D filters (after --) restrict the peers' shapes too.
only = [tuple(int(x) for x in bench_args[i + 1].split(",")) for i, a in enumerate(bench_args[:-1]) if a == "--shape"]
if only:
    shapes = [s for s in shapes if s in only] or only


def tops(h, n, d, causal, ms):
    return 4 * h * n * n * d * (0.5 if causal else 1.0) / (ms * 1e-3) / 1e12


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


peers = {}
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wheels import modelopt_attention, sageattn1  # noqa: E402

extra = {}  # name -> fn(q, k, v, causal) on [B, H, N, D] f16
try:
    sage = sageattn1()
    extra["sage1"] = lambda q, k, v, causal: sage(q, k, v, tensor_layout="HND", is_causal=causal)
except Exception as e:  # noqa: BLE001
    print(f"SageAttention 1 unavailable: {e}", file=sys.stderr)
try:
    mo = modelopt_attention()

    def modelopt(mode):
        def run(q, k, v, causal):
            # ModelOpt's varlen layout [tokens, heads, D] (B = 1).
            n = q.shape[2]
            qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
            loc = torch.zeros(1, dtype=torch.int32, device="cuda")
            lens = torch.tensor([n], dtype=torch.int32, device="cuda")
            return mo.attention(qt, kt, vt, loc, lens, n, is_causal=causal, **mode)
        return run

    extra["modelopt"] = modelopt({})
    extra["modelopt-fp8p"] = modelopt({"p_qdq": "fp8"})
    extra["modelopt-nvfp4p"] = modelopt({"p_qdq": "nvfp4"})
except Exception as e:  # noqa: BLE001
    print(f"ModelOpt unavailable: {e}", file=sys.stderr)
try:
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
    flex = torch.compile(flex_attention)
except Exception as e:  # noqa: BLE001
    flex = None
    print(f"FlexAttention unavailable: {e}", file=sys.stderr)

if flash_only:
    extra, flex = {}, None

for h, n, d in shapes:
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    for causal in (False, True):
        sdpa = (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION))
        for name, backend in sdpa[:1] if flash_only else sdpa:
            try:
                with sdpa_kernel(backend):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                peers[(name, h, n, d, causal, 0.0)] = ms
            except Exception as e:  # noqa: BLE001
                print(f"{name} failed at {h},{n},{d}: {e}", file=sys.stderr)
        for name, fn in extra.items():
            if name == "modelopt-nvfp4p" and n > 16384:
                continue  # ~0.6 s a call there
            try:
                # ModelOpt's kernel wants [tokens, heads, D] contiguous: transposed once, outside the timing.
                args = (q, k, v) if not name.startswith("modelopt") else tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
                ms = bench(lambda: fn(*args, causal))
                peers[(name, h, n, d, causal, 0.0)] = ms
            except Exception as e:  # noqa: BLE001
                print(f"{name} failed at {h},{n},{d}: {e}", file=sys.stderr)
        if flex is not None:
            for keep in (1.0, 0.5, 0.2):
                g = torch.Generator(device="cuda").manual_seed(7)
                blocks = torch.rand(h, (n + 127) // 128, (n + 127) // 128, generator=g, device="cuda") < keep

                def mod(b, hh, qi, kj):
                    ok = blocks[hh, qi // 128, kj // 128]
                    return (ok & (kj <= qi)) if causal else ok

                try:
                    bm = create_block_mask(mod, 1, h, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
                    ms = bench(lambda: flex(q, k, v, block_mask=bm))
                    peers[("flex", h, n, d, causal, 1.0 - keep)] = ms
                except Exception as e:  # noqa: BLE001
                    print(f"flex failed: {e}", file=sys.stderr)

RECIPES = ("exact", "int8qk-f16pv", "int8qk-fp8pv", "nvfp4", "nvfp4-p", "fp8-p")
ours = []
if own_args and not own_args[0].startswith("--"):
    out = subprocess.run([own_args[0], "--json"] + (["--quick"] if quick else []) + bench_args, capture_output=True, text=True)
    print(out.stdout)
    ours = [json.loads(l) for l in out.stderr.splitlines() if l.startswith("{")]

print("| shape H,N,D | causal | mask sparsity | peer | peer TOPS | " + " | ".join(f"{r} ratio" for r in RECIPES) + " |")
print("|---|---|---|---|---|" + "---|" * len(RECIPES))
for (name, h, n, d, causal, sp), ms in sorted(peers.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][4], kv[0][5], kv[0][0])):
    t = tops(h, n, d, causal, ms)
    cells = []
    for r in RECIPES:
        m = [o for o in ours if o["backend"] == "cuda" and o["recipe"] == r and (o["h"], o["n"], o["d"], o["causal"]) == (h, n, d, causal) and abs(o["sparsity"] - sp) < 0.05]
        cells.append(f"{m[0]['tops'] / t:.2f}x" if m else "-")
    print(f"| {h},{n},{d} | {causal} | {sp:.0%} | {name} | {t:.0f} | " + " | ".join(cells) + " |")
