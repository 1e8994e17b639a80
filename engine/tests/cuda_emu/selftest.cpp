// The emulated driver's own checks, each shown to fire on a kernel that breaks its rule (and not
// on one that keeps it): built with driver.cpp into one program by engine/tests/cuda_emu_checks.rs,
// which reads its report. Prints one line per check, "ok <name>" or "FAIL <name>: why"; exits 1
// when a check failed.
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "shim.h"
#define __ft_kernel__

// A correct block reduction: every thread gets the sum of the thread indices.
extern "C" __global__ void block_sum_kernel(float* out) {
    __shared__ float part[32];
    float v = (float)threadIdx.x;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; w++) t += part[w];
    out[blockIdx.x * blockDim.x + threadIdx.x] = t;
}

// __syncthreads() that only some threads reach: hangs on a GPU.
extern "C" __global__ void divergent_sync(float* out) {
    if (threadIdx.x < 40) __syncthreads();
    out[threadIdx.x] = 1.f;
}

// Half the block waits at one __syncthreads(), half at another.
extern "C" __global__ void two_barriers(float* out) {
    if (threadIdx.x < 32) {
        out[threadIdx.x] = 1.f;
        __syncthreads();
        out[threadIdx.x] += 1.f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.f * out[threadIdx.x - 32];
    }
}

// A shuffle that reads a lane which has already returned.
extern "C" __global__ void shuffle_from_exited(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.f, 5);
}

