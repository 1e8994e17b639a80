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
pub use linear::{BaseWeight, Linear, LoraWeights};
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
    /// Hold the projections' weights in bf16 (`Some(true)`) or f16 as they load (one
    /// projection in f32 at a time), the rest in `dtype`.
    pub half: Option<bool>,
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
    /// `score.weight` `[1, hidden]`: a sequence-classification head with one label (a reward
    /// model, transformers' `AutoModelForSequenceClassification`), read on the last token
    /// that is not padding; `None` for a causal LM.
    pub score: Option<Tensor<2>>,
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
        Self::load_with(source, config, device, dtype, None)
    }

    /// [`LlamaModel::load`], the projections' weights held in bf16 (`half = Some(true)`) or
    /// f16 as they are read (see [`LlamaModel::store_half`]).
    pub fn load_with(
        source: &dyn TensorSource,
        config: ModelConfig,
        device: &Device,
        dtype: DType,
        half: Option<bool>,
    ) -> Result<Self> {
        let loader = Loader {
            source,
            device,
            dtype,
            half,
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
            score: None,
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

    /// Final hidden states (after the last norm), through the device-independent forward pass
    /// ([`crate::device::forward`]) on the host kernels.
    pub fn forward_hidden(
        &self,
        ids: Tensor<2, Int>,
        positions: &Positions,
        mask: MaskSpec<'_>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [b, t] = ids.dims();
        let ids: Vec<u32> = ids
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap_or_default()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let hidden = crate::device::forward(self, &ids, b, t, positions, mask.segments, cache);
        hidden.reshape([b, t, self.config.hidden_size])
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
        let hidden = crate::device::forward(self, ids, batch, len, &positions, None, None);
        self.logits(hidden.reshape([batch, len, self.config.hidden_size]))
    }
}

impl LlamaModel {
    /// Every projection with its module path (`model.layers.0.self_attn.q_proj`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter().enumerate() {
            for (name, lin) in l.projections() {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// The projection at module path `model.layers.{i}.{self_attn|mlp}.{name}` (as
    /// [`LlamaModel::linears`] names them), without building every name.
    pub fn linear(&self, module: &str) -> Option<&Linear> {
        let (i, tail) = Self::layer_path(module)?;
        let (_, lin) = self
            .layers
            .get(i)?
            .projections()
            .into_iter()
            .find(|(n, _)| *n == tail)?;
        Some(lin)
    }

    /// [`LlamaModel::linear`], mutably.
    pub fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        let (i, tail) = Self::layer_path(module)?;
        let (_, lin) = self
            .layers
            .get_mut(i)?
            .projections_mut()
            .into_iter()
            .find(|(n, _)| *n == tail)?;
        Some(lin)
    }

    /// `(i, rest)` of `model.layers.{i}.{rest}` (`i` written as [`LlamaModel::linears`] does).
    fn layer_path(module: &str) -> Option<(usize, &str)> {
        let (i, tail) = module.strip_prefix("model.layers.")?.split_once('.')?;
        let idx = i.parse::<usize>().ok()?;
        (idx.to_string() == i).then_some((idx, tail))
    }

    /// Mutable access to every projection with its module path.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, lin) in l.projections_mut() {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// Attaches a PEFT adapter (replacing any attached one). Every adapter module must name a
    /// projection of this model with matching shapes.
    pub fn attach_adapter(&mut self, adapter: &crate::adapter::PeftAdapter) -> Result<()> {
        self.attach_weights(&adapter.weights, adapter.config.lora_dropout)
    }

    /// Attaches adapter weights with a LoRA dropout for training.
    pub fn attach_weights(
        &mut self,
        adapter: &fedtune_aggregation::Adapter,
        dropout: f64,
    ) -> Result<()> {
        self.detach_adapter();
        let device = self.device.clone();
        let dtype = self.dtype;
        if let Some(s) = adapter_score(adapter, self.config.hidden_size)? {
            self.score = Some(Tensor::<2>::from_data(
                TensorData::new(s.data.clone(), [1, s.cols]),
                (&device, dtype),
            ));
        }
        let mut linears: std::collections::HashMap<String, &mut Linear> =
            self.linears_mut().into_iter().collect();
        for (module, m) in &adapter.modules {
            let lin = linears.get_mut(module).ok_or_else(|| {
                Error::Invalid(format!(
                    "adapter module `{module}` is not a projection of this model"
                ))
            })?;
            let (out, inp) = (lin.out_features(), lin.in_features());
            check_lora_shape(module, m, out, inp)?;
            let t = |h: &fedtune_aggregation::Matrix| {
                Tensor::<2>::from_data(
                    TensorData::new(h.data.clone(), [h.rows, h.cols]),
                    (&device, dtype),
                )
            };
            let magnitude = dora_magnitude(adapter, module, out)?.map(t);
            lin.lora = Some(LoraWeights {
                a: t(&m.a),
                b: t(&m.b),
                scale: m.scale as f64,
                dropout,
                magnitude,
            });
        }
        Ok(())
    }

    /// Removes every LoRA branch.
    pub fn detach_adapter(&mut self) {
        for (_, lin) in self.linears_mut() {
            lin.lora = None;
        }
    }

    /// A copy of this model without its adapter (shares the base weights).
    pub fn without_adapter(&self) -> Self {
        let mut m = self.clone();
        m.detach_adapter();
        m
    }
}

/// What every device checks of an adapter's dense tensors before attaching it: each is a
/// reward model's score head `[1, hidden]` or the DoRA magnitude of a module with LoRA
/// factors. Returns the score head, if any.
pub(crate) fn adapter_score(
    adapter: &fedtune_aggregation::Adapter,
    hidden: usize,
) -> Result<Option<&fedtune_aggregation::Matrix>> {
    if let Some(name) = adapter.dense.keys().find(|k| {
        k.as_str() != crate::adapter::SCORE_KEY && fedtune_peft::parse_magnitude_key(k).is_none()
    }) {
        return Err(Error::Invalid(format!(
            "adapter tensor `{name}` is not a LoRA factor"
        )));
    }
    if let Some(key) = adapter.dense.keys().find(|k| {
        fedtune_peft::parse_magnitude_key(k).is_some_and(|m| !adapter.modules.contains_key(m))
    }) {
        return Err(Error::Invalid(format!(
            "adapter tensor `{key}` is a DoRA magnitude for a module without LoRA factors"
        )));
    }
    match adapter.dense.get(crate::adapter::SCORE_KEY) {
        Some(s) if s.rows != 1 || s.cols != hidden => Err(Error::Invalid(format!(
            "the adapter's score head is [{}, {}]; this model needs [1, {hidden}]",
            s.rows, s.cols
        ))),
        s => Ok(s),
    }
}

/// `adapter`'s DoRA magnitude of `module`, checked to have one value per output of its
/// `out`-row projection (every device attaches magnitudes through this check).
pub(crate) fn dora_magnitude<'a>(
    adapter: &'a fedtune_aggregation::Adapter,
    module: &str,
    out: usize,
) -> Result<Option<&'a fedtune_aggregation::Matrix>> {
    match adapter.dense.get(&fedtune_peft::magnitude_key(module)) {
        Some(v) if v.rows != 1 || v.cols != out => Err(Error::Invalid(format!(
            "adapter module `{module}`: DoRA magnitude has {} values, the projection {out} \
             outputs",
            v.data.len()
        ))),
        v => Ok(v),
    }
}

