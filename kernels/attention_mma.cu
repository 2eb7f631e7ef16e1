// attention_mma.cu: the tensor-core attention (mma.sync, sm_80+; wgmma on sm_90a), same
// numerics as attention.cu. The host prepends RECIPE, DP (head dim padded, a multiple of 32, at
// most 128; 64 or 128 with WGMMA), BF16 (1 when the 16-bit operands are bf16), SKIP
// (skip-softmax compiled in), NM and NM_N (N:M sparse softmax's M and N; NM = 0: off), VNV
// (V → NVFP4: V arrives as f16 values of its codes, the output is multiplied by v_g), KPERM
// (WGMMA with N:M or NVFP4 P: K and V rows permuted within each 64-key tile by the tensor maps
// so that a thread's scores are 16 consecutive keys, see key_in_tile) and the launch shape:
// WARPS, MT, QSMEM, MINB, WGMMA.
//
// mma.sync (WGMMA = 0): each warp owns MT m-tiles of 16 query rows (so every K/V fragment read
// from shared memory feeds MT mma); the block's WARPS·16·MT = 128 rows share 64-key tiles of K
// and V that cp.async stages in shared memory, two tiles deep. Q's A fragments live in
// registers, or (QSMEM) in shared memory, read with ldmatrix at each step, which frees
// registers; MINB is __launch_bounds__' blocks per SM.
// WGMMA = 1 (wgmma.cuh): warpgroups of 64 rows multiply from shared memory, P·V of one tile in
// flight behind QKᵀ of the next; the per-warp softmax code below is shared. A producer warp
// fills the K/V stages by tensor copies (TMA) and the warpgroups never meet at a block barrier.
//
// One tile, per warp:  S = Q·Kᵀ (int8 m16n8k32 into s32, or f16/bf16 m16n8k16 into f32)
//                      → scale, mask → online softmax in registers (rows g and g+8 per thread)
//                      → P in the recipe's format, packed straight into the A fragments of
//                        m16n8k16 → O += P·V.
// P's constant factor (Nvfp4P's global scale g; FP8 P's multiplier goes into the exponent and
// the row sums, P_FOLD) and the per-channel V scale are applied once at the end (the Nvfp4
// recipe's per-row factor is carried, see below). Register arrays are indexed by unrolled
// constants only.

#define BK 64u
#define BQT (16u * MT * WARPS)
#define CONSUMERS (32u * WARPS)  // the warps that own query rows
// WGMMA: plus one producer warp that issues the copies; PV_FP8 a whole producer warpgroup (one
// warp works), so that registers can move to the consumers (PV_FP8_CONSUMER_REGS).
#define THREADS (CONSUMERS + (PV_FP8 ? 128u : WGMMA ? 32u : 0u))
#define NEG_INF __int_as_float(0xff800000)
#define F32_MAX __int_as_float(0x7f7fffff)
// FP8 V, NVFP4 V and the Nvfp4 recipe's Q, K, V run through the f16 tensor cores from f16 copies of their
// codes' values (E4M3 and E2M1·E4M3 values are all f16-exact); the rest in the input dtype.
#define QK_BF16 (BF16 && RECIPE != R_NVFP4)
#define PV_BF16 (BF16 && RECIPE != R_INT8_FP8 && RECIPE != R_NVFP4 && !VNV)
#define INT8_QK (RECIPE == R_INT8_F16 || RECIPE == R_INT8_FP8)
// FP8 P (Int8QkFp8Pv: E4M3(448·p); Fp8P: E4M3(inv_g·p)): the multiplier is added in the
// exponent, p' = 2^(score − m + log2 mul) (P.p_log2), instead of one multiply per score; the
// row sums then hold mul·l, so the output needs no 1/mul and the LSE subtracts log2 mul.
// (p' differs from RN(mul·p) by about an ulp: E4M3 rounds it alike but for rare ties, far
// inside FP8 P's error; the CUDA-core kernel and WGSL multiply.)
#define P_FOLD (RECIPE == R_INT8_FP8 || RECIPE == R_FP8P)
// Int8QkFp8Pv on wgmma multiplies P·V on the FP8 tensor cores: P as E4M3 codes, V as the
// transposed FP8 codes (v_fp8_transpose). Hopper's FP8 MMA adds into its accumulator with
// fewer bits than f32 (about 22), so each tile's P·V gets a fresh accumulator that is then
// added to O in f32 (SageAttention 2's two-level accumulation): no error growth with length.
// Head dim 128 and two consumer warpgroups only: at 64 the two-blocks-per-SM kernel has 104
// registers per consumer for it and spills (measured 10.7 → 11.7 ms at H=48 N=16384; one
// block per SM: 13.9), and three warpgroups have 128 registers, no producer warpgroup to
// take more from (hopper_wgmma3 runs P·V in f16 from the codes' f16 copy instead).
#define PV_FP8 (WGMMA && RECIPE == R_INT8_FP8 && !VNV && DP == 128u && WARPS == 8u)
#define QK_BYTES (INT8_QK ? DP : 2u * DP)   // one Q/K row in shared memory and registers
#define V_BYTES (PV_FP8 ? DP : 2u * DP)     // (PV_FP8: the tile is DP channel rows of BK key bytes)
#define P_ELEM (PV_FP8 ? 1u : 2u)           // bytes per P value fed to P·V
#define PV_KEYS (PV_FP8 ? 32u : 16u)        // keys per P·V step (wgmma)
#define PV_STEPS (BK / PV_KEYS)
#define KSTEPS (QK_BYTES / 32u)            // 32 bytes of the head dim per QK mma
#define NT_S (BK / 8u)                     // n-tiles of S (8 keys each)
#ifndef KPERM
#define KPERM 0u
#endif
#ifndef PDIR  // Nvfp4P's P paths (mma_p.cuh, p_direct)
#define PDIR 2u
#endif
#if KPERM && !(WGMMA && (NM || RECIPE == R_NVFP4 || RECIPE == R_NVFP4P) && !PV_FP8)
#error "KPERM: the wgmma shape with N:M sparse softmax or NVFP4 P, and 16-bit P·V only"
#endif
#define NT_O (DP / 8u)                     // n-tiles of O (8 channels each)
// mma.sync: rows padded by 16 bytes, so the 8 rows one ldmatrix reads fall into 8 different bank
// groups. WGMMA: wgmma's core-matrix layout (wgmma.cuh), unpadded.
#define ROW_PAD (WGMMA ? 0u : 16u)
#define K_STRIDE (QK_BYTES + ROW_PAD)
#define V_STRIDE (V_BYTES + ROW_PAD)
#define K_TILE (BK * K_STRIDE)
#define V_TILE (BK * V_STRIDE)
// WGMMA: K and V come by the tensor copy engine (TMA) as swizzled tiles, 1024-byte aligned
// (wgmma.cuh); mma.sync: every tile is staged by cp.async. Q and K rows are cut into panels of
// PANEL bytes (128-byte swizzle; INT8 at head dim 64 has 64-byte rows: one panel, 64-byte
// swizzle); V rows are 128 or 256 bytes (128-byte swizzle).
#define PANEL (QK_BYTES < 128u ? QK_BYTES : 128u)
#define QK_SWIZZLE (PANEL == 128u ? SW_128B : SW_64B)
#define KSC_BYTES (WGMMA ? 1024u : 4u * BK)
#define STAGE_BYTES (K_TILE + V_TILE + KSC_BYTES)  // K, V, and the K scales of the tile
#define STAGES (WGMMA ? 3u : 2u)
#define Q_TILE (QSMEM ? BQT * K_STRIDE : 0u)     // shared memory: [Q tile] [STAGES stages] (WGMMA: [P tiles])

// The key (within its 64-key tile) of S's element e (0 or 1: the thread's two columns) in
// n-tile n of thread t. Natural order: 8n + 2t + e. KPERM: the tensor maps store key
// 16t' + 2n' + e' at row 8n' + 2t' + e' (TmaMap::permuted_rows), so thread t's 16 columns of a
// row are keys 16t .. 16t + 15 in key order: a 4- or 8-key N:M group and a 16-key NVFP4 P
// block are one thread's. V's rows are permuted alike, so P·V (a sum over keys) is unchanged.
__device__ __forceinline__ u32 key_in_tile(u32 n, u32 t, u32 e) {
    return KPERM ? 16u * t + 2u * n + e : 8u * n + 2u * t + e;
}

// Where the 16-bit operands live (elements): the caller's tensors, or f16 copies of codes.
struct Strides16 {
    u32 q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;
};

