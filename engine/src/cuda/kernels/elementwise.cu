// Element-wise kernels: SwiGLU, row gathers (the embedding), bias add, dtype casts, row copies, and the
// LM head's log-probabilities from f32 logits.

// a = T(silu(g)) ⊙ u, as transformers' act_fn(gate) * up in T.
template <typename T> __device__ void swiglu_impl(const T* g, const T* u, T* a, size_t n) {
    GRID_STRIDE(i, n) {
        float x = ld(g[i]);
        float s = rnd<T>(x / (1.f + expf(-x)));
        a[i] = st<T>(s * ld(u[i]));
    }
}

// y[i, :] += bias
template <typename T> __device__ void add_bias_impl(T* y, const T* bias, int n, int cols) {
    GRID_STRIDE(i, (size_t)n * cols) { y[i] = st<T>(ld(y[i]) + ld(bias[i % cols])); }
}

template <typename T> __device__ void to_f32_impl(const T* x, float* y, size_t n) {
    GRID_STRIDE(i, n) { y[i] = ld(x[i]); }
}
template <typename T> __device__ void from_f32_impl(const float* x, T* y, size_t n) {
    GRID_STRIDE(i, n) { y[i] = st<T>(x[i]); }
}

// dst[dst_row0 + r] (row stride dst_rs) = src[r] (row stride src_rs), `cols` elements a row:
// appends keys/values to a KV cache, gathers rows.
template <typename T>
__device__ void copy_rows_impl(const T* src, long long src_rs, T* dst, long long dst_rs,
                               int rows, int cols) {
    GRID_STRIDE(i, (size_t)rows * cols) {
        size_t r = i / cols, c = i % cols;
        dst[r * dst_rs + c] = src[r * src_rs + c];
    }
}

// y[i, j] *= c[j] + add (DoRA's per-output factor; add = −1 gives (c − 1)⊙y).
template <typename T>
__device__ void scale_cols_impl(T* y, const float* c, float add, int n, int cols) {
    GRID_STRIDE(i, (size_t)n * cols) { y[i] = st<T>(ld(y[i]) * (c[i % cols] + add)); }
}

// out[j] = inv[j]·Σ_i a[i, j]·b[i, j], one thread per column, rows in order (deterministic):
// DoRA's magnitude gradient.
template <typename T>
__device__ void col_dot_impl(const T* a, const T* b, const float* inv, float* out, int rows,
                             int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (int r = 0; r < rows; r++) s += ld(a[(size_t)r * cols + j]) * ld(b[(size_t)r * cols + j]);
    out[j] = s * inv[j];
}

// out[i, :] = x[rows[i], :] (also the embedding lookup)
template <typename T>
__device__ void gather_rows_impl(const T* x, const unsigned* rows, T* out, int n, int cols) {
    GRID_STRIDE(i, (size_t)n * cols) {
        size_t r = i / cols, c = i % cols;
        out[i] = x[(size_t)rows[r] * cols + c];
    }
}

#define ELEMENTWISE(T, S)                                                                      \
    extern "C" __global__ void swiglu_##S(const void* g, const void* u, void* a,               \
                                          unsigned long long n) {                              \
        swiglu_impl<T>((const T*)g, (const T*)u, (T*)a, n);                                    \
    }                                                                                          \
    extern "C" __global__ void add_bias_##S(void* y, const void* bias, int n, int cols) {      \
        add_bias_impl<T>((T*)y, (const T*)bias, n, cols);                                      \
    }                                                                                          \
    extern "C" __global__ void to_f32_##S(const void* x, float* y, unsigned long long n) {     \
        to_f32_impl<T>((const T*)x, y, n);                                                     \
    }                                                                                          \
    extern "C" __global__ void from_f32_##S(const float* x, void* y, unsigned long long n) {   \
        from_f32_impl<T>(x, (T*)y, n);                                                         \
    }                                                                                          \
    extern "C" __global__ void copy_rows_##S(const void* src, long long src_rs, void* dst,     \
                                             long long dst_rs, int rows, int cols) {           \
        copy_rows_impl<T>((const T*)src, src_rs, (T*)dst, dst_rs, rows, cols);                 \
    }                                                                                          \
    extern "C" __global__ void gather_rows_##S(const void* x, const unsigned* rows, void* out, \
                                               int n, int cols) {                              \
        gather_rows_impl<T>((const T*)x, rows, (T*)out, n, cols);                              \
    }                                                                                          \
    extern "C" __global__ void scale_cols_##S(void* y, const float* c, float add, int n,       \
                                              int cols) {                                      \
        scale_cols_impl<T>((T*)y, c, add, n, cols);                                            \
    }                                                                                          \
    extern "C" __global__ void col_dot_##S(const void* a, const void* b, const float* inv,     \
                                           float* out, int rows, int cols) {                   \
        col_dot_impl<T>((const T*)a, (const T*)b, inv, out, rows, cols);                       \
    }
EACH_TYPE(ELEMENTWISE)

// logp[i] = logits[i, target[i]] − logsumexp(logits[i, :]), one block per row (f32 logits).
extern "C" __global__ void target_logprobs(const float* logits, const unsigned* targets,
                                           float* logp, int rows, int vocab) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* x = logits + (size_t)row * vocab;
    const float lse = row_logsumexp(x, vocab, scratch);
    if (threadIdx.x == 0) logp[row] = x[targets[row]] - lse;
}
