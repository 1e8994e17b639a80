// Attention backward on tensor cores (bf16/f16 inputs, f32 accumulation), FlashAttention-2
// style: probabilities recomputed from the forward's lse, every product an mma.sync m16n8k16
// (attention_mma.cu's helpers), and, as backward.cu's f32 kernels, dK/dV and dQ in two kernels
// so that there are no atomics and every run gives the same bits. As FlashAttention-2 does, P
// and dS are rounded to T as the operands of their second products. Visibility, layouts, lse
// and dsum are backward.cu's; needs sm_80+, head_dim a multiple of 16, at most DM (64 or 128).
// Each kernel copies its next tile with cp.async while it computes on the current one.
//
//   S = q·kᵀ;  P = exp(scale·S − lse);  dP = dO·vᵀ;  dS = P ⊙ (dP − dsum)
//   dV = Pᵀ·dO;  dK = scale·dSᵀ·Q;  dQ = scale·dS·K
#define ATBM_BK 32  // keys per step of the dQ kernel

// backward.cu's att_visible with the segments of the query (sq, at s) and the key (sp, at p) at
// hand; `segs` says whether there are segments.
__device__ __forceinline__ bool att_visible_s(bool segs, unsigned sq, unsigned sp, int s, int p,
                                              int window) {
    if (p > s) return false;
    if (window > 0 && s - p >= window) return false;
    if (segs) return sq == 0 ? p == s : sp == sq;
    return true;
}

// P and dS of one accumulator element (row `row`, key `p`), given S and dP, in base 2: sl2 is
// the scale times log2(e) and l2 the row's lse times log2(e), so that P = exp2(S·sl2 − l2)
// = exp(scale·S − lse) is one exp2; 0 where invisible.
__device__ __forceinline__ void p_ds(float s, float dp, float l2, float dsum, bool vis, float sl2,
                                     float* pr, float* ds) {
    const float e = vis ? exp2f(fmaf(s, sl2, -l2)) : 0.f;
    *pr = e;
    *ds = e * (dp - dsum);
}

