//! Knowledge distillation as TRL 1.16's `GKDTrainer` (`trl.experimental.gkd`) computes it, as
//! an [`Objective`] of the training loop: a frozen teacher that shares the student's
//! tokenizer, and at every trained position the generalized Jensen–Shannon divergence
//! between the two next-token distributions over the whole vocabulary
//! ([`generalized_jsd`]: `beta = 0` is the forward KL `KL(teacher‖student)`, `beta = 1` the
//! reverse KL `KL(student‖teacher)`), summed over the step's completion tokens and divided by
//! their number (TRL's `batchmean` with the step's token count).
//!
//! Which completions: with probability `lmbda` per micro-batch the student samples its own
//! (on-policy, at `temperature`, top-k and top-p off, up to `max_new_tokens`, through the end
//! of turn), else with `seq_kd` the teacher samples them, else the data's are used. As in
//! TRL, `temperature` is the sampling temperature: the divergence is taken at temperature 1.
//!
//! Memory: neither model's logits are held for a whole sequence. The student's forward keeps
//! the final hidden states of its trained positions; the teacher's forward (without
//! gradients, no adapter) gives its hidden states; then, a few hundred positions at a time,
//! both heads' logits, the divergence and its gradient with respect to the student's logits,
//! and that gradient through the head (`d_logits · W`) are computed and the logits dropped.
//! Backward then starts from the hidden states' gradient ([`backward_hidden`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::batches::padded;
use super::params::TrainModel;
use super::step::{Grads, StepBatch, StepOptions, Trainable, backward_hidden, forward};
use super::trainer::{MicroBatch, Objective, StepOutput, add_grads};
use crate::data::EncodedCompletion;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::generate::{GenerationConfig, generate_groups};
use crate::tokenizer::Encoded;

/// Options of distillation (TRL's `GKDConfig` names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillOptions {
    /// Interpolation of the generalized JSD in `[0, 1]`: 0 is `KL(teacher‖student)`, 1 is
    /// `KL(student‖teacher)`.
    pub beta: f64,
    /// Share of micro-batches whose completions the student samples itself, in `[0, 1]`.
    pub lmbda: f64,
    /// Sampling temperature of generated completions.
    pub temperature: f64,
    /// Tokens a generated completion has at most.
    pub max_new_tokens: usize,
    /// Off-policy micro-batches train on the teacher's sampled completions instead of the
    /// data's (sequence-level KD).
    pub seq_kd: bool,
    /// Train without LoRA dropout (TRL's default).
    pub disable_dropout: bool,
    /// Prompt + completion keep their last `max_length` tokens.
    pub max_length: usize,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            beta: 0.5,
            lmbda: 0.5,
            temperature: 0.9,
            max_new_tokens: 128,
            seq_kd: false,
            disable_dropout: true,
            max_length: 1024,
        }
    }
}

