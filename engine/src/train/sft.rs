//! The supervised fine-tuning loop: micro-batches with gradient accumulation, AdamW, the
//! learning-rate schedule, clipping, evaluation, a JSONL log, checkpoints that resume
//! exactly, and cancellation.
//!
//! The loss of an optimiser step is the mean cross-entropy over every trained token of its
//! micro-batches (transformers' `num_items_in_batch` normalisation), so accumulation does not
//! change the result. Everything random (data order, adapter initialisation, dropout) derives
//! from the seed and the step, so a resumed run continues the same loss curve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::batches::{epoch_batches, epoch_order};
use super::checkpoint;
use super::config::TrainConfig;
use super::optim::{AdamW, AdamWConfig, clip_grad_norm, warmup_steps};
use super::step::{Grads, StepBatch, Trainable, backward, forward};
use crate::error::{Error, Result};
use crate::eval::sft_loss;
use crate::model::LlamaModel;
use crate::tokenizer::Encoded;

/// One line of the training log.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LogEntry {
    /// Optimiser step (1-based).
    pub step: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean loss over the step's trained tokens (training entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Learning rate used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Tokens (all positions) per second in this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Trained tokens in this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trained_tokens: Option<usize>,
    /// Evaluation loss (evaluation entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Evaluation perplexity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_perplexity: Option<f64>,
    /// Objective-specific metrics under TRL's names (`rewards/chosen`, ...; `eval_` prefixed
    /// in evaluation entries).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// Where a run stands (saved in checkpoints).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub global_step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Micro-batches of the current epoch already consumed.
    pub batch_in_epoch: usize,
    /// Total optimiser steps of the run.
    pub total_steps: u64,
    /// Everything logged so far.
    pub log_history: Vec<LogEntry>,
}

/// Observes a run (progress bars, daemons).
pub trait Callback {
    /// A step finished or an evaluation ran.
    fn on_log(&mut self, _entry: &LogEntry, _state: &TrainerState) {}
}

/// A callback that does nothing.
pub struct NoCallback;
impl Callback for NoCallback {}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimiser steps done.
    pub steps: u64,
    /// Loss of the last step.
    pub final_loss: Option<f64>,
    /// Last evaluation loss.
    pub eval_loss: Option<f64>,
    /// Trained tokens seen.
    pub trained_tokens: usize,
    /// Positions processed (including untrained ones).
    pub tokens: usize,
    /// Wall-clock seconds of training steps.
    pub seconds: f64,
    /// Whether the run was cancelled (a checkpoint was saved).
    pub cancelled: bool,
}

/// Inputs of a run besides the model.
pub struct SftRun<'a> {
    /// Options.
    pub config: &'a TrainConfig,
    /// Tokenised training examples.
    pub train: &'a [Encoded],
    /// Tokenised evaluation examples.
    pub eval: &'a [Encoded],
    /// Padding id.
    pub pad: u32,
    /// Output directory (log, checkpoints); `None` keeps everything in memory.
    pub output: Option<&'a Path>,
    /// Checkpoint to resume from.
    pub resume: Option<&'a Path>,
    /// Set to stop at the next step boundary (a checkpoint is saved).
    pub cancel: Option<&'a AtomicBool>,
}

/// The trainable parameter names of `model` under `trainable`.
pub fn trainable_names(model: &LlamaModel, trainable: &Trainable) -> Vec<String> {
    let mut names = Vec::new();
    if trainable.lora {
        for (n, lin) in model.linears() {
            if lin.lora.is_some() {
                names.push(format!("{n}.lora_A"));
                names.push(format!("{n}.lora_B"));
            }
        }
    }
    if let Some(first) = trainable.first_full_layer {
        for i in first..model.layers.len() {
            names.push(format!("model.layers.{i}.input_layernorm.weight"));
            names.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
        }
        for (n, lin) in model.linears() {
            let layer: usize = n["model.layers.".len()..]
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if layer >= first {
                names.push(format!("{n}.weight"));
                if lin.bias.is_some() {
                    names.push(format!("{n}.bias"));
                }
            }
        }
    }
    if trainable.final_norm {
        names.push("model.norm.weight".into());
    }
    if trainable.head {
        names.push(if model.lm_head.is_some() {
            "lm_head.weight".into()
        } else {
            "model.embed_tokens.weight".into()
        });
    }
    if trainable.embedding && model.lm_head.is_some() {
        names.push("model.embed_tokens.weight".into());
    }
    names.sort();
    names.dedup();
    names
}

