// Causal attention on tensor cores (bf16/f16 inputs, f32 accumulation), FlashAttention-2
// style: each warp owns 16 query rows, a block of ATTM_WARPS warps streams keys through shared
// memory a tile at a time (64 keys at d ≤ 64, 32 above), copying the next tile with cp.async
// while it computes on this one; S = Q·Kᵀ and O += P·V are mma.sync m16n8k16 products, and the
// online softmax works on the S accumulators in registers (P is re-packed from them as the A
// operand of the second product, with no trip through shared memory). Same layout, masks and
// lse as attention.cu (see there); needs sm_80+, head_dim a multiple of 16, at most DM (64 or 128).
#define ATTM_WARPS 4
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define ATTM_BQ (16 * ATTM_WARPS)

template <typename T> __device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<bf16>(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef FEDTUNE_HOST_EMULATION
    ft_mma16816(c, a, b0, b1, 1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <> __device__ __forceinline__ void mma16816<f16>(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef FEDTUNE_HOST_EMULATION
    ft_mma16816(c, a, b0, b1, 0);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two values as one register of T pairs (the lower column in the low half).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)st<T>(lo).v | ((unsigned)st<T>(hi).v << 16);
}
template <typename T> __device__ __forceinline__ unsigned ld2(const T* p) {
    return (unsigned)p[0].v | ((unsigned)p[1].v << 16);
}
// The shared-memory address (32-bit, as PTX's .shared instructions take it) of a pointer into
// dynamic shared memory.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
#ifdef FEDTUNE_HOST_EMULATION
    return (unsigned)(uintptr_t)p;
#else
    unsigned s;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(p));
    return s;
#endif
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: four 8×8 matrices of 16-bit values from
// shared memory in one instruction for the warp. Lane l gives the address of row l % 8 of
// matrix l / 8 (16 bytes, 16-byte aligned); r[i] gets matrix i's row l / 4, columns 2(l % 4)
// and 2(l % 4) + 1 (TRANS: the transposed matrix's), which is mma.sync's fragment layout.
template <bool TRANS> __device__ __forceinline__ void ldsm4(unsigned* r, const void* row) {
#ifdef FEDTUNE_HOST_EMULATION
    ft_ldmatrix4(r, row, TRANS ? 1 : 0);
#else
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row))
                     : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row))
                     : "memory");
    }
#endif
}

// The A fragments (one per 16 columns, s < ksteps) of a warp's 16 rows read straight from
// global memory: this thread's rows (gid and gid + 8 of the 16) start at row0 and row8.
template <typename T, int DM>
__device__ __forceinline__ void frags_a_rows(unsigned (*a)[4], const T* row0, const T* row8,
                                             int ksteps, int tig) {
#pragma unroll
    for (int s = 0; s < DM / 16; s++) {
        if (s < ksteps) {
            const int c = s * 16 + tig * 2;
            a[s][0] = ld2(row0 + c);
            a[s][1] = ld2(row8 + c);
            a[s][2] = ld2(row0 + c + 8);
            a[s][3] = ld2(row8 + c + 8);
        }
    }
}

// The A fragment of the 16×16 block at row r0, column c0 of a row-major shared tile (row
// stride ld, a multiple of 8; c0 a multiple of 8).
template <typename T>
__device__ __forceinline__ void frag_a(unsigned* a, const T* tile, int ld, int r0, int c0) {
    const int l = threadIdx.x & 31;
    ldsm4<false>(a, tile + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + c0 + (l >> 4) * 8);
}

// B fragments for k = c0 .. c0 + 15 of two 8-column tiles, n0 and n0 + 8, where B[k][n] is
// tile[n][k] (Kᵀ from a row-major K tile): b[0], b[1] for n0 and b[2], b[3] for n0 + 8.
template <typename T>
__device__ __forceinline__ void frag_b_rows(unsigned* b, const T* tile, int ld, int n0, int c0) {
    const int l = threadIdx.x & 31;
    ldsm4<false>(b, tile + (n0 + (l & 7) + (l >> 4) * 8) * ld + c0 + ((l >> 3) & 1) * 8);
}

