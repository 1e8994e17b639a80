//! The optimiser step on the GPU (`kernels/optim.cu`): AdamW over every trainable tensor in
//! one kernel, after the global gradient norm and the clipping factor are computed on the
//! device. Only the norm (8 bytes) comes back to the host, for the log.

use cudarc::driver::{DevicePtr, LaunchConfig};

use super::Gpu;
use super::ops::A;
use super::tensor::{Dt, GTensor};
use crate::error::{Error, Result};
use crate::train::optim::{AdamWConfig, Coefs};

/// Elements per partial sum of squares (`OPT_CHUNK` in `kernels/optim.cu`).
const CHUNK: usize = 4096;

/// One trainable tensor and its optimiser state, all f32 and of one shape; `p`, `m` and `v`
/// are updated in place.
pub struct DeviceParam<'a> {
    /// The parameter.
    pub p: &'a GTensor,
    /// Its gradient.
    pub g: &'a GTensor,
    /// First moment.
    pub m: &'a GTensor,
    /// Second moment.
    pub v: &'a GTensor,
    /// Whether weight decay applies (transformers exempts biases and norm weights).
    pub decay: bool,
}

impl Gpu {
    /// One AdamW step (optimiser step `step`, from 1, at learning rate `lr`) on `params`,
    /// gradients first divided by `loss_scale` (a power of two; fp16 loss scaling) and clipped
    /// to global norm `max_norm` as `clip_grad_norm_` does (`0`: no clipping). Returns the
    /// global norm of the unscaled gradients before clipping; with a `loss_scale`, a norm that
    /// is not finite leaves every parameter and moment as it was (the caller does not count
    /// the step), as `torch.amp.GradScaler` skips it.
    pub fn adamw_step(
        &self,
        params: &[DeviceParam<'_>],
        config: AdamWConfig,
        lr: f64,
        step: u64,
        max_norm: f64,
        loss_scale: Option<f32>,
    ) -> Result<f64> {
        let mut table = Vec::with_capacity(params.len() * 48);
        for (i, p) in params.iter().enumerate() {
            let n = p.p.len();
            for t in [p.p, p.g, p.m, p.v] {
                if t.dt != Dt::F32 || t.len() != n {
                    return Err(Error::Invalid(format!(
                        "optimiser tensor {i}: parameter, gradient and moments must be f32 of {n} values"
                    )));
                }
            }
            for t in [p.p, p.g, p.m, p.v] {
                table.extend_from_slice(&t.ptr().to_le_bytes());
            }
            table.extend_from_slice(&(n as u64).to_le_bytes());
            table.extend_from_slice(&i32::from(p.decay).to_le_bytes());
            table.extend_from_slice(&0i32.to_le_bytes());
        }
        if params.is_empty() {
            return Ok(0.0);
        }
        let segs = self.upload_u8(&table)?;
        let sp = segs.device_ptr(&self.stream).0;
        let tensors = params.len() as u32;
        let max_chunks = params
            .iter()
            .map(|p| p.p.len().div_ceil(CHUNK))
            .max()
            .unwrap_or(1)
            .max(1);
        // f64 partials: 8 bytes each, as 2 f32 columns.
        let part = self.alloc(params.len() * max_chunks, 2, Dt::F32);
        self.run(
            "opt_sumsq",
            LaunchConfig {
                grid_dim: (max_chunks as u32, tensors, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[A::P(sp), A::P(part.ptr()), A::I(max_chunks as i32)],
        );
        let norm = self.alloc(1, 3, Dt::F32);
        self.run(
            "opt_norm",
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                A::P(part.ptr()),
                A::I((params.len() * max_chunks) as i32),
                A::D(max_norm),
                A::D(loss_scale.map_or(1.0, |s| 1.0 / f64::from(s))),
                A::I(i32::from(loss_scale.is_some())),
                A::P(norm.ptr()),
            ],
        );
        let k = Coefs::at(config, lr, step);
        let longest = params.iter().map(|p| p.p.len()).max().unwrap_or(0);
        self.run(
            "opt_adamw",
            LaunchConfig {
                grid_dim: (longest.div_ceil(256).clamp(1, 4096) as u32, tensors, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                A::P(sp),
                A::P(norm.ptr()),
                A::F(k.b1),
                A::F(k.b2),
                A::F(k.ob1),
                A::F(k.ob2),
                A::F(k.decay.unwrap_or(0.0)),
                A::F(k.sbc2),
                A::F(k.eps),
                A::F(k.step),
            ],
        );
        Ok(self.download(&norm)?[0] as f64)
    }
}
