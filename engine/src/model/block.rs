//! One pre-norm decoder block:
//! `h = x + attn(norm₁(x))`, `y = h + mlp(norm₂(h))`.
//!
//! # Shapes
//! - input and output `[batch, seq, hidden]`.

use burn::tensor::Tensor;

use crate::config::ModelConfig;
use crate::device::Proj;
use crate::error::Result;
use crate::model::Loader;
use crate::model::attention::{Attention, MaskSpec};
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;
use crate::model::norm::RmsNorm;

/// A decoder block; field names are the Hugging Face module names.
#[derive(Debug, Clone)]
pub struct Block {
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `self_attn`.
    pub self_attn: Attention,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
    /// `mlp`.
    pub mlp: Mlp,
}

impl Block {
    /// One projection.
    pub fn proj(&self, p: Proj) -> &Linear {
        let (a, m) = (&self.self_attn, &self.mlp);
        match p {
            Proj::Q => &a.q_proj,
            Proj::K => &a.k_proj,
            Proj::V => &a.v_proj,
            Proj::O => &a.o_proj,
            Proj::Gate => &m.gate_proj,
            Proj::Up => &m.up_proj,
            Proj::Down => &m.down_proj,
        }
    }

    /// The seven projections with their paths inside the block (`self_attn.q_proj`, …), in
    /// Hugging Face order ([`Proj::ALL`]).
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        Proj::ALL.map(|p| (p.path(), self.proj(p)))
    }

    /// [`Block::projections`], mutably.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            (Proj::Q.path(), &mut a.q_proj),
            (Proj::K.path(), &mut a.k_proj),
            (Proj::V.path(), &mut a.v_proj),
            (Proj::O.path(), &mut a.o_proj),
            (Proj::Gate.path(), &mut m.gate_proj),
            (Proj::Up.path(), &mut m.up_proj),
            (Proj::Down.path(), &mut m.down_proj),
        ]
    }

    /// Loads `model.layers.{index}`.
    pub fn load(loader: &Loader<'_>, cfg: &ModelConfig, index: usize) -> Result<Self> {
        let prefix = format!("model.layers.{index}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Block {
            input_layernorm: RmsNorm::load(loader, &format!("{prefix}.input_layernorm"), h, eps)?,
            self_attn: Attention::load(
                loader,
                &format!("{prefix}.self_attn"),
                cfg,
                cfg.sliding_window.get(index).copied().flatten(),
            )?,
            post_attention_layernorm: RmsNorm::load(
                loader,
                &format!("{prefix}.post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp: Mlp::load(loader, &format!("{prefix}.mlp"), cfg)?,
        })
    }

    /// Applies the block.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: MaskSpec<'_>,
    ) -> Tensor<3> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), cos, sin, mask);
        let h = x + attn;
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(h.clone()));
        h + mlp
    }
}
