//! Reward-model training (TRL's `RewardTrainer`) as an [`Objective`] of the training loop.
//!
//! The model is a sequence classifier with one label (transformers'
//! `AutoModelForSequenceClassification`, `num_labels = 1`): the reward of a sequence is
//! `score.weight · h`, with `h` the final hidden state of its last token that is not padding
//! (transformers' rule: the rightmost id different from the pad id). Each pair gives two rows,
//! chosen then rejected; the loss is Bradley–Terry, `−log σ(r_c − r_r)` averaged over the pairs,
//! plus `center_rewards_coefficient · mean((r_c + r_r)²)` when set (Eisenstein et al. 2023).
//! The body is trained through its LoRA factors and the score head in full (PEFT's
//! `modules_to_save = ["score"]`), by the same hand-written backward as SFT, started from the
//! hidden states' gradient ([`backward_hidden`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::params::TrainModel;
use super::step::{Grads, StepBatch, StepOptions, Target, Trainable, backward_hidden, forward};
use super::trainer::{MicroBatch, Objective, StepOutput, add_grads};
use crate::data::RewardPair;
use crate::error::{Error, Result};
use crate::model::Positions;

/// Options of reward-model training (TRL's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardOptions {
    /// Weight of the penalty `mean((r_c + r_r)²)` that keeps rewards centred on zero (TRL's
    /// `center_rewards_coefficient`; `None`: off).
    pub center_rewards_coefficient: Option<f64>,
    /// Pairs with a side longer than this are left out, as TRL filters them (default 1024;
    /// `None`: keep all).
    pub max_length: Option<usize>,
}

impl Default for RewardOptions {
    fn default() -> Self {
        RewardOptions {
            center_rewards_coefficient: None,
            max_length: Some(1024),
        }
    }
}

/// The position transformers' sequence classifiers read: the rightmost token that is not
/// `pad` (0 when every token is padding).
pub fn score_position(ids: &[u32], pad: u32) -> usize {
    ids.iter().rposition(|&t| t != pad).unwrap_or(0)
}

/// Rows `seqs` padded with `pad` on the right, one target per row at its scored position.
pub fn score_batch(seqs: &[&[u32]], pad: u32) -> StepBatch {
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut targets = Vec::with_capacity(seqs.len());
    for (row, s) in seqs.iter().enumerate() {
        ids.extend_from_slice(s);
        ids.resize((row + 1) * len, pad);
        targets.push(Target {
            pos: row * len + score_position(&ids[row * len..], pad),
            id: 0,
            seq: row,
        });
    }
    StepBatch {
        ids,
        batch: seqs.len(),
        len,
        positions: Positions::Range {
            start: 0,
            len,
            batch: seqs.len(),
        },
        segments: None,
        targets,
        real_tokens: seqs.iter().map(|s| s.len()).sum(),
    }
}

/// A batch of pairs as TRL's collator lays it out: every chosen row, then every rejected row.
fn pair_batch(pairs: &[&RewardPair], pad: u32) -> StepBatch {
    let rows: Vec<&[u32]> = pairs
        .iter()
        .map(|p| p.chosen.as_slice())
        .chain(pairs.iter().map(|p| p.rejected.as_slice()))
        .collect();
    score_batch(&rows, pad)
}

/// The reward head's weights `[hidden]` of `model`.
pub fn score_weights<M: TrainModel>(model: &M) -> Result<Vec<f32>> {
    let name = "score.weight".to_string();
    let p = model.host_params(std::slice::from_ref(&name))?;
    let (_, t) = p.into_iter().next().ok_or_else(|| {
        Error::Invalid("the model has no score head (a reward model needs one)".into())
    })?;
    Ok(crate::weights::to_f32_vec(t.into_data()))
}

/// A fresh score head `[1, hidden]`, drawn as transformers initialises a linear layer's
/// weight: normal with standard deviation 0.02 (`initializer_range`), from `seed`.
pub fn score_head(hidden: usize, seed: u64) -> fedtune_aggregation::Matrix {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5C0E_5C0E);
    // Box–Muller.
    let w: Vec<f32> = (0..hidden)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.02) as f32
        })
        .collect();
    fedtune_aggregation::Matrix::new(1, hidden, w)
}

/// `adapter` with a fresh score head for a model of `config` (a federation that trains a
/// reward model starts every client from this one head; see [`score_head`]).
pub fn add_score_head(
    adapter: &mut fedtune_aggregation::Adapter,
    config: &crate::config::ModelConfig,
    seed: u64,
) {
    adapter.dense.insert(
        crate::adapter::SCORE_KEY.into(),
        score_head(config.hidden_size, seed),
    );
}

