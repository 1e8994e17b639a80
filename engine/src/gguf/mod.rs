//! GGUF files (llama.cpp, Ollama): the header and metadata, tensors dequantised at load under
//! their Hugging Face names, the model configuration from metadata, and a tokenizer built from
//! the embedded vocabulary ([`tokenizer`]).
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` of `llama` models for its
//! interleaved RoPE; [`GgufSource`] undoes it so that the tensors equal the Hugging Face ones.
//! Every length read from the file is checked against the file size before it is used.

pub mod quant;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use memmap2::Mmap;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::weights::TensorSource;
use quant::GgmlType;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any integer type.
    Int(i64),
    /// `u64` values that do not fit `i64`.
    UInt(u64),
    /// f32 or f64.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// As an unsigned integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(v) if *v >= 0 => Some(*v as u64),
            MetaValue::UInt(v) => Some(*v),
            _ => None,
        }
    }

    /// As a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(v) => Some(*v),
            MetaValue::Int(v) => Some(*v as f64),
            MetaValue::UInt(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// As an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// GGUF dims, innermost first (`ne[0]` = columns).
    pub dims: Vec<usize>,
    /// GGML type id.
    pub type_id: u32,
    /// Absolute byte offset of the data.
    pub offset: usize,
}

impl TensorInfo {
    /// Shape in row-major (PyTorch) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors by GGUF name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Gguf {
            path: self.path.to_path_buf(),
            message: format!("at byte {}: {msg}", self.pos),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err(format!("truncated (needs {n} more bytes)")))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count that must fit in the rest of the file at `min_size` bytes per item.
    fn count(&mut self, min_size: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > left {
            return Err(self.err(format!("count {n} exceeds the file size")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::Int(self.take(1)?[0] as i64),
            1 => MetaValue::Int(self.take(1)?[0] as i8 as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => MetaValue::Int(self.u32()? as i64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.take(4)?.try_into().expect("4")) as f64),
            7 => MetaValue::Bool(self.take(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let item = self.u32()?;
                let n = self.count(1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => {
                let v = self.u64()?;
                i64::try_from(v).map_or(MetaValue::UInt(v), MetaValue::Int)
            }
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            other => return Err(self.err(format!("unknown metadata type {other}"))),
        })
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Parses the header, metadata and tensor table of `path` (the data stays mapped).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; every offset is bounds-checked before use.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(c.err("not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!(
                "GGUF version {version} is not supported (2, 3 are)"
            )));
        }
        let n_tensors = c.count(24)?;
        let n_kv = c.count(12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(c.err(format!("tensor `{name}` has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                let d = c.u64()?;
                dims.push(usize::try_from(d).map_err(|_| c.err("dimension overflows"))?);
            }
            let type_id = c.u32()?;
            let offset = c.u64()? as usize;
            infos.push((name, dims, type_id, offset));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(c.err(format!("alignment {align} is not a power of two")));
        }
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for (name, dims, type_id, rel) in infos {
            let offset = data_start
                .checked_add(rel)
                .ok_or_else(|| c.err(format!("tensor `{name}`: offset overflows")))?;
            let n = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| c.err(format!("tensor `{name}`: size overflows")))?;
            if let Some(ty) = GgmlType::from_id(type_id) {
                let bytes = ty.bytes_for(n).ok_or_else(|| {
                    c.err(format!("tensor `{name}`: {n} elements is not whole blocks"))
                })?;
                if offset.checked_add(bytes).is_none_or(|e| e > mmap.len()) {
                    return Err(c.err(format!("tensor `{name}` extends past the end of the file")));
                }
            }
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    type_id,
                    offset,
                },
            );
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        self.metadata
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::Gguf {
                path: self.path.clone(),
                message: "metadata `general.architecture` missing".into(),
            })
    }

    fn meta_err(&self, key: &str, msg: &str) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            message: format!("metadata `{key}`: {msg}"),
        }
    }

    fn arch_u64(&self, arch: &str, key: &str) -> Option<u64> {
        self.metadata
            .get(&format!("{arch}.{key}"))
            .and_then(MetaValue::as_u64)
    }

    fn arch_f64(&self, arch: &str, key: &str) -> Option<f64> {
        self.metadata
            .get(&format!("{arch}.{key}"))
            .and_then(MetaValue::as_f64)
    }

    /// Dequantises a tensor by its GGUF name into row-major f32.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensors.get(name).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            message: format!("tensor `{name}` missing"),
        })?;
        let ty = GgmlType::from_id(info.type_id).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            message: format!(
                "tensor `{name}`: {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K are)",
                GgmlType::name_of(info.type_id)
            ),
        })?;
        let n: usize = info.dims.iter().product();
        let bytes = ty.bytes_for(n).expect("checked at open");
        let mut out = vec![0f32; n];
        quant::dequantize(ty, &self.mmap[info.offset..info.offset + bytes], &mut out);
        Ok((info.shape(), out))
    }

    /// The model configuration from `{arch}.*` metadata.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let architecture = match arch.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(self.meta_err(
                    "general.architecture",
                    &format!("`{other}` is not supported (llama, mistral, qwen2 are)"),
                ));
            }
        };
        let req = |key: &str| {
            self.arch_u64(&arch, key)
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| self.meta_err(&format!("{arch}.{key}"), "missing"))
        };
        let hidden = req("embedding_length")?;
        let heads = req("attention.head_count")?;
        let kv_heads = self
            .arch_u64(&arch, "attention.head_count_kv")
            .map_or(heads, |v| v as usize);
        let head_dim = self
            .arch_u64(&arch, "attention.key_length")
            .map_or(hidden / heads, |v| v as usize);
        let layers = req("block_count")?;
        let vocab = match self.arch_u64(&arch, "vocab_size") {
            Some(v) => v as usize,
            None => self
                .tensors
                .get("token_embd.weight")
                .map(|t| t.dims[1])
                .ok_or_else(|| self.meta_err(&format!("{arch}.vocab_size"), "missing"))?,
        };
        let rope_scaling = match self
            .metadata
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(MetaValue::as_str)
        {
            Some("linear") => RopeScaling::Linear {
                factor: self.arch_f64(&arch, "rope.scaling.factor").unwrap_or(1.0),
            },
            Some("none") | None => RopeScaling::None,
            Some(other) => {
                return Err(self.meta_err(
                    &format!("{arch}.rope.scaling.type"),
                    &format!("`{other}` is not supported"),
                ));
            }
        };
        let window = self
            .arch_u64(&arch, "attention.sliding_window")
            .map(|w| w as usize);
        let bos = self
            .metadata
            .get("tokenizer.ggml.bos_token_id")
            .and_then(MetaValue::as_u64)
            .map(|v| v as u32);
        let eos = self
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(MetaValue::as_u64)
            .map(|v| v as u32);
        let rope_freq_factors = if self.tensors.contains_key("rope_freqs.weight") {
            Some(self.dequantize("rope_freqs.weight")?.1)
        } else {
            None
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self
                .arch_f64(&arch, "attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: self.arch_f64(&arch, "rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            rope_freq_factors,
            qkv_bias: self.tensors.contains_key("blk.0.attn_q.bias"),
            o_bias: self.tensors.contains_key("blk.0.attn_output.bias"),
            mlp_bias: self.tensors.contains_key("blk.0.ffn_up.bias"),
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            sliding_window: vec![
                if architecture == Architecture::Llama {
                    None
                } else {
                    window
                };
                layers
            ],
            max_position_embeddings: self
                .arch_u64(&arch, "context_length")
                .map_or(4096, |v| v as usize),
            bos_token_id: bos,
            eos_token_ids: eos.into_iter().collect(),
        })
    }
}

/// GGUF tensor name → Hugging Face name.
pub fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's `permute` of q/k rows: within each head, GGUF row `2i + j` is Hugging Face
/// row `j·(d/2) + i`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A GGUF file as a [`TensorSource`] with Hugging Face names.
pub struct GgufSource {
    file: GgufFile,
    /// HF name → GGUF name.
    names: BTreeMap<String, String>,
    /// Heads for un-permuting q and k (`llama` architecture only).
    permute: Option<(usize, usize)>,
}

impl GgufSource {
    /// Wraps a parsed file.
    pub fn new(file: GgufFile) -> Result<Self> {
        let cfg = file.model_config()?;
        let permute = (file.architecture()? == "llama")
            .then_some((cfg.num_attention_heads, cfg.num_key_value_heads));
        let names = file
            .tensors
            .keys()
            .filter_map(|g| hf_name(g).map(|h| (h, g.clone())))
            .collect();
        Ok(GgufSource {
            file,
            names,
            permute,
        })
    }

    /// The parsed file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn load(&self, name: &str) -> Result<Option<TensorData>> {
        let Some(g) = self.names.get(name) else {
            return Ok(None);
        };
        let (shape, mut data) = self.file.dequantize(g)?;
        if let Some((heads, kv_heads)) = self.permute {
            let h = if name.ends_with("self_attn.q_proj.weight") {
                Some(heads)
            } else if name.ends_with("self_attn.k_proj.weight") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(h) = h {
                let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
                if rows % (2 * h) != 0 {
                    return Err(Error::tensor(
                        self.path(),
                        g,
                        "rows are not a multiple of 2·heads",
                    ));
                }
                data = unpermute_rows(&data, rows, cols, h);
            }
        }
        Ok(Some(TensorData::new(data, shape).convert_dtype(DType::F32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, d/2, cols).swapaxes(1, 2).reshape(...)
        let (heads, d, cols) = (2, 4, 3);
        let rows = heads * d;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + j * (d / 2) + i;
                    let dst = h * d + i * 2 + j;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, cols, heads), hf);
    }

    #[test]
    fn names_map_to_hugging_face_keys() {
        assert_eq!(
            hf_name("blk.3.attn_output.weight").unwrap(),
            "model.layers.3.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
