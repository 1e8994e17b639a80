//! `coord.toml`'s `[local]` tables (and `[[then]].local`): the round plan's local-training
//! settings, checked with the file, table and field named.

use fedtune_protocol::Hyper;
use serde::Deserialize;

fn default_beta() -> f64 {
    0.1
}

/// Local training settings sent to clients.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LocalFile {
    pub(super) learning_rate: f64,
    pub(super) local_steps: u64,
    pub(super) batch_size: usize,
    /// Micro-batches per optimiser step (the effective batch is batch_size × this).
    #[serde(default)]
    pub(super) gradient_accumulation_steps: Option<u32>,
    #[serde(default)]
    pub(super) warmup_ratio: Option<f64>,
    #[serde(default)]
    pub(super) weight_decay: Option<f64>,
    #[serde(default)]
    pub(super) max_grad_norm: Option<f64>,
    #[serde(default)]
    pub(super) lora_dropout: Option<f64>,
    #[serde(default = "default_beta")]
    pub(super) beta: f64,
    /// DPO's loss (TRL's `loss_type`).
    #[serde(default)]
    pub(super) loss_type: Option<String>,
    #[serde(default)]
    pub(super) seed: u64,
    /// GRPO phase: the rewards and sampling every client uses (`[local.grpo]`).
    #[serde(default)]
    pub(super) grpo: Option<fedtune_protocol::GrpoPlan>,
    /// Distillation phase: TRL GKDConfig's settings every client uses (`[local.distill]`;
    /// TRL's defaults without it).
    #[serde(default)]
    pub(super) distill: Option<fedtune_protocol::DistillPlan>,
}

impl LocalFile {
    /// The plan's hyperparameters (TRL's defaults for what the file leaves out), checked:
    /// errors name `{file}: {table}.{field}`.
    pub(super) fn hyper(&self, file: &str, table: &str) -> anyhow::Result<Hyper> {
        let d = Hyper::new(self.learning_rate, self.local_steps, self.batch_size);
        let h = Hyper {
            gradient_accumulation_steps: self
                .gradient_accumulation_steps
                .unwrap_or(d.gradient_accumulation_steps),
            warmup_ratio: self.warmup_ratio.unwrap_or(d.warmup_ratio),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: self.max_grad_norm.unwrap_or(d.max_grad_norm),
            lora_dropout: self.lora_dropout.unwrap_or(d.lora_dropout),
            beta: self.beta,
            loss_type: self.loss_type.clone().unwrap_or(d.loss_type.clone()),
            seed: self.seed,
            grpo: self.grpo.clone().map(Box::new),
            distill: self.distill.clone().map(Box::new),
            ..d
        };
        if let Some(why) = h.invalid() {
            anyhow::bail!("{file}: {table}.{why}");
        }
        h.loss_type
            .parse::<fedtune_engine::train::dpo::LossType>()
            .map_err(|e| anyhow::anyhow!("{file}: {table}.loss_type: {e}"))?;
        Ok(h)
    }
}
