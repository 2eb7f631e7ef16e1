// mma_sparse_pv.cuh (attention_mma.cu includes it after the wgmma P·V steps; it uses that file's
// macros): 2:4 sparse P·V groundwork for sm_90a, probe-tested, not used by the kernel yet.

#if DP == 128
// ---- 2:4 sparse P·V: groundwork (probe-tested; the kernel does not use it yet) --------------
// The sparse wgmma (m64n128k32, P from registers) reads P compressed: per 4-key chunk its two
// kept values (slot 0 the lower key) and a nibble (key of slot 0 | key of slot 1 << 2). Thread
// t of a quad holds chunks t and 4 + t of each 32-key step (a0 / a1: chunk t, rows g / g + 8;
// a2 / a3: chunk 4 + t); the metadata register of lanes 0-1 (selector 0) or 2-3 (selector 1)
// holds the nibbles of chunks 0-3 or 4-7, row g in bits 0-15 and row g + 8 in 16-31, so one
// register serves both steps of a 64-key tile (docs/design.md, "2:4 sparse P·V").

// The nibble of a chunk whose nonzero values are the set bits of m: those keys (two at most),
// padded with the lowest free keys, increasing (equal indices are undefined).
#define NIBBLE_OF_MASK 0x498e4dcc49884444ull

// A chunk (values 0-1 in lo, 2-3 in hi, 16-bit each) → its two kept values, and their nibble.
__device__ __forceinline__ u32 compress_chunk(u32 lo, u32 hi, u32& nib) {
    u32 m = (u32)((lo & 0x7fffu) != 0u) | ((u32)((lo & 0x7fff0000u) != 0u) << 1) | ((u32)((hi & 0x7fffu) != 0u) << 2) |
            ((u32)((hi & 0x7fff0000u) != 0u) << 3);
    nib = (u32)(NIBBLE_OF_MASK >> (4u * m)) & 0xfu;
    return __byte_perm(lo, hi, 0x1010u + (nib & 3u) * 0x22u + (nib >> 2) * 0x2200u);  // values a, b
}

// One m-tile's P in the softmax's layout (p[n][e]: n-tile n, rows g / g + 8, keys 2t, 2t + 1),
// 2:4 sparse along the keys, → the sparse wgmma's A registers a[step] for the tile's two
// 32-key steps and the metadata register. A chunk's four keys sit on two lanes of the quad: an
// xor-1 exchange completes chunks (even lanes: chunks u, 4 + u; odd: 2 + u, 6 + u, u = t / 2),
// each lane compresses its two, and lane t takes chunks t, 4 + t from lane bitswap(t). The
// metadata words are reduce-scattered over the quad (lanes 0-1: step 0's, 2-3: step 1's).
// 21 shuffles per tile.
template <bool IS_BF16> __device__ __forceinline__ void sparse_p(const float (&p)[NT_S][4], u32 (&a)[2][4], u32& meta) {
    u32 lane = threadIdx.x % 32u, t = lane % 4u;
    bool odd = t & 1u, upper = t & 2u;
    u32 src = (lane & ~3u) | ((t & 1u) << 1) | (t >> 1);
    u32 part[2][2];  // [step][chunks 0-3, 4-7]: this lane's nibbles in place
#pragma unroll
    for (u32 kb = 0; kb < 2u; kb++) {
        u32 nibs = 0u;
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {
            u32 h[4];
#pragma unroll
            for (u32 j = 0; j < 4u; j++) h[j] = pack16<IS_BF16>(p[4u * kb + j][2u * i], p[4u * kb + j][2u * i + 1u]);
            u32 ra = __shfl_xor_sync(0xffffffffu, odd ? h[0] : h[1], 1);
            u32 rb = __shfl_xor_sync(0xffffffffu, odd ? h[2] : h[3], 1);
            u32 nx, ny;
            u32 cx = compress_chunk(odd ? ra : h[0], odd ? h[1] : ra, nx);
            u32 cy = compress_chunk(odd ? rb : h[2], odd ? h[3] : rb, ny);
            a[kb][i] = __shfl_sync(0xffffffffu, cx, src);       // chunk t, row g + 8i
            a[kb][2u + i] = __shfl_sync(0xffffffffu, cy, src);  // chunk 4 + t
            nibs |= (nx | (ny << 4)) << (8u * i);
        }
        nibs = __shfl_sync(0xffffffffu, nibs, src);
        part[kb][0] = ((nibs & 0xfu) << (4u * t)) | (((nibs >> 8) & 0xfu) << (16u + 4u * t));
        part[kb][1] = (((nibs >> 4) & 0xfu) << (4u * t)) | (((nibs >> 12) & 0xfu) << (16u + 4u * t));
    }
    u32 q[2];
#pragma unroll
    for (u32 w = 0; w < 2u; w++) q[w] = part[upper][w] | __shfl_xor_sync(0xffffffffu, part[!upper][w], 2);
    meta = (odd ? q[1] : q[0]) | __shfl_xor_sync(0xffffffffu, odd ? q[0] : q[1], 1);
}

