// An emulated cuBLASLt (libcublasLt.so.13) for the tests of fedtune's GPU path without a GPU:
// the matrix descriptors, preferences and heuristics fedtune uses, and cublasLtMatmul
// D = alpha·op(A)·op(B) + beta·C on column-major operands (f32, bf16 or f16 inputs, f32
// accumulation, f32/bf16/f16 outputs rounded to nearest even; TF32 compute rounds the f32
// inputs to TF32's 10-bit mantissa first). C is not read when beta is 0, as in cuBLAS.
// Attributes it does not implement are refused (CUBLAS_STATUS_NOT_SUPPORTED) with a message,
// so a new use fails here rather than computing something else.

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "shim.h"  // the half-precision conversions and bit casts the kernels use

typedef int Status;
enum {
    S_OK = 0,
    S_INVALID_VALUE = 7,
    S_NOT_SUPPORTED = 15,
};
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77 };

struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct Desc {
    int compute;
    int transa = 0, transb = 0;
};
struct Pref {
    int dummy;
};
struct Handle {
    int dummy;
};
struct Algo {
    uint64_t data[8];
};
struct Heuristic {
    Algo algo;
    size_t workspace;
    Status state;
    float waves;
    int reserved[4];
};

static void say(const char* msg, long v) { fprintf(stderr, "cuda-emu cuBLASLt: %s (%ld)\n", msg, v); }

static float load(const void* p, int type, size_t i) {
    if (type == R_32F) return ((const float*)p)[i];
    uint16_t h = ((const uint16_t*)p)[i];
    return type == R_16BF ? __uint_as_float((unsigned)h << 16) : ft_f16_to_f32(h);
}

static void store(void* p, int type, size_t i, float f) {
    if (type == R_32F) {
        ((float*)p)[i] = f;
        return;
    }
    uint16_t h;
    if (type == R_16BF) {
        uint32_t u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            h = 0x7fc0;
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            h = (uint16_t)(u >> 16);
        }
    } else {
        h = ft_f32_to_f16(f);
    }
    ((uint16_t*)p)[i] = h;
}

// f32 to TF32 (10-bit mantissa), round to nearest even; infinities and NaN unchanged.
static float tf32(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7f800000u) != 0x7f800000u) {
        u += 0xfffu + ((u >> 13) & 1u);
        u &= ~0x1fffu;
    }
    return __uint_as_float(u);
}

static bool valid_type(int t) { return t == R_32F || t == R_16F || t == R_16BF; }

extern "C" {

Status cublasLtCreate(void** h) {
    *h = new Handle();
    return S_OK;
}
Status cublasLtDestroy(void* h) {
    delete (Handle*)h;
    return S_OK;
}
size_t cublasLtGetVersion() { return 130000; }

Status cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (!valid_type(type)) {
        say("matrix layout of an unsupported data type", type);
        return S_NOT_SUPPORTED;
    }
    if (ld < (int64_t)rows || ld < 1) {
        say("leading dimension smaller than the rows", (long)ld);
        return S_INVALID_VALUE;
    }
    *l = new Layout{type, rows, cols, ld};
    return S_OK;
}
Status cublasLtMatrixLayoutDestroy(void* l) {
    delete (Layout*)l;
    return S_OK;
}
Status cublasLtMatrixLayoutSetAttribute(void*, int attr, const void*, size_t) {
    say("matrix layout attribute not emulated", attr);
    return S_NOT_SUPPORTED;
}

Status cublasLtMatmulDescCreate(void** d, int compute, int scale) {
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_FAST_TF32) {
        say("compute type not emulated", compute);
        return S_NOT_SUPPORTED;
    }
    if (scale != R_32F) {
        say("scale type not emulated", scale);
        return S_NOT_SUPPORTED;
    }
    *d = new Desc{compute};
    return S_OK;
}
Status cublasLtMatmulDescDestroy(void* d) {
    delete (Desc*)d;
    return S_OK;
}
Status cublasLtMatmulDescSetAttribute(void* d, int attr, const void* buf, size_t size) {
    Desc* desc = (Desc*)d;
    int32_t v = 0;
    if (size != 4) return S_INVALID_VALUE;
    memcpy(&v, buf, 4);
    switch (attr) {
        case 3: desc->transa = v; break;  // TRANSA
        case 4: desc->transb = v; break;  // TRANSB
        case 7:                           // EPILOGUE: only the default
            if (v != 1) {
                say("epilogue not emulated", v);
                return S_NOT_SUPPORTED;
            }
            break;
        default: say("matmul descriptor attribute not emulated", attr); return S_NOT_SUPPORTED;
    }
    if ((attr == 3 || attr == 4) && v != 0 && v != 1) {
        say("only N and T operations are emulated", v);
        return S_NOT_SUPPORTED;
    }
    return S_OK;
}

