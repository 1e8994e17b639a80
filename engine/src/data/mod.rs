//! Datasets: one loader for the common formats (see [`formats`]), detected per record or
//! forced, from JSONL, JSON arrays and CSV; and their tokenisation for SFT and DPO.
//!
//! Invalid records are errors naming `file:line` and the field; with `skip_invalid` they are
//! reported in [`Dataset::skipped`] and left out.

mod completions;
pub mod formats;
pub mod read;

pub use completions::EncodedCompletion;

use std::path::{Path, PathBuf};

pub use formats::Format;

use crate::error::{Error, Result};
use crate::template::Message;
use crate::tokenizer::{Encoded, EncodedPair, Tokenizer};

/// A prompt: raw text or a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text.
    Text(String),
    /// Messages, rendered with the chat template and a generation prompt.
    Chat(Vec<Message>),
}

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// A conversation; assistant messages from index `train_from` on are trained.
    Chat {
        /// The messages.
        messages: Vec<Message>,
        /// First message index whose assistant turns are trained.
        train_from: usize,
    },
    /// Raw prompt and completion strings; the completion (and EOS) is trained.
    PromptCompletion {
        /// Untrained prefix.
        prompt: String,
        /// Trained continuation.
        completion: String,
    },
    /// Plain text; every token is trained.
    Text {
        /// The text.
        text: String,
    },
    /// Unpaired feedback on one completion (KTO).
    Feedback {
        /// The prompt.
        prompt: Prompt,
        /// The completion judged.
        completion: String,
        /// Desirable (`true`) or not.
        label: bool,
    },
    /// A preference pair.
    Preference {
        /// Shared prompt.
        prompt: Prompt,
        /// Preferred answer.
        chosen: String,
        /// Dispreferred answer.
        rejected: String,
    },
}

/// A loaded dataset.
#[derive(Debug)]
pub struct Dataset {
    /// The file it came from.
    pub path: PathBuf,
    /// Examples with the line each came from.
    pub examples: Vec<(usize, Example)>,
    /// Records left out under `skip_invalid`, with their errors.
    pub skipped: Vec<Error>,
}

/// How to read a dataset.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Force a format instead of detecting it per record.
    pub format: Option<Format>,
    /// Report and skip invalid records instead of failing.
    pub skip_invalid: bool,
}

impl Dataset {
    /// Reads `path`.
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Self> {
        let (records, errors) = read::read_records(path)?;
        Self::from_records(path, records, errors, opts)
    }

    /// Converts records already read from `path` (e.g. a share of a partitioned file; lines
    /// keep naming the original file), with `errors` found while reading them.
    pub fn from_records(
        path: &Path,
        records: Vec<read::RawRecord>,
        mut errors: Vec<Error>,
        opts: LoadOptions,
    ) -> Result<Self> {
        let mut examples = Vec::with_capacity(records.len());
        for r in records {
            let converted = match opts.format.or_else(|| formats::detect(&r.value)) {
                Some(f) => formats::convert(&r.value, f),
                None => Err(
                    "no known format: expected messages, conversations, instruction+output, \
                     instruction+response, prompt+completion, text, or chosen+rejected fields"
                        .into(),
                ),
            };
            match converted {
                Ok(ex) => examples.push((r.line, ex)),
                Err(message) => errors.push(Error::Data {
                    path: path.to_path_buf(),
                    line: r.line,
                    message,
                }),
            }
        }
        errors.sort_by_key(|e| match e {
            Error::Data { line, .. } => *line,
            _ => 0,
        });
        if !opts.skip_invalid && !errors.is_empty() {
            return Err(errors.swap_remove(0));
        }
        if examples.is_empty() && !opts.skip_invalid {
            return Err(Error::Data {
                path: path.to_path_buf(),
                line: 0,
                message: "no records".into(),
            });
        }
        let skipped = if opts.skip_invalid {
            errors
        } else {
            Vec::new()
        };
        Ok(Dataset {
            path: path.to_path_buf(),
            examples,
            skipped,
        })
    }

