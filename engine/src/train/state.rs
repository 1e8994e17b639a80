//! What a training run reports and keeps: the log's entries, the trainer state a checkpoint
//! saves, the callback that observes a run, and the run's summary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// The fp16 loss scale this step ran with (fp16 runs only; a step whose gradients
    /// overflowed logs a null `grad_norm` and did not change the parameters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
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
    /// The fp16 loss scaler's state (fp16 runs only), so that a resumed run goes on with the
    /// same scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

/// Dynamic loss scaling for fp16, as `torch.amp.GradScaler` does it (growth factor 2,
/// backoff 0.5): the scale is `2^exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossScaler {
    /// log₂ of the scale.
    pub exp: i32,
    /// Steps in a row without overflow since the scale last changed.
    pub good_steps: u64,
}

impl LossScaler {
    /// A scaler starting at `init` (a power of two).
    pub fn new(init: f64) -> Self {
        LossScaler {
            exp: init.log2().round() as i32,
            good_steps: 0,
        }
    }

    /// The scale, `2^exp` (infinite past f32's range: that step then overflows and halves it).
    pub fn scale(&self) -> f32 {
        2f32.powi(self.exp)
    }

    /// After a step: an overflow (`finite` false) halves the scale; `growth_interval` steps
    /// in a row without one double it.
    pub fn update(&mut self, finite: bool, growth_interval: u64) {
        if !finite {
            self.exp -= 1;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= growth_interval {
                self.exp += 1;
                self.good_steps = 0;
            }
        }
    }
}

/// What a run is about to do (for a start banner).
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    /// Training examples (sequences, or preference pairs).
    pub examples: usize,
    /// Optimiser steps of the run.
    pub total_steps: u64,
    /// Examples (or packed rows) per optimiser step: batch × accumulation.
    pub effective_batch: usize,
    /// Trained parameters.
    pub trainable_parameters: usize,
    /// Parameters of the base model.
    pub model_parameters: usize,
}

/// Observes a run (progress bars, daemons).
pub trait Callback {
    /// The run is about to train (after a resume, if any).
    fn on_train_begin(&mut self, _info: &RunInfo) {}
    /// A step finished or an evaluation ran.
    fn on_log(&mut self, _entry: &LogEntry, _state: &TrainerState) {}
    /// A checkpoint was written to `dir`, with these trained parameters (host copies, by
    /// parameter name): the place to add files beside it, such as a loadable PEFT adapter.
    fn on_save(
        &mut self,
        _dir: &std::path::Path,
        _params: &[(String, burn::tensor::Tensor<2>)],
    ) -> crate::error::Result<()> {
        Ok(())
    }
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
