//! A projection `y = x·Wᵀ + b`, optionally with a LoRA branch `+ s·(x·Aᵀ)·Bᵀ` (PEFT's
//! convention: `A` `[r, in]`, `B` `[out, r]`, `s = α/r`, or `α/√r` with rsLoRA).
//!
//! The LoRA branch is never merged into `W` at run time: the low-rank path costs
//! `2·r·(in+out)` flops per token instead of an `out×in` matrix per step, and the frozen base
//! weight stays outside the autodiff graph.
//!
//! # Shapes
//! - input `[batch, seq, in]`, output `[batch, seq, out]`.

use burn::tensor::{Distribution, Tensor};

use crate::error::Result;
use crate::model::Loader;

/// The low-rank adapter of one projection.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `lora_A.weight` `[r, in]`.
    pub a: Tensor<2>,
    /// `lora_B.weight` `[out, r]`.
    pub b: Tensor<2>,
    /// Scale `α/r` (or `α/√r` with rsLoRA).
    pub scale: f64,
    /// Dropout probability on the LoRA input while training.
    pub dropout: f64,
}

/// A frozen base projection with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Base weight `[out, in]` (Hugging Face layout).
    pub weight: Tensor<2>,
    /// Optional bias `[out]`.
    pub bias: Option<Tensor<1>>,
    /// Optional LoRA branch.
    pub lora: Option<LoraWeights>,
    /// Whether LoRA dropout is active (training mode).
    pub training: bool,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias`.
    pub fn load(
        loader: &Loader<'_>,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = loader.tensor::<2>(&format!("{prefix}.weight"), [out, inp])?;
        let bias = if bias {
            Some(loader.tensor::<1>(&format!("{prefix}.bias"), [out])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            lora: None,
            training: false,
        })
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Applies the projection (and the LoRA branch when present).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, inp] = x.dims();
        let x2 = x.reshape([b * t, inp]);
        let mut y = x2.clone().matmul(self.weight.clone().transpose());
        if let Some(bias) = &self.bias {
            y = y + bias.clone().unsqueeze::<2>();
        }
        if let Some(lora) = &self.lora {
            let xin = if self.training && lora.dropout > 0.0 {
                let keep = 1.0 - lora.dropout;
                let mask = x2.random_like(Distribution::Bernoulli(keep));
                x2 * mask / keep
            } else {
                x2
            };
            let low = xin.matmul(lora.a.clone().transpose());
            y = y + low.matmul(lora.b.clone().transpose()) * lora.scale;
        }
        let out = y.dims()[1];
        y.reshape([b, t, out])
    }
}
