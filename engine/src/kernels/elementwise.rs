//! Fused row-wise kernels: RMSNorm (with the residual add folded in), SwiGLU, RoPE on the
//! `[tokens, heads·d]` layout, and the softmax of LM-head logits. Each is one pass over its
//! inputs; forms and derivatives are those of [`crate::train::ops`].

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{Uninit, fastmath, init};

const ROWS: usize = 16;

crate::kernels::simd! {
    fn rms_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [MaybeUninit<f32>], r: &mut [MaybeUninit<f32>]) {
        let d = w.len();
        assert!(y.len() == x.len() && r.len() * d == x.len(), "rms_rows: shapes differ");
        for ((xr, yr), rr) in x.chunks(d).zip(y.chunks_mut(d)).zip(r.iter_mut()) {
            let ms = fastmath::dot(xr, xr) / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            rr.write(inv);
            for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
                o.write(v * inv * g);
            }
        }
    }
}

crate::kernels::simd! {
    fn add_rows(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

/// RMSNorm forward on `[n, d]` rows: `(y, r)`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let n = x.len() / d;
    let (mut y, mut r) = (Uninit::new(x.len()), Uninit::new(n));
    y.spare()
        .par_chunks_mut(ROWS * d)
        .zip(r.spare().par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * d))
        .for_each(|((y, r), x)| rms_rows(x, w, eps, y, r));
    // SAFETY: the chunks cover both vectors and `rms_rows` writes every element of its own.
    unsafe { (y.assume_init(), r.assume_init()) }
}

/// The residual sum `h = x + a` and its RMSNorm, in one pass: `(h, y, r)`.
pub fn add_rmsnorm(x: &[f32], a: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), a.len(), "add_rmsnorm: shapes differ");
    let d = w.len();
    let n = x.len() / d;
    let (mut h, mut y, mut r) = (Uninit::new(x.len()), Uninit::new(x.len()), Uninit::new(n));
    h.spare()
        .par_chunks_mut(ROWS * d)
        .zip(y.spare().par_chunks_mut(ROWS * d))
        .zip(r.spare().par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * d).zip(a.par_chunks(ROWS * d)))
        .for_each(|(((h, y), r), (x, a))| {
            let h = init(h);
            add_rows(x, a, h);
            rms_rows(h, w, eps, y, r);
        });
    // SAFETY: the chunks cover the three vectors; `h` went through `init` and `rms_rows`
    // writes every element of its `y` and `r` chunks.
    unsafe { (h.assume_init(), y.assume_init(), r.assume_init()) }
}

/// `Σ aᵢbᵢcᵢ` with 16 partial sums.
#[inline(always)]
fn weighted_dot(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        for j in 0..16 {
            acc[j] += a[i + j] * b[i + j] * c[i + j];
        }
    }
    let tail: f32 = (n..a.len()).map(|i| a[i] * b[i] * c[i]).sum();
    acc.iter().sum::<f32>() + tail
}

crate::kernels::simd! {
    fn rms_back_rows(x: &[f32], r: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw: &mut [f32]) {
        let d = w.len();
        for (((xr, &rr), dyr), dxr) in x.chunks(d).zip(r).zip(dy.chunks(d)).zip(dx.chunks_mut(d)) {
            // g = dy ⊙ w; m = mean(g ⊙ x̂); dx = r (g − x̂ m)
            let m = weighted_dot(dyr, w, xr) * rr / d as f32;
            for ((((o, v), g), wv), acc) in dxr.iter_mut().zip(xr).zip(dyr).zip(w).zip(dw.iter_mut()) {
                let xh = v * rr;
                *o = rr * (g * wv - xh * m);
                *acc += g * xh;
            }
        }
    }
}

/// RMSNorm backward: `(dx, dw)`, with `residual` (the gradient reaching the normalised input
/// along the skip connection) added to `dx` when given.
pub fn rmsnorm_backward(
    x: &[f32],
    r: &[f32],
    w: &[f32],
    dy: &[f32],
    residual: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    if let Some(res) = residual {
        assert_eq!(
            res.len(),
            x.len(),
            "rmsnorm_backward: residual shape differs"
        );
    }
    let mut dx = Uninit::new(x.len());
    let dws: Vec<Vec<f32>> = dx
        .spare()
        .par_chunks_mut(ROWS * d)
        .enumerate()
        .zip(x.par_chunks(ROWS * d))
        .zip(r.par_chunks(ROWS))
        .zip(dy.par_chunks(ROWS * d))
        .map(|((((i, dx), x), r), dy)| {
            let dx = init(dx);
            let mut dw = vec![0f32; d];
            rms_back_rows(x, r, w, dy, dx, &mut dw);
            if let Some(res) = residual {
                let res = &res[i * ROWS * d..i * ROWS * d + dx.len()];
                for (o, v) in dx.iter_mut().zip(res) {
                    *o += v;
                }
            }
            dw
        })
        .collect();
    // SAFETY: the chunks cover the vector and each went through `init`.
    let dx = unsafe { dx.assume_init() };
    let mut dw = vec![0f32; d];
    for p in dws {
        dw.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    (dx, dw)
}

crate::kernels::simd! {
    fn swiglu_chunk(g: &[f32], u: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, gv), uv) in out.iter_mut().zip(g).zip(u) {
            o.write(gv * fastmath::sigmoid(*gv) * uv);
        }
    }
}

