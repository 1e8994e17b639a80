//! The dataset formats users bring, and their conversion to [`Example`]s.
//!
//! | format              | fields                                                        |
//! |---------------------|---------------------------------------------------------------|
//! | `alpaca`            | `instruction`, `input`?, `output`, `system`?, `history`?      |
//! | `dolly`             | `instruction`, `context`?, `response`                         |
//! | `instruction`       | `instruction`, `input`?, `response`                           |
//! | `sharegpt`          | `conversations` [{`from`, `value`}], `system`?                |
//! | `openai`            | `messages` [{`role`, `content`}]                              |
//! | `prompt-completion` | `prompt`, `completion` (strings or message lists)             |
//! | `text`              | `text`                                                        |
//! | `preference`        | `prompt`?, `chosen`, `rejected` (strings or message lists), or |
//! |                     | ShareGPT `conversations` + `chosen`/`rejected` {`from`,`value`}, |
//! |                     | or `instruction`/`input` + `chosen`/`rejected`                |

use serde_json::Value;

use crate::data::{Example, Prompt};
use crate::template::Message;

/// A dataset format, detected per record or forced with `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Stanford Alpaca.
    Alpaca,
    /// Databricks Dolly 15k.
    Dolly,
    /// instruction/input/response.
    Instruction,
    /// ShareGPT conversations.
    Sharegpt,
    /// OpenAI chat messages.
    Openai,
    /// TRL prompt/completion.
    PromptCompletion,
    /// Plain text (language modelling).
    Text,
    /// Preference pairs.
    Preference,
    /// Unpaired feedback (KTO): a prompt, one completion and a `label` (true: desirable).
    Feedback,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "alpaca" => Format::Alpaca,
            "dolly" => Format::Dolly,
            "instruction" | "instruction-response" => Format::Instruction,
            "sharegpt" => Format::Sharegpt,
            "openai" | "messages" => Format::Openai,
            "prompt-completion" | "prompt_completion" => Format::PromptCompletion,
            "text" => Format::Text,
            "preference" | "dpo" => Format::Preference,
            "feedback" | "kto" | "unpaired-preference" => Format::Feedback,
            other => {
                return Err(format!(
                    "unknown format `{other}` (alpaca, dolly, instruction, sharegpt, openai, \
                     prompt-completion, text, preference, feedback)"
                ));
            }
        })
    }
}

/// Guesses the format of one record from its fields.
pub fn detect(v: &Value) -> Option<Format> {
    let has = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
    if has("chosen") || has("rejected") {
        return Some(Format::Preference);
    }
    if has("label") && has("completion") {
        return Some(Format::Feedback);
    }
    if has("messages") {
        return Some(Format::Openai);
    }
    if has("conversations") {
        return Some(Format::Sharegpt);
    }
    if has("instruction") {
        return Some(if has("response") {
            if has("context") {
                Format::Dolly
            } else {
                Format::Instruction
            }
        } else {
            Format::Alpaca
        });
    }
    if has("prompt") || has("completion") {
        return Some(Format::PromptCompletion);
    }
    if has("text") {
        return Some(Format::Text);
    }
    None
}

type Conv<T> = Result<T, String>;

fn string_field(v: &Value, field: &str) -> Conv<String> {
    match v.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Null) | None => Err(format!("field `{field}`: missing")),
        Some(other) => Err(format!(
            "field `{field}`: expected a string, found {}",
            kind(other)
        )),
    }
}

fn opt_string(v: &Value, field: &str) -> Conv<Option<String>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string_field(v, field).map(Some),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Text of a message `content`: a string, or OpenAI content parts `[{type: text, text}]`.
fn content_text(c: &Value, field: &str) -> Conv<String> {
    match c {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                match p.get("text").and_then(Value::as_str) {
                    Some(t) => out.push_str(t),
                    None => {
                        return Err(format!("field `{field}[{i}]`: a content part without text"));
                    }
                }
            }
            Ok(out)
        }
        other => Err(format!(
            "field `{field}`: expected a string, found {}",
            kind(other)
        )),
    }
}

fn normalise_role(role: &str) -> Option<&'static str> {
    match role {
        "system" => Some("system"),
        "user" | "human" => Some("user"),
        "assistant" | "gpt" | "model" | "bot" => Some("assistant"),
        _ => None,
    }
}