// A CUtensorMap (opaque, 128 bytes), passed by value as a __grid_constant__ parameter.
struct __align__(64) TmaMap {
    unsigned long long opaque[16];
};

#include "wgmma.cuh"

// ---- tile primitives -----------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16 bytes global → shared, zero-filled when `valid` is false (ragged tails, padded columns).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// D += A·B on one 16×8 tile; 32 bytes of the reduction axis per call in the QK forms.
__device__ __forceinline__ void mma_s8(i32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <bool IS_BF16> __device__ __forceinline__ void mma_16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (IS_BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the SFU (flushes results below 2^-126 to zero; ex2(−inf) = 0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

#include "mma_p.cuh"

#include "mma_staging.cuh"

#include "mma_nm.cuh"

// ---- one tile --------------------------------------------------------------------------------

#define QREG_STEPS (QSMEM ? 1u : KSTEPS)

// Q's A fragments for k-step ks of the warp's m-tiles: from registers, or ldmatrix (QSMEM).
__device__ __forceinline__ void q_fragments(const u32 (&qreg)[MT][QREG_STEPS][4], u32 qlane, u32 ks, u32 (&qa)[MT][4]) {
#pragma unroll
    for (u32 mt = 0; mt < MT; mt++) {
        if (QSMEM) {
            ldmatrix_x4(qa[mt], qlane + mt * 16u * K_STRIDE + ks * 32u);
        } else {
#pragma unroll
            for (u32 r = 0; r < 4u; r++) qa[mt][r] = qreg[mt][QSMEM ? 0u : ks][r];
        }
    }
}

// S = Q·Kᵀ for the warp's MT m-tiles: each ldmatrix.x4 gives the B fragments of two key n-tiles,
// used by all MT m-tiles. Int8 products are exact; their scales come after, and make the
// scaled score. Other products stay as they are: for Exact, Nvfp4P and Fp8P the softmax folds
// sm_scale·log2(e) into its FMA.
// One QK mma: INT8 into s32 accumulators, 16-bit into f32 (the overload picks by accumulator).
__device__ __forceinline__ void mma_qk(i32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_s8(d, a, b0, b1); }
__device__ __forceinline__ void mma_qk(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_16<QK_BF16>(d, a, b0, b1); }

// acc = Q·Kᵀ for the warp's MT m-tiles (products only, no scales).
#if WGMMA
// P (the warpgroup's 64 rows × BK keys, 16-bit or (PV_FP8) E4M3, K-major) and V for the
// PV_KEYS keys of P·V step kk (two 16-byte core matrices of P either way).
#define P_TILE (64u * BK * P_ELEM)
// Descriptor bases and the byte step of k-step ks / kk (desc_at).
__device__ __forceinline__ Desc p_desc(u32 pbase) { return wg_desc(pbase, 128u, 8u * BK * P_ELEM); }
__device__ __forceinline__ u32 p_step(u32 kk) { return kk * 256u; }
// Swizzled panels of [rows][PANEL B] (V: [keys][128 B]); a k-step is 32 bytes into a panel row,
// an 8-row group (SBO) 8 panel rows. PV_FP8's Vᵀ: [channels][64 key bytes], 64-byte swizzle,
// K-major like INT8's K at head dim 64.
__device__ __forceinline__ Desc v_desc(u32 vbase) {
    return PV_FP8 ? wg_desc(vbase, 16u, 8u * BK, SW_64B) : wg_desc(vbase, 64u * 128u, 1024u, SW_128B);
}
__device__ __forceinline__ u32 v_step(u32 kk) { return PV_FP8 ? kk * 32u : kk * 16u * 128u; }
__device__ __forceinline__ Desc qk_desc(u32 base) { return wg_desc(base, 16u, 8u * PANEL, QK_SWIZZLE); }
__device__ __forceinline__ u32 qk_step(u32 rows, u32 ks) {
    return (ks / (PANEL / 32u)) * rows * PANEL + (ks % (PANEL / 32u)) * 32u;
}

// This lane's byte offset in its P tile (its row of matrix r of store_p's x4 store).
// P_AT_HOISTED: the caller adds it to the tiles' address once, before the tile loop; computed
// per store, ptxas redid it on every tile, on each skip-softmax path (~8 instructions per tile;
// measured 1–3% faster for most recipes, twentieth session), but Int8QkF16Pv at D = 64 ran ~2%
// slower so, dense; with skip-softmax it is faster there too (its test's cost over dense +3.9 →
// +1.6%, twenty-second session).
#define P_AT_HOISTED (!(RECIPE == R_INT8_F16 && DP == 64u && !SKIP))
__device__ __forceinline__ u32 p_store_offset() {
    u32 lane = threadIdx.x % 32u, r = lane / 8u;
    u32 row = 16u * ((threadIdx.x / 32u) % 4u) + 8u * (r % 2u) + lane % 8u;
    return tile_offset(row, r / 2u, BK * P_ELEM);
}
// Where this lane stores P: `p_at` (P_AT_HOISTED: the loop's), else from the P tile here.
__device__ __forceinline__ u32 p_store_at(unsigned char* ptile, u32 p_at) {
    return P_AT_HOISTED ? p_at : smem_addr(ptile) + p_store_offset();
}

// This warp's P fragments into the warpgroup's P tile, one stmatrix per P·V step: register r
// of step kk is row g + 8(r%2) of 16-byte chunk 2kk + r/2 (16-bit P: keys 16kk + 8(r/2) + 2t,
// +1; FP8 P: see p_fragments), i.e. matrix r of the x4 store, whose row addresses lanes
// 8r..8r+7 give. Each 8 × 8 matrix is one core matrix (128 contiguous bytes): free of bank
// conflicts. `at`: this lane's address (p_store_at) for step 0.
__device__ __forceinline__ void store_p(const u32 (&pa)[BK / 16u][4], u32 at) {
#pragma unroll
    for (u32 kk = 0; kk < PV_STEPS; kk++)
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(at + kk * 256u), "r"(pa[kk][0]),
                     "r"(pa[kk][1]), "r"(pa[kk][2]), "r"(pa[kk][3])
                     : "memory");
}

// Zeros in this warp's 16 rows of the P tile (a tile skip-softmax drops): the bytes store_p
// writes (each lane's 16-byte row of each matrix), by a plain store. (A different instruction
// from store_p's, so that the kept path keeps its own stores, interleaved with the softmax, and
// the compiler does not join the two paths before one store of either P.)
__device__ __forceinline__ void store_p_zero(u32 at) {
#pragma unroll
    for (u32 kk = 0; kk < PV_STEPS; kk++) asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(at + kk * 256u), "r"(0u) : "memory");
}

// acc (+)= P·V of one tile, issued (the caller fences and commits). PV_FP8: acc is the tile's
// own accumulator, overwritten by the first step.
__device__ __forceinline__ void pv_steps(u32 pbase, u32 vbase, float (&acc)[NT_O][4]) {
    Desc pd = p_desc(pbase), vd = v_desc(vbase);
#pragma unroll
    for (u32 kk = 0; kk < PV_STEPS; kk++) {
        if (PV_FP8)
            wgmma_pv8(acc, desc_at(pd, p_step(kk)), desc_at(vd, v_step(kk)), kk > 0u);
        else
            wgmma_pv(acc, desc_at(pd, p_step(kk)), desc_at(vd, v_step(kk)));
    }
}

#include "mma_sparse_pv.cuh"

// Test probe (tests/cuda.rs): one box of a tensor map over 16-bit rows of 64 elements (128
// bytes, 128-byte swizzled) as the copy engine leaves it in shared memory, 64 rows, raw (still
// swizzled): does a 5-d map with non-monotonic row strides (tma.rs, `permuted_rows`) land
// key 16t + 2n + e of a 64-key tile at row 8n + 2t + e (key_in_tile)? `row0` is the tile's
// first row (any row). One warp.
extern "C" __global__ void __launch_bounds__(32) probe_tma_rows(const __grid_constant__ TmaMap map, unsigned short* out, u32 row0) {
    __shared__ __align__(1024) unsigned char box[64u * 128u];
    __shared__ __align__(8) unsigned long long bar;
    u32 b = smem_addr(&bar);
    if (threadIdx.x == 0u) {
        mbar_init(b, 1u);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncwarp();
    if (threadIdx.x == 0u) {
        mbar_arrive_expect(b, 64u * 128u);
        tma_load5(smem_addr(box), map, 0, 0, 0, 0, (i32)row0, b);
    }
    mbar_wait(b, 0u);
    for (u32 i = threadIdx.x; i < 64u * 64u; i += 32u) out[i] = ((const unsigned short*)box)[i];
}

#endif

// The previous tile's P·V, which WGMMA issues behind this tile's QK (unused by mma.sync).
struct PvBehind {
    bool on;
    u32 pbase, vbase;  // the warpgroup's P tile, and V, in shared memory
};

// (WGMMA: `pv_acc` takes the previous tile's P·V: O, or PV_FP8's tile accumulator.)
template <typename Acc>
__device__ __forceinline__ void qk_products(const u32 (&qreg)[MT][QREG_STEPS][4], u32 qlane, u32 kbase, Acc (&acc)[MT][NT_S][4],
                                            PvBehind pv, float (&pv_acc)[MT][NT_O][4]) {
#if WGMMA
    // The warpgroup's 64 rows × 64 keys in KSTEPS wgmma, 32 bytes of the head dim each
    // (2 core matrices along K); `qlane` is the warpgroup's Q tile here. Then the previous
    // tile's P·V goes in behind it, and only QK is waited for: the tensor cores run P·V while
    // the warps compute this tile's softmax (the caller waits for it before touching o).
    Desc qd = qk_desc(qlane), kd = qk_desc(kbase);
    wg_fence();
#pragma unroll
    for (u32 ks = 0; ks < KSTEPS; ks++) wgmma_qk(acc[0], desc_at(qd, qk_step(BQT, ks)), desc_at(kd, qk_step(BK, ks)), ks > 0u);
    wg_commit();
    // P·V gets its own group only when there is one, and each path waits for QK by its own
    // count: committing an empty P·V group after the join (as this did before) made ptxas emit
    // a dummy wgmma for that commit on both paths, a third group, so that the wait for "all but
    // one" also waited for P·V and the softmax never overlapped it (SASS: the dummy
    // HGMMA.64x8x16 before WARPGROUP.DEPBAR.LE gsb0, 0x1). Every path still waits before
    // reading an accumulator (else ptxas serializes every wgmma: C7514).
    if (pv.on) {
        wg_fence();
        pv_steps(pv.pbase, pv.vbase, pv_acc[0]);
        wg_commit();
        wg_wait<1>();
    } else {
        wg_wait<0>();
    }
    acc_fence(acc[0]);
    return;
#endif
    u32 lane = threadIdx.x % 32u;
    u32 key_lane = lane % 8u + (lane / 16u) * 8u, byte_lane = ((lane / 8u) & 1u) * 16u;
#pragma unroll
    for (u32 mt = 0; mt < MT; mt++)
#pragma unroll
        for (u32 n = 0; n < NT_S; n++)
#pragma unroll
            for (u32 e = 0; e < 4u; e++) acc[mt][n][e] = 0;
#pragma unroll
    for (u32 ks = 0; ks < KSTEPS; ks++) {
        u32 qa[MT][4];
        q_fragments(qreg, qlane, ks, qa);
#pragma unroll
        for (u32 np = 0; np < NT_S / 2u; np++) {
            u32 bfr[4];
            ldmatrix_x4(bfr, kbase + (np * 16u + key_lane) * K_STRIDE + ks * 32u + byte_lane);
#pragma unroll
            for (u32 mt = 0; mt < MT; mt++) {
                mma_qk(acc[mt][2u * np], qa[mt], bfr[0], bfr[1]);
                mma_qk(acc[mt][2u * np + 1u], qa[mt], bfr[2], bfr[3]);
            }
        }
    }
}

// INT8 with one σk per tile (Int8QkF16Pv: per 64 keys; Int8QkFp8Pv where K's groups are whole tiles).
__device__ __forceinline__ bool int8_one_scale(const Params& P) {
    return RECIPE == R_INT8_F16 || (P.k_ginter == 1u && P.k_gblock % BK == 0u);
}

// What qk_tile leaves in every score besides its value: Int8QkF16Pv (one σk per 64 keys) keeps
// the conversion's 1.5·2^23 (the integer is exact either way; order and ties, which the max and
// N:M use, are the integer's). The softmax subtracts it from the row max (exact) and folds
// −offset·scale into the exponent's shift (one FFMA per row instead of an FADD per score). That
// shift is rounded once at the magnitude of offset·scale: by at most half an ulp of
// 1.5·2^24·scale, i.e. ¾ of one integer unit of the score — the INT8 scores' own error is
// hundreds of units (≈ √D·127/2 from rounding the codes), so this is ~1e-3 of it
// (docs/numerics.md). Int8QkFp8Pv subtracts it per score: its default σk is per key, applied
// per score anyway, and its per-tile option is not worth a second path.
__device__ __forceinline__ float score_offset() { return RECIPE == R_INT8_F16 ? 12582912.0f : 0.0f; }

// Returns the factor the tile's scores still need (folded into the softmax's row scale): 1, or
// INT8's σk when one scale covers the whole tile.
__device__ __forceinline__ float qk_tile(const Params& P, const u32 (&qreg)[MT][QREG_STEPS][4], u32 qbase, u32 kbase,
                                         const float* kscale, float (&s)[MT][NT_S][4], PvBehind pv, float (&pv_acc)[MT][NT_O][4]) {
    u32 lane = threadIdx.x % 32u, t = lane % 4u;
    // Q from shared memory: matrices (rows 0-7, bytes 0-15), (rows 8-15, 0-15), (0-7, 16-31), (8-15, 16-31).
    u32 qlane = WGMMA ? qbase : qbase + (lane % 8u + ((lane / 8u) & 1u) * 8u) * K_STRIDE + (lane / 16u) * 16u;
    if (!INT8_QK) {
        qk_products(qreg, qlane, kbase, s, pv, pv_acc);
        return 1.0f;
    }
    i32 acc[MT][NT_S][4];
    qk_products(qreg, qlane, kbase, acc, pv, pv_acc);
    // acc·σk here; σq, per row, joins sm_scale's place in the softmax FMA. |acc| ≤ 127²·DP
    // < 2^22, so int → float is one integer add: the float 1.5·2^23 + acc, exactly, and a float
    // subtract of the offset, but where the softmax takes it off per row (score_offset). One σk
    // per tile (K groups of whole tiles; key 0's is valid, as visited tiles start inside the
    // sequence): the softmax multiplies by σq·σk instead, one multiply per row, not per score.
    // A zero σk means zero codes, so any factor gives the same zero scores.
    bool one_scale = int8_one_scale(P);
#pragma unroll
    for (u32 n = 0; n < NT_S; n++)
#pragma unroll
        for (u32 mt = 0; mt < MT; mt++)
#pragma unroll
            for (u32 e = 0; e < 4u; e++) s[mt][n][e] = __int_as_float(acc[mt][n][e] + 0x4B400000) - (12582912.0f - score_offset());
    // Per-key σk (Int8QkFp8Pv per thread) in its own uniform branch, which ptxas keeps as a
    // branch: selected per score, its 8 loads and 32 multiplies ran on every tile of the
    // per-warp default too (Int8QkFp8Pv's hot loop executed 654 → ~595 instructions, SASS).
    if (!one_scale) {
#pragma unroll
        for (u32 n = 0; n < NT_S; n++) {
            float2 k01 = *(const float2*)(kscale + n * 8u + 2u * t);
#pragma unroll
            for (u32 mt = 0; mt < MT; mt++)
#pragma unroll
                for (u32 e = 0; e < 4u; e++) s[mt][n][e] *= e % 2u ? k01.y : k01.x;
        }
    }
    return one_scale && kscale[0] > 0.0f ? kscale[0] : 1.0f;
}

// o *= oscale per row. Once the row maxima settle, oscale is 1 on most tiles: skip the
// multiplies then (the test is warp-uniform, so no divergence).
__device__ __forceinline__ void rescale(float (&o)[NT_O][4], const float (&oscale)[2]) {
    if (__any_sync(0xffffffffu, oscale[0] != 1.0f || oscale[1] != 1.0f)) {
#pragma unroll
        for (u32 n = 0; n < NT_O; n++)
#pragma unroll
            for (u32 e = 0; e < 4u; e++) o[n][e] *= oscale[e / 2u];
    }
}

#if WGMMA
// PV_FP8: o = (o + the finished tile's product)·oscale; otherwise o·oscale (rescale).
__device__ __forceinline__ void add_tile_pv(float (&o)[NT_O][4], const float (&tile)[NT_O][4], bool added, const float (&oscale)[2]) {
    if (!PV_FP8 || !added) {
        rescale(o, oscale);
        return;
    }
    if (__any_sync(0xffffffffu, oscale[0] != 1.0f || oscale[1] != 1.0f)) {
#pragma unroll
        for (u32 n = 0; n < NT_O; n++)
#pragma unroll
            for (u32 e = 0; e < 4u; e++) o[n][e] = (o[n][e] + tile[n][e]) * oscale[e / 2u];
    } else {
#pragma unroll
        for (u32 n = 0; n < NT_O; n++)
#pragma unroll
            for (u32 e = 0; e < 4u; e++) o[n][e] += tile[n][e];
    }
}
#endif

// O += P·V for the warp's MT m-tiles: ldmatrix.trans gives the B fragments of two channel n-tiles.
__device__ __forceinline__ void pv_tile(const u32 (&pa)[MT][BK / 16u][4], u32 vbase, float (&o)[MT][NT_O][4]) {
    u32 lane = threadIdx.x % 32u;
    u32 key_lane = lane % 8u + ((lane / 8u) & 1u) * 8u, chan_lane = (lane / 16u) * 8u;
#pragma unroll
    for (u32 kk = 0; kk < BK / 16u; kk++)
#pragma unroll
        for (u32 np = 0; np < NT_O / 2u; np++) {
            u32 bfr[4];
            ldmatrix_x4_trans(bfr, vbase + (kk * 16u + key_lane) * V_STRIDE + (np * 16u + chan_lane) * 2u);
#pragma unroll
            for (u32 mt = 0; mt < MT; mt++) {
                mma_16<PV_BF16>(o[mt][2u * np], pa[mt][kk], bfr[0], bfr[1]);
                mma_16<PV_BF16>(o[mt][2u * np + 1u], pa[mt][kk], bfr[2], bfr[3]);
            }
        }
}

#if WGMMA
// O += P·V of the warpgroup, P and V from shared memory (PV_FP8: through the tile accumulator).
__device__ __forceinline__ void pv_tile_wg(u32 pbase, u32 vbase, float (&o)[MT][NT_O][4], float (&tile)[MT][NT_O][4]) {
    wg_fence();
    pv_steps(pbase, vbase, PV_FP8 ? tile[0] : o[0]);
    wg_commit();
    wg_wait<0>();
    acc_fence(o[0]);
    if (PV_FP8) {
        acc_fence(tile[0]);
        const float one[2] = {1.0f, 1.0f};
        add_tile_pv(o[0], tile[0], true, one);
    }
}
#endif

// ---- one tile, per warp ---------------------------------------------------------------------

// Keys past the end and (causal) past the diagonal → −inf, on the tiles that hold such keys;
// then N:M selection.
__device__ __forceinline__ void mask_scores(const Params& P, float (&s)[MT][NT_S][4], const u32 (&rows)[MT][2], u32 row0, u32 kb,
                                            bool causal, i32 offset) {
    u32 warp = threadIdx.x / 32u, t = threadIdx.x % 4u;
    u32 key0 = kb * BK;
    if (key0 + BK > P.seq_kv || (causal && (i32)(key0 + BK - 1u) > (i32)row0 + offset)) {
#pragma unroll
        for (u32 mt = 0; mt < MT; mt++)
#pragma unroll
            for (u32 n = 0; n < NT_S; n++)
#pragma unroll
                for (u32 e = 0; e < 4u; e++) {
                    u32 key = key0 + key_in_tile(n, t, e % 2u);
                    if (key >= P.seq_kv || (causal && (i32)key > (i32)rows[mt][e / 2u] + offset)) s[mt][n][e] = NEG_INF;
                }
    }
#if NM
#pragma unroll
    for (u32 mt = 0; mt < MT; mt++) {
        // Rows r0..r0+15 see keys key0..key0+63 at distances r0 + offset − key0 − 63 up
        // to r0 + 15 + offset − key0; the recent window is distances [0, nm_recent).
        i32 r0 = (i32)(row0 + 16u * (warp * MT + mt)) + offset - (i32)key0;
        bool near = key0 < P.nm_sink || (r0 + 15 >= 0 && r0 - (i32)(BK - 1u) < (i32)P.nm_recent);
#if KPERM
        nm_select_perm(P, s[mt], rows[mt], key0, offset, near);
#else
        nm_select(P, s[mt], rows[mt], key0, offset, near);
#endif
    }
#endif
}

// SOFTMAX_TREES: the row max and sum as pairwise trees, dependency depth log2(2·NT_S) rather
// than chains of 2·NT_S from −∞ / 0 (ncu: 18% of stall samples on fixed-latency waits, nvfp4
// at D = 64), and P's proxy fence late in the tile loop. On where measured faster (Exact −1 to
// −7%, Nvfp4 −0.4 to −5%, Nvfp4P 0 to −3%; seventeenth session); Int8QkF16Pv ran 2–4% slower
// (at 12 warps ptxas then sat at 126 of 128 registers and reloaded from shared memory), FP8 P
// was not measured: those keep the chains and the early fence, i.e. their earlier code.
// (Int8QkF16Pv's skip build at D = 128 took the trees from the nineteenth to the twenty-first
// session, while its test waited on the row max: SKIP_VOTE_FIRST.)
#define SOFTMAX_TREES (RECIPE == R_EXACT || RECIPE == R_NVFP4 || RECIPE == R_NVFP4P)
// SKIP_VOTE_FIRST (skip-softmax): the test votes on each thread's own row max and branches
// before the quad's shuffles and the new running max, which then run on the kept path only
// (before, the branch waited on them). Skip test cost at 24,16384,128 / 48,16384,64 (twenty-
// first session, H200): exact +1.6 / +5.4% → +2.1 / +1.8%, nvfp4-p −0.8 / +1.1% → −1.2 / +0.1%,
// Int8QkF16Pv at D = 128 +5.5% → +4.4% (with the chains: the trees that once shortened its
// wait ran +5.9%). Not Int8QkF16Pv at D = 64: +3.8% → +8.2%; it keeps the earlier order.
#define SKIP_VOTE_FIRST (SKIP && !(RECIPE == R_INT8_F16 && DP == 64u))
// QUAD_FIRST_SHUFFLE (with SKIP_VOTE_FIRST): the quad max's first shuffle is issued before the
// vote, so its latency runs under the vote's; the second follows on the kept path. Exact at
// D = 128: skip test cost +2.3 → +0.4% (24,16384,128, twenty-third session, two runs). Not at
// D = 64 (+2.9 → +4.5%), nor for Int8QkF16Pv (+6%, twenty-second session).
#define QUAD_FIRST_SHUFFLE (SKIP_VOTE_FIRST && RECIPE == R_EXACT && DP == 128u)
// P_STORE_IN_SOFTMAX (wgmma): softmax_mtile stores P itself, on each of its paths (store_p_zero
// says why): skip test cost exact +3.4 → +1.7% (D = 128), +8.3 → +5.3% (D = 64). Not Nvfp4P,
// whose two P paths (direct or not) then each carry the stores: +3.9 → +5.5% at D = 128, +0.1 →
// +1.7% at D = 64; there P is stored after the join, unless one path is compiled in (PDIR).
#define P_STORE_IN_SOFTMAX (WGMMA && !(RECIPE == R_NVFP4P && PDIR == 2u))

// INT_ROW_MAX: Int8QkF16Pv's scores are 1.5·2^23 + integer (qk_tile: all in [2^23, 2^24)) or −∞
// (masks, N:M), whose bits order as signed integers the way the floats do; sm_90's three-input
// integer max (VIMNMX3; two IMNMX before sm_90) takes a row's 16 in 8 instructions, 3 deep,
// where the float chain takes 16, 9 deep. Skip builds only: the skip test waits on it (its cost
// over dense 5.18 → 5.09 ms, +4.4 → +2.5%, at 24,16384,128, twenty-second session); dense ones
// measured −0.9 to +0.9% with it, within the bench's noise, and keep the float chain.
#define INT_ROW_MAX (RECIPE == R_INT8_F16 && SKIP)

// The max (SUM: the sum) of a thread's values of row g + 8i of the tile. The max is the same in
// any order (fmaxf ignores a NaN unless both are); the sum's rounding order is the tree's.
template <bool SUM> __device__ __forceinline__ float row_reduce(const float (&s)[NT_S][4], u32 i) {
    if (!SUM && INT_ROW_MAX) {
        i32 v[2u * NT_S];
#pragma unroll
        for (u32 n = 0; n < NT_S; n++) {
            v[2u * n] = __float_as_int(s[n][2u * i]);
            v[2u * n + 1u] = __float_as_int(s[n][2u * i + 1u]);
        }
#pragma unroll
        for (u32 w = 1u; w < 2u * NT_S; w *= 3u)
#pragma unroll
            for (u32 k = 0; k + w < 2u * NT_S; k += 3u * w)
                v[k] = k + 2u * w < 2u * NT_S ? __vimax3_s32(v[k], v[k + w], v[k + 2u * w]) : max(v[k], v[k + w]);
        return __int_as_float(v[0]);
    }
    if (!SUM && !SOFTMAX_TREES) {  // (without trees the sum is softmax_mtile's chain)
        float r = NEG_INF;
#pragma unroll
        for (u32 n = 0; n < NT_S; n++) r = fmaxf(r, fmaxf(s[n][2u * i], s[n][2u * i + 1u]));
        return r;
    }
    float v[2u * NT_S];
#pragma unroll
    for (u32 n = 0; n < NT_S; n++) {
        v[2u * n] = s[n][2u * i];
        v[2u * n + 1u] = s[n][2u * i + 1u];
    }
#pragma unroll
    for (u32 w = 1u; w < 2u * NT_S; w *= 2u)
#pragma unroll
        for (u32 k = 0; k + w < 2u * NT_S; k += 2u * w) v[k] = SUM ? v[k] + v[k + w] : fmaxf(v[k], v[k + w]);
    return v[0];
}

// Online softmax of one m-tile in base 2: m is the running max of the scaled scores, p =
// 2^(score·scale − m), l sums the unquantised p. m starts at −FLT_MAX (the kernel's start; a
// tile a row sees nothing of leaves it there: its p are 2^−∞ = 0, alpha 2^0 = 1 on a zero o;
// its first visible score gives alpha = 2^(−FLT_MAX − m) = 0), and at +FLT_MAX on rows past
// the end of the sequence (their p are 2^(−FLT_MAX) = 0, nothing ever rescales). Leaves P's
// A fragments in `pa` and the factor o must be multiplied by before P·V is added in `oscale`.
// False when skip-softmax drops the tile (pa zero, oscale 1: nothing to rescale).
__device__ __forceinline__ bool softmax_mtile(const Params& P, float (&s)[NT_S][4], const u32 (&rows)[2], const float (&scale)[2],
                                              float (&m)[2], float (&l)[2], u32& visited, u32& skipped,
                                              u32 (&pa)[BK / 16u][4], float (&oscale)[2], unsigned char* ptile = nullptr,
                                              u32 p_at = 0u) {
    // The row's max over the quad (smax; exact: the integer) and scaled (tmax), then the new
    // running max m, o's factor alpha and the exponent's shift. With skip-softmax after the
    // test (SKIP_VOTE_FIRST), which needs only each thread's own max.
    float own[2], smax[2], tmax[2], alpha[2], shift[2], m_old[2] = {m[0], m[1]}, off = score_offset();
    float x1[2];  // (QUAD_FIRST_SHUFFLE: the first shuffle's value, before the test)
    auto row_max = [&](u32 i) {
        if (QUAD_FIRST_SHUFFLE) {
            float y = fmaxf(own[i], x1[i]);
            smax[i] = fmaxf(y, __shfl_xor_sync(0xffffffffu, y, 2)) - off;
        } else {
            smax[i] = quad_max(own[i]) - off;
        }
        tmax[i] = smax[i] * scale[i];
    };
    auto new_max = [&]() {
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {
            m[i] = fmaxf(m_old[i], tmax[i]);  // (never −∞: m starts finite)
            alpha[i] = ex2(m_old[i] - m[i]);
        }
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {  // −m, plus log2 of FP8 P's multiplier (P_FOLD)
            shift[i] = P_FOLD ? P.p_log2 - m[i] : -m[i];
            if (off != 0.0f) shift[i] = fmaf(-off, scale[i], shift[i]);  // (a constant test)
        }
    };
#pragma unroll
    for (u32 i = 0; i < 2u; i++) {
        own[i] = row_reduce<false>(s, i);  // the thread's max of row i (KPERM NVFP4 P: one block's)
        if (!SKIP_VOTE_FIRST) row_max(i);
    }
    // (Without SKIP_VOTE_FIRST the new running max comes before the test, under the vote's
    // latency: m does not move on a tile the test drops, as its max < m + log2 λ < m.)
    if (!SKIP_VOTE_FIRST) new_max();
    if (QUAD_FIRST_SHUFFLE)
#pragma unroll
        for (u32 i = 0; i < 2u; i++) x1[i] = __shfl_xor_sync(0xffffffffu, own[i], 1);
    if (SKIP) {
        // Skip-softmax, per m-tile (16 rows, one skip tile): drop the tile when every row
        // that sees a key of it has 2^(tile max − running max) < λ. m's starts make that one
        // compare per row: a row that has seen nothing (−FLT_MAX) needs any visible key, one
        // that sees nothing here (tile max −∞) never needs the tile, nor does a row past the
        // end (+FLT_MAX); a NaN tile max needs it (NaN stays visible).
        // The test reads each thread's own max, not the quad's: m_old (m before this tile) and
        // the scale are the row's, and the max commutes with the monotone (x − off)·scale −
        // m_old, so the warp's vote is the same without quad_max's shuffles.
        bool needs = false;
#pragma unroll
        for (u32 i = 0; i < 2u; i++) needs |= !((own[i] - off) * scale[i] - m_old[i] < P.skip_log2);
        // A tile some row needs is visited; else the second vote (does a row see it at all:
        // else it is neither visited nor skipped). Before the quad's max is made, the thread's
        // own max answers the same: the quad's rows are the thread's, and a NaN one voted `needs`.
        if (__any_sync(0xffffffffu, needs)) {
            visited++;
        } else {
            const float(&seen)[2] = SKIP_VOTE_FIRST ? own : tmax;
            bool sees = (rows[0] < P.seq_q && seen[0] != NEG_INF) || (rows[1] < P.seq_q && seen[1] != NEG_INF);
            if (__any_sync(0xffffffffu, sees)) {
                skipped++;
                oscale[0] = oscale[1] = 1.0f;  // (rescale skips it: no branch around o for wgmma)
#pragma unroll
                for (u32 kk = 0; kk < BK / 16u; kk++)
#pragma unroll
                    for (u32 r = 0; r < 4u; r++) pa[kk][r] = 0u;
#if P_STORE_IN_SOFTMAX
                store_p_zero(p_store_at(ptile, p_at));
#endif
                return false;
            }
        }
    }
    if (SKIP_VOTE_FIRST) {
#pragma unroll
        for (u32 i = 0; i < 2u; i++) row_max(i);
        new_max();
    }
    float sum_mul[2] = {1.0f, 1.0f}, row_mul[2] = {P.inv_g, P.inv_g};
    oscale[0] = alpha[0];
    oscale[1] = alpha[1];
    u32 fold[2] = {0u, 0u};
    if (RECIPE == R_NVFP4) {
        // P's factor f = ρ' (ρ' the least power of two ≥ ρ, ρ = 2^(tile max − m) the row's
        // largest p here) changes per row and tile; the exponent computes p' = p·2^E = p/ρ'
        // directly (the row sum takes p'·ρ'; a rounding of −m + E in the exponent moves p' by
        // ~1e-6, and a p' just above 1 still rounds to 1 in f16), p_nvfp4 rounds it to f16,
        // multiplies f into the blocks' operand scales (p_tile_fold: o stays in the running
        // max's units, rescaled only when a row max moves), and the output takes the 1/2688
        // (p_factor). A row whose ρ is below 2^-60 drops the tile (p' = 0, from l too: its
        // p < 2^-60 are far below half an ulp of l ≥ 1), which keeps the exponent finite.
        // ρ' = 2^c, c = ⌈log2 ρ⌉ from the exponent d = log2 ρ itself (the largest p is 2^d):
        // one rounding instead of an ex2, a power-of-two ceiling on its bits and the exponent
        // back to a float. (Where ex2.approx(d) lands exactly on a power of two for d within
        // ~2^-22 of an integer, 2^⌈d⌉ and the least power of two ≥ ex2(d) can differ by 2: the
        // lifted max then sits at 1/2 or just above 1 (rounded to 1) instead of the other end;
        // the CPU reference's own p differ from the kernel's by as much.) 2^c from c's bits:
        // c + 2^23 + 127 is an exact integer whose low bits are c + 127 (c ≥ −60 where used;
        // −∞ and NaN give f = 0).
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {
            float d = fmaf(smax[i], scale[i], -m[i]), c = ceilf(d);
            float f = u2f(f2u(c + (0x1p23f + 127.0f)) << 23);
            bool use = d >= -60.0f;
            shift[i] = use ? shift[i] - c : NEG_INF;
            sum_mul[i] = f;
            fold[i] = p_tile_fold(f);
        }
    }
    float sum[2] = {0.0f, 0.0f};  // (without SOFTMAX_TREES: the chain, as p are made)
#pragma unroll
    for (u32 n = 0; n < NT_S; n++)
#pragma unroll
        for (u32 e = 0; e < 4u; e++) {
            float p = ex2(fmaf(s[n][e], scale[e / 2u], shift[e / 2u]));
            if (!SOFTMAX_TREES) sum[e / 2u] += p;
            s[n][e] = p;
        }
#pragma unroll
    for (u32 i = 0; i < 2u; i++) l[i] = l[i] * alpha[i] + (SOFTMAX_TREES ? row_reduce<true>(s, i) : sum[i]) * sum_mul[i];
    // KPERM NVFP4 P: each row's largest p of the thread (a block), the same operation as its p.
    float pmax[2] = {0.0f, 0.0f};
    if (KPERM && (RECIPE == R_NVFP4 || RECIPE == R_NVFP4P))
#pragma unroll
        for (u32 i = 0; i < 2u; i++) pmax[i] = ex2(fmaf(own[i], scale[i], shift[i]));
    p_fragments(P, s, pa, row_mul, fold, pmax);
#if P_STORE_IN_SOFTMAX
    store_p(pa, p_store_at(ptile, p_at));  // (here, not after the skip branch's join: see store_p_zero)
#endif
    return true;
}

// ---- the kernel ----------------------------------------------------------------------------

// Registers: PV_FP8 holds a second O-sized accumulator and needs ~200 registers per consumer
// thread. Warps are spread over an SM's four sub-partitions of 16 Ki registers each, so 9 warps
// (3 on one) cap every thread at 168. PV_FP8 runs 12 warps instead and moves registers with
// setmaxnreg (all warps of a warpgroup together): the producer warpgroup gives up to 40, the
// consumers take 232 (per sub-partition 2 · 232 + 40 ≤ 512 per lane), as CUTLASS's
// warp-specialized kernels do.
// The consumers can only take what the producers give back: from the launch's R registers
// (168 for one block per SM, 80 for two), 8 (C − R) ≤ 4 (R − P); with two blocks C = 104,
// P = 32. (An inc the pool cannot cover waits forever.)
#define PV_FP8_CONSUMER_REGS (MINB == 1u ? 232 : 104)
#define PV_FP8_PRODUCER_REGS (MINB == 1u ? 40 : 32)
extern "C" __global__ void __launch_bounds__(THREADS, MINB) attention_mma(Params P, const void* q_in, const void* k_in, const void* v_in,
                                                                    Strides16 S16, const u32* ws, const u32* mask,
                                                                    unsigned short* o_out, float* lse_out,
                                                                    const __grid_constant__ TmaMap kmap,
                                                                    const __grid_constant__ TmaMap vmap) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
#if WGMMA
    // Swizzled tiles need 1024-byte alignment (the host adds 1024 bytes of room).
    unsigned char* smem = smem_raw + (1024u - smem_addr(smem_raw) % 1024u) % 1024u;
    __shared__ __align__(8) unsigned long long bar_mem[2u * STAGES];
    u32 full = smem_addr(bar_mem), empty = full + 8u * STAGES;  // per stage (produce())
    if (threadIdx.x == 0u) {
        for (u32 i = 0; i < STAGES; i++) {
            mbar_init(full + 8u * i, 32u);
            mbar_init(empty + 8u * i, WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (p_direct(P)) direct_table_fill(direct_inv_g(P));
    __syncthreads();  // the only barrier of the whole block: the producer never joins another
#else
    unsigned char* smem = smem_raw;
    if (p_direct(P)) {  // (uniform)
        direct_table_fill(direct_inv_g(P));
        __syncthreads();
    }
#endif
    // The warp index through a shuffle: the compiler then knows it is warp-uniform, so addresses
    // derived from it (the wgmma descriptors) live in uniform registers.
    u32 tid = threadIdx.x, warp = __shfl_sync(0xffffffffu, tid / 32u, 0), lane = tid % 32u;
    u32 g = lane / 4u, t = lane % 4u;
    // The grid: (query blocks, b·h), or (FLAG_HEAVY_FIRST, causal) (b·h, query blocks) walked
    // from the last query block, the heaviest, so that the grid ends on light blocks.
    // (Not with FP8 P·V: there the remap's registers slowed the whole kernel by 6%, measured on
    // the H100; the host never sets the flag for it.)
    bool heavy_first = !PV_FP8 && (P.flags & FLAG_HEAVY_FIRST) != 0u;
    u32 bh = heavy_first ? blockIdx.x : blockIdx.y, b = bh / P.heads_q, h = bh % P.heads_q;
    u32 hkv = h / P.group, bkv = b * P.heads_kv + hkv;
    u32 row0 = (heavy_first ? gridDim.y - 1u - blockIdx.y : blockIdx.x) * BQT;
    bool causal = (P.flags & FLAG_CAUSAL) != 0u;
    i32 offset = (i32)P.seq_kv - (i32)P.seq_q;
    u32 last_row = min(row0 + BQT, P.seq_q) - 1u;
    i32 last_visible = causal ? (i32)last_row + offset : (i32)P.seq_kv;

    Src src;
    if (INT8_QK) {
        src.k = (const char*)(ws + P.off_kcodes) + (size_t)bkv * P.seq_kv * DP;
        src.k_row = DP;
    } else {
        src.k = (const char*)k_in + 2ull * ((size_t)b * S16.k_sb + (size_t)hkv * S16.k_sh);
        src.k_row = 2u * S16.k_st;
    }
    src.v = (const char*)v_in + 2ull * ((size_t)b * S16.v_sb + (size_t)hkv * S16.v_sh);
    src.v_row = 2u * S16.v_st;

#if WGMMA
    if (warp >= WARPS) {
#if PV_FP8
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PV_FP8_PRODUCER_REGS));
#endif
        if (warp == WARPS) produce(P, kmap, vmap, ws, mask, smem + Q_TILE, full, empty, bh, row0, last_visible, hkv, b, bkv, S16, src);
        return;
    }
#if PV_FP8
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(PV_FP8_CONSUMER_REGS));
#endif
#endif

    // This thread's rows (g and g+8 of each m-tile), and Q as A fragments from global memory
    // (or, QSMEM, the whole Q tile copied to shared memory with the first K/V tile).
    u32 rows[MT][2];
    u32 qreg[MT][QREG_STEPS][4];
    float qscale[MT][2];
    // This warp's Q rows in shared memory; WGMMA: its warpgroup's 64 rows.
    u32 qbase = smem_addr(smem) + (WGMMA ? (warp / 4u) * 64u : warp * MT * 16u) * (WGMMA ? PANEL : K_STRIDE);
    if (QSMEM) {
        const u32 chunks = QK_BYTES / 16u;
        u32 valid = INT8_QK ? chunks : (P.head_dim * 2u) / 16u;
        for (u32 i = 0; i < BQT * chunks / CONSUMERS; i++) {  // BQT · chunks is a multiple of CONSUMERS
            u32 e = tid + i * CONSUMERS;
#if WGMMA
            u32 r, c, at = q_slot(e, chunks, r, c), row = row0 + r;
#else
            u32 r, c, at = stage_slot(e, chunks, K_STRIDE, r, c), row = row0 + r;
#endif
            bool ok = row < P.seq_q && c < valid;
            const char* q = INT8_QK ? (const char*)(ws + P.off_qcodes) + ((size_t)bh * P.seq_q + row) * DP
                                    : (const char*)q_in + 2ull * ((size_t)b * S16.q_sb + (size_t)h * S16.q_sh + (size_t)row * S16.q_st);
            cp_async16(smem_addr(smem) + at, ok ? q + c * 16u : (const char*)ws, ok);
        }
    }
#pragma unroll
    for (u32 mt = 0; mt < MT; mt++)
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {
            u32 row = row0 + 16u * (warp * MT + mt) + g + 8u * i;
            rows[mt][i] = row;
            bool in = row < P.seq_q;
            const char* qrow;
            u32 valid_bytes;
            qscale[mt][i] = 1.0f;
            if (INT8_QK) {
                qrow = (const char*)(ws + P.off_qcodes) + ((size_t)bh * P.seq_q + (in ? row : 0u)) * DP;
                valid_bytes = DP;
                u32 ngq = group_count(P.seq_q, P.q_gblock, P.q_ginter);
                qscale[mt][i] = in ? u2f(ws[P.off_qscales + bh * ngq + group_of(row, P.q_gblock, P.q_ginter)]) : 0.0f;
            } else {
                qrow = (const char*)q_in + 2ull * ((size_t)b * S16.q_sb + (size_t)h * S16.q_sh + (size_t)(in ? row : 0u) * S16.q_st);
                valid_bytes = 2u * P.head_dim;
            }
#pragma unroll
            for (u32 ks = 0; ks < QREG_STEPS; ks++)
#pragma unroll
                for (u32 half = 0; half < 2u; half++) {
                    u32 byte = ks * 32u + half * 16u + 4u * t;
                    qreg[mt][ks][i + 2u * half] = (!QSMEM && in && byte < valid_bytes) ? *(const u32*)(qrow + byte) : 0u;
                }
        }

    // What the softmax multiplies a tile's scores by: sm_scale·log2(e) (Exact, Nvfp4P, Fp8P), σq of
    // the row (Int8: sm_scale·log2(e) is in Q's codes; a zero σq means a zero row, whose scores
    // are all 0 anyway), 1 (Nvfp4: in Q's codes too).
    float row_scale[MT][2];
#pragma unroll
    for (u32 mt = 0; mt < MT; mt++)
#pragma unroll
        for (u32 i = 0; i < 2u; i++)
            row_scale[mt][i] = INT8_QK ? (qscale[mt][i] > 0.0f ? qscale[mt][i] : 1.0f) : (RECIPE == R_NVFP4 ? 1.0f : P.score_scale);

    float o[MT][NT_O][4];
    float m[MT][2], l[MT][2];
    u32 tiles_visited[MT], tiles_skipped[MT];  // skip-softmax counters per m-tile (= skip tile)
#pragma unroll
    for (u32 mt = 0; mt < MT; mt++) {
#pragma unroll
        for (u32 n = 0; n < NT_O; n++)
#pragma unroll
            for (u32 e = 0; e < 4u; e++) o[mt][n][e] = 0.0f;
        // (softmax_mtile: where m starts, and why)
        m[mt][0] = rows[mt][0] < P.seq_q ? -F32_MAX : F32_MAX;
        m[mt][1] = rows[mt][1] < P.seq_q ? -F32_MAX : F32_MAX;
        l[mt][0] = l[mt][1] = 0.0f;
        tiles_visited[mt] = tiles_skipped[mt] = 0u;
    }

    unsigned char* stages = smem + Q_TILE;
    u32 pa[MT][BK / 16u][4];
    float s[MT][NT_S][4];
    u32 kb = next_tile(P, mask, bh, row0, 0u, last_visible);
#if WGMMA
    // Consumers. Tile j: wait for stage j % STAGES (produce()), QK(j) on the tensor cores with
    // P(j−1)·V(j−1) behind it while the softmax of tile j runs; after P(j−1)·V(j−1) is done,
    // stage j−1 goes back to the producer. The two warpgroups only meet at the producer's
    // stages: within one, each warp's proxy fence makes its own rows of P(j−1) visible to the
    // wgmma. (P(j) is written to the P tile that P(j−2)·V(j−2) read: done, since the writing
    // warp waited for that wgmma in tile j−1.)
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    named_barrier<1, CONSUMERS>();  // Q's tile is in
    // Skip-softmax: a warp that drops tile j (its 16 rows: one skip tile) writes zeros as its
    // P(j), and P(j)·V(j) is issued as for a kept tile: no barrier to learn whether the other
    // warps kept it (the tensor cores have room; the warps' cycles are what skipping saves).
    PvBehind pv = {false, 0u, 0u};
    // PV_FP8: each tile's P·V into its own accumulator, added to o once done (PV_FP8's comment).
    float otile[MT][NT_O][4];
#pragma unroll
    for (u32 n = 0; n < NT_O; n++)
#pragma unroll
        for (u32 e = 0; e < 4u; e++) otile[0][n][e] = 0.0f;
    float(&pv_acc)[MT][NT_O][4] = PV_FP8 ? otile : o;
    unsigned char* ptiles = stages + STAGES * STAGE_BYTES + (warp / 4u) * P_TILE;
    u32 p_lane = P_AT_HOISTED ? smem_addr(ptiles) + p_store_offset() : 0u;  // (this lane's P stores: tile 0)
    for (u32 j = 0; kb < P.k_blocks; j++) {
        unsigned char* st = stages + (j % STAGES) * STAGE_BYTES;
        u32 kn = next_tile(P, mask, bh, row0, kb + 1u, last_visible);
        mbar_wait(full + 8u * (j % STAGES), (j / STAGES) % 2u);
        // P(j−1) for its wgmma: each warp's 16 rows of the P tile are its own stores, and the
        // wgmma reads a warp's rows of A on that warp's issue, after that warp's proxy fence
        // (FlashAttention 3 relies on the same: a __syncwarp, no warpgroup barrier). A
        // warpgroup barrier had cost ~5% of the warps' cycles in stalls (ncu, nvfp4 at D = 64).
        __syncwarp();
        float ks = qk_tile(P, qreg, qbase, smem_addr(st), (const float*)(st + K_TILE + V_TILE), s, pv, pv_acc);
        mask_scores(P, s, rows, row0, kb, causal, offset);
        float oscale[2], sc[2] = {row_scale[0][0] * ks, row_scale[0][1] * ks};
        unsigned char* ptile = ptiles + (j % 2u) * (WARPS / 4u) * P_TILE;
        u32 p_at = p_lane + (j % 2u) * (WARPS / 4u) * P_TILE;
        softmax_mtile(P, s[0], rows[0], sc, m[0], l[0], tiles_visited[0], tiles_skipped[0], pa[0], oscale, ptile, p_at);
        if (!P_STORE_IN_SOFTMAX) store_p(pa[0], p_store_at(ptile, p_at));
        // The fence makes P(j) visible to the wgmma that reads it next tile. SOFTMAX_TREES
        // places it after the wait and the rescale, so that the stores have landed by the time
        // it waits for them (right after them it had stalled the warp: ~4.7% of stall samples,
        // nvfp4 at D = 64).
        if (!SOFTMAX_TREES) fence_async_smem();
        wg_wait<0>();  // P(j−1)·V(j−1) (if any) is in pv_acc
        acc_fence(pv_acc[0]);
        if (j > 0u && lane == 0u) mbar_arrive(empty + 8u * ((j - 1u) % STAGES));
        add_tile_pv(o[0], otile[0], pv.on, oscale);
        if (SOFTMAX_TREES) fence_async_smem();
        pv = {true, smem_addr(ptile), smem_addr(st) + K_TILE};
        kb = kn;
    }
    if (pv.on) {
        __syncwarp();
        pv_tile_wg(pv.pbase, pv.vbase, o, otile);
    }
#else
    // Two stages: the next visited tile is copied into the other stage while this one computes.
    u32 stage = 0u;
    if (kb < P.k_blocks) {
        stage_k(P, src, ws, stages, kb, bkv);
        stage_v(P, src, stages, kb);
    }
    cp_async_commit();
    PvBehind none = {false, 0u, 0u};
    while (kb < P.k_blocks) {
        u32 kn = next_tile(P, mask, bh, row0, kb + 1u, last_visible);
        if (kn < P.k_blocks) {
            stage_k(P, src, ws, stages + (stage ^ 1u) * STAGE_BYTES, kn, bkv);
            stage_v(P, src, stages + (stage ^ 1u) * STAGE_BYTES, kn);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        unsigned char* st = stages + stage * STAGE_BYTES;
        float ks = qk_tile(P, qreg, qbase, smem_addr(st), (const float*)(st + K_TILE + V_TILE), s, none, o);
        mask_scores(P, s, rows, row0, kb, causal, offset);
        u32 kept = 0u;  // m-tiles not dropped by skip-softmax (warp-uniform)
#pragma unroll
        for (u32 mt = 0; mt < MT; mt++) {
            float oscale[2], sc[2] = {row_scale[mt][0] * ks, row_scale[mt][1] * ks};
            if (softmax_mtile(P, s[mt], rows[mt], sc, m[mt], l[mt], tiles_visited[mt], tiles_skipped[mt], pa[mt], oscale)) {
                rescale(o[mt], oscale);
                kept++;
            }
        }
        if (kept > 0u) pv_tile(pa, smem_addr(st) + K_TILE, o);
        __syncthreads();  // this stage is refilled two tiles from now
        kb = kn;
        stage ^= 1u;
    }
#endif

    if (SKIP && lane == 0u) {
        u32 q_tiles = (P.seq_q + 15u) / 16u;
#pragma unroll
        for (u32 mt = 0; mt < MT; mt++) {
            u32 qt = (row0 + 16u * (warp * MT + mt)) / 16u;
            if (qt < q_tiles) {
                u32* slot = (u32*)ws + P.off_tiles + 2u * (bh * q_tiles + qt);  // the workspace is writable
                slot[0] = tiles_visited[mt];
                slot[1] = tiles_skipped[mt];
            }
        }
    }

    // Normalise and write this thread's rows.
    float factor = p_factor(P);
#pragma unroll
    for (u32 mt = 0; mt < MT; mt++)
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {
            u32 row = rows[mt][i];
            float lsum = quad_sum(l[mt][i]);
            if (row >= P.seq_q) continue;
            unsigned short* orow = o_out + (size_t)b * P.q_sb + (size_t)h * P.q_sh + (size_t)row * P.q_st;
#pragma unroll
            for (u32 n = 0; n < NT_O; n++) {
                u32 c = n * 8u + 2u * t;
                if (c >= P.head_dim) continue;
                float x0 = 0.0f, x1 = 0.0f;
                if (lsum != 0.0f) {
                    x0 = o[mt][n][2u * i] / lsum;
                    x1 = o[mt][n][2u * i + 1u] / lsum;
                    if (RECIPE == R_NVFP4 || RECIPE == R_NVFP4P) {
                        x0 *= factor;
                        x1 *= factor;
                    }
                    if (RECIPE == R_INT8_FP8) {
                        x0 *= u2f(ws[P.off_vscales + bkv * DP + c]);
                        x1 *= u2f(ws[P.off_vscales + bkv * DP + c + 1u]);
                    }
                    if (VNV) {
                        x0 *= P.v_g;
                        x1 *= P.v_g;
                    }
                }
                *(u32*)(orow + c) = pack16<BF16>(x0, x1);
            }
            if (t == 0u && (P.flags & FLAG_LSE)) {
                float lse = f32_neg_inf();
                if (lsum != 0.0f) {
                    float shift = (P.flags & FLAG_SMOOTH) ? u2f(ws[P.off_qdelta + bh * P.seq_q + row]) : 0.0f;
                    if (P_FOLD) shift -= P.p_log2;  // the row sum is mul·l
                    lse = (m[mt][i] + log2f(lsum) + shift) * 0.6931471805599453f;
                }
                lse_out[bh * P.seq_q + row] = lse;
            }
        }
}

// FP8 V codes → f16 rows [bkv][seq_kv][DP] (exact: every E4M3 value is an f16), so P·V runs on
// the 16-bit tensor cores with the codes' values; the per-channel scale is applied at the end.
// A thread converts 8 values: two code words in, 16 bytes out (DP is a multiple of 8).
extern "C" __global__ void v_fp8_to_f16(Params P, const u32* ws, unsigned short* v16) {
    u32 id = blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= P.batch * P.heads_kv * P.seq_kv * (DP / 8u)) return;
    u32 code[2] = {ws[P.off_vcodes + 2u * id], ws[P.off_vcodes + 2u * id + 1u]}, half[4];
#pragma unroll
    for (u32 k = 0; k < 4u; k++)
        half[k] = e4m3_to_f16_bits(byte_of(code[k / 2u], 2u * k)) | (e4m3_to_f16_bits(byte_of(code[k / 2u], 2u * k + 1u)) << 16);
    *(uint4*)(v16 + 8u * (size_t)id) = make_uint4(half[0], half[1], half[2], half[3]);
}

// FP8 V codes [bkv][seq_kv][DP] → Vᵀ [bkv][DP][np64] (np64: seq_kv rounded up to 64, zero
// codes past seq_kv) for PV_FP8's P·V, whose 8-bit wgmma reads V K-major. Within each 16 keys
// the order is P's in shared memory (p_fragments): position p holds key
// 2(p/4) + p%2 + 8((p/2)%2). A block transposes 64 keys × 64 channels through shared memory;
// grid (np64 / 64, DP / 64, b·hk), 256 threads.
extern "C" __global__ void __launch_bounds__(256) v_fp8_transpose(Params P, const u32* ws, unsigned char* vt) {
    __shared__ u32 tile[64][17];  // [key][word of 4 channels], padded against bank conflicts
    u32 k0 = blockIdx.x * 64u, c0 = blockIdx.y * 64u, bkv = blockIdx.z;
    u32 np64 = gridDim.x * 64u;
#pragma unroll
    for (u32 i = 0; i < 4u; i++) {  // read: a key's 64 channels are 16 consecutive words
        u32 e = threadIdx.x + 256u * i, key = e / 16u, w = e % 16u;
        tile[key][w] = k0 + key < P.seq_kv ? ws[P.off_vcodes + ((bkv * P.seq_kv + k0 + key) * DP + c0) / 4u + w] : 0u;
    }
    __syncthreads();
#pragma unroll
    for (u32 i = 0; i < 4u; i++) {  // write: a channel's 64 keys are 16 consecutive words
        u32 e = threadIdx.x + 256u * i, c = e / 16u, w = e % 16u, out = 0u;
#pragma unroll
        for (u32 b = 0; b < 4u; b++) {
            u32 pos = 4u * (w % 4u) + b, key = 16u * (w / 4u) + 2u * (pos / 4u) + pos % 2u + 8u * ((pos / 2u) % 2u);
            out |= byte_of(tile[key][c / 4u], c % 4u) << (8u * b);
        }
        *(u32*)(vt + ((size_t)bkv * DP + c0 + c) * np64 + k0 + 4u * w) = out;
    }
}

// NVFP4 Q or K codes → f16 rows of DP values (exact: every E2M1·E4M3 product is an f16).
// `rows` rows of codes at `codes`, one E4M3 scale word per 16 values at `scales`. A thread
// writes 8 values (16 bytes) from two code words and one scale.
extern "C" __global__ void nvfp4_qk_to_f16(Params P, const u32* ws, unsigned short* out, u32 codes, u32 scales, u32 rows) {
    u32 id = blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= rows * (DP / 8u)) return;
    u32 e = id * 8u, row = e / DP, c = e % DP;
    float s = e4m3_to_f32(ws[scales + row * (DP / 16u) + c / 16u]);
    u32 w[2] = {ws[codes + e / 4u], ws[codes + e / 4u + 1u]}, h[4];
#pragma unroll
    for (u32 k = 0; k < 4u; k++)
        h[k] = pack16<false>(e2m1_to_f32(byte_of(w[k / 2u], 2u * k)) * s, e2m1_to_f32(byte_of(w[k / 2u], 2u * k + 1u)) * s);
    *(uint4*)(out + e) = make_uint4(h[0], h[1], h[2], h[3]);
}

