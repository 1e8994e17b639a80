//! The training step's fused operations, on the `[tokens, heads·d]` row layout: the CPU
//! kernels of [`crate::kernels`] on the flex backend, the burn-op versions of [`super::ops`]
//! everywhere else. Both compute the same functions (tested against each other).

use burn::tensor::{Bool, Device, Tensor};

use super::ops;
use crate::kernels::{self, attention as attn, elementwise as ew, host};

/// RoPE tables for one batch, in both forms.
pub struct Rope {
    /// `[lead, 1, len, d]` for the burn path.
    pub cos: Tensor<4>,
    /// `[lead, 1, len, d]` for the burn path.
    pub sin: Tensor<4>,
    /// Per-token `[n, d]` for the CPU path.
    pub cos_rows: Vec<f32>,
    /// Per-token `[n, d]` for the CPU path.
    pub sin_rows: Vec<f32>,
}

/// Everything attention needs besides q, k, v.
pub struct AttnCtx<'a> {
    /// Sizes.
    pub shape: attn::Shape,
    /// Packing segments.
    pub segments: Option<&'a [u32]>,
    /// Sliding window.
    pub window: Option<usize>,
    /// `1/√d`.
    pub scale: f64,
    /// Boolean mask for the burn path (built lazily only there).
    pub mask: Option<Tensor<4, Bool>>,
    /// Whether the CPU kernels run.
    pub cpu: bool,
}

fn t2(v: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    kernels::tensor(v, shape, device)
}

/// RMSNorm forward: `(y, r)` with `r` `[n, 1]`.
pub fn rmsnorm(x: &Tensor<2>, w: &Tensor<1>, eps: f64) -> (Tensor<2>, Tensor<2>) {
    if let (Some(xh), Some(wh)) = (host(x), host(w)) {
        let [n, d] = x.dims();
        let (y, r) = ew::rmsnorm(xh.data(), wh.data(), eps as f32);
        let dev = x.device();
        return (t2(y, [n, d], &dev), t2(r, [n, 1], &dev));
    }
    ops::rmsnorm(x, w, eps)
}

/// The residual sum `h = x + a` and RMSNorm of it: `(h, y, r)` (one pass on the CPU path).
pub fn add_rmsnorm(
    x: &Tensor<2>,
    a: &Tensor<2>,
    w: &Tensor<1>,
    eps: f64,
) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    if let (Some(xh), Some(ah), Some(wh)) = (host(x), host(a), host(w)) {
        let [n, d] = x.dims();
        let (h, y, r) = ew::add_rmsnorm(xh.data(), ah.data(), wh.data(), eps as f32);
        let dev = x.device();
        return (
            t2(h, [n, d], &dev),
            t2(y, [n, d], &dev),
            t2(r, [n, 1], &dev),
        );
    }
    let h = x.clone() + a.clone();
    let (y, r) = ops::rmsnorm(&h, w, eps);
    (h, y, r)
}

/// RMSNorm backward: `(residual + dx, dw)`, where `residual` is the gradient already reaching
/// the normalised input along the skip connection (added in the same pass on the CPU path).
pub fn rmsnorm_backward(
    x: &Tensor<2>,
    r: &Tensor<2>,
    w: &Tensor<1>,
    dy: Tensor<2>,
    residual: Option<&Tensor<2>>,
    want_dw: bool,
) -> (Tensor<2>, Option<Tensor<1>>) {
    // `Some(None)`: no residual; `None`: a residual off host memory (the burn path).
    let res_host = residual.map_or(Some(None), |t| host(t).map(Some));
    if let (Some(xh), Some(rh), Some(wh), Some(dyh), Some(res)) =
        (host(x), host(r), host(w), host(&dy), res_host)
    {
        let [n, d] = x.dims();
        let res = res.as_ref().map(|h| h.data());
        let (dx, dw) = ew::rmsnorm_backward(xh.data(), rh.data(), wh.data(), dyh.data(), res);
        let dev = x.device();
        let dw = want_dw.then(|| kernels::tensor(dw, [d], &dev));
        return (t2(dx, [n, d], &dev), dw);
    }
    let (dx, dw) = ops::rmsnorm_backward(x, r, w, dy, want_dw);
    let dx = match residual {
        Some(res) => res.clone() + dx,
        None => dx,
    };
    (dx, dw)
}

/// SwiGLU forward.
pub fn swiglu(g: &Tensor<2>, u: &Tensor<2>) -> Tensor<2> {
    if let (Some(gh), Some(uh)) = (host(g), host(u)) {
        return t2(ew::swiglu(gh.data(), uh.data()), g.dims(), &g.device());
    }
    ops::swiglu(g, u)
}

/// SwiGLU backward: `(dg, du)`.
pub fn swiglu_backward(g: &Tensor<2>, u: &Tensor<2>, da: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
    if let (Some(gh), Some(uh), Some(dah)) = (host(g), host(u), host(&da)) {
        let (dg, du) = ew::swiglu_backward(gh.data(), uh.data(), dah.data());
        let dev = g.device();
        return (t2(dg, g.dims(), &dev), t2(du, g.dims(), &dev));
    }
    ops::swiglu_backward(g, u, da)
}

