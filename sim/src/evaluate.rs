//! Evaluation of a (global) adapter on the clients' held-out data: loss, and for tasks whose
//! answers are JSON objects, greedy generations scored for JSON validity and exact field
//! accuracy.

use fedtune_engine::data::{Example, Prompt};
use fedtune_engine::eval::sft_loss;
use fedtune_engine::generate::{GenerationConfig, generate};
use fedtune_engine::{Encoded, LlamaModel, Message, Tokenizer};
use serde::Serialize;

/// Mean held-out loss of `model` on `eval` (NaN when empty), and the token count.
pub fn held_out_loss(model: &LlamaModel, eval: &[Encoded], pad: u32) -> (f64, usize) {
    if eval.is_empty() {
        return (f64::NAN, 0);
    }
    let s = sft_loss(model, eval, 8, pad);
    (s.mean(), s.tokens)
}

/// One scored generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The last user message (or prompt).
    pub prompt: String,
    /// The reference answer.
    pub reference: String,
    /// What the model wrote.
    pub output: String,
    /// Whether the output parses as a JSON object.
    pub valid_json: bool,
    /// Fields of the reference with exactly the same value in the output.
    pub fields_correct: usize,
    /// Fields of the reference.
    pub fields_total: usize,
}

/// Scores of a set of generations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationScores {
    /// Share of outputs that parse as JSON objects.
    pub json_validity: f64,
    /// Share of reference fields reproduced exactly.
    pub field_accuracy: f64,
    /// The generations.
    pub samples: Vec<Generation>,
}

/// The prompt messages and the reference answer of a held-out chat or prompt/completion
/// example (`None` for other kinds).
pub fn prompt_and_reference(ex: &Example) -> Option<(Prompt, String)> {
    match ex {
        Example::Chat { messages, .. } => {
            let last = messages.iter().rposition(|m| m.role == "assistant")?;
            Some((
                Prompt::Chat(messages[..last].to_vec()),
                messages[last].content.clone(),
            ))
        }
        Example::PromptCompletion { prompt, completion } => {
            Some((Prompt::Text(prompt.clone()), completion.clone()))
        }
        _ => None,
    }
}

/// The first JSON object in `text` (models sometimes wrap it in prose or code fences).
fn parse_object(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let t = text.trim();
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(t) {
        return Some(o);
    }
    None
}

/// Scores `output` against `reference` (a JSON object; strict parsing of the whole output).
pub fn score(reference: &str, output: &str) -> (bool, usize, usize) {
    let Some(want) = parse_object(reference) else {
        return (parse_object(output).is_some(), 0, 0);
    };
    match parse_object(output) {
        None => (false, 0, want.len()),
        Some(got) => {
            let correct = want.iter().filter(|(k, v)| got.get(*k) == Some(v)).count();
            (true, correct, want.len())
        }
    }
}

/// Greedy generations for `examples` (at most `limit`), scored.
pub fn generations(
    model: &LlamaModel,
    tok: &Tokenizer,
    examples: &[Example],
    limit: usize,
    max_new_tokens: usize,
) -> fedtune_engine::Result<GenerationScores> {
    let mut out = GenerationScores::default();
    let (mut valid, mut correct, mut total) = (0usize, 0usize, 0usize);
    for ex in examples.iter().take(limit) {
        let Some((prompt, reference)) = prompt_and_reference(ex) else {
            continue;
        };
        let (ids, shown) = match &prompt {
            Prompt::Chat(msgs) => (
                tok.encode(&tok.render(msgs, true)?)?,
                msgs.last()
                    .map(|m: &Message| m.content.clone())
                    .unwrap_or_default(),
            ),
            Prompt::Text(p) => (tok.encode_with_special(p)?, p.clone()),
        };
        let cfg = GenerationConfig {
            max_new_tokens,
            stop_ids: model.config.eos_token_ids.clone(),
            ..GenerationConfig::default()
        };
        let new = generate(model, &ids, &cfg, |_| {});
        let new: Vec<u32> = new
            .into_iter()
            .filter(|t| !cfg.stop_ids.contains(t))
            .collect();
        let text = tok.decode(&new, true)?;
        let (v, c, t) = score(&reference, &text);
        valid += v as usize;
        correct += c;
        total += t;
        out.samples.push(Generation {
            prompt: shown,
            reference,
            output: text,
            valid_json: v,
            fields_correct: c,
            fields_total: t,
        });
    }
    if !out.samples.is_empty() {
        out.json_validity = valid as f64 / out.samples.len() as f64;
    }
    if total > 0 {
        out.field_accuracy = correct as f64 / total as f64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_counts_exact_fields_and_strict_json() {
        let r = r#"{"age": 54, "sex": "F", "dx": "asthma"}"#;
        assert_eq!(
            score(r, r#"{"age": 54, "sex": "F", "dx": "asthma"}"#),
            (true, 3, 3)
        );
        assert_eq!(score(r, r#"{"age": 45, "sex": "F"}"#), (true, 1, 3));
        assert_eq!(score(r, r#"Sure! {"age": 54}"#), (false, 0, 3));
        assert_eq!(score(r, "{\"age\": 54,"), (false, 0, 3));
        assert_eq!(score("plain text", "{}"), (true, 0, 0));
    }
}
