//! `fedtune train grpo`: GRPO with verifiable rewards (TRL's `GRPOTrainer`) on prompts, with
//! TRL's option names, from flags or a TOML file (flags win). Each step samples
//! `num_generations` completions of each prompt from the current policy, scores them with the
//! `--reward` functions, and trains a LoRA adapter on the group-relative advantages; the
//! reference (β ≠ 0) is the model with the adapter disabled. With `--sft-adapter` the SFT
//! adapter is merged into the base first.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use fedtune_engine::rewards::Rewards;
use fedtune_engine::train::TrainSummary;
use fedtune_engine::train::grpo::{
    GrpoLoss, GrpoObjective, GrpoOptions, GrpoPrompt, SamplingLevel, ScaleRewards, load_prompts,
};
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use fedtune_engine::train::sft::{RunOptions, train};

use super::common::ModelArgs;
use super::run::{Finish, RunArgs, cancel_on_ctrl_c, split_configs, split_eval};
use super::target::Job;

/// Arguments of `fedtune train grpo`.
#[derive(Debug, Args)]
pub struct GrpoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An SFT adapter merged into the base before training (base → SFT → GRPO).
    #[arg(long)]
    sft_adapter: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// A reward function, repeatable: json_valid, json_schema:FILE, field_match[:FIELD],
    /// exact_match[:FIELD], regex:PATTERN, length:MIN:MAX, command:PROGRAM, reward_model:DIR
    /// (a `fedtune train reward` adapter, on this run's base model).
    #[arg(long = "reward", required = true)]
    rewards: Vec<String>,
    /// One weight per reward, comma-separated (TRL's `reward_weights`; default 1 each).
    #[arg(long, value_delimiter = ',')]
    reward_weights: Vec<f64>,
    /// Completions sampled per prompt (default 8).
    #[arg(long)]
    num_generations: Option<usize>,
    /// Longest completion in tokens (default 512).
    #[arg(long)]
    max_completion_length: Option<usize>,
    /// Sampling temperature (default 1).
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling (default 1: off).
    #[arg(long)]
    top_p: Option<f64>,
    /// Top-k sampling (default 0: off).
    #[arg(long)]
    top_k: Option<usize>,
    /// KL coefficient against the reference (default 0: no reference pass).
    #[arg(long)]
    beta: Option<f64>,
    /// Clipping range ε (default 0.2).
    #[arg(long)]
    epsilon: Option<f64>,
    /// Upper clipping range (default ε).
    #[arg(long)]
    epsilon_high: Option<f64>,
    /// Cap on the importance ratio (two-sided clipping).
    #[arg(long)]
    delta: Option<f64>,
    /// Optimiser steps per batch of generations (default 1).
    #[arg(long)]
    num_iterations: Option<usize>,
    /// grpo, bnpo, dr_grpo, dapo (default), cispo, sapo, luspo or vespo.
    #[arg(long)]
    loss_type: Option<GrpoLoss>,
    /// group (default), batch or none.
    #[arg(long)]
    scale_rewards: Option<ScaleRewards>,
    /// token (default) or sequence.
    #[arg(long)]
    importance_sampling_level: Option<SamplingLevel>,
    /// Leave completions cut at max_completion_length out of the loss.
    #[arg(long)]
    mask_truncated_completions: bool,
}

const GRPO_KEYS: &[&str] = &[
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "scale_rewards",
    "mask_truncated_completions",
    "num_iterations",
    "loss_type",
    "beta",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "use_bias_correction_kl",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
];

/// The run's training configuration and GRPO options: the TOML file, then the flags, checked
/// together (what `train grpo` can train, and where).
fn configs(a: &GrpoArgs) -> anyhow::Result<(fedtune_engine::train::TrainConfig, GrpoOptions)> {
    // TRL's GRPOConfig trains at 1e-6 by default.
    let (mut cfg, mut opts): (_, GrpoOptions) =
        split_configs(a.run.config.as_ref(), GRPO_KEYS, 1e-6)?;
    a.run.overrides.apply(&mut cfg);
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = a.$f.clone() { opts.$f = v; })* };
    }
    set!(
        num_generations,
        max_completion_length,
        temperature,
        top_p,
        top_k,
        beta,
        epsilon,
        num_iterations,
        loss_type,
        scale_rewards,
        importance_sampling_level
    );
    if a.epsilon_high.is_some() {
        opts.epsilon_high = a.epsilon_high;
    }
    if a.delta.is_some() {
        opts.delta = a.delta;
    }
    opts.mask_truncated_completions |= a.mask_truncated_completions;
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("training options")?;
    opts.validate(cfg.per_device_train_batch_size)
        .map_err(anyhow::Error::msg)
        .context("GRPO options")?;
    anyhow::ensure!(
        opts.num_iterations == 1 || cfg.gradient_accumulation_steps == 1,
        "num_iterations > 1 needs gradient_accumulation_steps = 1 (each step reuses its own generations)"
    );
    anyhow::ensure!(
        cfg.is_lora() && !cfg.packing,
        "train grpo trains a LoRA adapter: --full, --train-last-layers and --packing do not apply"
    );
    anyhow::ensure!(
        a.run.format.is_none() && !a.run.skip_invalid,
        "train grpo reads prompts (JSON lines with a `prompt`): --format and --skip-invalid do not apply"
    );
    Ok((cfg, opts))
}

