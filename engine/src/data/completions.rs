//! Prompt/completion pairs for distillation, tokenised as TRL's `DataCollatorForChatML`
//! (the collator of `GKDTrainer`) does it: a conversation's last message is the completion
//! and the messages before it, rendered with the generation prompt, are the prompt; the
//! completion's tokens are where the whole conversation's tokens go on from the prompt's.

use super::{Dataset, Example, Prompt, encode_prompt_completion_split};
use crate::error::{Error, Result};
use crate::tokenizer::{Encoded, Tokenizer};

/// A prompt and its completion, as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedCompletion {
    /// Prompt ids (what a model continues when it generates the completion itself).
    pub prompt: Vec<u32>,
    /// Completion ids (with the end of turn).
    pub completion: Vec<u32>,
}

impl EncodedCompletion {
    /// `prompt + completion`, the completion trained.
    pub fn sequence(&self) -> Encoded {
        self.sequence_with(&self.completion)
    }

    /// `prompt + completion` for another completion of the same prompt (one a model
    /// generated), that completion trained.
    pub fn sequence_with(&self, completion: &[u32]) -> Encoded {
        let mut ids = self.prompt.clone();
        ids.extend_from_slice(completion);
        let mut mask = vec![0u8; self.prompt.len()];
        mask.resize(ids.len(), 1);
        Encoded { ids, mask }
    }
}

impl Dataset {
    /// Tokenises every example as a prompt and a completion: a conversation (ending with an
    /// assistant message), a prompt/completion pair, a preference pair (its chosen answer) or
    /// unpaired feedback (its completion, whatever its label). Longer than `max_len` tokens,
    /// the prompt loses its oldest tokens (TRL's collator keeps the last `max_len`); examples
    /// whose completion alone fills `max_len` are dropped, and counted.
    pub fn encode_completions(
        &self,
        tok: &Tokenizer,
        max_len: usize,
    ) -> Result<(Vec<EncodedCompletion>, usize)> {
        let mut out = Vec::with_capacity(self.examples.len());
        let mut dropped = 0;
        for (line, ex) in &self.examples {
            let (prompt, completion) = match ex {
                Example::Chat { messages, .. } => match messages.split_last() {
                    Some((last, before)) if last.role == "assistant" && !before.is_empty() => {
                        (Prompt::Chat(before.to_vec()), last.content.as_str())
                    }
                    _ => {
                        return Err(self.data_error(
                            *line,
                            Error::Invalid(
                                "distillation needs a prompt and a completion: the conversation \
                                 must end with an assistant message after at least one other"
                                    .into(),
                            ),
                        ));
                    }
                },
                Example::PromptCompletion { prompt, completion } => {
                    (Prompt::Text(prompt.clone()), completion.as_str())
                }
                Example::Preference { prompt, chosen, .. } => (prompt.clone(), chosen.as_str()),
                Example::Feedback {
                    prompt, completion, ..
                } => (prompt.clone(), completion.as_str()),
                Example::Text { .. } => {
                    return Err(self.data_error(
                        *line,
                        Error::Invalid(
                            "plain text has no prompt to distil on: give messages, \
                             prompt/completion or instruction/output records"
                                .into(),
                        ),
                    ));
                }
            };
            let (mut p, c) = encode_prompt_completion_split(&prompt, completion, tok)
                .map_err(|e| self.data_error(*line, e))?;
            let total = p.len() + c.len();
            if c.is_empty() || c.len() >= max_len {
                dropped += 1;
                continue;
            }
            if total > max_len {
                p.drain(..total - max_len);
            }
            out.push(EncodedCompletion {
                prompt: p,
                completion: c,
            });
        }
        Ok((out, dropped))
    }
}
