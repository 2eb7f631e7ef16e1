"""Does the driver accept a tensor map whose strides are not increasing? (docs/design.md, 2:4
sparse P·V: a 5-D map over K's rows as (channel, e, t, jj, group) with row strides
(1, 4, 2, 16) would land key 4t + 2jj + e at shared row 8jj + 2t + e, the permutation the
sparse operand wants, for free.) Encodes that map and a monotonic control through libcuda with
ctypes (no kernel is run, so this checks acceptance, not the data the copy engine moves).
    python3 benches/gpu/tma_permute_check.py      (GPU machine; torch makes the context)"""
import ctypes

import torch

cuda = ctypes.CDLL("libcuda.so.1")
F16, SWIZZLE_128B, L2_128B = 6, 3, 2  # CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion
D, N = 128, 4096
k = torch.randn(N, D, device="cuda", dtype=torch.float16)
row = D * 2  # bytes per key


def encode(label, dims, strides, boxes):
    rank = len(dims)
    tmap = (ctypes.c_uint64 * 16)()  # CUtensorMap: 128 bytes, 64-byte aligned in the driver's header
    u64 = ctypes.c_uint64 * rank
    u32 = ctypes.c_uint32 * rank
    rc = cuda.cuTensorMapEncodeTiled(
        ctypes.byref(tmap), F16, rank, ctypes.c_void_p(k.data_ptr()), u64(*dims),
        (ctypes.c_uint64 * (rank - 1))(*strides), u32(*boxes), u32(*([1] * rank)),
        0, SWIZZLE_128B, L2_128B, 0)
    print(f"{label:44s} dims {dims} strides {strides} boxes {boxes}: CUresult {rc}{' (accepted)' if rc == 0 else ''}")
    return rc


# Box: 64 channels (128 bytes, the swizzle width) × 64 keys.
encode("control: keys in order, 2-D", [64, N], [row], [64, 64])
encode("control: (channel, e, t, jj, group) monotonic", [64, 2, 2, 4, N // 16], [row, 2 * row, 4 * row, 16 * row], [64, 2, 2, 4, 4])
encode("permuted: strides (1, 4, 2, 16) rows", [64, 2, 4, 2, N // 16], [row, 4 * row, 2 * row, 16 * row], [64, 2, 4, 2, 4])
