// Backward kernels of the training step: RMSNorm (input gradient, and the weight gradient as
// deterministic column partials), SwiGLU, the LM head's softmax gradient, and causal attention
// (FlashAttention-2 style: probabilities recomputed from the forward's lse; dK/dV and dQ in two
// kernels, so no atomics and the same bits on every run). Formulas and layouts follow the host
// kernels (engine/src/kernels/elementwise.rs, attention.rs). Arithmetic in f32, storage in T.

// RMSNorm backward, one block per row (y = w ⊙ x·r, r = 1/rms saved by the forward):
//   g = dy ⊙ w;  m = mean(g ⊙ x)·r;  dx = r·(g − x·r·m) (+ res)
template <typename T>
__device__ void rmsnorm_bwd_impl(const T* x, const float* r, const T* w, const T* dy, const T* res,
                                 T* dx, int n, int d) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= n) return;
    const T* xr = x + (size_t)row * d;
    const T* gr = dy + (size_t)row * d;
    float acc = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) acc += ld(gr[i]) * ld(w[i]) * ld(xr[i]);
    acc = block_sum(acc, scratch);
    const float rr = r[row];
    const float m = acc * rr / (float)d;
    T* out = dx + (size_t)row * d;
    const T* rs = res ? res + (size_t)row * d : nullptr;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float xh = ld(xr[i]) * rr;
        float v = rr * (ld(gr[i]) * ld(w[i]) - xh * m);
        if (rs) v += ld(rs[i]);
        out[i] = st<T>(v);
    }
}

// The weight gradient's partial sums: part[c, j] = Σ_{rows of chunk c} dy[i, j]·x[i, j]·r[i],
// chunks of `chunk` rows; grid (ceil(d / blockDim), chunks). `col_sum_f32` adds the chunks in
// order.
template <typename T>
__device__ void rmsnorm_dw_impl(const T* x, const float* r, const T* dy, float* part, int n, int d,
                                int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int c = blockIdx.y;
    if (j >= d) return;
    int end = min(n, (c + 1) * chunk);
    float s = 0.f;
    for (int i = c * chunk; i < end; i++)
        s += ld(dy[(size_t)i * d + j]) * ld(x[(size_t)i * d + j]) * r[i];
    part[(size_t)c * d + j] = s;
}

// SwiGLU backward with s = sigmoid(g):  du = da·g·s;  dg = da·u·s·(1 + g·(1 − s)).
template <typename T>
__device__ void swiglu_bwd_impl(const T* g, const T* u, const T* da, T* dg, T* du, size_t n) {
    GRID_STRIDE(i, n) {
        float x = ld(g[i]), uv = ld(u[i]), a = ld(da[i]);
        float s = 1.f / (1.f + expf(-x));
        du[i] = st<T>(a * x * s);
        dg[i] = st<T>(a * uv * s * (1.f + x * (1.f - s)));
    }
}

// The gradient of a row gather (embedding rows, target rows), without atomics: output row r is
// Σ scale[i]·src[i] over the source rows i listed in idx[off[r] .. off[r + 1]), added in that
// order (deterministic); scale == nullptr means 1. One block per output row.
template <typename T>
__device__ void scatter_rows_impl(const T* src, const float* scale, const int* off, const int* idx,
                                  T* out, int cols) {
    const int r = blockIdx.x;
    const int a = off[r], b = off[r + 1];
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float s = 0.f;
        for (int k = a; k < b; k++) {
            const int i = idx[k];
            const float v = ld(src[(size_t)i * cols + j]);
            s += scale ? scale[i] * v : v;
        }
        out[(size_t)r * cols + j] = st<T>(s);
    }
}

// Inverted dropout: y[i] = x[i]·scale where the counter-based hash of (seed, i) clears the
// threshold (p·2³²), else 0. The mask is a function of the seed and the element index only,
// so forward and backward regenerate the same mask without storing it.
__device__ __forceinline__ unsigned dropout_hash(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (unsigned)((z ^ (z >> 31)) >> 32);
}

template <typename T>
__device__ void dropout_impl(const T* x, T* y, size_t n, unsigned long long seed,
                             unsigned threshold, float scale) {
    GRID_STRIDE(i, n) {
        y[i] = dropout_hash(seed, i) >= threshold ? st<T>(ld(x[i]) * scale) : st<T>(0.f);
    }
}

