//! SwiGLU feed-forward block: `down(silu(gate(x)) ⊙ up(x))`.
//!
//! # Shapes
//! - input and output `[batch, seq, hidden]`; inner `[batch, seq, intermediate]`.

use burn::tensor::{Tensor, activation};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{Linear, Loader};

/// The MLP of one decoder block; field names are the Hugging Face module names.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `gate_proj` `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// `up_proj` `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// `down_proj` `[hidden, intermediate]`.
    pub down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(loader: &Loader<'_>, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_proj: Linear::load(loader, &format!("{prefix}.gate_proj"), i, h, bias)?,
            up_proj: Linear::load(loader, &format!("{prefix}.up_proj"), i, h, bias)?,
            down_proj: Linear::load(loader, &format!("{prefix}.down_proj"), h, i, bias)?,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = activation::silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
