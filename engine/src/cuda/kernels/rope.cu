// Rotary embedding on rows [n, heads·d], in place, with per-token tables cos/sin [n, d] (f32):
//   x'ᵢ = xᵢ·cosᵢ − x_{i+d/2}·sinᵢ,  x'_{i+d/2} = x_{i+d/2}·cos_{i+d/2} + xᵢ·sin_{i+d/2}
// (`inverse`: the transpose, for backward). One thread per rotated pair.
template <typename T>
__device__ void rope_impl(T* x, const float* cos, const float* sin, int n, int heads, int d,
                          int inverse) {
    int half = d / 2;
    size_t pairs = (size_t)n * heads * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < pairs;
         i += (size_t)gridDim.x * blockDim.x) {
        int j = (int)(i % half);
        size_t rh = i / half;  // row·heads + head
        int row = (int)(rh / heads);
        T* v = x + rh * d;
        const float* c = cos + (size_t)row * d;
        const float* s = sin + (size_t)row * d;
        float a = ld(v[j]), b = ld(v[j + half]);
        float sa = inverse ? -s[j] : s[j];
        float sb = inverse ? -s[j + half] : s[j + half];
        v[j] = st<T>(a * c[j] - b * sa);
        v[j + half] = st<T>(b * c[j + half] + a * sb);
    }
}

#define ROPE(T, S)                                                                             \
    extern "C" __global__ void rope_##S(void* x, const float* cos, const float* sin, int n,    \
                                        int heads, int d, int inverse) {                       \
        rope_impl<T>((T*)x, cos, sin, n, heads, d, inverse);                                   \
    }
EACH_TYPE(ROPE)