/// Checks that LoRA factors fit an `[out, inp]` projection: `lora_A` `[r, inp]`, `lora_B`
/// `[out, r]` (every device attaches adapters through this check).
pub(crate) fn check_lora_shape(
    module: &str,
    m: &fedtune_aggregation::LoraFactors,
    out: usize,
    inp: usize,
) -> Result<()> {
    let r = m.rank();
    if m.a.shape() != (r, inp) || m.b.shape() != (out, r) {
        return Err(Error::Invalid(format!(
            "adapter module `{module}`: lora_A {:?} / lora_B {:?} do not fit a [{out}, {inp}] projection",
            m.a.shape(),
            m.b.shape()
        )));
    }
    Ok(())
}

/// Which weight of a projection a parameter name refers to.
enum ProjPart {
    LoraA,
    LoraB,
    Magnitude,
    Weight,
    Bias,
}

impl LlamaModel {
    fn proj_part(name: &str) -> Option<(&str, ProjPart)> {
        for (suffix, part) in [
            (".lora_A", ProjPart::LoraA),
            (".lora_B", ProjPart::LoraB),
            (".lora_magnitude_vector", ProjPart::Magnitude),
            (".weight", ProjPart::Weight),
            (".bias", ProjPart::Bias),
        ] {
            if let Some(m) = name.strip_suffix(suffix) {
                return Some((m, part));
            }
        }
        None
    }

