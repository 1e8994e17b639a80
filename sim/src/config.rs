//! `federation.toml`: what `fedtune sim --config` runs. Relative paths are relative to the
//! file's directory. Unknown keys are errors.

use std::path::{Path, PathBuf};

use fedtune_aggregation::dp::DpConfig;
use fedtune_aggregation::optim::ServerOptimizer;
use fedtune_aggregation::strategy::Rule;
use serde::Deserialize;

/// A whole simulated federation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Name shown in reports (also the federation id).
    #[serde(default = "default_name")]
    pub name: String,
    /// Seed of partitioning, faults, sampling and training.
    #[serde(default)]
    pub seed: u64,
    /// Number of clients (with `partition = per_file`: the number of `[[data.clients]]`).
    #[serde(default)]
    pub clients: usize,
    /// `memory` (simulated clock) or `quic` (real daemons on loopback).
    #[serde(default)]
    pub transport: Transport,
    /// Where results go (`--output` overrides).
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// `"tensorboard"` (one name or a list, transformers' `report_to`): TensorBoard event files
    /// of every round's record under `<output>/runs/`.
    #[serde(
        default,
        deserialize_with = "fedtune_engine::train::config::one_or_many"
    )]
    pub report_to: Vec<fedtune_engine::train::config::ReportTo>,
    /// Training clients run side by side at most.
    #[serde(default = "one")]
    pub parallel: usize,
    /// Where clients train: `cpu` (default) or `cuda[:N]` (clients share one read-only base
    /// model on the GPU; up to `parallel` jobs run side by side there, as many as its free
    /// memory holds after one job's peak is measured).
    #[serde(default)]
    pub device: Option<String>,
    /// Memory (MiB) that side-by-side training may fill, resident memory on the host and device
    /// memory on a GPU: one job runs alone first and its measured peak caps how many run
    /// together.
    #[serde(default)]
    pub memory_budget_mb: Option<u64>,
    /// The base model and LoRA.
    pub model: ModelSection,
    /// The data and its partitioning.
    pub data: DataSection,
    /// Supervised fine-tuning rounds.
    pub sft: StageSection,
    /// DPO rounds after the SFT rounds.
    #[serde(default)]
    pub dpo: Option<StageSection>,
    /// GRPO rounds after the SFT and DPO rounds, on prompts made from each client's SFT
    /// examples (the conversation up to the answer, the answer as the `reference` field).
    #[serde(default)]
    pub grpo: Option<GrpoSection>,
    /// Aggregation and round rules.
    pub strategy: StrategySection,
    /// Injected faults.
    #[serde(default)]
    pub faults: Faults,
    /// Evaluation of the global adapter.
    #[serde(default)]
    pub eval: EvalSection,
}

fn default_name() -> String {
    "fedtune-sim".into()
}
fn one() -> usize {
    1
}

/// Transport between the simulated parties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// In memory with a simulated clock.
    #[default]
    Memory,
    /// The real coordinator and client daemons over QUIC with mutual TLS on loopback.
    Quic,
}

/// The base model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A model directory or GGUF file; `smollm2` fetches SmolLM2-135M-Instruct when needed.
    pub path: PathBuf,
    /// LoRA rank.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// LoRA α.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Projections with adapters (default all seven).
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// QLoRA: the frozen base in NF4.
    #[serde(default)]
    pub load_in_4bit: bool,
    /// DoRA (PEFT's `use_dora`): the global adapter carries magnitude vectors.
    #[serde(default)]
    pub use_dora: bool,
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}

/// The data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// One SFT dataset partitioned among the clients (any format `fedtune train` reads).
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Preference pairs partitioned the same way (for DPO rounds).
    #[serde(default)]
    pub preferences: Option<PathBuf>,
    /// Fraction of each client's share held out for evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// How `train` is split.
    #[serde(default)]
    pub partition: Partition,
    /// With `partition = per_file`: each client's own files.
    #[serde(default)]
    pub clients: Vec<ClientFiles>,
    /// Sequences are cut to this many tokens.
    #[serde(default = "default_max_len")]
    pub max_seq_length: usize,
}

