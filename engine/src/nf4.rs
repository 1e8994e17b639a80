//! NF4 quantisation (QLoRA, Dettmers et al. 2023), value for value as bitsandbytes 0.50 computes
//! it on CPU.
//!
//! - Blocks of 64 values; `absmax` per block; each value `x` becomes the index of the NF4 level
//!   nearest to `x·(1/absmax)` (bitsandbytes' `bucketize` against the f32 midpoints between
//!   levels); two codes per byte, the first in the high nibble.
//! - Dequantisation: `NF4[code]·absmax` in f32.
//! - Double quantisation (`compress_statistics=True`): the absmax values minus their mean
//!   (`offset`) are quantised to 8-bit codes of bitsandbytes' signed dynamic map in blocks of
//!   256 (its 65 536-entry lookup table, nearest level by midpoints), with one f32 `absmax₂` per
//!   block; `absmax = code₂[q]·absmax₂ + offset`.
//!
//! Storage at rest: 4 bits per weight plus 32 bits per 64 weights (4.5 bits), or with double
//! quantisation 8 bits per 64 weights plus 32 bits per 16 384 (≈ 4.127 bits).

use rayon::prelude::*;

/// Values per quantisation block.
pub const BLOCK: usize = 64;
/// Absmax values per block of the double quantisation.
pub const BLOCK2: usize = 256;

/// The 16 NF4 levels (bitsandbytes' `_NF4_QUANT_TABLE`).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' signed dynamic 8-bit map, `create_dynamic_map(signed=True)` (Dettmers 2015),
/// as f32 bit patterns. It is a fixed constant of the format, like [`NF4`]; torch's vectorised
/// `linspace` inside the Python generator rounds some entries differently from a scalar
/// re-derivation, so the table is stored rather than recomputed.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic 8-bit map used to double-quantise absmax values, sorted ascending.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// `torch.mean` of f32 values as its CPU kernel sums them: 32 interleaved accumulators (4 AVX2
/// vectors), reduced pairwise, the tail added last, then divided in f32.
fn torch_mean(x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let full = x.len() - x.len() % 32;
    for chunk in x[..full].chunks_exact(32) {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    let mut width = 32;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    let sum = x[full..].iter().fold(acc[0], |s, v| s + v);
    sum / x.len().max(1) as f32
}

/// How the per-block absmax values are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double quantisation.
    Double {
        /// 8-bit code per block.
        codes: Vec<u8>,
        /// One f32 per 256 codes.
        absmax2: Vec<f32>,
        /// Mean subtracted before quantising.
        offset: f32,
    },
}

/// An NF4-quantised matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// `(rows, cols)` of the dequantised matrix.
    pub shape: (usize, usize),
    /// Two codes per byte, first in the high nibble, row-major.
    pub packed: Vec<u8>,
    /// Block scales.
    pub absmax: Absmax,
}

fn quantize_block(x: &[f32], out: &mut [u8], mids: &[f32; 15]) -> f32 {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    // A trailing partial block divides, full blocks multiply by the reciprocal (bitsandbytes).
    let full = x.len() == BLOCK;
    let inv = 1.0 / absmax.max(1e-38);
    for (o, v) in out.iter_mut().zip(x) {
        let s = if full { v * inv } else { v / absmax.max(1e-38) };
        let s = s.clamp(-1.0, 1.0);
        *o = mids.iter().filter(|m| **m < s).count() as u8;
    }
    absmax
}

/// Quantises `values` (row-major `rows × cols`) to NF4.
pub fn quantize(values: &[f32], rows: usize, cols: usize, double_quant: bool) -> Nf4Tensor {
    assert_eq!(values.len(), rows * cols, "NF4 input length");
    let mut mids = [0f32; 15];
    for (i, m) in mids.iter_mut().enumerate() {
        *m = (NF4[i] + NF4[i + 1]) / 2.0;
    }
    let n = values.len();
    let mut codes = vec![0u8; n];
    let absmax: Vec<f32> = codes
        .par_chunks_mut(BLOCK)
        .zip(values.par_chunks(BLOCK))
        .map(|(o, x)| quantize_block(x, o, &mids))
        .collect();
    if n % 2 == 1 {
        codes.push(7); // padding value 0 falls in level 7
    }
    let packed: Vec<u8> = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if double_quant {
        double_quantize(&absmax)
    } else {
        Absmax::F32(absmax)
    };
    Nf4Tensor {
        shape: (rows, cols),
        packed,
        absmax,
    }
}

/// bitsandbytes' CPU 8-bit blockwise quantisation: a 65 536-entry table maps a normalised value
/// to the nearest level of `code` by midpoints.
fn quantize_blockwise_8bit(x: &[f32], code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    const LUT: usize = 65_536;
    let mut mids = [0f32; 255];
    for (i, m) in mids.iter_mut().enumerate() {
        *m = 0.5 * (code[i] + code[i + 1]);
    }
    let mut lut = vec![0u8; LUT];
    let mut idx = 0usize;
    for (i, l) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT - 1) as f32;
        while idx < 255 && mids[idx] < val {
            idx += 1;
        }
        *l = idx as u8;
    }
    let mut out = vec![0u8; x.len()];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(BLOCK2));
    for (o, b) in out.chunks_mut(BLOCK2).zip(x.chunks(BLOCK2)) {
        let am = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            continue;
        }
        let inv = 1.0 / am;
        for (q, v) in o.iter_mut().zip(b) {
            let s = (v * inv).clamp(-1.0, 1.0);
            let i = ((s + 1.0) * 0.5 * (LUT - 1) as f32 + 0.5) as u16;
            *q = lut[i as usize];
        }
    }
    (out, absmax)
}

