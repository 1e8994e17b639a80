//! The training loop shared by SFT and preference training: micro-batches with gradient
//! accumulation, the optimiser step, the learning-rate schedule, clipping, evaluation, a JSONL
//! log, checkpoints that resume exactly (on either device), and cancellation. What is
//! minimised is an [`Objective`]; where it runs is the model's [`TrainModel`] implementation.
//!
//! Everything random (data order, adapter initialisation, dropout) derives from the seed and
//! the step, so a resumed run continues the same loss curve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::Tensor;

use super::batches::epoch_order;
use super::checkpoint;
use super::config::TrainConfig;
use super::optim::{AdamWConfig, warmup_steps};
use super::params::TrainModel;
use super::state::{Callback, LogEntry, LossScaler, RunInfo, TrainSummary, TrainerState};
use super::step::{StepBatch, StepOptions, Trainable};
use crate::device::{Grads, TrainBackend};
use crate::error::{Error, Result};

/// What one optimiser step's micro-batches produced.
pub struct StepOutput<T = Tensor<2>> {
    /// The step's loss.
    pub loss: f64,
    /// Gradients of the loss.
    pub grads: Grads<T>,
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
pub trait Objective<M: TrainModel> {
    /// Number of training examples (the seeded order permutes them).
    fn num_examples(&self) -> usize;
    /// The micro-batches of one epoch, visiting examples in `order`.
    fn batches(&self, order: &[usize]) -> Vec<MicroBatch>;
    /// Loss and gradients of one optimiser step.
    fn step(
        &self,
        model: &M,
        micro: &[MicroBatch],
        trainable: &Trainable,
        options: &StepOptions,
    ) -> Result<StepOutput<M::T>>;
    /// Evaluation: `(loss, metrics)`, or `None` without evaluation data.
    fn evaluate(&self, model: &M) -> Result<Option<(f64, BTreeMap<String, f64>)>>;
}

/// Adds `g` into `acc`.
pub fn add_grads<M: TrainBackend>(m: &M, acc: &mut Grads<M::T>, g: Grads<M::T>) {
    for (k, v) in g {
        match acc.remove(&k) {
            Some(a) => acc.insert(k, m.add(a, &v)),
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
pub fn train<M: TrainModel>(
    model: &mut M,
    run: &RunOptions<'_>,
    objective: &dyn Objective<M>,
    cb: &mut dyn Callback,
) -> Result<TrainSummary> {
    let cfg = run.config;
    cfg.validate().map_err(Error::Invalid)?;
    let _reuse = super::memory::Reuse::begin();
    let trainable = trainable_for(cfg, model.config().num_hidden_layers);
    if trainable.lora && !model.has_adapter() {
        return Err(Error::Invalid(
            "LoRA training needs an attached adapter".into(),
        ));
    }
    model.can_train(trainable.trains_weights())?;
    let names = model.trainable_names(&trainable);
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
    let mut opt = model.new_optimizer(AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..Default::default()
    });
    let mut state = TrainerState {
        total_steps: total,
        ..Default::default()
    };
    if let Some(dir) = run.resume {
        let r = checkpoint::restore(dir, &names, &|n| model.param_shape(n))?;
        model.set_params(r.params)?;
        model.set_optimizer(&mut opt, r.step, r.moments)?;
        state = r.state;
        state.total_steps = total;
    }
    cb.on_train_begin(&RunInfo {
        examples: n_examples,
        total_steps: total,
        effective_batch: cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
        trainable_parameters: names
            .iter()
            .filter_map(|n| model.param_shape(n))
            .map(|[r, c]| r * c)
            .sum(),
        model_parameters: model.config().num_parameters(),
    });
    let mut logger = Logger::open(run, &state)?;
    if cfg.fp16 && state.loss_scaler.is_none() {
        state.loss_scaler = Some(LossScaler::new(cfg.fp16_init_scale));
    }
    if !cfg.fp16 {
        state.loss_scaler = None;
    }
    let plan = StepPlan {
        cfg,
        names: &names,
        trainable: &trainable,
        total,
        warmup: cfg
            .warmup_steps
            .unwrap_or_else(|| warmup_steps(cfg.warmup_ratio, total)),
        dropout: model.lora_dropout() > 0.0,
    };
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
            let done = plan.step(
                model,
                objective,
                &mut opt,
                &batches[state.batch_in_epoch..end],
                &mut state,
            )?;
            state.global_step += 1;
            state.batch_in_epoch = end;
            summary.seconds += done.secs;
            summary.trained_tokens += done.trained;
            summary.tokens += done.tokens;
            summary.final_loss = Some(done.loss);
            let epoch_f = state.epoch as f64 + end as f64 / batches.len() as f64;
            if let Some(l) = plan.log_and_evaluate(
                &*model,
                objective,
                done,
                epoch_f,
                &mut logger,
                &mut state,
                cb,
            )? {
                summary.eval_loss = Some(l);
            }
            if let (Some(out), Some(every)) = (run.output, cfg.save_steps)
                && state.global_step.is_multiple_of(every)
            {
                save_checkpoint(out, &*model, &names, &opt, &state, cb, cfg.save_total_limit)?;
            }
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
    }
    if summary.cancelled
        && let Some(out) = run.output
    {
        save_checkpoint(out, &*model, &names, &opt, &state, cb, cfg.save_total_limit)?;
    }
    summary.steps = state.global_step;
    Ok(summary)
}

/// Where a run's log entries go: `train_log.jsonl` in the output directory, TensorBoard, the
/// callback and the trainer state's history.
struct Logger {
    path: Option<PathBuf>,
    board: Option<super::tensorboard::Board>,
}

impl Logger {
    /// The log of `run`; a resumed run's log file is rewritten to its checkpoint's history.
    fn open(run: &RunOptions<'_>, state: &TrainerState) -> Result<Self> {
        let path = run.output.map(|o| o.join("train_log.jsonl"));
        if let Some(p) = &path {
            checkpoint::rewrite_log(p, &state.log_history)?;
        }
        let board = match run.output {
            Some(o) if run.config.reports_to_tensorboard() => {
                Some(super::tensorboard::Board::open(o)?)
            }
            _ => None,
        };
        Ok(Logger { path, board })
    }

    fn emit(
        &mut self,
        entry: LogEntry,
        state: &mut TrainerState,
        cb: &mut dyn Callback,
    ) -> Result<()> {
        if let Some(p) = &self.path {
            checkpoint::append_log(p, &entry)?;
        }
        if let Some(b) = self.board.as_mut() {
            b.log(&entry)?;
        }
        cb.on_log(&entry, state);
        state.log_history.push(entry);
        Ok(())
    }
}

/// What every step of a run shares.
struct StepPlan<'a> {
    cfg: &'a TrainConfig,
    names: &'a [String],
    trainable: &'a Trainable,
    total: u64,
    warmup: u64,
    dropout: bool,
}

/// What one optimiser step did.
struct StepDone {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    secs: f64,
    trained: usize,
    tokens: usize,
    metrics: BTreeMap<String, f64>,
    /// The fp16 loss scale the step ran with.
    loss_scale: Option<f64>,
}

impl StepPlan<'_> {
    /// One optimiser step over the micro-batches `micro` (gradients accumulated), at the
    /// scheduled learning rate; the fp16 loss scaler learns whether it overflowed.
    fn step<M: TrainModel>(
        &self,
        model: &mut M,
        objective: &dyn Objective<M>,
        opt: &mut M::Optimizer,
        micro: &[MicroBatch],
        state: &mut TrainerState,
    ) -> Result<StepDone> {
        let cfg = self.cfg;
        let started = Instant::now();
        let options = StepOptions {
            dropout_seed: self
                .dropout
                .then(|| cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ state.global_step),
            gradient_checkpointing: cfg.gradient_checkpointing,
            loss_scale_exp: state.loss_scaler.map_or(0, |s| s.exp),
            ..StepOptions::default()
        };
        let StepOutput {
            loss,
            grads,
            trained,
            tokens,
            metrics,
        } = objective.step(model, micro, self.trainable, &options)?;
        let lr = cfg.lr_scheduler_type.lr(
            cfg.learning_rate,
            state.global_step,
            self.total,
            self.warmup,
        );
        let scaler = state.loss_scaler;
        let grad_norm = model.optimizer_step(
            opt,
            self.names,
            grads,
            lr,
            cfg.max_grad_norm,
            scaler.map(|s| s.scale()),
        )?;
        if let Some(s) = &mut state.loss_scaler {
            s.update(grad_norm.is_finite(), cfg.fp16_growth_interval);
        }
        Ok(StepDone {
            loss,
            lr,
            grad_norm,
            secs: started.elapsed().as_secs_f64(),
            trained,
            tokens,
            metrics,
            loss_scale: scaler.map(|s| 2f64.powi(s.exp)),
        })
    }