/// transformers' weight-decay rule: no decay on biases and norm weights.
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm.weight"))
}

/// What one optimiser step's micro-batches produced.
pub struct StepOutput {
    /// The step's loss.
    pub loss: f64,
    /// Gradients of the loss.
    pub grads: Grads,
    /// Trained tokens.
    pub trained: usize,
    /// Positions processed (including untrained ones).
    pub tokens: usize,
    /// Objective-specific metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// A micro-batch: the rows of a step and the examples they came from.
pub struct MicroBatch {
    /// The rows.
    pub batch: StepBatch,
    /// Indices of the examples (SFT: sequences; DPO: pairs).
    pub examples: Vec<usize>,
}

/// What a training run minimises: SFT cross-entropy, a preference loss, ...
pub trait Objective {
    /// Number of training examples (the seeded order permutes them).
    fn num_examples(&self) -> usize;
    /// The micro-batches of one epoch, visiting examples in `order`.
    fn batches(&self, order: &[usize]) -> Vec<MicroBatch>;
    /// Loss and gradients of one optimiser step.
    fn step(
        &self,
        model: &LlamaModel,
        micro: &[MicroBatch],
        trainable: &Trainable,
        dropout_seed: Option<u64>,
    ) -> Result<StepOutput>;
    /// Evaluation: `(loss, metrics)`, or `None` without evaluation data.
    fn evaluate(&self, model: &LlamaModel) -> Result<Option<(f64, BTreeMap<String, f64>)>>;
}

/// Supervised fine-tuning: mean cross-entropy over every trained token of the step.
pub struct SftObjective<'a> {
    seqs: Vec<Encoded>,
    eval: &'a [Encoded],
    batch_size: usize,
    packing: Option<usize>,
    pad: u32,
}

impl<'a> SftObjective<'a> {
    /// Examples truncated to `max_seq_length`; those without a trained token are dropped.
    pub fn new(cfg: &TrainConfig, train: &[Encoded], eval: &'a [Encoded], pad: u32) -> Self {
        let seqs = train
            .iter()
            .filter(|s| s.trained() > 0)
            .map(|s| {
                let mut s = s.clone();
                s.ids.truncate(cfg.max_seq_length);
                s.mask.truncate(cfg.max_seq_length);
                s
            })
            .filter(|s| s.mask.iter().skip(1).any(|m| *m == 1))
            .collect();
        SftObjective {
            seqs,
            eval,
            batch_size: cfg.per_device_train_batch_size,
            packing: cfg.packing.then_some(cfg.max_seq_length),
            pad,
        }
    }
}

impl Objective for SftObjective<'_> {
    fn num_examples(&self) -> usize {
        self.seqs.len()
    }

    fn batches(&self, order: &[usize]) -> Vec<MicroBatch> {
        epoch_batches(&self.seqs, order, self.batch_size, self.packing, self.pad)
            .into_iter()
            .map(|batch| MicroBatch {
                batch,
                examples: Vec::new(),
            })
            .collect()
    }

    fn step(
        &self,
        model: &LlamaModel,
        micro: &[MicroBatch],
        trainable: &Trainable,
        dropout_seed: Option<u64>,
    ) -> Result<StepOutput> {
        let trained: usize = micro.iter().map(|b| b.batch.targets.len()).sum();
        let tokens: usize = micro.iter().map(|b| b.batch.batch * b.batch.len).sum();
        let mut grads = Grads::new();
        let mut nll = 0.0f64;
        let coef = -1.0 / trained.max(1) as f32;
        for (i, b) in micro.iter().enumerate() {
            let b = &b.batch;
            if b.targets.is_empty() {
                continue;
            }
            let fwd = forward(
                model,
                b,
                trainable,
                dropout_seed.map(|s| s ^ (i as u64) << 48),
            );
            let lp: Vec<f32> = fwd.target_logps.clone();
            nll -= lp.iter().map(|v| *v as f64).sum::<f64>();
            let d = vec![coef; lp.len()];
            add_grads(&mut grads, backward(model, fwd, &d, trainable));
        }
        Ok(StepOutput {
            loss: nll / trained.max(1) as f64,
            grads,
            trained,
            tokens,
            metrics: BTreeMap::new(),
        })
    }

    fn evaluate(&self, model: &LlamaModel) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let l = sft_loss(model, self.eval, self.batch_size, self.pad).mean();
        Ok(Some((l, BTreeMap::new())))
    }
}