fn default_eval_fraction() -> f64 {
    0.2
}
fn default_max_len() -> usize {
    256
}

/// How one dataset is split among clients.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Partition {
    /// Shuffled, equal shares.
    #[default]
    Iid,
    /// Per value of `field`, client shares drawn from Dirichlet(α) (small α: each client sees
    /// few topics).
    Dirichlet {
        /// Concentration.
        alpha: f64,
        /// The record field holding the label or topic.
        field: String,
    },
    /// Share sizes drawn from Dirichlet(α) over clients (IID content, skewed amounts).
    Quantity {
        /// Concentration.
        alpha: f64,
    },
    /// One set of files per client (`[[data.clients]]`).
    PerFile,
}

/// A client's own files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFiles {
    /// The client's name in reports.
    pub name: String,
    /// SFT training data.
    pub train: PathBuf,
    /// Held-out SFT data (default: `eval_fraction` of `train`).
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Preference pairs.
    #[serde(default)]
    pub preferences: Option<PathBuf>,
    /// Held-out preference pairs (default: `eval_fraction` of `preferences`).
    #[serde(default)]
    pub eval_preferences: Option<PathBuf>,
}

/// A stage's rounds and local training.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    /// Rounds.
    pub rounds: u64,
    /// Local learning rate.
    pub learning_rate: f64,
    /// Local optimiser steps per round.
    pub local_steps: u64,
    /// Local batch size.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// DPO β.
    #[serde(default = "default_beta")]
    pub beta: f64,
}

/// GRPO rounds: the stage's settings and TRL `GRPOConfig`'s (the plan's `GrpoPlan`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// Rounds.
    pub rounds: u64,
    /// Local learning rate.
    pub learning_rate: f64,
    /// Local optimiser steps per round.
    pub local_steps: u64,
    /// Completions per micro-batch (a multiple of `num_generations`).
    #[serde(default = "default_grpo_batch")]
    pub batch_size: usize,
    /// Reward functions (`json_valid`, `field_match`, ... as `fedtune train grpo --reward`).
    pub rewards: Vec<String>,
    /// One weight per reward (empty: 1 each).
    #[serde(default)]
    pub reward_weights: Vec<f64>,
    /// Completions per prompt.
    #[serde(default = "fedtune_protocol::messages::default_generations")]
    pub num_generations: u32,
    /// Longest completion in tokens.
    #[serde(default = "fedtune_protocol::messages::default_completion_length")]
    pub max_completion_length: u32,
    /// Sampling temperature.
    #[serde(default = "fedtune_protocol::messages::one")]
    pub temperature: f64,
    /// TRL's `loss_type`.
    #[serde(default = "fedtune_protocol::messages::default_loss")]
    pub loss_type: String,
    /// Clipping range ε.
    #[serde(default = "fedtune_protocol::messages::default_epsilon")]
    pub epsilon: f64,
    /// KL coefficient against the round's starting global adapter.
    #[serde(default)]
    pub beta: f64,
}

impl GrpoSection {
    /// The plan every client trains its GRPO rounds with.
    pub fn plan(&self) -> fedtune_protocol::GrpoPlan {
        fedtune_protocol::GrpoPlan {
            rewards: self.rewards.clone(),
            reward_weights: self.reward_weights.clone(),
            num_generations: self.num_generations,
            max_completion_length: self.max_completion_length,
            temperature: self.temperature,
            loss_type: self.loss_type.clone(),
            epsilon: self.epsilon,
            beta: self.beta,
        }
    }