Status cublasLtMatmulPreferenceCreate(void** p) {
    *p = new Pref();
    return S_OK;
}
Status cublasLtMatmulPreferenceDestroy(void* p) {
    delete (Pref*)p;
    return S_OK;
}
Status cublasLtMatmulPreferenceSetAttribute(void*, int attr, const void*, size_t) {
    // SEARCH_MODE 0, MAX_WORKSPACE_BYTES 1, MIN_ALIGNMENT_{A,B,C,D}_BYTES 5..8.
    if (attr == 0 || attr == 1 || (attr >= 5 && attr <= 8)) return S_OK;
    say("matmul preference attribute not emulated", attr);
    return S_NOT_SUPPORTED;
}

static Status check(const Desc* d, const Layout* a, const Layout* b, const Layout* c,
                    const Layout* dl, uint64_t* m, uint64_t* n, uint64_t* k) {
    *m = d->transa ? a->cols : a->rows;
    *k = d->transa ? a->rows : a->cols;
    uint64_t kb = d->transb ? b->cols : b->rows;
    *n = d->transb ? b->rows : b->cols;
    if (kb != *k || c->rows != *m || c->cols != *n || dl->rows != *m || dl->cols != *n) {
        say("operand shapes do not agree (k of A)", (long)*k);
        return S_INVALID_VALUE;
    }
    if (a->type != b->type || c->type != dl->type) {
        say("A/B or C/D types differ", a->type);
        return S_NOT_SUPPORTED;
    }
    if (a->type == R_32F ? c->type != R_32F : (c->type != R_32F && c->type != a->type)) {
        say("output type not available for these inputs", c->type);
        return S_NOT_SUPPORTED;
    }
    if (d->compute == COMPUTE_32F_FAST_TF32 && a->type != R_32F) {
        say("TF32 compute needs f32 inputs", a->type);
        return S_NOT_SUPPORTED;
    }
    return S_OK;
}

Status cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d,
                                      void*, int requested, Heuristic* out, int* returned) {
    uint64_t m, n, k;
    if (requested < 1) return S_INVALID_VALUE;
    Status s = check((Desc*)desc, (Layout*)a, (Layout*)b, (Layout*)c, (Layout*)d, &m, &n, &k);
    if (s != S_OK) {
        *returned = 0;
        return s;
    }
    memset(out, 0, sizeof(Heuristic));
    out->waves = 1.f;
    *returned = 1;
    return S_OK;
}

Status cublasLtMatmul(void*, void* desc_p, const void* alpha_p, const void* A, void* al,
                      const void* B, void* bl, const void* beta_p, const void* C, void* cl, void* D,
                      void* dl, const void*, void*, size_t, void*) {
    const Desc* desc = (const Desc*)desc_p;
    const Layout *la = (Layout*)al, *lb = (Layout*)bl, *lc = (Layout*)cl, *ld = (Layout*)dl;
    uint64_t m, n, k;
    Status s = check(desc, la, lb, lc, ld, &m, &n, &k);
    if (s != S_OK) return s;
    if (m == 0 || n == 0) return S_OK;
    const float alpha = *(const float*)alpha_p, beta = *(const float*)beta_p;
    const bool round_tf32 = desc->compute == COMPUTE_32F_FAST_TF32;
    // op(A) as rows of k, op(B)ᵀ as rows of k.
    std::vector<float> ar(m * k), bc(n * k);
    for (uint64_t i = 0; i < m; i++)
        for (uint64_t kk = 0; kk < k; kk++) {
            size_t at = desc->transa ? kk + i * la->ld : i + kk * la->ld;
            float v = load(A, la->type, at);
            ar[i * k + kk] = round_tf32 ? tf32(v) : v;
        }
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t kk = 0; kk < k; kk++) {
            size_t at = desc->transb ? j + kk * lb->ld : kk + j * lb->ld;
            float v = load(B, lb->type, at);
            bc[j * k + kk] = round_tf32 ? tf32(v) : v;
        }
    auto rows = [&](uint64_t i0, uint64_t i1) {
        for (uint64_t i = i0; i < i1; i++) {
            const float* x = &ar[i * k];
            for (uint64_t j = 0; j < n; j++) {
                const float* y = &bc[j * k];
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                uint64_t kk = 0;
                for (; kk + 8 <= k; kk += 8)
                    for (int u = 0; u < 8; u++) acc[u] += x[kk + u] * y[kk + u];
                float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                for (; kk < k; kk++) sum += x[kk] * y[kk];
                float v = alpha * sum;
                if (beta != 0.f) v += beta * load(C, lc->type, i + j * lc->ld);
                store(D, ld->type, i + j * ld->ld, v);
            }
        }
    };
    unsigned threads = std::max(1u, std::min(std::thread::hardware_concurrency(), 8u));
    if (m * n * k < (1u << 22) || threads == 1 || m < threads) {
        rows(0, m);
    } else {
        std::vector<std::thread> pool;
        uint64_t per = (m + threads - 1) / threads;
        for (unsigned t = 0; t < threads; t++) {
            uint64_t i0 = t * per, i1 = std::min(m, i0 + per);
            if (i0 < i1) pool.emplace_back(rows, i0, i1);
        }
        for (auto& t : pool) t.join();
    }
    return S_OK;
}

}  // extern "C"
