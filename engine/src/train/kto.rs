//! KTO (Kahneman–Tversky optimisation) on unpaired feedback, as TRL 1.16's `KTOTrainer`
//! computes it, as an [`Objective`] of the training loop.
//!
//! Each example is a prompt, one completion and a label (desirable or not). With `r` the
//! completion's summed log-probability under the policy minus the reference's, and `z` the KL
//! reference point of the micro-batch, the loss of an example is
//! `w_d·(1 − σ(β(r − z)))` when desirable and `w_u·(1 − σ(β(z − r)))` when not, averaged over
//! the micro-batch (`apo_zero_unpaired`: `w_d·(1 − σ(βr))` and `w_u·σ(βr)`, no `z`). `z` is
//! TRL's estimate: the mean over the micro-batch of the same log-ratio on mismatched pairs —
//! each prompt with the completion of the example before it, cyclically — clamped at 0 and
//! not differentiated. The reference is the policy with its adapter disabled (a fresh adapter,
//! PEFT + TRL's behaviour), or a frozen model given to [`KtoObjective::against`] (TRL keeps a
//! copy of a pretrained adapter as the reference; federated rounds start from the global one).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::batches::{PrefixGroup, padded, shared_prefix, shares_prefixes};
use super::params::TrainModel;
use super::step::{Grads, StepOptions, Trainable, backward, forward, sequence_sums};
use super::trainer::{MicroBatch, Objective, StepOutput, add_grads};
use crate::data::EncodedFeedback;
use crate::error::Result;
use crate::eval::{TokenBatch, sequence_logprobs};
use crate::tokenizer::Encoded;

/// Options of KTO (TRL's `KTOConfig` names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoOptions {
    /// Temperature β.
    pub beta: f64,
    /// Weight of desirable examples' losses.
    pub desirable_weight: f64,
    /// Weight of undesirable examples' losses.
    pub undesirable_weight: f64,
    /// `kto` or `apo_zero_unpaired`.
    pub loss_type: KtoLoss,
    /// Prompt + completion are cut to this length (from the right); examples whose prompt
    /// alone fills it are dropped.
    pub max_length: usize,
}

impl Default for KtoOptions {
    fn default() -> Self {
        KtoOptions {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            loss_type: KtoLoss::Kto,
            max_length: 1024,
        }
    }
}

/// `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoLoss {
    /// KTO (eq. 7 of the KTO paper), with the KL reference point.
    Kto,
    /// The unpaired variant of APO-zero: no KL term.
    ApoZeroUnpaired,
}

impl std::str::FromStr for KtoLoss {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kto" => Ok(KtoLoss::Kto),
            "apo_zero_unpaired" | "apo-zero-unpaired" => Ok(KtoLoss::ApoZeroUnpaired),
            other => Err(format!(
                "unknown KTO loss type {other:?} (kto, apo_zero_unpaired)"
            )),
        }
    }
}

