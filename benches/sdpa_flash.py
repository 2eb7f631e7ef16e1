"""SDPA flash alone on the benchmark shapes (f16, B = 1), medians by triton.testing.do_bench:
the peer of issue 3's "faster than flash" line, quicker than peers.py."""
import torch, triton
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F
for (h, n, d) in [(24, 4096, 128), (24, 16384, 128), (24, 32768, 128), (48, 16384, 64)]:
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    for causal in [False, True]:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            fn(); torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        t = 4 * h * n * n * d * (0.5 if causal else 1.0) / (ms * 1e-3) / 1e12
        print(f"| flash | {h},{n},{d} | {causal} | {ms:.3f} | {t:.1f} |", flush=True)
