//! `fedtune train sft`: local LoRA/QLoRA/full supervised fine-tuning with TRL-style options,
//! from flags or a TOML file (flags win), writing a PEFT adapter (or a full model) with the
//! tokenizer files, a JSONL log and a summary. Ctrl-C saves a checkpoint and exits cleanly.

use anyhow::Context;
use clap::{Args, Subcommand};
use fedtune_engine::data::Dataset;
use fedtune_engine::train::lora::peft_adapter;
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use fedtune_engine::train::{SftRun, TrainConfig, train_sft};

use super::common::ModelArgs;
use super::export::write_model_dir;
use super::run::{
    Bar, RunArgs, cancel_on_ctrl_c, peak_rss, progress_bar, read_config, report_stopped, split_eval,
};
use super::target::Job;

/// `fedtune train ...`.
#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Supervised fine-tuning (LoRA by default; QLoRA with --load-in-4bit; --full or
    /// --train-last-layers N).
    Sft(SftArgs),
    /// Preference alignment (DPO and relatives) of a fresh LoRA adapter, optionally on top of
    /// an SFT adapter merged into the base.
    Dpo(super::dpo::DpoArgs),
    /// KTO on unpaired feedback (prompt, completion, true/false label) of a fresh LoRA
    /// adapter, optionally on top of an SFT adapter merged into the base.
    Kto(super::kto::KtoArgs),
    /// A reward model (TRL's RewardTrainer): a scalar score head on the last token, trained
    /// with a LoRA adapter on the body from preference pairs (Bradley–Terry loss).
    Reward(super::reward::RewardArgs),
    /// GRPO with verifiable rewards (TRL's GRPOTrainer): sampled groups of completions per
    /// prompt, scored by reward functions, train a LoRA adapter on group-relative advantages.
    Grpo(super::grpo::GrpoArgs),
    /// Knowledge distillation (TRL's GKDTrainer): a LoRA adapter of the student learns the
    /// next-token distributions of a teacher that shares its tokenizer (generalized JSD), on
    /// the data's completions and on its own samples.
    Distill(super::distill::DistillArgs),
}

/// Arguments of `fedtune train sft`.
#[derive(Debug, Args)]
pub struct SftArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Longest sequence: TRL 1.x's name for --max-seq-length (in `train dpo`, --max-length is
    /// DPO's prompt + completion length, as in TRL's DPOConfig).
    #[arg(long, conflicts_with = "max_seq_length")]
    max_length: Option<usize>,
}

/// Runs `fedtune train`.
pub fn run(cmd: TrainCommand) -> anyhow::Result<()> {
    match cmd {
        TrainCommand::Sft(a) => run_sft(a),
        TrainCommand::Dpo(a) => super::dpo::run(a),
        TrainCommand::Kto(a) => super::kto::run(a),
        TrainCommand::Reward(a) => super::reward::run(a),
        TrainCommand::Grpo(a) => super::grpo::run(a),
        TrainCommand::Distill(a) => super::distill::run(a),
    }
}

/// Loads, tokenises and trains; shared with the client daemon's command-line wrapper.
fn run_sft(a: SftArgs) -> anyhow::Result<()> {
    let mut cfg = match &a.run.config {
        Some(p) => read_config(p)?,
        None => TrainConfig::default(),
    };
    a.run.overrides.apply(&mut cfg);
    if let Some(n) = a.max_length {
        cfg.max_seq_length = n;
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("training options")?;
    a.model.check_precision(&cfg)?;
    let (mut model, tokenizer) = a.model.load_trainee(&cfg, None)?;
    let opts = a.run.load_options();
    let data = Dataset::load(&a.run.data, opts)?;
    for e in &data.skipped {
        eprintln!("skipped: {e}");
    }
    let seqs = data.encode_sft_on(&tokenizer, Some(cfg.max_seq_length), cfg.loss_on())?;
    let (train, eval) = match (&a.run.eval_data, cfg.eval_split) {
        (Some(p), _) => (
            seqs,
            Dataset::load(p, opts)?.encode_sft_on(
                &tokenizer,
                Some(cfg.max_seq_length),
                cfg.loss_on(),
            )?,
        ),
        (None, Some(f)) => split_eval(seqs, f, cfg.seed),
        (None, None) => (seqs, Vec::new()),
    };
    if cfg.is_lora() && a.model.adapter.is_none() {
        model.attach_fresh(&cfg)?;
    }
    std::fs::create_dir_all(&a.run.output)
        .with_context(|| format!("creating {}", a.run.output.display()))?;
    let cancel = cancel_on_ctrl_c();
    let bar = progress_bar();
    let run = SftRun {
        config: &cfg,
        train: &train,
        eval: &eval,
        pad: tokenizer.pad_id,
        output: Some(&a.run.output),
        resume: a.run.resume_from_checkpoint.as_deref(),
        cancel: Some(&cancel),
    };
    let started = std::time::Instant::now();
    let base = Some(a.model.model.display().to_string());
    let mut cb = Bar {
        bar: bar.clone(),
        adapter: if cfg.is_lora() {
            Some(peft_adapter(model.lora_weights()?, &cfg, base.clone()))
        } else {
            None
        },
    };
    struct Sft<'a, 'r>(&'a SftRun<'r>, &'a mut Bar);
    impl Job for Sft<'_, '_> {
        type Out = fedtune_engine::train::TrainSummary;
        fn run<M: TrainModel + RewardBase>(self, m: &mut M) -> anyhow::Result<Self::Out> {
            Ok(train_sft(m, self.0, self.1)?)
        }
    }
    let summary = model.train(&cfg, Sft(&run, &mut cb))?;
    bar.finish_and_clear();
    if summary.cancelled {
        report_stopped(summary.steps, &a.run.output);
        return Ok(());
    }
    if cfg.is_lora() {
        peft_adapter(model.lora_weights()?, &cfg, base).save(&a.run.output)?;
        super::export::copy_tokenizer(&tokenizer, model.config(), &a.model.model, &a.run.output)?;
    } else {
        let host = model
            .host()
            .context("full fine-tuning keeps the model on the host")?;
        write_model_dir(host, &tokenizer, &a.model.model, &a.run.output)?;
    }
    let report = serde_json::json!({
        "summary": summary,
        "config": cfg,
        "model": a.model.model,
        "train_examples": train.len(),
        "eval_examples": eval.len(),
        "wall_seconds": started.elapsed().as_secs_f64(),
        "peak_rss_bytes": peak_rss(),
    });
    std::fs::write(
        a.run.output.join("training_summary.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "trained {} steps: loss {:.4}{}; wrote {}",
        summary.steps,
        summary.final_loss.unwrap_or(f64::NAN),
        summary
            .eval_loss
            .map(|l| format!(", eval_loss {l:.4}"))
            .unwrap_or_default(),
        a.run.output.display()
    );
    Ok(())
}