// B fragments for k = k0 .. k0 + 15 of two 8-column tiles, n0 and n0 + 8, where B[k][n] is
// tile[k][n] (down the rows of a row-major tile, such as V for P·V): b[0], b[1] for n0 and
// b[2], b[3] for n0 + 8.
template <typename T>
__device__ __forceinline__ void frag_b_down(unsigned* b, const T* tile, int ld, int k0, int n0) {
    const int l = threadIdx.x & 31;
    ldsm4<true>(b, tile + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

// acc[nt] += A·B over the head dimension's column tiles nt (nt < ntiles_d, an even count), where
// A is STEPS k-steps of packed 16×16 fragments (P or dS re-packed from accumulators) and B is
// the shared tile `tile` read down its rows (rows s·16 .., columns nt·8 ..): P·V, dS·K, Pᵀ·dO
// and dSᵀ·Q.
template <typename T, int DM, int STEPS>
__device__ __forceinline__ void mma_down(float (*acc)[4], unsigned (*a)[4], const T* tile,
                                         int ld, int ntiles_d) {
#pragma unroll
    for (int nt = 0; nt < DM / 8; nt += 2) {
        if (nt < ntiles_d) {
#pragma unroll
            for (int s = 0; s < STEPS; s++) {
                unsigned bb[4];
                frag_b_down(bb, tile, ld, s * 16, nt * 8);
                mma16816<T>(acc[nt], a[s], bb[0], bb[1]);
                mma16816<T>(acc[nt + 1], a[s], bb[2], bb[3]);
            }
        }
    }
}

// A 16-row accumulator fragment (this thread's rows r0 and r0 + 8, columns nt·8 + tig·2 and
// the next, for nt < ntiles_d) into rows of `out` (row r at out + r·rs), the first row times
// mul0 and the second times mul1; rows at or past n are not stored.
template <typename T, int DM>
__device__ __forceinline__ void store_frag(T* out, size_t rs, int r0, int n, float (*acc)[4],
                                           float mul0, float mul1, int ntiles_d, int tig) {
#pragma unroll
    for (int nt = 0; nt < DM / 8; nt++) {
        if (nt < ntiles_d) {
            const int c = nt * 8 + tig * 2;
            if (r0 < n) {
                T* row = out + (size_t)r0 * rs + c;
                row[0] = st<T>(acc[nt][0] * mul0);
                row[1] = st<T>(acc[nt][1] * mul0);
            }
            if (r0 + 8 < n) {
                T* row = out + (size_t)(r0 + 8) * rs + c;
                row[0] = st<T>(acc[nt][2] * mul1);
                row[1] = st<T>(acc[nt][3] * mul1);
            }
        }
    }
}

// cp.async (sm_80+): 16 bytes from global to shared memory without a trip through registers,
// zero-filled past src_size; complete once cp_async_wait<N>() (every committed group but the
// newest N) has returned, and visible to the block after the barrier that follows.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, unsigned src_size) {
#ifdef FEDTUNE_HOST_EMULATION
    ft_cp_async(dst, src, 16, src_size);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_size)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef FEDTUNE_HOST_EMULATION
    ft_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef FEDTUNE_HOST_EMULATION
    ft_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Rows p0 .. p0 + rows of a row-major matrix of T at src (row stride rs; rows at or past lim
// read as zeros), columns 0 .. d, into a shared tile of row stride ld. Where both sides are
// 16-byte aligned the copy is a cp.async of 16 bytes at a time (one division per 8 elements),
// in place after the caller's cp_async_commit(), cp_async_wait and __syncthreads(); otherwise
// the tile is copied element by element at once.
template <typename T>
__device__ __forceinline__ void tile_copy(const T* src, size_t rs, int p0, int lim, int rows,
                                          int d, T* dst, int ld) {
    const unsigned long long a = (unsigned long long)src | (unsigned long long)dst |
                                 (unsigned long long)(rs * 2) | (unsigned long long)(ld * 2) |
                                 (unsigned long long)(d * 2);
    if ((a & 15) == 0) {
        const int per = d >> 3;
        for (int i = threadIdx.x; i < rows * per; i += blockDim.x) {
            const int r = i / per, c = (i - r * per) << 3, p = p0 + r;
            const bool in = p < lim;
            cp_async16(dst + r * ld + c, in ? src + (size_t)p * rs + c : src, in ? 16u : 0u);
        }
    } else {
        for (int i = threadIdx.x; i < rows * d; i += blockDim.x) {
            const int r = i / d, c = i - r * d, p = p0 + r;
            T x;
            x.v = 0;
            if (p < lim) x = src[(size_t)p * rs + c];
            dst[r * ld + c] = x;
        }
    }
}

template <typename T, int DM>
__device__ void attn_mma_impl(const T* q, const T* k, const T* v, T* o, float* lse,
                              const unsigned* seg, int tq, int tk, int q_off, int hq, int hkv,
                              int d, long long q_rs, long long k_bs, long long k_rs, float scale,
                              int window) {
    extern __shared__ unsigned short smem_u16[];
    // Keys per tile: 64 at d ≤ 64, 32 at d ≤ 128 (K and V tiles, double-buffered, within 48 KiB).
    constexpr int BK = DM == 64 ? 64 : 32;
    const int kld = d + 8;  // K and V tiles [2][BK][d + 8]
    T* kbuf = (T*)smem_u16;
    T* vbuf = kbuf + 2 * BK * kld;
    unsigned* kseg = (unsigned*)(vbuf + 2 * BK * kld);  // [2][BK] the keys' segments, if any
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTM_BQ;
    const int g = h / (hq / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int ksteps = d / 16, ntiles_d = d / 8;
    // This thread's two query rows (gid and gid + 8 of the warp's 16).
    const int r0 = q0 + warp * 16 + gid, r1 = r0 + 8;
    // Q as A fragments, one per 16 columns of d.
    unsigned qa[DM / 16][4];
    frags_a_rows<T, DM>(qa, q + (size_t)(b * tq + min(r0, tq - 1)) * q_rs + (size_t)h * d,
                        q + (size_t)(b * tq + min(r1, tq - 1)) * q_rs + (size_t)h * d, ksteps, tig);
    float oacc[DM / 8][4];
#pragma unroll
    for (int n = 0; n < DM / 8; n++) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const int s0 = q_off + r0, s1 = q_off + r1;  // key positions the two rows stand at
    const unsigned sq0 = (seg && r0 < tq) ? seg[b * tq + r0] : 1u;
    const unsigned sq1 = (seg && r1 < tq) ? seg[b * tq + r1] : 1u;
    const float sl2 = scale * LOG2E;  // scores in base 2
    const int qlast = min(q0 + ATTM_BQ, tq) - 1;
    const int kend = min(q_off + qlast + 1, tk);
    int kbegin = 0;
    if (window > 0 && !seg) kbegin = max(0, q_off + q0 - window + 1);
    // Tile i + 1 is copied (cp.async) while tile i is computed on.
    const T* kg = k + (size_t)b * k_bs + (size_t)g * d;
    const T* vg = v + (size_t)b * k_bs + (size_t)g * d;
    auto load = [&](int p0, int buf) {
        tile_copy(kg, (size_t)k_rs, p0, tk, BK, d, kbuf + buf * BK * kld, kld);
        tile_copy(vg, (size_t)k_rs, p0, tk, BK, d, vbuf + buf * BK * kld, kld);
        if (seg)
            for (int i = threadIdx.x; i < BK; i += blockDim.x)
                kseg[buf * BK + i] = p0 + i < tk ? seg[b * tk + p0 + i] : 0u;
    };
    const int kfirst = (kbegin / BK) * BK;
    if (kfirst < kend) load(kfirst, 0);
    cp_async_commit();
    for (int k0 = kfirst, it = 0; k0 < kend; k0 += BK, it++) {
        const int cur = it & 1;
        if (k0 + BK < kend) load(k0 + BK, cur ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const unsigned* ksg = kseg + cur * BK;
        const T* ks = kbuf + cur * BK * kld;
        const T* vs = vbuf + cur * BK * kld;
        // S = Q·Kᵀ for 16 rows × BK keys: tiles of 8 keys.
        float sacc[BK / 8][4];
#pragma unroll
        for (int n = 0; n < BK / 8; n++) sacc[n][0] = sacc[n][1] = sacc[n][2] = sacc[n][3] = 0.f;
#pragma unroll
        for (int n = 0; n < BK / 8; n += 2) {
#pragma unroll
            for (int s = 0; s < DM / 16; s++) {
                if (s < ksteps) {
                    unsigned bb[4];
                    frag_b_rows(bb, ks, kld, n * 8, s * 16);
                    mma16816<T>(sacc[n], qa[s], bb[0], bb[1]);
                    mma16816<T>(sacc[n + 1], qa[s], bb[2], bb[3]);
                }
            }
        }
        // Mask, scale (to base 2: scores and maxima are logarithms to base 2, so that each
        // exponential is one exp2), running max. A tile wholly visible to the warp's 16 rows
        // (no segments or window, every key at or before the warp's first row) needs no mask:
        // most tiles of a long causal sequence.
        const bool full =
            !seg && window == 0 && k0 + BK <= tk && k0 + BK - 1 <= q_off + q0 + warp * 16;
        float tmax0 = -INFINITY, tmax1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < BK / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int p = k0 + n * 8 + tig * 2 + (e & 1);
                const int sp = e < 2 ? s0 : s1;
                const int row = e < 2 ? r0 : r1;
                const unsigned sq = e < 2 ? sq0 : sq1;
                bool vis = full || (row < tq && p < tk && p <= sp);
                if (!full && vis && window > 0 && sp - p >= window) vis = false;
                if (!full && seg && row < tq) {
                    if (sq == 0) {
                        vis = p == sp;
                    } else if (vis) {
                        vis = ksg[p - k0] == sq;
                    }
                }
                const float sv = vis ? sacc[n][e] * sl2 : -INFINITY;
                sacc[n][e] = sv;
                if (e < 2) tmax0 = fmaxf(tmax0, sv); else tmax1 = fmaxf(tmax1, sv);
            }
        }
        tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, 1));
        tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, 2));
        tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, 1));
        tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, 2));
        const float mn0 = fmaxf(m0, tmax0), mn1 = fmaxf(m1, tmax1);
        // Rows with nothing visible yet keep weight 0 (their max stays -inf).
        const float a0 = mn0 == -INFINITY ? 1.f : exp2f(m0 - mn0);
        const float a1 = mn1 == -INFINITY ? 1.f : exp2f(m1 - mn1);
        float ls0 = 0.f, ls1 = 0.f;
        unsigned pa[BK / 16][4];
