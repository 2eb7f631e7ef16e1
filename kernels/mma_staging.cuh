// mma_staging.cuh (attention_mma.cu includes it after mma_p.cuh; it uses that file's macros):
// K/V tiles into shared memory — cp.async for mma.sync, the TMA producer warp for wgmma (KPERM).

// ---- staging -------------------------------------------------------------------------------

// The e-th 16-byte chunk a block stages (cp.async, mma.sync) of a tile with `chunks` chunks per
// row: its row and chunk, and its byte offset in the tile: row-major padded rows, chunks of a
// row on consecutive threads.
__device__ __forceinline__ u32 stage_slot(u32 e, u32 chunks, u32 stride, u32& r, u32& c) {
    r = e / chunks;
    c = e % chunks;
    return r * stride + c * 16u;
}

struct Src {
    const char* k;     // row 0 of this (batch, kv head) in K (codes or 16-bit input)
    const char* v;     // row 0 in V (16-bit)
    u32 k_row, v_row;  // row strides in bytes
};

// INT8 QK: threads < BK copy key tile kb's per-key K scales (zero past the sequence) behind the
// stage's K and V. By cp.async, waited for with the tile: a plain load would stall these warps
// for a global round trip before their QKᵀ every tile.
__device__ __forceinline__ void stage_kscales(const Params& P, const u32* ws, unsigned char* stage, u32 kb, u32 bkv) {
    if (!INT8_QK || threadIdx.x >= BK) return;
    u32 key = kb * BK + threadIdx.x;
    u32 ngk = group_count(P.seq_kv, P.k_gblock, P.k_ginter);
    bool ok = key < P.seq_kv;
    cp_async4(smem_addr(stage + K_TILE + V_TILE) + 4u * threadIdx.x,
              ws + P.off_kscales + bkv * ngk + (ok ? group_of(key, P.k_gblock, P.k_ginter) : 0u), ok);
}

// Issue the copies of one tile's rows (BK keys from key0, CHUNKS 16-byte chunks each, STRIDE
// bytes apart in shared memory) from `src` (rows `row_bytes` apart), zero-filled past seq_kv and
// past `valid` chunks (the head dim: codes are zero-padded in the workspace; 16-bit inputs are
// not, and their rows may run into the next head).
template <u32 CHUNKS, u32 STRIDE>
__device__ __forceinline__ void stage_rows(const Params& P, u32 base, const char* src, u32 row_bytes, u32 key0, u32 valid) {
    u32 tid = threadIdx.x;
#pragma unroll
    for (u32 i = 0; i < (BK * CHUNKS + CONSUMERS - 1u) / CONSUMERS; i++) {  // constant trip count: unrolled
        u32 e = tid + i * CONSUMERS;
        if ((BK * CHUNKS) % CONSUMERS != 0u && e >= BK * CHUNKS) break;
        u32 r, c, at = stage_slot(e, CHUNKS, STRIDE, r, c);
        bool ok = key0 + r < P.seq_kv && c < valid;
        cp_async16(base + at, ok ? src + (size_t)(key0 + r) * row_bytes + c * 16u : src, ok);
    }
}

// Key tile kb's K (and K scales) into a stage.
__device__ __forceinline__ void stage_k(const Params& P, const Src& src, const u32* ws, unsigned char* stage, u32 kb, u32 bkv) {
    const u32 kchunks = QK_BYTES / 16u;
    stage_rows<kchunks, K_STRIDE>(P, smem_addr(stage), src.k, src.k_row, kb * BK, INT8_QK ? kchunks : (P.head_dim * 2u) / 16u);
    stage_kscales(P, ws, stage, kb, bkv);
}

// The same for key tile kb's V.
__device__ __forceinline__ void stage_v(const Params& P, const Src& src, unsigned char* stage, u32 kb) {
    stage_rows<V_BYTES / 16u, V_STRIDE>(P, smem_addr(stage) + K_TILE, src.v, src.v_row, kb * BK, (P.head_dim * 2u) / 16u);
}

// Is key tile kb skipped for this block of query rows (block mask, or wholly above the causal diagonal)?
__device__ __forceinline__ bool tile_skipped(const Params& P, const u32* mask, u32 bh, u32 row0, u32 kb, i32 last_visible) {
    if ((i32)(kb * BK) > last_visible) return true;
    return (P.flags & FLAG_MASK) && mask[(bh * P.q_blocks + row0 / 128u) * P.k_blocks + kb] == 0u;
}

