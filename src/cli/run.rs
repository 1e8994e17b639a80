//! What every `fedtune train` subcommand shares: the TRL-named options and their TOML file
//! (`RunArgs`, `TrainOverrides`, `split_configs`), the evaluation split, the progress bar,
//! Ctrl-C, and writing a run's results (`Finish`). `train.rs` dispatches the subcommands;
//! each of them uses this module, none of them another's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Args;
use fedtune_engine::PeftAdapter;
use fedtune_engine::data::{Dataset, Format, LoadOptions};
use fedtune_engine::train::lora::with_factors;
use fedtune_engine::train::optim::Schedule;
use fedtune_engine::train::{Callback, LogEntry, RunInfo, TrainConfig, TrainerState};
use indicatif::{ProgressBar, ProgressStyle};

/// Options that override the TOML config (TRL/PEFT names).
#[derive(Debug, Clone, Default, Args)]
pub struct TrainOverrides {
    /// LoRA rank.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Projections with adapters (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// rsLoRA scaling (alpha/sqrt(r)).
    #[arg(long)]
    pub use_rslora: bool,
    /// DoRA (PEFT's use_dora): weight-decomposed LoRA, a trained magnitude per output row
    /// times the row-normalised W + s·B·A, on the CPU or a GPU.
    #[arg(long)]
    pub use_dora: bool,
    /// Full fine-tuning.
    #[arg(long)]
    pub full: bool,
    /// Train the last N blocks, final norm and head.
    #[arg(long)]
    pub train_last_layers: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Epochs.
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Optimiser steps (overrides epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Longest sequence (`train sft` also takes TRL 1.x's name, `--max-length`).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// Pack sequences into rows of max-seq-length.
    #[arg(long)]
    pub packing: bool,
    /// Conversations: train on the assistant turns only (fedtune's default, true) or on every
    /// token (false, TRL's default).
    #[arg(long)]
    pub assistant_only_loss: Option<bool>,
    /// Prompt/completion data: train on the completion only (true, the default) or on the
    /// prompt too.
    #[arg(long)]
    pub completion_only_loss: Option<bool>,
    /// linear, cosine or constant.
    #[arg(long)]
    pub lr_scheduler_type: Option<Schedule>,
    /// Warm-up fraction.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Warm-up steps (overrides --warmup-ratio, as in transformers).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Gradient clipping norm (0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hold out this fraction of the training data for evaluation.
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Evaluate every N steps.
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep only the newest N checkpoints (older `checkpoint-*` directories are deleted).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Log every N steps.
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// Where logs go besides train_log.jsonl (transformers' `report_to`): `tensorboard`
    /// writes TensorBoard event files under OUTPUT/runs/; `none` (the default) nothing more.
    #[arg(long, value_delimiter = ',')]
    pub report_to: Option<Vec<fedtune_engine::train::config::ReportTo>>,
    /// QLoRA: NF4 base projections.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// Double-quantise NF4 scales.
    #[arg(long)]
    pub bnb_4bit_use_double_quant: bool,
    /// Mixed precision (TRL's `bf16`): on the GPU bf16 base and activations, f32 LoRA factors,
    /// gradients and optimiser state; on the CPU the same as `--dtype bf16` (LoRA).
    #[arg(long, conflicts_with = "fp16")]
    pub bf16: bool,
    /// Mixed precision on the GPU (TRL's `fp16`): f16 base and activations, f32 LoRA factors,
    /// gradients and optimiser state, with dynamic loss scaling (torch's GradScaler: a step
    /// whose gradients overflow is skipped and halves the scale). For GPUs without bf16.
    #[arg(long)]
    pub fp16: bool,
    /// Recompute each block's forward in backward instead of keeping its activations
    /// (TRL's `gradient_checkpointing`): less memory, about a third more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Let f32 matrix products on the GPU use TF32 tensor cores (TRL's `tf32`; PyTorch's
    /// `allow_tf32`).
    #[arg(long)]
    pub tf32: bool,
}

impl TrainOverrides {
    /// Applies the flags given on top of `c`.
    pub fn apply(&self, c: &mut TrainConfig) {
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f.clone() { c.$f = v; })* };
        }
        set!(
            lora_r,
            lora_alpha,
            lora_dropout,
            target_modules,
            learning_rate,
            num_train_epochs,
            per_device_train_batch_size,
            gradient_accumulation_steps,
            max_seq_length,
            lr_scheduler_type,
            warmup_ratio,
            max_grad_norm,
            weight_decay,
            seed,
            logging_steps,
            report_to
        );
        macro_rules! opt {
            ($($f:ident),*) => { $(if self.$f.is_some() { c.$f = self.$f; })* };
        }
        opt!(
            train_last_layers,
            max_steps,
            eval_split,
            eval_steps,
            save_steps,
            warmup_steps,
            save_total_limit
        );
        if let Some(v) = self.assistant_only_loss {
            c.assistant_only_loss = v;
        }
        if let Some(v) = self.completion_only_loss {
            c.completion_only_loss = v;
        }
        c.use_rslora |= self.use_rslora;
        c.use_dora |= self.use_dora;
        c.full |= self.full;
        c.packing |= self.packing;
        c.load_in_4bit |= self.load_in_4bit;
        c.bnb_4bit_use_double_quant |= self.bnb_4bit_use_double_quant;
        c.bf16 |= self.bf16;
        c.fp16 |= self.fp16;
        c.gradient_checkpointing |= self.gradient_checkpointing;
        c.tf32 |= self.tf32;
    }
}

