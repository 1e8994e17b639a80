//! GRPO (TRL 1.16's `GRPOTrainer`) as an objective of the training loop: each step samples
//! groups of completions from the current policy, scores them with [`crate::rewards`], and
//! trains on the group-relative advantages with the loss of [`loss`] (re-exported here).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::params::TrainModel;
use crate::train::step::{StepBatch, StepOptions, Trainable};
use crate::train::trainer::{MicroBatch, Objective, StepOutput};

pub mod loss;
pub mod rollout;

pub use loss::*;
pub use rollout::*;

/// GRPO's options beyond the loss (TRL's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoOptions {
    /// Completions sampled per prompt, G (default 8).
    pub num_generations: usize,
    /// Longest completion, in tokens (default 512).
    pub max_completion_length: usize,
    /// Sampling temperature (default 1).
    pub temperature: f64,
    /// Nucleus sampling (default 1: off).
    pub top_p: f64,
    /// Top-k sampling (default 0: off).
    pub top_k: usize,
    /// How advantages are scaled (default `group`).
    pub scale_rewards: ScaleRewards,
    /// Leave completions that hit `max_completion_length` without ending out of the loss.
    pub mask_truncated_completions: bool,
    /// Optimiser steps on each batch of generations, μ (default 1).
    pub num_iterations: usize,
    /// The loss type (default `dapo`).
    pub loss_type: GrpoLoss,
    /// KL coefficient β against the reference, the adapter disabled (default 0).
    pub beta: f64,
    /// ε (default 0.2).
    pub epsilon: f64,
    /// ε_high (default ε).
    pub epsilon_high: Option<f64>,
    /// Cap on the importance ratio (default none).
    pub delta: Option<f64>,
    /// `token` or `sequence` (GSPO).
    pub importance_sampling_level: SamplingLevel,
    /// SAPO's temperatures.
    pub sapo_temperature_pos: f64,
    /// SAPO's temperature for negative advantages.
    pub sapo_temperature_neg: f64,
    /// KL bias correction (default true).
    pub use_bias_correction_kl: bool,
    /// VESPO's k for advantages ≥ 0 (default 2).
    pub vespo_k_pos: f64,
    /// VESPO's λ for advantages ≥ 0 (default 3).
    pub vespo_lambda_pos: f64,
    /// VESPO's k for negative advantages (default 3).
    pub vespo_k_neg: f64,
    /// VESPO's λ for negative advantages (default 2).
    pub vespo_lambda_neg: f64,
}

impl Default for GrpoOptions {
    fn default() -> Self {
        let l = GrpoLossOptions::default();
        GrpoOptions {
            num_generations: 8,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            num_iterations: 1,
            loss_type: l.loss_type,
            beta: l.beta,
            epsilon: l.epsilon,
            epsilon_high: l.epsilon_high,
            delta: l.delta,
            importance_sampling_level: l.importance_sampling_level,
            sapo_temperature_pos: l.sapo_temperature_pos,
            sapo_temperature_neg: l.sapo_temperature_neg,
            use_bias_correction_kl: l.use_bias_correction_kl,
            vespo_k_pos: l.vespo_k_pos,
            vespo_lambda_pos: l.vespo_lambda_pos,
            vespo_k_neg: l.vespo_k_neg,
            vespo_lambda_neg: l.vespo_lambda_neg,
        }
    }
}

impl GrpoOptions {
    /// The loss's options.
    pub fn loss(&self) -> GrpoLossOptions {
        GrpoLossOptions {
            loss_type: self.loss_type,
            beta: self.beta,
            epsilon: self.epsilon,
            epsilon_high: self.epsilon_high,
            delta: self.delta,
            importance_sampling_level: self.importance_sampling_level,
            sapo_temperature_pos: self.sapo_temperature_pos,
            sapo_temperature_neg: self.sapo_temperature_neg,
            max_completion_length: self.max_completion_length,
            use_bias_correction_kl: self.use_bias_correction_kl,
            vespo_k_pos: self.vespo_k_pos,
            vespo_lambda_pos: self.vespo_lambda_pos,
            vespo_k_neg: self.vespo_k_neg,
            vespo_lambda_neg: self.vespo_lambda_neg,
            temperature: self.temperature,
        }
    }