    /// Whether every example is a preference pair.
    pub fn is_preference(&self) -> bool {
        !self.examples.is_empty()
            && self
                .examples
                .iter()
                .all(|(_, e)| matches!(e, Example::Preference { .. }))
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether the dataset has no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    fn data_error(&self, line: usize, e: Error) -> Error {
        Error::Data {
            path: self.path.clone(),
            line,
            message: e.to_string(),
        }
    }

    /// Tokenises every example for SFT (preference pairs train on prompt + chosen), truncated
    /// to `max_len` tokens (right truncation, as TRL). Assistant turns and completions are
    /// the trained tokens.
    pub fn encode_sft(&self, tok: &Tokenizer, max_len: Option<usize>) -> Result<Vec<Encoded>> {
        self.encode_sft_on(tok, max_len, LossOn::default())
    }

    /// [`Dataset::encode_sft`] with the trained tokens chosen as TRL's
    /// `assistant_only_loss` and `completion_only_loss` choose them.
    pub fn encode_sft_on(
        &self,
        tok: &Tokenizer,
        max_len: Option<usize>,
        loss: LossOn,
    ) -> Result<Vec<Encoded>> {
        self.examples
            .iter()
            .map(|(line, ex)| {
                let mut enc = encode_sft(ex, tok).map_err(|e| self.data_error(*line, e))?;
                let all = match ex {
                    Example::Chat { .. } => !loss.assistant_only,
                    Example::PromptCompletion { .. } | Example::Preference { .. } => {
                        !loss.completion_only
                    }
                    Example::Text { .. } | Example::Feedback { .. } => false,
                };
                if all {
                    enc.mask.iter_mut().for_each(|m| *m = 1);
                }
                if let Some(m) = max_len {
                    enc.ids.truncate(m);
                    enc.mask.truncate(m);
                }
                Ok(enc)
            })
            .collect()
    }

    /// Tokenises every preference pair for DPO. Prompts longer than `max_prompt_len` lose
    /// tokens from the left; completions are cut to fit `max_len` (TRL's `keep_start`).
    pub fn encode_pairs(
        &self,
        tok: &Tokenizer,
        max_prompt_len: Option<usize>,
        max_len: Option<usize>,
    ) -> Result<(Vec<EncodedPair>, Truncation)> {
        let mut out = Vec::with_capacity(self.examples.len());
        let mut trunc = Truncation::default();
        for (line, ex) in &self.examples {
            let Example::Preference {
                prompt,
                chosen,
                rejected,
            } = ex
            else {
                return Err(Error::Data {
                    path: self.path.clone(),
                    line: *line,
                    message: "not a preference pair (needs chosen and rejected)".into(),
                });
            };
            let mut pair = encode_pair(prompt, chosen, rejected, tok)
                .map_err(|e| self.data_error(*line, e))?;
            if let Some(m) = max_prompt_len
                && pair.prompt.len() > m
            {
                pair.prompt.drain(..pair.prompt.len() - m);
                trunc.prompts += 1;
            }
            if let Some(m) = max_len {
                let room = m.saturating_sub(pair.prompt.len());
                if pair.chosen.len() > room || pair.rejected.len() > room {
                    trunc.completions += 1;
                }
                pair.chosen.truncate(room);
                pair.rejected.truncate(room);
                if room == 0 {
                    return Err(Error::Data {
                        path: self.path.clone(),
                        line: *line,
                        message: format!(
                            "the prompt leaves no room for a completion within max_length {m}"
                        ),
                    });
                }
            }
            out.push(pair);
        }
        Ok((out, trunc))
    }
}

/// A preference pair tokenised as TRL's RewardTrainer does it: each side is one whole
/// sequence, scored on its last token that is not padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewardPair {
    /// Prompt + chosen completion.
    pub chosen: Vec<u32>,
    /// Prompt + rejected completion.
    pub rejected: Vec<u32>,
}