    /// A parameter by name, as a matrix (vectors are `[1, d]`):
    /// `{module}.lora_A|lora_B|lora_magnitude_vector`,
    /// `{module}.weight|bias`, `model.layers.{i}.{input,post_attention}_layernorm.weight`,
    /// `model.norm.weight`, `model.embed_tokens.weight`, `lm_head.weight`, `score.weight`.
    pub fn param(&self, name: &str) -> Option<Tensor<2>> {
        match name {
            "model.embed_tokens.weight" => return Some(self.embed_tokens.clone()),
            "lm_head.weight" => return self.lm_head.clone(),
            "score.weight" => return self.score.clone(),
            "model.norm.weight" => return Some(self.norm.weight.clone().unsqueeze()),
            _ => {}
        }
        if let Some(rest) = name.strip_prefix("model.layers.")
            && let Some((i, tail)) = rest.split_once('.')
            && let Ok(i) = i.parse::<usize>()
        {
            let l = self.layers.get(i)?;
            match tail {
                "input_layernorm.weight" => {
                    return Some(l.input_layernorm.weight.clone().unsqueeze());
                }
                "post_attention_layernorm.weight" => {
                    return Some(l.post_attention_layernorm.weight.clone().unsqueeze());
                }
                _ => {}
            }
        }
        let (module, part) = Self::proj_part(name)?;
        let lin = self.linear(module)?;
        match part {
            ProjPart::LoraA => lin.lora.as_ref().map(|l| l.a.clone()),
            ProjPart::LoraB => lin.lora.as_ref().map(|l| l.b.clone()),
            ProjPart::Magnitude => lin.lora.as_ref().and_then(|l| l.magnitude.clone()),
            ProjPart::Weight => Some(lin.weight()),
            ProjPart::Bias => lin.bias.clone().map(|b| b.unsqueeze()),
        }
    }

    /// Replaces a parameter by name; returns false when there is no such parameter.
    pub fn set_param(&mut self, name: &str, t: Tensor<2>) -> bool {
        let vec = |t: Tensor<2>| -> Tensor<1> {
            let n = t.dims()[1];
            t.reshape([n])
        };
        match name {
            "model.embed_tokens.weight" => {
                self.embed_tokens = t;
                return true;
            }
            "lm_head.weight" => {
                if self.lm_head.is_some() {
                    self.lm_head = Some(t);
                    return true;
                }
                return false;
            }
            "score.weight" => {
                if self.score.is_some() {
                    self.score = Some(t);
                    return true;
                }
                return false;
            }
            "model.norm.weight" => {
                self.norm.weight = vec(t);
                return true;
            }
            _ => {}
        }
        if let Some(rest) = name.strip_prefix("model.layers.")
            && let Some((i, tail)) = rest.split_once('.')
            && let Ok(i) = i.parse::<usize>()
            && let Some(l) = self.layers.get_mut(i)
        {
            match tail {
                "input_layernorm.weight" => {
                    l.input_layernorm.weight = vec(t);
                    return true;
                }
                "post_attention_layernorm.weight" => {
                    l.post_attention_layernorm.weight = vec(t);
                    return true;
                }
                _ => {}
            }
        }
        let Some((module, part)) = Self::proj_part(name) else {
            return false;
        };
        let Some(lin) = self.linear_mut(module) else {
            return false;
        };
        match (part, lin.lora.as_mut()) {
            (ProjPart::LoraA, Some(l)) => l.a = t,
            (ProjPart::LoraB, Some(l)) => l.b = t,
            (ProjPart::Magnitude, Some(l)) if l.magnitude.is_some() => l.magnitude = Some(t),
            (ProjPart::Weight, _) => lin.base = linear::BaseWeight::Dense(t),
            (ProjPart::Bias, _) if lin.bias.is_some() => lin.bias = Some(vec(t)),
            _ => return false,
        }
        true
    }