/// Data, output and run options shared by `train sft` and `train dpo`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Training data: SFT examples (`sft`), preference pairs (`dpo`, `reward`), feedback
    /// (`kto`), prompts (`grpo`) or prompts with completions (`distill`).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub output: PathBuf,
    /// TOML file with the training options (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Force a dataset format.
    #[arg(long)]
    pub format: Option<Format>,
    /// Evaluation data.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Report and skip invalid records.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Resume from this checkpoint directory.
    #[arg(long)]
    pub resume_from_checkpoint: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: TrainOverrides,
}

impl RunArgs {
    /// The examples of a run: `--data` through `encode` (which returns the examples and how
    /// many it left out, reported on stderr as `left out N <what> of FILE: <why>`), evaluated
    /// on `--eval-data` or on the held-out share `eval_split` of them; an error when nothing
    /// is left to train on.
    pub(crate) fn examples<T>(
        &self,
        cfg: &TrainConfig,
        what: &str,
        why: &str,
        encode: impl Fn(&Dataset) -> fedtune_engine::Result<(Vec<T>, usize)>,
    ) -> anyhow::Result<(Vec<T>, Vec<T>)> {
        let load = self.load_options();
        let read = |path: &Path| -> anyhow::Result<Vec<T>> {
            let d = Dataset::load(path, load)?;
            for e in &d.skipped {
                eprintln!("skipped: {e}");
            }
            let (examples, dropped) = encode(&d)?;
            if dropped > 0 {
                eprintln!("left out {dropped} {what} of {}: {why}", path.display());
            }
            Ok(examples)
        };
        let examples = read(&self.data)?;
        let (train, eval) = match (&self.eval_data, cfg.eval_split) {
            (Some(p), _) => (examples, read(p)?),
            (None, Some(f)) => split_eval(examples, f, cfg.seed),
            (None, None) => (examples, Vec::new()),
        };
        anyhow::ensure!(
            !train.is_empty(),
            "{}: no {what} to train on",
            self.data.display()
        );
        Ok((train, eval))
    }

    /// The training loop's options for `cfg`: output here, resuming from
    /// `--resume-from-checkpoint`, stopped by `cancel`.
    pub(crate) fn run_options<'a>(
        &'a self,
        cfg: &'a TrainConfig,
        cancel: &'a std::sync::atomic::AtomicBool,
    ) -> fedtune_engine::train::sft::RunOptions<'a> {
        fedtune_engine::train::sft::RunOptions {
            config: cfg,
            output: Some(&self.output),
            resume: self.resume_from_checkpoint.as_deref(),
            cancel: Some(cancel),
        }
    }

    /// The dataset loading options.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            format: self.format,
            skip_invalid: self.skip_invalid,
        }
    }
}

