//! Forward and backward of the decoder's building blocks, written out by hand on burn tensors.
//! Training does not record an autodiff graph: each block keeps exactly what its backward needs
//! (see [`super::step`]), which bounds memory, and frozen weights never enter a graph.
//!
//! Derivatives (rows are tokens):
//! - RMSNorm `y = w ⊙ x̂`, `x̂ = x·r`, `r = (mean(x²)+ε)^-½`:
//!   `dx = r ⊙ (g − x̂ ⊙ mean(g ⊙ x̂))` with `g = dy ⊙ w`; `dw = Σ_rows dy ⊙ x̂`.
//! - RoPE `q' = q ⊙ cos + R(q) ⊙ sin`, `R([a, b]) = [−b, a]`: `dq = dq' ⊙ cos + Rᵀ(dq' ⊙ sin)`,
//!   `Rᵀ([a, b]) = [b, −a]`.
//! - Attention `P = softmax(s·QKᵀ + M)`, `O = PV`: `dV = PᵀdO`, `dP = dO·Vᵀ`,
//!   `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = s·dS·K`, `dK = s·dSᵀ·Q`.
//! - SwiGLU `a = silu(g) ⊙ u`: `du = da ⊙ silu(g)`,
//!   `dg = da ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))`.
//! - LoRA linear `y = xWᵀ + b + s·(xAᵀ)Bᵀ`: `dx = dy·W + s·(dy·B)·A`, `dB = s·dyᵀ(xAᵀ)`,
//!   `dA = s·(dy·B)ᵀx`, `dW = dyᵀx`, `db = Σ_rows dy`.
//! - Log-probability of a target under the LM head, `ℓ = (hWᵀ)_y − logsumexp(hWᵀ)`:
//!   `dℓ/dh = W_y − softmax(hWᵀ)·W`, computed in the forward pass (rows of logits never
//!   outlive their chunk) so that backward is a scale per row.

use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::kernels::{self, Term, blas::Operand, matmul_sum};

/// RMSNorm forward: returns `y` and the per-row `r = (mean(x²)+ε)^-½` `[n, 1]`.
pub fn rmsnorm(x: &Tensor<2>, w: &Tensor<1>, eps: f64) -> (Tensor<2>, Tensor<2>) {
    let r = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    let y = x.clone() * r.clone() * w.clone().unsqueeze::<2>();
    (y, r)
}

/// RMSNorm backward: `dx` and, when wanted, `dw` `[d]`.
pub fn rmsnorm_backward(
    x: &Tensor<2>,
    r: &Tensor<2>,
    w: &Tensor<1>,
    dy: Tensor<2>,
    want_dw: bool,
) -> (Tensor<2>, Option<Tensor<1>>) {
    let xhat = x.clone() * r.clone();
    let dw = want_dw.then(|| (dy.clone() * xhat.clone()).sum_dim(0).squeeze_dim::<1>(0));
    let g = dy * w.clone().unsqueeze::<2>();
    let m = (g.clone() * xhat.clone()).mean_dim(1);
    let dx = r.clone() * (g - xhat * m);
    (dx, dw)
}

/// `[a, b] → [−b, a]` on the last dimension.
fn rotate(x: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..t, d / 2..d]);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// `[a, b] → [b, −a]` (the transpose of [`rotate`]).
fn rotate_t(x: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..t, d / 2..d]);
    Tensor::cat(vec![x2, x1.neg()], 3)
}

/// RoPE forward.
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    x.clone() * cos.clone() + rotate(x) * sin.clone()
}

/// RoPE backward.
pub fn rope_backward(dy: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    dy.clone() * cos.clone() + rotate_t(dy * sin.clone())
}

/// Repeats KV heads for GQA: `[b, kv, t, d] → [b, kv·g, t, d]`.
pub fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, groups, t, d])
        .reshape([b, kv * groups, t, d])
}

/// Sums the gradients of repeated KV heads: `[b, kv·g, t, d] → [b, kv, t, d]`.
pub fn sum_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, h, t, d] = x.dims();
    x.reshape([b, h / groups, groups, t, d])
        .sum_dim(2)
        .reshape([b, h / groups, t, d])
}

