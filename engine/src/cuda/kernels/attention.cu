// Causal attention with GQA, a sliding window and packing segments, FlashAttention-2 style:
// each block takes ATT_BQ queries of one head and streams ATT_BK keys at a time through shared
// memory with an online softmax, so no [t, t] matrix exists. Keeps lse = log Σ exp(s) per
// query ([batch, hq, tq]) for the backward pass.
//
// Layout: rows. Query i of sequence b is row b·tq + i of q/o (row stride q_rs elements, head h
// at column h·d); key position p of sequence b is at k + b·k_bs + p·k_rs (head g at g·d), the
// same for v. Queries are the last tq of tk positions (q_off = tk − tq, a KV cache).
// Visibility of key p from query position s: p ≤ s; s − p < window when window > 0; with
// segments (tq = tk only), same nonzero segment, and a padding query (segment 0) sees only
// itself, so every softmax row stays finite.
#define ATT_BQ 16
#define ATT_BK 32
#define ATT_WARPS 4
#define ATT_ROWS 4  // ATT_BQ / ATT_WARPS
#define ATT_DMAX 128

template <typename T>
__device__ void attn_fwd_impl(const T* q, const T* k, const T* v, T* o, float* lse,
                              const unsigned* seg, int tq, int tk, int q_off, int hq, int hkv,
                              int d, long long q_rs, long long k_bs, long long k_rs, float scale,
                              int window) {
    extern __shared__ float sm[];
    float* qs = sm;                   // [BQ][d], pre-scaled
    float* ks = qs + ATT_BQ * d;      // [BK][d + 1] (padded: lanes read one row each)
    float* vs = ks + ATT_BK * (d + 1);  // [BK][d]
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATT_BQ;
    const int g = h / (hq / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = threadIdx.x; i < ATT_BQ * d; i += blockDim.x) {
        int r = i / d, c = i % d, qi = q0 + r;
        qs[i] = qi < tq ? ld(q[(size_t)(b * tq + qi) * q_rs + (size_t)h * d + c]) * scale : 0.f;
    }
    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][ATT_DMAX / 32];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_DMAX / 32; i++) acc[r][i] = 0.f;
    }
    const int qlast = min(q0 + ATT_BQ, tq) - 1;
    const int kend = min(q_off + qlast + 1, tk);  // exclusive
    int kbegin = 0;
    if (window > 0 && !seg) kbegin = max(0, q_off + q0 - window + 1);
    for (int k0 = (kbegin / ATT_BK) * ATT_BK; k0 < kend; k0 += ATT_BK) {
        __syncthreads();
        for (int i = threadIdx.x; i < ATT_BK * d; i += blockDim.x) {
            int r = i / d, c = i % d, p = k0 + r;
            float kv = 0.f, vv = 0.f;
            if (p < tk) {
                size_t off = (size_t)b * k_bs + (size_t)p * k_rs + (size_t)g * d + c;
                kv = ld(k[off]);
                vv = ld(v[off]);
            }
            ks[r * (d + 1) + c] = kv;
            vs[r * d + c] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < ATT_ROWS; rr++) {
            const int qi = q0 + warp * ATT_ROWS + rr;
            if (qi >= tq) continue;  // uniform across the warp
            const int s_pos = q_off + qi;
            const int p = k0 + lane;
            bool vis = p < tk && p <= s_pos;
            if (vis && window > 0 && s_pos - p >= window) vis = false;
            if (seg) {
                unsigned sq = seg[b * tq + qi];
                if (sq == 0) {
                    vis = p == s_pos;
                } else if (vis) {
                    unsigned sk = seg[b * tk + p];
                    vis = sk == sq;
                }
            }
            float s = -INFINITY;
            if (vis) {
                const float* qr = qs + (warp * ATT_ROWS + rr) * d;
                const float* kr = ks + lane * (d + 1);
                float dot = 0.f;
                for (int c = 0; c < d; c++) dot = fmaf(qr[c], kr[c], dot);
                s = dot;
            }
            const float mnew = fmaxf(m[rr], warp_max(s));
            if (mnew == -INFINITY) continue;  // uniform: nothing visible yet
            const float pr = vis ? expf(s - mnew) : 0.f;
            const float alpha = expf(m[rr] - mnew);
            l[rr] = l[rr] * alpha + warp_sum(pr);
            m[rr] = mnew;
#pragma unroll
            for (int i = 0; i < ATT_DMAX / 32; i++) acc[rr][i] *= alpha;
            for (int j = 0; j < ATT_BK; j++) {
                const float pj = __shfl_sync(0xffffffffu, pr, j);
                const float* vr = vs + j * d;
#pragma unroll
                for (int i = 0; i < ATT_DMAX / 32; i++) {
                    int c = lane + 32 * i;
                    if (c < d) acc[rr][i] = fmaf(pj, vr[c], acc[rr][i]);
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ATT_ROWS; rr++) {
        const int qi = q0 + warp * ATT_ROWS + rr;
        if (qi >= tq) continue;
        const float inv = 1.f / l[rr];
        T* orow = o + (size_t)(b * tq + qi) * q_rs + (size_t)h * d;
#pragma unroll
        for (int i = 0; i < ATT_DMAX / 32; i++) {
            int c = lane + 32 * i;
            if (c < d) orow[c] = st<T>(acc[rr][i] * inv);
        }
        if (lse && lane == 0) lse[((size_t)b * hq + h) * tq + qi] = m[rr] + logf(l[rr]);
    }
}

#define ATTN_FWD(T, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                               \
        attn_fwd_##S(const void* q, const void* k, const void* v, void* o, float* lse,         \
                     const unsigned* seg, int tq, int tk, int q_off, int hq, int hkv, int d,   \
                     long long q_rs, long long k_bs, long long k_rs, float scale, int window) { \
        attn_fwd_impl<T>((const T*)q, (const T*)k, (const T*)v, (T*)o, lse, seg, tq, tk,       \
                         q_off, hq, hkv, d, q_rs, k_bs, k_rs, scale, window);                  \
    }
EACH_TYPE(ATTN_FWD)
