// The optimiser step on the device, over every trainable tensor at once (multi-tensor): a
// table of f32 tensors (parameter, gradient, first and second moments, length, decay flag),
// the global gradient norm and its clipping coefficient computed on the device (no host round
// trip per tensor), then one AdamW kernel. Arithmetic follows engine/src/train/optim.rs
// operation by operation, each product and sum rounded on its own (no FMA contraction), so the
// updates can match the host's bits.

struct OptSeg {
    float* p;
    const float* g;
    float* m;
    float* v;
    unsigned long long n;
    int decay;
    int pad;
};

#define OPT_CHUNK 4096  // elements per partial sum of squares

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block of 256 threads, in a fixed order; thread 0 gets the result.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0;
    return warp_sum_f64(t);
}

// part[seg, chunk] = Σ g² over chunk `blockIdx.x` of tensor `blockIdx.y` (f64, as the host).
// Grid (max chunks, tensors); blocks past a tensor's end write 0.
extern "C" __global__ void opt_sumsq(const OptSeg* segs, double* part, int max_chunks) {
    __shared__ double scratch[32];
    const OptSeg s = segs[blockIdx.y];
    const unsigned long long start = (unsigned long long)blockIdx.x * OPT_CHUNK;
    double acc = 0.0;
    for (unsigned long long i = start + threadIdx.x; i < s.n && i < start + OPT_CHUNK;
         i += blockDim.x) {
        double x = (double)s.g[i];
        acc += x * x;
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) part[(size_t)blockIdx.y * max_chunks + blockIdx.x] = acc;
}

// out[0] = the global norm of the gradients times `inv_scale` (fp16 loss scaling divides the
// gradients by the loss scale, a power of two, so this is exact), out[1] = the factor
// gradients are scaled by (`inv_scale`, times torch.nn.utils.clip_grad_norm_'s max/(norm +
// 1e-6) when that is below 1 and max > 0), out[2] = 1 when `skip_nonfinite` and the norm is
// not finite (torch.amp.GradScaler skips that step), else 0.
// One block of 256 threads; the partials are added in a fixed order.
extern "C" __global__ void opt_norm(const double* part, int count, double max_norm,
                                    double inv_scale, int skip_nonfinite, float* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += part[i];
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) {
        double norm = sqrt(acc) * inv_scale;
        double coef = max_norm / (norm + 1e-6);
        float clip = (max_norm > 0.0 && coef < 1.0) ? (float)coef : 1.f;
        out[0] = (float)norm;
        out[1] = inv_scale == 1.0 ? clip : __fmul_rn(clip, (float)inv_scale);
        out[2] = (skip_nonfinite && !isfinite(norm)) ? 1.f : 0.f;
    }
}

// AdamW (torch.optim.AdamW) on every tensor of the table, gradients first scaled by
// `scale[1]` when `scale` is given, nothing done when `scale[2]` is set (a skipped step):
// grid (blocks, tensors), a grid-stride loop per tensor.
//   m = b1·m + (1−b1)·g;  v = b2·v + (1−b2)·g²;  p = p − p·lr·wd (decay);
//   p = p − m / (sqrt(v)/sqrt(bc2) + eps) · lr/bc1
extern "C" __global__ void opt_adamw(const OptSeg* segs, const float* scale, float b1, float b2,
                                     float ob1, float ob2, float decay, float sbc2, float eps,
                                     float step) {
    const OptSeg s = segs[blockIdx.y];
    if (scale && scale[2] != 0.f) return;
    const float c = scale ? scale[1] : 1.f;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < s.n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float gi = s.g[i];
        if (scale && c != 1.f) gi = __fmul_rn(gi, c);
        float mi = __fadd_rn(__fmul_rn(s.m[i], b1), __fmul_rn(gi, ob1));
        float vi = __fadd_rn(__fmul_rn(s.v[i], b2), __fmul_rn(__fmul_rn(gi, gi), ob2));
        float pi = s.p[i];
        if (s.decay && decay > 0.f) pi = __fsub_rn(pi, __fmul_rn(pi, decay));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), sbc2), eps);
        s.m[i] = mi;
        s.v[i] = vi;
        s.p[i] = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step));
    }
}
