//! Training options, named as TRL/PEFT name them so that users recognise them; read from a
//! TOML file and overridden by command-line flags.

use serde::{Deserialize, Serialize};

use super::optim::Schedule;
use crate::adapter::ALL_PROJECTIONS;

/// Options of `fedtune train sft` (and of the local training a federated client runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA α (scale α/r, or α/√r with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the LoRA input.
    pub lora_dropout: f64,
    /// Projections that get adapters.
    pub target_modules: Vec<String>,
    /// Scale α/√r (rsLoRA).
    pub use_rslora: bool,
    /// Weight-decomposed LoRA (PEFT's `use_dora`): a trained magnitude per output row times
    /// the row-normalised `W + s·B·A`, on either device.
    pub use_dora: bool,
    /// Full fine-tuning instead of LoRA.
    pub full: bool,
    /// Train the last N blocks, the final norm and the head instead of LoRA.
    pub train_last_layers: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Epochs (fractions allowed).
    pub num_train_epochs: f64,
    /// Optimiser steps (overrides epochs).
    pub max_steps: Option<u64>,
    /// Sequences (or packed rows) per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Longest sequence (longer ones are truncated on the right). TRL 1.x's `max_length` is
    /// accepted as its name too.
    #[serde(alias = "max_length")]
    pub max_seq_length: usize,
    /// Pack sequences into rows of `max_seq_length`.
    pub packing: bool,
    /// Conversations train on the assistant turns only (TRL's `assistant_only_loss`). fedtune's
    /// default is `true`; TRL's is `false` (every token of a conversation).
    pub assistant_only_loss: bool,
    /// Prompt/completion data trains on the completion only (TRL's `completion_only_loss`,
    /// whose default is also `true`).
    pub completion_only_loss: bool,
    /// Learning-rate schedule.
    pub lr_scheduler_type: Schedule,
    /// Fraction of steps used for linear warm-up.
    pub warmup_ratio: f64,
    /// Warm-up steps; when set, overrides `warmup_ratio` (as in transformers).
    pub warmup_steps: Option<u64>,
    /// Gradient clipping norm (0 disables).
    pub max_grad_norm: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of data order, adapter initialisation and dropout.
    pub seed: u64,
    /// Fraction of the training data held out for evaluation when no eval file is given.
    pub eval_split: Option<f64>,
    /// Evaluate every this many steps (and at the end).
    pub eval_steps: Option<u64>,
    /// Save a checkpoint every this many steps.
    pub save_steps: Option<u64>,
    /// Keep at most this many checkpoints: older `checkpoint-*` directories are deleted after
    /// each save (transformers' `save_total_limit`).
    pub save_total_limit: Option<usize>,
    /// Log every this many steps.
    pub logging_steps: u64,
    /// Where logs go besides `train_log.jsonl` (transformers' `report_to`: `"none"` or
    /// `"tensorboard"`, one name or a list): TensorBoard event files under `<output>/runs/`.
    #[serde(deserialize_with = "one_or_many")]
    pub report_to: Vec<ReportTo>,
    /// QLoRA: the base's projections in NF4.
    pub load_in_4bit: bool,
    /// Double-quantise NF4 scales.
    pub bnb_4bit_use_double_quant: bool,
    /// Mixed precision as transformers' `bf16=True` with PEFT: the frozen base and the
    /// activations in bf16 (f32 accumulation), the LoRA factors, their gradients and AdamW's
    /// moments in f32. On the GPU; the CLI makes it `--dtype bf16` on the CPU.
    pub bf16: bool,
    /// Mixed precision as transformers' `fp16=True` with PEFT: the base and the activations in
    /// f16, the LoRA factors, their gradients and AdamW's moments in f32, with dynamic loss
    /// scaling as `torch.amp.GradScaler` does it: the loss is multiplied by a power of two
    /// (from `fp16_init_scale`), a step whose gradients overflow is skipped and halves the
    /// scale, and `fp16_growth_interval` steps in a row without overflow double it. GPU only.
    pub fp16: bool,
    /// The first loss scale of `fp16` (GradScaler's `init_scale`; a power of two).
    pub fp16_init_scale: f64,
    /// Steps without overflow before the `fp16` loss scale doubles (GradScaler's
    /// `growth_interval`).
    pub fp16_growth_interval: u64,
    /// Let f32 matrix products use TF32 tensor cores (PyTorch's `allow_tf32`, TRL's `tf32`).
    /// GPU only.
    pub tf32: bool,
    /// Recompute each block's forward in backward instead of keeping its activations
    /// (transformers' `gradient_checkpointing`): the same gradients with the activation memory
    /// of one block, for about a third more compute.
    pub gradient_checkpointing: bool,
}