/// Adds `g` into `acc`.
pub fn add_grads(acc: &mut Grads, g: Grads) {
    for (k, v) in g {
        match acc.remove(&k) {
            Some(a) => acc.insert(k, a + v),
            None => acc.insert(k, v),
        };
    }
}

/// How a run trains: LoRA adapters or weights.
pub fn trainable_for(config: &TrainConfig, num_layers: usize) -> Trainable {
    if config.full {
        Trainable::full()
    } else if let Some(n) = config.train_last_layers {
        Trainable::last_layers(n, num_layers)
    } else {
        Trainable::lora()
    }
}

/// Trains `model` in place (its attached adapter, or its weights) with SFT.
pub fn train_sft(
    model: &mut LlamaModel,
    run: &SftRun<'_>,
    cb: &mut dyn Callback,
) -> Result<TrainSummary> {
    let objective = SftObjective::new(run.config, run.train, run.eval, run.pad);
    let opts = RunOptions {
        config: run.config,
        output: run.output,
        resume: run.resume,
        cancel: run.cancel,
    };
    train(model, &opts, &objective, cb)
}

/// Options of a run that do not depend on the objective.
pub struct RunOptions<'a> {
    /// Options.
    pub config: &'a TrainConfig,
    /// Output directory (log, checkpoints); `None` keeps everything in memory.
    pub output: Option<&'a Path>,
    /// Checkpoint to resume from.
    pub resume: Option<&'a Path>,
    /// Set to stop at the next step boundary (a checkpoint is saved).
    pub cancel: Option<&'a AtomicBool>,
}

