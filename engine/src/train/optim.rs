//! AdamW, learning-rate schedules and gradient clipping with the semantics of
//! `torch.optim.AdamW` and transformers' `get_scheduler` / `clip_grad_norm_`, which HF
//! Trainer and TRL use.
//!
//! AdamW step `t` with gradient `g`:
//! `p ← p − lr·wd·p`; `m ← β₁m + (1−β₁)g`; `v ← β₂v + (1−β₂)g²`;
//! `p ← p − (lr/(1−β₁ᵗ))·m / (√v/√(1−β₂ᵗ) + ε)`.

use std::collections::BTreeMap;
use std::mem::MaybeUninit;

use burn::tensor::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::{self, Uninit};

/// AdamW hyper-parameters (transformers' defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment.
    pub m: Tensor<2>,
    /// Second moment.
    pub v: Tensor<2>,
}

/// AdamW with its state.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Moments by parameter name.
    pub state: BTreeMap<String, Moments>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// A fresh optimiser.
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            state: BTreeMap::new(),
            step: 0,
        }
    }

    /// Advances the step counter (once per optimiser step, before [`AdamW::update`] calls).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Returns the updated parameter. `decay` says whether weight decay applies (transformers
    /// exempts biases and norm weights).
    pub fn update(
        &mut self,
        name: &str,
        p: Tensor<2>,
        g: Tensor<2>,
        lr: f64,
        decay: bool,
    ) -> Tensor<2> {
        let c = self.config;
        let mom = self
            .state
            .entry(name.to_string())
            .or_insert_with(|| Moments {
                m: g.zeros_like(),
                v: g.zeros_like(),
            });
        let (bc1, bc2) = bias_corrections(c, self.step);
        let wd = if decay { c.weight_decay } else { 0.0 };
        if let Some(p) = adamw_host(mom, &p, &g, Coefs::new(c, lr, wd, bc1, bc2)) {
            return p;
        }
        let m = mom.m.clone() * c.beta1 + g.clone() * (1.0 - c.beta1);
        let v = mom.v.clone() * c.beta2 + g.square() * (1.0 - c.beta2);
        mom.m = m.clone();
        mom.v = v.clone();
        let p = if wd > 0.0 {
            p.clone() - p * (lr * wd)
        } else {
            p
        };
        let denom = v.sqrt() / bc2.sqrt() + c.eps;
        p - m / denom * (lr / bc1)
    }

    /// Moves the moments to `device` (after restoring a checkpoint).
    pub fn to_device(&mut self, device: &Device) {
        for mom in self.state.values_mut() {
            mom.m = mom.m.clone().to_device(device);
            mom.v = mom.v.clone().to_device(device);
        }
    }
}

/// [`AdamW::update`] in one pass over host memory (the same f32 operations in the same order
/// as the tensor version, without its dozen temporaries); `None` off the flex backend.
fn adamw_host(mom: &mut Moments, p: &Tensor<2>, g: &Tensor<2>, k: Coefs) -> Option<Tensor<2>> {
    let (ph, gh) = (kernels::host(p)?, kernels::host(g)?);
    let (mh, vh) = (kernels::host(&mom.m)?, kernels::host(&mom.v)?);
    let (pd, gd, md, vd) = (ph.data(), gh.data(), mh.data(), vh.data());
    let n = pd.len();
    if [gd.len(), md.len(), vd.len()] != [n; 3] {
        return None;
    }
    const CHUNK: usize = 4096;
    let (mut m2, mut v2, mut p2) = (Uninit::new(n), Uninit::new(n), Uninit::new(n));
    m2.spare()
        .par_chunks_mut(CHUNK)
        .zip(v2.spare().par_chunks_mut(CHUNK))
        .zip(p2.spare().par_chunks_mut(CHUNK))
        .zip(pd.par_chunks(CHUNK).zip(gd.par_chunks(CHUNK)))
        .zip(md.par_chunks(CHUNK).zip(vd.par_chunks(CHUNK)))
        .for_each(|((((mo, vo), po), (p, g)), (m, v))| adamw_chunk(p, g, m, v, k, mo, vo, po));
    let (shape, dev) = (p.dims(), p.device());
    // SAFETY: the chunks cover all three vectors and `adamw_chunk` writes every element.
    let (m2, v2, p2) = unsafe { (m2.assume_init(), v2.assume_init(), p2.assume_init()) };
    mom.m = kernels::tensor(m2, shape, &dev);
    mom.v = kernels::tensor(v2, shape, &dev);
    Some(kernels::tensor(p2, shape, &dev))
}