/// Parses a list of messages with either `role`/`content` or `from`/`value` keys.
fn message_list(v: &Value, field: &str) -> Conv<Vec<Message>> {
    let list = match v {
        Value::Array(l) => l,
        other => {
            return Err(format!(
                "field `{field}`: expected a list of messages, found {}",
                kind(other)
            ));
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| message(m, &format!("{field}[{i}]")))
        .collect()
}

fn message(m: &Value, field: &str) -> Conv<Message> {
    let (role_key, content_key) = if m.get("from").is_some() {
        ("from", "value")
    } else {
        ("role", "content")
    };
    let role = m
        .get(role_key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("field `{field}.{role_key}`: missing or not a string"))?;
    let role = normalise_role(role).ok_or_else(|| {
        format!(
            "field `{field}.{role_key}`: unknown role `{role}` (system, user/human, assistant/gpt)"
        )
    })?;
    let content = m
        .get(content_key)
        .ok_or_else(|| format!("field `{field}.{content_key}`: missing"))?;
    Ok(Message::new(
        role,
        content_text(content, &format!("{field}.{content_key}"))?,
    ))
}

fn check_chat(messages: &[Message], field: &str) -> Conv<()> {
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(format!("field `{field}`: no assistant message to train on"));
    }
    if let Some(i) = messages
        .iter()
        .position(|m| m.role == "assistant" && m.content.trim().is_empty())
    {
        return Err(format!("field `{field}[{i}]`: empty assistant message"));
    }
    Ok(())
}

fn user_turn(instruction: String, extra: Option<String>) -> String {
    match extra {
        Some(e) if !e.trim().is_empty() => format!("{instruction}\n{e}"),
        _ => instruction,
    }
}

/// Alpaca `history`: a list of `[user, assistant]` pairs.
fn history(v: &Value) -> Conv<Vec<Message>> {
    let Some(h) = v.get("history").filter(|h| !h.is_null()) else {
        return Ok(Vec::new());
    };
    let pairs = h
        .as_array()
        .ok_or_else(|| "field `history`: expected a list of [user, assistant] pairs".to_string())?;
    let mut out = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        match p.as_array().map(Vec::as_slice) {
            Some([Value::String(u), Value::String(a)]) => {
                out.push(Message::new("user", u.clone()));
                out.push(Message::new("assistant", a.clone()));
            }
            _ => {
                return Err(format!(
                    "field `history[{i}]`: expected [user, assistant] strings"
                ));
            }
        }
    }
    Ok(out)
}

fn with_system(v: &Value, mut messages: Vec<Message>) -> Conv<Vec<Message>> {
    if let Some(s) = opt_string(v, "system")?
        && !s.is_empty()
        && messages.first().is_none_or(|m| m.role != "system")
    {
        messages.insert(0, Message::new("system", s));
    }
    Ok(messages)
}

/// A prompt that is either raw text or messages.
fn prompt_value(v: &Value, field: &str) -> Conv<Prompt> {
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(_) => Ok(Prompt::Chat(message_list(v, field)?)),
        other => Err(format!(
            "field `{field}`: expected a string or a list of messages, found {}",
            kind(other)
        )),
    }
}

/// A completion given as a string, one message, or a message list ending with the assistant's
/// answer. Returns the prefix messages (for implicit-prompt pairs) and the answer text.
fn completion_value(v: &Value, field: &str) -> Conv<(Vec<Message>, String)> {
    match v {
        Value::String(s) => Ok((Vec::new(), s.clone())),
        Value::Object(_) => {
            let m = message(v, field)?;
            Ok((Vec::new(), m.content))
        }
        Value::Array(_) => {
            let mut msgs = message_list(v, field)?;
            match msgs.pop() {
                Some(last) if last.role == "assistant" => Ok((msgs, last.content)),
                _ => Err(format!(
                    "field `{field}`: the last message must be the assistant's answer"
                )),
            }
        }
        other => Err(format!(
            "field `{field}`: expected a string or messages, found {}",
            kind(other)
        )),
    }
}

fn preference(v: &Value) -> Conv<Example> {
    let (chosen_prefix, chosen) =
        completion_value(v.get("chosen").ok_or("field `chosen`: missing")?, "chosen")?;
    let (rejected_prefix, rejected) = completion_value(
        v.get("rejected").ok_or("field `rejected`: missing")?,
        "rejected",
    )?;
    let prompt = if let Some(p) = v.get("prompt").filter(|p| !p.is_null()) {
        prompt_value(p, "prompt")?
    } else if let Some(c) = v.get("conversations").filter(|c| !c.is_null()) {
        Prompt::Chat(with_system(v, message_list(c, "conversations")?)?)
    } else if v.get("instruction").is_some() {
        let msgs = vec![Message::new(
            "user",
            user_turn(string_field(v, "instruction")?, opt_string(v, "input")?),
        )];
        Prompt::Chat(with_system(v, msgs)?)
    } else if !chosen_prefix.is_empty() {
        // Implicit prompt: chosen and rejected are whole conversations sharing a prefix.
        if chosen_prefix != rejected_prefix {
            return Err(
                "fields `chosen`/`rejected`: without a `prompt`, both conversations must \
                        share everything but the final answer"
                    .into(),
            );
        }
        Prompt::Chat(chosen_prefix)
    } else {
        return Err("field `prompt`: missing (and chosen/rejected are not conversations)".into());
    };
    if chosen.trim().is_empty() {
        return Err("field `chosen`: empty".into());
    }
    if rejected.trim().is_empty() {
        return Err("field `rejected`: empty".into());
    }
    Ok(Example::Preference {
        prompt,
        chosen,
        rejected,
    })
}