    /// The first setting out of range, as `field: why`.
    fn check(&self) -> Result<(), String> {
        if self.rewards.is_empty() {
            return Err("grpo.rewards: name at least one reward".into());
        }
        fedtune_engine::rewards::Rewards::parse(&self.rewards, &self.reward_weights)
            .map_err(|e| format!("grpo.rewards: {e}"))?;
        let g = self.num_generations as usize;
        if g < 2 || !self.batch_size.is_multiple_of(g) {
            return Err(format!(
                "grpo.batch_size: {} completions must be a multiple of num_generations ({g}, at least 2)",
                self.batch_size
            ));
        }
        self.loss_type
            .parse::<fedtune_engine::train::grpo::GrpoLoss>()
            .map_err(|e| format!("grpo.loss_type: {e}"))?;
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!(
                "grpo.temperature: {} must be positive",
                self.temperature
            ));
        }
        Ok(())
    }
}

fn default_grpo_batch() -> usize {
    8
}

fn default_batch() -> usize {
    4
}
fn default_beta() -> f64 {
    0.1
}

/// Aggregation and round rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySection {
    /// The aggregation rule (`{ kind = "fed_avg_exact" }`, `{ kind = "trimmed_mean", beta = 0.2 }`, ...).
    pub rule: Rule,
    /// Rank of the global adapter.
    #[serde(default)]
    pub target_rank: Option<usize>,
    /// Clip each update to this norm.
    #[serde(default)]
    pub norm_bound: Option<f64>,
    /// Client-level differential privacy.
    #[serde(default)]
    pub dp: Option<DpConfig>,
    /// Server optimiser on the aggregate (FedAvgM, FedAdagrad, FedYogi, FedAdam).
    #[serde(default)]
    pub server_optimizer: Option<ServerOptimizer>,
    /// Fraction of connected clients sampled per round.
    #[serde(default = "default_fraction")]
    pub fraction: f64,
    /// Sampled clients at least, and connected clients needed to open a round (default: the
    /// expected sample, `ceil(fraction × clients)`).
    #[serde(default)]
    pub min_clients: Option<usize>,
    /// Sampled clients at most.
    #[serde(default)]
    pub max_clients: Option<usize>,
    /// Updates needed to close a round at its deadline (default: half the sample).
    #[serde(default)]
    pub min_results: Option<usize>,
    /// Round deadline in (simulated) seconds.
    #[serde(default = "default_timeout")]
    pub round_timeout_s: f64,
}

fn default_fraction() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    600.0
}

/// Injected faults, all drawn from the config's seed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Probability that a sampled client drops out of a round (back after its deadline).
    #[serde(default)]
    pub dropout: f64,
    /// Probability that a client straggles in a round.
    #[serde(default)]
    pub straggler: f64,
    /// Mean extra delay of a straggler (exponential), in simulated seconds.
    #[serde(default = "default_delay")]
    pub straggler_delay_s: f64,
    /// Probability that a client's connection drops in the middle of its upload (it
    /// reconnects 5 s later and sends the update again).
    #[serde(default)]
    pub crash_mid_upload: f64,
    /// Simulated local training time of a round, in seconds (each client ±20%, seeded).
    #[serde(default = "default_train_time")]
    pub train_time_s: f64,
    /// Byzantine clients.
    #[serde(default)]
    pub byzantine: Vec<Byzantine>,
    /// Kill the coordinator in the middle of this round and restart it from its store.
    #[serde(default)]
    pub coordinator_restart_round: Option<u64>,
}

fn default_delay() -> f64 {
    300.0
}
fn default_train_time() -> f64 {
    60.0
}

/// A Byzantine client: it holds a valid key and certificate and misbehaves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Byzantine {
    /// Client index (0-based).
    pub client: usize,
    /// What it does.
    pub attack: Attack,
}

/// Attacks of a Byzantine client.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Attack {
    /// Sends `−scale ×` its trained update (`B ← −scale·B`).
    SignFlip {
        /// Magnitude.
        #[serde(default = "default_scale")]
        scale: f64,
    },
    /// Sends `factor ×` its trained update.
    Scale {
        /// Factor.
        factor: f64,
    },
    /// Adds Gaussian noise of this standard deviation to every factor entry.
    Noise {
        /// Standard deviation.
        std: f64,
    },
    /// Sends an update with NaN entries.
    Nan,
    /// Sends its previous round's signed update again.
    Replay,
    /// Runs another base model (its plan hash differs).
    WrongBase,
}