    /// Checks the options against the completions per micro-batch.
    pub fn validate(&self, batch: usize) -> std::result::Result<(), String> {
        if self.num_generations < 2 {
            return Err(
                "num_generations must be at least 2 (advantages are relative to the group)".into(),
            );
        }
        if batch == 0 || !batch.is_multiple_of(self.num_generations) {
            return Err(format!(
                "per_device_train_batch_size ({batch}, completions per micro-batch) must be a multiple of num_generations ({})",
                self.num_generations
            ));
        }
        if self.max_completion_length == 0 || self.num_iterations == 0 {
            return Err("max_completion_length and num_iterations must be positive".into());
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let top_p_ok = self.top_p > 0.0 && self.top_p <= 1.0;
        if !(positive(self.temperature) && top_p_ok) {
            return Err("temperature must be positive and top_p in (0, 1]".into());
        }
        let epsilon_ok = self.epsilon > 0.0 && self.epsilon < 1.0;
        if !(epsilon_ok && self.beta.is_finite() && self.beta >= 0.0) {
            return Err("epsilon must be in (0, 1) and beta non-negative".into());
        }
        Ok(())
    }
}

/// A prompt to learn from: its ids, its text (what reward functions see) and the example's
/// other fields (a reference answer, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoPrompt {
    /// Token ids (a conversation rendered with the generation prompt).
    pub ids: Vec<u32>,
    /// The prompt as text.
    pub text: String,
    /// A conversation's messages (`None` for a text prompt).
    pub messages: Option<Vec<crate::template::Message>>,
    /// The record's other fields.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl GrpoPrompt {
    /// A conversation's prompt: `messages` rendered with the generation prompt, with the
    /// example's other `fields` (which rewards read).
    pub fn chat(
        messages: Vec<crate::template::Message>,
        fields: serde_json::Map<String, serde_json::Value>,
        tok: &crate::tokenizer::Tokenizer,
    ) -> Result<Self> {
        let text = tok.render(&messages, true)?;
        Self::checked(tok.encode(&text)?, text, Some(messages), fields)
    }

    /// A text prompt, tokenised with the tokenizer's special tokens.
    pub fn text(
        text: String,
        fields: serde_json::Map<String, serde_json::Value>,
        tok: &crate::tokenizer::Tokenizer,
    ) -> Result<Self> {
        Self::checked(tok.encode_with_special(&text)?, text, None, fields)
    }

    fn checked(
        ids: Vec<u32>,
        text: String,
        messages: Option<Vec<crate::template::Message>>,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        if ids.is_empty() {
            return Err(Error::Invalid("the prompt is empty".into()));
        }
        Ok(GrpoPrompt {
            ids,
            text,
            messages,
            fields,
        })
    }
}

/// Reads prompts for GRPO: JSON lines (or a JSON array) of objects with a `prompt` — text, or
/// a conversation's messages (rendered with the generation prompt) — and any other fields,
/// which reward functions read (a reference answer, ...). Errors name the file and line.
pub fn load_prompts(
    path: &std::path::Path,
    tok: &crate::tokenizer::Tokenizer,
) -> Result<Vec<GrpoPrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records: Vec<(usize, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| Error::parse(path, e))?;
        v.into_iter().enumerate().map(|(i, r)| (i + 1, r)).collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(|v| (i + 1, v))
                    .map_err(|e| Error::Data {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message: format!("not JSON: {e}"),
                    })
            })
            .collect::<Result<_>>()?
    };
    let data_err = |line: usize, message: String| Error::Data {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut out = Vec::with_capacity(records.len());
    for (line, r) in records {
        let serde_json::Value::Object(mut fields) = r else {
            return Err(data_err(
                line,
                "expected a JSON object with a `prompt`".into(),
            ));
        };
        let prompt = fields
            .remove("prompt")
            .ok_or_else(|| data_err(line, "no `prompt` field".into()))?;
        let p = match prompt {
            serde_json::Value::String(s) => GrpoPrompt::text(s, fields, tok),
            serde_json::Value::Array(_) => {
                let msgs: Vec<crate::template::Message> =
                    serde_json::from_value(prompt).map_err(|e| {
                        data_err(line, format!("`prompt`: not a list of messages: {e}"))
                    })?;
                GrpoPrompt::chat(msgs, fields, tok)
            }
            _ => {
                return Err(data_err(
                    line,
                    "`prompt` must be text or a list of messages".into(),
                ));
            }
        };
        out.push(p.map_err(|e| data_err(line, e.to_string()))?);
    }
    Ok(out)
}

