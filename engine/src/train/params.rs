//! The parameters a run trains, on whichever device holds them: [`TrainModel`] adds to the
//! training step's operations ([`TrainBackend`]) what the loop needs — the trainable names, the
//! optimiser step (clipping included) over the device's tensors, and host copies of parameters
//! and optimiser state for checkpoints (a checkpoint written on one device resumes on the
//! other). [`LlamaModel`] implements it on the host; [`crate::cuda::CudaModel`] on a GPU.

use std::collections::BTreeMap;

use burn::tensor::Tensor;

use super::optim::{AdamW, AdamWConfig, Moments, clip_grad_norm};
use super::step::Trainable;
use crate::device::{Grads, Proj, TrainBackend};
use crate::error::{Error, Result};
use crate::model::LlamaModel;

/// A model the training loop can train in place.
pub trait TrainModel: TrainBackend + Clone {
    /// The optimiser's state on this device.
    type Optimizer;

    /// Parameter names trained under `trainable`, sorted.
    fn trainable_names(&self, trainable: &Trainable) -> Vec<String>;
    /// Whether a LoRA adapter is attached.
    fn has_adapter(&self) -> bool;
    /// The attached adapter's LoRA dropout (0 without one).
    fn lora_dropout(&self) -> f64;
    /// A fresh AdamW.
    fn new_optimizer(&self, config: AdamWConfig) -> Self::Optimizer;
    /// One optimiser step: the gradients divided by `loss_scale` (fp16 loss scaling: a power
    /// of two, so exactly) and clipped to global norm `max_norm` (0: no clipping), then AdamW
    /// at `lr` on every parameter of `names` that has a gradient. Returns the global norm of
    /// the unscaled gradients before clipping. With a `loss_scale`, a norm that is not finite
    /// skips the step: parameters, moments and the optimiser's step count stay as they were
    /// (`torch.amp.GradScaler`).
    fn optimizer_step(
        &mut self,
        opt: &mut Self::Optimizer,
        names: &[String],
        grads: Grads<Self::T>,
        lr: f64,
        max_norm: f64,
        loss_scale: Option<f32>,
    ) -> Result<f64>;
    /// The shape of parameter `name`, if the model has it.
    fn param_shape(&self, name: &str) -> Option<[usize; 2]>;
    /// Host (f32) copies of the parameters `names`.
    fn host_params(&self, names: &[String]) -> Result<Vec<(String, Tensor<2>)>>;
    /// Replaces parameters by host values of the same shapes.
    fn set_params(&mut self, params: Vec<(String, Tensor<2>)>) -> Result<()>;
    /// The optimiser's step count and moments as host tensors.
    fn host_optimizer(&self, opt: &Self::Optimizer) -> Result<(u64, BTreeMap<String, Moments>)>;
    /// Replaces the optimiser's step count and moments.
    fn set_optimizer(
        &self,
        opt: &mut Self::Optimizer,
        step: u64,
        moments: BTreeMap<String, Moments>,
    ) -> Result<()>;
}

/// The parameter names `trainable` covers in a model of `num_layers` blocks whose projection
/// `(layer, p)` has a LoRA branch (`lora`), a DoRA magnitude (`dora`) and a bias (`bias`), and whose head is its own
/// tensor (`untied_head`) or the embedding; with a reward model's `score` head, that head is
/// always trained (PEFT's `modules_to_save`); sorted.
pub(crate) fn names_for(
    trainable: &Trainable,
    num_layers: usize,
    lora: &dyn Fn(usize, Proj) -> bool,
    dora: &dyn Fn(usize, Proj) -> bool,
    bias: &dyn Fn(usize, Proj) -> bool,
    untied_head: bool,
    score: bool,
) -> Vec<String> {
    let mut names = Vec::new();
    let module = |i: usize, p: Proj| format!("model.layers.{i}.{}", p.path());
    for i in 0..num_layers {
        for p in Proj::ALL {
            if trainable.lora && lora(i, p) {
                names.push(format!("{}.lora_A", module(i, p)));
                names.push(format!("{}.lora_B", module(i, p)));
                if dora(i, p) {
                    names.push(format!("{}.lora_magnitude_vector", module(i, p)));
                }
            }
            if trainable.first_full_layer.is_some_and(|f| i >= f) {
                names.push(format!("{}.weight", module(i, p)));
                if bias(i, p) {
                    names.push(format!("{}.bias", module(i, p)));
                }
            }
        }
        if trainable.first_full_layer.is_some_and(|f| i >= f) {
            names.push(format!("model.layers.{i}.input_layernorm.weight"));
            names.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
        }
    }
    if trainable.final_norm {
        names.push("model.norm.weight".into());
    }
    if trainable.head {
        names.push(if untied_head {
            "lm_head.weight".into()
        } else {
            "model.embed_tokens.weight".into()
        });
    }
    if trainable.embedding && untied_head {
        names.push("model.embed_tokens.weight".into());
    }
    if score {
        names.push("score.weight".into());
    }
    names.sort();
    names.dedup();
    names
}