#pragma unroll
        for (int n = 0; n < BK / 8; n++) {
            const float p0 = mn0 == -INFINITY ? 0.f : exp2f(sacc[n][0] - mn0);
            const float p1 = mn0 == -INFINITY ? 0.f : exp2f(sacc[n][1] - mn0);
            const float p2 = mn1 == -INFINITY ? 0.f : exp2f(sacc[n][2] - mn1);
            const float p3 = mn1 == -INFINITY ? 0.f : exp2f(sacc[n][3] - mn1);
            // Sum what the product will use: P rounded to T.
            const unsigned lo = pack2<T>(p0, p1), hi = pack2<T>(p2, p3);
            T t;
            t.v = lo & 0xffff; ls0 += ld(t);
            t.v = lo >> 16; ls0 += ld(t);
            t.v = hi & 0xffff; ls1 += ld(t);
            t.v = hi >> 16; ls1 += ld(t);
            // S accumulator layout of tile n = A fragment half of key-step n / 2.
            pa[n / 2][(n & 1) * 2 + 0] = lo;
            pa[n / 2][(n & 1) * 2 + 1] = hi;
        }
        ls0 += __shfl_xor_sync(0xffffffffu, ls0, 1);
        ls0 += __shfl_xor_sync(0xffffffffu, ls0, 2);
        ls1 += __shfl_xor_sync(0xffffffffu, ls1, 1);
        ls1 += __shfl_xor_sync(0xffffffffu, ls1, 2);
        l0 = l0 * a0 + ls0;
        l1 = l1 * a1 + ls1;
        m0 = mn0;
        m1 = mn1;
        // O = a·O + P·V.