/// `(loss, metrics)` of rewards `(r_c, r_r)` per pair, with TRL's metric names (`accuracy`,
/// `margin`, `min_reward`, `mean_reward`, `max_reward`).
pub fn reward_metrics(
    rewards: &[(f64, f64)],
    options: &RewardOptions,
) -> (f64, BTreeMap<String, f64>) {
    let n = rewards.len().max(1) as f64;
    let mut loss = rewards.iter().map(|(c, r)| softplus(-(c - r))).sum::<f64>() / n;
    if let Some(k) = options.center_rewards_coefficient {
        loss += k * rewards.iter().map(|(c, r)| (c + r).powi(2)).sum::<f64>() / n;
    }
    let all = || rewards.iter().flat_map(|(c, r)| [*c, *r]);
    let mut m = BTreeMap::new();
    m.insert(
        "accuracy".into(),
        rewards.iter().filter(|(c, r)| c > r).count() as f64 / n,
    );
    m.insert(
        "margin".into(),
        rewards.iter().map(|(c, r)| c - r).sum::<f64>() / n,
    );
    m.insert("min_reward".into(), all().fold(f64::INFINITY, f64::min));
    m.insert("max_reward".into(), all().fold(f64::NEG_INFINITY, f64::max));
    m.insert("mean_reward".into(), all().sum::<f64>() / (2.0 * n));
    (loss, m)
}

/// `log(1 + eˣ)`, stable.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `σ(x)`.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Rewards of `rows` (each `[hidden]`, row-major) under score weights `w`.
fn rewards_of(hidden: &[f32], w: &[f32]) -> Vec<f64> {
    hidden
        .chunks(w.len())
        .map(|h| {
            h.iter()
                .zip(w)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        })
        .collect()
}

/// Reward-model training over preference pairs.
pub struct RewardObjective {
    pairs: Vec<RewardPair>,
    eval: Vec<RewardPair>,
    options: RewardOptions,
    batch_size: usize,
    pad: u32,
}

impl RewardObjective {
    /// An objective over `pairs` (evaluation on `eval`), `batch_size` pairs per micro-batch,
    /// padded with `pad` (the model's pad id, which also marks where the score is read).
    pub fn new(
        options: RewardOptions,
        pairs: Vec<RewardPair>,
        eval: Vec<RewardPair>,
        batch_size: usize,
        pad: u32,
    ) -> Self {
        RewardObjective {
            pairs,
            eval,
            options,
            batch_size,
            pad,
        }
    }

    /// Rewards `(r_c, r_r)` of every pair of the training (`eval == false`) or evaluation set
    /// under `model`, without gradients.
    pub fn rewards<M: TrainModel>(&self, model: &M, eval: bool) -> Result<Vec<(f64, f64)>> {
        let set = if eval { &self.eval } else { &self.pairs };
        score_pairs(model, set, self.batch_size, self.pad)
    }

    /// Loss and TRL metrics of the training or evaluation set under `model`.
    pub fn metrics_on<M: TrainModel>(
        &self,
        model: &M,
        eval: bool,
    ) -> Result<(f64, BTreeMap<String, f64>)> {
        Ok(reward_metrics(&self.rewards(model, eval)?, &self.options))
    }
}

/// The rewards of the rows of `b` (one target per row) under the score head `w`, without
/// gradients.
fn batch_rewards<M: TrainModel>(model: &M, b: &StepBatch, w: &[f32]) -> Vec<f64> {
    let nothing = Trainable::nothing();
    let options = StepOptions {
        hidden_head: true,
        ..StepOptions::default()
    };
    let fwd = forward(model, b, &nothing, &options);
    let h = fwd
        .target_hidden(model)
        .expect("kept for the caller's head");
    rewards_of(&h, w)
}

/// Rewards `(r_c, r_r)` of `pairs` under the reward model `model`, `batch_size` pairs at a time.
pub fn score_pairs<M: TrainModel>(
    model: &M,
    pairs: &[RewardPair],
    batch_size: usize,
    pad: u32,
) -> Result<Vec<(f64, f64)>> {
    let w = score_weights(model)?;
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&RewardPair> = chunk.iter().collect();
        let r = batch_rewards(model, &pair_batch(&refs, pad), &w);
        let n = chunk.len();
        out.extend((0..n).map(|k| (r[k], r[n + k])));
    }
    Ok(out)
}

