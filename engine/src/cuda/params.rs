//! [`TrainModel`] on the GPU: parameters addressed by their Hugging Face / PEFT names, the
//! optimiser step as one multi-tensor AdamW launch (clipping included, see [`super::optim`]),
//! and host copies of parameters and moments for checkpoints, which therefore resume on
//! either device.
//!
//! Parameters are updated in place, copy-on-write: a tensor still shared with a clone of the
//! model (the frozen reference of DPO, the adapter-free view) is copied before its first
//! update, so clones keep the values they were made with, as on the host.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};

use super::model::{CudaModel, GBase};
use super::optim::DeviceParam;
use super::tensor::{Dt, GTensor};
use crate::device::{Grads, Proj};
use crate::error::{Error, Result};
use crate::train::optim::{AdamWConfig, Moments};
use crate::train::params::{TrainModel, decays, names_for};
use crate::train::step::Trainable;

/// AdamW's state on the GPU: f32 moments by parameter name.
pub struct GpuAdamW {
    config: AdamWConfig,
    step: u64,
    moments: BTreeMap<String, (GTensor, GTensor)>,
}

/// Which tensor a parameter name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Embed,
    Head,
    FinalNorm,
    Norm1(usize),
    Norm2(usize),
    LoraA(usize, Proj),
    LoraB(usize, Proj),
    Magnitude(usize, Proj),
    Weight(usize, Proj),
    Bias(usize, Proj),
    Score,
}

impl Param {
    fn parse(name: &str) -> Option<Param> {
        match name {
            "model.embed_tokens.weight" => return Some(Param::Embed),
            "lm_head.weight" => return Some(Param::Head),
            "model.norm.weight" => return Some(Param::FinalNorm),
            "score.weight" => return Some(Param::Score),
            _ => {}
        }
        let (i, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
        if i.starts_with('0') && i.len() > 1 {
            return None;
        }
        let i: usize = i.parse().ok()?;
        match tail {
            "input_layernorm.weight" => return Some(Param::Norm1(i)),
            "post_attention_layernorm.weight" => return Some(Param::Norm2(i)),
            _ => {}
        }
        let (module, part) = tail.rsplit_once('.')?;
        let p = Proj::ALL.into_iter().find(|p| p.path() == module)?;
        match part {
            "lora_A" => Some(Param::LoraA(i, p)),
            "lora_B" => Some(Param::LoraB(i, p)),
            "lora_magnitude_vector" => Some(Param::Magnitude(i, p)),
            "weight" => Some(Param::Weight(i, p)),
            "bias" => Some(Param::Bias(i, p)),
            _ => None,
        }
    }
}

impl CudaModel {
    /// Sets the LoRA dropout probability of every attached adapter module (training only).
    pub fn set_lora_dropout(&mut self, p: f64) {
        for l in &mut self.layers {
            for proj in &mut l.proj {
                if let Some(lora) = &mut proj.lora {
                    lora.dropout = p as f32;
                }
            }
        }
    }

    /// A fresh score head `[1, hidden]` (a reward model's), drawn from `seed` as
    /// [`crate::train::reward::score_head`] draws it (the host's, value for value).
    pub fn init_score(&mut self, seed: u64) -> Result<()> {
        let h = crate::train::reward::score_head(self.config.hidden_size, seed);
        self.score = Some(self.gpu.upload(&h.data, 1, h.cols, Dt::F32)?);
        Ok(())
    }

    /// Whether the model has a reward model's score head.
    pub fn has_score(&self) -> bool {
        self.score.is_some()
    }

    /// The attached LoRA factors, downloaded (f32), under their module names, with DoRA
    /// magnitudes and a reward model's score head where the model has them.
    pub fn lora_weights(&self) -> Result<fedtune_aggregation::Adapter> {
        let mut out = fedtune_aggregation::Adapter::default();
        if let Some(s) = &self.score {
            out.dense.insert(
                crate::adapter::SCORE_KEY.into(),
                fedtune_aggregation::Matrix::new(1, s.cols, self.gpu.download(s)?),
            );
        }
        for (li, layer) in self.layers.iter().enumerate() {
            for (p, proj) in Proj::ALL.iter().zip(&layer.proj) {
                let Some(l) = &proj.lora else { continue };
                // The f32 masters when training in mixed precision: full precision.
                let (a, b) = l.master.as_ref().map_or((&l.a, &l.b), |(a, b)| (a, b));
                let m = |t: &GTensor| -> Result<fedtune_aggregation::Matrix> {
                    Ok(fedtune_aggregation::Matrix::new(
                        t.rows,
                        t.cols,
                        self.gpu.download(t)?,
                    ))
                };
                let module = format!("model.layers.{li}.{}", p.path());
                if let Some(mag) = &l.magnitude {
                    out.dense
                        .insert(fedtune_peft::magnitude_key(&module), m(mag)?);
                }
                out.modules.insert(
                    module,
                    fedtune_aggregation::LoraFactors {
                        a: m(a)?,
                        b: m(b)?,
                        scale: l.scale,
                    },
                );
            }
        }
        Ok(out)
    }