// y += x (one parameter's gradients from two uses, such as a tied head and embedding).
template <typename T>
__device__ void add_impl(T* y, const T* x, size_t n) {
    GRID_STRIDE(i, n) { y[i] = st<T>(ld(y[i]) + ld(x[i])); }
}

#define BACKWARD_ELEMENTWISE(T, S)                                                             \
    extern "C" __global__ void rmsnorm_bwd_##S(const void* x, const float* r, const void* w,   \
                                               const void* dy, const void* res, void* dx,      \
                                               int n, int d) {                                 \
        rmsnorm_bwd_impl<T>((const T*)x, r, (const T*)w, (const T*)dy, (const T*)res, (T*)dx,  \
                            n, d);                                                             \
    }                                                                                          \
    extern "C" __global__ void rmsnorm_dw_##S(const void* x, const float* r, const void* dy,   \
                                              float* part, int n, int d, int chunk) {          \
        rmsnorm_dw_impl<T>((const T*)x, r, (const T*)dy, part, n, d, chunk);                   \
    }                                                                                          \
    extern "C" __global__ void swiglu_bwd_##S(const void* g, const void* u, const void* da,    \
                                              void* dg, void* du, unsigned long long n) {      \
        swiglu_bwd_impl<T>((const T*)g, (const T*)u, (const T*)da, (T*)dg, (T*)du, n);         \
    }                                                                                          \
    extern "C" __global__ void scatter_rows_##S(const void* src, const float* scale,           \
                                                const int* off, const int* idx, void* out,     \
                                                int cols) {                                    \
        scatter_rows_impl<T>((const T*)src, scale, off, idx, (T*)out, cols);                   \
    }                                                                                          \
    extern "C" __global__ void add_##S(void* y, const void* x, unsigned long long n) {         \
        add_impl<T>((T*)y, (const T*)x, n);                                                    \
    }                                                                                          \
    extern "C" __global__ void dropout_##S(const void* x, void* y, unsigned long long n,       \
                                           unsigned long long seed, unsigned threshold,        \
                                           float scale) {                                      \
        dropout_impl<T>((const T*)x, (T*)y, n, seed, threshold, scale);                        \
    }
EACH_TYPE(BACKWARD_ELEMENTWISE)

// out[j] = Σ_c part[c, j] over `chunks` rows of `cols`, in order (deterministic).
extern "C" __global__ void col_sum_f32(const float* part, float* out, int chunks, int cols) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (int c = 0; c < chunks; c++) s += part[(size_t)c * cols + j];
    out[j] = s;
}

// DoRA's norms, one block per row of W' = W + s·B·A (f32 [rows, cols]): inv[j] = 1/‖W'_j‖ and
// c[j] = m[j]·inv[j], or with m null c[j] = ‖W'_j‖ (a fresh adapter's magnitude).
extern "C" __global__ void dora_norm(const float* full, const float* m, float* c, float* inv,
                                     int rows, int cols) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* x = full + (size_t)row * cols;
    float s = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += x[i] * x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(s);
        inv[row] = 1.f / norm;
        c[row] = m ? m[row] / norm : norm;
    }
}

// The LM head's log-probabilities and their gradient direction, one block per row of f32
// logits: logp[i] = logits[i, y] − lse, and the row is overwritten with e_y − softmax (the
// gradient of logp with respect to the logits; the caller multiplies by W for dℓ/dh); with
// `entropy` (else null), each row's entropy too.
extern "C" __global__ void logprob_grad(float* logits, const unsigned* targets, float* logp,
                                        float* entropy, int rows, int vocab) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    float* x = logits + (size_t)row * vocab;
    const float lse = row_logsumexp(x, vocab, scratch);
    const unsigned y = targets[row];
    if (entropy) {
        // H = −Σ p·log p = lse − Σ p·x, from the logits before they are overwritten.
        float px = 0.f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) px += expf(x[i] - lse) * x[i];
        px = block_sum(px, scratch);
        if (threadIdx.x == 0) entropy[row] = lse - px;
    }
    if (threadIdx.x == 0) logp[row] = x[y] - lse;
    __syncthreads();  // every thread read x[y] (thread 0) before it is overwritten
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        x[i] = ((unsigned)i == y ? 1.f : 0.f) - expf(x[i] - lse);
}