/// Reads a TOML training config.
pub fn read_config(path: &Path) -> anyhow::Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}", path.display()))
}

/// Where `train dpo|kto|reward|grpo` write their results, and what every run records.
pub(crate) struct Finish<'a> {
    /// The output directory.
    pub(crate) dir: &'a Path,
    /// The run's options.
    pub(crate) cfg: &'a TrainConfig,
    /// The base model.
    pub(crate) model: &'a Path,
    /// The SFT adapter merged into the base, if any.
    pub(crate) sft_adapter: Option<&'a Path>,
    /// When the run started.
    pub(crate) started: std::time::Instant,
}

impl<'a> Finish<'a> {
    /// A run writing to `run.output`, started now, and its progress bar, which gives each
    /// checkpoint a PEFT adapter laid out as `weights` (the adapter before training).
    pub(crate) fn start(
        run: &'a RunArgs,
        cfg: &'a TrainConfig,
        model: &'a Path,
        sft_adapter: Option<&'a Path>,
        weights: fedtune_aggregation::Adapter,
    ) -> (Self, Bar) {
        let finish = Finish {
            dir: &run.output,
            cfg,
            model,
            sft_adapter,
            started: std::time::Instant::now(),
        };
        let bar = Bar {
            bar: progress_bar(),
            adapter: Some(finish.adapter(weights)),
        };
        (finish, bar)
    }

    /// The PEFT adapter of `weights` for this run (base model and merged SFT adapter recorded).
    pub(crate) fn adapter(
        &self,
        weights: fedtune_aggregation::Adapter,
    ) -> fedtune_engine::PeftAdapter {
        super::dpo::aligned_adapter(weights, self.cfg, self.model, self.sft_adapter)
    }