    /// The device tensor of parameter `name` (`None`: no such parameter, or an NF4 weight).
    pub fn param(&self, name: &str) -> Option<&GTensor> {
        let proj = |i: usize, p: Proj| self.layers.get(i).map(|l| &l.proj[p.index()]);
        match Param::parse(name)? {
            Param::Embed => Some(&self.embed),
            Param::Head => self.head.as_ref(),
            Param::FinalNorm => Some(&self.norm),
            Param::Norm1(i) => self.layers.get(i).map(|l| &l.ln1),
            Param::Norm2(i) => self.layers.get(i).map(|l| &l.ln2),
            Param::LoraA(i, p) => proj(i, p)?
                .lora
                .as_ref()
                .map(|l| l.master.as_ref().map_or(&l.a, |m| &m.0)),
            Param::LoraB(i, p) => proj(i, p)?
                .lora
                .as_ref()
                .map(|l| l.master.as_ref().map_or(&l.b, |m| &m.1)),
            Param::Magnitude(i, p) => proj(i, p)?.lora.as_ref()?.magnitude.as_ref(),
            Param::Weight(i, p) => match &proj(i, p)?.base {
                GBase::Dense(w) => Some(w),
                GBase::Nf4(_) => None,
            },
            Param::Bias(i, p) => proj(i, p)?.bias.as_ref(),
            Param::Score => self.score.as_ref(),
        }
    }

    fn param_mut(&mut self, name: &str) -> Option<&mut GTensor> {
        let param = Param::parse(name)?;
        let layers = &mut self.layers;
        match param {
            Param::Embed => Some(&mut self.embed),
            Param::Head => self.head.as_mut(),
            Param::FinalNorm => Some(&mut self.norm),
            Param::Score => self.score.as_mut(),
            Param::Norm1(i) => layers.get_mut(i).map(|l| &mut l.ln1),
            Param::Norm2(i) => layers.get_mut(i).map(|l| &mut l.ln2),
            Param::LoraA(i, p)
            | Param::LoraB(i, p)
            | Param::Magnitude(i, p)
            | Param::Weight(i, p)
            | Param::Bias(i, p) => {
                let proj = &mut layers.get_mut(i)?.proj[p.index()];
                match param {
                    Param::LoraA(..) => proj
                        .lora
                        .as_mut()
                        .map(|l| l.master.as_mut().map_or(&mut l.a, |m| &mut m.0)),
                    Param::LoraB(..) => proj
                        .lora
                        .as_mut()
                        .map(|l| l.master.as_mut().map_or(&mut l.b, |m| &mut m.1)),
                    Param::Magnitude(..) => proj.lora.as_mut()?.magnitude.as_mut(),
                    Param::Bias(..) => proj.bias.as_mut(),
                    _ => match &mut proj.base {
                        GBase::Dense(w) => Some(w),
                        GBase::Nf4(_) => None,
                    },
                }
            }
        }
    }

    /// After LoRA factors or DoRA magnitudes changed: the masters' compute-dtype copies cast
    /// again, and DoRA's cached factor dropped.
    fn refresh_compute_copies(&mut self, names: &[&String]) {
        let gpu = self.gpu.clone();
        let dt = self.dt;
        for name in names {
            let (i, p, is_a) = match Param::parse(name) {
                Some(Param::LoraA(i, p)) => (i, p, Some(true)),
                Some(Param::LoraB(i, p)) => (i, p, Some(false)),
                Some(Param::Magnitude(i, p)) => (i, p, None),
                _ => continue,
            };
            let Some(l) = self
                .layers
                .get_mut(i)
                .and_then(|l| l.proj[p.index()].lora.as_mut())
            else {
                continue;
            };
            l.dora_cache = Default::default();
            match (&l.master, is_a) {
                (Some((ma, _)), Some(true)) => l.a = gpu.cast(ma, dt),
                (Some((_, mb)), Some(false)) => l.b = gpu.cast(mb, dt),
                _ => {}
            }
        }
    }

    fn to_host(&self, t: &GTensor) -> Result<Tensor<2>> {
        let v = self.gpu.download(t)?;
        Ok(Tensor::from_data(
            TensorData::new(v, [t.rows, t.cols]),
            &Device::flex(),
        ))
    }

    fn upload_param(&self, t: &Tensor<2>, dt: Dt) -> Result<GTensor> {
        let [r, c] = t.dims();
        self.gpu
            .upload(&crate::weights::to_f32_vec(t.to_data()), r, c, dt)
    }

    fn no_param(name: &str) -> Error {
        Error::Invalid(format!(
            "{name}: the GPU model has no such trainable tensor (NF4 weights are frozen)"
        ))
    }
}

impl TrainModel for CudaModel {
    type Optimizer = GpuAdamW;

    fn trainable_names(&self, trainable: &Trainable) -> Vec<String> {
        let layers = &self.layers;
        names_for(
            trainable,
            layers.len(),
            &|i, p| layers[i].proj[p.index()].lora.is_some(),
            &|i, p| {
                layers[i].proj[p.index()]
                    .lora
                    .as_ref()
                    .is_some_and(|l| l.magnitude.is_some())
            },
            &|i, p| layers[i].proj[p.index()].bias.is_some(),
            self.head.is_some(),
            self.score.is_some(),
        )
    }

