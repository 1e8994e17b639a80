//! Products `x·Wᵀ` of a few rows: decoding runs every projection and the LM head on one row
//! per sequence, where the work is reading the weights once. A BLAS packs the weight into its
//! own layout first (OpenBLAS's `sgemm_incopy` was half of decoding's time here), which
//! doubles the memory traffic of a product that is bound by it; this kernel reads each
//! weight row once, straight from the model's `[out, in]` layout, against all the rows of `x`
//! held in cache, in tiles of 4 weight rows × 4 input rows with 16-lane partial sums.

use rayon::prelude::*;

/// The most rows of `x` that [`product_nt`] takes; beyond, a BLAS's packing pays for itself.
pub const MAX_ROWS: usize = 16;

/// Weight rows per parallel task.
const BLOCK: usize = 64;

const LANES: usize = 16;

/// One term `alpha·x·wᵀ` of [`product_nt`]: `x` `[m, k]` and `w` `[n, k]`, row-major and
/// contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    /// Scale.
    pub alpha: f32,
    /// Left factor `[m, k]`.
    pub x: &'a [f32],
    /// Right factor `[n, k]` (a weight `[out, in]`).
    pub w: &'a [f32],
    /// Inner dimension.
    pub k: usize,
}

/// `Σ alpha·x·wᵀ` `[m, n]` over `parts`, for `m ≤ MAX_ROWS`.
///
/// # Panics
/// When `m` exceeds [`MAX_ROWS`] or a factor is shorter than its shape.
pub fn product_nt(m: usize, n: usize, parts: &[Part<'_>]) -> Vec<f32> {
    assert!(
        m <= MAX_ROWS,
        "skinny product: {m} rows (at most {MAX_ROWS})"
    );
    for p in parts {
        assert!(
            p.x.len() >= m * p.k,
            "skinny product: left factor too short"
        );
        assert!(
            p.w.len() >= n * p.k,
            "skinny product: right factor too short"
        );
    }
    // Tasks fill the transpose [n, m] by blocks of weight rows, then it is turned around.
    let mut t = vec![0f32; n * m];
    if m == 0 {
        return t;
    }
    t.par_chunks_mut(BLOCK * m)
        .enumerate()
        .for_each(|(blk, out)| {
            let j0 = blk * BLOCK;
            let rows = out.len() / m;
            for p in parts {
                let w = &p.w[j0 * p.k..(j0 + rows) * p.k];
                #[cfg(target_arch = "x86_64")]
                if avx512::usable() {
                    avx512::block(p.x, m, p.k, w, rows, p.alpha, out);
                    continue;
                }
                block(p.x, m, p.k, w, rows, p.alpha, out);
            }
        });
    let mut c = vec![0f32; m * n];
    for (j, row) in t.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            c[i * n + j] = v;
        }
    }
    c
}

crate::kernels::simd! {
    /// `out[j, i] += alpha·(x[i]·w[j])` for the `nw` rows of `w` and the `m` rows of `x`
    /// (`out` `[nw, m]`).
    fn block(x: &[f32], m: usize, k: usize, w: &[f32], nw: usize, alpha: f32, out: &mut [f32]) {
        for j in (0..nw).step_by(4) {
            let wj = &w[j * k..];
            let oj = &mut out[j * m..];
            for i in (0..m).step_by(4) {
                let xi = &x[i * k..];
                let o = &mut oj[i..];
                match ((nw - j).min(4), (m - i).min(4)) {
                    (4, 4) => tile::<4, 4>(xi, k, wj, alpha, o, m),
                    (4, 3) => tile::<4, 3>(xi, k, wj, alpha, o, m),
                    (4, 2) => tile::<4, 2>(xi, k, wj, alpha, o, m),
                    (4, 1) => tile::<4, 1>(xi, k, wj, alpha, o, m),
                    (c, r) => tile_any(xi, k, wj, alpha, o, m, c, r),
                }
            }
        }
    }
}