    /// After training: nothing more when the run was cancelled (its checkpoints are on disk;
    /// returns false); else the adapter, the tokenizer files and `training_summary.json` — the
    /// summary, options, model, SFT adapter, wall time and peak memory, with the method's own
    /// fields (`extra`, a JSON object).
    pub(crate) fn write(
        &self,
        summary: &fedtune_engine::train::TrainSummary,
        adapter: fedtune_engine::PeftAdapter,
        tokenizer: &fedtune_engine::Tokenizer,
        config: &fedtune_engine::ModelConfig,
        extra: serde_json::Value,
    ) -> anyhow::Result<bool> {
        if summary.cancelled {
            report_stopped(summary.steps, self.dir);
            return Ok(false);
        }
        adapter.save(self.dir)?;
        super::export::copy_tokenizer(tokenizer, config, self.model, self.dir)?;
        let mut report = serde_json::json!({
            "summary": summary,
            "config": self.cfg,
            "model": self.model,
            "sft_adapter": self.sft_adapter,
            "wall_seconds": self.started.elapsed().as_secs_f64(),
            "peak_rss_bytes": peak_rss(),
        });
        if let (Some(r), serde_json::Value::Object(e)) = (report.as_object_mut(), extra) {
            r.extend(e);
        }
        std::fs::write(
            self.dir.join("training_summary.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        Ok(true)
    }
}

pub(crate) struct Bar {
    pub(crate) bar: ProgressBar,
    /// The run's PEFT adapter before training (LoRA runs): each checkpoint gets a copy with
    /// its trained factors, loadable as the Hugging Face Trainer's checkpoints are.
    pub(crate) adapter: Option<PeftAdapter>,
}

impl Callback for Bar {
    fn on_train_begin(&mut self, i: &RunInfo) {
        // On stderr whether or not the bar is drawn (it is hidden without a terminal).
        self.bar.suspend(|| eprintln!("{}", banner(i)));
    }

    fn on_save(
        &mut self,
        dir: &Path,
        params: &[(String, burn::tensor::Tensor<2>)],
    ) -> fedtune_engine::Result<()> {
        match &self.adapter {
            Some(template) => with_factors(template, params)?.save(dir),
            None => Ok(()),
        }
    }

    fn on_log(&mut self, e: &LogEntry, state: &TrainerState) {
        self.bar.set_length(state.total_steps);
        self.bar.set_position(e.step);
        if let (Some(loss), Some(lr), Some(tps)) = (e.loss, e.learning_rate, e.tokens_per_second) {
            // Alignment runs (DPO, KTO) add their TRL metrics.
            let extra: String = [
                ("kl", "kl"),
                ("rewards/margins", "margin"),
                ("rewards/accuracies", "acc"),
            ]
            .iter()
            .filter_map(|(k, short)| e.metrics.get(*k).map(|v| format!(" {short} {v:.3}")))
            .collect();
            self.bar
                .set_message(format!("loss {loss:.4} lr {lr:.2e}{extra} {tps:.0} tok/s"));
        }
        if let Some(el) = e.eval_loss {
            self.bar
                .println(format!("step {}: eval_loss {el:.4}", e.step));
        }
    }
}

pub(crate) fn split_eval<T>(seqs: Vec<T>, frac: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let order = fedtune_engine::train::batches::epoch_order(seqs.len(), seed, u64::MAX);
    let n_eval =
        ((seqs.len() as f64 * frac).round() as usize).clamp(1, seqs.len().saturating_sub(1).max(1));
    let mut eval = Vec::new();
    let mut train = Vec::new();
    let held: std::collections::HashSet<usize> = order[..n_eval].iter().copied().collect();
    for (i, s) in seqs.into_iter().enumerate() {
        if held.contains(&i) {
            eval.push(s)
        } else {
            train.push(s)
        }
    }
    (train, eval)
}

/// Says where a cancelled run stopped and how to resume it.
pub(crate) fn report_stopped(steps: u64, output: &Path) {
    eprintln!(
        "stopped at step {steps}; resume with --resume-from-checkpoint {}",
        output.join(format!("checkpoint-{steps}")).display()
    );
}

/// A flag set by Ctrl-C (the loop then checkpoints and stops).
pub(crate) fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: saving a checkpoint after the current step");
        c.store(true, Ordering::SeqCst);
    });
    cancel
}

/// The start banner: what the run will do.
pub(crate) fn banner(i: &RunInfo) -> String {
    format!(
        "training {} examples: {} steps, effective batch {}; trainable parameters {} of {} ({:.4}%)",
        i.examples,
        i.total_steps,
        i.effective_batch,
        i.trainable_parameters,
        i.model_parameters,
        100.0 * i.trainable_parameters as f64 / i.model_parameters.max(1) as f64
    )
}

/// The training progress bar.
pub(crate) fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Splits a TOML file into the training options and the method's own options (`keys`);
/// without a learning rate the method's default `lr` applies.
pub(crate) fn split_configs<T: serde::de::DeserializeOwned>(
    path: Option<&PathBuf>,
    keys: &[&str],
    lr: f64,
) -> anyhow::Result<(TrainConfig, T)> {
    let mut table = match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("{}", p.display()))?
        }
        None => toml::Table::new(),
    };
    let mut own = toml::Table::new();
    for k in keys {
        if let Some(v) = table.remove(*k) {
            own.insert(k.to_string(), v);
        }
    }
    let where_ = path.map(|p| p.display().to_string()).unwrap_or_default();
    let has_lr = table.contains_key("learning_rate");
    let mut cfg: TrainConfig = toml::Value::Table(table)
        .try_into()
        .with_context(|| where_.clone())?;
    if !has_lr {
        cfg.learning_rate = lr;
    }
    let opts: T = toml::Value::Table(own)
        .try_into()
        .with_context(|| where_.clone())?;
    Ok((cfg, opts))
}
