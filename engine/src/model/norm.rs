//! RMSNorm as in transformers' `LlamaRMSNorm`:
//! `y = w ⊙ x / sqrt(mean(x²) + ε)`, computed in f32 whatever the compute dtype.
//!
//! # Shapes
//! - input `[batch, seq, hidden]`, weight `[hidden]`, output like the input.

use burn::tensor::{DType, Tensor};

use crate::error::Result;
use crate::model::Loader;

/// Root-mean-square layer normalisation with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor<1>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// Loads `{prefix}.weight`.
    pub fn load(loader: &Loader<'_>, prefix: &str, hidden: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: loader.tensor::<1>(&format!("{prefix}.weight"), [hidden])?,
            eps,
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = x.dtype();
        let x = if dtype == DType::F32 {
            x
        } else {
            x.cast(DType::F32)
        };
        let variance = x.clone().square().mean_dim(2);
        let normed = x * (variance + self.eps).sqrt().recip();
        let normed = if dtype == DType::F32 {
            normed
        } else {
            normed.cast(dtype)
        };
        normed * self.weight.clone().unsqueeze::<3>()
    }
}