// ---- attention backward (training: tq = tk = len, rows [batch·len, heads·d]) ----
// Visibility is the forward's: p ≤ s; s − p < window when window > 0; with segments, same
// nonzero segment, and a padding query (segment 0) sees only itself.
__device__ __forceinline__ bool att_visible(const unsigned* seg, int b, int len, int s, int p,
                                            int window) {
    if (p > s) return false;
    if (window > 0 && s - p >= window) return false;
    if (seg) {
        unsigned sq = seg[b * len + s];
        if (sq == 0) return p == s;
        return seg[b * len + p] == sq;
    }
    return true;
}

// dsum[b, h, i] = Σ_c dO[i, h, c]·O[i, h, c]: one warp per (row, head).
template <typename T>
__device__ void attn_dsum_impl(const T* o, const T* d_o, float* dsum, int batch, int len, int hq,
                               int d) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= batch * len * hq) return;
    const int row = warp / hq, h = warp % hq;
    const size_t base = (size_t)row * hq * d + (size_t)h * d;
    float s = 0.f;
    for (int c = lane; c < d; c += 32) s += ld(o[base + c]) * ld(d_o[base + c]);
    s = warp_sum(s);
    const int b = row / len, i = row % len;
    if (lane == 0) dsum[((size_t)b * hq + h) * len + i] = s;
}

// Rows r0 .. r0 + rows of two inputs with the same layout (row i of sequence b at
// (b·len + i)·rs, columns col0 .. col0 + d) into f32 shared tiles of row stride `stride`, the first
// scaled by sa; rows at or past len are zeros.
template <typename T>
__device__ void load_tiles(const T* a, const T* b, float* ta, float* tb, int rows, int r0, int len,
                           int bi, size_t rs, size_t col0, int d, int stride, float sa) {
    for (int i = threadIdx.x; i < rows * d; i += blockDim.x) {
        int r = i / d, c = i % d, p = r0 + r;
        float av = 0.f, bv = 0.f;
        if (p < len) {
            size_t off = (size_t)(bi * len + p) * rs + col0 + c;
            av = ld(a[off]) * sa;
            bv = ld(b[off]);
        }
        ta[r * stride + c] = av;
        tb[r * stride + c] = bv;
    }
}

#define ATB_BK 32   // keys per dK/dV block (8 per warp, 4 warps)
#define ATB_KW 8    // keys per warp
#define ATB_QT 8    // queries staged at a time
#define ATB_DMAX 128

