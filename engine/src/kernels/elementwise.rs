//! Fused row-wise kernels: RMSNorm (with the residual add folded in), SwiGLU, RoPE on the
//! `[tokens, heads·d]` layout, and the softmax of LM-head logits. Each is one pass over its
//! inputs; forms and derivatives are those of [`crate::train::ops`].

use rayon::prelude::*;

use super::fastmath;

const ROWS: usize = 16;

crate::simd! {
    fn rms_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], r: &mut [f32]) {
        let d = w.len();
        for ((xr, yr), rr) in x.chunks(d).zip(y.chunks_mut(d)).zip(r.iter_mut()) {
            let ms = fastmath::dot(xr, xr) / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            *rr = inv;
            for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * inv * g;
            }
        }
    }
}

/// RMSNorm forward on `[n, d]` rows: `(y, r)`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let n = x.len() / d;
    let mut y = vec![0f32; x.len()];
    let mut r = vec![0f32; n];
    y.par_chunks_mut(ROWS * d)
        .zip(r.par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * d))
        .for_each(|((y, r), x)| rms_rows(x, w, eps, y, r));
    (y, r)
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

crate::simd! {
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

/// RMSNorm backward: `(dx, dw)`.
pub fn rmsnorm_backward(x: &[f32], r: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut dx = vec![0f32; x.len()];
    let dws: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .zip(r.par_chunks(ROWS))
        .zip(dy.par_chunks(ROWS * d))
        .map(|(((dx, x), r), dy)| {
            let mut dw = vec![0f32; d];
            rms_back_rows(x, r, w, dy, dx, &mut dw);
            dw
        })
        .collect();
    let mut dw = vec![0f32; d];
    for p in dws {
        dw.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    (dx, dw)
}

crate::simd! {
    fn swiglu_chunk(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, gv), uv) in out.iter_mut().zip(g).zip(u) {
            *o = gv * fastmath::sigmoid(*gv) * uv;
        }
    }
}

/// `silu(g) ⊙ u`.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14))
        .zip(u.par_chunks(1 << 14))
        .for_each(|((o, g), u)| swiglu_chunk(g, u, o));
    out
}

crate::simd! {
    fn swiglu_back_chunk(g: &[f32], u: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((gv, uv), a), dgo), duo) in g.iter().zip(u).zip(da).zip(dg.iter_mut()).zip(du.iter_mut()) {
            let s = fastmath::sigmoid(*gv);
            *duo = a * gv * s;
            *dgo = a * uv * s * (1.0 + gv * (1.0 - s));
        }
    }
}

/// SwiGLU backward: `(dg, du)`.
pub fn swiglu_backward(g: &[f32], u: &[f32], da: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(1 << 14)
        .zip(du.par_chunks_mut(1 << 14))
        .zip(g.par_chunks(1 << 14))
        .zip(u.par_chunks(1 << 14))
        .zip(da.par_chunks(1 << 14))
        .for_each(|((((dg, du), g), u), da)| swiglu_back_chunk(g, u, da, dg, du));
    (dg, du)
}

/// RoPE in place on rows `[n, heads·d]`: `cos`/`sin` are `[n, d]` (one row per token).
/// `inverse` applies the transpose (the backward pass).
pub fn rope_rows(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let half = d / 2;
    x.par_chunks_mut(heads * d)
        .zip(cos.par_chunks(d))
        .zip(sin.par_chunks(d))
        .for_each(|((row, c), s)| {
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
        });
}

crate::simd! {
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
