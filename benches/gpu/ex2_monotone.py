"""Is ex2.approx.ftz.f32 (the kernels' exponential) monotone on every f32 ≤ 0?

The tensor-core kernel takes an NVFP4 P block's max as the ex2 of the thread's largest score
(mma_p.cuh, p_nvfp4 under KPERM): the same bits as the largest of the block's p only if ex2
never decreases. Run on the GPU machine: python3 benches/gpu/ex2_monotone.py
"""
import torch
import triton
import triton.language as tl


@triton.jit
def ex2_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(bits_ptr + i, mask=i < n).to(tl.float32, bitcast=True)
    y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(out_ptr + i, y, mask=i < n)


def main():
    # Negative floats: bit patterns 0x80000000 (−0) up to 0xff800000 (−inf) run from 0 down to
    # −inf, so along increasing bits ex2 must never increase. Chunks overlap by one value.
    start, end, chunk = 0x80000000, 0xFF800000, 1 << 28
    prev_last, worst = None, 0
    for lo in range(start, end + 1, chunk):
        hi = min(lo + chunk, end + 1)
        bits = torch.arange(lo, hi, dtype=torch.int64, device="cuda").to(torch.int32)  # wraps to the same bits
        out = torch.empty(hi - lo, dtype=torch.float32, device="cuda")
        ex2_kernel[(triton.cdiv(hi - lo, 1024),)](bits, out, hi - lo, BLOCK=1024)
        if prev_last is not None and out[0].item() > prev_last:
            worst += 1
        ups = (out[1:] > out[:-1]).sum().item()
        worst += ups
        if ups:
            k = int(torch.nonzero(out[1:] > out[:-1])[0])
            print(f"increase at bits {lo + k:#x} → {lo + k + 1:#x}: {out[k].item()!r} → {out[k + 1].item()!r}")
        prev_last = out[-1].item()
    print(f"ex2.approx.ftz.f32 over all f32 in [-inf, -0]: {worst} increases (0 = monotone)")


main()
