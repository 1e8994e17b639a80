//! Preference training (DPO, IPO, hinge, SimPO, ORPO) as an [`Objective`] of the training
//! loop.
//!
//! Each pair gives two rows, prompt + chosen and prompt + rejected, whose completion tokens are
//! the trained targets; their summed log-probabilities under the policy feed
//! [`crate::dpo::pair_loss`], whose gradients flow back through the same hand-written backward
//! pass as SFT. The reference is the policy with its adapter disabled (PEFT + TRL's behaviour
//! for a new adapter): evaluated in every step, or once before training with
//! `precompute_ref_log_probs` (the reference is frozen, so both give the same numbers).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::batches::{PrefixGroup, padded, shared_prefix, shares_prefixes};
use super::params::TrainModel;
use super::step::{Grads, StepBatch, StepOptions, Trainable, backward, forward, sequence_sums};
use super::trainer::{MicroBatch, Objective, StepOutput, add_grads};
use crate::dpo::{PairStats, PreferenceLoss, batch_metrics, pair_loss};
use crate::error::Result;
use crate::eval::{TokenBatch, sequence_logprobs};
use crate::tokenizer::{Encoded, EncodedPair};

/// Options of preference training (TRL's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoOptions {
    /// Temperature β.
    pub beta: f64,
    /// The loss.
    pub loss_type: LossType,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// ORPO's weight λ of the odds-ratio term.
    pub orpo_lambda: f64,
    /// cDPO label smoothing ε (sigmoid and simpo).
    pub label_smoothing: f64,
    /// Prompts longer than this lose tokens on the left.
    pub max_prompt_length: usize,
    /// Prompt + completion are cut to this length.
    pub max_length: usize,
    /// Compute reference log-probabilities once before training.
    pub precompute_ref_log_probs: bool,
}

impl Default for DpoOptions {
    fn default() -> Self {
        DpoOptions {
            beta: 0.1,
            loss_type: LossType::Sigmoid,
            simpo_gamma: 0.5,
            orpo_lambda: 0.1,
            label_smoothing: 0.0,
            max_prompt_length: 512,
            max_length: 1024,
            precompute_ref_log_probs: false,
        }
    }
}

/// `--loss-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// DPO.
    Sigmoid,
    /// IPO.
    Ipo,
    /// Hinge.
    Hinge,
    /// SimPO (no reference).
    Simpo,
    /// ORPO (no reference).
    Orpo,
}

impl std::str::FromStr for LossType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "sigmoid" | "dpo" => LossType::Sigmoid,
            "ipo" => LossType::Ipo,
            "hinge" => LossType::Hinge,
            "simpo" => LossType::Simpo,
            "orpo" => LossType::Orpo,
            other => {
                return Err(format!(
                    "unknown loss type {other:?} (sigmoid, ipo, hinge, simpo, orpo)"
                ));
            }
        })
    }
}

impl DpoOptions {
    /// The loss with its parameters.
    pub fn loss(&self) -> PreferenceLoss {
        match self.loss_type {
            LossType::Sigmoid => PreferenceLoss::Sigmoid,
            LossType::Ipo => PreferenceLoss::Ipo,
            LossType::Hinge => PreferenceLoss::Hinge,
            LossType::Simpo => PreferenceLoss::Simpo {
                gamma: self.simpo_gamma,
            },
            LossType::Orpo => PreferenceLoss::Orpo {
                lambda: self.orpo_lambda,
            },
        }
    }

    /// TRL's name of the loss.
    pub fn loss_type_name(&self) -> &'static str {
        self.loss().name()
    }

    /// Checks ranges; the message names the option.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err("beta must be positive".into());
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err("label_smoothing must be in [0, 0.5)".into());
        }
        if self.max_prompt_length == 0 || self.max_length < 2 {
            return Err("max_prompt_length must be positive and max_length at least 2".into());
        }
        Ok(())
    }
}

/// Reference sums `(chosen, rejected)` per pair, computed before training.
struct Precomputed {
    train: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
}

/// Preference pairs as a training objective.
pub struct DpoObjective<M> {
    pairs: Vec<EncodedPair>,
    eval: Vec<EncodedPair>,
    options: DpoOptions,
    batch_size: usize,
    pad: u32,
    reference: Option<Precomputed>,
    /// The reference model when it is not the policy with its adapter disabled.
    reference_model: Option<M>,
    /// Whether a pair's two sequences share one row that runs the prompt once.
    share: bool,
}

fn rows(pairs: &[&EncodedPair]) -> Vec<Encoded> {
    pairs
        .iter()
        .flat_map(|p| {
            let (c, r) = p.sequences();
            [c, r]
        })
        .collect()
}

