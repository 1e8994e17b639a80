//! Rotary position embeddings as transformers computes them (`rotate_half` convention):
//! `q' = q ⊙ cos + rotate_half(q) ⊙ sin`, with `cos`/`sin` of `position · inv_freq`
//! duplicated over the two halves of the head.
//!
//! Inverse frequencies: `1 / θ^(2i/d)`, then scaled by `linear` (÷ factor) or `llama3`
//! (frequency-dependent, transformers' `_compute_llama3_parameters`). Angles are formed in f32
//! exactly as transformers does (`inv_freq_f32 · position_f32`), so the tables match bit for bit
//! up to the last ulp of `cos`/`sin`.

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::{ModelConfig, RopeScaling};

/// RoPE for one model: the inverse frequencies, from which `cos`/`sin` tables are built for the
/// positions of each forward pass (a few microseconds on the host, so no table has to cover the
/// whole context in advance).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    head_dim: usize,
}

/// The inverse frequencies (length `head_dim / 2`) for a configuration, in f32.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let exponent = ((2 * i) as f32 / dim as f32) as f64;
            (1.0 / (cfg.rope_theta.powf(exponent) as f32) as f64) as f32
        })
        .collect();
    let base = match &cfg.rope_freq_factors {
        Some(f) => base.iter().zip(f).map(|(b, f)| b / f).collect(),
        None => base,
    };
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    }
                })
                .collect()
        }
    }
}

impl RotaryEmbedding {
    /// RoPE for a configuration.
    pub fn new(cfg: &ModelConfig) -> Self {
        RotaryEmbedding {
            inv_freq: inv_freq(cfg),
            head_dim: cfg.head_dim,
        }
    }

    /// `cos`/`sin` for the given positions, shaped `[batch, 1, seq, head_dim]` to broadcast
    /// over heads.
    pub fn tables(&self, positions: &Positions, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let (batch, len) = positions.dims();
        let rows: Vec<usize> = match positions {
            Positions::Range { start, len, .. } => (*start..start + len).collect(),
            Positions::Explicit { ids, .. } => ids.clone(),
        };
        let dim = self.head_dim;
        let half = dim / 2;
        let mut cos = vec![0f32; rows.len() * dim];
        let mut sin = vec![0f32; rows.len() * dim];
        for (r, &p) in rows.iter().enumerate() {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                let (s, c) = angle.sin_cos();
                cos[r * dim + i] = c as f32;
                cos[r * dim + i + half] = c as f32;
                sin[r * dim + i] = s as f32;
                sin[r * dim + i + half] = s as f32;
            }
        }
        let lead = if matches!(positions, Positions::Range { .. }) {
            1
        } else {
            batch
        };
        let cos = Tensor::<4>::from_data(TensorData::new(cos, [lead, 1, len, dim]), device);
        let sin = Tensor::<4>::from_data(TensorData::new(sin, [lead, 1, len, dim]), device);
        if lead == batch {
            (cos, sin)
        } else {
            (
                cos.expand([batch, 1, len, dim]),
                sin.expand([batch, 1, len, dim]),
            )
        }
    }

    /// `cos`/`sin` per token, row-major `[batch·seq, head_dim]` (for the CPU kernels).
    pub fn rows(&self, positions: &Positions) -> (Vec<f32>, Vec<f32>) {
        let (batch, len) = positions.dims();
        let pos: Vec<usize> = match positions {
            Positions::Range { start, len, .. } => {
                (0..batch).flat_map(|_| *start..start + len).collect()
            }
            Positions::Explicit { ids, .. } => ids.clone(),
        };
        debug_assert_eq!(pos.len(), batch * len);
        let dim = self.head_dim;
        let half = dim / 2;
        let mut cos = vec![0f32; pos.len() * dim];
        let mut sin = vec![0f32; pos.len() * dim];
        for (r, &p) in pos.iter().enumerate() {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (s, c) = ((p as f32 * f) as f64).sin_cos();
                cos[r * dim + i] = c as f32;
                cos[r * dim + i + half] = c as f32;
                sin[r * dim + i] = s as f32;
                sin[r * dim + i + half] = s as f32;
            }
        }
        (cos, sin)
    }

    /// Applies the rotation to `x` `[batch, heads, seq, head_dim]`.
    pub fn apply(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..t, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }
}

/// Positions of the tokens in a forward pass.
#[derive(Debug, Clone)]
pub enum Positions {
    /// Every row uses positions `start..start+len` (plain batches, generation with a cache).
    Range {
        /// First position.
        start: usize,
        /// Sequence length.
        len: usize,
        /// Batch size.
        batch: usize,
    },
    /// Per-token positions, row-major `[batch, seq]` (packed sequences restart at 0 per
    /// example).
    Explicit {
        /// Positions, `batch·seq` of them.
        ids: Vec<usize>,
        /// Batch size.
        batch: usize,
        /// Sequence length.
        len: usize,
    },
}

impl Positions {
    /// `(batch, seq)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Positions::Range { len, batch, .. } | Positions::Explicit { len, batch, .. } => {
                (*batch, *len)
            }
        }
    }
}
