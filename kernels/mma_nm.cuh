// mma_nm.cuh (attention_mma.cu includes it after mma_staging.cuh; it uses that file's macros):
// N:M sparse softmax's selection, natural key order and KPERM.

// ---- N:M sparse softmax -------------------------------------------------------------------------

// In each group of NM (4 or 8) consecutive keys of a row only the NM_N largest scores survive
// (an equal score at a lower key outranks); sink and recent keys stay dense. NM and NM_N are
// compiled in. A row's 8 keys of an n-tile sit in its quad, 2 per thread: M = 4 groups are
// thread pairs (t, t^1), M = 8 groups the quad. Scores are compared unscaled: the scale is
// positive. A −inf score needs no test: it outranks nothing and is −inf whether it survives or not.
//
// The fast path finds the group's N-th largest score τ from sorted pieces (each thread sorts its
// two, merges with its partner's, for M = 8 with the other pair's) and keeps s ≥ τ: no branch
// per score. That is the rule exactly unless the (N+1)-th largest equals τ (a tie at the
// boundary, which the key order must break): then the warp counts ranks instead (rare, except
// for inputs with repeated scores).

#if NM
#define NM_SPAN 2u  // n-tiles per selection step

// The k-th largest (1-based, compiled in) of two lists sorted in descending order:
// max over i + j = k of min(a_i, b_j), with a_0 = b_0 = +∞.
template <u32 L>
__device__ __forceinline__ float kth_largest(const float (&a)[L], const float (&b)[L], u32 k) {
    float best = 0.0f;
#pragma unroll
    for (u32 i = (k > L ? k - L : 0u); i <= (k < L ? k : L); i++) {
        u32 j = k - i;
        float v = i == 0u ? b[j - 1u] : j == 0u ? a[i - 1u] : fminf(a[i - 1u], b[j - 1u]);
        best = i == (k > L ? k - L : 0u) ? v : fmaxf(best, v);
    }
    return best;
}

// τ (the NM_N-th largest) of a group from the sorted pairs a, c of its first four keys and,
// for M = 8, `rest`, which gives the sorted other four; `tie` |= the next one equals τ. (Equal
// −∞ scores also count as a tie: harmless, the rank path then runs on a few masked tiles, and
// the test stays one instruction.)
template <typename Rest>
__device__ __forceinline__ float nm_tau(const float (&a)[2], const float (&c)[2], bool& tie, Rest rest) {
    if (NM == 4u && NM_N == 2u) {
        // 2:4: the 2nd and 3rd largest are max(x, y) and min(x, y), equal when x = y.
        float x = fminf(a[0], c[0]), y = fmaxf(a[1], c[1]);
        tie |= x == y;
        return fmaxf(x, y);
    }
    float tau, next;
    if (NM == 4u) {
        tau = kth_largest(a, c, NM_N);
        next = kth_largest(a, c, NM_N + 1u);
    } else {
        float four[4], other[4];
#pragma unroll
        for (u32 k = 0; k < 4u; k++) four[k] = kth_largest(a, c, k + 1u);
        rest(four, other);
        tau = kth_largest(four, other, NM_N);
        next = kth_largest(four, other, NM_N + 1u);
    }
    tie |= tau == next;
    return tau;
}

// τ of the group of this thread's two scores (natural key order): the lane pair holds the
// group's other two keys (M = 4), the quad its eight (M = 8).
__device__ __forceinline__ float nm_threshold(float x0, float x1, bool& tie) {
    float own[2] = {fmaxf(x0, x1), fminf(x0, x1)}, pair[2];
#pragma unroll
    for (u32 e = 0; e < 2u; e++) pair[e] = __shfl_xor_sync(0xffffffffu, own[e], 1);
    return nm_tau(own, pair, tie, [](const float (&four)[4], float (&other)[4]) {
#pragma unroll
        for (u32 k = 0; k < 4u; k++) other[k] = __shfl_xor_sync(0xffffffffu, four[k], 2);
    });
}