/// `silu(g) ⊙ u`.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "swiglu: shapes differ");
    let mut out = Uninit::new(g.len());
    out.spare()
        .par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14))
        .zip(u.par_chunks(1 << 14))
        .for_each(|((o, g), u)| swiglu_chunk(g, u, o));
    // SAFETY: the chunks cover the vector and `swiglu_chunk` writes every element.
    unsafe { out.assume_init() }
}

crate::kernels::simd! {
    fn swiglu_back_chunk(g: &[f32], u: &[f32], da: &[f32], dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>]) {
        for ((((gv, uv), a), dgo), duo) in g.iter().zip(u).zip(da).zip(dg.iter_mut()).zip(du.iter_mut()) {
            let s = fastmath::sigmoid(*gv);
            duo.write(a * gv * s);
            dgo.write(a * uv * s * (1.0 + gv * (1.0 - s)));
        }
    }
}

/// SwiGLU backward: `(dg, du)`.
pub fn swiglu_backward(g: &[f32], u: &[f32], da: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        u.len() == g.len() && da.len() == g.len(),
        "swiglu_backward: shapes differ"
    );
    let n = g.len();
    let (mut dg, mut du) = (Uninit::new(n), Uninit::new(n));
    dg.spare()
        .par_chunks_mut(1 << 14)
        .zip(du.spare().par_chunks_mut(1 << 14))
        .zip(g.par_chunks(1 << 14))
        .zip(u.par_chunks(1 << 14))
        .zip(da.par_chunks(1 << 14))
        .for_each(|((((dg, du), g), u), da)| swiglu_back_chunk(g, u, da, dg, du));
    // SAFETY: the chunks cover both vectors and `swiglu_back_chunk` writes every element.
    unsafe { (dg.assume_init(), du.assume_init()) }
}

/// RoPE on rows `[n, heads·d]` into a new vector (`x` is read once, on the workers): `cos` and
/// `sin` are `[n, d]` (one row per token). `inverse` applies the transpose (the backward pass).
pub fn rope_rows(
    x: &[f32],
    heads: usize,
    d: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) -> Vec<f32> {
    let mut out = Uninit::new(x.len());
    out.spare()
        .par_chunks_mut(heads * d)
        .zip(x.par_chunks(heads * d))
        .zip(cos.par_chunks(d))
        .zip(sin.par_chunks(d))
        .for_each(|(((o, x), c), s)| {
            let row = init(o);
            row.copy_from_slice(x);
            rope_row(row, d, c, s, inverse);
        });
    // SAFETY: the chunks cover the vector and each went through `init`.
    unsafe { out.assume_init() }
}

