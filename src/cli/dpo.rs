//! `fedtune train dpo`: preference alignment of a fresh LoRA adapter (DPO, IPO, hinge, SimPO,
//! ORPO) with TRL's option names, from flags or a TOML file (flags win). With `--sft-adapter`
//! the SFT adapter is merged into the base in memory first, so policy and reference both start
//! from the SFT model.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedtune_engine::data::Dataset;
use fedtune_engine::tokenizer::EncodedPair;
use fedtune_engine::train::TrainSummary;
use fedtune_engine::train::dpo::{DpoObjective, DpoOptions, LossType};
use fedtune_engine::train::lora::peft_adapter;
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use fedtune_engine::train::sft::{RunOptions, train};
use fedtune_engine::train::{Callback, TrainConfig};

use super::common::ModelArgs;
use super::run::{Finish, RunArgs, cancel_on_ctrl_c, split_configs, split_eval};
use super::target::Job;

/// Arguments of `fedtune train dpo`.
#[derive(Debug, Args)]
pub struct DpoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An SFT adapter merged into the base before training (base → SFT → DPO).
    #[arg(long)]
    sft_adapter: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Temperature β (default 0.1).
    #[arg(long)]
    beta: Option<f64>,
    /// sigmoid (DPO), ipo, hinge, simpo or orpo.
    #[arg(long)]
    loss_type: Option<LossType>,
    /// SimPO's target margin γ (default 0.5).
    #[arg(long)]
    simpo_gamma: Option<f64>,
    /// ORPO's odds-ratio weight λ (default 0.1).
    #[arg(long)]
    orpo_lambda: Option<f64>,
    /// cDPO label smoothing (sigmoid and simpo).
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Prompts longer than this lose tokens on the left (default 512).
    #[arg(long)]
    max_prompt_length: Option<usize>,
    /// Prompt + completion are cut to this length (default 1024).
    #[arg(long)]
    max_length: Option<usize>,
    /// Compute reference log-probabilities once before training.
    #[arg(long)]
    precompute_ref_log_probs: bool,
}

const DPO_KEYS: &[&str] = &[
    "beta",
    "loss_type",
    "simpo_gamma",
    "orpo_lambda",
    "label_smoothing",
    "max_prompt_length",
    "max_length",
    "precompute_ref_log_probs",
];

/// The PEFT adapter of an alignment run (DPO, KTO) on `model`; with an SFT adapter merged into
/// the base first, its metadata says which (the adapter applies on top of that merge).
pub(crate) fn aligned_adapter(
    weights: fedtune_aggregation::Adapter,
    cfg: &TrainConfig,
    model: &std::path::Path,
    sft_adapter: Option<&std::path::Path>,
) -> fedtune_engine::PeftAdapter {
    let mut peft = peft_adapter(weights, cfg, Some(model.display().to_string()));
    if let Some(p) = sft_adapter {
        peft.metadata.insert(
            "merged_sft_adapter".into(),
            serde_json::Value::String(p.display().to_string()),
        );
    }
    peft
}

/// Splits a TOML file into the training options and the DPO options. Without a learning rate
/// the DPO default is TRL's DPOConfig's, 1e-6.
fn read_configs(path: Option<&PathBuf>) -> anyhow::Result<(TrainConfig, DpoOptions)> {
    split_configs(path, DPO_KEYS, 1e-6)
}

