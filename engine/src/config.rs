//! Model configuration: the serde view of a Hugging Face `config.json` ([`HfConfig`]) and the
//! validated runtime configuration the model is built from ([`ModelConfig`]).
//!
//! Supported architectures are the Llama family as transformers implements it: `llama`,
//! `mistral` and `qwen2` (q/k/v biases). RoPE theta comes from `rope_theta` or, in
//! transformers-5 style, from `rope_parameters.rope_theta`; scaling from `rope_scaling` or
//! `rope_parameters` (types `default`, `linear`, `llama3`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The architecture family of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM, TinyLlama, Llama 2/3).
    Llama,
    /// `MistralForCausalLM` (sliding-window attention when `sliding_window` is set).
    Mistral,
    /// `Qwen2ForCausalLM` (biases on q/k/v projections).
    Qwen2,
}

impl Architecture {
    /// Parses a transformers `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The transformers `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// The transformers class name written into exported `config.json` files.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How rotary position embedding frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (inverse frequencies divided by `factor`).
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Overall factor (8 in Llama 3.1).
        factor: f64,
        /// Low-frequency factor (1).
        low_freq_factor: f64,
        /// High-frequency factor (4).
        high_freq_factor: f64,
        /// Context length of the original model (8192).
        original_max_position_embeddings: f64,
    },
}

/// Validated configuration of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Architecture family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA when smaller than `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Per-frequency divisors of the inverse frequencies (GGUF `rope_freqs.weight`, which
    /// llama.cpp stores instead of Llama 3 scaling parameters).
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Whether q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Whether the output projection carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Whether MLP projections carry a bias (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding attention window per layer (`None` = full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Maximum context length the model was trained for.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token id, when the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
}

/// The fields of a Hugging Face `config.json` that the engine reads. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// transformers `model_type`.
    pub model_type: Option<String>,
    /// `architectures` list (used when `model_type` is absent).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size.
    pub vocab_size: Option<usize>,
    /// Hidden size.
    pub hidden_size: Option<usize>,
    /// MLP size.
    pub intermediate_size: Option<usize>,
    /// Number of layers.
    pub num_hidden_layers: Option<usize>,
    /// Number of attention heads.
    pub num_attention_heads: Option<usize>,
    /// Number of KV heads.
    pub num_key_value_heads: Option<usize>,
    /// Explicit head width.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// RoPE base (transformers ≤ 4).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers ≤ 4).
    pub rope_scaling: Option<Value>,
    /// RoPE parameters (transformers 5).
    pub rope_parameters: Option<Value>,
    /// Llama attention biases.
    pub attention_bias: Option<bool>,
    /// Llama MLP biases.
    pub mlp_bias: Option<bool>,
    /// Tied LM head.
    pub tie_word_embeddings: Option<bool>,
    /// Sliding window (Mistral, Qwen2).
    pub sliding_window: Option<usize>,
    /// Qwen2: whether the sliding window is used.
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from this index on use the sliding window.
    pub max_window_layers: Option<usize>,
    /// transformers 5: per-layer attention kind.
    pub layer_types: Option<Vec<String>>,
    /// Maximum context.
    pub max_position_embeddings: Option<usize>,
    /// Activation (only `silu` is supported).
    pub hidden_act: Option<String>,
    /// BOS id.
    pub bos_token_id: Option<Value>,
    /// EOS id or ids.
    pub eos_token_id: Option<Value>,
}

