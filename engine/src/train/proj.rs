//! One projection of the training step, forward and backward: the frozen product
//! `x·Wᵀ` plus the LoRA branch `s·(x·Aᵀ)·Bᵀ` (dropout optional), the LoRA factors' gradients,
//! and each projection's part of its input's gradient. Projections that read the same input
//! (q/k/v, gate/up) share their LoRA products (see [`lin_forward_shared`], [`input_grad`]).
//!
//! DoRA (PEFT's `use_dora`): with `c = m/‖W + s·B·A‖` per output (the norm a constant, as
//! PEFT detaches it) and `p = x̃·Wᵀ + s·(x̃·Aᵀ)·Bᵀ` (x̃ the dropped-out input), the output is
//! `x·Wᵀ − x̃·Wᵀ + c⊙p` (just `c⊙p` without dropout). Backward: the LoRA factors and the
//! masked input path see `g' = c⊙dy`, the unmasked base path `dy`, and the magnitude gets
//! `Σ_rows dy⊙p / ‖·‖`.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};

use crate::kernels::{self, Term, matmul_sum};
use crate::model::Linear;
use crate::model::linear::DoraParts;

/// What a LoRA projection's forward keeps for its backward (opaque outside the engine).
pub struct LoraIn {
    /// `x·Aᵀ` (after dropout when active) `[n, r]`.
    pub(super) u: Tensor<2>,
    /// The dropout mask applied to `x` (already divided by the keep probability).
    pub(super) mask: Option<Tensor<2>>,
    /// DoRA's saved values, when the branch has a magnitude.
    dora: Option<DoraParts>,
}

pub(crate) fn lin_forward(
    lin: &Linear,
    x: &Tensor<2>,
    dropout_seed: Option<u64>,
) -> (Tensor<2>, Option<LoraIn>) {
    let w = lin.weight_for_products();
    let (mut y, saved) = match &lin.lora {
        None => (matmul_sum(&[Term::nt(x, &w, 1.0)]), None),
        Some(lora) => {
            let mask = match dropout_seed {
                Some(seed) if lora.dropout > 0.0 => Some(dropout_mask(x, lora.dropout, seed)),
                _ => None,
            };
            let xin = mask.as_ref().map(|m| x.clone() * m.clone());
            let u = matmul_sum(&[Term::nt(xin.as_ref().unwrap_or(x), &lora.a, 1.0)]);
            let (y, dora) = lora.output(&w, x, xin.as_ref(), &u);
            (y, Some(LoraIn { u, mask, dora }))
        }
    };
    if let Some(b) = &lin.bias {
        y = y + b.clone().unsqueeze::<2>();
    }
    (y, saved)
}

/// [`lin_forward`] for projections that read the same input (q/k/v, gate/up): without dropout,
/// their LoRA down-projections `x·Aᵢᵀ` are one product `x·[A₁; A₂; …]ᵀ`, so `x` is read once.
pub(crate) fn lin_forward_shared<const N: usize>(
    lins: [&Linear; N],
    x: &Tensor<2>,
    seeds: [Option<u64>; N],
) -> [(Tensor<2>, Option<LoraIn>); N] {
    let dropout = lins
        .iter()
        .zip(&seeds)
        .any(|(l, s)| s.is_some() && l.lora.as_ref().is_some_and(|l| l.dropout > 0.0));
    let loras: Option<Vec<_>> = lins.iter().map(|l| l.lora.as_ref()).collect();
    let Some(loras) = loras.filter(|_| N > 1 && !dropout) else {
        return std::array::from_fn(|i| lin_forward(lins[i], x, seeds[i]));
    };
    let stacked = Tensor::cat(loras.iter().map(|l| l.a.clone()).collect(), 0);
    let u_all = matmul_sum(&[Term::nt(x, &stacked, 1.0)]);
    let n = x.dims()[0];
    let mut start = 0;
    std::array::from_fn(|i| {
        let (lin, lora) = (lins[i], loras[i]);
        let r = lora.a.dims()[0];
        let u = contiguous(u_all.clone().slice([0..n, start..start + r]));
        start += r;
        let w = lin.weight_for_products();
        let (mut y, dora) = lora.output(&w, x, None, &u);
        if let Some(b) = &lin.bias {
            y = y + b.clone().unsqueeze::<2>();
        }
        (
            y,
            Some(LoraIn {
                u,
                mask: None,
                dora,
            }),
        )
    })
}

