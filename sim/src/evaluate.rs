//! Evaluation of a (global) adapter on the clients' held-out data: loss, and greedy
//! generations scored with GRPO's reward functions (`json_valid`, and `field_match` when the
//! answers are JSON objects).

use fedtune_engine::data::{Example, Prompt};
use fedtune_engine::eval::sft_loss;
use fedtune_engine::generate::{GenerationConfig, generate_groups};
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
    /// Whether the output is valid JSON (the `json_valid` reward).
    pub valid_json: bool,
    /// Fields of the reference with exactly the same value in the output.
    pub fields_correct: usize,
    /// Fields of the reference.
    pub fields_total: usize,
}

/// Scores of a set of generations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationScores {
    /// Share of outputs that are valid JSON (the `json_valid` reward's mean).
    pub json_validity: f64,
    /// Mean share of each reference's fields reproduced (the `field_match` reward's mean over
    /// the outputs whose reference is a JSON object).
    pub field_accuracy: f64,
    /// Outputs with a JSON-object reference (those `field_accuracy` averages over).
    pub with_fields: usize,
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

/// Scores `output` against `reference` with GRPO's reward functions: `json_valid` (the
/// output, without a Markdown code fence, parses as JSON) and, when the reference is a JSON
/// object, `field_match` (the share of its fields the output's object has equal). Returns
/// validity and the fields reproduced out of the reference's.
pub fn score(reference: &str, output: &str) -> (bool, usize, usize) {
    use fedtune_engine::rewards::{RewardFn, RewardInput};
    use serde_json::Value;
    let mut fields = serde_json::Map::new();
    let total = match serde_json::from_str::<Value>(reference.trim()) {
        Ok(Value::Object(o)) => {
            let n = o.len();
            fields.insert("reference".into(), Value::Object(o));
            n
        }
        _ => 0,
    };
    let input = [RewardInput {
        prompt: "",
        messages: None,
        completion: output,
        fields: &fields,
    }];
    // Neither function fails (only commands and reward models can).
    let first = |f: RewardFn| f.score(&input).map_or(0.0, |v| v[0]);
    let valid = first(RewardFn::JsonValid) >= 1.0;
    if total == 0 {
        return (valid, 0, 0);
    }
    let share = first(RewardFn::FieldMatch {
        field: "reference".into(),
    });
    (valid, (share * total as f32).round() as usize, total)
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
    let (mut valid, mut shares) = (0usize, 0f64);
    let mut asked = Vec::new();
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
        asked.push((ids, shown, reference));
    }
    let cfg = GenerationConfig {
        max_new_tokens,
        stop_ids: model.config.eos_token_ids.clone(),
        ..GenerationConfig::default()
    };
    // Greedy, every prompt in one batch (the seeds are not drawn from).
    let prompts: Vec<&[u32]> = asked.iter().map(|(ids, _, _)| &ids[..]).collect();
    let outputs = generate_groups(model, &prompts, &vec![0; prompts.len()], 1, &cfg);
    for ((_, shown, reference), mut new) in asked.into_iter().zip(outputs) {
        let new: Vec<u32> = new
            .pop()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| !cfg.stop_ids.contains(t))
            .collect();
        let text = tok.decode(&new, true)?;
        let (v, c, t) = score(&reference, &text);
        valid += v as usize;
        if t > 0 {
            shares += c as f64 / t as f64;
            out.with_fields += 1;
        }
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
    if out.with_fields > 0 {
        out.field_accuracy = shares / out.with_fields as f64;
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
        // The reward functions' rules: a fenced object counts, numbers compare as numbers.
        assert_eq!(
            score(r, "```json\n{\"age\": 54.0, \"sex\": \"F\"}\n```"),
            (true, 2, 3)
        );
    }
}