__device__ __forceinline__ u32 next_tile(const Params& P, const u32* mask, u32 bh, u32 row0, u32 kb, i32 last_visible) {
    while (kb < P.k_blocks && tile_skipped(P, mask, bh, row0, kb, last_visible)) kb++;
    return kb;
}

#if WGMMA
// Q's e-th 16-byte chunk in the swizzled layout the TMA tiles of K have: panels of [BQT rows]
// [PANEL bytes]; the swizzle XORs a chunk's index with bits 7 and up of its unswizzled offset
// (128 B: chunk c of row r at c ^ (r % 8); 64 B: c ^ (r / 2 % 4)). A row's chunks of a panel on
// consecutive threads: coalesced reads, conflict-free writes.
__device__ __forceinline__ u32 q_slot(u32 e, u32 chunks, u32& r, u32& c) {
    const u32 per = PANEL / 16u;
    r = e / chunks;
    c = e % chunks;
    return (c / per) * (BQT * PANEL) + r * PANEL + (((c % per) ^ (r * PANEL / 128u % per)) * 16u);
}

#if KPERM
// Where head (b, hkv)'s keys are in a KPERM map (tma.rs, permuted_rows): the maps run over the
// tensor's token rows, `st` elements apart; the head starts at element `off` of the tensor, i.e.
// at row off / st, element off mod st of that row (the host's perm_rows checked that the head's
// d elements lie within the row; HND: element 0, NHD: hkv·d). A box starts at any row.
struct PermCoord {
    i32 elem0;
    u32 row0;
};
__device__ __forceinline__ PermCoord perm_coord(unsigned long long off, u32 st) { return {(i32)(off % st), (u32)(off / st)}; }

// The ragged last key tile by the producer's lanes instead of the copy engine (a 64-row box
// would read past the head, or past the tensor): the rows KPERM's maps would land, zeros past
// the sequence, in the maps' swizzled panels of PANEL_B bytes (128-byte swizzle: chunk c of row
// r at c ^ (r % 8); 64-byte: c ^ (r / 2 % 4)). `src`: the tile's first key row, `row_bytes`
// apart; ROW_B bytes per row.
template <u32 ROW_B, u32 PANEL_B>
__device__ __forceinline__ void fill_permuted(u32 dst, const char* src, u32 row_bytes, u32 keys_left) {
    const u32 chunks = ROW_B / 16u, per = PANEL_B / 16u;
#pragma unroll 4
    for (u32 i = threadIdx.x % 32u; i < BK * chunks; i += 32u) {
        u32 r = i / chunks, c = i % chunks;
        u32 key = key_in_tile(r / 8u, (r % 8u) / 2u, r % 2u);
        u32 at = (c / per) * (BK * PANEL_B) + r * PANEL_B + (((c % per) ^ (r * PANEL_B / 128u % per)) * 16u);
        bool ok = key < keys_left;
        cp_async16(dst + at, ok ? src + (size_t)key * row_bytes + c * 16u : src, ok);
    }
}
#endif