impl DistillOptions {
    /// Checks ranges; the message names the option.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..=1.0).contains(&self.beta) {
            return Err("beta must be in [0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.lmbda) {
            return Err("lmbda must be in [0, 1]".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err("temperature must be positive".into());
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        if self.max_length < 2 {
            return Err("max_length must be at least 2".into());
        }
        Ok(())
    }
}

/// TRL's `generalized_jsd_loss` at one position: the divergence between the student's and
/// the teacher's next-token distributions (logits divided by `temperature` first). Returns
/// the divergence and adds `scale · ∂divergence/∂student_logits` into `grad`.
///
/// With `s`, `t` the log-probabilities and `m = (1 − β)·p_s + β·p_t`:
/// `β·KL(t‖m) + (1 − β)·KL(s‖m)` for `0 < β < 1`, `KL(t‖s)` at `β = 0`, `KL(s‖t)` at `β = 1`
/// (TRL's special cases: the mixture formula vanishes there).
pub fn generalized_jsd(
    student: &[f32],
    teacher: &[f32],
    beta: f64,
    temperature: f64,
    scale: f64,
    grad: &mut [f32],
) -> f64 {
    assert_eq!(student.len(), teacher.len(), "one vocabulary");
    assert_eq!(grad.len(), student.len(), "one gradient per logit");
    let log_softmax = |z: &[f32]| -> Vec<f64> {
        let z: Vec<f64> = z.iter().map(|v| f64::from(*v) / temperature).collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        z.iter().map(|v| v - lse).collect()
    };
    let s = log_softmax(student);
    let t = log_softmax(teacher);
    // ∂L/∂z_k = p_k·(g_k − Σ_j p_j·g_j) / T, with g = ∂L/∂p_s (up to a constant).
    let chain = |g: &[f64], loss_grad: &mut [f32]| {
        let mean: f64 = s.iter().zip(g).map(|(sk, gk)| sk.exp() * gk).sum();
        for ((out, sk), gk) in loss_grad.iter_mut().zip(&s).zip(g) {
            *out += (scale * sk.exp() * (gk - mean) / temperature) as f32;
        }
    };
    if beta == 0.0 {
        // KL(t‖s) = Σ p_t (t − s); ∂/∂z = (p_s − p_t)/T.
        let mut loss = 0.0;
        for ((out, sk), tk) in grad.iter_mut().zip(&s).zip(&t) {
            loss += tk.exp() * (tk - sk);
            *out += (scale * (sk.exp() - tk.exp()) / temperature) as f32;
        }
        loss
    } else if beta == 1.0 {
        // KL(s‖t) = Σ p_s (s − t); g_k = s_k − t_k.
        let g: Vec<f64> = s.iter().zip(&t).map(|(sk, tk)| sk - tk).collect();
        let loss = s.iter().zip(&g).map(|(sk, gk)| sk.exp() * gk).sum();
        chain(&g, grad);
        loss
    } else {
        let (ls, lt) = ((-beta).ln_1p(), beta.ln());
        let log_m: Vec<f64> = s
            .iter()
            .zip(&t)
            .map(|(sk, tk)| {
                let (a, b) = (sk + ls, tk + lt);
                let hi = a.max(b);
                hi + ((a - hi).exp() + (b - hi).exp()).ln()
            })
            .collect();
        let mut loss = 0.0;
        for ((sk, tk), lm) in s.iter().zip(&t).zip(&log_m) {
            loss += beta * tk.exp() * (tk - lm) + (1.0 - beta) * sk.exp() * (sk - lm);
        }
        // ∂L/∂p_s,k = (1 − β)(s_k − log m_k).
        let g: Vec<f64> = s
            .iter()
            .zip(&log_m)
            .map(|(sk, lm)| (1.0 - beta) * (sk - lm))
            .collect();
        chain(&g, grad);
        loss
    }
}

/// Positions whose logits are computed at once: about 16 MiB of f32 logits per model.
fn rows_per_chunk(vocab: usize) -> usize {
    ((4 << 20) / vocab.max(1)).clamp(1, 1024)
}

/// Takes each chunk's gradient with respect to the student's logits `[rows, vocab]`, and its
/// number of rows.
type LogitGrads<'a> = &'a mut dyn FnMut(&[f32], usize);

/// The divergence summed over `n` positions, a chunk of positions at a time: `student(r)` and
/// `teacher(r)` give the logits `[r.len(), vocab]` of positions `r`; with `d_logits`, each
/// chunk's `scale · ∂/∂student_logits` is handed to it.
fn chunked_divergence(
    n: usize,
    vocab: usize,
    o: &DistillOptions,
    scale: f64,
    student: &dyn Fn(std::ops::Range<usize>) -> Vec<f32>,
    teacher: &dyn Fn(std::ops::Range<usize>) -> Vec<f32>,
    mut d_logits: Option<LogitGrads<'_>>,
) -> f64 {
    let chunk = rows_per_chunk(vocab);
    let mut total = 0.0;
    let mut grad = Vec::new();
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let (zs, zt) = (student(start..end), teacher(start..end));
        grad.clear();
        grad.resize((end - start) * vocab, 0f32);
        for ((s, t), g) in zs
            .chunks(vocab)
            .zip(zt.chunks(vocab))
            .zip(grad.chunks_mut(vocab))
        {
            // The divergence is taken at temperature 1, as GKDTrainer's compute_loss does.
            total += generalized_jsd(s, t, o.beta, 1.0, scale, g);
        }
        if let Some(f) = d_logits.as_mut() {
            f(&grad, end - start);
        }
    }
    total
}

/// The final hidden states of `batch` under `m` (inference: no gradients).
fn final_hidden<B: Backend>(m: &B, batch: &StepBatch) -> B::T {
    crate::device::forward(
        m,
        &batch.ids,
        batch.batch,
        batch.len,
        &batch.positions,
        batch.segments.as_deref(),
        None,
    )
}