/// The AVX-512 tiles: sixteen accumulators in registers, fused multiply-adds, and the next
/// tile's weight lines prefetched while this one runs (the weight streams from memory once;
/// without the prefetch the loads waited on it).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Whether the CPU has AVX-512F and the engine may use it.
    pub(super) fn usable() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
            && crate::kernels::SIMD_LEVEL.load(std::sync::atomic::Ordering::Relaxed) >= 2
    }

    /// [`super::block`] on AVX-512.
    pub(super) fn block(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        nw: usize,
        alpha: f32,
        out: &mut [f32],
    ) {
        assert!(x.len() >= m * k && w.len() >= nw * k && out.len() >= nw * m);
        for j in (0..nw).step_by(4) {
            for i in (0..m).step_by(4) {
                let (xi, wj) = (x[i * k..].as_ptr(), w[j * k..].as_ptr());
                let o = out[j * m + i..].as_mut_ptr();
                // SAFETY: AVX-512F was detected (`usable`); the tile reads rows i..i+R of x
                // and j..j+C of w and writes out[(j+jj)·m + i + ii], all in bounds (checked
                // above, R ≤ m − i, C ≤ nw − j); prefetches do not dereference.
                unsafe {
                    match ((nw - j).min(4), (m - i).min(4)) {
                        (4, 4) => tile::<4, 4>(xi, k, wj, alpha, o, m),
                        (4, 3) => tile::<4, 3>(xi, k, wj, alpha, o, m),
                        (4, 2) => tile::<4, 2>(xi, k, wj, alpha, o, m),
                        (4, 1) => tile::<4, 1>(xi, k, wj, alpha, o, m),
                        (3, r) => edge::<3>(xi, k, wj, alpha, o, m, r),
                        (2, r) => edge::<2>(xi, k, wj, alpha, o, m, r),
                        (_, r) => edge::<1>(xi, k, wj, alpha, o, m, r),
                    }
                }
            }
        }
    }

    /// Sixteen lanes from `p` (`n ≥ 16`) or its first `n` (the rest zero).
    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> __m512 {
        // SAFETY: the caller's pointer holds min(n, 16) values.
        unsafe {
            if n >= 16 {
                _mm512_loadu_ps(p)
            } else {
                _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p)
            }
        }
    }

    /// `C` weight rows × `R` input rows: `out[j·m + i] += alpha·(x[i]·w[j])`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const C: usize, const R: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        alpha: f32,
        out: *mut f32,
        m: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        let mut c = 0;
        // SAFETY: the caller's bounds; prefetch addresses are never dereferenced.
        unsafe {
            while c < k {
                let n = k - c;
                for (j, aj) in acc.iter_mut().enumerate() {
                    let wv = load(w.add(j * k + c), n);
                    // The same line of the next tile's row j (the rows are contiguous).
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((C + j) * k + c).cast());
                    for (i, a) in aj.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(load(x.add(i * k + c), n), wv, *a);
                    }
                }
                c += 16;
            }
            for (j, aj) in acc.iter().enumerate() {
                for (i, a) in aj.iter().enumerate() {
                    *out.add(j * m + i) += alpha * _mm512_reduce_add_ps(*a);
                }
            }
        }
    }

    /// `C` (< 4) weight rows × `r` input rows, one row of inputs at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn edge<const C: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        alpha: f32,
        out: *mut f32,
        m: usize,
        r: usize,
    ) {
        // SAFETY: the caller's bounds.
        unsafe {
            for i in 0..r {
                tile::<C, 1>(x.add(i * k), k, w, alpha, out.add(i), m);
            }
        }
    }
}

/// `C` weight rows × `R` input rows: `out[j·m + i] += alpha·(x[i]·w[j])`.
#[inline(always)]
fn tile<const C: usize, const R: usize>(
    x: &[f32],
    k: usize,
    w: &[f32],
    alpha: f32,
    out: &mut [f32],
    m: usize,
) {
    let mut acc = [[[0f32; LANES]; R]; C];
    let full = k / LANES * LANES;
    let (x, w) = (&x[..(R - 1) * k + k], &w[..(C - 1) * k + k]);
    let mut c = 0;
    while c < full {
        for (j, aj) in acc.iter_mut().enumerate() {
            let wv: &[f32; LANES] = w[j * k + c..j * k + c + LANES]
                .try_into()
                .expect("16 lanes");
            for (i, a) in aj.iter_mut().enumerate() {
                let xv: &[f32; LANES] = x[i * k + c..i * k + c + LANES]
                    .try_into()
                    .expect("16 lanes");
                for l in 0..LANES {
                    a[l] += xv[l] * wv[l];
                }
            }
        }
        c += LANES;
    }
    for (j, aj) in acc.iter().enumerate() {
        for (i, a) in aj.iter().enumerate() {
            let mut s: f32 = a.iter().sum();
            for t in full..k {
                s += x[i * k + t] * w[j * k + t];
            }
            out[j * m + i] += alpha * s;
        }
    }
}

/// [`tile`] for the edges (fewer than 4 weight rows).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_any(
    x: &[f32],
    k: usize,
    w: &[f32],
    alpha: f32,
    out: &mut [f32],
    m: usize,
    c: usize,
    r: usize,
) {
    for j in 0..c {
        for i in 0..r {
            let s = super::fastmath::dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
            out[j * m + i] += alpha * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_plain_product_for_every_edge_shape() {
        // Both the AVX-512 tiles (where the CPU has them) and the portable ones.
        for level in [2, 1] {
            crate::kernels::SIMD_LEVEL.store(level, std::sync::atomic::Ordering::Relaxed);
            check_every_edge_shape();
        }
        crate::kernels::SIMD_LEVEL.store(2, std::sync::atomic::Ordering::Relaxed);
    }

    fn check_every_edge_shape() {
        let k = 37; // two full lane chunks and a tail
        let n = BLOCK + 7; // two tasks, the last with an edge of 3 weight rows
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let w2: Vec<f32> = (0..n * 3).map(|i| (i % 5) as f32 - 2.0).collect();
        for m in 1..=MAX_ROWS {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            let x2: Vec<f32> = (0..m * 3).map(|i| (i % 3) as f32).collect();
            let parts = [
                Part {
                    alpha: 1.0,
                    x: &x,
                    w: &w,
                    k,
                },
                Part {
                    alpha: 0.5,
                    x: &x2,
                    w: &w2,
                    k: 3,
                },
            ];
            let c = product_nt(m, n, &parts);
            for i in 0..m {
                for j in 0..n {
                    let mut want = 0f64;
                    for t in 0..k {
                        want += f64::from(x[i * k + t]) * f64::from(w[j * k + t]);
                    }
                    for t in 0..3 {
                        want += 0.5 * f64::from(x2[i * 3 + t]) * f64::from(w2[j * 3 + t]);
                    }
                    let got = f64::from(c[i * n + j]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "m {m} [{i}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
