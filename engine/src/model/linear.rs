//! A projection `y = x·Wᵀ + b`, optionally with a LoRA branch `+ s·(x·Aᵀ)·Bᵀ` (PEFT's
//! convention: `A` `[r, in]`, `B` `[out, r]`, `s = α/r`, or `α/√r` with rsLoRA).
//!
//! The LoRA branch is never merged into `W` at run time: the low-rank path costs
//! `2·r·(in+out)` flops per token instead of an `out×in` matrix per step, and the frozen base
//! weight stays outside the autodiff graph.
//!
//! With DoRA (PEFT's `use_dora`) the branch also has a magnitude `m` `[out]`, and the output
//! is `(m/‖W + s·B·A‖) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)`: the norm is taken per output row and treated
//! as a constant in the backward pass, as PEFT does ([`LoraWeights::dora_factor`]).
//!
//! # Shapes
//! - input `[batch, seq, in]`, output `[batch, seq, out]`.

use std::sync::Arc;

use burn::tensor::{Device, Distribution, Tensor};

use crate::error::Result;
use crate::kernels::{Term, matmul_sum};
use crate::model::Loader;
use crate::nf4::Nf4Tensor;

/// A frozen base weight: dense, held in bf16 or f16 (`--dtype bf16` training on the CPU) and
/// widened to f32 on each use, or NF4-quantised (QLoRA) and dequantised on each use.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor<2>),
    /// `[out, in]` in 16 bits on the host.
    Half {
        /// The values.
        data: Arc<HalfData>,
        /// `(out, in)`.
        shape: (usize, usize),
        /// Where widened copies go.
        device: Device,
    },
    /// Packed NF4 codes and block scales on the host; `[out, in]` when dequantised.
    Nf4 {
        /// The quantised weight.
        q: Arc<Nf4Tensor>,
        /// Where dequantised copies go.
        device: Device,
    },
}

/// A 16-bit weight's values.
#[derive(Debug, Clone)]
pub enum HalfData {
    /// bfloat16, held as a bf16 tensor so that bf16 products take it without a copy
    /// ([`Linear::weight_for_products`]).
    Bf16(Box<Tensor<2>>),
    /// IEEE half precision.
    F16(Vec<half::f16>),
}

impl HalfData {
    /// `values` (`[out, in]` = `shape`) rounded to the nearest bf16 (`bf16`) or f16; a bf16
    /// weight lives on `device`.
    pub fn round(values: &[f32], shape: (usize, usize), device: &Device, bf16: bool) -> HalfData {
        if bf16 {
            let v: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            HalfData::Bf16(Box::new(Tensor::from_data(
                burn::tensor::TensorData::new(v, [shape.0, shape.1]),
                (device, burn::tensor::DType::BF16),
            )))
        } else {
            HalfData::F16(values.iter().map(|&v| half::f16::from_f32(v)).collect())
        }
    }

    /// The values widened to f32 (exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        use half::slice::HalfFloatSliceExt;
        match self {
            HalfData::Bf16(t) => match crate::kernels::host_bf16(t.as_ref()) {
                Some(h) => h.data().to_f32_vec(),
                None => crate::weights::to_f32_vec(t.to_data()),
            },
            HalfData::F16(v) => v.to_f32_vec(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            HalfData::Bf16(t) => t.shape().num_elements() * 2,
            HalfData::F16(v) => v.len() * 2,
        }
    }
}

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
    /// DoRA's magnitude vector `[1, out]` (PEFT's `lora_magnitude_vector`), when the adapter
    /// is weight-decomposed.
    pub magnitude: Option<Tensor<2>>,
}

/// What a DoRA projection's forward keeps for its backward.
pub struct DoraParts {
    /// `m/‖W + s·B·A‖` `[1, out]`.
    pub(crate) c: Tensor<2>,
    /// `1/‖W + s·B·A‖` `[1, out]`.
    pub(crate) inv: Tensor<2>,
    /// The undecomposed output `x̃·Wᵀ + s·(x̃·Aᵀ)·Bᵀ` `[n, out]`.
    pub(crate) p: Tensor<2>,
}