// O (64 rows × 128 channels) (+)= P·V over 32 keys, P 2:4 sparse from registers (sparse_p),
// V as for wgmma_pv. SEL: which lanes' metadata this step reads (0: lanes 0-1, 1: lanes 2-3).
template <u32 SEL> __device__ __forceinline__ void wgmma_pv_sparse(float (&o)[NT_O][4], const u32 (&a)[4], u64 vd, u32 meta, u32 accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"
        "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 {" PV_ACC "}, {%64, %65, %66, %67}, %68, %69, %71, p, 1, 1, 1;\n}\n"
        : PV_OPS(o)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(vd), "r"(meta), "r"(accumulate), "n"(SEL));
}

// Test probe (tests/cuda.rs): O = P·V for one 64 × 64 P (f16, row-major, 2:4 sparse along the
// keys) and 64 × 128 V (f16, row-major) through sparse_p and two sparse wgmma; V is placed in
// shared memory as the kernel's TMA tiles are (two 64-channel panels, 128-byte swizzle). One
// warpgroup; out: 64 × 128 f32, row-major.
extern "C" __global__ void __launch_bounds__(128) probe_sparse_pv(const unsigned short* p16, const unsigned short* v16, float* out) {
    __shared__ __align__(1024) unsigned char vs[64u * 128u * 2u];
    u32 tid = threadIdx.x, warp = tid / 32u, lane = tid % 32u, g = lane / 4u, t = lane % 4u;
    for (u32 e = tid; e < 64u * 128u; e += 128u) {  // (key k, channel c)
        u32 k = e / 128u, c = e % 128u;
        *(unsigned short*)(vs + (c / 64u) * 8192u + k * 128u + ((((c % 64u) / 8u) ^ (k % 8u)) * 16u) + (c % 8u) * 2u) = v16[e];
    }
    fence_async_smem();
    __syncthreads();
    float p[NT_S][4];
#pragma unroll
    for (u32 n = 0; n < NT_S; n++)
#pragma unroll
        for (u32 e = 0; e < 4u; e++) p[n][e] = cvt_f16(p16[(16u * warp + g + 8u * (e / 2u)) * 64u + 8u * n + 2u * t + e % 2u]);
    u32 a[2][4], meta;
    sparse_p<false>(p, a, meta);
    float o[NT_O][4];
    Desc vd = v_desc(smem_addr(vs));
    wg_fence();
    wgmma_pv_sparse<0>(o, a[0], desc_at(vd, 0u), meta, 0u);
    wgmma_pv_sparse<1>(o, a[1], desc_at(vd, 32u * 128u), meta, 1u);
    wg_commit();
    wg_wait<0>();
    acc_fence(o);
#pragma unroll
    for (u32 n = 0; n < NT_O; n++)
#pragma unroll
        for (u32 e = 0; e < 4u; e++) out[(16u * warp + g + 8u * (e / 2u)) * 128u + 8u * n + 2u * t + e % 2u] = o[n][e];
}
#endif