// Shared memory read without a barrier after another thread's write: the value depends on
// the order threads run in (dynamic shared memory starts as NaN bytes in every block).
extern "C" __global__ void missing_barrier(float* out) {
    float* s = (float*)ft_dynamic_smem();
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// The same with the barrier: order independent.
extern "C" __global__ void with_barrier(float* out) {
    float* s = (float*)ft_dynamic_smem();
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// One warp's m16n8k16 product of bf16 A (16×16, row major) and B (16×8, column major),
// fragments loaded as the PTX ISA lays them out; D (16×8 row major) in f32.
extern "C" __global__ void mma_tile(const unsigned short* a, const unsigned short* b, float* d) {
    const int lane = threadIdx.x, gid = lane >> 2, tig = lane & 3;
    auto pair = [](const unsigned short* p, int i, int j) {
        return (unsigned)p[i] | ((unsigned)p[j] << 16);
    };
    unsigned af[4] = {
        pair(a, gid * 16 + tig * 2, gid * 16 + tig * 2 + 1),
        pair(a, (gid + 8) * 16 + tig * 2, (gid + 8) * 16 + tig * 2 + 1),
        pair(a, gid * 16 + tig * 2 + 8, gid * 16 + tig * 2 + 9),
        pair(a, (gid + 8) * 16 + tig * 2 + 8, (gid + 8) * 16 + tig * 2 + 9),
    };
    // B column gid, rows tig·2, tig·2+1 (and +8): column-major storage b[col·16 + row].
    unsigned b0 = pair(b, gid * 16 + tig * 2, gid * 16 + tig * 2 + 1);
    unsigned b1 = pair(b, gid * 16 + tig * 2 + 8, gid * 16 + tig * 2 + 9);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    ft_mma16816(c, af, b0, b1, 1);
    d[gid * 8 + tig * 2] = c[0];
    d[gid * 8 + tig * 2 + 1] = c[1];
    d[(gid + 8) * 8 + tig * 2] = c[2];
    d[(gid + 8) * 8 + tig * 2 + 1] = c[3];
}

// Dynamic shared memory, used to the last byte.
extern "C" __global__ void big_smem(float* out, int n) {
    float* s = (float*)ft_dynamic_smem();
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 1.f;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = s[n - 1];
}

// cp.async: 16 threads copy 16 bytes each from buf[64..128) into shared memory; a tile is there
// only once a wait covers its group (before, the old contents), with zeros past src_size.
extern "C" __global__ void cp_async_tile(float* buf, int misalign) {
    float* s = (float*)ft_dynamic_smem();
    const int i = threadIdx.x;
    ft_cp_async((char*)(s + 4 * i) + misalign, buf + 64 + 4 * i, 16, i < 8 ? 16 : 8);
    ft_cp_async_commit();
    buf[4 * i] = s[4 * i];  // before the wait
    ft_cp_async_wait(0);
    __syncthreads();
    buf[128 + 4 * i] = s[4 * i + 2];  // after: the value (threads < 8) or a zero
}

// D (16×16) = A·B of bf16 A and B (16×16, both row major) with the fragments loaded by
// ldmatrix: A's as four 8×8 matrices, B's down its rows with .trans, as the attention kernels
// load them (one warp; the tiles staged in shared memory, rows padded to 24 elements).
extern "C" __global__ void ldmatrix_tile(const unsigned short* a, const unsigned short* b,
                                         float* d) {
    unsigned short* s = (unsigned short*)ft_dynamic_smem();
    unsigned short* sa = s;            // [16][24]
    unsigned short* sb = s + 16 * 24;  // [16][24]
    const int l = threadIdx.x, gid = l >> 2, tig = l & 3;
    for (int i = l; i < 256; i += 32) {
        sa[(i / 16) * 24 + i % 16] = a[i];
        sb[(i / 16) * 24 + i % 16] = b[i];
    }
    __syncthreads();
    unsigned af[4], bf[4];
    ft_ldmatrix4(af, sa + ((l & 7) + ((l >> 3) & 1) * 8) * 24 + (l >> 4) * 8, 0);
    ft_ldmatrix4(bf, sb + ((l & 7) + ((l >> 3) & 1) * 8) * 24 + (l >> 4) * 8, 1);
    for (int n = 0; n < 2; n++) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        ft_mma16816(c, af, bf[2 * n], bf[2 * n + 1], 1);
        d[gid * 16 + n * 8 + tig * 2] = c[0];
        d[gid * 16 + n * 8 + tig * 2 + 1] = c[1];
        d[(gid + 8) * 16 + n * 8 + tig * 2] = c[2];
        d[(gid + 8) * 16 + n * 8 + tig * 2 + 1] = c[3];
    }
}

FT_KERNEL_TABLE(FT_KERNEL(block_sum_kernel), FT_KERNEL(divergent_sync), FT_KERNEL(two_barriers),
                FT_KERNEL(shuffle_from_exited), FT_KERNEL(missing_barrier),
                FT_KERNEL(with_barrier), FT_KERNEL(mma_tile), FT_KERNEL(big_smem),
                FT_KERNEL(cp_async_tile), FT_KERNEL(ldmatrix_tile))

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
extern "C" {
CUresult cuInit(unsigned);
CUresult cuModuleLoadData(void**, const void*);
CUresult cuModuleGetFunction(void**, void*, const char*);
CUresult cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, void*, void**, void**);
CUresult cuMemAlloc_v2(CUdeviceptr*, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr, const void*, size_t);
CUresult cuMemcpyDtoH_v2(void*, CUdeviceptr, size_t);
CUresult cuFuncSetAttribute(void*, int, int);
}

static int failures = 0;
static void check(bool ok, const char* name, const char* why) {
    if (ok) {
        printf("ok %s\n", name);
    } else {
        printf("FAIL %s: %s\n", name, why);
        failures++;
    }
}

static void* module;
static void* fn(const char* name) {
    void* f = nullptr;
    if (cuModuleGetFunction(&f, module, name) != 0) {
        printf("FAIL no kernel %s\n", name);
        exit(1);
    }
    return f;
}

// Launches `name` on (grid, block) with one output buffer of `n` floats; the launch's result.
static CUresult launch(const char* name, unsigned grid, unsigned block, std::vector<float>& out,
                       unsigned smem = 0, int extra = -1) {
    CUdeviceptr d = 0;
    cuMemAlloc_v2(&d, out.size() * 4);
    void* params[2] = {&d, &extra};
    CUresult r = cuLaunchKernel(fn(name), grid, 1, 1, block, 1, 1, smem, nullptr, params, nullptr);
    if (r == 0) cuMemcpyDtoH_v2(out.data(), d, out.size() * 4);
    cuMemFree_v2(d);
    return r;
}

static unsigned short bf16(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return (unsigned short)(u >> 16);  // the values below are exact in bf16
}