/// Attention probabilities `softmax(s·QKᵀ + mask)` `[b, h, tq, tk]`; `mask` is `true` where
/// hidden.
pub fn attention_probs(
    q: &Tensor<4>,
    k: &Tensor<4>,
    scale: f64,
    mask: &Tensor<4, Bool>,
) -> Tensor<4> {
    let s = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
    softmax(s.mask_fill(mask.clone(), f32::NEG_INFINITY), 3)
}

/// Attention backward from recomputed probabilities: returns `(dQ, dK, dV)` per query head.
pub fn attention_backward(
    p: Tensor<4>,
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    d_out: Tensor<4>,
    scale: f64,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let dv = p.clone().swap_dims(2, 3).matmul(d_out.clone());
    let dp = d_out.matmul(v.clone().swap_dims(2, 3));
    let rowsum = (dp.clone() * p.clone()).sum_dim(3);
    let ds = p * (dp - rowsum);
    let dq = ds.clone().matmul(k.clone()) * scale;
    let dk = ds.swap_dims(2, 3).matmul(q.clone()) * scale;
    (dq, dk, dv)
}

/// SwiGLU forward `silu(g) ⊙ u`.
pub fn swiglu(g: &Tensor<2>, u: &Tensor<2>) -> Tensor<2> {
    silu(g.clone()) * u.clone()
}

/// SwiGLU backward: `(dg, du)`.
pub fn swiglu_backward(g: &Tensor<2>, u: &Tensor<2>, da: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
    let sig = sigmoid(g.clone());
    let silu_g = g.clone() * sig.clone();
    let du = da.clone() * silu_g;
    let dsilu = sig.clone() * ((sig.neg() + 1.0) * g.clone() + 1.0);
    let dg = da * u.clone() * dsilu;
    (dg, du)
}

/// What [`target_logprobs_with_grad`] gives: `log p(target)` per row, `∂ log p/∂h` per row, and
/// (when asked) each row's entropy `−Σ p·log p` over the vocabulary.
pub type HeadRows = (Tensor<1>, Tensor<2>, Option<Vec<f32>>);

/// Log-probabilities of `targets` for hidden rows `h` `[n, hidden]` under the LM head `w`
/// `[vocab, hidden]`, with `dℓ/dh` per row, in chunks of `chunk` rows; with `entropy`, each
/// row's entropy too.
pub fn target_logprobs_with_grad(
    h: &Tensor<2>,
    w: &Tensor<2>,
    targets: &[u32],
    chunk: usize,
    entropy: bool,
) -> HeadRows {
    target_logprobs_cpu(h, w, targets, chunk, entropy)
        .unwrap_or_else(|| target_logprobs_burn(h, w, targets, chunk, entropy))
}

/// [`target_logprobs_with_grad`] in burn operations (any device).
fn target_logprobs_burn(
    h: &Tensor<2>,
    w: &Tensor<2>,
    targets: &[u32],
    chunk: usize,
    entropy: bool,
) -> HeadRows {
    let n = targets.len();
    let hidden = h.dims()[1];
    let device = h.device();
    let mut lps = Vec::new();
    let mut grads = Vec::new();
    let mut entropies = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let hc = h.clone().slice([start..end, 0..hidden]);
        let logits = matmul_sum(&[Term::nt(&hc, w, 1.0)]);
        let p = softmax(logits.clone(), 1);
        let idx: Vec<i64> = targets[start..end].iter().map(|&t| t as i64).collect();
        let idx1 =
            Tensor::<1, Int>::from_data(TensorData::new(idx.clone(), [end - start]), &device);
        let idx2 = Tensor::<2, Int>::from_data(TensorData::new(idx, [end - start, 1]), &device);
        // log p(y) = logit_y − logsumexp; logsumexp = max + log Σ exp(· − max)
        let max = logits.clone().max_dim(1);
        let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
        if entropy {
            // H = logsumexp − Σ p·z.
            let h = lse.clone() - (p.clone() * logits.clone()).sum_dim(1);
            entropies.extend(crate::weights::to_f32_vec(h.into_data()));
        }
        lps.push((logits.gather(1, idx2) - lse).reshape([end - start]));
        let wy = w.clone().select(0, idx1);
        grads.push(wy - matmul_sum(&[Term::nn(&p, w, 1.0)]));
        start = end;
    }
    (
        Tensor::cat(lps, 0),
        Tensor::cat(grads, 0),
        entropy.then_some(entropies),
    )
}