    /// A fresh score head `[1, hidden]` (a reward model's), drawn from `seed` as
    /// [`crate::train::reward::score_head`] draws it.
    pub fn init_score(&mut self, seed: u64) {
        let h = crate::train::reward::score_head(self.config.hidden_size, seed);
        self.score = Some(Tensor::<2>::from_data(
            TensorData::new(h.data, [1, h.cols]),
            (&self.device, self.dtype),
        ));
    }

    /// The current LoRA weights as host data (for saving or sending), with a reward model's
    /// score head when it has one.
    pub fn lora_weights(&self) -> fedtune_aggregation::Adapter {
        let mut out = fedtune_aggregation::Adapter::default();
        if let Some(s) = &self.score {
            out.dense.insert(
                crate::adapter::SCORE_KEY.into(),
                fedtune_aggregation::Matrix::new(
                    1,
                    self.config.hidden_size,
                    crate::weights::to_f32_vec(s.to_data()),
                ),
            );
        }
        for (name, lin) in self.linears() {
            if let Some(l) = &lin.lora {
                let m = |t: &Tensor<2>| {
                    let [r, c] = t.dims();
                    fedtune_aggregation::Matrix::new(r, c, crate::weights::to_f32_vec(t.to_data()))
                };
                if let Some(mag) = &l.magnitude {
                    out.dense.insert(fedtune_peft::magnitude_key(&name), m(mag));
                }
                out.modules.insert(
                    name,
                    fedtune_aggregation::LoraFactors {
                        a: m(&l.a),
                        b: m(&l.b),
                        scale: l.scale as f32,
                    },
                );
            }
        }
        out
    }
}

impl LlamaModel {
    /// Quantises every projection's base weight to NF4 (QLoRA; embeddings, norms and the head
    /// stay in the compute dtype, as bitsandbytes does). Returns `(quantised parameters,
    /// bytes at rest)`.
    pub fn quantize_nf4(&mut self, double_quant: bool) -> (usize, usize) {
        self.rebase(|lin| lin.quantize_nf4(double_quant))
    }

    /// Holds every projection's frozen base weight in bf16 (`bf16`) or f16, widened to f32 on
    /// each use (training on the CPU with `--dtype bf16`): half the bytes of f32. Returns the
    /// projections' parameters and the bytes they now take.
    pub fn store_half(&mut self, bf16: bool) -> (usize, usize) {
        self.rebase(|lin| lin.store_half(bf16))
    }

    /// Applies `to` (which changes how a base weight is held and returns its bytes) to every
    /// projection; returns the projections' parameters and bytes.
    fn rebase(&mut self, mut to: impl FnMut(&mut Linear) -> usize) -> (usize, usize) {
        let mut params = 0;
        let mut bytes = 0;
        for (_, lin) in self.linears_mut() {
            params += lin.out_features() * lin.in_features();
            bytes += to(lin);
        }
        (params, bytes)
    }

    /// Merges every LoRA branch into its base weight (`W ← W + s·B·A`, PEFT's
    /// `merge_and_unload`; with DoRA each row of that is rescaled to its magnitude). Fails on NF4 bases, which cannot hold the merged weight.
    pub fn merge_adapter(&mut self) -> Result<()> {
        for (name, lin) in self.linears_mut() {
            let Some(l) = lin.lora.take() else { continue };
            if let BaseWeight::Nf4 { .. } = &lin.base {
                return Err(Error::Invalid(format!(
                    "{name}: cannot merge an adapter into an NF4 base; load the model unquantised"
                )));
            }
            // A 16-bit base is merged in f32 (and stays f32).
            let w = &lin.weight();
            let merged = w.clone() + l.b.clone().matmul(l.a.clone()) * l.scale;
            // DoRA (PEFT): each row of W + s·B·A rescaled to its magnitude.
            lin.base = BaseWeight::Dense(match l.dora_factor(w) {
                Some((c, _)) => {
                    let out = c.dims()[1];
                    merged * c.reshape([out, 1])
                }
                None => merged,
            });
        }
        Ok(())
    }
}
