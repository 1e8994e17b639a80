//! The local training job of a round, through the real engine: the shared read-only base
//! model with the global adapter attached, SFT, DPO, KTO, GRPO, distillation (from a teacher
//! the site holds) or reward-model training on the client's private data for the plan's local
//! steps, then evaluation on the client's held-out data. Only the adapter and a few scalar metrics leave this function.

use std::path::PathBuf;

use fedtune_aggregation::Adapter;
use fedtune_engine::adapter::SCORE_KEY;
use fedtune_engine::cuda::{CudaModel, Dt, Gpu};
use fedtune_engine::data::{EncodedCompletion, EncodedFeedback, RewardPair};
use fedtune_engine::device::Device;
use fedtune_engine::error::Error;
use fedtune_engine::rewards::Rewards;
use fedtune_engine::tokenizer::EncodedPair;
use fedtune_engine::train::config::ReportTo;
use fedtune_engine::train::distill::{DistillObjective, DistillOptions};
use fedtune_engine::train::dpo::{DpoObjective, DpoOptions};
use fedtune_engine::train::grpo::{GrpoObjective, GrpoOptions, GrpoPrompt};
use fedtune_engine::train::kto::{KtoObjective, KtoOptions};
use fedtune_engine::train::optim::Schedule;
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::{RewardBase, RewardObjective, RewardOptions};
use fedtune_engine::train::sft::{NoCallback, RunOptions, SftObjective, train};
use fedtune_engine::train::{TrainConfig, TrainSummary};
use fedtune_engine::{Encoded, LlamaModel};
use fedtune_protocol::Phase;

use crate::machine::TrainJob;

/// A client's private data, tokenised.
#[derive(Debug, Clone, Default)]
pub struct LocalData {
    /// SFT training examples.
    pub train: Vec<Encoded>,
    /// SFT held-out examples.
    pub eval: Vec<Encoded>,
    /// Preference pairs for DPO rounds.
    pub pairs: Vec<EncodedPair>,
    /// Held-out preference pairs.
    pub eval_pairs: Vec<EncodedPair>,
    /// The preference pairs as reward-model rounds read them (each side one whole sequence,
    /// as TRL's `RewardTrainer` tokenises it).
    pub reward_pairs: Vec<RewardPair>,
    /// Held-out pairs for reward-model rounds.
    pub eval_reward_pairs: Vec<RewardPair>,
    /// Unpaired feedback (prompt, completion, label) for KTO rounds.
    pub feedback: Vec<EncodedFeedback>,
    /// Prompts for GRPO rounds.
    pub prompts: PromptData,
    /// The teacher and the prompts with completions of distillation rounds.
    pub distill: DistillData,
    /// Padding id.
    pub pad: u32,
    /// How this site trains locally (its own choice; the plan fixes the federation's settings).
    pub local: LocalTraining,
}

/// A client's prompts for GRPO rounds, with what sampling and scoring need.
#[derive(Clone, Default)]
pub struct PromptData {
    /// The prompts with their other fields (reference answers the rewards read).
    pub prompts: Vec<GrpoPrompt>,
    /// Decodes completions for the reward functions.
    pub tokenizer: Option<std::sync::Arc<fedtune_engine::Tokenizer>>,
    /// Ids that end a completion.
    pub stop_ids: Vec<u32>,
}

impl std::fmt::Debug for PromptData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptData")
            .field("prompts", &self.prompts.len())
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

/// What a client distils from in distillation rounds: its own teacher (never leaves the site;
/// it shares the base model's tokenizer) and its prompts with completions.
#[derive(Clone, Default)]
pub struct DistillData {
    /// The teacher, on the host.
    pub teacher: Option<std::sync::Arc<LlamaModel>>,
    /// Prompts with the data's completions (sampled ones replace them on-policy).
    pub examples: Vec<EncodedCompletion>,
    /// Held-out prompts with completions (the round's eval_loss is the divergence on them).
    pub eval: Vec<EncodedCompletion>,
    /// Ids that end a sampled completion.
    pub stop_ids: Vec<u32>,
}