/// transformers' weight-decay rule: no decay on biases and norm weights.
pub(crate) fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm.weight"))
}

impl TrainModel for LlamaModel {
    type Optimizer = AdamW;

    fn trainable_names(&self, trainable: &Trainable) -> Vec<String> {
        let layers = &self.layers;
        names_for(
            trainable,
            layers.len(),
            &|i, p| layers[i].proj(p).lora.is_some(),
            &|i, p| {
                layers[i]
                    .proj(p)
                    .lora
                    .as_ref()
                    .is_some_and(|l| l.magnitude.is_some())
            },
            &|i, p| layers[i].proj(p).bias.is_some(),
            self.lm_head.is_some(),
            self.score.is_some(),
        )
    }

    fn has_adapter(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.lora.is_some())
    }

    fn lora_dropout(&self) -> f64 {
        self.linears()
            .iter()
            .filter_map(|(_, l)| l.lora.as_ref().map(|l| l.dropout))
            .fold(0.0, f64::max)
    }

    fn new_optimizer(&self, config: AdamWConfig) -> AdamW {
        AdamW::new(config)
    }

    fn optimizer_step(
        &mut self,
        opt: &mut AdamW,
        names: &[String],
        mut grads: Grads,
        lr: f64,
        max_norm: f64,
        loss_scale: Option<f32>,
    ) -> Result<f64> {
        if let Some(s) = loss_scale {
            let inv = 1.0 / s;
            grads = std::mem::take(&mut grads)
                .into_iter()
                .map(|(k, g)| (k, g * inv))
                .collect();
        }
        let norm = clip_grad_norm(&mut grads, max_norm);
        if loss_scale.is_some() && !norm.is_finite() {
            return Ok(norm);
        }
        opt.begin_step();
        for name in names {
            let (Some(p), Some(g)) = (self.param(name), grads.remove(name)) else {
                continue;
            };
            let updated = opt.update(name, p, g, lr, decays(name));
            self.set_param(name, updated);
        }
        Ok(norm)
    }

    fn param_shape(&self, name: &str) -> Option<[usize; 2]> {
        self.param(name).map(|t| t.dims())
    }

    fn host_params(&self, names: &[String]) -> Result<Vec<(String, Tensor<2>)>> {
        Ok(names
            .iter()
            .filter_map(|n| self.param(n).map(|t| (n.clone(), t)))
            .collect())
    }

    fn set_params(&mut self, params: Vec<(String, Tensor<2>)>) -> Result<()> {
        for (name, t) in params {
            let t = t.to_device(&self.device);
            if !self.set_param(&name, t) {
                return Err(Error::Invalid(format!("the model has no parameter {name}")));
            }
        }
        Ok(())
    }

    fn host_optimizer(&self, opt: &AdamW) -> Result<(u64, BTreeMap<String, Moments>)> {
        Ok((opt.step, opt.state.clone()))
    }

    fn set_optimizer(
        &self,
        opt: &mut AdamW,
        step: u64,
        moments: BTreeMap<String, Moments>,
    ) -> Result<()> {
        opt.step = step;
        opt.state = moments;
        opt.to_device(&self.device);
        Ok(())
    }
}