int main() {
    cuInit(0);
    const char* ptx =
        ".entry block_sum_kernel(\n.entry divergent_sync(\n.entry two_barriers(\n"
        ".entry shuffle_from_exited(\n"
        ".entry missing_barrier(\n.entry with_barrier(\n.entry mma_tile(\n.entry big_smem(\n"
        ".entry cp_async_tile(\n.entry ldmatrix_tile(\n";
    if (cuModuleLoadData(&module, ptx) != 0) {
        printf("FAIL loading the module\n");
        return 1;
    }
    void* unknown = nullptr;
    check(cuModuleLoadData(&unknown, ".entry not_built(\n") != 0, "a PTX kernel without host build is refused",
          "loaded");

    std::vector<float> out(3 * 128);
    CUresult r = launch("block_sum_kernel", 3, 128, out);
    bool sums = r == 0;
    for (float v : out) sums = sums && v == 127.f * 128.f / 2.f;
    check(sums, "a correct block reduction gives every thread the sum", "wrong sums");

    std::vector<float> small(64);
    check(launch("divergent_sync", 1, 64, small) != 0, "__syncthreads in divergent code fails",
          "launch succeeded");
    check(launch("two_barriers", 1, 64, small) != 0,
          "threads at two different __syncthreads() calls fail", "launch succeeded");
    check(launch("shuffle_from_exited", 1, 32, small) != 0,
          "a shuffle from an exited lane fails", "launch succeeded");

    // Two launches in a row run in opposite orders: the racy kernel gives two answers, the
    // correct one the same answer twice.
    std::vector<float> x(64), y(64);
    launch("missing_barrier", 1, 64, x, 256);
    launch("missing_barrier", 1, 64, y, 256);
    check(memcmp(x.data(), y.data(), 256) != 0,
          "a missing __syncthreads changes the result between launches",
          "same result in both orders");
    launch("with_barrier", 1, 64, x, 256);
    launch("with_barrier", 1, 64, y, 256);
    bool same = memcmp(x.data(), y.data(), 256) == 0;
    for (int i = 0; i < 64; i++) same = same && x[i] == (float)((i + 1) % 64);
    check(same, "with the barrier the result is the same in both orders", "results differ");

    // mma.sync against a plain product.
    std::vector<unsigned short> a(256), b(128);
    std::vector<float> af(256), bf(128), want(128, 0.f);
    for (int i = 0; i < 256; i++) af[i] = (float)((i * 7) % 13 - 6) / 4.f;
    for (int i = 0; i < 128; i++) bf[i] = (float)((i * 5) % 11 - 5) / 2.f;
    for (int i = 0; i < 256; i++) a[i] = bf16(af[i]);
    for (int i = 0; i < 128; i++) b[i] = bf16(bf[i]);
    for (int r2 = 0; r2 < 16; r2++)
        for (int c = 0; c < 8; c++)
            for (int k = 0; k < 16; k++) want[r2 * 8 + c] += af[r2 * 16 + k] * bf[c * 16 + k];
    CUdeviceptr da, db, dd;
    cuMemAlloc_v2(&da, 512);
    cuMemAlloc_v2(&db, 256);
    cuMemAlloc_v2(&dd, 512);
    cuMemcpyHtoD_v2(da, a.data(), 512);
    cuMemcpyHtoD_v2(db, b.data(), 256);
    void* mp[3] = {&da, &db, &dd};
    std::vector<float> got(128);
    r = cuLaunchKernel(fn("mma_tile"), 1, 1, 1, 32, 1, 1, 0, nullptr, mp, nullptr);
    cuMemcpyDtoH_v2(got.data(), dd, 512);
    check(r == 0 && got == want, "mma.sync m16n8k16 gives the product", "product differs");
    r = cuLaunchKernel(fn("mma_tile"), 1, 1, 1, 16, 1, 1, 0, nullptr, mp, nullptr);
    check(r != 0, "mma.sync with half a warp fails", "launch succeeded");

    // ldmatrix (A, and B with .trans) feeding mma.sync gives the product too.
    std::vector<unsigned short> a2(256), b2(256);
    std::vector<float> a2f(256), b2f(256), want2(256, 0.f), got2(256);
    for (int i = 0; i < 256; i++) a2f[i] = (float)((i * 5) % 9 - 4) / 2.f;
    for (int i = 0; i < 256; i++) b2f[i] = (float)((i * 3) % 7 - 3) / 4.f;
    for (int i = 0; i < 256; i++) a2[i] = bf16(a2f[i]), b2[i] = bf16(b2f[i]);
    for (int r2 = 0; r2 < 16; r2++)
        for (int c = 0; c < 16; c++)
            for (int k = 0; k < 16; k++) want2[r2 * 16 + c] += a2f[r2 * 16 + k] * b2f[k * 16 + c];
    CUdeviceptr la, lb, ldd;
    cuMemAlloc_v2(&la, 512);
    cuMemAlloc_v2(&lb, 512);
    cuMemAlloc_v2(&ldd, 1024);
    cuMemcpyHtoD_v2(la, a2.data(), 512);
    cuMemcpyHtoD_v2(lb, b2.data(), 512);
    void* lp[3] = {&la, &lb, &ldd};
    r = cuLaunchKernel(fn("ldmatrix_tile"), 1, 1, 1, 32, 1, 1, 2 * 16 * 24 * 2, nullptr, lp, nullptr);
    cuMemcpyDtoH_v2(got2.data(), ldd, 1024);
    check(r == 0 && got2 == want2, "ldmatrix fragments (plain and .trans) give mma.sync's product",
          "product differs");
    r = cuLaunchKernel(fn("ldmatrix_tile"), 1, 1, 1, 16, 1, 1, 2 * 16 * 24 * 2, nullptr, lp, nullptr);
    check(r != 0, "ldmatrix with half a warp fails", "launch succeeded");

    // Dynamic shared memory over 48 KiB needs the kernel's limit raised first.
    const int n = 60 * 1024 / 4;
    std::vector<float> one(1);
    check(launch("big_smem", 1, 128, one, n * 4, n) != 0,
          "60 KiB of dynamic shared memory without cuFuncSetAttribute fails", "launch succeeded");
    cuFuncSetAttribute(fn("big_smem"), 8, n * 4);
    r = launch("big_smem", 1, 128, one, n * 4, n);
    check(r == 0 && one[0] == 1.f, "after cuFuncSetAttribute it runs", "launch failed");
    check(launch("block_sum_kernel", 1, 2048, out) != 0, "2048 threads per block fail",
          "launch succeeded");

    // cp.async: not there before the wait, there (zero-filled past src_size) after it.
    std::vector<float> cb(192, 0.f), cgot(192);
    for (int i = 64; i < 128; i++) cb[i] = (float)i;
    CUdeviceptr dc;
    cuMemAlloc_v2(&dc, 192 * 4);
    cuMemcpyHtoD_v2(dc, cb.data(), 192 * 4);
    int aligned = 0, misaligned = 4;
    void* cp[2] = {&dc, &aligned};
    r = cuLaunchKernel(fn("cp_async_tile"), 1, 1, 1, 16, 1, 1, 256, nullptr, cp, nullptr);
    cuMemcpyDtoH_v2(cgot.data(), dc, 192 * 4);
    bool copied = r == 0;
    for (int i = 0; i < 16; i++) {
        copied = copied && isnan(cgot[4 * i]);
        copied = copied && cgot[128 + 4 * i] == (i < 8 ? (float)(64 + 4 * i + 2) : 0.f);
    }
    check(copied, "cp.async lands at the wait, zero-filled past src_size",
          "tile visible before the wait, or wrong after it");
    void* cpm[2] = {&dc, &misaligned};
    check(cuLaunchKernel(fn("cp_async_tile"), 1, 1, 1, 16, 1, 1, 256, nullptr, cpm, nullptr) != 0,
          "a misaligned cp.async fails", "launch succeeded");
    cuMemFree_v2(dc);

    // New memory reads as NaN until written.
    CUdeviceptr fresh;
    cuMemAlloc_v2(&fresh, 16);
    float f[4];
    cuMemcpyDtoH_v2(f, fresh, 16);
    check(isnan(f[0]) && isnan(f[3]), "new device memory is NaN", "not NaN");
    check(cuMemcpyDtoH_v2(f, fresh + 8, 16) != 0, "a copy past the allocation is refused",
          "copied");
    return failures ? 1 : 0;
}