impl Dataset {
    /// Tokenises every preference pair for reward-model training as TRL's RewardTrainer
    /// does: text as `prompt + completion + EOS` in one string (special tokens added as the
    /// tokenizer adds them), conversations as the whole chat template of the prompt's turns and
    /// the completion's. Pairs with a side longer than `max_len` are left out, as TRL filters
    /// them; their count is returned.
    pub fn encode_reward_pairs(
        &self,
        tok: &Tokenizer,
        max_len: Option<usize>,
    ) -> Result<(Vec<RewardPair>, usize)> {
        let mut out = Vec::with_capacity(self.examples.len());
        let mut dropped = 0;
        for (line, ex) in &self.examples {
            let Example::Preference {
                prompt,
                chosen,
                rejected,
            } = ex
            else {
                return Err(Error::Data {
                    path: self.path.clone(),
                    line: *line,
                    message: "not a preference pair (needs chosen and rejected)".into(),
                });
            };
            let side = |completion: &str| -> Result<Vec<u32>> {
                match prompt {
                    Prompt::Text(p) => {
                        let mut text = format!("{p}{completion}");
                        if let Some(eos) = &tok.eos_token
                            && !text.ends_with(eos.as_str())
                        {
                            text.push_str(eos);
                        }
                        tok.encode_with_special(&text)
                    }
                    Prompt::Chat(m) => {
                        let mut m = m.clone();
                        m.push(Message::new("assistant", completion.to_string()));
                        tok.encode(&tok.render(&m, false)?)
                    }
                }
            };
            let pair = RewardPair {
                chosen: side(chosen).map_err(|e| self.data_error(*line, e))?,
                rejected: side(rejected).map_err(|e| self.data_error(*line, e))?,
            };
            if max_len.is_some_and(|m| pair.chosen.len() > m || pair.rejected.len() > m) {
                dropped += 1;
                continue;
            }
            out.push(pair);
        }
        Ok((out, dropped))
    }
}

/// One example of unpaired feedback, tokenised as TRL's KTOTrainer does it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFeedback {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Completion ids (with the end of turn).
    pub completion: Vec<u32>,
    /// Desirable or not.
    pub label: bool,
}

impl EncodedFeedback {
    /// `prompt + completion` cut to `max_len` tokens, the completion trained.
    pub fn sequence_with(&self, completion: &[u32], max_len: usize) -> Encoded {
        let mut ids = self.prompt.clone();
        ids.extend_from_slice(completion);
        let mut mask = vec![0u8; self.prompt.len()];
        mask.resize(ids.len(), 1);
        ids.truncate(max_len);
        mask.truncate(max_len);
        Encoded { ids, mask }
    }
}

impl Dataset {
    /// Tokenises unpaired feedback for KTO as TRL's KTOTrainer does: a conversation's prompt
    /// rendered with the generation prompt, and the completion as the tokens where prompt +
    /// completion (rendered as one conversation) go on from the prompt; a text prompt and its
    /// completion (EOS appended) tokenised together the same way. Preference pairs give two
    /// examples each (chosen desirable, rejected not), as TRL unpairs them. Examples whose
    /// prompt alone fills `max_len` are dropped (TRL drops them too); returns their count.
    pub fn encode_feedback(
        &self,
        tok: &Tokenizer,
        max_len: usize,
    ) -> Result<(Vec<EncodedFeedback>, usize)> {
        let mut out = Vec::with_capacity(self.examples.len());
        let mut dropped = 0;
        for (line, ex) in &self.examples {
            let items: Vec<(&Prompt, &str, bool)> = match ex {
                Example::Feedback {
                    prompt,
                    completion,
                    label,
                } => vec![(prompt, completion.as_str(), *label)],
                Example::Preference {
                    prompt,
                    chosen,
                    rejected,
                } => vec![
                    (prompt, chosen.as_str(), true),
                    (prompt, rejected.as_str(), false),
                ],
                _ => {
                    return Err(Error::Data {
                        path: self.path.clone(),
                        line: *line,
                        message: "not feedback (needs prompt, completion and a true/false label) \
                                  nor a preference pair"
                            .into(),
                    });
                }
            };
            for (prompt, completion, label) in items {
                let (p, c) = encode_prompt_completion_split(prompt, completion, tok)
                    .map_err(|e| self.data_error(*line, e))?;
                if p.len() >= max_len {
                    dropped += 1;
                    continue;
                }
                out.push(EncodedFeedback {
                    prompt: p,
                    completion: c,
                    label,
                });
            }
        }
        Ok((out, dropped))
    }
}

