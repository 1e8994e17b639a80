//! Supervised fine-tuning: the [`SftObjective`] of the training loop ([`super::trainer`]).
//!
//! The loss of an optimiser step is the mean cross-entropy over every trained token of its
//! micro-batches (transformers' `num_items_in_batch` normalisation), so accumulation does not
//! change the result.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use super::batches::epoch_batches;
use super::config::TrainConfig;
use super::params::TrainModel;
use super::step::{Grads, StepOptions, Trainable, backward, forward};
use crate::error::Result;
use crate::eval::sft_loss;
use crate::tokenizer::Encoded;

pub use super::state::{Callback, LogEntry, NoCallback, RunInfo, TrainSummary, TrainerState};
pub use super::trainer::{
    MicroBatch, Objective, RunOptions, StepOutput, add_grads, checkpoint_dir, train, trainable_for,
};

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

impl<M: TrainModel> Objective<M> for SftObjective<'_> {
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
        model: &M,
        micro: &[MicroBatch],
        trainable: &Trainable,
        options: &StepOptions,
    ) -> Result<StepOutput<M::T>> {
        let trained: usize = micro.iter().map(|b| b.batch.targets.len()).sum();
        let tokens: usize = micro.iter().map(|b| b.batch.real_tokens).sum();
        let mut grads = Grads::new();
        let mut nll = 0.0f64;
        let coef = -1.0 / trained.max(1) as f32;
        for (i, b) in micro.iter().enumerate() {
            let b = &b.batch;
            if b.targets.is_empty() {
                continue;
            }
            let fwd = forward(model, b, trainable, &options.micro(i));
            let lp: Vec<f32> = fwd.target_logps.clone();
            nll -= lp.iter().map(|v| *v as f64).sum::<f64>();
            let d = vec![coef; lp.len()];
            add_grads(model, &mut grads, backward(model, fwd, &d, trainable));
        }
        Ok(StepOutput {
            loss: nll / trained.max(1) as f64,
            grads,
            trained,
            tokens,
            metrics: BTreeMap::new(),
        })
    }

    fn evaluate(&self, model: &M) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let l = sft_loss(model, self.eval, self.batch_size, self.pad).mean();
        Ok(Some((l, BTreeMap::new())))
    }
}

/// Trains `model` in place (its attached adapter, or its weights) with SFT.
pub fn train_sft<M: TrainModel>(
    model: &mut M,
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