// dK and dV of 16·warps keys of one KV head: grid (ceil(len / (16·warps)), hkv, batch), one
// warp per 16 keys. Each warp computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for BQ queries at a time
// (every query head of the group, every query that can see one of the block's keys), then
// dV += Pᵀ·dO and dK += dSᵀ·Q with Pᵀ and dSᵀ re-packed from the accumulators as A operands.
template <typename T, int DM>
__device__ void attn_bwd_kv_mma_impl(const T* q, const T* k, const T* v, const T* d_o,
                                     const float* lse, const float* dsum, const unsigned* seg,
                                     T* dk, T* dv, int len, int hq, int hkv, int d, float scale,
                                     int window) {
    extern __shared__ unsigned short smem_u16[];
    // Queries per tile: 32 at d ≤ 64, 16 at d ≤ 128 (double-buffered Q and dO tiles beside
    // the block's K and V within 48 KiB).
    constexpr int BQ = DM == 64 ? 32 : 16;
    const int warps = blockDim.x >> 5, kb = 16 * warps, ldt = d + 8;
    T* ks = (T*)smem_u16;            // [kb][d + 8]
    T* vs = ks + kb * ldt;           // [kb][d + 8]
    T* qbuf = vs + kb * ldt;         // [2][BQ][d + 8]
    T* dobuf = qbuf + 2 * BQ * ldt;  // [2][BQ][d + 8]
    float* lbuf = (float*)(dobuf + 2 * BQ * ldt);  // [2][BQ] lse·log2(e)
    float* dbuf = lbuf + 2 * BQ;                   // [2][BQ] dsum
    unsigned* kseg = (unsigned*)(dbuf + 2 * BQ);   // [kb] the keys' segments, if any
    unsigned* qseg = kseg + kb;                    // [2][BQ] the queries' segments
    const int b = blockIdx.z, g = blockIdx.y, k0 = blockIdx.x * kb;
    const int groups = hq / hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int ksteps = d / 16, ntiles_d = d / 8;
    const float sl2 = scale * LOG2E;  // scores in base 2 (see p_ds)
    const size_t qrs = (size_t)hq * d, krs = (size_t)hkv * d;
    tile_copy(k + (size_t)b * len * krs + (size_t)g * d, krs, k0, len, kb, d, ks, ldt);
    tile_copy(v + (size_t)b * len * krs + (size_t)g * d, krs, k0, len, kb, d, vs, ldt);
    if (seg)
        for (int i = threadIdx.x; i < kb; i += blockDim.x)
            kseg[i] = k0 + i < len ? seg[b * len + k0 + i] : 0u;
    // This thread's two keys (rows gid and gid + 8 of the warp's 16).
    const int w0 = k0 + warp * 16, p0 = w0 + gid, p1 = p0 + 8;
    float dka[DM / 8][4], dva[DM / 8][4];
#pragma unroll
    for (int n = 0; n < DM / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.f;
    // Queries before the block see none of its keys; with a window (no segments) neither do
    // queries window or more past its last key. Tile t is query tile t % nq of the group's
    // head t / nq; tile t + 1 is copied (cp.async) while tile t is computed on.
    int qend = len;
    if (window > 0 && !seg) qend = min(len, k0 + kb - 1 + window);
    const int nq = (qend - k0 + BQ - 1) / BQ, tiles = groups * nq;
    auto issue = [&](int t, int buf) {
        const int h = g * groups + t / nq, q0 = k0 + (t % nq) * BQ;
        const size_t col = (size_t)b * len * qrs + (size_t)h * d;
        tile_copy(q + col, qrs, q0, len, BQ, d, qbuf + buf * BQ * ldt, ldt);
        tile_copy(d_o + col, qrs, q0, len, BQ, d, dobuf + buf * BQ * ldt, ldt);
        if (threadIdx.x < BQ) {
            const int qi = q0 + threadIdx.x;
            const size_t li = ((size_t)b * hq + h) * len + qi;
            lbuf[buf * BQ + threadIdx.x] = qi < len ? lse[li] * LOG2E : 0.f;
            dbuf[buf * BQ + threadIdx.x] = qi < len ? dsum[li] : 0.f;
            if (seg) qseg[buf * BQ + threadIdx.x] = qi < len ? seg[b * len + qi] : 0u;
        }
    };
    issue(0, 0);
    cp_async_commit();
    for (int t = 0; t < tiles; t++) {
        const int cur = t & 1, q0 = k0 + (t % nq) * BQ;
        if (t + 1 < tiles) issue(t + 1, cur ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* qs = qbuf + cur * BQ * ldt;
        const T* dos = dobuf + cur * BQ * ldt;
        const float* ls = lbuf + cur * BQ;
        const float* dss = dbuf + cur * BQ;
        const unsigned* qsg = qseg + cur * BQ;
        // Every warp computes every tile: a warp whose keys all come after the tile's queries
        // gets P = 0 (a diagonal tile's few wasted products, and no branch around the barrier
        // below).
        {
            float sa[BQ / 8][4], dpa[BQ / 8][4];
#pragma unroll
            for (int n = 0; n < BQ / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) sa[n][e] = dpa[n][e] = 0.f;
#pragma unroll
            for (int s = 0; s < DM / 16; s++) {
                if (s < ksteps) {
                    unsigned ka[4], va[4];
                    frag_a(ka, ks, ldt, warp * 16, s * 16);
                    frag_a(va, vs, ldt, warp * 16, s * 16);
#pragma unroll
                    for (int n = 0; n < BQ / 8; n += 2) {
                        unsigned bq[4], bd[4];
                        frag_b_rows(bq, qs, ldt, n * 8, s * 16);
                        frag_b_rows(bd, dos, ldt, n * 8, s * 16);
                        mma16816<T>(sa[n], ka, bq[0], bq[1]);
                        mma16816<T>(sa[n + 1], ka, bq[2], bq[3]);
                        mma16816<T>(dpa[n], va, bd[0], bd[1]);
                        mma16816<T>(dpa[n + 1], va, bd[2], bd[3]);
                    }
                }
            }
            // Pᵀ and dSᵀ, packed as A fragments (keys × queries) for the second products. A tile
            // whose queries all see all the warp's keys (no segments or window) needs no mask.
            const bool full = !seg && window == 0 && w0 + 15 <= q0 && q0 + BQ <= len &&
                              w0 + 16 <= len;
            unsigned pa[BQ / 16][4], dsa[BQ / 16][4];
#pragma unroll
            for (int n = 0; n < BQ / 8; n++) {
                float pr[4], ds[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = n * 8 + tig * 2 + (e & 1), qi = q0 + c;
                    const int p = e < 2 ? p0 : p1;
                    const unsigned sp = seg ? kseg[p - k0] : 0u;
                    const bool vis =
                        full || (qi < len && p < len &&
                                 att_visible_s(seg != nullptr, qsg[c], sp, qi, p, window));
                    p_ds(sa[n][e], dpa[n][e], ls[c], dss[c], vis, sl2, &pr[e], &ds[e]);
                }
                pa[n / 2][(n & 1) * 2 + 0] = pack2<T>(pr[0], pr[1]);
                pa[n / 2][(n & 1) * 2 + 1] = pack2<T>(pr[2], pr[3]);
                dsa[n / 2][(n & 1) * 2 + 0] = pack2<T>(ds[0], ds[1]);
                dsa[n / 2][(n & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
            }
            mma_down<T, DM, BQ / 16>(dva, pa, dos, ldt, ntiles_d);
            mma_down<T, DM, BQ / 16>(dka, dsa, qs, ldt, ntiles_d);
        }
        __syncthreads();  // every warp is done with this tile before it is copied over
    }
    const size_t kcol = (size_t)b * len * krs + (size_t)g * d;
    store_frag<T, DM>(dk + kcol, krs, p0, len, dka, scale, scale, ntiles_d, tig);
    store_frag<T, DM>(dv + kcol, krs, p0, len, dva, 1.f, 1.f, ntiles_d, tig);
}

// dQ for ATTM_BQ queries of one head: grid (ceil(len / ATTM_BQ), hq, batch), ATTM_WARPS warps of
// 16 queries. Q and dO stay in registers as A fragments; keys and values stream through shared
// memory ATBM_BK at a time: S = Q·Kᵀ, dP = dO·Vᵀ, then dQ += dS·K with dS re-packed.
template <typename T, int DM>
__device__ void attn_bwd_q_mma_impl(const T* q, const T* k, const T* v, const T* d_o,
                                    const float* lse, const float* dsum, const unsigned* seg,
                                    T* dq, int len, int hq, int hkv, int d, float scale,
                                    int window) {
    extern __shared__ unsigned short smem_u16[];
    const int ldt = d + 8;
    T* kbuf = (T*)smem_u16;             // [2][BK][d + 8]
    T* vbuf = kbuf + 2 * ATBM_BK * ldt;  // [2][BK][d + 8]
    unsigned* kseg = (unsigned*)(vbuf + 2 * ATBM_BK * ldt);  // [2][BK] the keys' segments
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTM_BQ;
    const int g = h / (hq / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int ksteps = d / 16, ntiles_d = d / 8;
    const float sl2 = scale * LOG2E;  // scores in base 2 (see p_ds)
    const size_t qrs = (size_t)hq * d, krs = (size_t)hkv * d;
    const int w0 = q0 + warp * 16, r0 = w0 + gid, r1 = r0 + 8;
    unsigned qa[DM / 16][4], oa[DM / 16][4];
    const size_t o0 = (size_t)(b * len + min(r0, len - 1)) * qrs + (size_t)h * d;
    const size_t o1 = (size_t)(b * len + min(r1, len - 1)) * qrs + (size_t)h * d;
    frags_a_rows<T, DM>(qa, q + o0, q + o1, ksteps, tig);
    frags_a_rows<T, DM>(oa, d_o + o0, d_o + o1, ksteps, tig);
    const size_t l0 = ((size_t)b * hq + h) * len + r0, l1 = l0 + 8;
    const float lr0 = r0 < len ? lse[l0] * LOG2E : 0.f, lr1 = r1 < len ? lse[l1] * LOG2E : 0.f;
    const float dr0 = r0 < len ? dsum[l0] : 0.f, dr1 = r1 < len ? dsum[l1] : 0.f;
    float dqa[DM / 8][4];
#pragma unroll
    for (int n = 0; n < DM / 8; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;
    const int kend = min(q0 + ATTM_BQ, len);  // exclusive: the last query's position + 1
    int kbegin = 0;
    if (window > 0 && !seg) kbegin = max(0, q0 - window + 1);
    // Tile i + 1 is copied (cp.async) while tile i is computed on.
    const T* kg = k + (size_t)b * len * krs + (size_t)g * d;
    const T* vg = v + (size_t)b * len * krs + (size_t)g * d;
    auto load = [&](int p0, int buf) {
        tile_copy(kg, krs, p0, len, ATBM_BK, d, kbuf + buf * ATBM_BK * ldt, ldt);
        tile_copy(vg, krs, p0, len, ATBM_BK, d, vbuf + buf * ATBM_BK * ldt, ldt);
        if (seg)
            for (int i = threadIdx.x; i < ATBM_BK; i += blockDim.x)
                kseg[buf * ATBM_BK + i] = p0 + i < len ? seg[b * len + p0 + i] : 0u;
    };
    // The segments of this thread's two queries.
    const unsigned qs0 = (seg && r0 < len) ? seg[b * len + r0] : 0u;
    const unsigned qs1 = (seg && r1 < len) ? seg[b * len + r1] : 0u;
    const int kfirst = (kbegin / ATBM_BK) * ATBM_BK;
    if (kfirst < kend) load(kfirst, 0);
    cp_async_commit();
    for (int k0 = kfirst, it = 0; k0 < kend; k0 += ATBM_BK, it++) {
        const int cur = it & 1;
        if (k0 + ATBM_BK < kend) load(k0 + ATBM_BK, cur ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const unsigned* ksg = kseg + cur * ATBM_BK;
        const T* ks = kbuf + cur * ATBM_BK * ldt;
        const T* vs = vbuf + cur * ATBM_BK * ldt;
        // Every warp computes every tile: a warp whose queries all come before the tile's keys
        // gets dS = 0, one past the end rows it does not store (a diagonal tile's few wasted
        // products, and no branch around the barrier below).
        {
            float sa[ATBM_BK / 8][4], dpa[ATBM_BK / 8][4];
#pragma unroll
            for (int n = 0; n < ATBM_BK / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) sa[n][e] = dpa[n][e] = 0.f;
#pragma unroll
            for (int s = 0; s < DM / 16; s++) {
                if (s < ksteps) {
#pragma unroll
                    for (int n = 0; n < ATBM_BK / 8; n += 2) {
                        unsigned bk[4], bv[4];
                        frag_b_rows(bk, ks, ldt, n * 8, s * 16);
                        frag_b_rows(bv, vs, ldt, n * 8, s * 16);
                        mma16816<T>(sa[n], qa[s], bk[0], bk[1]);
                        mma16816<T>(sa[n + 1], qa[s], bk[2], bk[3]);
                        mma16816<T>(dpa[n], oa[s], bv[0], bv[1]);
                        mma16816<T>(dpa[n + 1], oa[s], bv[2], bv[3]);
                    }
                }
            }
            // A tile whose keys all come at or before the warp's first query (no segments or
            // window) needs no mask.
            const bool full = !seg && window == 0 && k0 + ATBM_BK - 1 <= w0 &&
                              k0 + ATBM_BK <= len && w0 + 16 <= len;
            unsigned dsa[ATBM_BK / 16][4];
#pragma unroll
            for (int n = 0; n < ATBM_BK / 8; n++) {
                float pr[4], ds[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int p = k0 + n * 8 + tig * 2 + (e & 1), row = e < 2 ? r0 : r1;
                    const unsigned sq = e < 2 ? qs0 : qs1, sp = seg ? ksg[p - k0] : 0u;
                    const bool vis =
                        full || (row < len && p < len &&
                                 att_visible_s(seg != nullptr, sq, sp, row, p, window));
                    p_ds(sa[n][e], dpa[n][e], e < 2 ? lr0 : lr1, e < 2 ? dr0 : dr1, vis, sl2,
                         &pr[e], &ds[e]);
                }
                dsa[n / 2][(n & 1) * 2 + 0] = pack2<T>(ds[0], ds[1]);
                dsa[n / 2][(n & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
            }
            mma_down<T, DM, ATBM_BK / 16>(dqa, dsa, ks, ldt, ntiles_d);
        }
        __syncthreads();  // every warp is done with this tile before it is copied over
    }
    store_frag<T, DM>(dq + (size_t)b * len * qrs + (size_t)h * d, qrs, r0, len, dqa, scale, scale,
                      ntiles_d, tig);
}

#define ATTN_BWD_MMA(T, S, DM)                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        attn_bwd_kv_mma##DM##_##S(const void* q, const void* k, const void* v,                 \
                                  const void* d_o, const float* lse, const float* dsum,        \
                                  const unsigned* seg, void* dk, void* dv, int len, int hq,    \
                                  int hkv, int d, float scale, int window) {                   \
        attn_bwd_kv_mma_impl<T, DM>((const T*)q, (const T*)k, (const T*)v, (const T*)d_o, lse, \
                                    dsum, seg, (T*)dk, (T*)dv, len, hq, hkv, d, scale,         \
                                    window);                                                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATTM_WARPS * 32)                              \
        attn_bwd_q_mma##DM##_##S(const void* q, const void* k, const void* v, const void* d_o, \
                                 const float* lse, const float* dsum, const unsigned* seg,     \
                                 void* dq, int len, int hq, int hkv, int d, float scale,       \
                                 int window) {                                                 \
        attn_bwd_q_mma_impl<T, DM>((const T*)q, (const T*)k, (const T*)v, (const T*)d_o, lse,  \
                                   dsum, seg, (T*)dq, len, hq, hkv, d, scale, window);         \
    }
ATTN_BWD_MMA(bf16, bf16, 64)
ATTN_BWD_MMA(f16, f16, 64)
ATTN_BWD_MMA(bf16, bf16, 128)
ATTN_BWD_MMA(f16, f16, 128)