/// Converts one record in `format` to an [`Example`]; the error names the field at fault.
pub fn convert(v: &Value, format: Format) -> Conv<Example> {
    if !v.is_object() {
        return Err(format!("expected a JSON object, found {}", kind(v)));
    }
    match format {
        Format::Alpaca | Format::Dolly | Format::Instruction => {
            let instruction = string_field(v, "instruction")?;
            let (extra_field, answer_field) = match format {
                Format::Alpaca => ("input", "output"),
                Format::Dolly => ("context", "response"),
                _ => ("input", "response"),
            };
            let mut msgs = history(v)?;
            msgs.push(Message::new(
                "user",
                user_turn(instruction, opt_string(v, extra_field)?),
            ));
            msgs.push(Message::new("assistant", string_field(v, answer_field)?));
            let msgs = with_system(v, msgs)?;
            check_chat(&msgs, answer_field)?;
            Ok(Example::Chat {
                messages: msgs,
                train_from: 0,
            })
        }
        Format::Sharegpt => {
            let msgs = message_list(
                v.get("conversations")
                    .ok_or("field `conversations`: missing")?,
                "conversations",
            )?;
            let msgs = with_system(v, msgs)?;
            check_chat(&msgs, "conversations")?;
            Ok(Example::Chat {
                messages: msgs,
                train_from: 0,
            })
        }
        Format::Openai => {
            let msgs = message_list(
                v.get("messages").ok_or("field `messages`: missing")?,
                "messages",
            )?;
            check_chat(&msgs, "messages")?;
            Ok(Example::Chat {
                messages: msgs,
                train_from: 0,
            })
        }
        Format::PromptCompletion => {
            let prompt = prompt_value(v.get("prompt").ok_or("field `prompt`: missing")?, "prompt")?;
            let completion = v.get("completion").ok_or("field `completion`: missing")?;
            match (prompt, completion) {
                (Prompt::Text(p), Value::String(c)) => {
                    if c.is_empty() {
                        return Err("field `completion`: empty".into());
                    }
                    Ok(Example::PromptCompletion {
                        prompt: p,
                        completion: c.clone(),
                    })
                }
                (Prompt::Chat(mut p), c) => {
                    let train_from = p.len();
                    let completion = match c {
                        Value::String(s) => vec![Message::new("assistant", s.clone())],
                        other => message_list(other, "completion")?,
                    };
                    p.extend(completion);
                    check_chat(&p[train_from..], "completion")?;
                    Ok(Example::Chat {
                        messages: p,
                        train_from,
                    })
                }
                (Prompt::Text(_), other) => Err(format!(
                    "field `completion`: expected a string for a text prompt, found {}",
                    kind(other)
                )),
            }
        }
        Format::Text => {
            let text = string_field(v, "text")?;
            if text.is_empty() {
                return Err("field `text`: empty".into());
            }
            Ok(Example::Text { text })
        }
        Format::Preference => preference(v),
        Format::Feedback => feedback(v),
    }
}

/// TRL's unpaired preference format: `prompt` (text or messages), `completion` (text, one
/// message or messages ending with the assistant's answer) and a boolean `label`.
fn feedback(v: &Value) -> Conv<Example> {
    let prompt = prompt_value(v.get("prompt").ok_or("field `prompt`: missing")?, "prompt")?;
    let (prefix, completion) = completion_value(
        v.get("completion").ok_or("field `completion`: missing")?,
        "completion",
    )?;
    if !prefix.is_empty() {
        return Err("field `completion`: the prompt's messages belong in `prompt`".into());
    }
    if completion.trim().is_empty() {
        return Err("field `completion`: empty".into());
    }
    let label = match v.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "field `label`: expected true or false, found {}",
                kind(other)
            ));
        }
        None => return Err("field `label`: missing".into()),
    };
    Ok(Example::Feedback {
        prompt,
        completion,
        label,
    })
}
