//! GRPO's training step over rollouts: their batches, the log-probabilities (and entropies)
//! of their completions, and the loss of [`super::loss`] with its gradient through the model.

use std::collections::BTreeMap;

use super::loss::{GrpoLossOptions, SeqLogps, micro_loss};
use crate::error::{Error, Result};
use crate::tokenizer::Encoded;
use crate::train::batches::{PrefixGroup, padded, shared_prefix, shares_prefixes};
use crate::train::params::TrainModel;
use crate::train::step::{Grads, StepBatch, StepOptions, Trainable, backward, forward};
use crate::train::trainer::{StepOutput, add_grads};

/// One generated completion of a prompt, ready for training steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The prompt's ids.
    pub prompt: Vec<u32>,
    /// The completion's ids (its end of turn included when it stopped).
    pub completion: Vec<u32>,
    /// Its group-relative advantage.
    pub advantage: f64,
    /// Per-token log-probabilities under the policy that generated it, when training on it
    /// more than once (`num_iterations > 1`); `None`: the current policy's, not differentiated.
    pub old: Option<Vec<f32>>,
    /// Per-token log-probabilities under the reference (`beta ≠ 0`).
    pub reference: Option<Vec<f32>>,
    /// Left out of the loss (a truncated completion with `mask_truncated_completions`).
    pub masked: bool,
}

/// The rollouts as a training batch, the completion's tokens (of rollouts not masked) as the
/// targets (`seq`: the rollout's index). With `share`, consecutive rollouts of one prompt
/// (a group) go in one row that runs the prompt once ([`shared_prefix`]: each completion sees
/// the prompt and itself, so the numbers are those of separate rows, at about half the tokens
/// for GRPO's groups); otherwise rows `prompt + completion`, right-padded with `pad`.
pub fn rollout_batch(rs: &[&Rollout], pad: u32, share: bool) -> StepBatch {
    if share {
        let mut groups: Vec<PrefixGroup<'_>> = Vec::new();
        for (k, r) in rs.iter().enumerate() {
            let c = (k, r.completion.as_slice(), !r.masked);
            match groups.last_mut() {
                Some((p, cs)) if *p == r.prompt.as_slice() => cs.push(c),
                _ => groups.push((r.prompt.as_slice(), vec![c])),
            }
        }
        return shared_prefix(&groups, pad);
    }
    let seqs: Vec<Encoded> = rs
        .iter()
        .map(|r| {
            let mut ids = r.prompt.clone();
            ids.extend_from_slice(&r.completion);
            let mut mask = vec![0u8; r.prompt.len()];
            mask.resize(ids.len(), u8::from(!r.masked));
            Encoded { ids, mask }
        })
        .collect();
    padded(&seqs, pad)
}

/// Per-token log-probabilities of the rollouts' completions under `model` at `temperature`
/// (the logits divided by it, as TRL computes them), without gradients (`batch_size`
/// rollouts per pass).
pub fn completion_logps<M: TrainModel>(
    model: &M,
    rs: &[&Rollout],
    batch_size: usize,
    pad: u32,
    temperature: f64,
) -> Vec<Vec<f32>> {
    logps_and_entropy(model, rs, batch_size, pad, temperature, false).0
}

/// [`completion_logps`], and with `entropy` the entropy of each completion token's
/// distribution (empty rows where the backend computes none).
pub fn logps_and_entropy<M: TrainModel>(
    model: &M,
    rs: &[&Rollout],
    batch_size: usize,
    pad: u32,
    temperature: f64,
    entropy: bool,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let nothing = Trainable::nothing();
    let options = StepOptions {
        temperature: Some(temperature as f32),
        entropy,
        ..StepOptions::default()
    };
    let (mut out, mut ents) = (Vec::with_capacity(rs.len()), Vec::with_capacity(rs.len()));
    for chunk in rs.chunks(batch_size.max(1)) {
        let unmasked: Vec<Rollout> = chunk
            .iter()
            .map(|r| Rollout {
                masked: false,
                ..(*r).clone()
            })
            .collect();
        let refs: Vec<&Rollout> = unmasked.iter().collect();
        let b = rollout_batch(&refs, pad, shares_prefixes(model));
        let fwd = forward(model, &b, &nothing, &options);
        let mut per = vec![Vec::new(); chunk.len()];
        let mut per_e = vec![Vec::new(); chunk.len()];
        for (i, (t, lp)) in b.targets.iter().zip(&fwd.target_logps).enumerate() {
            per[t.seq].push(*lp);
            if let Some(e) = &fwd.target_entropy {
                per_e[t.seq].push(e[i]);
            }
        }
        out.extend(per);
        ents.extend(per_e);
    }
    (out, ents)
}

