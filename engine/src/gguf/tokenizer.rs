//! Builds a `tokenizers` tokenizer from a GGUF file's embedded vocabulary, written as the
//! `tokenizer.json` document transformers' own GGUF converter would produce:
//!
//! - `tokenizer.ggml.model = gpt2`: byte-level BPE from `tokens` and `merges`, with the
//!   pre-tokenizer named by `tokenizer.ggml.pre` (`smollm`/`starcoder`, `gpt-2`, `llama-bpe`,
//!   `qwen2`);
//! - `tokenizer.ggml.model = llama`: SentencePiece BPE with byte fallback, merges recovered from
//!   the piece scores (as transformers' `SentencePieceExtractor` does).
//!
//! Control tokens (type 3) become special added tokens; user-defined tokens (type 4) become
//! added tokens.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{GgufFile, MetaValue};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

impl GgufFile {
    fn strings(&self, key: &str) -> Option<Vec<String>> {
        self.metadata.get(key)?.as_array().map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
    }

    fn tok_err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            message: format!("tokenizer: {msg}"),
        }
    }

    /// Builds the tokenizer, its special tokens and the chat template from metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.tok_err("`tokenizer.ggml.model` missing"))?;
        let tokens = self
            .strings("tokenizer.ggml.tokens")
            .ok_or_else(|| self.tok_err("`tokenizer.ggml.tokens` missing"))?;
        let types: Vec<i64> = self
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
            .map(|a| {
                a.iter()
                    .map(|v| v.as_u64().map_or(1, |v| v as i64))
                    .collect()
            })
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let id_of = |key: &str| self.token_id(key, tokens.len());
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let add_bos = self
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .map(|v| matches!(v, MetaValue::Bool(true)))
            .unwrap_or(model == "llama");
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let mut doc = match model {
            "gpt2" => self.gpt2_model(vocab)?,
            "llama" => self.llama_model(vocab, &tokens, &types),
            other => {
                return Err(self.tok_err(format!(
                    "tokenizer model `{other}` is not supported (gpt2, llama are)"
                )));
            }
        };
        doc["version"] = json!("1.0");
        doc["truncation"] = Value::Null;
        doc["padding"] = Value::Null;
        doc["added_tokens"] = Value::Array(added);
        doc["post_processor"] = match (add_bos, bos) {
            (true, Some(b)) => bos_processor(&tokens[b], b),
            _ => Value::Null,
        };
        let text = serde_json::to_string(&doc).map_err(|e| self.tok_err(e))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| self.tok_err(e))?;
        let template = self
            .metadata
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str);
        let mut tok = Tokenizer::new(
            inner,
            bos.map(|b| tokens[b].clone()),
            eos.map(|e| tokens[e].clone()),
            template,
        )?;
        if let Some(p) = id_of("tokenizer.ggml.padding_token_id") {
            tok.pad_id = p as u32;
        }
        Ok(tok)
    }

    /// The id under `key`, when it names one of the `n` tokens.
    fn token_id(&self, key: &str, n: usize) -> Option<usize> {
        self.metadata
            .get(key)
            .and_then(MetaValue::as_u64)
            .map(|v| v as usize)
            .filter(|&v| v < n)
    }

    /// The byte-level BPE part of a `gpt2` tokenizer (merges, and the pre-tokenizer its
    /// `tokenizer.ggml.pre` names).
    fn gpt2_model(&self, vocab: serde_json::Map<String, Value>) -> Result<Value> {
        let merges: Vec<Value> = self
            .strings("tokenizer.ggml.merges")
            .ok_or_else(|| self.tok_err("`tokenizer.ggml.merges` missing"))?
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                json!([a, b])
            })
            .collect();
        let pre = self
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");
        let (pre_tok, ignore_merges) = match pre {
            "smollm" | "starcoder" | "refact" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "gpt-2" | "gpt2" | "default" => (byte_level(true), false),
            "llama-bpe" | "llama3" | "smaug-bpe" => (
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
                true,
            ),
            "qwen2" => (
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
                false,
            ),
            other => {
                return Err(self.tok_err(format!(
                    "pre-tokenizer `{other}` is not supported (smollm, starcoder, gpt-2, \
                     llama-bpe, qwen2 are); put the model's tokenizer.json beside the GGUF file"
                )));
            }
        };
        Ok(json!({
            "normalizer": null,
            "pre_tokenizer": pre_tok,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                      "vocab": vocab, "merges": merges},
        }))
    }

    /// The SentencePiece-as-BPE part of a `llama` tokenizer (merges recovered from the
    /// pieces' scores, byte fallback, the `▁` space prefix).
    fn llama_model(
        &self,
        vocab: serde_json::Map<String, Value>,
        tokens: &[String],
        types: &[i64],
    ) -> Value {
        let scores: Vec<f64> = self
            .metadata
            .get("tokenizer.ggml.scores")
            .and_then(MetaValue::as_array)
            .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
            .unwrap_or_else(|| vec![0.0; tokens.len()]);
        let merges = spm_merges(tokens, &scores, types);
        let unk = self
            .token_id("tokenizer.ggml.unknown_token_id", tokens.len())
            .map(|i| tokens[i].clone());
        let prefix = self
            .metadata
            .get("tokenizer.ggml.add_space_prefix")
            .map(|v| matches!(v, MetaValue::Bool(true)))
            .unwrap_or(true);
        let mut norms = Vec::new();
        if prefix {
            norms.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        norms.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        json!({
            "normalizer": {"type": "Sequence", "normalizers": norms},
            "pre_tokenizer": null,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        })
    }
}

/// The post-processor that puts the BOS token `t` (id `b`) before every sequence.
fn bos_processor(t: &str, b: usize) -> Value {
    json!({"type": "TemplateProcessing",
           "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
           "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
           "special_tokens": {t: {"id": t, "ids": [b], "tokens": [t]}}})
}

/// Recovers BPE merges from SentencePiece pieces: every split of a piece into two pieces is a
/// merge, ranked by the merged piece's score (higher first), then by id.
fn spm_merges(tokens: &[String], scores: &[f64], types: &[i64]) -> Vec<Value> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i).copied().unwrap_or(1) == 1)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (&piece, &id) in &index {
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), ia, ib, a, b));
                let _ = id;
            }
        }
    }
    merges.sort_by(|x, y| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
    });
    merges.into_iter().map(|m| json!([m.3, m.4])).collect()
}