impl std::fmt::Debug for DistillData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistillData")
            .field("teacher", &self.teacher.is_some())
            .field("examples", &self.examples.len())
            .field("eval", &self.eval.len())
            .finish()
    }
}

/// Local-training settings a site chooses for itself in `client.toml`: they change how its
/// update is computed (memory, speed, precision), not what the federation agreed on (the
/// plan's [`fedtune_protocol::Hyper`] and LoRA configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTraining {
    /// Recompute each block in backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Longest SFT sequence (longer ones are truncated on the right).
    pub max_length: usize,
    /// Compute precision on a GPU: f32, or bf16/f16 mixed precision (f32 LoRA factors,
    /// gradients and AdamW moments; f16 with dynamic loss scaling), TRL's `bf16`/`fp16`.
    pub dt: Dt,
    /// Where each round's training log goes (TRL's `output_dir`): `round-NNN/train_log.jsonl`,
    /// and TensorBoard event files under `round-NNN/runs/` with `report_to`. None: in memory.
    pub output_dir: Option<PathBuf>,
    /// `tensorboard`, or nothing (transformers' `report_to`).
    pub report_to: Vec<ReportTo>,
}

impl LocalTraining {
    /// The directory of `round`'s training log (none without `output_dir`; the training loop
    /// creates it).
    fn round_dir(&self, round: u64) -> Option<PathBuf> {
        let dir = self.output_dir.as_ref()?;
        Some(dir.join(format!("round-{round:03}")))
    }
}

impl Default for LocalTraining {
    fn default() -> Self {
        LocalTraining {
            gradient_checkpointing: false,
            max_length: 1024,
            dt: Dt::F32,
            output_dir: None,
            report_to: Vec::new(),
        }
    }
}

/// What a round's training produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The adapter after local training.
    pub adapter: Adapter,
    /// Examples it was trained on (the FedAvg weight).
    pub num_examples: u64,
    /// `train_loss`, `eval_loss` (and DPO metrics in DPO rounds).
    pub metrics: Vec<(String, f64)>,
}

/// The read-only base model a client trains from, where it trains: the host, or a GPU
/// (`device = "cuda:N"`; f32, weights copied from the host model once).
#[derive(Clone)]
// One per process, shared by reference: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Base {
    /// The CPU engine.
    Host(LlamaModel),
    /// An NVIDIA GPU.
    Gpu(CudaModel),
}

impl Base {
    /// `model` on `device`, computing in `dt` there (bf16 and f16 mixed precision need a GPU:
    /// the host engine trains in f32).
    pub fn on(model: LlamaModel, device: Device, dt: Dt) -> fedtune_engine::Result<Base> {
        Ok(match device {
            Device::Cpu if dt != Dt::F32 => {
                return Err(Error::Invalid(format!(
                    "{dt:?} mixed precision trains on a GPU (device = \"cuda\"); the CPU trains in f32"
                )));
            }
            Device::Cpu => Base::Host(model),
            Device::Cuda(n) => Base::Gpu(CudaModel::from_host(&model, Gpu::open(n)?, dt)?),
        })
    }

    /// The host model, when training runs on the host.
    pub fn host(&self) -> Option<&LlamaModel> {
        match self {
            Base::Host(m) => Some(m),
            Base::Gpu(_) => None,
        }
    }
}

impl From<LlamaModel> for Base {
    fn from(m: LlamaModel) -> Base {
        Base::Host(m)
    }
}

