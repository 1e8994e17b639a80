//! `fedtune train reward`: a reward model (TRL's `RewardTrainer`) from preference pairs — a
//! scalar `score` head on the last token that is not padding, trained in full with a LoRA
//! adapter on the body, Bradley–Terry loss — with TRL's option names, from flags or a TOML file
//! (flags win). The output is a PEFT adapter of a sequence classifier (`task_type` `SEQ_CLS`,
//! `modules_to_save` the score head) that loads in PEFT on
//! `AutoModelForSequenceClassification(num_labels=1)` unchanged. With `--sft-adapter` the SFT
//! adapter is merged into the base first.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedtune_engine::data::RewardPair;
use fedtune_engine::train::TrainSummary;
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use fedtune_engine::train::reward::{RewardObjective, RewardOptions};
use fedtune_engine::train::sft::{RunOptions, train};

use super::common::ModelArgs;
use super::run::{Finish, RunArgs, cancel_on_ctrl_c, split_configs};
use super::target::Job;

/// Arguments of `fedtune train reward`.
#[derive(Debug, Args)]
pub struct RewardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An SFT adapter merged into the base before training (base → SFT → reward model).
    #[arg(long)]
    sft_adapter: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Weight of the penalty mean((r_c + r_r)²) that keeps rewards centred (TRL's
    /// `center_rewards_coefficient`; default off).
    #[arg(long)]
    center_rewards_coefficient: Option<f64>,
    /// Pairs with a side longer than this many tokens are left out, as TRL filters them
    /// (default 1024).
    #[arg(long)]
    max_length: Option<usize>,
}

const REWARD_KEYS: &[&str] = &["center_rewards_coefficient", "max_length"];

/// The reward-model loop, then the final training loss and metrics.
struct Fit<'a, 'r> {
    run: &'a RunOptions<'r>,
    options: RewardOptions,
    train: Vec<RewardPair>,
    eval: Vec<RewardPair>,
    pad: u32,
    cb: &'a mut dyn fedtune_engine::train::Callback,
}

impl Job for Fit<'_, '_> {
    type Out = (TrainSummary, f64, BTreeMap<String, f64>);

    fn run<M: TrainModel + RewardBase>(self, model: &mut M) -> anyhow::Result<Self::Out> {
        let objective = RewardObjective::new(
            self.options,
            self.train,
            self.eval,
            self.run.config.per_device_train_batch_size,
            self.pad,
        );
        let summary = train(model, self.run, &objective, self.cb)?;
        if summary.cancelled {
            return Ok((summary, f64::NAN, Default::default()));
        }
        let (loss, metrics) = objective.metrics_on(model, false)?;
        Ok((summary, loss, metrics))
    }
}

/// Runs `fedtune train reward`.
pub fn run(a: RewardArgs) -> anyhow::Result<()> {
    // TRL's RewardConfig trains at 1e-4 by default.
    let (mut cfg, mut opts): (_, RewardOptions) =
        split_configs(a.run.config.as_ref(), REWARD_KEYS, 1e-4)?;
    a.run.overrides.apply(&mut cfg);
    if let Some(c) = a.center_rewards_coefficient {
        opts.center_rewards_coefficient = Some(c);
    }
    if let Some(m) = a.max_length {
        opts.max_length = Some(m);
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("training options")?;
    anyhow::ensure!(
        opts.center_rewards_coefficient
            .is_none_or(|c| c.is_finite() && c >= 0.0),
        "center_rewards_coefficient must be a non-negative number"
    );
    anyhow::ensure!(
        cfg.is_lora() && !cfg.packing,
        "train reward trains a LoRA adapter and the score head: --full, --train-last-layers \
         and --packing do not apply"
    );
    a.model.check_precision(&cfg)?;
    let (mut model, tokenizer) = a.model.load_trainee(&cfg, a.sft_adapter.as_deref())?;
    let why = format!(
        "a side is longer than max_length {}",
        opts.max_length.unwrap_or(0)
    );
    let (train_set, eval_set) = a.run.examples(&cfg, "preference pairs", &why, |d| {
        d.encode_reward_pairs(&tokenizer, opts.max_length)
    })?;
    // `--adapter` continues a reward model (its score head included); otherwise a fresh
    // adapter and a fresh head.
    if a.model.adapter.is_none() {
        model.attach_fresh(&cfg)?;
    }
    model.ensure_score(cfg.seed)?;
    std::fs::create_dir_all(&a.run.output)
        .with_context(|| format!("creating {}", a.run.output.display()))?;
    let (n_train, n_eval) = (train_set.len(), eval_set.len());
    eprintln!("{n_train} preference pairs to train on, {n_eval} to evaluate");
    let cancel = cancel_on_ctrl_c();
    let run = a.run.run_options(&cfg, &cancel);
    let (finish, mut b) = Finish::start(
        &a.run,
        &cfg,
        &a.model.model,
        a.sft_adapter.as_deref(),
        model.lora_weights()?,
    );
    let (summary, final_loss, final_metrics) = model.train(
        &cfg,
        Fit {
            run: &run,
            options: opts,
            train: train_set,
            eval: eval_set,
            pad: tokenizer.pad_id,
            cb: &mut b,
        },
    )?;
    b.bar.finish_and_clear();
    let extra = serde_json::json!({
        "reward": opts,
        "train_pairs": n_train,
        "eval_pairs": n_eval,
        "final_train_loss": final_loss,
        "final_train_metrics": final_metrics,
    });
    let adapter = finish.adapter(model.lora_weights()?);
    if !finish.write(&summary, adapter, &tokenizer, model.config(), extra)? {
        return Ok(());
    }
    println!(
        "trained {} steps (reward model): loss {:.4}, accuracy {:.3}, margin {:.3}{}; wrote {}",
        summary.steps,
        final_loss,
        final_metrics.get("accuracy").copied().unwrap_or(f64::NAN),
        final_metrics.get("margin").copied().unwrap_or(f64::NAN),
        summary
            .eval_loss
            .map(|l| format!(", eval_loss {l:.4}"))
            .unwrap_or_default(),
        a.run.output.display()
    );
    Ok(())
}
