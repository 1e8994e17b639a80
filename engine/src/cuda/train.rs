//! The training step's model-level operations on the GPU, built from the kernels of
//! [`super::backward`] and cuBLASLt products: projections that keep their LoRA input `x·Aᵀ`,
//! their backward (LoRA factor gradients and the input gradient of projections sharing one
//! input, every term accumulated into one output), and the LM head's log-probabilities with
//! their gradient direction, in chunks. Each mirrors the host step (`train/proj.rs`,
//! `train/ops.rs`) and is checked against host products in `engine/tests/cuda_device.rs`.

use super::model::{CudaModel, GBase, GProj};
use super::tensor::{Dt, GTensor};
use crate::device::Proj;
use crate::error::Result;

/// What a projection's training forward keeps for backward: `x·Aᵀ` `[n, r]` (LoRA only).
pub struct GSaved {
    /// The LoRA down-projection of the input.
    pub u: Option<GTensor>,
}

/// Gradients of one projection's LoRA factors (model dtype): `lora_A` `[r, in]`, `lora_B`
/// `[out, r]`.
pub struct GLoraGrad {
    /// `∂ℓ/∂A`.
    pub a: GTensor,
    /// `∂ℓ/∂B`.
    pub b: GTensor,
}

impl CudaModel {
    fn dense_weight(&self, p: &GProj) -> GTensor {
        match &p.base {
            GBase::Dense(w) => w.clone(),
            GBase::Nf4(q) => self.gpu.nf4_dequant(q, self.dt),
        }
    }

    /// The projections `which` of `layer` on `x` for training: each output and what its
    /// backward needs (the frozen weight is dequantised per projection when NF4).
    pub fn project_train(
        &self,
        layer: usize,
        which: &[Proj],
        x: &GTensor,
    ) -> Result<Vec<(GTensor, GSaved)>> {
        let g = &self.gpu;
        which
            .iter()
            .map(|&p| {
                let proj = self.proj(layer, p);
                let w = self.dense_weight(proj);
                let (mut y, u) = match &proj.lora {
                    None => (g.matmul_sum(&[(x, false, &w, true, 1.0)], self.dt)?, None),
                    Some(l) => {
                        let u = g.matmul_sum(&[(x, false, &l.a, true, 1.0)], self.dt)?;
                        let y = g.matmul_sum(
                            &[(x, false, &w, true, 1.0), (&u, false, &l.b, true, l.scale)],
                            self.dt,
                        )?;
                        (y, Some(u))
                    }
                };
                if let Some(b) = &proj.bias {
                    g.add_bias(&mut y, b);
                }
                Ok((y, GSaved { u }))
            })
            .collect()
    }

    /// Backward of the projections `which` of `layer`, which all read `x`, for upstream
    /// gradients `dys`: the LoRA factors' gradients (when `train_lora`) and, when `want_dx`,
    /// the input gradient `Σᵢ dyᵢ·Wᵢ + sᵢ·(dyᵢ·Bᵢ)·Aᵢ` accumulated in one output.
    #[allow(clippy::too_many_arguments)]
    pub fn project_backward(
        &self,
        layer: usize,
        which: &[Proj],
        x: &GTensor,
        saved: &[GSaved],
        dys: &[GTensor],
        train_lora: bool,
        want_dx: bool,
    ) -> Result<(Vec<Option<GLoraGrad>>, Option<GTensor>)> {
        assert!(
            which.len() == saved.len() && which.len() == dys.len(),
            "project_backward: one saved state and gradient per projection"
        );
        let g = &self.gpu;
        let mut grads = Vec::with_capacity(which.len());
        let mut dybs = Vec::with_capacity(which.len());
        for ((&p, s), dy) in which.iter().zip(saved).zip(dys) {
            let proj = self.proj(layer, p);
            match (&proj.lora, &s.u) {
                (Some(l), Some(u)) => {
                    // dy·B [n, r], shared by the A gradient and the input gradient.
                    let dyb = g.matmul_sum(&[(dy, false, &l.b, false, 1.0)], self.dt)?;
                    let grad = if train_lora {
                        Some(GLoraGrad {
                            a: g.matmul_sum(&[(&dyb, true, x, false, l.scale)], self.dt)?,
                            b: g.matmul_sum(&[(dy, true, u, false, l.scale)], self.dt)?,
                        })
                    } else {
                        None
                    };
                    grads.push(grad);
                    dybs.push(Some(dyb));
                }
                _ => {
                    grads.push(None);
                    dybs.push(None);
                }
            }
        }
        if !want_dx {
            return Ok((grads, None));
        }
        let weights: Vec<GTensor> = which
            .iter()
            .map(|&p| self.dense_weight(self.proj(layer, p)))
            .collect();
        let mut terms: Vec<(&GTensor, bool, &GTensor, bool, f32)> = dys
            .iter()
            .zip(&weights)
            .map(|(dy, w)| (dy, false, w, false, 1.0))
            .collect();
        for (&p, dyb) in which.iter().zip(&dybs) {
            if let (Some(dyb), Some(l)) = (dyb, &self.proj(layer, p).lora) {
                terms.push((dyb, false, &l.a, false, l.scale));
            }
        }
        let dx = g.matmul_sum(&terms, self.dt)?;
        Ok((grads, Some(dx)))
    }

    /// `log p(ids[i])` at row `rows[i]` of `hidden` and `∂ log p / ∂h` per target
    /// `[rows.len(), hidden]` (model dtype): logits in f32 chunks, the softmax gradient formed
    /// in place, then multiplied by the head weight.
    pub fn head_logprobs_with_grad(
        &self,
        hidden: &GTensor,
        rows: &[usize],
        ids: &[u32],
    ) -> Result<(Vec<f32>, GTensor)> {
        let g = &self.gpu;
        assert_eq!(rows.len(), ids.len(), "one target per row");
        let n = rows.len();
        let dirs = g.alloc(n, hidden.cols, self.dt);
        let mut logps = Vec::with_capacity(n);
        let head = self.head();
        let chunk = self.head_chunk();
        for start in (0..n).step_by(chunk.max(1)) {
            let end = (start + chunk).min(n);
            let r32: Vec<u32> = rows[start..end].iter().map(|&r| r as u32).collect();
            let h = g.gather_rows(hidden, &r32)?;
            let logits = g.matmul_sum(&[(&h, false, head, true, 1.0)], Dt::F32)?;
            let lp = g.logprob_grad(&logits, &ids[start..end])?;
            logps.extend(g.download(&lp)?);
            let dlogits = g.cast(&logits, self.dt);
            drop(logits);
            let part = g.matmul_sum(&[(&dlogits, false, head, false, 1.0)], self.dt)?;
            g.copy_rows(&part, 0, end - start, &dirs, start);
        }
        Ok((logps, dirs))
    }
}