impl KtoOptions {
    /// Checks ranges; the message names the option. `batch_size` is the micro-batch size
    /// (KTO's KL term needs two examples in it, as TRL requires).
    pub fn validate(&self, batch_size: usize) -> std::result::Result<(), String> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err("beta must be positive".into());
        }
        if !(self.desirable_weight >= 0.0 && self.undesirable_weight >= 0.0) {
            return Err("desirable_weight and undesirable_weight must be at least 0".into());
        }
        if self.max_length < 2 {
            return Err("max_length must be at least 2".into());
        }
        if self.loss_type == KtoLoss::Kto && batch_size < 2 {
            return Err(
                "KTO estimates its KL term from mismatched prompt/completion pairs within a batch: \
                 per_device_train_batch_size must be at least 2"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The first `room` tokens of `c` (a completion cut as `sequence_with` cuts it after its
/// prompt).
fn cut(c: &[u32], room: usize) -> &[u32] {
    &c[..c.len().min(room)]
}

/// Unpaired feedback as a training objective.
pub struct KtoObjective<M> {
    examples: Vec<EncodedFeedback>,
    eval: Vec<EncodedFeedback>,
    options: KtoOptions,
    batch_size: usize,
    pad: u32,
    /// The reference when it is not the policy with its adapter disabled.
    reference_model: Option<M>,
}

/// Per-example quantities of one micro-batch.
struct Scored {
    /// Policy sums per example.
    policy: Vec<f64>,
    /// Reference sums per example.
    reference: Vec<f64>,
    /// The KL reference point (0 for `apo_zero_unpaired`).
    kl: f64,
}

/// Loss, `∂loss/∂policy sum` per example (for a mean over the micro-batch) and TRL's metrics
/// of one micro-batch.
fn micro_loss(
    o: &KtoOptions,
    labels: &[bool],
    s: &Scored,
) -> (f64, Vec<f64>, BTreeMap<&'static str, f64>) {
    let n = labels.len().max(1) as f64;
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (mut loss, mut d) = (0.0, vec![0.0; labels.len()]);
    let (mut rc, mut rr, mut lc, mut lr) = (0.0, 0.0, 0.0, 0.0);
    let (mut nc, mut nr) = (0usize, 0usize);
    for (i, &label) in labels.iter().enumerate() {
        let r = s.policy[i] - s.reference[i];
        let b = o.beta;
        let (l, g) = match (o.loss_type, label) {
            // 1 − σ(β(r − z)): derivative −β·σ(1 − σ).
            (KtoLoss::Kto, true) => {
                let p = sig(b * (r - s.kl));
                (1.0 - p, -b * p * (1.0 - p))
            }
            // 1 − σ(β(z − r)): derivative +β·σ(1 − σ).
            (KtoLoss::Kto, false) => {
                let p = sig(b * (s.kl - r));
                (1.0 - p, b * p * (1.0 - p))
            }
            (KtoLoss::ApoZeroUnpaired, true) => {
                let p = sig(b * r);
                (1.0 - p, -b * p * (1.0 - p))
            }
            (KtoLoss::ApoZeroUnpaired, false) => {
                let p = sig(b * r);
                (p, b * p * (1.0 - p))
            }
        };
        let w = if label {
            o.desirable_weight
        } else {
            o.undesirable_weight
        };
        loss += w * l / n;
        d[i] = w * g / n;
        if label {
            rc += b * r;
            lc += s.policy[i];
            nc += 1;
        } else {
            rr += b * r;
            lr += s.policy[i];
            nr += 1;
        }
    }
    let mut m = BTreeMap::from([("kl", s.kl)]);
    if nc > 0 {
        m.insert("rewards/chosen", rc / nc as f64);
        m.insert("logps/chosen", lc / nc as f64);
    }
    if nr > 0 {
        m.insert("rewards/rejected", rr / nr as f64);
        m.insert("logps/rejected", lr / nr as f64);
    }
    if nc > 0 && nr > 0 {
        m.insert("rewards/margins", rc / nc as f64 - rr / nr as f64);
    }
    (loss, d, m)
}

/// Means of each metric over the micro-batches that logged it (TRL averages its per-batch
/// lists the same way).
fn mean_metrics(all: &[BTreeMap<&'static str, f64>]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for m in all {
        for (k, v) in m {
            let e = sums.entry(k).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k.to_string(), s / n as f64))
        .collect()
}

impl<M: TrainModel> KtoObjective<M> {
    /// An objective over `examples` (evaluation on `eval`) whose reference is the policy with
    /// its adapter disabled.
    pub fn new(
        options: KtoOptions,
        examples: Vec<EncodedFeedback>,
        eval: Vec<EncodedFeedback>,
        batch_size: usize,
        pad: u32,
    ) -> Self {
        KtoObjective {
            examples,
            eval,
            options,
            batch_size,
            pad,
            reference_model: None,
        }
    }

    /// An objective whose reference is a frozen copy of `reference` (its adapter included).
    pub fn against(
        reference: &M,
        options: KtoOptions,
        examples: Vec<EncodedFeedback>,
        eval: Vec<EncodedFeedback>,
        batch_size: usize,
        pad: u32,
    ) -> Self {
        KtoObjective {
            reference_model: Some(reference.clone()),
            ..Self::new(options, examples, eval, batch_size, pad)
        }
    }

    fn rows(&self, set: &[EncodedFeedback], idx: &[usize]) -> Vec<Encoded> {
        idx.iter()
            .map(|&i| set[i].sequence_with(&set[i].completion, self.options.max_length))
            .collect()
    }

    /// Each prompt with the completion of the example before it in the micro-batch
    /// (cyclically), TRL's mismatched pairs for the KL term.
    fn kl_rows(&self, set: &[EncodedFeedback], idx: &[usize]) -> Vec<Encoded> {
        let n = idx.len();
        (0..n)
            .map(|k| {
                let other = &set[idx[(k + n - 1) % n]].completion;
                set[idx[k]].sequence_with(other, self.options.max_length)
            })
            .collect()
    }

    /// The reference's summed log-probabilities of the examples `idx` of `set` and (with the
    /// KL term; empty otherwise) of their mismatched KL rows. Where rows can share a prompt
    /// (no sliding window) the two rows of each prompt go in one row that runs the prompt once
    /// ([`shared_prefix`]), each completion cut to the same `max_length` as alone.
    fn references(
        &self,
        model: &M,
        set: &[EncodedFeedback],
        idx: &[usize],
    ) -> (Vec<f64>, Vec<f64>) {
        let with_kl = self.options.loss_type == KtoLoss::Kto;
        let base;
        let reference = match &self.reference_model {
            Some(r) => r,
            None => {
                base = model.without_adapter();
                &base
            }
        };
        if !with_kl || !shares_prefixes(reference) {
            let sums = |rows: Vec<Encoded>| {
                sequence_logprobs(reference, &TokenBatch::pad(&rows, self.pad)).0
            };
            let kl = if with_kl {
                sums(self.kl_rows(set, idx))
            } else {
                Vec::new()
            };
            return (sums(self.rows(set, idx)), kl);
        }
        let n = idx.len();
        let groups: Vec<PrefixGroup<'_>> = idx
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let e = &set[i];
                let room = self.options.max_length.saturating_sub(e.prompt.len());
                let other = &set[idx[(k + n - 1) % n]].completion;
                (
                    e.prompt.as_slice(),
                    vec![
                        (k, cut(&e.completion, room), true),
                        (n + k, cut(other, room), true),
                    ],
                )
            })
            .collect();
        let mut sums = sequence_sums(reference, &shared_prefix(&groups, self.pad), 2 * n);
        let kl = sums.split_off(n);
        (sums, kl)
    }

    /// The KL reference point of the micro-batch `idx` of `set` (no gradients), from the
    /// reference's sums of its KL rows.
    fn kl_point(
        &self,
        model: &M,
        set: &[EncodedFeedback],
        idx: &[usize],
        reference: &[f64],
    ) -> f64 {
        if self.options.loss_type != KtoLoss::Kto {
            return 0.0;
        }
        let rows = self.kl_rows(set, idx);
        let batch = TokenBatch::pad(&rows, self.pad);
        let policy = sequence_logprobs(model, &batch).0;
        let mean = policy
            .iter()
            .zip(reference)
            .map(|(p, r)| p - r)
            .sum::<f64>()
            / idx.len().max(1) as f64;
        mean.max(0.0)
    }

    /// Loss and TRL metrics of the training (`eval == false`) or evaluation set under
    /// `model`, in micro-batches of the training batch size in order, without gradients.
    pub fn metrics_on(&self, model: &M, eval: bool) -> (f64, BTreeMap<String, f64>) {
        let set = if eval { &self.eval } else { &self.examples };
        let idx: Vec<usize> = (0..set.len()).collect();
        let (mut loss, mut all) = (0.0, Vec::new());
        let chunks: Vec<&[usize]> = idx.chunks(self.batch_size.max(1)).collect();
        for chunk in &chunks {
            let rows = self.rows(set, chunk);
            let batch = TokenBatch::pad(&rows, self.pad);
            let (reference, reference_kl) = self.references(model, set, chunk);
            let scored = Scored {
                policy: sequence_logprobs(model, &batch).0,
                reference,
                kl: self.kl_point(model, set, chunk, &reference_kl),
            };
            let labels: Vec<bool> = chunk.iter().map(|&i| set[i].label).collect();
            let (l, _, m) = micro_loss(&self.options, &labels, &scored);
            loss += l / chunks.len() as f64;
            all.push(m);
        }
        (loss, mean_metrics(&all))
    }
}

impl<M: TrainModel> Objective<M> for KtoObjective<M> {
    fn num_examples(&self) -> usize {
        self.examples.len()
    }

    fn batches(&self, order: &[usize]) -> Vec<MicroBatch> {
        order
            .chunks(self.batch_size.max(1))
            .map(|idx| {
                let rows = self.rows(&self.examples, idx);
                MicroBatch {
                    batch: padded(&rows, self.pad),
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
        let mut grads = Grads::new();
        let (mut loss, mut all) = (0.0, Vec::with_capacity(micro.len()));
        let (mut trained, mut tokens) = (0, 0);
        // The Trainer averages the micro-batches' mean losses over the accumulation.
        let per_micro = 1.0 / micro.len().max(1) as f64;
        for (i, m) in micro.iter().enumerate() {
            let b = &m.batch;
            trained += b.targets.len();
            tokens += b.real_tokens;
            let (reference, reference_kl) = self.references(model, &self.examples, &m.examples);
            let kl = self.kl_point(model, &self.examples, &m.examples, &reference_kl);
            let fwd = forward(model, b, trainable, &options.micro(i));
            let mut policy = vec![0f64; b.batch];
            for (t, v) in b.targets.iter().zip(&fwd.target_logps) {
                policy[t.seq] += *v as f64;
            }
            let labels: Vec<bool> = m.examples.iter().map(|&k| self.examples[k].label).collect();
            let scored = Scored {
                policy,
                reference,
                kl,
            };
            let (l, d_row, metrics) = micro_loss(&self.options, &labels, &scored);
            loss += l * per_micro;
            all.push(metrics);
            let d: Vec<f32> = b
                .targets
                .iter()
                .map(|t| (d_row[t.seq] * per_micro) as f32)
                .collect();
            add_grads(model, &mut grads, backward(model, fwd, &d, trainable));
        }
        Ok(StepOutput {
            loss,
            grads,
            trained,
            tokens,
            metrics: mean_metrics(&all),
        })
    }

    fn evaluate(&self, model: &M) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.metrics_on(model, true)))
    }
}