/// `t` in its own contiguous storage (a column slice otherwise gets copied at every use).
fn contiguous(t: Tensor<2>) -> Tensor<2> {
    match kernels::host(&t) {
        Some(h) => kernels::tensor(h.data().to_vec(), t.dims(), &t.device()),
        None => t,
    }
}

/// An inverted-dropout mask (`keep/(1−p)` or 0) from a counter-based seed, so that the same
/// step regenerates the same mask.
fn dropout_mask(x: &Tensor<2>, p: f64, seed: u64) -> Tensor<2> {
    use rand::{Rng, SeedableRng};
    let [n, d] = x.dims();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let m: Vec<f32> = (0..n * d)
        .map(|_| {
            if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(m, [n, d]), &x.device())
}

/// What one projection contributes to its input's gradient: `dy·W + s·((dy·B)·A) ⊙ mask`.
pub(crate) struct DxPart<'l> {
    lin: &'l Linear,
    dy: Tensor<2>,
    /// `dy·B` `[n, r]` when the projection has a LoRA branch.
    dyb: Option<Tensor<2>>,
    mask: Option<Tensor<2>>,
    /// DoRA with dropout: `(c − 1)⊙dy`, whose product with `W` joins the masked terms.
    dora_masked: Option<Tensor<2>>,
    /// The `lora_A` gradient's name, when [`input_grad`] computes it (no dropout): stacked
    /// with the other projections that read the same input.
    deferred_a: Option<String>,
}

/// Backward of a projection: adds parameter gradients to `grads` and returns its part of the
/// input gradient (summed by [`input_grad`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lin_backward<'l>(
    lin: &'l Linear,
    name: &str,
    x: &Tensor<2>,
    saved: Option<&LoraIn>,
    dy: Tensor<2>,
    train_lora: bool,
    train_full: bool,
    grads: &mut BTreeMap<String, Tensor<2>>,
) -> DxPart<'l> {
    if train_full {
        grads.insert(
            format!("{name}.weight"),
            matmul_sum(&[Term::tn(&dy, x, 1.0)]),
        );
        if lin.bias.is_some() {
            grads.insert(format!("{name}.bias"), dy.clone().sum_dim(0));
        }
    }
    let mut part = DxPart {
        lin,
        dy,
        dyb: None,
        mask: None,
        dora_masked: None,
        deferred_a: None,
    };
    if let (Some(lora), Some(saved)) = (&lin.lora, saved) {
        let s = lora.scale as f32;
        // The gradient the LoRA branch sees: `c⊙dy` with DoRA.
        let dy_lora = match &saved.dora {
            None => part.dy.clone(),
            Some(d) => {
                if train_lora {
                    grads.insert(
                        format!("{name}.lora_magnitude_vector"),
                        (part.dy.clone() * d.p.clone()).sum_dim(0) * d.inv.clone(),
                    );
                }
                let scaled = part.dy.clone() * d.c.clone();
                match &saved.mask {
                    // Base and LoRA paths both read `x`: one scaled gradient for both.
                    None => part.dy = scaled.clone(),
                    Some(_) => part.dora_masked = Some(scaled.clone() - part.dy.clone()),
                }
                scaled
            }
        };
        let dyb = matmul_sum(&[Term::nn(&dy_lora, &lora.b, 1.0)]); // [n, r]
        if train_lora {
            grads.insert(
                format!("{name}.lora_B"),
                matmul_sum(&[Term::tn(&dy_lora, &saved.u, s)]),
            );
            match &saved.mask {
                Some(m) => {
                    let xin = x.clone() * m.clone();
                    grads.insert(
                        format!("{name}.lora_A"),
                        matmul_sum(&[Term::tn(&dyb, &xin, s)]),
                    );
                }
                None => part.deferred_a = Some(format!("{name}.lora_A")),
            }
        }
        part.dyb = Some(dyb);
        part.mask = saved.mask.clone();
    }
    part
}