/// Trains `job` on `data` starting from `base` + the global adapter, on the base's device.
pub fn train_round(
    base: &Base,
    data: &LocalData,
    job: &TrainJob,
) -> fedtune_engine::Result<TrainOutcome> {
    // A federation that ends in reward-model stages carries the score head from its first
    // round: stages before them leave it as it is.
    if job.plan.phase != Phase::Reward
        && let Some(score) = job.global.dense.get(SCORE_KEY)
    {
        let mut global = job.global.clone();
        global.dense.remove(SCORE_KEY);
        let policy = TrainJob {
            plan: job.plan.clone(),
            global,
        };
        let mut out = train_round(base, data, &policy)?;
        out.adapter.dense.insert(SCORE_KEY.into(), score.clone());
        return Ok(out);
    }
    match base {
        Base::Host(m) => {
            let mut model = m.clone();
            model.attach_weights(&job.global, 0.0)?;
            round_on(&mut model, data, job)
        }
        Base::Gpu(m) => {
            // Jobs may run on threads of their own, side by side on the one stream.
            m.gpu.bind()?;
            let mut model = m.clone();
            model.attach_weights(&job.global)?;
            round_on(&mut model, data, job)
        }
    }
}

/// A model a round trains, on either device, and the adapter it sends back.
trait RoundModel: TrainModel + RewardBase {
    /// The trained LoRA factors (f32), with a reward model's score head.
    fn adapter(&self) -> fedtune_engine::Result<Adapter>;
}

impl RoundModel for LlamaModel {
    fn adapter(&self) -> fedtune_engine::Result<Adapter> {
        Ok(self.lora_weights())
    }
}

impl RoundModel for CudaModel {
    fn adapter(&self) -> fedtune_engine::Result<Adapter> {
        self.lora_weights()
    }
}

/// The round's training on `model` (the global adapter attached), wherever it lives.
fn round_on<M: RoundModel>(
    model: &mut M,
    data: &LocalData,
    job: &TrainJob,
) -> fedtune_engine::Result<TrainOutcome> {
    match job.plan.phase {
        Phase::Reward => return reward_training(model, data, job),
        Phase::Grpo => return grpo_training(model, data, job),
        _ => {}
    }
    let (summary, num_examples) = local_training(model, data, job)?;
    let mut metrics = vec![(
        "train_loss".to_string(),
        summary.final_loss.unwrap_or(f64::NAN),
    )];
    if let Some(l) = summary.eval_loss {
        metrics.push(("eval_loss".into(), l));
    }
    metrics.retain(|(_, v)| v.is_finite());
    Ok(TrainOutcome {
        adapter: model.adapter()?,
        num_examples,
        metrics,
    })
}

/// The round's training settings: the plan's hyperparameters and LoRA configuration, and how
/// this site computes them (`local`).
fn round_config(local: &LocalTraining, job: &TrainJob) -> TrainConfig {
    let (h, lora) = (&job.plan.hyper, &job.plan.lora);
    TrainConfig {
        lora_r: lora.rank,
        lora_alpha: lora.lora_alpha,
        target_modules: lora.target_modules.clone(),
        lora_dropout: h.lora_dropout,
        learning_rate: h.learning_rate,
        max_steps: Some(h.local_steps),
        per_device_train_batch_size: h.batch_size,
        gradient_accumulation_steps: h.gradient_accumulation_steps.max(1) as usize,
        warmup_ratio: h.warmup_ratio,
        weight_decay: h.weight_decay,
        max_grad_norm: h.max_grad_norm,
        gradient_checkpointing: local.gradient_checkpointing,
        max_seq_length: local.max_length.max(2),
        lr_scheduler_type: Schedule::Constant,
        seed: h.seed,
        logging_steps: 1,
        bf16: local.dt == Dt::BF16,
        fp16: local.dt == Dt::F16,
        report_to: local.report_to.clone(),
        ..TrainConfig::default()
    }
}

/// Where the round's training log goes (none without `output_dir`).
fn round_dir(data: &LocalData, job: &TrainJob) -> Option<PathBuf> {
    data.local.round_dir(job.plan.round)
}