impl LoraWeights {
    /// The projection's output without its bias, given the input `x`, the dropped-out input
    /// `x̃` when dropout is active (`x` otherwise) and the down-projection `u = x̃·Aᵀ`; with
    /// DoRA also the values its backward needs. Without DoRA `x·Wᵀ + s·u·Bᵀ`; with it
    /// PEFT's `x·Wᵀ + (c − 1)⊙(x̃·Wᵀ) + c⊙s·u·Bᵀ`, computed as `x·Wᵀ − x̃·Wᵀ + c⊙p`.
    pub fn output(
        &self,
        w: &Tensor<2>,
        x: &Tensor<2>,
        dropped: Option<&Tensor<2>>,
        u: &Tensor<2>,
    ) -> (Tensor<2>, Option<DoraParts>) {
        let s = self.scale as f32;
        let Some((c, inv)) = self.dora_factor(w) else {
            // x·Wᵀ + s·u·Bᵀ accumulated in one buffer.
            return (
                matmul_sum(&[Term::nt(x, w, 1.0), Term::nt(u, &self.b, s)]),
                None,
            );
        };
        let p = matmul_sum(&[
            Term::nt(dropped.unwrap_or(x), w, 1.0),
            Term::nt(u, &self.b, s),
        ]);
        let y = match dropped {
            None => p.clone() * c.clone(),
            Some(xin) => {
                matmul_sum(&[Term::nt(x, w, 1.0), Term::nt(xin, w, -1.0)]) + p.clone() * c.clone()
            }
        };
        (y, Some(DoraParts { c, inv, p }))
    }

    /// DoRA's per-row factor `m / ‖W + s·B·A‖` `[1, out]` and the reciprocal norm `[1, out]`
    /// for base weight `w` `[out, in]`, when the branch has a magnitude. The norm is computed
    /// from the current factors and not differentiated (PEFT detaches it).
    pub fn dora_factor(&self, w: &Tensor<2>) -> Option<(Tensor<2>, Tensor<2>)> {
        let m = self.magnitude.as_ref()?;
        let w = match w.dtype() {
            burn::tensor::DType::F32 => w.clone(),
            _ => w.clone().cast(burn::tensor::DType::F32),
        };
        let full = w + matmul_sum(&[Term::nn(&self.b, &self.a, self.scale as f32)]);
        let [out, _] = full.dims();
        let inv = (full.clone() * full)
            .sum_dim(1)
            .sqrt()
            .recip()
            .reshape([1, out])
            .detach();
        Some((m.clone() * inv.clone(), inv))
    }
}