// Is key `key` of row `row` dense (a sink or a recent key)?
__device__ __forceinline__ bool nm_dense(const Params& P, u32 row, u32 key, i32 offset) {
    i32 dist = (i32)row + offset - (i32)key;
    return (key < P.nm_sink) | ((u32)dist < P.nm_recent);  // (0 ≤ dist < nm_recent)
}

// The exact rule by ranks (the slow path, for ties at the boundary): a score survives when
// fewer than NM_N scores of its group outrank it.
__device__ __forceinline__ void nm_by_rank(const Params& P, float (&s)[NT_S][4], u32 n0, const u32 (&rows)[2], u32 key0, i32 offset) {
    u32 t = threadIdx.x % 4u;
#pragma unroll
    for (u32 n = n0; n < n0 + NM_SPAN; n++)
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {
            float own[2] = {s[n][2u * i], s[n][2u * i + 1u]};
            float peer[3][2];  // the values of threads t^1, t^2, t^3 (only t^1 when M = 4)
#pragma unroll
            for (u32 m = 1; m < (NM == 4u ? 2u : 4u); m++)
#pragma unroll
                for (u32 e = 0; e < 2u; e++) peer[m - 1u][e] = __shfl_xor_sync(0xffffffffu, own[e], m);
#pragma unroll
            for (u32 e = 0; e < 2u; e++) {
                float x = own[e];
                // The other key of this thread: higher for e = 0 (outranks only when greater).
                u32 rank = (e == 0u ? own[1] > x : own[0] >= x) ? 1u : 0u;
#pragma unroll
                for (u32 m = 1; m < (NM == 4u ? 2u : 4u); m++) {
                    // Thread t^m's keys are lower than this thread's when t has m's top bit.
                    bool lower = (t & (m >= 2u ? 2u : 1u)) != 0u;
#pragma unroll
                    for (u32 f = 0; f < 2u; f++) {
                        float z = peer[m - 1u][f];
                        rank += (lower ? z >= x : z > x) ? 1u : 0u;
                    }
                }
                bool keep = rank < NM_N || nm_dense(P, rows[i], key0 + key_in_tile(n, t, e), offset);
                s[n][2u * i + e] = keep ? x : NEG_INF;
            }
        }
}

#if KPERM
// KPERM (key_in_tile): a thread's 16 scores of a row are keys 16t .. 16t + 15 in key order, so
// an M-key group is the M scores of n-tiles n0 .. n0 + M/2 − 1 (n0 a multiple of M/2): the
// selection needs no shuffles.
#define NM_TILES (NM / 2u)

// Row i's scores of the M-key group that starts at n-tile n0, in key order.
__device__ __forceinline__ void group_values(const float (&s)[NT_S][4], u32 n0, u32 i, float (&v)[NM]) {
#pragma unroll
    for (u32 k = 0; k < NM; k++) v[k] = s[n0 + k / 2u][2u * i + k % 2u];
}

// τ (the NM_N-th largest) of a group held whole by this thread; `tie` |= the next one equals it.
__device__ __forceinline__ float nm_threshold_own(const float (&v)[NM], bool& tie) {
    float a[2] = {fmaxf(v[0], v[1]), fminf(v[0], v[1])}, c[2] = {fmaxf(v[2], v[3]), fminf(v[2], v[3])};
    return nm_tau(a, c, tie, [&](const float (&)[4], float (&other)[4]) {
        // Keys 4-7 of the group (M = 8 only: the indices wrap for M = 4, never called).
        float a2[2] = {fmaxf(v[4 % NM], v[5 % NM]), fminf(v[4 % NM], v[5 % NM])},
              c2[2] = {fmaxf(v[6 % NM], v[7 % NM]), fminf(v[6 % NM], v[7 % NM])};
#pragma unroll
        for (u32 k = 0; k < 4u; k++) other[k] = kth_largest(a2, c2, k + 1u);
    });
}