/// The training loop's options for a round: its configuration and log directory, no resume,
/// no cancellation (a round runs to its end).
fn run_options<'a>(cfg: &'a TrainConfig, dir: &'a Option<PathBuf>) -> RunOptions<'a> {
    RunOptions {
        config: cfg,
        output: dir.as_deref(),
        resume: None,
        cancel: None,
    }
}

/// A GRPO round on `model` (the global adapter attached), on either device: the plan's
/// rewards score this client's own completions of its own prompts (a reward model on the
/// model's device); the reference is the global adapter the round starts from. Metrics: `train_loss`, and the means over the round's steps of TRL's
/// logged `reward`, `entropy` and `completions/mean_length` (of the samples each step trained
/// on: no extra sampling pass).
fn grpo_training<M: RoundModel>(
    model: &mut M,
    data: &LocalData,
    job: &TrainJob,
) -> fedtune_engine::Result<TrainOutcome> {
    let h = &job.plan.hyper;
    let g = h.grpo.as_ref().ok_or_else(|| {
        Error::Invalid("the plan of a GRPO round names no rewards (grpo settings missing)".into())
    })?;
    let p = &data.prompts;
    let tokenizer = p
        .tokenizer
        .clone()
        .filter(|_| !p.prompts.is_empty())
        .ok_or_else(|| {
            Error::Invalid(
                "this client has no prompts for GRPO rounds (prompt_data in client.toml)".into(),
            )
        })?;
    let mut rewards = Rewards::parse(&g.rewards, &g.reward_weights)?;
    // A reward model the plan names is this site's own copy, on the base model.
    rewards.load_models(&*model, &tokenizer)?;
    let opts = GrpoOptions {
        num_generations: g.num_generations as usize,
        max_completion_length: g.max_completion_length as usize,
        temperature: g.temperature,
        loss_type: g.loss_type.parse().map_err(Error::Invalid)?,
        epsilon: g.epsilon,
        beta: g.beta,
        ..GrpoOptions::default()
    };
    opts.validate(h.batch_size).map_err(Error::Invalid)?;
    let (cfg, dir) = (round_config(&data.local, job), round_dir(data, job));
    let run = run_options(&cfg, &dir);
    let objective = GrpoObjective::new(
        p.prompts.clone(),
        rewards,
        opts,
        h.batch_size,
        data.pad,
        p.stop_ids.clone(),
        tokenizer,
        h.seed,
    );
    let mut steps = StepMeans::new(&["reward", "entropy", "completions/mean_length"]);
    let summary = train(model, &run, &objective, &mut steps)?;
    let mut metrics = vec![(
        "train_loss".to_string(),
        summary.final_loss.unwrap_or(f64::NAN),
    )];
    metrics.extend(steps.means());
    metrics.retain(|(_, v)| v.is_finite());
    Ok(TrainOutcome {
        adapter: model.adapter()?,
        num_examples: p.prompts.len() as u64,
        metrics,
    })
}

/// Means of some of the metrics the training steps log (evaluations left out).
struct StepMeans {
    sums: Vec<(String, f64, usize)>,
}

impl StepMeans {
    fn new(names: &[&str]) -> Self {
        StepMeans {
            sums: names.iter().map(|n| (n.to_string(), 0.0, 0)).collect(),
        }
    }

    /// `(name, mean)` of each metric some step logged.
    fn means(&self) -> Vec<(String, f64)> {
        self.sums
            .iter()
            .filter(|(_, _, n)| *n > 0)
            .map(|(k, s, n)| (k.clone(), s / *n as f64))
            .collect()
    }
}

impl fedtune_engine::train::Callback for StepMeans {
    fn on_log(
        &mut self,
        entry: &fedtune_engine::train::LogEntry,
        _state: &fedtune_engine::train::TrainerState,
    ) {
        if entry.loss.is_none() {
            return;
        }
        for (k, s, n) in &mut self.sums {
            if let Some(v) = entry.metrics.get(k.as_str()) {
                *s += v;
                *n += 1;
            }
        }
    }
}