/// A frozen base projection with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Base weight `[out, in]` (Hugging Face layout).
    pub base: BaseWeight,
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
        let name = format!("{prefix}.weight");
        let base = match loader.half {
            Some(bf16) => {
                let values = crate::weights::to_f32_vec(loader.source.require(&name, &[out, inp])?);
                BaseWeight::Half {
                    data: Arc::new(HalfData::round(&values, (out, inp), loader.device, bf16)),
                    shape: (out, inp),
                    device: loader.device.clone(),
                }
            }
            None => BaseWeight::Dense(loader.tensor::<2>(&name, [out, inp])?),
        };
        let bias = if bias {
            Some(loader.tensor::<1>(&format!("{prefix}.bias"), [out])?)
        } else {
            None
        };
        Ok(Linear {
            base,
            bias,
            lora: None,
            training: false,
        })
    }

    /// The base weight `[out, in]`: the tensor itself, or a fresh widened or dequantised copy
    /// (freed by the caller after use, so 16-bit and NF4 weights are never kept in f32).
    pub fn weight(&self) -> Tensor<2> {
        match &self.base {
            BaseWeight::Dense(w) => w.clone(),
            BaseWeight::Half {
                data,
                shape: (o, i),
                device,
            } => crate::kernels::tensor(data.to_f32(), [*o, *i], device),
            BaseWeight::Nf4 { q, device } => {
                let (o, i) = q.shape;
                crate::kernels::tensor(q.dequantize(), [o, i], device)
            }
        }
    }

    /// The base weight as the matrix products take it: a bf16 base stays bf16 (a copy of its
    /// 16-bit values, no widening) when the BLAS multiplies bf16 matrices with f32
    /// accumulation, so that `x·Wᵀ` and `dy·W` are bf16 products as under PyTorch's bf16
    /// autocast ([`crate::kernels::matmul_sum`] rounds the other operand to bf16); otherwise
    /// [`Linear::weight`].
    pub fn weight_for_products(&self) -> Tensor<2> {
        match &self.base {
            BaseWeight::Half {
                data,
                shape: (o, i),
                device,
            } if crate::kernels::blas::get().is_some_and(|b| b.has_bf16())
                && crate::kernels::available(device) =>
            {
                match data.as_ref() {
                    HalfData::Bf16(t) => t.as_ref().clone(),
                    HalfData::F16(_) => self.weight(),
                }
            }
            _ => self.weight(),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match &self.base {
            BaseWeight::Dense(w) => {
                let [o, i] = w.dims();
                (o, i)
            }
            BaseWeight::Half { shape, .. } => *shape,
            BaseWeight::Nf4 { q, .. } => q.shape,
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.shape().0
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.shape().1
    }

    /// Quantises the base weight to NF4 (QLoRA); returns the bytes it now takes.
    pub fn quantize_nf4(&mut self, double_quant: bool) -> usize {
        if !matches!(self.base, BaseWeight::Nf4 { .. }) {
            let w = self.weight();
            let [o, i] = w.dims();
            let device = w.device();
            let values = crate::weights::to_f32_vec(w.to_data());
            let q = crate::nf4::quantize(&values, o, i, double_quant);
            self.base = BaseWeight::Nf4 {
                q: Arc::new(q),
                device,
            };
        }
        self.base_bytes()
    }

    /// Holds a dense base weight in bf16 (`bf16`) or f16, rounded to nearest; returns the
    /// bytes it now takes. NF4 and 16-bit bases stay as they are.
    pub fn store_half(&mut self, bf16: bool) -> usize {
        if let BaseWeight::Dense(w) = &self.base {
            let [o, i] = w.dims();
            let device = w.device();
            let values = crate::weights::to_f32_vec(w.to_data());
            self.base = BaseWeight::Half {
                data: Arc::new(HalfData::round(&values, (o, i), &device, bf16)),
                shape: (o, i),
                device,
            };
        }
        self.base_bytes()
    }

    /// Bytes the base weight takes at rest.
    pub fn base_bytes(&self) -> usize {
        match &self.base {
            BaseWeight::Nf4 { q, .. } => q.bytes_at_rest(),
            BaseWeight::Half { data, .. } => data.bytes(),
            BaseWeight::Dense(w) => w.shape().num_elements() * 4,
        }
    }

    /// Applies the projection (and the LoRA branch when present).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, inp] = x.dims();
        let x2 = x.reshape([b * t, inp]);
        let w = self.weight_for_products();
        let mut y = match &self.lora {
            None => matmul_sum(&[Term::nt(&x2, &w, 1.0)]),
            Some(lora) => {
                let dropped = (self.training && lora.dropout > 0.0).then(|| {
                    let keep = 1.0 - lora.dropout;
                    let mask = x2.random_like(Distribution::Bernoulli(keep));
                    x2.clone() * mask / keep
                });
                let low = matmul_sum(&[Term::nt(dropped.as_ref().unwrap_or(&x2), &lora.a, 1.0)]);
                lora.output(&w, &x2, dropped.as_ref(), &low).0
            }
        };
        if let Some(bias) = &self.bias {
            y = y + bias.clone().unsqueeze::<2>();
        }
        let out = y.dims()[1];
        y.reshape([b, t, out])
    }
}