/// A step's rollouts per micro-batch, and its reward and completion metrics.
type Sampled = (Vec<Vec<Rollout>>, BTreeMap<String, f64>);

/// Rollouts kept for the next iterations on the same prompts (`num_iterations > 1`).
struct Kept {
    examples: Vec<usize>,
    left: usize,
    rollouts: Vec<Vec<Rollout>>,
    metrics: BTreeMap<String, f64>,
}

/// GRPO as an [`Objective`]: each step samples `num_generations` completions of each of its
/// prompts from the current policy (sharing each prompt's KV cache), scores them with the
/// reward functions, turns the rewards into group-relative advantages and takes the policy
/// loss's gradient; the reference is the policy with its adapter disabled.
pub struct GrpoObjective {
    prompts: Vec<GrpoPrompt>,
    /// Held-out prompts for evaluation (fresh samples scored, and the loss on them).
    eval_prompts: Vec<GrpoPrompt>,
    rewards: crate::rewards::Rewards,
    options: GrpoOptions,
    /// Completions per micro-batch (TRL's `per_device_train_batch_size`).
    batch: usize,
    pad: u32,
    stop_ids: Vec<u32>,
    tokenizer: std::sync::Arc<crate::tokenizer::Tokenizer>,
    seed: u64,
    /// Generations drawn so far (each gets its own seed).
    draws: std::sync::atomic::AtomicU64,
    kept: std::sync::Mutex<Option<Kept>>,
}