fn double_quantize(absmax: &[f32]) -> Absmax {
    let mean = torch_mean(absmax);
    let centred: Vec<f32> = absmax.iter().map(|v| v - mean).collect();
    let (codes, absmax2) = quantize_blockwise_8bit(&centred, &dynamic_map());
    Absmax::Double {
        codes,
        absmax2,
        offset: mean,
    }
}

impl Nf4Tensor {
    /// Number of weights.
    pub fn len(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The per-block absmax values (dequantised when double-quantised).
    pub fn absmax_values(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(v) => v.clone(),
            Absmax::Double {
                codes,
                absmax2,
                offset,
            } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, q)| map[*q as usize] * absmax2[i / BLOCK2] + offset)
                    .collect()
            }
        }
    }

    /// Bytes the quantised weights take at rest (codes and all scales).
    pub fn bytes_at_rest(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(v) => 4 * v.len(),
                Absmax::Double { codes, absmax2, .. } => codes.len() + 4 * absmax2.len() + 4,
            }
    }

    /// Dequantises to a new vector, in parallel over runs of blocks; each task zeroes and
    /// fills its own run (no serial zeroing pass on the calling thread).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax_values();
        // Values per parallel task: whole blocks, large enough to amortise the hand-off.
        const TASK: usize = BLOCK * 256;
        let mut out = crate::kernels::Uninit::new(self.len());
        out.spare()
            .par_chunks_mut(TASK)
            .enumerate()
            .for_each(|(t, o)| {
                let o = crate::kernels::init(o);
                let first = t * TASK;
                let bytes = &self.packed[first / 2..(first + o.len()).div_ceil(2)];
                dequantize_run(bytes, &absmax[first / BLOCK..], o);
            });
        // SAFETY: the tasks' chunks cover all `len()` values and `init` wrote each of them.
        unsafe { out.assume_init() }
    }
}

/// Dequantises consecutive blocks starting at a block boundary: `out[i] = NF4[code]·absmax`.
fn dequantize_run(bytes: &[u8], absmax: &[f32], out: &mut [f32]) {
    let full = out.len() / BLOCK;
    #[cfg(target_arch = "x86_64")]
    let done = if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected at run time; the kernel stays within `full` blocks
        // of `bytes`, `absmax` and `out`.
        unsafe { dequantize_blocks_avx512(bytes, absmax, out, full) };
        full
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    if done * BLOCK == out.len() {
        return;
    }
    // Two levels per byte: one table lookup per two weights.
    let mut pairs = [[0f32; 2]; 256];
    for (b, p) in pairs.iter_mut().enumerate() {
        *p = [NF4[b >> 4], NF4[b & 15]];
    }
    for (bi, o) in out.chunks_mut(BLOCK).enumerate().skip(done) {
        let am = absmax[bi];
        let codes = &bytes[bi * BLOCK / 2..];
        for (pair, &b) in o.chunks_mut(2).zip(codes) {
            let [hi, lo] = pairs[b as usize];
            pair[0] = hi * am;
            if let Some(v) = pair.get_mut(1) {
                *v = lo * am;
            }
        }
    }
}

/// The first `blocks` whole blocks with AVX-512: the 16 levels sit in one register and
/// `vpermps` looks up 16 codes at once; the products are the scalar path's, bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_blocks_avx512(bytes: &[u8], absmax: &[f32], out: &mut [f32], blocks: usize) {
    use std::arch::x86_64::*;
    assert!(bytes.len() >= blocks * BLOCK / 2 && absmax.len() >= blocks);
    assert!(out.len() >= blocks * BLOCK);
    // SAFETY: NF4 holds 16 f32.
    let table = unsafe { _mm512_loadu_ps(NF4.as_ptr()) };
    let low4 = _mm512_set1_epi32(15);
    // Interleave (high-nibble level, low-nibble level) pairs: outputs 0..16 and 16..32.
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (b, &am) in absmax.iter().enumerate().take(blocks) {
        let s = _mm512_set1_ps(am);
        for half in 0..2 {
            let off = b * BLOCK / 2 + half * 16;
            // SAFETY: off + 16 ≤ blocks·32 ≤ bytes.len(), checked above.
            let v = unsafe { _mm_loadu_si128(bytes.as_ptr().add(off).cast()) };
            let x = _mm512_cvtepu8_epi32(v);
            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), table);
            let lo = _mm512_permutexvar_ps(_mm512_and_si512(x, low4), table);
            let o = b * BLOCK + half * 32;
            // SAFETY: o + 32 ≤ blocks·64 ≤ out.len(), checked above.
            unsafe {
                let p = out.as_mut_ptr().add(o);
                _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_permutex2var_ps(hi, first, lo), s));
                _mm512_storeu_ps(
                    p.add(16),
                    _mm512_mul_ps(_mm512_permutex2var_ps(hi, second, lo), s),
                );
            }
        }
    }
}
