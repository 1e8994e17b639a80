// The CUDA C++ that fedtune's kernels use, defined for the host CPU: the kernel sources of
// engine/src/cuda/kernels compile with this header as ordinary C++ (FEDTUNE_HOST_EMULATION) and
// run in the emulated driver (driver.cpp), which executes each block's threads as fibers on
// one host thread. __syncthreads() waits for every thread of the block, a warp shuffle or
// mma.sync for every live lane of the warp; a barrier not every thread reaches, a shuffle
// reading an exited lane or an mma.sync without the whole warp fails the launch (driver.cpp).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <utility>

#define FEDTUNE_HOST_EMULATION 1

// Kernel entry points are marked so that the build can list them from the preprocessed program
// (see emu.rs); the mark is defined empty where the program is compiled.
#define __global__ __ft_kernel__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time on a host thread, its threads as fibers of that thread.
#define __shared__ static thread_local
#define __constant__ static const

struct ft_dim3 {
    unsigned x, y, z;
};
// Hidden: the kernels reach them without a lookup through the dynamic linker.
extern thread_local ft_dim3 ft_thread_idx __attribute__((visibility("hidden")));
extern thread_local ft_dim3 ft_block_idx __attribute__((visibility("hidden")));
extern thread_local ft_dim3 ft_block_dim __attribute__((visibility("hidden")));
extern thread_local ft_dim3 ft_grid_dim __attribute__((visibility("hidden")));
#define threadIdx ft_thread_idx
#define blockIdx ft_block_idx
#define blockDim ft_block_dim
#define gridDim ft_grid_dim

// Provided by driver.cpp.
extern "C" void ft_syncthreads();
extern "C" uint64_t ft_shfl(uint64_t v, int src_lane, int xor_mode);
extern "C" void* ft_dynamic_smem();
extern "C" void ft_cp_async(void* dst, const void* src, unsigned size, unsigned src_size);
extern "C" void ft_cp_async_commit();
extern "C" void ft_cp_async_wait(int n);
extern "C" void ft_ldmatrix4(unsigned* r, const void* row, int trans);
extern "C" void ft_mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1, int is_bf16);

#define __syncthreads() ft_syncthreads()

template <typename T> static inline uint64_t ft_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a value over 64 bits");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> static inline T ft_from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    (void)mask;
    return ft_from_bits<T>(ft_shfl(ft_bits(v), lane_mask, 1));
}
template <typename T> static inline T __shfl_sync(unsigned mask, T v, int src) {
    (void)mask;
    return ft_from_bits<T>(ft_shfl(ft_bits(v), src, 0));
}

// Rounded single operations: the host's IEEE arithmetic (compiled without FMA contraction).
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float rsqrtf(float a) { return 1.f / sqrtf(a); }
static inline float __uint_as_float(unsigned u) { return ft_from_bits<float>(u); }
static inline float __int_as_float(int u) { return ft_from_bits<float>((unsigned)u); }
static inline unsigned __float_as_uint(float f) { return (unsigned)ft_bits(f); }
static inline int __float_as_int(float f) { return (int)(unsigned)ft_bits(f); }

// CUDA's integer min/max overloads.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

// IEEE half precision, round to nearest even (PTX cvt.rn.f16.f32 and cvt.f32.f16).
static inline float ft_f16_to_f32(unsigned short h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}
static inline unsigned short ft_f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    memcpy(&h, &v, 2);
    return h;
}

// The kernels a program provides to the driver: name and a launcher that unpacks cuLaunchKernel's
// argument array into the kernel's parameters.
struct FtKernel {
    const char* name;
    void (*invoke)(void** params);
};
extern "C" const FtKernel* ft_kernels(size_t* count);

template <typename F> struct FtInvoke;
template <typename... A> struct FtInvoke<void (*)(A...)> {
    template <void (*F)(A...), size_t... I> static void call(void** p, std::index_sequence<I...>) {
        F(*static_cast<A*>(p[I])...);
    }
    template <void (*F)(A...)> static void invoke(void** p) {
        call<F>(p, std::index_sequence_for<A...>{});
    }
};
#define FT_KERNEL(name) {#name, &FtInvoke<decltype(&name)>::invoke<&name>}
#define FT_KERNEL_TABLE(...)                                                                     \
    static const FtKernel FT_KERNELS[] = {__VA_ARGS__};                                          \
    extern "C" const FtKernel* ft_kernels(size_t* n) {                                           \
        *n = sizeof FT_KERNELS / sizeof FT_KERNELS[0];                                           \
        return FT_KERNELS;                                                                       \
    }