/// `(1 − β₁ᵗ, 1 − β₂ᵗ)` at optimiser step `t` (counted from 1).
fn bias_corrections(c: AdamWConfig, step: u64) -> (f64, f64) {
    let t = step.max(1) as i32;
    (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t))
}

/// The f32 constants of one AdamW step (the host kernel's and the GPU's).
#[derive(Clone, Copy)]
pub(crate) struct Coefs {
    pub(crate) b1: f32,
    pub(crate) b2: f32,
    pub(crate) ob1: f32,
    pub(crate) ob2: f32,
    /// `lr·wd`, when weight decay applies.
    pub(crate) decay: Option<f32>,
    pub(crate) sbc2: f32,
    pub(crate) eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub(crate) step: f32,
}

impl Coefs {
    /// For optimiser step `step` (from 1) at learning rate `lr`, with the configured weight
    /// decay (applied to the tensors that take it).
    pub(crate) fn at(c: AdamWConfig, lr: f64, step: u64) -> Self {
        let (bc1, bc2) = bias_corrections(c, step);
        Coefs::new(c, lr, c.weight_decay, bc1, bc2)
    }

    /// For learning rate `lr`, weight decay `wd` and bias corrections `bc1`, `bc2`.
    fn new(c: AdamWConfig, lr: f64, wd: f64, bc1: f64, bc2: f64) -> Self {
        Coefs {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            ob1: (1.0 - c.beta1) as f32,
            ob2: (1.0 - c.beta2) as f32,
            decay: (wd > 0.0).then_some((lr * wd) as f32),
            sbc2: bc2.sqrt() as f32,
            eps: c.eps as f32,
            step: (lr / bc1) as f32,
        }
    }
}

crate::kernels::simd! {
    fn adamw_chunk(p: &[f32], g: &[f32], m: &[f32], v: &[f32], k: Coefs, mo: &mut [MaybeUninit<f32>], vo: &mut [MaybeUninit<f32>], po: &mut [MaybeUninit<f32>]) {
        let n = p.len();
        assert!([g.len(), m.len(), v.len(), mo.len(), vo.len(), po.len()] == [n; 6], "adamw: lengths differ");
        let (p, g, m, v) = (&p[..n], &g[..n], &m[..n], &v[..n]);
        let (mo, vo, po) = (&mut mo[..n], &mut vo[..n], &mut po[..n]);
        for i in 0..n {
            let gi = g[i];
            let mi = m[i] * k.b1 + gi * k.ob1;
            let vi = v[i] * k.b2 + gi * gi * k.ob2;
            let pi = match k.decay {
                Some(d) => p[i] - p[i] * d,
                None => p[i],
            };
            mo[i].write(mi);
            vo[i].write(vi);
            po[i].write(pi - mi / (vi.sqrt() / k.sbc2 + k.eps) * k.step);
        }
    }
}

/// Learning-rate schedules (transformers' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warm-up, then linear decay to 0.
    Linear,
    /// Linear warm-up, then half a cosine to 0.
    Cosine,
    /// Linear warm-up, then constant.
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" | "constant_with_warmup" => Ok(Schedule::Constant),
            other => Err(format!(
                "unknown lr scheduler `{other}` (linear, cosine, constant)"
            )),
        }
    }
}

impl Schedule {
    /// The learning rate before optimiser step `step` (0-based) of `total`, with `warmup`
    /// warm-up steps and peak `lr` (`LambdaLR` semantics: the factor at the current step count).
    pub fn lr(self, lr: f64, step: u64, total: u64, warmup: u64) -> f64 {
        let s = step as f64;
        if step < warmup {
            return lr * s / warmup.max(1) as f64;
        }
        let progress = (s - warmup as f64) / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Linear => {
                lr * ((total as f64 - s) / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
            }
            Schedule::Cosine => lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
            Schedule::Constant => lr,
        }
    }
}

/// Warm-up steps for a ratio, as transformers computes them (`ceil(ratio·total)`).
pub fn warmup_steps(ratio: f64, total: u64) -> u64 {
    (ratio * total as f64).ceil() as u64
}

/// Global L2 norm of gradients (f64 accumulation).
pub fn global_norm(grads: &BTreeMap<String, Tensor<2>>) -> f64 {
    grads
        .values()
        .map(|g| match kernels::host(g) {
            Some(h) => h
                .data()
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>(),
            None => {
                let s: f32 = g.clone().square().sum().into_scalar();
                s as f64
            }
        })
        .sum::<f64>()
        .sqrt()
}