    /// Logs the step just done (every `logging_steps` and the last), then evaluates (every
    /// `eval_steps` and after the last) and logs that; returns the evaluation loss.
    #[allow(clippy::too_many_arguments)]
    fn log_and_evaluate<M: TrainModel>(
        &self,
        model: &M,
        objective: &dyn Objective<M>,
        done: StepDone,
        epoch: f64,
        logger: &mut Logger,
        state: &mut TrainerState,
        cb: &mut dyn Callback,
    ) -> Result<Option<f64>> {
        let cfg = self.cfg;
        let step = state.global_step;
        let last = step == self.total;
        if step.is_multiple_of(cfg.logging_steps.max(1)) || last {
            let entry = LogEntry {
                step,
                epoch,
                loss: Some(done.loss),
                learning_rate: Some(done.lr),
                grad_norm: Some(done.grad_norm),
                tokens_per_second: Some(done.tokens as f64 / done.secs.max(1e-9)),
                trained_tokens: Some(done.trained),
                loss_scale: done.loss_scale,
                metrics: done.metrics,
                ..Default::default()
            };
            logger.emit(entry, state, cb)?;
        }
        if !(cfg.eval_steps.is_some_and(|e| step.is_multiple_of(e)) || last) {
            return Ok(None);
        }
        let Some((l, metrics)) = objective.evaluate(model)? else {
            return Ok(None);
        };
        let entry = LogEntry {
            step,
            epoch,
            eval_loss: Some(l),
            eval_perplexity: metrics.is_empty().then(|| l.exp()),
            metrics: metrics
                .into_iter()
                .map(|(k, v)| (format!("eval_{k}"), v))
                .collect(),
            ..Default::default()
        };
        logger.emit(entry, state, cb)?;
        Ok(Some(l))
    }
}