// The exact rule by ranks for KPERM (ties at the boundary): ranks within the thread's group,
// a lower key outranking on equal scores.
__device__ __forceinline__ void nm_by_rank_perm(const Params& P, float (&s)[NT_S][4], u32 n0, const u32 (&rows)[2], u32 key0, i32 offset) {
    u32 t = threadIdx.x % 4u;
#pragma unroll
    for (u32 i = 0; i < 2u; i++) {
        float v[NM];
        group_values(s, n0, i, v);
#pragma unroll
        for (u32 k = 0; k < NM; k++) {
            float x = v[k];
            u32 rank = 0u;
#pragma unroll
            for (u32 j = 0; j < NM; j++)
                if (j != k) rank += (j < k ? v[j] >= x : v[j] > x) ? 1u : 0u;
            u32 n = n0 + k / 2u, e = k % 2u;
            bool keep = rank < NM_N || nm_dense(P, rows[i], key0 + key_in_tile(n, t, e), offset);
            s[n][2u * i + e] = keep ? x : NEG_INF;
        }
    }
}

__device__ __forceinline__ void nm_select_perm(const Params& P, float (&s)[NT_S][4], const u32 (&rows)[2], u32 key0, i32 offset, bool dense_near) {
    u32 t = threadIdx.x % 4u;
#pragma unroll
    for (u32 n0 = 0; n0 < NT_S; n0 += NM_TILES) {
        float tau[2];
        bool tie = false;
#pragma unroll
        for (u32 i = 0; i < 2u; i++) {
            float v[NM];
            group_values(s, n0, i, v);
            tau[i] = nm_threshold_own(v, tie);
        }
        if (__any_sync(0xffffffffu, tie)) {
            nm_by_rank_perm(P, s, n0, rows, key0, offset);
            continue;
        }
        if (dense_near) {  // (warp-uniform: the per-key window test only near sink and recent keys)
#pragma unroll
            for (u32 n = n0; n < n0 + NM_TILES; n++)
#pragma unroll
                for (u32 e = 0; e < 4u; e++) {
                    float& x = s[n][e];
                    bool keep = (x >= tau[e / 2u]) | nm_dense(P, rows[e / 2u], key0 + key_in_tile(n, t, e % 2u), offset);
                    x = keep ? x : NEG_INF;
                }
        } else {
#pragma unroll
            for (u32 n = n0; n < n0 + NM_TILES; n++)
#pragma unroll
                for (u32 e = 0; e < 4u; e++) s[n][e] = s[n][e] >= tau[e / 2u] ? s[n][e] : NEG_INF;
        }
    }
}
#endif

// `dense_near`: some key of this tile may be a sink or recent key for one of these rows (a
// warp-uniform test, so the per-key window test runs only on the few tiles near them). NM_SPAN
// n-tiles at a time (fewer live thresholds: no spills at two blocks per SM).
__device__ __forceinline__ void nm_select(const Params& P, float (&s)[NT_S][4], const u32 (&rows)[2], u32 key0, i32 offset, bool dense_near) {
    u32 t = threadIdx.x % 4u;
#pragma unroll
    for (u32 n0 = 0; n0 < NT_S; n0 += NM_SPAN) {
        float tau[NM_SPAN][2];
        bool tie = false;
#pragma unroll
        for (u32 n = 0; n < NM_SPAN; n++)
#pragma unroll
            for (u32 i = 0; i < 2u; i++) tau[n][i] = nm_threshold(s[n0 + n][2u * i], s[n0 + n][2u * i + 1u], tie);
        if (__any_sync(0xffffffffu, tie)) {
            nm_by_rank(P, s, n0, rows, key0, offset);
            continue;
        }
        if (dense_near) {
#pragma unroll
            for (u32 n = 0; n < NM_SPAN; n++)
#pragma unroll
                for (u32 e = 0; e < 4u; e++) {
                    float& x = s[n0 + n][e];
                    bool keep = (x >= tau[n][e / 2u]) | nm_dense(P, rows[e / 2u], key0 + key_in_tile(n0 + n, t, e % 2u), offset);
                    x = keep ? x : NEG_INF;
                }
        } else {
#pragma unroll
            for (u32 n = 0; n < NM_SPAN; n++)
#pragma unroll
                for (u32 e = 0; e < 4u; e++) s[n0 + n][e] = s[n0 + n][e] >= tau[n][e / 2u] ? s[n0 + n][e] : NEG_INF;
        }
    }
}
#endif