/// `torch.nn.utils.clip_grad_norm_`: scales by `max/(norm+1e-6)` when the norm exceeds `max`.
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor<2>>, max: f64) -> f64 {
    let norm = global_norm(grads);
    let coef = max / (norm + 1e-6);
    if max > 0.0 && coef < 1.0 {
        // Owned tensors, so that the backend may scale them in place.
        *grads = std::mem::take(grads)
            .into_iter()
            .map(|(k, g)| (k, g * coef))
            .collect();
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        // get_linear_schedule_with_warmup(10 warm-up, 100 total) at steps 0, 5, 10, 55, 100.
        let lr = |s| Schedule::Linear.lr(1.0, s, 100, 10);
        assert_eq!((lr(0), lr(5), lr(10)), (0.0, 0.5, 1.0));
        assert!((lr(55) - 0.5).abs() < 1e-12);
        assert_eq!(lr(100), 0.0);
        let c = |s| Schedule::Cosine.lr(1.0, s, 110, 10);
        assert!((c(60) - 0.5).abs() < 1e-12 && c(110).abs() < 1e-12);
        assert_eq!(warmup_steps(0.03, 100), 3);
    }

    #[test]
    fn adamw_first_step_matches_torch() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p=1, g=0.5, one step:
        // p ← 1 − 0.1·0.01·1 = 0.999; m̂ = 0.5, v̂ = 0.25 → p ← 0.999 − 0.1·0.5/(0.5+1e-8).
        let dev = Device::flex();
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        });
        opt.begin_step();
        let p = Tensor::<2>::from_floats([[1.0]], &dev);
        let g = Tensor::<2>::from_floats([[0.5]], &dev);
        let out: f32 = opt.update("p", p, g, 0.1, true).into_scalar();
        let want = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8);
        assert!((out as f64 - want).abs() < 1e-6, "{out}");
    }

    #[test]
    fn adamw_steps_match_torch_formula() {
        // Three steps on a [2, 3] parameter, against torch.optim.AdamW's update in f64.
        let dev = Device::flex();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg);
        let mut p = Tensor::<2>::from_floats([[1.0, -2.0, 0.5], [0.0, 3.0, -0.25]], &dev);
        let mut want: Vec<f64> = vec![1.0, -2.0, 0.5, 0.0, 3.0, -0.25];
        let (mut m, mut v) = (vec![0f64; 6], vec![0f64; 6]);
        for step in 1..=3 {
            let gs: Vec<f32> = (0..6)
                .map(|i| ((i * 7 + step * 3) % 5) as f32 - 2.0)
                .collect();
            let g = kernels::tensor(gs.clone(), [2, 3], &dev);
            opt.begin_step();
            p = opt.update("p", p, g, 0.01, true);
            let (bc1, bc2) = (1.0 - 0.9f64.powi(step), 1.0 - 0.999f64.powi(step));
            for i in 0..6 {
                let gi = gs[i] as f64;
                want[i] -= 0.01 * 0.1 * want[i];
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                want[i] -= 0.01 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got = crate::weights::to_f32_vec(p.into_data());
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn adamw_gives_the_same_bits_on_every_instruction_set() {
        use std::sync::atomic::Ordering::Relaxed;
        let dev = Device::flex();
        let n = 1000;
        let v = |seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 17.0)
                .collect()
        };
        let run = || {
            let mut opt = AdamW::new(AdamWConfig {
                weight_decay: 0.01,
                ..Default::default()
            });
            let mut p = kernels::tensor(v(1), [10, 100], &dev);
            for s in 0..3 {
                opt.begin_step();
                p = opt.update(
                    "p",
                    p,
                    kernels::tensor(v(2 + s), [10, 100], &dev),
                    0.1,
                    true,
                );
            }
            let bits = |t: &Tensor<2>| -> Vec<u32> {
                crate::weights::to_f32_vec(t.to_data())
                    .iter()
                    .map(|f| f.to_bits())
                    .collect()
            };
            let m = &opt.state["p"];
            [bits(&p), bits(&m.m), bits(&m.v)]
        };
        let widest = run();
        for level in [1, 0] {
            kernels::SIMD_LEVEL.store(level, Relaxed);
            let other = run();
            kernels::SIMD_LEVEL.store(2, Relaxed);
            assert!(widest == other, "level {level} differs");
        }
    }
}