fn heads_of(x: Tensor<2>, b: usize, t: usize, h: usize, d: usize) -> Tensor<4> {
    x.reshape([b, t, h, d]).swap_dims(1, 2)
}

fn rows_of(x: Tensor<4>) -> Tensor<2> {
    let [b, h, t, d] = x.dims();
    x.swap_dims(1, 2).reshape([b * t, h * d])
}

/// RoPE on rows `[n, heads·d]` (`inverse`: its transpose, for backward).
pub fn rope(x: Tensor<2>, heads: usize, ctx: &AttnCtx<'_>, r: &Rope, inverse: bool) -> Tensor<2> {
    let [n, w] = x.dims();
    let d = w / heads;
    if ctx.cpu
        && let Some(xh) = host(&x)
    {
        let v = ew::rope_rows(xh.data(), heads, d, &r.cos_rows, &r.sin_rows, inverse);
        return t2(v, [n, w], &x.device());
    }
    let (b, t) = (ctx.shape.batch, ctx.shape.len);
    let x4 = heads_of(x, b, t, heads, d);
    rows_of(if inverse {
        ops::rope_backward(x4, &r.cos, &r.sin)
    } else {
        ops::rope(x4, &r.cos, &r.sin)
    })
}

/// Attention forward on rows; returns `o` rows and, on the CPU path, the log-sum-exp.
pub fn attention(
    q: &Tensor<2>,
    k: &Tensor<2>,
    v: &Tensor<2>,
    ctx: &AttnCtx<'_>,
) -> (Tensor<2>, Option<Vec<f32>>) {
    let sh = ctx.shape;
    let dev = q.device();
    if ctx.cpu
        && let (Some(qh), Some(kh), Some(vh)) = (host(q), host(k), host(v))
    {
        let mask = attn::Mask {
            segments: ctx.segments,
            window: ctx.window,
        };
        let (o, lse) = attn::forward(qh.data(), kh.data(), vh.data(), sh, mask, ctx.scale as f32);
        return (t2(o, [sh.batch * sh.len, sh.hq * sh.d], &dev), Some(lse));
    }
    let groups = sh.hq / sh.hkv;
    let q4 = heads_of(q.clone(), sh.batch, sh.len, sh.hq, sh.d);
    let k4 = ops::repeat_kv(heads_of(k.clone(), sh.batch, sh.len, sh.hkv, sh.d), groups);
    let v4 = ops::repeat_kv(heads_of(v.clone(), sh.batch, sh.len, sh.hkv, sh.d), groups);
    let mask = ctx.mask.as_ref().expect("the burn path builds a mask");
    let p = ops::attention_probs(&q4, &k4, ctx.scale, mask);
    (rows_of(p.matmul(v4)), None)
}

/// Attention backward on rows: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor<2>,
    k: &Tensor<2>,
    v: &Tensor<2>,
    o: &Tensor<2>,
    d_o: Tensor<2>,
    lse: Option<&[f32]>,
    ctx: &AttnCtx<'_>,
) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let sh = ctx.shape;
    let dev = q.device();
    if ctx.cpu
        && let (Some(lse), Some(qh), Some(kh), Some(vh), Some(oh), Some(doh)) =
            (lse, host(q), host(k), host(v), host(o), host(&d_o))
    {
        let mask = attn::Mask {
            segments: ctx.segments,
            window: ctx.window,
        };
        let (dq, dk, dv) = attn::backward(
            qh.data(),
            kh.data(),
            vh.data(),
            oh.data(),
            doh.data(),
            lse,
            sh,
            mask,
            ctx.scale as f32,
        );
        let n = sh.batch * sh.len;
        return (
            t2(dq, [n, sh.hq * sh.d], &dev),
            t2(dk, [n, sh.hkv * sh.d], &dev),
            t2(dv, [n, sh.hkv * sh.d], &dev),
        );
    }
    let groups = sh.hq / sh.hkv;
    let q4 = heads_of(q.clone(), sh.batch, sh.len, sh.hq, sh.d);
    let k4 = ops::repeat_kv(heads_of(k.clone(), sh.batch, sh.len, sh.hkv, sh.d), groups);
    let v4 = ops::repeat_kv(heads_of(v.clone(), sh.batch, sh.len, sh.hkv, sh.d), groups);
    let mask = ctx.mask.as_ref().expect("the burn path builds a mask");
    let p = ops::attention_probs(&q4, &k4, ctx.scale, mask);
    let do4 = heads_of(d_o, sh.batch, sh.len, sh.hq, sh.d);
    let (dq, dk, dv) = ops::attention_backward(p, &q4, &k4, &v4, do4, ctx.scale);
    (
        rows_of(dq),
        rows_of(ops::sum_kv(dk, groups)),
        rows_of(ops::sum_kv(dv, groups)),
    )
}
