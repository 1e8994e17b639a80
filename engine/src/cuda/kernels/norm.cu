// RMSNorm with the residual add folded in (transformers' LlamaRMSNorm):
//   h = x (+ p), rounded to T;  r = 1/sqrt(mean(h²) + eps);  y = w ⊙ T(h·r)
// One block per row. `p`, `h_out` and `r_out` may be null.
template <typename T>
__device__ void rmsnorm_impl(const T* x, const T* p, const T* w, T* h_out, T* y, float* r_out,
                             int n, int d, float eps) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= n) return;
    const T* xr = x + (size_t)row * d;
    const T* pr = p ? p + (size_t)row * d : nullptr;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = ld(xr[i]);
        if (pr) v = rnd<T>(v + ld(pr[i]));
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / (float)d + eps);
    if (r_out && threadIdx.x == 0) r_out[row] = r;
    T* yr = y + (size_t)row * d;
    T* hr = h_out ? h_out + (size_t)row * d : nullptr;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = ld(xr[i]);
        if (pr) v = rnd<T>(v + ld(pr[i]));
        if (hr) hr[i] = st<T>(v);
        yr[i] = st<T>(ld(w[i]) * rnd<T>(v * r));
    }
}

#define RMSNORM(T, S)                                                                          \
    extern "C" __global__ void rmsnorm_##S(const void* x, const void* p, const void* w,        \
                                           void* h, void* y, float* r, int n, int d,           \
                                           float eps) {                                        \
        rmsnorm_impl<T>((const T*)x, (const T*)p, (const T*)w, (T*)h, (T*)y, r, n, d, eps);    \
    }
EACH_TYPE(RMSNORM)
