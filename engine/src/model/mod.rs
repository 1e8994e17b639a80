//! The Llama-family decoder (`llama`, `mistral`, `qwen2`) on burn tensors, block by block as
//! transformers implements it. Weight names are the Hugging Face keys.
//!
//! ```text
//! ids ─ embed_tokens ─ [Block × L] ─ norm ─ lm_head (or embed_tokens when tied) ─ logits
//! ```
//!
//! # Shapes
//! - ids `[batch, seq]` → hidden `[batch, seq, hidden]` → logits `[batch, seq, vocab]`.

pub mod attention;
pub mod block;
pub mod cache;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

pub use attention::MaskSpec;
pub use block::Block;
pub use cache::KvCache;
pub use linear::{Linear, LoraWeights};
pub use norm::RmsNorm;
pub use rope::{Positions, RotaryEmbedding};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::TensorSource;

/// Reads tensors from a [`TensorSource`] onto a device in the compute dtype, checking shapes.
pub struct Loader<'a> {
    /// Where tensors come from.
    pub source: &'a dyn TensorSource,
    /// Target device.
    pub device: &'a Device,
    /// Compute dtype.
    pub dtype: DType,
}

impl Loader<'_> {
    /// Loads `name`, which must have `shape`.
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let data = self.source.require(name, &shape)?;
        Ok(Tensor::from_data(data, (self.device, self.dtype)))
    }
}

/// A causal language model of the Llama family.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    /// The validated configuration.
    pub config: ModelConfig,
    /// `model.embed_tokens.weight` `[vocab, hidden]`.
    pub embed_tokens: Tensor<2>,
    /// `model.layers.*`.
    pub layers: Vec<Block>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head.weight` `[vocab, hidden]`, or `None` when tied to the embedding.
    pub lm_head: Option<Tensor<2>>,
    /// RoPE.
    pub rope: RotaryEmbedding,
    /// Device of the weights.
    pub device: Device,
    /// Compute dtype.
    pub dtype: DType,
}

impl LlamaModel {
    /// Builds the model from `source` with HF key names.
    pub fn load(
        source: &dyn TensorSource,
        config: ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let loader = Loader {
            source,
            device,
            dtype,
        };
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = loader.tensor::<2>("model.embed_tokens.weight", [v, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Block::load(&loader, &config, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&loader, "model.norm", h, config.rms_norm_eps)?;
        let has_head = source.load("lm_head.weight")?.is_some();
        let lm_head = if config.tie_word_embeddings {
            None
        } else if has_head {
            Some(loader.tensor::<2>("lm_head.weight", [v, h])?)
        } else {
            return Err(Error::tensor(
                source.path(),
                "lm_head.weight",
                "missing although tie_word_embeddings is false",
            ));
        };
        Ok(LlamaModel {
            rope: RotaryEmbedding::new(&config),
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            dtype,
        })
    }

    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> Tensor<2> {
        self.lm_head
            .clone()
            .unwrap_or_else(|| self.embed_tokens.clone())
    }

    /// Token ids `[batch, seq]` as a tensor on the model's device.
    pub fn ids_tensor(&self, ids: &[u32], batch: usize, len: usize) -> Tensor<2, Int> {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::from_data(TensorData::new(ids, [batch, len]), &self.device)
    }

    /// Final hidden states (after the last norm).
    pub fn forward_hidden(
        &self,
        ids: Tensor<2, Int>,
        positions: &Positions,
        mask: MaskSpec<'_>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let mut x = burn::tensor::module::embedding(self.embed_tokens.clone(), ids);
        let (cos, sin) = self.rope.tables(positions, &self.device);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &cos, &sin, mask, layer_cache);
        }
        if let Some(c) = cache {
            c.seen += positions.dims().1;
        }
        self.norm.forward(x)
    }

    /// Logits `[batch, seq, vocab]` of hidden states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, t, h] = hidden.dims();
        let logits = hidden
            .reshape([b * t, h])
            .matmul(self.lm_head_weight().transpose());
        let logits = if self.dtype == DType::F32 {
            logits
        } else {
            logits.cast(DType::F32)
        };
        logits.reshape([b, t, self.config.vocab_size])
    }

    /// Logits of a batch of equal-length sequences `[batch, seq]` starting at position 0.
    pub fn forward(&self, ids: &[u32], batch: usize, len: usize) -> Tensor<3> {
        let positions = Positions::Range {
            start: 0,
            len,
            batch,
        };
        let hidden = self.forward_hidden(
            self.ids_tensor(ids, batch, len),
            &positions,
            MaskSpec { segments: None },
            None,
        );
        self.logits(hidden)
    }
}