impl GrpoObjective {
    /// An objective over `prompts`; `batch` completions per micro-batch (a multiple of
    /// `num_generations`), stopping at `stop_ids`, sampling from `seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        prompts: Vec<GrpoPrompt>,
        rewards: crate::rewards::Rewards,
        options: GrpoOptions,
        batch: usize,
        pad: u32,
        stop_ids: Vec<u32>,
        tokenizer: std::sync::Arc<crate::tokenizer::Tokenizer>,
        seed: u64,
    ) -> Self {
        GrpoObjective {
            prompts,
            eval_prompts: Vec::new(),
            rewards,
            options,
            batch,
            pad,
            stop_ids,
            tokenizer,
            seed,
            draws: std::sync::atomic::AtomicU64::new(0),
            kept: std::sync::Mutex::new(None),
        }
    }

    /// Evaluates on `prompts` (held out): at each evaluation, `num_generations` fresh samples
    /// of each are scored, with the loss on them (TRL's `eval_reward`, `eval_loss`, ...).
    pub fn with_eval(mut self, prompts: Vec<GrpoPrompt>) -> Self {
        self.eval_prompts = prompts;
        self
    }

    /// The mean reward of `num_generations` fresh samples of every prompt under `model`.
    pub fn mean_reward<M: TrainModel>(&self, model: &M) -> Result<f64> {
        let all: Vec<usize> = (0..self.prompts.len()).collect();
        let (_, m) = self.rollouts(model, &self.prompts, &[all.as_slice()])?;
        Ok(m["reward"])
    }

    /// The loss and metrics of fresh samples of the held-out prompts, without gradients: the
    /// rollouts in micro-batches of the training batch, each scored by the loss with the
    /// policy as its own old policy (ratio 1), as TRL's evaluation computes it.
    fn eval_on<M: TrainModel>(&self, model: &M) -> Result<(f64, BTreeMap<String, f64>)> {
        let per = (self.batch / self.options.num_generations.max(1)).max(1);
        let idx: Vec<usize> = (0..self.eval_prompts.len()).collect();
        let micro: Vec<&[usize]> = idx.chunks(per).collect();
        let (rollouts, metrics) = self.rollouts(model, &self.eval_prompts, &micro)?;
        let o = self.options.loss();
        let step_tokens: usize = rollouts
            .iter()
            .flatten()
            .filter(|r| !r.masked)
            .map(|r| r.completion.len())
            .sum();
        let (mut loss, mut entropy, mut with_entropy) = (0.0, 0.0, false);
        for rs in &rollouts {
            let refs: Vec<&Rollout> = rs.iter().collect();
            let (policy, ent) =
                logps_and_entropy(model, &refs, self.batch, self.pad, o.temperature, true);
            if ent.iter().any(|e| !e.is_empty()) {
                with_entropy = true;
                entropy += mean_entropy(
                    rs.iter()
                        .zip(&ent)
                        .filter(|(r, _)| !r.masked)
                        .map(|(_, e)| e.as_slice()),
                );
            }
            let seqs: Vec<loss::SeqLogps<'_>> = rs
                .iter()
                .zip(&policy)
                .filter(|(r, _)| !r.masked)
                .map(|(r, p)| loss::SeqLogps {
                    policy: p,
                    old: None,
                    reference: r.reference.as_deref(),
                    advantage: r.advantage,
                })
                .collect();
            loss += loss::micro_loss(&o, &seqs, step_tokens, rollouts.len()).loss;
        }
        let mut metrics = metrics;
        if with_entropy {
            metrics.insert("entropy".into(), entropy / rollouts.len().max(1) as f64);
        }
        Ok((loss, metrics))
    }

    /// Samples, scores and turns into rollouts the completions of `examples` (prompt indices)
    /// under `model`; also the step's reward and completion metrics.
    fn rollouts<M: TrainModel>(
        &self,
        model: &M,
        prompts: &[GrpoPrompt],
        micro: &[&[usize]],
    ) -> Result<Sampled> {
        let g = self.options.num_generations;
        let o = &self.options;
        // Sample every group of the step as one batch, each prompt from its own seed.
        let picked: Vec<usize> = micro.iter().flat_map(|m| m.iter().copied()).collect();
        let seeds: Vec<u64> = picked
            .iter()
            .map(|_| {
                let draw = self
                    .draws
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            })
            .collect();
        let cfg = crate::generate::GenerationConfig {
            max_new_tokens: o.max_completion_length,
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            seed: self.seed,
            stop_ids: self.stop_ids.clone(),
        };
        let ids: Vec<&[u32]> = picked.iter().map(|&p| &prompts[p].ids[..]).collect();
        let sampled = crate::generate::generate_groups(model, &ids, &seeds, g, &cfg);
        let groups: Vec<(usize, Vec<Vec<u32>>)> = picked.into_iter().zip(sampled).collect();
        // Score them.
        let texts: Vec<String> = groups
            .iter()
            .flat_map(|(_, cs)| cs.iter())
            .map(|c| self.tokenizer.decode(c, true))
            .collect::<Result<_>>()?;
        let inputs: Vec<crate::rewards::RewardInput<'_>> = groups
            .iter()
            .flat_map(|(p, cs)| cs.iter().map(move |_| *p))
            .zip(&texts)
            .map(|(p, t)| crate::rewards::RewardInput {
                prompt: &prompts[p].text,
                messages: prompts[p].messages.as_deref(),
                completion: t,
                fields: &prompts[p].fields,
            })
            .collect();
        let scored = self.rewards.score(&inputs)?;
        let total: Vec<f64> = scored.total.iter().map(|v| f64::from(*v)).collect();
        let (adv, zero_std) = advantages(&total, g, o.scale_rewards);
        // Metrics with TRL's names.
        let mut m = scored.metrics(&self.rewards);
        m.insert("frac_reward_zero_std".into(), zero_std);
        let comps: Vec<&Vec<u32>> = groups.iter().flat_map(|(_, cs)| cs.iter()).collect();
        m.extend(crate::rewards::completion_metrics(&comps, &self.stop_ids));
        let ended = |c: &Vec<u32>| c.last().is_some_and(|t| self.stop_ids.contains(t));
        // Rollouts, laid out per micro-batch.
        let mut k = 0;
        let mut out = Vec::with_capacity(micro.len());
        let mut gi = 0;
        for mb in micro {
            let mut rs = Vec::with_capacity(mb.len() * g);
            for _ in mb.iter() {
                let (p, cs) = &groups[gi];
                gi += 1;
                for c in cs {
                    rs.push(Rollout {
                        prompt: prompts[*p].ids.clone(),
                        completion: c.clone(),
                        advantage: adv[k],
                        old: None,
                        reference: None,
                        masked: o.mask_truncated_completions && !ended(c),
                    });
                    k += 1;
                }
            }
            out.push(rs);
        }
        // The reference's log-probabilities (the adapter disabled), and the generating
        // policy's when the rollouts serve several iterations.
        let base = (o.beta != 0.0).then(|| model.without_adapter());
        for rs in out.iter_mut() {
            let refs: Vec<&Rollout> = rs.iter().collect();
            let t = o.temperature;
            let reference = base
                .as_ref()
                .map(|b| completion_logps(b, &refs, self.batch, self.pad, t));
            let old = (o.num_iterations > 1)
                .then(|| completion_logps(model, &refs, self.batch, self.pad, t));
            for (i, r) in rs.iter_mut().enumerate() {
                r.reference = reference.as_ref().map(|v| v[i].clone());
                r.old = old.as_ref().map(|v| v[i].clone());
            }
        }
        Ok((out, m))
    }
}