/// The gradient of an input `x` shared by `parts` (q/k/v, or gate/up), every product
/// accumulated in one buffer, when `want_dx`; and the deferred `lora_A` gradients. Without
/// dropout the LoRA terms are stacked: `D = [s₁·dy₁B₁ | s₂·dy₂B₂ | …]` gives every
/// `lora_A` gradient in one product `Dᵀ·x` (one read of `x`) and the LoRA part of the input
/// gradient as one term `D·[A₁; A₂; …]` (one pass over the output). NF4 weights are
/// dequantised here and freed on return.
pub(crate) fn input_grad(
    parts: &[DxPart<'_>],
    x: &Tensor<2>,
    want_dx: bool,
    grads: &mut BTreeMap<String, Tensor<2>>,
) -> Option<Tensor<2>> {
    let stacked: Vec<(&DxPart<'_>, &crate::model::linear::LoraWeights, &Tensor<2>)> = parts
        .iter()
        .filter_map(|p| match (&p.lin.lora, &p.dyb, &p.mask) {
            (Some(l), Some(dyb), None) => Some((p, l, dyb)),
            _ => None,
        })
        .collect();
    if !want_dx && stacked.iter().all(|(p, _, _)| p.deferred_a.is_none()) {
        return None;
    }
    let (d, a) = match stacked.as_slice() {
        [] => (None, None),
        [(_, l, dyb)] => (Some((*dyb).clone() * l.scale), Some(l.a.clone())),
        many => (
            Some(Tensor::cat(
                many.iter()
                    .map(|(_, l, dyb)| (*dyb).clone() * l.scale)
                    .collect(),
                1,
            )),
            Some(Tensor::cat(
                many.iter().map(|(_, l, _)| l.a.clone()).collect(),
                0,
            )),
        ),
    };
    if let Some(d) = &d
        && stacked.iter().any(|(p, _, _)| p.deferred_a.is_some())
    {
        let da = matmul_sum(&[Term::tn(d, x, 1.0)]);
        let inp = x.dims()[1];
        let mut start = 0;
        for (p, l, _) in &stacked {
            let r = l.a.dims()[0];
            if let Some(name) = &p.deferred_a {
                grads.insert(name.clone(), da.clone().slice([start..start + r, 0..inp]));
            }
            start += r;
        }
    }
    if !want_dx {
        return None;
    }
    let weights: Vec<Tensor<2>> = parts.iter().map(|p| p.lin.weight_for_products()).collect();
    let mut terms: Vec<Term<'_>> = parts
        .iter()
        .zip(&weights)
        .map(|(p, w)| Term::nn(&p.dy, w, 1.0))
        .collect();
    if let (Some(d), Some(a)) = (&d, &a) {
        terms.push(Term::nn(d, a, 1.0));
    }
    let mut dx = matmul_sum(&terms);
    for (p, w) in parts.iter().zip(&weights) {
        if let (Some(lora), Some(dyb), Some(m)) = (&p.lin.lora, &p.dyb, &p.mask) {
            let mut masked = vec![Term::nn(dyb, &lora.a, lora.scale as f32)];
            if let Some(e) = &p.dora_masked {
                masked.push(Term::nn(e, w, 1.0));
            }
            dx = dx + matmul_sum(&masked) * m.clone();
        }
    }
    Some(dx)
}