/// TRL's split of prompt + completion into prompt and completion ids: both rendered (chat) or
/// concatenated (text, with EOS appended to the completion) and tokenised, the completion
/// starting where the two token lists diverge.
pub fn encode_prompt_completion_split(
    prompt: &Prompt,
    completion: &str,
    tok: &Tokenizer,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let (p, full) = match prompt {
        Prompt::Chat(m) => {
            let mut all = m.clone();
            all.push(Message::new("assistant", completion.to_string()));
            (
                tok.encode(&tok.render(m, true)?)?,
                tok.encode(&tok.render(&all, false)?)?,
            )
        }
        Prompt::Text(t) => {
            let mut c = completion.to_string();
            if let Some(eos) = &tok.eos_token
                && !c.ends_with(eos.as_str())
            {
                c.push_str(eos);
            }
            (
                tok.encode_with_special(t)?,
                tok.encode_with_special(&format!("{t}{c}"))?,
            )
        }
    };
    let k = p.iter().zip(&full).take_while(|(a, b)| a == b).count();
    Ok((full[..k].to_vec(), full[k..].to_vec()))
}

/// How many pairs were truncated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Truncation {
    /// Prompts cut from the left.
    pub prompts: usize,
    /// Pairs whose completions were cut.
    pub completions: usize,
}

/// Tokenises one example for SFT.
pub fn encode_sft(ex: &Example, tok: &Tokenizer) -> Result<Encoded> {
    match ex {
        Example::Chat {
            messages,
            train_from,
        } => tok.encode_chat_from(messages, *train_from),
        Example::PromptCompletion { prompt, completion } => {
            tok.encode_prompt_completion(prompt, completion)
        }
        Example::Text { text } => tok.encode_text(text),
        Example::Feedback { .. } => Err(Error::Invalid(
            "unpaired feedback (a `label` on one completion) trains with `fedtune train kto`"
                .into(),
        )),
        Example::Preference { prompt, chosen, .. } => match prompt {
            Prompt::Text(p) => tok.encode_prompt_completion(p, chosen),
            Prompt::Chat(msgs) => {
                let mut m = msgs.clone();
                let from = m.len();
                m.push(Message::new("assistant", chosen.clone()));
                tok.encode_chat_from(&m, from)
            }
        },
    }
}

/// Which tokens SFT trains (TRL's `assistant_only_loss`, `completion_only_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossOn {
    /// Conversations: only the assistant turns (`false`: every token).
    pub assistant_only: bool,
    /// Prompt/completion data: only the completion (`false`: the prompt too).
    pub completion_only: bool,
}

impl Default for LossOn {
    fn default() -> Self {
        LossOn {
            assistant_only: true,
            completion_only: true,
        }
    }
}

/// Tokenises a preference pair: the prompt rendered with a generation prompt (or raw), the
/// completions as text plus the end-of-turn token.
pub fn encode_pair(
    prompt: &Prompt,
    chosen: &str,
    rejected: &str,
    tok: &Tokenizer,
) -> Result<EncodedPair> {
    let prompt = match prompt {
        Prompt::Text(p) => tok.encode_with_special(p)?,
        Prompt::Chat(m) => tok.encode(&tok.render(m, true)?)?,
    };
    Ok(EncodedPair {
        prompt,
        chosen: tok.encode_completion(chosen)?,
        rejected: tok.encode_completion(rejected)?,
    })
}