/// The checkpoint directory of `step` under `output`.
pub fn checkpoint_dir(output: &Path, step: u64) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Writes `checkpoint-{step}` under `output` from host copies of the parameters and the
/// optimiser state, then lets the callback add to it.
fn save_checkpoint<M: TrainModel>(
    output: &Path,
    model: &M,
    names: &[String],
    opt: &M::Optimizer,
    state: &TrainerState,
    cb: &mut dyn Callback,
    limit: Option<usize>,
) -> Result<()> {
    let params = model.host_params(names)?;
    let (step, moments) = model.host_optimizer(opt)?;
    let dir = checkpoint_dir(output, state.global_step);
    checkpoint::save(&dir, &params, step, &moments, state)?;
    cb.on_save(&dir, &params)?;
    if let Some(keep) = limit {
        remove_old_checkpoints(output, keep)?;
    }
    Ok(())
}

/// Deletes all but the newest `keep` `checkpoint-N` directories under `output`.
fn remove_old_checkpoints(output: &Path, keep: usize) -> Result<()> {
    let rd = std::fs::read_dir(output).map_err(|e| Error::io(output, e))?;
    let mut steps: Vec<(u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    steps.sort();
    let old = steps.len().saturating_sub(keep);
    for (_, dir) in &steps[..old] {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}
