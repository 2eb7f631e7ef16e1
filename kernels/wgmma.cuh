// wgmma.cuh: Hopper warpgroup MMA primitives (sm_90a) for attention_mma.cu's WGMMA shape.
// A warpgroup (4 consecutive warps) multiplies 64 query rows at once; warp w of the group holds
// rows 16w..16w+15 of the accumulator in exactly the m16n8 C layout of mma.sync (rows g and
// g+8, columns 2t and 2t+1 of each 8-column n-tile), so the softmax code is shared unchanged,
// and the f16 A fragments of P·V in registers have the m16n8k16 A layout the mma.sync path uses.
//
// Q, K and V sit in shared memory as the TMA tiles lay them: swizzled panels (attention_mma.cu,
// PANEL; Q is copied into the same layout). P uses wgmma's no-swizzle canonical layout: core
// matrices of 8 rows × 16 bytes stored as 128 contiguous bytes; a group of 8 rows keeps its
// 16-byte chunks of a row in order, then comes the next group of 8 rows (`tile_offset`), K-major
// (rows are query rows, chunks run along the keys): chunk stride (LBO) 128 bytes, row-group
// stride (SBO) 8 · row bytes. V is the MN-major B operand of P·V (rows are keys, the reduction
// axis), so it needs no transpose.
#if WGMMA

#if MT != 1 || WARPS % 4 != 0 || !QSMEM || (DP != 64 && DP != 128)
#error "WGMMA: one 16-row m-tile per warp, whole warpgroups, Q in shared memory, head dim 64 or 128"
#endif

typedef unsigned long long u64;

__device__ __forceinline__ u32 tile_offset(u32 row, u32 chunk, u32 row_bytes) {
    return (row / 8u) * (row_bytes * 8u) + chunk * 128u + (row % 8u) * 16u;
}

