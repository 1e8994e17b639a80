//! Tokenizer and chat formatting: a Hugging Face `tokenizer.json` through the `tokenizers`
//! crate, the special tokens and chat template of `tokenizer_config.json`, and the encoding of
//! conversations into token ids with the mask of trained tokens.
//!
//! Trained tokens of a conversation (the convention of transformers' assistant masks and of
//! `testdata/REFERENCE.md`): each assistant message's content and the end-of-turn token that
//! closes it, never the role headers, the system/user turns or text after the end-of-turn token.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::template::{ChatTemplate, Message, named_template};

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    /// BOS token text, when the model has one.
    pub bos_token: Option<String>,
    /// EOS / end-of-turn token text.
    pub eos_token: Option<String>,
    /// Ids of all special added tokens.
    special_ids: HashSet<u32>,
    /// Id of the EOS token.
    pub eos_id: Option<u32>,
    /// Id of the padding token (EOS when the model has none).
    pub pad_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos_token)
            .field("eos", &self.eos_token)
            .finish()
    }
}

/// A token sequence and, per token, whether it is trained (1) or not (0).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 where the token is a training target, else 0 (same length as `ids`).
    pub mask: Vec<u8>,
}

impl Encoded {
    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.mask.iter().filter(|&&m| m == 1).count()
    }
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Reads `chat_template` from a `tokenizer_config.json` value (a string, or a list of named
/// templates of which `default` is taken).
fn template_from_config(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())?;
            pick.get("template")
                .and_then(Value::as_str)
                .map(str::to_string)
        }
        _ => None,
    }
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer with explicit special tokens and template source.
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        template: Option<&str>,
    ) -> Result<Self> {
        let special_ids: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let template = match template {
            Some(src) => Some(ChatTemplate::new(
                src,
                bos_token.as_deref().unwrap_or(""),
                eos_token.as_deref().unwrap_or(""),
            )?),
            None => None,
        };
        Ok(Tokenizer {
            pad_id: eos_id.unwrap_or(0),
            inner,
            template,
            bos_token,
            eos_token,
            special_ids,
            eos_id,
        })
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` (special tokens, `chat_template`, or
    /// `chat_template.jinja`) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::parse(&cfg_path, e))?
        } else {
            Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        let template = if jinja_path.exists() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else {
            template_from_config(&cfg)
        };
        let mut tok = Tokenizer::new(
            inner,
            token_text(cfg.get("bos_token")),
            token_text(cfg.get("eos_token")),
            template.as_deref(),
        )?;
        if let Some(pad) = token_text(cfg.get("pad_token")).and_then(|t| tok.inner.token_to_id(&t))
        {
            tok.pad_id = pad;
        }
        Ok(tok)
    }

    /// Replaces the chat template by a named fallback (`chatml`, `llama3`, `llama2`, `zephyr`)
    /// or by Jinja source.
    pub fn set_template(&mut self, name_or_source: &str) -> Result<()> {
        let src = named_template(name_or_source).unwrap_or(name_or_source);
        self.template = Some(ChatTemplate::new(
            src,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )?);
        Ok(())
    }

    /// The Jinja source of the chat template, if any.
    pub fn template_source(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source.as_str())
    }

    /// Whether a chat template is available.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// The template, or an error telling the user how to provide one.
    fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            Error::Template(
                "the model has no chat_template; pass --chat-template chatml|llama3|llama2|zephyr"
                    .into(),
            )
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// How `other`'s vocabulary differs from this one (`None`: the same tokens with the same
    /// ids), in words naming the first difference: models compared token for token
    /// (distillation's teacher and student) must share one.
    pub fn vocabulary_difference(&self, other: &Tokenizer) -> Option<String> {
        let (a, b) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        if a.len() != b.len() {
            return Some(format!("{} tokens against {}", b.len(), a.len()));
        }
        let mut mine: Vec<(&String, &u32)> = a.iter().collect();
        mine.sort_by_key(|(_, id)| **id);
        mine.into_iter().find_map(|(token, id)| match b.get(token) {
            Some(other_id) if other_id == id => None,
            Some(other_id) => Some(format!("token {token:?} is id {other_id}, not {id}")),
            None => Some(format!("it has no token {token:?} (id {id})")),
        })
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Encodes text without adding special tokens (chat templates carry their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Encodes text adding the tokenizer's own special tokens (e.g. Llama's BOS), as
    /// transformers does for plain text.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Encodes plain text for language modelling: every token trained, EOS appended.
    pub fn encode_text(&self, text: &str) -> Result<Encoded> {
        let mut ids = self.encode_with_special(text)?;
        if let Some(eos) = self.eos_id
            && ids.last() != Some(&eos)
        {
            ids.push(eos);
        }
        let mask = vec![1u8; ids.len()];
        Ok(Encoded { ids, mask })
    }

    /// Decodes ids, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Renders a conversation with the chat template.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template()?.render(messages, add_generation_prompt)
    }

    /// Encodes a conversation; trained tokens are each assistant message's content and the
    /// end-of-turn token that follows it.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Encoded> {
        self.encode_chat_from(messages, 0)
    }

    /// Like [`Tokenizer::encode_chat`], training only assistant messages at index
    /// `train_from` or later (conversational prompt/completion data).
    pub fn encode_chat_from(&self, messages: &[Message], train_from: usize) -> Result<Encoded> {
        let text = self.render(messages, false)?;
        // Byte spans of assistant contents in the rendered text, found in order.
        let mut spans = Vec::new();
        let mut cursor = 0;
        for (i, m) in messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
        {
            let (start, len) = find_content(&text, cursor, &m.content).ok_or_else(|| {
                Error::Template(format!(
                    "the rendered conversation does not contain the assistant message {:?}",
                    truncate(&m.content, 60)
                ))
            })?;
            if i >= train_from {
                spans.push((start, start + len));
            }
            cursor = start + len;
        }
        let enc = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        let offsets = enc.get_offsets();
        let mut mask = vec![0u8; ids.len()];
        let mut tok = 0;
        for &(s, e) in &spans {
            while tok < ids.len() && offsets[tok].1 <= s {
                tok += 1;
            }
            while tok < ids.len() && offsets[tok].0 < e {
                if offsets[tok].1 > s {
                    mask[tok] = 1;
                }
                tok += 1;
            }
            // The end-of-turn token: the first special token after the content, allowing only
            // whitespace in between.
            let mut j = tok;
            while j < ids.len() {
                if self.is_special(ids[j]) {
                    mask[j] = 1;
                    break;
                }
                let piece = &text[offsets[j].0.min(text.len())..offsets[j].1.min(text.len())];
                if !piece.trim().is_empty() {
                    break;
                }
                j += 1;
            }
        }
        Ok(Encoded { ids, mask })
    }

    /// Encodes `prompt` (not trained) followed by `completion` (trained) and the EOS token
    /// (trained), as TRL does for prompt/completion data.
    pub fn encode_prompt_completion(&self, prompt: &str, completion: &str) -> Result<Encoded> {
        let p = self.encode_with_special(prompt)?;
        let mut c = self.encode(completion)?;
        if let Some(eos) = self.eos_id
            && c.last() != Some(&eos)
        {
            c.push(eos);
        }
        let mut mask = vec![0u8; p.len()];
        mask.resize(p.len() + c.len(), 1);
        let mut ids = p;
        ids.extend(c);
        Ok(Encoded { ids, mask })
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Finds `content` in `text` at or after `from`: exactly, else trimmed (templates such as
/// Llama 3's `| trim` strip it). Returns `(start, len)` in bytes.
fn find_content(text: &str, from: usize, content: &str) -> Option<(usize, usize)> {
    let hay = text.get(from..)?;
    if content.is_empty() {
        return None;
    }
    if let Some(p) = hay.find(content) {
        return Some((from + p, content.len()));
    }
    let trimmed = content.trim();
    if trimmed.is_empty() {
        return None;
    }
    hay.find(trimmed).map(|p| (from + p, trimmed.len()))
}

/// A preference pair tokenised for DPO: prompt, chosen and rejected completion ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    /// Prompt ids (rendered with the generation prompt).
    pub prompt: Vec<u32>,
    /// Chosen completion ids, ending with the end-of-turn token.
    pub chosen: Vec<u32>,
    /// Rejected completion ids, ending with the end-of-turn token.
    pub rejected: Vec<u32>,
}

impl EncodedPair {
    /// `prompt + chosen` and `prompt + rejected` with the completions trained.
    pub fn sequences(&self) -> (Encoded, Encoded) {
        let seq = |c: &[u32]| {
            let mut ids = self.prompt.clone();
            ids.extend_from_slice(c);
            let mut mask = vec![0u8; self.prompt.len()];
            mask.resize(ids.len(), 1);
            Encoded { ids, mask }
        };
        (seq(&self.chosen), seq(&self.rejected))
    }
}

impl Tokenizer {
    /// Tokenises a completion for DPO: its text followed by the end-of-turn (EOS) token,
    /// without added special tokens.
    pub fn encode_completion(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let Some(eos) = self.eos_id
            && ids.last() != Some(&eos)
        {
            ids.push(eos);
        }
        Ok(ids)
    }
}