    fn has_adapter(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.proj.iter().any(|p| p.lora.is_some()))
    }

    fn lora_dropout(&self) -> f64 {
        self.layers
            .iter()
            .flat_map(|l| l.proj.iter().filter_map(|p| p.lora.as_ref()))
            .map(|l| f64::from(l.dropout))
            .fold(0.0, f64::max)
    }

    fn new_optimizer(&self, config: AdamWConfig) -> GpuAdamW {
        GpuAdamW {
            config,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    fn optimizer_step(
        &mut self,
        opt: &mut GpuAdamW,
        names: &[String],
        grads: Grads<GTensor>,
        lr: f64,
        max_norm: f64,
        loss_scale: Option<f32>,
    ) -> Result<f64> {
        let gpu = self.gpu.clone();
        let updated: Vec<&String> = names.iter().filter(|n| grads.contains_key(*n)).collect();
        for name in &updated {
            let p = self.param_mut(name).ok_or_else(|| Self::no_param(name))?;
            if !p.unique() {
                *p = gpu.copy(p);
            }
            let (rows, cols) = (p.rows, p.cols);
            opt.moments.entry(name.to_string()).or_insert_with(|| {
                (
                    gpu.zeros(rows, cols, Dt::F32),
                    gpu.zeros(rows, cols, Dt::F32),
                )
            });
        }
        opt.step += 1;
        let mut params = Vec::with_capacity(updated.len());
        for name in &updated {
            let (m, v) = &opt.moments[name.as_str()];
            params.push(DeviceParam {
                p: self.param(name).ok_or_else(|| Self::no_param(name))?,
                g: &grads[name.as_str()],
                m,
                v,
                decay: decays(name),
            });
        }
        let norm = gpu.adamw_step(&params, opt.config, lr, opt.step, max_norm, loss_scale)?;
        if loss_scale.is_some() && !norm.is_finite() {
            // Skipped on the device: nothing changed, and the step does not count.
            opt.step -= 1;
            return Ok(norm);
        }
        self.refresh_compute_copies(&updated);
        Ok(norm)
    }

    fn param_shape(&self, name: &str) -> Option<[usize; 2]> {
        self.param(name).map(|t| [t.rows, t.cols])
    }

    fn host_params(&self, names: &[String]) -> Result<Vec<(String, Tensor<2>)>> {
        names
            .iter()
            .filter_map(|n| self.param(n).map(|t| (n, t)))
            .map(|(n, t)| Ok((n.clone(), self.to_host(t)?)))
            .collect()
    }

    fn set_params(&mut self, params: Vec<(String, Tensor<2>)>) -> Result<()> {
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        for (name, t) in params {
            let dt = self.param(&name).ok_or_else(|| Self::no_param(&name))?.dt;
            let new = self.upload_param(&t, dt)?;
            *self.param_mut(&name).ok_or_else(|| Self::no_param(&name))? = new;
        }
        self.refresh_compute_copies(&names.iter().collect::<Vec<_>>());
        Ok(())
    }

    fn host_optimizer(&self, opt: &GpuAdamW) -> Result<(u64, BTreeMap<String, Moments>)> {
        let mut out = BTreeMap::new();
        for (name, (m, v)) in &opt.moments {
            out.insert(
                name.clone(),
                Moments {
                    m: self.to_host(m)?,
                    v: self.to_host(v)?,
                },
            );
        }
        Ok((opt.step, out))
    }

    fn set_optimizer(
        &self,
        opt: &mut GpuAdamW,
        step: u64,
        moments: BTreeMap<String, Moments>,
    ) -> Result<()> {
        opt.step = step;
        opt.moments.clear();
        for (name, m) in moments {
            let pair = (
                self.upload_param(&m.m, Dt::F32)?,
                self.upload_param(&m.v, Dt::F32)?,
            );
            opt.moments.insert(name, pair);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Param, Proj};

    #[test]
    fn parameter_names_parse_as_peft_and_transformers_write_them() {
        assert_eq!(
            Param::parse("model.embed_tokens.weight"),
            Some(Param::Embed)
        );
        assert_eq!(Param::parse("lm_head.weight"), Some(Param::Head));
        assert_eq!(Param::parse("model.norm.weight"), Some(Param::FinalNorm));
        assert_eq!(
            Param::parse("model.layers.12.post_attention_layernorm.weight"),
            Some(Param::Norm2(12))
        );
        assert_eq!(
            Param::parse("model.layers.3.self_attn.v_proj.lora_B"),
            Some(Param::LoraB(3, Proj::V))
        );
        assert_eq!(
            Param::parse("model.layers.0.mlp.down_proj.bias"),
            Some(Param::Bias(0, Proj::Down))
        );
        for bad in [
            "model.layers.00.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q.weight",
            "model.layers.1.mlp.up_proj.lora_C",
            "layers.0.mlp.up_proj.weight",
            "model.layers.x.mlp.up_proj.weight",
        ] {
            assert_eq!(Param::parse(bad), None, "{bad}");
        }
    }
}