/// [`target_logprobs_with_grad`] on host memory through BLAS: each chunk's logits become
/// probabilities in place (one pass of a vectorised `exp`), and `W_y − p·W` is one product
/// accumulated onto the gathered rows `W_y`. `None` when BLAS or host memory is unavailable.
fn target_logprobs_cpu(
    h: &Tensor<2>,
    w: &Tensor<2>,
    targets: &[u32],
    chunk: usize,
    entropy: bool,
) -> Option<HeadRows> {
    let blas = kernels::blas::get()?;
    if !kernels::available(&h.device()) {
        return None;
    }
    let (hh, wh) = (kernels::host(h)?, kernels::host(w)?);
    let (hd, wd) = (hh.data(), wh.data());
    let [vocab, hidden] = w.dims();
    let n = targets.len();
    let mut lps = Vec::with_capacity(n);
    let mut grads = Vec::with_capacity(n * hidden);
    let mut entropies = Vec::with_capacity(if entropy { n } else { 0 });
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk).min(n);
        let rows = end - start;
        let mut p = blas.product(
            rows,
            vocab,
            hidden,
            1.0,
            Operand::plain(&hd[start * hidden..end * hidden], hidden),
            Operand::transposed(wd, hidden),
        );
        let ys = &targets[start..end];
        let picked: Vec<f32> = ys
            .iter()
            .enumerate()
            .map(|(i, &y)| p[i * vocab + y as usize])
            .collect();
        let lse = if entropy {
            let both = kernels::elementwise::softmax_rows_entropy(&mut p, vocab);
            entropies.extend(both.iter().map(|b| b.1));
            both.into_iter().map(|b| b.0).collect()
        } else {
            kernels::elementwise::softmax_rows(&mut p, vocab)
        };
        lps.extend(picked.iter().zip(&lse).map(|(l, s)| l - s));
        // This chunk's rows of the result: W_y, then − p·W accumulated onto them in place.
        let base = grads.len();
        for &y in ys {
            grads.extend_from_slice(&wd[y as usize * hidden..(y as usize + 1) * hidden]);
        }
        blas.sgemm(
            rows,
            hidden,
            vocab,
            -1.0,
            Operand::plain(&p, vocab),
            Operand::plain(wd, hidden),
            1.0,
            &mut grads[base..],
        );
    }
    let dev = h.device();
    Some((
        kernels::tensor(lps, [n], &dev),
        kernels::tensor(grads, [n, hidden], &dev),
        entropy.then_some(entropies),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    #[test]
    fn host_and_burn_head_agree() {
        let dev = Device::flex();
        let h = Tensor::<2>::random([37, 24], Distribution::Normal(0.0, 1.0), &dev);
        let w = Tensor::<2>::random([301, 24], Distribution::Normal(0.0, 1.0), &dev);
        let targets: Vec<u32> = (0..37).map(|i| (i * 41 % 301) as u32).collect();
        // The entropy against its definition, −Σ p·log p, from the burn path's logits.
        let (lp2, g2, e2) = target_logprobs_burn(&h, &w, &targets, 16, true);
        let logits = crate::weights::to_f32_vec(matmul_sum(&[Term::nt(&h, &w, 1.0)]).into_data());
        let e2 = e2.expect("asked for");
        for (row, e) in logits.chunks(301).zip(&e2) {
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let s: f64 = row.iter().map(|&z| (z as f64 - max).exp()).sum();
            let want: f64 = -row
                .iter()
                .map(|&z| {
                    let lp = z as f64 - max - s.ln();
                    lp.exp() * lp
                })
                .sum::<f64>();
            assert!((*e as f64 - want).abs() < 1e-4, "{e} vs {want}");
        }
        assert!(
            target_logprobs_burn(&h, &w, &targets, 16, false)
                .2
                .is_none()
        );
        let Some((lp, g, e)) = target_logprobs_cpu(&h, &w, &targets, 16, true) else {
            eprintln!("no BLAS installed; nothing to compare");
            return;
        };
        lp.into_data()
            .assert_approx_eq::<f32>(&lp2.into_data(), Tolerance::absolute(1e-4));
        g.into_data()
            .assert_approx_eq::<f32>(&g2.into_data(), Tolerance::absolute(1e-4));
        for (a, b) in e.expect("asked for").iter().zip(&e2) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