// The producer warp: every visited key tile's K and V (and INT8 K scales) into stage j % STAGES,
// in the consumers' visiting order. Stage st is refilled once all WARPS consumer warps have
// arrived on empty[st] (they are done with its previous tile); full[st] completes when all 32
// lanes have arrived (after their K-scale stores) and the copies' bytes have landed (boxes past
// the sequence or the head dim are zero-filled and count in full).
__device__ __forceinline__ void produce(const Params& P, const TmaMap& kmap, const TmaMap& vmap, const u32* ws, const u32* mask,
                                        unsigned char* stages, u32 full, u32 empty, u32 bh, u32 row0, i32 last_visible, u32 hkv,
                                        u32 b, u32 bkv, const Strides16& S16, const Src& src) {
    u32 lane = threadIdx.x % 32u;
#if KPERM
    // K: INT8 codes [b·hk][N][DP] bytes, or 16-bit rows (the caller's or f16 copies); V: 16-bit rows.
    const PermCoord kc = INT8_QK ? perm_coord((unsigned long long)bkv * P.seq_kv * DP, DP)
                                 : perm_coord((unsigned long long)b * S16.k_sb + (unsigned long long)hkv * S16.k_sh, S16.k_st);
    const PermCoord vc = perm_coord((unsigned long long)b * S16.v_sb + (unsigned long long)hkv * S16.v_sh, S16.v_st);
#endif
    u32 ngk = INT8_QK ? group_count(P.seq_kv, P.k_gblock, P.k_ginter) : 0u;
    u32 j = 0;
    for (u32 kt = next_tile(P, mask, bh, row0, 0u, last_visible); kt < P.k_blocks; kt = next_tile(P, mask, bh, row0, kt + 1u, last_visible), j++) {
        u32 st = j % STAGES;
        unsigned char* stage = stages + st * STAGE_BYTES;
        float ks[BK / 32u];
        if (INT8_QK) {  // loaded before the wait, so the global round trip overlaps it
#pragma unroll
            for (u32 i = 0; i < BK / 32u; i++) {
                u32 c = lane + 32u * i, key = kt * BK + (KPERM ? key_in_tile(c / 8u, (c % 8u) / 2u, c % 2u) : c);
                ks[i] = key < P.seq_kv ? u2f(ws[P.off_kscales + bkv * ngk + group_of(key, P.k_gblock, P.k_ginter)]) : 0.0f;
            }
        }
        if (j >= STAGES) mbar_wait(empty + 8u * st, (j / STAGES + 1u) % 2u);
        if (INT8_QK) {
#pragma unroll
            for (u32 i = 0; i < BK / 32u; i++) ((float*)(stage + K_TILE + V_TILE))[lane + 32u * i] = ks[i];
        }
        u32 bar = full + 8u * st;
#if KPERM
        if (kt * BK + BK > P.seq_kv) {  // (warp-uniform) the ragged last tile: by the lanes
            fill_permuted<QK_BYTES, PANEL>(smem_addr(stage), src.k + (size_t)(kt * BK) * src.k_row, src.k_row, P.seq_kv - kt * BK);
            fill_permuted<V_BYTES, 128u>(smem_addr(stage) + K_TILE, src.v + (size_t)(kt * BK) * src.v_row, src.v_row, P.seq_kv - kt * BK);
            cp_async_commit();
            cp_async_wait<0>();
            fence_async_smem();  // the lanes' writes, for the consumers' wgmma (async proxy)
            mbar_arrive(bar);
            continue;
        }
#endif
        if (lane == 0u) {
            mbar_arrive_expect(bar, K_TILE + V_TILE);
#if KPERM
            // 5-d maps (element, e, t, n, row) over the tensors' token rows (perm_coord).
            i32 krow = (i32)(kc.row0 + kt * BK), vrow = (i32)(vc.row0 + kt * BK);
#pragma unroll
            for (u32 p = 0; p < QK_BYTES / PANEL; p++)
                tma_load5(smem_addr(stage) + p * BK * PANEL, kmap, kc.elem0 + (i32)(p * (INT8_QK ? PANEL : PANEL / 2u)), 0, 0, 0, krow,
                          bar);
#pragma unroll
            for (u32 p = 0; p < V_BYTES / 128u; p++)
                tma_load5(smem_addr(stage) + K_TILE + p * BK * 128u, vmap, vc.elem0 + (i32)(p * 64u), 0, 0, 0, vrow, bar);
#else
#pragma unroll
            for (u32 p = 0; p < QK_BYTES / PANEL; p++)
                tma_load(smem_addr(stage) + p * BK * PANEL, kmap, (i32)(p * (INT8_QK ? PANEL : PANEL / 2u)), (i32)(kt * BK), (i32)hkv, (i32)b,
                         bar);
            if (PV_FP8) {  // Vᵀ: boxes of 64 channels × 64 keys
#pragma unroll
                for (u32 p = 0; p < DP / 64u; p++)
                    tma_load(smem_addr(stage) + K_TILE + p * 64u * BK, vmap, (i32)(kt * BK), (i32)(p * 64u), (i32)hkv, (i32)b, bar);
            } else {
#pragma unroll
                for (u32 p = 0; p < V_BYTES / 128u; p++)
                    tma_load(smem_addr(stage) + K_TILE + p * BK * 128u, vmap, (i32)(p * 64u), (i32)(kt * BK), (i32)hkv, (i32)b, bar);
            }
#endif
        } else {
            mbar_arrive(bar);
        }
    }
}
#endif