fn token_ids(value: &Option<Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parameters of the model: embedding, decoder blocks (projections with their biases, two
    /// norms each), final norm, and the LM head unless tied — what transformers'
    /// `num_parameters()` counts.
    pub fn num_parameters(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let bias = |on: bool, n: usize| if on { n } else { 0 };
        let attention =
            h * q + 2 * h * kv + q * h + bias(self.qkv_bias, q + 2 * kv) + bias(self.o_bias, h);
        let mlp =
            3 * h * self.intermediate_size + bias(self.mlp_bias, 2 * self.intermediate_size + h);
        let block = attention + mlp + 2 * h;
        let embedding = self.vocab_size * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        embedding + self.num_hidden_layers * block + h + head
    }

    /// Every projection of the decoder blocks as `(module path, out_features, in_features)`, in
    /// the order of [`crate::LlamaModel::linears`] (block by block, q k v o gate up down).
    pub fn projections(&self) -> Vec<(String, usize, usize)> {
        use crate::device::Proj;
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let mut out = Vec::with_capacity(self.num_hidden_layers * 7);
        for li in 0..self.num_hidden_layers {
            for p in Proj::ALL {
                let (o, inp) = match p {
                    Proj::Q => (q, h),
                    Proj::K | Proj::V => (kv, h),
                    Proj::O => (h, q),
                    Proj::Gate | Proj::Up => (i, h),
                    Proj::Down => (h, i),
                };
                out.push((format!("model.layers.{li}.{}", p.path()), o, inp));
            }
        }
        out
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| Error::parse(path, e))?;
        Self::from_hf(&raw, path)
    }

    /// Validates a parsed `config.json`; `path` is only used in error messages.
    pub fn from_hf(raw: &HfConfig, path: &Path) -> Result<Self> {
        let model_type = match &raw.model_type {
            Some(t) => t.clone(),
            None => match raw.architectures.first().map(String::as_str) {
                Some("LlamaForCausalLM") => "llama".into(),
                Some("MistralForCausalLM") => "mistral".into(),
                Some("Qwen2ForCausalLM") => "qwen2".into(),
                _ => return Err(Error::config(path, "model_type", "missing")),
            },
        };
        let architecture = Architecture::from_model_type(&model_type).ok_or_else(|| {
            Error::config(
                path,
                "model_type",
                format!("`{model_type}` is not supported (llama, mistral, qwen2 are)"),
            )
        })?;
        let req = |v: Option<usize>, field: &str| {
            v.filter(|&v| v > 0).ok_or_else(|| {
                Error::config(
                    path,
                    field,
                    "missing or zero (a positive integer is required)",
                )
            })
        };
        let hidden_size = req(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = req(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) if d > 0 => d,
            _ => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::config(
                        path,
                        "head_dim",
                        "missing and hidden_size is not a multiple of num_attention_heads",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(path, "head_dim", "must be even for RoPE"));
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(Error::config(
                path,
                "hidden_act",
                format!("`{act}` is not supported (silu is)"),
            ));
        }
        let (rope_theta, rope_scaling) = parse_rope(raw, path)?;
        let num_hidden_layers = req(raw.num_hidden_layers, "num_hidden_layers")?;
        let sliding_window = sliding_windows(raw, architecture, num_hidden_layers);
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(ModelConfig {
            architecture,
            vocab_size: req(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: req(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture == Architecture::Llama && attention_bias,
            mlp_bias: architecture == Architecture::Llama && raw.mlp_bias.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            sliding_window,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
        })
    }

    /// Number of query heads that share one KV head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Writes a transformers-compatible `config.json` for this model (used by `export`).
    pub fn to_hf_json(&self) -> Value {
        let mut rope = serde_json::json!({ "rope_theta": self.rope_theta, "rope_type": "default" });
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                rope["rope_type"] = "linear".into();
                rope["factor"] = factor.into();
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope["rope_type"] = "llama3".into();
                rope["factor"] = factor.into();
                rope["low_freq_factor"] = low_freq_factor.into();
                rope["high_freq_factor"] = high_freq_factor.into();
                rope["original_max_position_embeddings"] =
                    (original_max_position_embeddings as u64).into();
            }
        }
        let mut scaling = rope.clone();
        if let Some(obj) = scaling.as_object_mut() {
            obj.remove("rope_theta");
            obj.insert("type".into(), obj["rope_type"].clone());
        }
        let mut v = serde_json::json!({
            "architectures": [self.architecture.class_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "dtype": "float32",
        });
        if self.rope_scaling != RopeScaling::None {
            v["rope_scaling"] = scaling;
        }
        if self.architecture == Architecture::Llama {
            v["attention_bias"] = self.qkv_bias.into();
            v["mlp_bias"] = self.mlp_bias.into();
        }
        if let Some(w) = self.sliding_window.iter().flatten().next() {
            v["sliding_window"] = (*w).into();
            if self.architecture == Architecture::Qwen2 {
                v["use_sliding_window"] = true.into();
            }
        } else if self.architecture != Architecture::Llama {
            v["sliding_window"] = Value::Null;
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => v["eos_token_id"] = (*one).into(),
            many => v["eos_token_id"] = many.to_vec().into(),
        }
        v
    }
}

fn sliding_windows(raw: &HfConfig, arch: Architecture, layers: usize) -> Vec<Option<usize>> {
    let Some(window) = raw.sliding_window else {
        return vec![None; layers];
    };
    if let Some(types) = &raw.layer_types {
        return (0..layers)
            .map(|i| {
                (types.get(i).map(String::as_str) == Some("sliding_attention")).then_some(window)
            })
            .collect();
    }
    match arch {
        Architecture::Mistral => vec![Some(window); layers],
        Architecture::Qwen2 if raw.use_sliding_window.unwrap_or(false) => {
            let from = raw.max_window_layers.unwrap_or(layers);
            (0..layers).map(|i| (i >= from).then_some(window)).collect()
        }
        _ => vec![None; layers],
    }
}

fn parse_rope(raw: &HfConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    let params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
    let theta = raw
        .rope_theta
        .or_else(|| {
            params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10_000.0);
    // transformers 5 puts the scaling parameters next to rope_theta; 4.x in rope_scaling.
    let scaling = raw
        .rope_scaling
        .as_ref()
        .filter(|v| v.is_object())
        .or(params);
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let field = |name: &str| {
        s.get(name).and_then(Value::as_f64).ok_or_else(|| {
            Error::config(
                path,
                format!("rope_scaling.{name}"),
                format!("required for rope type `{kind}`"),
            )
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: field("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: field("factor")?,
            low_freq_factor: field("low_freq_factor")?,
            high_freq_factor: field("high_freq_factor")?,
            original_max_position_embeddings: field("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::config(
                path,
                "rope_scaling.rope_type",
                format!("`{other}` is not supported (default, linear, llama3 are)"),
            ));
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let raw: HfConfig = serde_json::from_str(json).unwrap();
        ModelConfig::from_hf(&raw, Path::new("config.json"))
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2"#;

    #[test]
    fn rope_theta_is_read_from_transformers5_rope_parameters() {
        let cfg = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_theta": 100000.0, "rope_type": "default"}}}}"#
        ))
        .unwrap();
        assert_eq!(cfg.rope_theta, 100000.0);
        assert_eq!(cfg.rope_scaling, RopeScaling::None);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 4);
    }

    #[test]
    fn llama3_scaling_from_rope_scaling() {
        let cfg = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_unknown_models_are_rejected_naming_the_field() {
        let cfg = parse(&format!(r#"{{"model_type": "qwen2", {BASE}}}"#)).unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias);
        let err = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        assert!(err.to_string().contains("model_type"), "{err}");
        let err = parse(r#"{"model_type": "llama", "vocab_size": 10}"#).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }

    #[test]
    fn mistral_sliding_window_applies_to_every_layer() {
        let cfg = parse(&format!(
            r#"{{"model_type": "mistral", {BASE}, "sliding_window": 4}}"#
        ))
        .unwrap();
        assert_eq!(cfg.sliding_window, vec![Some(4), Some(4)]);
    }
}