/// Where a micro-batch's completions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Data,
    Student,
    Teacher,
}

/// Distillation from a frozen teacher as a training objective.
pub struct DistillObjective<'t, Tc> {
    teacher: &'t Tc,
    examples: Vec<EncodedCompletion>,
    eval: Vec<EncodedCompletion>,
    options: DistillOptions,
    batch_size: usize,
    pad: u32,
    stop_ids: Vec<u32>,
    seed: u64,
    /// Micro-batches drawn so far (each draws its source and sampling seeds from it).
    draws: AtomicU64,
}

impl<'t, Tc: Backend> DistillObjective<'t, Tc> {
    /// An objective over `examples` (evaluation on `eval`) in micro-batches of `batch_size`,
    /// distilling `teacher` into a student of `student_vocab` tokens; generated completions
    /// stop after any of `stop_ids` and are sampled from `seed`. The vocabularies must match.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        teacher: &'t Tc,
        student_vocab: usize,
        options: DistillOptions,
        examples: Vec<EncodedCompletion>,
        eval: Vec<EncodedCompletion>,
        batch_size: usize,
        pad: u32,
        stop_ids: Vec<u32>,
        seed: u64,
    ) -> Result<Self> {
        options.validate().map_err(Error::Invalid)?;
        let tv = teacher.config().vocab_size;
        if tv != student_vocab {
            return Err(Error::Invalid(format!(
                "the teacher's vocabulary has {tv} tokens and the student's {student_vocab}: \
                 distillation compares whole next-token distributions, so teacher and student \
                 must share a tokenizer"
            )));
        }
        Ok(DistillObjective {
            teacher,
            examples,
            eval,
            options,
            batch_size: batch_size.max(1),
            pad,
            stop_ids,
            seed,
            draws: AtomicU64::new(0),
        })
    }

    fn rows(set: &[EncodedCompletion], idx: &[usize]) -> Vec<Encoded> {
        idx.iter().map(|&i| set[i].sequence()).collect()
    }

    /// Micro-batch `draw`'s source, and the seed its samples derive from.
    fn source(&self, draw: u64) -> (Source, u64) {
        let seed = self.seed ^ (draw + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let u: f64 = ChaCha8Rng::seed_from_u64(seed).random();
        let source = if u < self.options.lmbda {
            Source::Student
        } else if self.options.seq_kd {
            Source::Teacher
        } else {
            Source::Data
        };
        (source, seed)
    }

    /// The examples `idx` with completions `by` samples (the student or the teacher).
    fn generated<B: Backend>(&self, by: &B, idx: &[usize], seed: u64) -> StepBatch {
        let o = &self.options;
        let cfg = GenerationConfig {
            max_new_tokens: o.max_new_tokens,
            temperature: o.temperature,
            top_k: 0,
            top_p: 1.0,
            seed,
            stop_ids: self.stop_ids.clone(),
        };
        // The batch's prompts decode together, each from its own seed.
        let seeds: Vec<u64> = (0..idx.len())
            .map(|k| seed ^ (k as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
            .collect();
        let prompts: Vec<&[u32]> = idx.iter().map(|&i| &self.examples[i].prompt[..]).collect();
        let rows: Vec<Encoded> = generate_groups(by, &prompts, &seeds, 1, &cfg)
            .into_iter()
            .zip(idx)
            .map(|(mut c, &i)| self.examples[i].sequence_with(&c.pop().unwrap_or_default()))
            .collect();
        padded(&rows, self.pad)
    }

    /// The divergence summed over `batch`'s trained positions under `model` (no gradients).
    fn divergence_sum<M: Backend>(&self, model: &M, batch: &StepBatch) -> f64 {
        let rows: Vec<usize> = batch.targets.iter().map(|t| t.pos).collect();
        let hs = final_hidden(model, batch);
        let ht = final_hidden(self.teacher, batch);
        chunked_divergence(
            rows.len(),
            model.config().vocab_size,
            &self.options,
            0.0,
            &|r| model.row_logits(&hs, &rows[r]),
            &|r| self.teacher.row_logits(&ht, &rows[r]),
            None,
        )
    }

    /// The mean divergence per completion token over the training (`eval == false`) or
    /// evaluation set's own completions under `model`, without gradients.
    pub fn loss_on<M: Backend>(&self, model: &M, eval: bool) -> f64 {
        self.divergence_on(model, eval).0
    }

    /// [`DistillObjective::loss_on`] and the number of completion tokens it averages.
    fn divergence_on<M: Backend>(&self, model: &M, eval: bool) -> (f64, usize) {
        let set = if eval { &self.eval } else { &self.examples };
        let idx: Vec<usize> = (0..set.len()).collect();
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in idx.chunks(self.batch_size) {
            let rows = Self::rows(set, chunk);
            let batch = padded(&rows, self.pad);
            n += batch.targets.len();
            sum += self.divergence_sum(model, &batch);
        }
        (sum / n.max(1) as f64, n)
    }

    /// The divergence summed over `batch`'s trained positions and the gradients of
    /// `scale ·` that sum.
    fn divergence_and_grads<M: TrainModel>(
        &self,
        model: &M,
        batch: &StepBatch,
        trainable: &Trainable,
        options: &StepOptions,
        scale: f64,
    ) -> (f64, Grads<M::T>) {
        let opts = StepOptions {
            hidden_head: true,
            ..*options
        };
        let fwd = forward(model, batch, trainable, &opts);
        let rows: Vec<usize> = batch.targets.iter().map(|t| t.pos).collect();
        let n = rows.len();
        let ht = final_hidden(self.teacher, batch);
        let hidden = model.config().hidden_size;
        let mut d_hidden = Vec::with_capacity(n * hidden);
        let hs = fwd
            .target_states()
            .expect("hidden_head keeps the targets' states");
        let sum = chunked_divergence(
            n,
            model.config().vocab_size,
            &self.options,
            scale,
            &|r| {
                let local: Vec<usize> = r.collect();
                model.row_logits(hs, &local)
            },
            &|r| self.teacher.row_logits(&ht, &rows[r]),
            Some(&mut |g: &[f32], k: usize| {
                let dh = model.head_input_grad(g, k);
                d_hidden.extend(model.rows_to_host(&dh));
            }),
        );
        drop(ht);
        (sum, backward_hidden(model, fwd, &d_hidden, trainable))
    }
}

impl<M: TrainModel, Tc: Backend> Objective<M> for DistillObjective<'_, Tc> {
    fn num_examples(&self) -> usize {
        self.examples.len()
    }

    fn batches(&self, order: &[usize]) -> Vec<MicroBatch> {
        order
            .chunks(self.batch_size)
            .map(|idx| {
                let rows = Self::rows(&self.examples, idx);
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
        // Completions first: the loss is divided by the step's completion tokens.
        let mut generated = 0usize;
        let batches: Vec<Cow<'_, StepBatch>> = micro
            .iter()
            .map(|m| {
                let (source, seed) = self.source(self.draws.fetch_add(1, Ordering::Relaxed));
                match source {
                    Source::Data => Cow::Borrowed(&m.batch),
                    Source::Student => {
                        generated += 1;
                        Cow::Owned(self.generated(model, &m.examples, seed))
                    }
                    Source::Teacher => {
                        generated += 1;
                        Cow::Owned(self.generated(self.teacher, &m.examples, seed))
                    }
                }
            })
            .collect();
        let trained: usize = batches.iter().map(|b| b.targets.len()).sum();
        let tokens: usize = batches.iter().map(|b| b.real_tokens).sum();
        let scale = 1.0 / trained.max(1) as f64;
        let (mut sum, mut grads) = (0.0, Grads::new());
        for (i, b) in batches.iter().enumerate() {
            if b.targets.is_empty() {
                continue;
            }
            let mut opts = options.micro(i);
            if self.options.disable_dropout {
                opts.dropout_seed = None;
            }
            let (s, g) = self.divergence_and_grads(model, b, trainable, &opts, scale);
            sum += s;
            add_grads(model, &mut grads, g);
        }
        let metrics = BTreeMap::from([(
            "generated_fraction".to_string(),
            generated as f64 / micro.len().max(1) as f64,
        )]);
        Ok(StepOutput {
            loss: sum * scale,
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
        // The divergence is no cross-entropy: no perplexity is derived from it.
        let (loss, n) = self.divergence_on(model, true);
        Ok(Some((
            loss,
            BTreeMap::from([("completion_tokens".to_string(), n as f64)]),
        )))
    }
}