/// A reward-model round on `model` (the global LoRA factors and score head attached), on
/// either device: TRL `RewardTrainer`'s Bradley–Terry loss on this client's preference pairs,
/// the score head trained in full. Metrics: `train_loss`, `eval_loss` (held-out pairs), and
/// the trained model's `accuracy` and `margin` on the held-out pairs, or on the training
/// pairs without any.
fn reward_training<M: RoundModel>(
    model: &mut M,
    data: &LocalData,
    job: &TrainJob,
) -> fedtune_engine::Result<TrainOutcome> {
    if model.param_shape("score.weight").is_none() {
        return Err(Error::Invalid(
            "the global adapter of a reward-model round has no score head (a coordinator \
             whose plan has a reward stage starts the federation with one)"
                .into(),
        ));
    }
    if data.reward_pairs.is_empty() {
        return Err(Error::Invalid(
            "this client has no preference pairs for reward-model rounds (preference_data in \
             client.toml)"
                .into(),
        ));
    }
    let h = &job.plan.hyper;
    let (cfg, dir) = (round_config(&data.local, job), round_dir(data, job));
    let run = run_options(&cfg, &dir);
    let options = RewardOptions {
        max_length: Some(data.local.max_length.max(2)),
        ..RewardOptions::default()
    };
    let objective = RewardObjective::new(
        options,
        data.reward_pairs.clone(),
        data.eval_reward_pairs.clone(),
        h.batch_size,
        data.pad,
    );
    let summary = train(model, &run, &objective, &mut NoCallback)?;
    let (_, m) = objective.metrics_on(&*model, !data.eval_reward_pairs.is_empty())?;
    let mut metrics = vec![(
        "train_loss".to_string(),
        summary.final_loss.unwrap_or(f64::NAN),
    )];
    if let Some(l) = summary.eval_loss {
        metrics.push(("eval_loss".into(), l));
    }
    for name in ["accuracy", "margin"] {
        metrics.push((name.to_string(), m.get(name).copied().unwrap_or(f64::NAN)));
    }
    metrics.retain(|(_, v)| v.is_finite());
    Ok(TrainOutcome {
        adapter: model.adapter()?,
        num_examples: data.reward_pairs.len() as u64,
        metrics,
    })
}