/// A destination of training logs (transformers' `report_to` values fedtune writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// Nothing besides `train_log.jsonl`.
    None,
    /// TensorBoard event files.
    Tensorboard,
}

impl std::str::FromStr for ReportTo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ReportTo::None),
            "tensorboard" => Ok(ReportTo::Tensorboard),
            other => Err(format!(
                "report_to {other:?}: fedtune writes `tensorboard` event files (or `none`); \
                 train_log.jsonl is always written"
            )),
        }
    }
}

/// `report_to` as transformers takes it: one name or a list of names (for `deserialize_with`).
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ReportTo>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let names = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    names
        .iter()
        .map(|n| n.parse().map_err(serde::de::Error::custom))
        .collect()
}

impl TrainConfig {
    /// Whether TensorBoard event files are written.
    pub fn reports_to_tensorboard(&self) -> bool {
        self.report_to.contains(&ReportTo::Tensorboard)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: ALL_PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            use_dora: false,
            full: false,
            train_last_layers: None,
            learning_rate: 2e-4,
            num_train_epochs: 3.0,
            max_steps: None,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_seq_length: 1024,
            packing: false,
            assistant_only_loss: true,
            completion_only_loss: true,
            lr_scheduler_type: Schedule::Linear,
            warmup_ratio: 0.0,
            warmup_steps: None,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            seed: 42,
            eval_split: None,
            eval_steps: None,
            save_steps: None,
            save_total_limit: None,
            logging_steps: 1,
            report_to: Vec::new(),
            load_in_4bit: false,
            bnb_4bit_use_double_quant: false,
            bf16: false,
            fp16: false,
            fp16_init_scale: 65536.0,
            fp16_growth_interval: 2000,
            tf32: false,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Checks value ranges; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        check(self.lora_r > 0, "lora_r must be positive")?;
        check(
            (0.0..1.0).contains(&self.lora_dropout),
            "lora_dropout must be in [0, 1)",
        )?;
        check(self.learning_rate > 0.0, "learning_rate must be positive")?;
        check(
            self.max_steps.is_some() || self.num_train_epochs > 0.0,
            "num_train_epochs must be positive (or give max_steps)",
        )?;
        check(
            self.per_device_train_batch_size > 0,
            "per_device_train_batch_size must be positive",
        )?;
        check(
            self.gradient_accumulation_steps > 0,
            "gradient_accumulation_steps must be positive",
        )?;
        check(self.max_seq_length > 1, "max_seq_length must be at least 2")?;
        check(
            (0.0..1.0).contains(&self.warmup_ratio),
            "warmup_ratio must be in [0, 1)",
        )?;
        check(
            self.save_total_limit.is_none_or(|n| n > 0),
            "save_total_limit must be at least 1",
        )?;
        check(
            self.eval_split.is_none_or(|f| f > 0.0 && f < 1.0),
            "eval_split must be in (0, 1)",
        )?;
        check(
            !(self.bf16 && self.fp16),
            "bf16 and fp16 exclude each other",
        )?;
        check(
            self.fp16_init_scale >= 1.0
                && self.fp16_init_scale.is_finite()
                && self.fp16_init_scale.log2().fract() == 0.0,
            "fp16_init_scale must be a power of two, at least 1",
        )?;
        check(
            self.fp16_growth_interval > 0,
            "fp16_growth_interval must be positive",
        )?;
        check(
            !(self.full && self.train_last_layers.is_some()),
            "full and train_last_layers exclude each other",
        )?;
        check(
            !self.use_dora || self.is_lora(),
            "use_dora trains adapters; it excludes full and train_last_layers",
        )?;
        for t in &self.target_modules {
            check(
                ALL_PROJECTIONS.contains(&t.as_str()),
                &format!("target_modules: `{t}` is not one of {ALL_PROJECTIONS:?}"),
            )?;
        }
        Ok(())
    }

    /// Which tokens SFT trains.
    pub fn loss_on(&self) -> crate::data::LossOn {
        crate::data::LossOn {
            assistant_only: self.assistant_only_loss,
            completion_only: self.completion_only_loss,
        }
    }

    /// Whether the run trains LoRA adapters (as opposed to weights).
    pub fn is_lora(&self) -> bool {
        !self.full && self.train_last_layers.is_none()
    }
}
