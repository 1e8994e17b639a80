// Shared by every fedtune kernel source: element types, conversions and reductions.
// Self-contained (no CUDA headers), so NVRTC needs nothing beyond its own library at run time.
// FEDTUNE_HOST_EMULATION: compiled as host C++ for the tests' emulated GPU
// (engine/tests/cuda_emu), where the few inline PTX instructions have host definitions.
// Element types: float, bf16 and f16 (16-bit storage, f32 arithmetic).

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

struct bf16 { unsigned short v; };
struct f16 { unsigned short v; };

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __uint_as_float(((unsigned)x.v) << 16); }
__device__ __forceinline__ float ld(f16 x) {
#ifdef FEDTUNE_HOST_EMULATION
    return ft_f16_to_f32(x.v);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.v));
    return f;
#endif
}

template <typename T> __device__ __forceinline__ T st(float f);
template <> __device__ __forceinline__ float st<float>(float f) { return f; }
// Round to nearest even, as torch's `.to(torch.bfloat16)`; NaN stays NaN.
template <> __device__ __forceinline__ bf16 st<bf16>(float f) {
    unsigned u = __float_as_uint(f);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.v = 0x7fc0;
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.v = (unsigned short)(u >> 16);
    }
    return r;
}
template <> __device__ __forceinline__ f16 st<f16>(float f) {
    f16 r;
#ifdef FEDTUNE_HOST_EMULATION
    r.v = ft_f32_to_f16(f);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.v) : "f"(f));
#endif
    return r;
}

// Rounds through T (what a value becomes when stored in T).
template <typename T> __device__ __forceinline__ float rnd(float f) { return ld(st<T>(f)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(t);
}

// log Σ exp(x[i]) over a row of n f32 values (block-wide; every thread gets the result).
__device__ __forceinline__ float row_logsumexp(const float* x, int n, float* scratch) {
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, scratch);
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(x[i] - mx);
    s = block_sum(s, scratch);
    return mx + logf(s);
}

// A grid-stride loop over n elements.
#define GRID_STRIDE(i, n)                                                                      \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)(n);           \
         i += (size_t)gridDim.x * blockDim.x)

#define EACH_TYPE(M) M(float, f32) M(bf16, bf16) M(f16, f16)