impl<M: TrainModel> Objective<M> for GrpoObjective {
    fn num_examples(&self) -> usize {
        self.prompts.len()
    }

    /// Micro-batches of `batch / num_generations` prompts, each repeated `num_iterations`
    /// times in a row (TRL's sampler repeats a generation batch for its iterations).
    fn batches(&self, order: &[usize]) -> Vec<MicroBatch> {
        let per = (self.batch / self.options.num_generations.max(1)).max(1);
        let mut out = Vec::new();
        for idx in order.chunks(per) {
            for _ in 0..self.options.num_iterations.max(1) {
                out.push(MicroBatch {
                    batch: StepBatch {
                        ids: Vec::new(),
                        batch: 0,
                        len: 0,
                        positions: crate::model::Positions::Range {
                            start: 0,
                            len: 0,
                            batch: 0,
                        },
                        segments: None,
                        targets: Vec::new(),
                        real_tokens: 0,
                    },
                    examples: idx.to_vec(),
                });
            }
        }
        out
    }

    fn step(
        &self,
        model: &M,
        micro: &[MicroBatch],
        trainable: &Trainable,
        options: &StepOptions,
    ) -> Result<StepOutput<M::T>> {
        let examples: Vec<usize> = micro.iter().flat_map(|m| m.examples.clone()).collect();
        let mut kept = self
            .kept
            .lock()
            .map_err(|_| Error::Invalid("GRPO state poisoned".into()))?;
        let reuse = kept
            .as_ref()
            .is_some_and(|k| k.examples == examples && k.left > 0);
        if !reuse {
            let idx: Vec<&[usize]> = micro.iter().map(|m| m.examples.as_slice()).collect();
            let (rollouts, metrics) = self.rollouts(model, &self.prompts, &idx)?;
            *kept = Some(Kept {
                examples,
                left: self.options.num_iterations.max(1),
                rollouts,
                metrics,
            });
        }
        let k = kept.as_mut().expect("set above");
        k.left -= 1;
        let refs: Vec<Vec<&Rollout>> = k.rollouts.iter().map(|rs| rs.iter().collect()).collect();
        let mut out = grpo_step(
            model,
            &refs,
            &self.options.loss(),
            trainable,
            options,
            self.pad,
        )?;
        out.metrics.extend(k.metrics.clone());
        Ok(out)
    }

    fn evaluate(&self, model: &M) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
        if self.eval_prompts.is_empty() {
            return Ok(None);
        }
        self.eval_on(model).map(Some)
    }
}