/// TRL's `entropy` metric of one micro-batch: the mean entropy over its completion tokens
/// (those of rollouts left out of the loss excluded; 0 without any, as TRL's clamped mean).
pub fn mean_entropy<'a>(rows: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for r in rows {
        sum += r.iter().map(|&e| f64::from(e)).sum::<f64>();
        n += r.len();
    }
    sum / n.max(1) as f64
}

/// GRPO's loss, gradients and TRL's metrics (`kl`, `entropy`, `clip_ratio/*`,
/// `cispo_clip_ratio`) for one optimiser step over `micro` (micro-batches of rollouts).
pub fn grpo_step<M: TrainModel>(
    model: &M,
    micro: &[Vec<&Rollout>],
    o: &GrpoLossOptions,
    trainable: &Trainable,
    options: &StepOptions,
    pad: u32,
) -> Result<StepOutput<M::T>> {
    let step_tokens: usize = micro
        .iter()
        .flatten()
        .filter(|r| !r.masked)
        .map(|r| r.completion.len())
        .sum();
    let mut grads = Grads::new();
    let (mut loss, mut trained, mut tokens) = (0.0, 0, 0);
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let (mut low_min, mut high_max): (Option<f64>, Option<f64>) = (None, None);
    for (i, rs) in micro.iter().enumerate() {
        let b = rollout_batch(rs, pad, shares_prefixes(model));
        trained += b.targets.len();
        tokens += b.real_tokens;
        let step_options = StepOptions {
            temperature: Some(o.temperature as f32),
            entropy: true,
            ..options.micro(i)
        };
        let fwd = forward(model, &b, trainable, &step_options);
        let mut policy = vec![Vec::new(); rs.len()];
        for (t, lp) in b.targets.iter().zip(&fwd.target_logps) {
            policy[t.seq].push(*lp);
        }
        // The targets are the completion tokens of the rollouts in the loss.
        if let Some(e) = &fwd.target_entropy {
            let en = sums.entry("entropy".into()).or_insert((0.0, 0.0));
            en.0 += mean_entropy([e.as_slice()]);
            en.1 += 1.0;
        }
        let seqs: Vec<SeqLogps<'_>> = rs
            .iter()
            .zip(&policy)
            .filter(|(r, _)| !r.masked)
            .map(|(r, p)| SeqLogps {
                policy: p,
                old: r.old.as_deref(),
                reference: r.reference.as_deref(),
                advantage: r.advantage,
            })
            .collect();
        if o.beta != 0.0 && seqs.iter().any(|s| s.reference.is_none()) {
            return Err(Error::Invalid(
                "GRPO with beta ≠ 0 needs the reference's log-probabilities".into(),
            ));
        }
        let m = micro_loss(o, &seqs, step_tokens, micro.len());
        loss += m.loss;
        for (k, (v, n)) in m.sums {
            let e = sums.entry(k).or_insert((0.0, 0.0));
            e.0 += v;
            e.1 += n;
        }
        low_min = match (low_min, m.low_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        high_max = match (high_max, m.high_max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        // Gradients back onto the targets, in the batch's target order (masked rows have none).
        let mut d_seq = m.d_policy.into_iter();
        let mut per_row: Vec<Vec<f64>> = Vec::with_capacity(rs.len());
        for r in rs.iter() {
            per_row.push(if r.masked {
                Vec::new()
            } else {
                d_seq.next().expect("one gradient per active rollout")
            });
        }
        let mut next = vec![0usize; rs.len()];
        let d: Vec<f32> = b
            .targets
            .iter()
            .map(|t| {
                let k = next[t.seq];
                next[t.seq] += 1;
                per_row[t.seq][k] as f32
            })
            .collect();
        add_grads(model, &mut grads, backward(model, fwd, &d, trainable));
    }
    let mut metrics: BTreeMap<String, f64> = sums
        .into_iter()
        .map(|(k, (v, n))| (k, v / n.max(1.0)))
        .collect();
    if let Some(v) = low_min {
        metrics.insert("clip_ratio/low_min".into(), v);
    }
    if let Some(v) = high_max {
        metrics.insert("clip_ratio/high_max".into(), v);
    }
    Ok(StepOutput {
        loss,
        grads,
        trained,
        tokens,
        metrics,
    })
}
