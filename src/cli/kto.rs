//! `fedtune train kto`: KTO on unpaired feedback (a prompt, one completion, a true/false
//! label: a clinician's thumbs up or down) with TRL's option names, from flags or a TOML file
//! (flags win). A fresh LoRA adapter is trained; the reference is the model with it disabled.
//! With `--sft-adapter` the SFT adapter is merged into the base first, as for `train dpo`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedtune_engine::train::kto::{KtoLoss, KtoObjective, KtoOptions};
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use fedtune_engine::train::sft::{RunOptions, train};
use fedtune_engine::train::{Callback, TrainSummary};

use super::common::ModelArgs;
use super::run::{Finish, RunArgs, cancel_on_ctrl_c, split_configs};
use super::target::Job;

/// Arguments of `fedtune train kto`.
#[derive(Debug, Args)]
pub struct KtoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An SFT adapter merged into the base before training (base → SFT → KTO).
    #[arg(long)]
    sft_adapter: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Temperature β (default 0.1).
    #[arg(long)]
    beta: Option<f64>,
    /// Weight of desirable examples' losses (default 1).
    #[arg(long)]
    desirable_weight: Option<f64>,
    /// Weight of undesirable examples' losses (default 1).
    #[arg(long)]
    undesirable_weight: Option<f64>,
    /// kto or apo_zero_unpaired.
    #[arg(long)]
    loss_type: Option<KtoLoss>,
    /// Prompt + completion are cut to this length; longer prompts are dropped (default 1024).
    #[arg(long)]
    max_length: Option<usize>,
}

const KTO_KEYS: &[&str] = &[
    "beta",
    "desirable_weight",
    "undesirable_weight",
    "loss_type",
    "max_length",
];

/// The KTO loop on a model wherever it lives, then the final training loss and metrics.
struct Fit<'a, 'r> {
    run: &'a RunOptions<'r>,
    options: KtoOptions,
    train: Vec<fedtune_engine::data::EncodedFeedback>,
    eval: Vec<fedtune_engine::data::EncodedFeedback>,
    pad: u32,
    cb: &'a mut dyn Callback,
}

impl Job for Fit<'_, '_> {
    type Out = (TrainSummary, f64, std::collections::BTreeMap<String, f64>);

    fn run<M: TrainModel + RewardBase>(self, model: &mut M) -> anyhow::Result<Self::Out> {
        let objective = KtoObjective::new(
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
        let (loss, metrics) = objective.metrics_on(model, false);
        Ok((summary, loss, metrics))
    }
}

/// Runs `fedtune train kto`.
pub fn run(a: KtoArgs) -> anyhow::Result<()> {
    let (mut cfg, mut opts): (_, KtoOptions) =
        split_configs(a.run.config.as_ref(), KTO_KEYS, 1e-6)?;
    a.run.overrides.apply(&mut cfg);
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = a.$f { opts.$f = v; })* };
    }
    set!(
        beta,
        desirable_weight,
        undesirable_weight,
        loss_type,
        max_length
    );
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("training options")?;
    opts.validate(cfg.per_device_train_batch_size)
        .map_err(anyhow::Error::msg)
        .context("KTO options")?;
    anyhow::ensure!(
        cfg.is_lora() && !cfg.packing,
        "train kto trains a fresh LoRA adapter (the reference is the model with it disabled): \
         --full, --train-last-layers and --packing do not apply"
    );
    anyhow::ensure!(
        a.model.adapter.is_none(),
        "train kto: give the SFT adapter as --sft-adapter (it is merged into the base and a \
         fresh adapter is trained)"
    );
    a.model.check_precision(&cfg)?;
    let (mut model, tokenizer) = a.model.load_trainee(&cfg, a.sft_adapter.as_deref())?;
    let why = format!("the prompt alone fills max_length {}", opts.max_length);
    let (train_set, eval_set) = a.run.examples(&cfg, "examples", &why, |d| {
        d.encode_feedback(&tokenizer, opts.max_length)
    })?;
    let desirable = train_set.iter().filter(|e| e.label).count();
    eprintln!(
        "{} examples: {desirable} desirable, {} undesirable",
        train_set.len(),
        train_set.len() - desirable
    );
    model.attach_fresh(&cfg)?;
    std::fs::create_dir_all(&a.run.output)
        .with_context(|| format!("creating {}", a.run.output.display()))?;
    let (n_train, n_eval) = (train_set.len(), eval_set.len());
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
        "kto": opts,
        "train_examples": n_train,
        "desirable_examples": desirable,
        "eval_examples": n_eval,
        "final_train_loss": final_loss,
        "final_train_metrics": final_metrics,
    });
    let adapter = finish.adapter(model.lora_weights()?);
    if !finish.write(&summary, adapter, &tokenizer, model.config(), extra)? {
        return Ok(());
    }
    println!(
        "trained {} steps (KTO, {}): loss {:.4}, rewards/margins {:.3}{}; wrote {}",
        summary.steps,
        match opts.loss_type {
            KtoLoss::Kto => "kto",
            KtoLoss::ApoZeroUnpaired => "apo_zero_unpaired",
        },
        final_loss,
        final_metrics
            .get("rewards/margins")
            .copied()
            .unwrap_or(f64::NAN),
        summary
            .eval_loss
            .map(|l| format!(", eval_loss {l:.4}"))
            .unwrap_or_default(),
        a.run.output.display()
    );
    Ok(())
}