/// Sums of `reference` (used as it is) for `pairs`, in batches of `batch_size` pairs.
fn reference_sums<M: TrainModel>(
    reference: &M,
    pairs: &[EncodedPair],
    batch_size: usize,
    pad: u32,
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&EncodedPair> = chunk.iter().collect();
        let seqs = rows(&refs);
        let seq_refs: Vec<&Encoded> = seqs.iter().collect();
        let (sums, _) = sequence_logprobs(reference, &TokenBatch::pad(&seq_refs, pad));
        out.extend(sums.chunks(2).map(|c| (c[0], c[1])));
    }
    out
}

impl<M: TrainModel> DpoObjective<M> {
    /// An objective over `pairs` (evaluation on `eval`); with `precompute_ref_log_probs` the
    /// reference sums are computed here, from `model` with its adapter disabled.
    pub fn new(
        model: &M,
        options: DpoOptions,
        pairs: Vec<EncodedPair>,
        eval: Vec<EncodedPair>,
        batch_size: usize,
        pad: u32,
    ) -> Self {
        // Without precomputation the reference is the policy's own base at each batch.
        let base = model.without_adapter();
        Self::build(&base, false, options, pairs, eval, batch_size, pad)
    }

    /// An objective whose reference is `reference` as it is (its adapter included; its sums
    /// are precomputed here with `precompute_ref_log_probs`, else computed per batch from a
    /// frozen copy): federated DPO rounds use the global adapter the round
    /// starts from (TRL's `sync_ref_model` at every round), so the reference is the model the
    /// federation had before the round, not the bare base.
    pub fn against(
        reference: &M,
        options: DpoOptions,
        pairs: Vec<EncodedPair>,
        eval: Vec<EncodedPair>,
        batch_size: usize,
        pad: u32,
    ) -> Self {
        Self::build(reference, true, options, pairs, eval, batch_size, pad)
    }

    /// Precomputes `reference`'s sums when asked; otherwise keeps a frozen copy of it when
    /// `keep` (else the reference is the policy's base at each batch).
    fn build(
        reference: &M,
        keep: bool,
        options: DpoOptions,
        pairs: Vec<EncodedPair>,
        eval: Vec<EncodedPair>,
        batch_size: usize,
        pad: u32,
    ) -> Self {
        let precomputed = (options.precompute_ref_log_probs && options.loss().needs_reference())
            .then(|| Precomputed {
                train: reference_sums(reference, &pairs, batch_size, pad),
                eval: reference_sums(reference, &eval, batch_size, pad),
            });
        // A frozen copy when the sums are not precomputed: training replaces the policy's
        // parameters, not this model's.
        let reference_model = (keep && precomputed.is_none()).then(|| reference.clone());
        DpoObjective {
            pairs,
            eval,
            options,
            batch_size,
            pad,
            reference: precomputed,
            reference_model,
            share: shares_prefixes(reference),
        }
    }

    /// The training batch of `pairs`: with `share`, one row per pair that runs the prompt once
    /// for both completions ([`shared_prefix`]: each sees the prompt and itself); otherwise
    /// rows `prompt + chosen`, `prompt + rejected`. Sequence `2k` is pair k's chosen, `2k + 1`
    /// its rejected, either way.
    fn batch_of(&self, pairs: &[&EncodedPair]) -> StepBatch {
        if !self.share {
            return padded(&rows(pairs), self.pad);
        }
        let groups: Vec<PrefixGroup<'_>> = pairs
            .iter()
            .enumerate()
            .map(|(k, p)| {
                (
                    p.prompt.as_slice(),
                    vec![
                        (2 * k, p.chosen.as_slice(), true),
                        (2 * k + 1, p.rejected.as_slice(), true),
                    ],
                )
            })
            .collect();
        shared_prefix(&groups, self.pad)
    }

    /// Pair statistics of `pairs` (indices into `set`) under `model`, without gradients.
    fn stats(
        &self,
        model: &M,
        set: &[EncodedPair],
        precomputed: Option<&Vec<(f64, f64)>>,
        idx: &[usize],
    ) -> Vec<PairStats> {
        let chosen: Vec<&EncodedPair> = idx.iter().map(|&i| &set[i]).collect();
        let seqs = rows(&chosen);
        let seq_refs: Vec<&Encoded> = seqs.iter().collect();
        let batch = TokenBatch::pad(&seq_refs, self.pad);
        let (policy, counts) = sequence_logprobs(model, &batch);
        let reference = self.reference_for(model, &batch, precomputed, idx);
        (0..idx.len())
            .map(|k| PairStats {
                policy_chosen: policy[2 * k],
                policy_rejected: policy[2 * k + 1],
                reference_chosen: reference[2 * k],
                reference_rejected: reference[2 * k + 1],
                n_chosen: counts[2 * k],
                n_rejected: counts[2 * k + 1],
            })
            .collect()
    }