// Matrix descriptor, kept as its two words: lo = start address | LBO << 16, hi = SBO | swizzle
// (all in 16-byte units; base offset 0). Steps within a tile add to the start address only
// (shared memory is under 256 KiB, so nothing carries out of its 14 bits): one add per wgmma
// operand instead of rebuilding all 64 bits.
struct Desc {
    u32 lo, hi;
};
// The layout (bits 62-63): no swizzle, or the swizzle of TMA tiles (SBO: 8 rows of the
// swizzle's width; LBO is the panel stride for the MN-major V and unused (16) for K-major
// operands within a panel).
#define SW_NONE 0u
#define SW_128B 1u
#define SW_64B 2u
__device__ __forceinline__ Desc wg_desc(u32 addr, u32 lbo, u32 sbo, u32 swizzle = SW_NONE) {
    return {((addr & 0x3FFFFu) >> 4) | ((lbo >> 4) << 16), (sbo >> 4) | (swizzle << 30)};
}
__device__ __forceinline__ u64 desc_at(Desc d, u32 bytes) {
    u64 r;
    asm("mov.b64 %0, {%1, %2};\n" : "=l"(r) : "r"(d.lo + (bytes >> 4)), "r"(d.hi));
    return r;
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed groups are pending (groups complete in commit order).
template <int N> __device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// cp.async writes are generic-proxy stores; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarrier and tensor copies (sm_90). A barrier completes a phase when all its arrivals (one of
// them with the expected byte count) and all the bytes of the copies bound to it have landed.
__device__ __forceinline__ void mbar_init(u32 bar, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// One arrival (release: this thread's earlier shared-memory writes are seen by the waiters).
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// bar.sync on named barrier ID (1–15; 0 is __syncthreads) among THREADS threads. Constant
// ids, so that ptxas reserves only the barriers used (a runtime id reserves all 16).
template <u32 ID, u32 COUNT> __device__ __forceinline__ void named_barrier() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(COUNT) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// One box of a 4-d tensor map (coordinates innermost first) into shared memory at dst.
__device__ __forceinline__ void tma_load(u32 dst, const TmaMap& map, i32 c0, i32 c1, i32 c2, i32 c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"((u64)&map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// One box of a 5-d tensor map (coordinates innermost first) into shared memory at dst.
__device__ __forceinline__ void tma_load5(u32 dst, const TmaMap& map, i32 c0, i32 c1, i32 c2, i32 c3, i32 c4, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(dst),
        "l"((u64)&map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
        : "memory");
}

// After wgmma.wait_group: make later reads of the accumulators depend on the wait.
template <int N> __device__ __forceinline__ void acc_fence(float (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(a[i][e])::"memory");
}
template <int N> __device__ __forceinline__ void acc_fence(i32 (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(a[i][e])::"memory");
}

// Accumulator operand lists: n-tiles i..i+3 (16 registers, in wgmma's d order).
#define WG_F16(a, i)                                                                                                                  \
    "+f"(a[i][0]), "+f"(a[i][1]), "+f"(a[i][2]), "+f"(a[i][3]), "+f"(a[i + 1][0]), "+f"(a[i + 1][1]), "+f"(a[i + 1][2]),              \
        "+f"(a[i + 1][3]), "+f"(a[i + 2][0]), "+f"(a[i + 2][1]), "+f"(a[i + 2][2]), "+f"(a[i + 2][3]), "+f"(a[i + 3][0]),             \
        "+f"(a[i + 3][1]), "+f"(a[i + 3][2]), "+f"(a[i + 3][3])
#define WG_R16(a, i)                                                                                                                  \
    "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3]), "+r"(a[i + 1][0]), "+r"(a[i + 1][1]), "+r"(a[i + 1][2]),              \
        "+r"(a[i + 1][3]), "+r"(a[i + 2][0]), "+r"(a[i + 2][1]), "+r"(a[i + 2][2]), "+r"(a[i + 2][3]), "+r"(a[i + 3][0]),             \
        "+r"(a[i + 3][1]), "+r"(a[i + 3][2]), "+r"(a[i + 3][3])
#define WG_D0 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
#define WG_D16 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define WG_D32 "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47"
#define WG_D48 "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"

// S (64 rows × 64 keys) = or += Q·Kᵀ over 32 bytes of the head dim; both operands K-major in
// shared memory. `accumulate` false: S = Q·Kᵀ (the first step needs no zeroed accumulators).
__device__ __forceinline__ void wgmma_qk(i32 (&d)[8][4], u64 qd, u64 kd, u32 accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {" WG_D0 "," WG_D16 "}, %32, %33, p;\n}\n"
        : WG_R16(d, 0), WG_R16(d, 4)
        : "l"(qd), "l"(kd), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_qk(float (&d)[8][4], u64 qd, u64 kd, u32 accumulate) {
    if (QK_BF16)
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WG_D0 "," WG_D16 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
            : WG_F16(d, 0), WG_F16(d, 4)
            : "l"(qd), "l"(kd), "r"(accumulate));
    else
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {" WG_D0 "," WG_D16 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
            : WG_F16(d, 0), WG_F16(d, 4)
            : "l"(qd), "l"(kd), "r"(accumulate));
}

// O (64 rows × DP channels) += P·V over 16 keys: P K-major and V MN-major (trans-b = 1), both
// in shared memory. (P from registers would overlap less: ptxas reuses the registers an
// in-flight wgmma still reads for the next softmax, then holds that softmax back behind it.)
#if DP == 64
#define PV_N "64"
#define PV_ACC WG_D0 "," WG_D16
#define PV_TAIL "%32, %33, p"
#define PV_FLAG "%34"
#define PV_OPS(o) WG_F16(o, 0), WG_F16(o, 4)
#else
#define PV_N "128"
#define PV_ACC WG_D0 "," WG_D16 "," WG_D32 "," WG_D48
#define PV_TAIL "%64, %65, p"
#define PV_FLAG "%66"
#define PV_OPS(o) WG_F16(o, 0), WG_F16(o, 4), WG_F16(o, 8), WG_F16(o, 12)
#endif
#define PV_ASM(T)                                                          \
    "{\n.reg .pred p;\nsetp.ne.b32 p, " PV_FLAG ", 0;\n"                 \
    "wgmma.mma_async.sync.aligned.m64n" PV_N "k16.f32." T "." T " {" PV_ACC "}, " PV_TAIL ", 1, 1, 0, 1;\n}\n"
__device__ __forceinline__ void wgmma_pv(float (&o)[DP / 8u][4], u64 pd, u64 vd) {
    if (PV_BF16)
        asm volatile(PV_ASM("bf16") : PV_OPS(o) : "l"(pd), "l"(vd), "r"(1u));
    else
        asm volatile(PV_ASM("f16") : PV_OPS(o) : "l"(pd), "l"(vd), "r"(1u));
}

// FP8 P·V (PV_FP8) over 32 keys: 8-bit wgmma takes both operands K-major only, so V comes as
// Vᵀ tiles ([DP channels][64 keys], attention_mma.cu). `accumulate` false on a tile's first step:
// the tile's product gets its own accumulator (see PV_FP8).
__device__ __forceinline__ void wgmma_pv8(float (&o)[DP / 8u][4], u64 pd, u64 vd, u32 accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, " PV_FLAG ", 0;\n"
        "wgmma.mma_async.sync.aligned.m64n" PV_N "k32.f32.e4m3.e4m3 {" PV_ACC "}, " PV_TAIL ", 1, 1;\n}\n"
        : PV_OPS(o)
        : "l"(pd), "l"(vd), "r"(accumulate));
}

#endif  // WGMMA