fn rope_row(row: &mut [f32], d: usize, c: &[f32], s: &[f32], inverse: bool) {
    let half = d / 2;
    for h in row.chunks_mut(d) {
        for i in 0..half {
            let (a, b) = (h[i], h[i + half]);
            if inverse {
                // dq = dy·cos + Rᵀ(dy·sin), Rᵀ([p, q]) = [q, −p]
                h[i] = a * c[i] + b * s[i + half];
                h[i + half] = b * c[i + half] - a * s[i];
            } else {
                h[i] = a * c[i] - b * s[i];
                h[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

crate::kernels::simd! {
    fn softmax_row(row: &mut [f32]) -> f32 {
        let max = fastmath::max(row);
        let sum = fastmath::exp_shift_sum(row, max);
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
        max + sum.ln()
    }
}

/// Softmax of logits rows `[n, vocab]` in place; returns `logsumexp` per row.
pub fn softmax_rows(logits: &mut [f32], vocab: usize) -> Vec<f32> {
    logits.par_chunks_mut(vocab).map(softmax_row).collect()
}

crate::kernels::simd! {
    fn softmax_row_entropy(row: &mut [f32]) -> (f32, f32) {
        let max = fastmath::max(row);
        let (sum, dot) = fastmath::exp_shift_sum_dot(row, max);
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
        // H = −Σ p·log p, log p = (z − max) − ln S.
        (max + sum.ln(), sum.ln() - dot * inv)
    }
}

/// [`softmax_rows`] that also returns each row's entropy `−Σ p·log p`: `(logsumexp,
/// entropy)` per row, from the same pass over the logits.
pub fn softmax_rows_entropy(logits: &mut [f32], vocab: usize) -> Vec<(f32, f32)> {
    logits
        .par_chunks_mut(vocab)
        .map(softmax_row_entropy)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn softmax_entropy_is_minus_sum_p_log_p() {
        // 3 rows of 37: not a multiple of the SIMD lanes.
        let mut x = vals(3 * 37, 9);
        let rows = x.clone();
        let mut plain = x.clone();
        let both = softmax_rows_entropy(&mut x, 37);
        assert_eq!(
            softmax_rows(&mut plain, 37),
            both.iter().map(|b| b.0).collect::<Vec<_>>()
        );
        assert_eq!(x, plain, "the same probabilities");
        for (row, (lse, h)) in rows.chunks(37).zip(&both) {
            let want: f64 = -row
                .iter()
                .map(|&z| {
                    let lp = f64::from(z) - f64::from(*lse);
                    lp.exp() * lp
                })
                .sum::<f64>();
            assert!((f64::from(*h) - want).abs() < 1e-5, "{h} vs {want}");
        }
    }

    #[test]
    fn fused_residual_passes_equal_the_separate_ones() {
        // 37 rows: not a multiple of the 16-row chunks.
        let (n, d) = (37, 24);
        let (x, a, w, dy, res) = (
            vals(n * d, 1),
            vals(n * d, 2),
            vals(d, 3),
            vals(n * d, 4),
            vals(n * d, 5),
        );
        let (h, y, r) = add_rmsnorm(&x, &a, &w, 1e-5);
        let h2: Vec<f32> = x.iter().zip(&a).map(|(p, q)| p + q).collect();
        assert_eq!(h, h2);
        assert_eq!((y, r.clone()), rmsnorm(&h2, &w, 1e-5));
        let (dx, dw) = rmsnorm_backward(&h, &r, &w, &dy, None);
        let (dx_res, dw_res) = rmsnorm_backward(&h, &r, &w, &dy, Some(&res));
        assert_eq!(dw, dw_res);
        for ((s, p), q) in dx_res.iter().zip(&dx).zip(&res) {
            assert_eq!(*s, p + q);
        }
    }

    #[test]
    fn rope_backward_inverts_forward() {
        let (n, heads, d) = (5, 3, 8);
        let x = vals(n * heads * d, 7);
        // As in RoPE tables, both halves of a head share their angles.
        let ang: Vec<f32> = (0..n * d)
            .map(|i| (i % (d / 2)) as f32 * 0.3 + (i / d) as f32)
            .collect();
        let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
        let y = rope_rows(&x, heads, d, &cos, &sin, false);
        let back = rope_rows(&y, heads, d, &cos, &sin, true);
        for (p, q) in back.iter().zip(&x) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        use super::super::{SIMD_LEVEL, attention};
        use std::sync::atomic::Ordering::Relaxed;
        let (n, d) = (37, 24);
        let (x, a, w, dy) = (vals(n * d, 1), vals(n * d, 2), vals(d, 3), vals(n * d, 4));
        let sh = attention::Shape {
            batch: 2,
            len: 70,
            hq: 4,
            hkv: 2,
            d: 8,
        };
        let mask = attention::Mask {
            segments: None,
            window: None,
        };
        let (q, k) = (vals(140 * 32, 5), vals(140 * 16, 6));
        let (v, d_o) = (vals(140 * 16, 7), vals(140 * 32, 8));
        let run = || {
            let (h, y, r) = add_rmsnorm(&x, &a, &w, 1e-5);
            let (dx, dw) = rmsnorm_backward(&h, &r, &w, &dy, Some(&a));
            let (dg, du) = swiglu_backward(&x, &a, &dy);
            let mut logits = x.clone();
            let lse = softmax_rows(&mut logits, d);
            let (o, alse) = attention::forward(&q, &k, &v, sh, mask, 0.35);
            let (dq, dk, dv) = attention::backward(&q, &k, &v, &o, &d_o, &alse, sh, mask, 0.35);
            [
                h,
                y,
                r,
                dx,
                dw,
                swiglu(&x, &a),
                dg,
                du,
                logits,
                lse,
                o,
                alse,
                dq,
                dk,
                dv,
            ]
            .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>())
        };
        let widest = run();
        for level in [1, 0] {
            SIMD_LEVEL.store(level, Relaxed);
            let other = run();
            SIMD_LEVEL.store(2, Relaxed);
            for (i, (p, q)) in widest.iter().zip(&other).enumerate() {
                assert!(p == q, "output {i} differs at level {level}");
            }
        }
    }
}