/// The rewards of token sequences under the reward model `model`, `batch_size` at a time.
pub fn score_sequences<M: TrainModel>(
    model: &M,
    seqs: &[Vec<u32>],
    batch_size: usize,
    pad: u32,
) -> Result<Vec<f64>> {
    let w = score_weights(model)?;
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        out.extend(batch_rewards(model, &score_batch(&rows, pad), &w));
    }
    Ok(out)
}

/// A model that scores token sequences with its score head: a reward model, on its device.
pub trait SequenceScorer: Send + Sync {
    /// The rewards of `seqs`, `batch_size` at a time ([`score_sequences`]).
    fn score_sequences(&self, seqs: &[Vec<u32>], batch_size: usize, pad: u32) -> Result<Vec<f64>>;
}

impl<M: TrainModel + Send + Sync> SequenceScorer for M {
    fn score_sequences(&self, seqs: &[Vec<u32>], batch_size: usize, pad: u32) -> Result<Vec<f64>> {
        score_sequences(self, seqs, batch_size, pad)
    }
}

/// A base model that a reward model's adapter attaches to, on the base's device (the host
/// engine, or a GPU: a GRPO run scores its completions where it trains).
pub trait RewardBase {
    /// The base (its own adapter left out) with `adapter`'s LoRA factors and score head.
    fn with_reward_adapter(&self, adapter: &crate::PeftAdapter) -> Result<Box<dyn SequenceScorer>>;
}

impl RewardBase for crate::LlamaModel {
    fn with_reward_adapter(&self, adapter: &crate::PeftAdapter) -> Result<Box<dyn SequenceScorer>> {
        let mut model = self.without_adapter();
        model.attach_adapter(adapter)?;
        Ok(Box::new(model))
    }
}

impl RewardBase for crate::cuda::CudaModel {
    fn with_reward_adapter(&self, adapter: &crate::PeftAdapter) -> Result<Box<dyn SequenceScorer>> {
        use crate::device::Backend;
        let mut model = self.without_adapter();
        model.attach_adapter(adapter)?;
        Ok(Box::new(model))
    }
}

/// A reward model as a reward function of GRPO (TRL's `reward_funcs` given a sequence
/// classifier): the base model with a `fedtune train reward` adapter (LoRA factors and score
/// head), on the base's device. A completion's reward is the score of its prompt and itself,
/// tokenised as TRL's `GRPOTrainer` tokenises them for a reward model: a conversation's
/// messages with the completion as the assistant's turn through the chat template, or prompt
/// text + completion text, without special tokens added.
pub struct RewardModel {
    model: Box<dyn SequenceScorer>,
    tokenizer: std::sync::Arc<crate::Tokenizer>,
    /// Where the adapter came from (for messages).
    pub path: std::path::PathBuf,
}

impl std::fmt::Debug for RewardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardModel")
            .field("path", &self.path)
            .finish()
    }
}

impl RewardModel {
    /// The reward model of the adapter at `path` on `base` (its own adapter, if any, left
    /// out), tokenising with `tokenizer`.
    pub fn load<B: RewardBase + ?Sized>(
        base: &B,
        tokenizer: std::sync::Arc<crate::Tokenizer>,
        path: &std::path::Path,
    ) -> Result<Self> {
        let adapter = crate::PeftAdapter::load(path)?;
        if adapter.score().is_none() {
            return Err(Error::Invalid(format!(
                "{}: not a reward model (no score head): train one with `fedtune train reward`",
                path.display()
            )));
        }
        let model = base.with_reward_adapter(&adapter).map_err(|e| {
            Error::Invalid(format!(
                "{}: applying the reward model: {e}",
                path.display()
            ))
        })?;
        Ok(RewardModel {
            model,
            tokenizer,
            path: path.to_path_buf(),
        })
    }

    /// The reward of each completion of its prompt.
    pub fn score(&self, inputs: &[crate::rewards::RewardInput<'_>]) -> Result<Vec<f32>> {
        let tok = &self.tokenizer;
        let seqs: Vec<Vec<u32>> = inputs
            .iter()
            .map(|i| match i.messages {
                Some(m) => {
                    let mut all = m.to_vec();
                    all.push(crate::template::Message::new(
                        "assistant",
                        i.completion.to_string(),
                    ));
                    tok.encode(&tok.render(&all, false)?)
                }
                None => tok.encode(&format!("{}{}", i.prompt, i.completion)),
            })
            .collect::<Result<_>>()?;
        Ok(self
            .model
            .score_sequences(&seqs, 8, tok.pad_id)?
            .into_iter()
            .map(|r| r as f32)
            .collect())
    }
}

impl<M: TrainModel> Objective<M> for RewardObjective {
    fn num_examples(&self) -> usize {
        self.pairs.len()
    }