/// The round's SFT, DPO, KTO or distillation on `model` (the global adapter attached): the run's summary and
/// the number of examples (the FedAvg weight).
fn local_training<M: TrainModel>(
    model: &mut M,
    data: &LocalData,
    job: &TrainJob,
) -> fedtune_engine::Result<(TrainSummary, u64)> {
    let h = &job.plan.hyper;
    let (cfg, dir) = (round_config(&data.local, job), round_dir(data, job));
    let run = run_options(&cfg, &dir);
    // The loop evaluates on the held-out data after its last step: that is the eval_loss.
    let (summary, num_examples) = match job.plan.phase {
        Phase::Sft => {
            let objective = SftObjective::new(&cfg, &data.train, &data.eval, data.pad);
            let s = train(model, &run, &objective, &mut NoCallback)?;
            (s, data.train.len() as u64)
        }
        Phase::Dpo => {
            let opts = DpoOptions {
                beta: h.beta,
                loss_type: h.loss_type.parse().map_err(Error::Invalid)?,
                ..DpoOptions::default()
            };
            // The reference is the global adapter the round starts from.
            let objective = DpoObjective::against(
                &*model,
                opts,
                data.pairs.clone(),
                data.eval_pairs.clone(),
                h.batch_size,
                data.pad,
            );
            let s = train(model, &run, &objective, &mut NoCallback)?;
            (s, data.pairs.len() as u64)
        }
        Phase::Kto => {
            let opts = KtoOptions {
                beta: h.beta,
                max_length: data.local.max_length.max(2),
                ..KtoOptions::default()
            };
            opts.validate(h.batch_size).map_err(Error::Invalid)?;
            // The reference is the global adapter the round starts from, as for DPO.
            let objective = KtoObjective::against(
                &*model,
                opts,
                data.feedback.clone(),
                Vec::new(),
                h.batch_size,
                data.pad,
            );
            let s = train(model, &run, &objective, &mut NoCallback)?;
            (s, data.feedback.len() as u64)
        }
        Phase::Distill => {
            let d = &data.distill;
            let teacher = d.teacher.as_deref().ok_or_else(|| {
                Error::Invalid(
                    "this client has no teacher for distillation rounds (teacher in client.toml)"
                        .into(),
                )
            })?;
            if d.examples.is_empty() {
                return Err(Error::Invalid(
                    "this client has no prompts with completions for distillation rounds \
                     (distill_data or train_data in client.toml)"
                        .into(),
                ));
            }
            let p = h.distill.as_deref().cloned().unwrap_or_default();
            let opts = DistillOptions {
                beta: p.beta,
                lmbda: p.lmbda,
                temperature: p.temperature,
                max_new_tokens: p.max_new_tokens as usize,
                seq_kd: p.seq_kd,
                max_length: data.local.max_length.max(2),
                ..DistillOptions::default()
            };
            let objective = DistillObjective::new(
                teacher,
                model.config().vocab_size,
                opts,
                d.examples.clone(),
                d.eval.clone(),
                h.batch_size,
                data.pad,
                d.stop_ids.clone(),
                h.seed,
            )?;
            let s = train(model, &run, &objective, &mut NoCallback)?;
            (s, d.examples.len() as u64)
        }
        Phase::Grpo | Phase::Reward => {
            return Err(Error::Invalid(
                "GRPO and reward-model rounds have loops of their own (train_round)".into(),
            ));
        }
    };
    Ok((summary, num_examples))
}

#[cfg(test)]
mod tests {
    use fedtune_protocol::{Hyper, LoraPlan, RoundPlan};

    use super::*;

    /// Every setting of the plan reaches the trainer's configuration; the site's own settings
    /// come from `client.toml`.
    #[test]
    fn the_plan_fixes_every_local_training_setting() {
        let hyper = Hyper {
            gradient_accumulation_steps: 3,
            warmup_ratio: 0.25,
            weight_decay: 0.05,
            max_grad_norm: 0.5,
            lora_dropout: 0.1,
            beta: 0.2,
            loss_type: "ipo".into(),
            seed: 9,
            ..Hyper::new(3e-4, 7, 5)
        };
        let job = TrainJob {
            plan: RoundPlan {
                federation: "f".into(),
                round: 2,
                phase: Phase::Dpo,
                hyper,
                lora: LoraPlan {
                    rank: 6,
                    lora_alpha: 12.0,
                    target_modules: vec!["q_proj".into(), "down_proj".into()],
                },
                global_digest: [0; 32],
                deadline_ms: 0,
            },
            global: Adapter::default(),
        };
        let local = LocalTraining {
            gradient_checkpointing: true,
            max_length: 64,
            dt: Dt::BF16,
            output_dir: None,
            report_to: vec![ReportTo::Tensorboard],
        };
        let c = round_config(&local, &job);
        assert_eq!((c.lora_r, c.lora_alpha, c.lora_dropout), (6, 12.0, 0.1));
        assert_eq!(c.target_modules, ["q_proj", "down_proj"]);
        assert_eq!(c.report_to, [ReportTo::Tensorboard]);
        assert_eq!((c.learning_rate, c.max_steps, c.seed), (3e-4, Some(7), 9));
        assert_eq!(
            (c.per_device_train_batch_size, c.gradient_accumulation_steps),
            (5, 3)
        );
        assert_eq!(
            (c.warmup_ratio, c.weight_decay, c.max_grad_norm),
            (0.25, 0.05, 0.5)
        );
        assert!(c.gradient_checkpointing && c.bf16 && !c.fp16);
        assert_eq!(c.max_seq_length, 64);
    }
}
