//! Adapters on the GPU: LoRA factors (and their f32 masters in mixed precision), DoRA
//! magnitudes and their per-output factor, attached from an [`fedtune_aggregation::Adapter`]
//! with every module and shape checked as the host checks them.

use super::model::{CudaModel, GBase, GLora, GProj};
use super::tensor::{Dt, GTensor};
use crate::device::Proj;
use crate::error::{Error, Result};

impl CudaModel {
    /// Attaches LoRA factors (replacing any attached), checking module names and shapes.
    pub fn attach_weights(&mut self, adapter: &fedtune_aggregation::Adapter) -> Result<()> {
        self.detach_adapter();
        let h = self.config.hidden_size;
        if let Some(s) = crate::model::adapter_score(adapter, h)? {
            self.score = Some(self.gpu.upload(&s.data, 1, h, Dt::F32)?);
        }
        for (module, m) in &adapter.modules {
            let (li, pi, out, inp) = self.checked_module(module, m)?;
            let r = m.rank();
            let a = self.gpu.upload(&m.a.data, r, inp, self.dt)?;
            let b = self.gpu.upload(&m.b.data, out, r, self.dt)?;
            let master = if self.dt == Dt::F32 {
                None
            } else {
                Some((
                    self.gpu.upload(&m.a.data, r, inp, Dt::F32)?,
                    self.gpu.upload(&m.b.data, out, r, Dt::F32)?,
                ))
            };
            let magnitude = crate::model::dora_magnitude(adapter, module, out)?
                .map(|v| self.gpu.upload(&v.data, 1, out, Dt::F32))
                .transpose()?;
            self.layers[li].proj[pi].lora = Some(GLora {
                a,
                b,
                scale: m.scale,
                dropout: 0.0,
                master,
                magnitude,
                dora_cache: Default::default(),
            });
        }
        Ok(())
    }

    /// Gives `adapter` (LoRA factors for this model) DoRA magnitudes as PEFT initialises them:
    /// the row norms `‖W + s·B·A‖` of each adapted projection, computed on the device.
    pub fn init_dora(&self, adapter: &mut fedtune_aggregation::Adapter) -> Result<()> {
        for (module, m) in &adapter.modules {
            let (li, pi, out, inp) = self.checked_module(module, m)?;
            let r = m.rank();
            let a = self.gpu.upload(&m.a.data, r, inp, Dt::F32)?;
            let b = self.gpu.upload(&m.b.data, out, r, Dt::F32)?;
            let w = match &self.layers[li].proj[pi].base {
                GBase::Dense(w) => w.clone(),
                GBase::Nf4(q) => self.gpu.nf4_dequant(q, self.dt),
            };
            let (norms, _) = self.gpu.dora_factor(&w, &a, &b, m.scale, None)?;
            let norms = fedtune_aggregation::Matrix::new(1, out, self.gpu.download(&norms)?);
            adapter
                .dense
                .insert(fedtune_peft::magnitude_key(module), norms);
        }
        Ok(())
    }

    /// `(layer, projection index, out, in)` of module `model.layers.{i}.{path}`, whose LoRA
    /// factors `m` are checked to fit it.
    fn checked_module(
        &self,
        module: &str,
        m: &fedtune_aggregation::LoraFactors,
    ) -> Result<(usize, usize, usize, usize)> {
        let index = || {
            let (i, tail) = module.strip_prefix("model.layers.")?.split_once('.')?;
            let li: usize = i.parse().ok()?;
            let pi = Proj::ALL.iter().position(|p| p.path() == tail)?;
            (li < self.layers.len()).then_some((li, pi))
        };
        let Some((li, pi)) = index() else {
            return Err(Error::Invalid(format!(
                "adapter module `{module}` is not a projection of this model"
            )));
        };
        let (out, inp) = self.proj_shape(li, pi);
        crate::model::check_lora_shape(module, m, out, inp)?;
        Ok((li, pi, out, inp))
    }

    /// Attaches a PEFT adapter.
    pub fn attach_adapter(&mut self, adapter: &crate::adapter::PeftAdapter) -> Result<()> {
        self.attach_weights(&adapter.weights)
    }

    /// Removes every LoRA branch.
    pub fn detach_adapter(&mut self) {
        for l in &mut self.layers {
            for p in &mut l.proj {
                p.lora = None;
            }
        }
    }

    /// DoRA's `(c, inv)` `[1, out]` of projection `p` with base weight `w`, when its adapter
    /// has a magnitude (from the current f32 factors; computed once until they change).
    pub(super) fn dora_factor(&self, p: &GProj, w: &GTensor) -> Option<(GTensor, GTensor)> {
        let l = p.lora.as_ref()?;
        let m = l.magnitude.as_ref()?;
        let (a, b) = l.f32_factors();
        let factor = l.dora_cache.get_or_init(|| {
            self.gpu
                .dora_factor(w, a, b, l.scale, Some(m))
                .unwrap_or_else(|e| panic!("GPU: {e}"))
        });
        Some(factor.clone())
    }
}