    fn batches(&self, order: &[usize]) -> Vec<MicroBatch> {
        order
            .chunks(self.batch_size.max(1))
            .map(|idx| {
                let pairs: Vec<&RewardPair> = idx.iter().map(|&i| &self.pairs[i]).collect();
                MicroBatch {
                    batch: pair_batch(&pairs, self.pad),
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
        let w = score_weights(model)?;
        let hidden = w.len();
        let n_pairs: usize = micro.iter().map(|m| m.examples.len()).sum();
        let center = self.options.center_rewards_coefficient;
        let mut grads = Grads::new();
        let mut dw = vec![0f64; hidden];
        let mut all = Vec::with_capacity(n_pairs);
        let (mut trained, mut tokens) = (0, 0);
        for (i, m) in micro.iter().enumerate() {
            let b = &m.batch;
            trained += b.targets.len();
            tokens += b.real_tokens;
            let opts = StepOptions {
                hidden_head: true,
                ..options.micro(i)
            };
            let fwd = forward(model, b, trainable, &opts);
            let h = fwd
                .target_hidden(model)
                .expect("kept for the caller's head");
            let r = rewards_of(&h, &w);
            let n = m.examples.len();
            // ∂loss/∂r per row: chosen rows first, then rejected.
            let mut dr = vec![0f64; 2 * n];
            for k in 0..n {
                let (c, rj) = (r[k], r[n + k]);
                let s = sigmoid(-(c - rj)) / n_pairs as f64;
                dr[k] = -s;
                dr[n + k] = s;
                if let Some(coef) = center {
                    let g = coef * 2.0 * (c + rj) / n_pairs as f64;
                    dr[k] += g;
                    dr[n + k] += g;
                }
                all.push((c, rj));
            }
            let mut dh = vec![0f32; h.len()];
            for (row, d) in dr.iter().enumerate() {
                let hr = &h[row * hidden..(row + 1) * hidden];
                for j in 0..hidden {
                    dh[row * hidden + j] = (d * f64::from(w[j])) as f32;
                    dw[j] += d * f64::from(hr[j]);
                }
            }
            add_grads(
                model,
                &mut grads,
                backward_hidden(model, fwd, &dh, trainable),
            );
        }
        // The head's gradient, at the same loss scale as the body's.
        let scale = f64::from(options.loss_scale());
        let dw: Vec<f32> = dw.iter().map(|g| (g * scale) as f32).collect();
        grads.insert("score.weight".into(), model.grad_from_host(&dw, 1, hidden));
        let (loss, metrics) = reward_metrics(&all, &self.options);
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
        Ok(Some(self.metrics_on(model, true)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_read_on_the_last_token_that_is_not_padding() {
        assert_eq!(score_position(&[5, 6, 7, 2, 2], 2), 2);
        assert_eq!(score_position(&[5, 2, 7], 2), 2);
        assert_eq!(score_position(&[2, 2], 2), 0);
        let b = score_batch(&[&[5, 6, 2], &[7]], 2);
        assert_eq!(b.len, 3);
        assert_eq!(b.ids, vec![5, 6, 2, 7, 2, 2]);
        let pos: Vec<usize> = b.targets.iter().map(|t| t.pos).collect();
        assert_eq!(pos, vec![1, 3]);
    }

    #[test]
    fn bradley_terry_metrics() {
        let (loss, m) = reward_metrics(&[(1.0, 0.0), (0.0, 2.0)], &RewardOptions::default());
        let want = (softplus(-1.0) + softplus(2.0)) / 2.0;
        assert!((loss - want).abs() < 1e-12);
        assert_eq!(m["accuracy"], 0.5);
        assert_eq!(m["margin"], -0.5);
        assert_eq!((m["min_reward"], m["max_reward"]), (0.0, 2.0));
        assert_eq!(m["mean_reward"], 0.75);
        let centred = RewardOptions {
            center_rewards_coefficient: Some(0.1),
            ..RewardOptions::default()
        };
        let (l2, _) = reward_metrics(&[(1.0, 0.0), (0.0, 2.0)], &centred);
        assert!((l2 - (want + 0.1 * (1.0 + 4.0) / 2.0)).abs() < 1e-12);
    }
}