/// The training loop: trains `model` in place on `objective`.
pub fn train(
    model: &mut LlamaModel,
    run: &RunOptions<'_>,
    objective: &dyn Objective,
    cb: &mut dyn Callback,
) -> Result<TrainSummary> {
    let cfg = run.config;
    cfg.validate().map_err(Error::Invalid)?;
    let _reuse = super::memory::Reuse::begin();
    let trainable = trainable_for(cfg, model.layers.len());
    if trainable.lora && model.linears().iter().all(|(_, l)| l.lora.is_none()) {
        return Err(Error::Invalid(
            "LoRA training needs an attached adapter".into(),
        ));
    }
    let names = trainable_names(model, &trainable);
    let n_examples = objective.num_examples();
    if n_examples == 0 {
        return Err(Error::Invalid(
            "no training example has a trained token".into(),
        ));
    }
    let micro_per_epoch = objective
        .batches(&epoch_order(n_examples, cfg.seed, 0))
        .len();
    let steps_per_epoch = micro_per_epoch.div_ceil(cfg.gradient_accumulation_steps) as u64;
    let total = cfg
        .max_steps
        .unwrap_or_else(|| (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64)
        .max(1);
    let warmup = warmup_steps(cfg.warmup_ratio, total);
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..Default::default()
    });
    let mut state = TrainerState {
        total_steps: total,
        ..Default::default()
    };
    if let Some(dir) = run.resume {
        state = checkpoint::restore(dir, model, &names, &mut opt)?;
        state.total_steps = total;
    }
    let log_path = run.output.map(|o| o.join("train_log.jsonl"));
    if let Some(p) = &log_path {
        checkpoint::rewrite_log(p, &state.log_history)?;
    }
    let dropout = model
        .linears()
        .iter()
        .any(|(_, l)| l.lora.as_ref().is_some_and(|l| l.dropout > 0.0));
    let mut summary = TrainSummary {
        steps: state.global_step,
        final_loss: None,
        eval_loss: None,
        trained_tokens: 0,
        tokens: 0,
        seconds: 0.0,
        cancelled: false,
    };
    let cancelled = || run.cancel.is_some_and(|c| c.load(Ordering::SeqCst));
    let emit = |entry: LogEntry, state: &mut TrainerState, cb: &mut dyn Callback| -> Result<()> {
        if let Some(p) = &log_path {
            checkpoint::append_log(p, &entry)?;
        }
        cb.on_log(&entry, state);
        state.log_history.push(entry);
        Ok(())
    };
    'epochs: while state.global_step < total {
        let order = epoch_order(n_examples, cfg.seed, state.epoch);
        let batches = objective.batches(&order);
        while state.batch_in_epoch < batches.len() {
            if state.global_step >= total {
                break 'epochs;
            }
            if cancelled() {
                summary.cancelled = true;
                break 'epochs;
            }
            let end = (state.batch_in_epoch + cfg.gradient_accumulation_steps).min(batches.len());
            let micro = &batches[state.batch_in_epoch..end];
            let started = Instant::now();
            let seed =
                dropout.then(|| cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ state.global_step);
            let StepOutput {
                loss,
                mut grads,
                trained,
                tokens,
                metrics,
            } = objective.step(model, micro, &trainable, seed)?;
            let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
            let lr = cfg
                .lr_scheduler_type
                .lr(cfg.learning_rate, state.global_step, total, warmup);
            opt.begin_step();
            for name in &names {
                let (Some(p), Some(g)) = (model.param(name), grads.remove(name)) else {
                    continue;
                };
                let updated = opt.update(name, p, g, lr, decays(name));
                model.set_param(name, updated);
            }
            let secs = started.elapsed().as_secs_f64();
            state.global_step += 1;
            state.batch_in_epoch = end;
            summary.seconds += secs;
            summary.trained_tokens += trained;
            summary.tokens += tokens;
            summary.final_loss = Some(loss);
            let epoch_f = state.epoch as f64 + end as f64 / batches.len() as f64;
            if state.global_step.is_multiple_of(cfg.logging_steps.max(1))
                || state.global_step == total
            {
                emit(
                    LogEntry {
                        step: state.global_step,
                        epoch: epoch_f,
                        loss: Some(loss),
                        learning_rate: Some(lr),
                        grad_norm: Some(grad_norm),
                        tokens_per_second: Some(tokens as f64 / secs.max(1e-9)),
                        trained_tokens: Some(trained),
                        metrics,
                        ..Default::default()
                    },
                    &mut state,
                    cb,
                )?;
            }
            let last = state.global_step == total;
            if (cfg
                .eval_steps
                .is_some_and(|e| state.global_step.is_multiple_of(e))
                || last)
                && let Some((l, metrics)) = objective.evaluate(model)?
            {
                summary.eval_loss = Some(l);
                emit(
                    LogEntry {
                        step: state.global_step,
                        epoch: epoch_f,
                        eval_loss: Some(l),
                        eval_perplexity: metrics.is_empty().then(|| l.exp()),
                        metrics: metrics
                            .into_iter()
                            .map(|(k, v)| (format!("eval_{k}"), v))
                            .collect(),
                        ..Default::default()
                    },
                    &mut state,
                    cb,
                )?;
            }
            if let (Some(out), Some(every)) = (run.output, cfg.save_steps)
                && state.global_step.is_multiple_of(every)
            {
                checkpoint::save(
                    &out.join(format!("checkpoint-{}", state.global_step)),
                    model,
                    &names,
                    &opt,
                    &state,
                )?;
            }
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
    }
    if summary.cancelled
        && let Some(out) = run.output
    {
        checkpoint::save(
            &out.join(format!("checkpoint-{}", state.global_step)),
            model,
            &names,
            &opt,
            &state,
        )?;
    }
    summary.steps = state.global_step;
    Ok(summary)
}

/// The checkpoint directory of `step` under `output`.
pub fn checkpoint_dir(output: &Path, step: u64) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Parameters as tensors, for tests and tools.
pub fn params(model: &LlamaModel, names: &[String]) -> Vec<(String, Tensor<2>)> {
    names
        .iter()
        .filter_map(|n| model.param(n).map(|t| (n.clone(), t)))
        .collect()
}
