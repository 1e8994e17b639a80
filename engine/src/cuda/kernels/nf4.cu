// NF4 dequantisation (bitsandbytes' format, as engine/src/nf4.rs stores it): two codes per
// byte, first in the high nibble; blocks of 64 values share an absmax. With double
// quantisation the absmax of block i is dyn_map[codes2[i]]·absmax2[i / 256] + offset.
// out[i] = NF4[code_i]·absmax[i / 64], in f32 then stored in T.
__constant__ float NF4_LEVELS[16] = {
    -1.0f, -0.6961928f, -0.52507305f, -0.3949175f, -0.28444138f, -0.18477343f, -0.091050036f,
    0.0f, 0.0795803f, 0.1609302f, 0.2461123f, 0.33791524f, 0.44070983f, 0.562617f, 0.72295684f,
    1.0f};

template <typename T>
__device__ void nf4_dequant_impl(const unsigned char* packed, const float* absmax,
                                 const unsigned char* codes2, const float* absmax2,
                                 const float* dyn_map, float offset, T* out, size_t n) {
    GRID_STRIDE(i, n) {
        unsigned char byte = packed[i / 2];
        unsigned code = (i & 1) ? (byte & 0xF) : (byte >> 4);
        size_t blk = i / 64;
        // Multiply and add rounded separately (no FMA contraction), as the host computes it,
        // so the codes dequantise bit-identically.
        float a = codes2 ? __fadd_rn(__fmul_rn(dyn_map[codes2[blk]], absmax2[blk / 256]), offset)
                         : absmax[blk];
        out[i] = st<T>(__fmul_rn(NF4_LEVELS[code], a));
    }
}

#define NF4_DEQUANT(T, S)                                                                      \
    extern "C" __global__ void nf4_dequant_##S(const unsigned char* packed,                    \
                                               const float* absmax,                            \
                                               const unsigned char* codes2,                    \
                                               const float* absmax2, const float* dyn_map,     \
                                               float offset, void* out,                        \
                                               unsigned long long n) {                         \
        nf4_dequant_impl<T>(packed, absmax, codes2, absmax2, dyn_map, offset, (T*)out, n);     \
    }
EACH_TYPE(NF4_DEQUANT)