fn default_scale() -> f64 {
    1.0
}

/// Evaluation of the global adapter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Greedy generations per client on its held-out prompts, before and after (JSON
    /// validity and field accuracy are scored when the references are JSON objects).
    #[serde(default)]
    pub generations: usize,
    /// Tokens per generation at most.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            generations: 0,
            max_new_tokens: 96,
        }
    }
}

fn default_new_tokens() -> usize {
    96
}

impl SimConfig {
    /// Reads and checks `path`; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut c: SimConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        c.resolve(dir);
        c.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(c)
    }

    /// Makes relative paths relative to `dir`.
    pub fn resolve(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if self.model.path != Path::new("smollm2") {
            fix(&mut self.model.path);
        }
        for p in [
            &mut self.data.train,
            &mut self.data.preferences,
            &mut self.output,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        for c in &mut self.data.clients {
            fix(&mut c.train);
            for p in [&mut c.eval, &mut c.preferences, &mut c.eval_preferences]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
    }

    /// Number of clients.
    pub fn num_clients(&self) -> usize {
        if self.data.partition == Partition::PerFile {
            self.data.clients.len()
        } else {
            self.clients
        }
    }

    /// The training device (`device`, default the CPU).
    pub fn engine_device(&self) -> Result<fedtune_engine::device::Device, String> {
        self.device
            .as_deref()
            .unwrap_or("cpu")
            .parse()
            .map_err(|e| format!("device: {e}"))
    }

    /// Checks what serde cannot, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let n = self.num_clients();
        if n == 0 {
            return Err("clients: at least one client is needed (or [[data.clients]] with partition per_file)".into());
        }
        match &self.data.partition {
            Partition::PerFile => {}
            Partition::Dirichlet { alpha, .. } | Partition::Quantity { alpha } if *alpha <= 0.0 => {
                return Err(format!("data.partition.alpha: {alpha} must be positive"));
            }
            _ if self.data.train.is_none() => {
                return Err("data.train: a dataset to partition is needed (or partition = { kind = \"per_file\" })".into());
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.data.eval_fraction) {
            return Err(format!(
                "data.eval_fraction: {} must be in [0, 1)",
                self.data.eval_fraction
            ));
        }
        for (name, p) in [
            ("faults.dropout", self.faults.dropout),
            ("faults.straggler", self.faults.straggler),
            ("faults.crash_mid_upload", self.faults.crash_mid_upload),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name}: {p} is not a probability"));
            }
        }
        for b in &self.faults.byzantine {
            if b.client >= n {
                return Err(format!(
                    "faults.byzantine: client {} does not exist ({n} clients)",
                    b.client
                ));
            }
            if let Attack::Noise { std } = b.attack
                && !(std.is_finite() && std >= 0.0)
            {
                return Err(format!(
                    "faults.byzantine: client {}: noise std {std} must be a non-negative number",
                    b.client
                ));
            }
        }
        self.engine_device()?;
        if let Some(opt) = &self.strategy.server_optimizer {
            opt.validate().map_err(|e| format!("strategy.{e}"))?;
        }
        let grpo_rounds = self.grpo.as_ref().map_or(0, |g| g.rounds);
        if self.sft.rounds + self.dpo.as_ref().map_or(0, |d| d.rounds) + grpo_rounds == 0 {
            return Err("sft.rounds: no rounds to run".into());
        }
        if let Some(g) = &self.grpo {
            g.check()?;
        }
        if self.dpo.as_ref().is_some_and(|d| d.rounds > 0)
            && self.data.preferences.is_none()
            && self.data.clients.iter().all(|c| c.preferences.is_none())
        {
            return Err("dpo: DPO rounds need data.preferences or per-client preferences".into());
        }
        if self.parallel == 0 {
            return Err("parallel: must be at least 1".into());
        }
        Ok(())
    }
}