// NVFP4 V (channel-major codes, 16-token groups per channel) → f16 rows [b·hk][seq_kv][DP].
// A block transposes 64 tokens × 32 channels through shared memory, so that both the code
// reads (a channel's 64 tokens: 16 words) and the row writes (16 bytes per thread) coalesce.
// Grid: (⌈np / 64⌉, DP / 32, b·hk), 256 threads.
extern "C" __global__ void __launch_bounds__(256) nvfp4_v_to_f16(Params P, const u32* ws, unsigned short* out) {
    __shared__ u32 tile[64][17];  // [token][channel pair], padded against bank conflicts
    u32 t0 = blockIdx.x * 64u, c0 = blockIdx.y * 32u, bkv = blockIdx.z;
    // Read: thread → (channel pair, word of 4 tokens), the words of a channel consecutive.
    u32 cp = threadIdx.x / 16u, w = threadIdx.x % 16u, j = t0 + 4u * w;
    if (j < P.np) {
        u32 chan = bkv * DP + c0 + 2u * cp;
        u32 lo = ws[P.off_vcodes + (chan * P.np + j) / 4u], hi = ws[P.off_vcodes + ((chan + 1u) * P.np + j) / 4u];
        float s_lo = e4m3_to_f32(ws[P.off_vscales + chan * (P.np / 16u) + j / 16u]);
        float s_hi = e4m3_to_f32(ws[P.off_vscales + (chan + 1u) * (P.np / 16u) + j / 16u]);
#pragma unroll
        for (u32 k = 0; k < 4u; k++) tile[4u * w + k][cp] = pack16<false>(e2m1_to_f32(byte_of(lo, k)) * s_lo, e2m1_to_f32(byte_of(hi, k)) * s_hi);
    }
    __syncthreads();
    // Write: a token row's 32 channels as 4 × 16 bytes.
    u32 r = threadIdx.x / 4u, q = threadIdx.x % 4u;
    if (t0 + r < P.seq_kv) {
        const u32* src = &tile[r][4u * q];
        *(uint4*)(out + ((size_t)bkv * P.seq_kv + t0 + r) * DP + c0 + 8u * q) = make_uint4(src[0], src[1], src[2], src[3]);
    }
}