// dK and dV for ATB_BK keys of one KV head: grid (ceil(len / ATB_BK), hkv, batch), 4 warps.
// Every query head of the group and every query that sees a key of the block:
//   p = exp(scale·q·k − lse);  ds = p·(dO·v − dsum);  dV += p·dO;  dK += scale·ds·q.
template <typename T>
__device__ void attn_bwd_kv_impl(const T* q, const T* k, const T* v, const T* d_o,
                                 const float* lse, const float* dsum, const unsigned* seg, T* dk,
                                 T* dv, int len, int hq, int hkv, int d, float scale, int window) {
    extern __shared__ float sm[];
    float* ks = sm;                  // [BK][d]
    float* vs = ks + ATB_BK * d;     // [BK][d]
    float* qs = vs + ATB_BK * d;     // [QT][d]
    float* dos = qs + ATB_QT * d;    // [QT][d]
    float* ls = dos + ATB_QT * d;    // [QT] lse
    float* ds = ls + ATB_QT;         // [QT] dsum
    const int b = blockIdx.z, g = blockIdx.y, k0 = blockIdx.x * ATB_BK;
    const int groups = hq / hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t qrs = (size_t)hq * d, krs = (size_t)hkv * d;
    load_tiles(k, v, ks, vs, ATB_BK, k0, len, b, krs, (size_t)g * d, d, d, 1.f);
    float akk[ATB_KW][ATB_DMAX / 32], avv[ATB_KW][ATB_DMAX / 32];
#pragma unroll
    for (int j = 0; j < ATB_KW; j++)
#pragma unroll
        for (int i = 0; i < ATB_DMAX / 32; i++) akk[j][i] = avv[j][i] = 0.f;
    // Queries before the block see none of its keys; with a window (no segments) neither do
    // queries window or more past its last key.
    int qend = len;
    if (window > 0 && !seg) qend = min(len, k0 + ATB_BK - 1 + window);
    for (int hh = 0; hh < groups; hh++) {
        const int h = g * groups + hh;
        for (int q0 = k0; q0 < qend; q0 += ATB_QT) {
            __syncthreads();
            load_tiles(q, d_o, qs, dos, ATB_QT, q0, len, b, qrs, (size_t)h * d, d, d, 1.f);
            if (threadIdx.x < ATB_QT) {
                int qi = q0 + threadIdx.x;
                size_t li = ((size_t)b * hq + h) * len + qi;
                ls[threadIdx.x] = qi < len ? lse[li] : 0.f;
                ds[threadIdx.x] = qi < len ? dsum[li] : 0.f;
            }
            __syncthreads();
            for (int r = 0; r < ATB_QT; r++) {
                const int qi = q0 + r;
                if (qi >= qend) break;
                float qv[ATB_DMAX / 32], dov[ATB_DMAX / 32];
#pragma unroll
                for (int i = 0; i < ATB_DMAX / 32; i++) {
                    int c = lane + 32 * i;
                    qv[i] = c < d ? qs[r * d + c] : 0.f;
                    dov[i] = c < d ? dos[r * d + c] : 0.f;
                }
#pragma unroll
                for (int j = 0; j < ATB_KW; j++) {
                    const int kr = warp * ATB_KW + j, p = k0 + kr;
                    // Uniform across the warp: p and qi are.
                    if (p >= len || !att_visible(seg, b, len, qi, p, window)) continue;
                    float sdot = 0.f, pdot = 0.f;
#pragma unroll
                    for (int i = 0; i < ATB_DMAX / 32; i++) {
                        int c = lane + 32 * i;
                        if (c < d) {
                            sdot = fmaf(qv[i], ks[kr * d + c], sdot);
                            pdot = fmaf(dov[i], vs[kr * d + c], pdot);
                        }
                    }
                    sdot = warp_sum(sdot);
                    pdot = warp_sum(pdot);
                    const float pr = expf(sdot * scale - ls[r]);
                    const float dsc = pr * (pdot - ds[r]) * scale;
#pragma unroll
                    for (int i = 0; i < ATB_DMAX / 32; i++) {
                        avv[j][i] = fmaf(pr, dov[i], avv[j][i]);
                        akk[j][i] = fmaf(dsc, qv[i], akk[j][i]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < ATB_KW; j++) {
        const int p = k0 + warp * ATB_KW + j;
        if (p >= len) continue;
        const size_t off = (size_t)(b * len + p) * krs + (size_t)g * d;
#pragma unroll
        for (int i = 0; i < ATB_DMAX / 32; i++) {
            int c = lane + 32 * i;
            if (c < d) {
                dk[off + c] = st<T>(akk[j][i]);
                dv[off + c] = st<T>(avv[j][i]);
            }
        }
    }
}

#define ATB_BQ 8     // queries per dQ block (2 per warp, 4 warps)
#define ATB_ROWS 2
#define ATB_KB 32    // keys staged at a time, one per lane

// dQ for ATB_BQ queries of one head: grid (ceil(len / ATB_BQ), hq, batch), 4 warps.
//   dq = scale·Σ_p ds_p·k_p, streaming keys through shared memory as the forward does.
template <typename T>
__device__ void attn_bwd_q_impl(const T* q, const T* k, const T* v, const T* d_o, const float* lse,
                                const float* dsum, const unsigned* seg, T* dq, int len, int hq,
                                int hkv, int d, float scale, int window) {
    extern __shared__ float sm[];
    float* qs = sm;                       // [BQ][d], pre-scaled
    float* dos = qs + ATB_BQ * d;         // [BQ][d]
    float* ks = dos + ATB_BQ * d;         // [KB][d + 1]
    float* vs = ks + ATB_KB * (d + 1);    // [KB][d + 1]
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATB_BQ;
    const int g = h / (hq / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t qrs = (size_t)hq * d, krs = (size_t)hkv * d;
    load_tiles(q, d_o, qs, dos, ATB_BQ, q0, len, b, qrs, (size_t)h * d, d, d, scale);
    float lrow[ATB_ROWS], drow[ATB_ROWS], acc[ATB_ROWS][ATB_DMAX / 32];
#pragma unroll
    for (int rr = 0; rr < ATB_ROWS; rr++) {
        const int qi = q0 + warp * ATB_ROWS + rr;
        const size_t li = ((size_t)b * hq + h) * len + qi;
        lrow[rr] = qi < len ? lse[li] : 0.f;
        drow[rr] = qi < len ? dsum[li] : 0.f;
#pragma unroll
        for (int i = 0; i < ATB_DMAX / 32; i++) acc[rr][i] = 0.f;
    }
    const int kend = min(q0 + ATB_BQ, len);  // exclusive: the last query's position + 1
    int kbegin = 0;
    if (window > 0 && !seg) kbegin = max(0, q0 - window + 1);
    for (int k0 = (kbegin / ATB_KB) * ATB_KB; k0 < kend; k0 += ATB_KB) {
        __syncthreads();
        load_tiles(k, v, ks, vs, ATB_KB, k0, len, b, krs, (size_t)g * d, d, d + 1, 1.f);
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < ATB_ROWS; rr++) {
            const int r = warp * ATB_ROWS + rr, qi = q0 + r;
            if (qi >= len) continue;  // uniform across the warp
            const int p = k0 + lane;
            const bool vis = p < len && att_visible(seg, b, len, qi, p, window);
            float dsv = 0.f;
            if (vis) {
                const float* qr = qs + r * d;
                const float* dr = dos + r * d;
                const float* kr = ks + lane * (d + 1);
                const float* vr = vs + lane * (d + 1);
                float sdot = 0.f, pdot = 0.f;
                for (int c = 0; c < d; c++) {
                    sdot = fmaf(qr[c], kr[c], sdot);
                    pdot = fmaf(dr[c], vr[c], pdot);
                }
                const float pr = expf(sdot - lrow[rr]);
                dsv = pr * (pdot - drow[rr]);
            }
            for (int j = 0; j < ATB_KB; j++) {
                const float dj = __shfl_sync(0xffffffffu, dsv, j);
                const float* kr = ks + j * (d + 1);
#pragma unroll
                for (int i = 0; i < ATB_DMAX / 32; i++) {
                    int c = lane + 32 * i;
                    if (c < d) acc[rr][i] = fmaf(dj, kr[c], acc[rr][i]);
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ATB_ROWS; rr++) {
        const int qi = q0 + warp * ATB_ROWS + rr;
        if (qi >= len) continue;
        T* out = dq + (size_t)(b * len + qi) * qrs + (size_t)h * d;
#pragma unroll
        for (int i = 0; i < ATB_DMAX / 32; i++) {
            int c = lane + 32 * i;
            if (c < d) out[c] = st<T>(acc[rr][i] * scale);
        }
    }
}

#define ATTN_BWD(T, S)                                                                         \
    extern "C" __global__ void attn_dsum_##S(const void* o, const void* d_o, float* dsum,      \
                                             int batch, int len, int hq, int d) {              \
        attn_dsum_impl<T>((const T*)o, (const T*)d_o, dsum, batch, len, hq, d);                \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        attn_bwd_kv_##S(const void* q, const void* k, const void* v, const void* d_o,          \
                        const float* lse, const float* dsum, const unsigned* seg, void* dk,    \
                        void* dv, int len, int hq, int hkv, int d, float scale, int window) {  \
        attn_bwd_kv_impl<T>((const T*)q, (const T*)k, (const T*)v, (const T*)d_o, lse, dsum,   \
                            seg, (T*)dk, (T*)dv, len, hq, hkv, d, scale, window);              \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        attn_bwd_q_##S(const void* q, const void* k, const void* v, const void* d_o,           \
                       const float* lse, const float* dsum, const unsigned* seg, void* dq,     \
                       int len, int hq, int hkv, int d, float scale, int window) {             \
        attn_bwd_q_impl<T>((const T*)q, (const T*)k, (const T*)v, (const T*)d_o, lse, dsum,    \
                           seg, (T*)dq, len, hq, hkv, d, scale, window);                       \
    }
EACH_TYPE(ATTN_BWD)