/// The GRPO loop where the model lives, then the mean reward of fresh samples.
struct Fit<'a, 'r> {
    run: &'a RunOptions<'r>,
    rewards: Rewards,
    opts: GrpoOptions,
    prompts: Vec<GrpoPrompt>,
    eval_prompts: Vec<GrpoPrompt>,
    pad: u32,
    stop: Vec<u32>,
    tokenizer: Arc<fedtune_engine::Tokenizer>,
    cb: &'a mut dyn fedtune_engine::train::Callback,
}

impl Job for Fit<'_, '_> {
    type Out = (TrainSummary, f64);

    fn run<M: TrainModel + RewardBase>(mut self, model: &mut M) -> anyhow::Result<Self::Out> {
        let cfg = self.run.config;
        // Reward models score on the run's base (the SFT adapter merged, the policy's left
        // out), on the device the policy trains on.
        self.rewards.load_models(model, &self.tokenizer)?;
        let objective = GrpoObjective::new(
            self.prompts,
            self.rewards,
            self.opts,
            cfg.per_device_train_batch_size,
            self.pad,
            self.stop,
            self.tokenizer,
            cfg.seed,
        )
        .with_eval(self.eval_prompts);
        let summary = train(model, self.run, &objective, self.cb)?;
        let final_reward = if summary.cancelled {
            f64::NAN
        } else {
            objective.mean_reward(model)?
        };
        Ok((summary, final_reward))
    }
}

/// Runs `fedtune train grpo`.
pub fn run(a: GrpoArgs) -> anyhow::Result<()> {
    let (cfg, opts) = configs(&a)?;
    let rewards = Rewards::parse(&a.rewards, &a.reward_weights)?;
    a.model.check_precision(&cfg)?;
    let (mut model, tokenizer) = a.model.load_trainee(&cfg, a.sft_adapter.as_deref())?;
    let read = |path: &std::path::Path| -> anyhow::Result<Vec<_>> {
        let prompts = load_prompts(path, &tokenizer)
            .with_context(|| format!("reading prompts {}", path.display()))?;
        for (f, _) in &rewards.fns {
            let fields: Vec<(usize, &serde_json::Map<String, serde_json::Value>)> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| (i + 1, &p.fields))
                .collect();
            f.check_fields(path, &fields)?;
        }
        Ok(prompts)
    };
    let prompts = read(&a.run.data)?;
    // Held-out prompts: --eval-data, or the eval_split share of --data.
    let (prompts, eval_prompts) = match (&a.run.eval_data, cfg.eval_split) {
        (Some(p), _) => (prompts, read(p)?),
        (None, Some(f)) => split_eval(prompts, f, cfg.seed),
        (None, None) => (prompts, Vec::new()),
    };
    anyhow::ensure!(
        !prompts.is_empty(),
        "{}: no prompt to learn from",
        a.run.data.display()
    );
    if a.model.adapter.is_none() {
        model.attach_fresh(&cfg)?;
    }
    std::fs::create_dir_all(&a.run.output)
        .with_context(|| format!("creating {}", a.run.output.display()))?;
    let mut stop: Vec<u32> = model.config().eos_token_ids.clone();
    stop.extend(tokenizer.eos_id);
    let pad = tokenizer.pad_id;
    let n_prompts = prompts.len();
    eprintln!(
        "{n_prompts} prompts, {} completions each, rewards: {}",
        opts.num_generations,
        rewards
            .fns
            .iter()
            .map(|(f, w)| format!("{}×{w}", f.name()))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    let tokenizer = Arc::new(tokenizer);
    let cancel = cancel_on_ctrl_c();
    let run = a.run.run_options(&cfg, &cancel);
    let (finish, mut b) = Finish::start(
        &a.run,
        &cfg,
        &a.model.model,
        a.sft_adapter.as_deref(),
        model.lora_weights()?,
    );
    let (summary, final_reward) = model.train(
        &cfg,
        Fit {
            run: &run,
            rewards,
            opts,
            prompts,
            eval_prompts,
            pad,
            stop,
            tokenizer: tokenizer.clone(),
            cb: &mut b,
        },
    )?;
    b.bar.finish_and_clear();
    let extra = serde_json::json!({
        "grpo": opts,
        "rewards": a.rewards,
        "reward_weights": a.reward_weights,
        "prompts": n_prompts,
        "final_mean_reward": final_reward,
    });
    let adapter = finish.adapter(model.lora_weights()?);
    if !finish.write(&summary, adapter, &tokenizer, model.config(), extra)? {
        return Ok(());
    }
    println!(
        "trained {} steps (GRPO, {:?}): mean reward of fresh samples {final_reward:.4}; wrote {}",
        summary.steps,
        opts.loss_type,
        a.run.output.display()
    );
    Ok(())
}