/// Runs `fedtune train dpo`.
pub fn run(a: DpoArgs) -> anyhow::Result<()> {
    let (mut cfg, mut opts) = read_configs(a.run.config.as_ref())?;
    a.run.overrides.apply(&mut cfg);
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = a.$f { opts.$f = v; })* };
    }
    set!(
        beta,
        loss_type,
        simpo_gamma,
        orpo_lambda,
        label_smoothing,
        max_prompt_length,
        max_length
    );
    opts.precompute_ref_log_probs |= a.precompute_ref_log_probs;
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("training options")?;
    opts.validate()
        .map_err(anyhow::Error::msg)
        .context("DPO options")?;
    anyhow::ensure!(
        cfg.is_lora() && !cfg.packing,
        "train dpo trains a fresh LoRA adapter (the reference is the model with it disabled): \
         --full, --train-last-layers and --packing do not apply"
    );
    anyhow::ensure!(
        a.model.adapter.is_none(),
        "train dpo: give the SFT adapter as --sft-adapter (it is merged into the base and a \
         fresh adapter is trained)"
    );
    a.model.check_precision(&cfg)?;
    let (mut model, tokenizer) = a.model.load_trainee(&cfg, a.sft_adapter.as_deref())?;
    let load = a.run.load_options();
    let encode = |path: &PathBuf| -> anyhow::Result<_> {
        let d = Dataset::load(path, load)?;
        for e in &d.skipped {
            eprintln!("skipped: {e}");
        }
        Ok(d.encode_pairs(
            &tokenizer,
            Some(opts.max_prompt_length),
            Some(opts.max_length),
        )?)
    };
    let (pairs, truncated) = encode(&a.run.data)?;
    let (train_pairs, eval_pairs) = match (&a.run.eval_data, cfg.eval_split) {
        (Some(p), _) => (pairs, encode(p)?.0),
        (None, Some(f)) => split_eval(pairs, f, cfg.seed),
        (None, None) => (pairs, Vec::new()),
    };
    if truncated.prompts + truncated.completions > 0 {
        eprintln!(
            "truncated: {} prompts (from the left, to {} tokens), {} pairs' completions (to fit {} tokens)",
            truncated.prompts, opts.max_prompt_length, truncated.completions, opts.max_length
        );
    }
    model.attach_fresh(&cfg)?;
    std::fs::create_dir_all(&a.run.output)
        .with_context(|| format!("creating {}", a.run.output.display()))?;
    let (n_train, n_eval) = (train_pairs.len(), eval_pairs.len());
    let cancel = cancel_on_ctrl_c();
    let run = a.run.run_options(&cfg, &cancel);
    let (finish, mut b) = Finish::start(
        &a.run,
        &cfg,
        &a.model.model,
        a.sft_adapter.as_deref(),
        model.lora_weights()?,
    );
    let pad = tokenizer.pad_id;
    let cb = &mut b;
    let data = (opts, train_pairs, eval_pairs, pad);
    let (summary, final_loss, final_metrics) = model.train(
        &cfg,
        Fit {
            run: &run,
            data,
            cb,
        },
    )?;
    b.bar.finish_and_clear();
    let extra = serde_json::json!({
        "dpo": opts,
        "train_pairs": n_train,
        "eval_pairs": n_eval,
        "truncated_prompts": truncated.prompts,
        "truncated_completions": truncated.completions,
        "final_train_loss": final_loss,
        "final_train_metrics": final_metrics,
    });
    let adapter = finish.adapter(model.lora_weights()?);
    if !finish.write(&summary, adapter, &tokenizer, model.config(), extra)? {
        return Ok(());
    }
    println!(
        "trained {} steps ({}): loss {:.4}, rewards/accuracies {:.2}{}; wrote {}",
        summary.steps,
        opts.loss_type_name(),
        final_loss,
        final_metrics
            .get("rewards/accuracies")
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

/// The preference pairs to train on: the model (wherever it lives) trains on them, and the
/// final training loss and metrics are measured: `(summary, loss, metrics)` (NaN and none when
/// the run was cancelled).
struct Fit<'a, 'r> {
    run: &'a RunOptions<'r>,
    data: (DpoOptions, Vec<EncodedPair>, Vec<EncodedPair>, u32),
    cb: &'a mut dyn Callback,
}

impl Job for Fit<'_, '_> {
    type Out = (TrainSummary, f64, std::collections::BTreeMap<String, f64>);

    fn run<M: TrainModel + RewardBase>(self, model: &mut M) -> anyhow::Result<Self::Out> {
        let (opts, train_pairs, eval_pairs, pad) = self.data;
        let objective = DpoObjective::new(
            model,
            opts,
            train_pairs,
            eval_pairs,
            self.run.config.per_device_train_batch_size,
            pad,
        );
        let summary = train(model, self.run, &objective, self.cb)?;
        if summary.cancelled {
            return Ok((summary, f64::NAN, Default::default()));
        }
        let (loss, metrics) = objective.metrics_on(model, false);
        Ok((summary, loss, metrics))
    }
}