#pragma unroll
        for (int n = 0; n < DM / 8; n++) {
            oacc[n][0] *= a0;
            oacc[n][1] *= a0;
            oacc[n][2] *= a1;
            oacc[n][3] *= a1;
        }
        mma_down<T, DM, BK / 16>(oacc, pa, vs, kld, ntiles_d);
        __syncthreads();  // every warp is done with this tile before it is copied over
    }
    // l sums over the group of four threads are complete in every thread of the group.
    store_frag<T, DM>(o + (size_t)b * tq * q_rs + (size_t)h * d, (size_t)q_rs, r0, tq, oacc,
                      1.f / l0, 1.f / l1, ntiles_d, tig);
    if (lse && tig == 0) {
        if (r0 < tq) lse[((size_t)b * hq + h) * tq + r0] = (m0 + log2f(l0)) * LN2;
        if (r1 < tq) lse[((size_t)b * hq + h) * tq + r1] = (m1 + log2f(l1)) * LN2;
    }
}

// One build per head-dimension bound DM (64: the 1B shape; 128: the 8B shape), so that a d ≤ 64
// run keeps half the accumulators in registers.
#define ATTN_MMA(T, S, DM)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTM_WARPS * 32)                              \
        attn_mma##DM##_##S(const void* q, const void* k, const void* v, void* o, float* lse,   \
                           const unsigned* seg, int tq, int tk, int q_off, int hq, int hkv,    \
                           int d, long long q_rs, long long k_bs, long long k_rs, float scale, \
                           int window) {                                                       \
        attn_mma_impl<T, DM>((const T*)q, (const T*)k, (const T*)v, (T*)o, lse, seg, tq, tk,   \
                             q_off, hq, hkv, d, q_rs, k_bs, k_rs, scale, window);              \
    }
ATTN_MMA(bf16, bf16, 64)
ATTN_MMA(f16, f16, 64)
ATTN_MMA(bf16, bf16, 128)
ATTN_MMA(f16, f16, 128)