    /// Reference sums per row (zeros for reference-free losses).
    fn reference_for(
        &self,
        model: &M,
        batch: &TokenBatch,
        precomputed: Option<&Vec<(f64, f64)>>,
        idx: &[usize],
    ) -> Vec<f64> {
        if !self.options.loss().needs_reference() {
            return vec![0.0; batch.batch];
        }
        match precomputed {
            Some(p) => idx.iter().flat_map(|&i| [p[i].0, p[i].1]).collect(),
            None => match &self.reference_model {
                Some(r) => sequence_logprobs(r, batch).0,
                None => sequence_logprobs(&model.without_adapter(), batch).0,
            },
        }
    }
}

impl<M: TrainModel> Objective<M> for DpoObjective<M> {
    fn num_examples(&self) -> usize {
        self.pairs.len()
    }

    fn batches(&self, order: &[usize]) -> Vec<MicroBatch> {
        order
            .chunks(self.batch_size.max(1))
            .map(|idx| {
                let pairs: Vec<&EncodedPair> = idx.iter().map(|&i| &self.pairs[i]).collect();
                MicroBatch {
                    batch: self.batch_of(&pairs),
                    examples: idx.to_vec(),
                }
            })
            .collect()
    }

    fn step(
        &self,
        model: &M,
        micro: &[MicroBatch],
        trainable: &Trainable,
        options: &StepOptions,
    ) -> Result<StepOutput<M::T>> {
        let kind = self.options.loss();
        let (beta, eps) = (self.options.beta, self.options.label_smoothing);
        let n_pairs: usize = micro.iter().map(|m| m.examples.len()).sum();
        // ORPO's NLL is the mean over every chosen token of the step.
        let chosen_tokens: usize = micro
            .iter()
            .map(|m| m.batch.targets.iter().filter(|t| t.seq % 2 == 0).count())
            .sum();
        let mut grads = Grads::new();
        let mut all = Vec::with_capacity(n_pairs);
        let (mut trained, mut tokens) = (0, 0);
        for (i, m) in micro.iter().enumerate() {
            let b = &m.batch;
            trained += b.targets.len();
            tokens += b.real_tokens;
            let seqs = 2 * m.examples.len();
            let reference = match (&self.reference, self.options.loss().needs_reference()) {
                (_, false) => vec![0.0; seqs],
                (Some(p), true) => m
                    .examples
                    .iter()
                    .flat_map(|&k| [p.train[k].0, p.train[k].1])
                    .collect(),
                (None, true) => match &self.reference_model {
                    Some(r) => sequence_sums(r, b, seqs),
                    None => sequence_sums(&model.without_adapter(), b, seqs),
                },
            };
            let fwd = forward(model, b, trainable, &options.micro(i));
            let lp = fwd.target_logps.clone();
            let mut sums = vec![0f64; seqs];
            let mut counts = vec![0usize; seqs];
            for (t, v) in b.targets.iter().zip(&lp) {
                sums[t.seq] += *v as f64;
                counts[t.seq] += 1;
            }
            let mut d_row = vec![0f64; seqs];
            for k in 0..m.examples.len() {
                let s = PairStats {
                    policy_chosen: sums[2 * k],
                    policy_rejected: sums[2 * k + 1],
                    reference_chosen: reference[2 * k],
                    reference_rejected: reference[2 * k + 1],
                    n_chosen: counts[2 * k],
                    n_rejected: counts[2 * k + 1],
                };
                let l = pair_loss(kind, &s, beta, eps);
                d_row[2 * k] = l.d_chosen / n_pairs as f64;
                d_row[2 * k + 1] = l.d_rejected / n_pairs as f64;
                if let PreferenceLoss::Orpo { .. } = kind {
                    d_row[2 * k] -= 1.0 / chosen_tokens.max(1) as f64;
                }
                all.push(s);
            }
            let d: Vec<f32> = b.targets.iter().map(|t| d_row[t.seq] as f32).collect();
            add_grads(model, &mut grads, backward(model, fwd, &d, trainable));
        }
        let (loss, metrics) = batch_metrics(kind, &all, beta, eps);
        Ok(StepOutput {
            loss,
            grads,
            trained,
            tokens,
            metrics,
        })
    }

    fn evaluate(&self, model: &M) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.metrics_on(model, true)))
    }
}

impl<M: TrainModel> DpoObjective<M> {
    /// Loss and TRL metrics of the whole training (`eval == false`) or evaluation set under
    /// `model`, without gradients.
    pub fn metrics_on(&self, model: &M, eval: bool) -> (f64, BTreeMap<String, f64>) {
        let (set, pre) = if eval {
            (&self.eval, self.reference.as_ref().map(|r| &r.eval))
        } else {
            (&self.pairs, self.reference.as_ref().map(|r| &r.train))
        };
        let idx: Vec<usize> = (0..set.len()).collect();
        let mut stats = Vec::with_capacity(set.len());
        for chunk in idx.chunks(self.batch_size.max(1)) {
            stats.extend(self.stats(model, set, pre, chunk));
        }
        batch_metrics(
            self.options.loss(),
            &stats,
            self.options.beta,
            self.options.label_smoothing,
        )
    }
}
