//! `fedtune train distill`: knowledge distillation from a teacher model into a LoRA adapter of
//! the student (TRL's `GKDTrainer`: generalized Jensen–Shannon divergence, on-policy student
//! samples, sequence-level KD), with TRL's option names, from flags or a TOML file (flags
//! win). The teacher loads on the student's device, runs without gradients and must share
//! the student's tokenizer. With `--adapter` the student's adapter goes on training; else a
//! fresh one is trained (on a base with `--sft-adapter` merged, as for `train dpo`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use burn::tensor::{DType, Device as BurnDevice};
use clap::Args;
use fedtune_engine::cuda::CudaModel;
use fedtune_engine::data::{Dataset, EncodedCompletion, LoadOptions};
use fedtune_engine::device::{Backend, Device};
use fedtune_engine::train::distill::{DistillObjective, DistillOptions};
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use fedtune_engine::train::sft::{RunOptions, train};
use fedtune_engine::train::{Callback, TrainConfig, TrainSummary};
use fedtune_engine::{LlamaModel, Tokenizer};

use super::common::ModelArgs;
use super::run::{Finish, RunArgs, cancel_on_ctrl_c, split_configs};
use super::target::Job;

/// Arguments of `fedtune train distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The teacher: a model directory or GGUF file whose tokenizer is the student's.
    #[arg(long)]
    teacher: PathBuf,
    /// A PEFT adapter applied to the teacher (a fine-tuned teacher kept as base + adapter).
    #[arg(long)]
    teacher_adapter: Option<PathBuf>,
    /// An SFT adapter merged into the student's base before a fresh adapter is trained.
    #[arg(long)]
    sft_adapter: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Generalized JSD interpolation: 0 = KL(teacher‖student), 1 = KL(student‖teacher)
    /// (default 0.5).
    #[arg(long)]
    beta: Option<f64>,
    /// Share of micro-batches trained on the student's own samples (default 0.5).
    #[arg(long)]
    lmbda: Option<f64>,
    /// Sampling temperature of generated completions (default 0.9).
    #[arg(long)]
    temperature: Option<f64>,
    /// Longest generated completion in tokens (default 128).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sequence-level KD: the other micro-batches train on the teacher's samples.
    #[arg(long)]
    seq_kd: bool,
    /// Keep LoRA dropout during distillation (TRL's `disable_dropout=False`).
    #[arg(long)]
    keep_dropout: bool,
    /// Prompt + completion keep their last max_length tokens (default 1024).
    #[arg(long)]
    max_length: Option<usize>,
}

const DISTILL_KEYS: &[&str] = &[
    "beta",
    "lmbda",
    "temperature",
    "max_new_tokens",
    "seq_kd",
    "disable_dropout",
    "max_length",
];

/// The teacher, on the student's device.
enum Teacher {
    Host(Box<LlamaModel>),
    Gpu(Box<CudaModel>),
}

impl ModelArgs {
    /// The teacher of a distillation run: `--teacher` (with `--teacher-adapter`) on this
    /// run's device, in the precision the student computes in, with its tokenizer.
    fn load_teacher(
        &self,
        path: &std::path::Path,
        adapter: Option<&std::path::Path>,
        cfg: &TrainConfig,
    ) -> anyhow::Result<(Teacher, Tokenizer)> {
        let args = ModelArgs {
            model: path.to_path_buf(),
            adapter: adapter.map(|p| p.to_path_buf()),
            dtype: if cfg.bf16 {
                "bf16"
            } else if cfg.fp16 {
                "f16"
            } else {
                "f32"
            }
            .into(),
            ..self.clone()
        };
        Ok(match args.engine_device()? {
            Device::Cpu => {
                let m = args.load()?;
                (Teacher::Host(Box::new(m.model)), m.tokenizer)
            }
            Device::Cuda(n) => {
                let (m, t) = args.load_cuda(n, None)?;
                (Teacher::Gpu(Box::new(m)), t)
            }
        })
    }
}

/// The distillation loop on a student wherever it lives, then the final training divergence.
struct Fit<'a, 'r> {
    run: &'a RunOptions<'r>,
    options: DistillOptions,
    teacher: &'a Teacher,
    train: Vec<EncodedCompletion>,
    eval: Vec<EncodedCompletion>,
    pad: u32,
    stop_ids: Vec<u32>,
    cb: &'a mut dyn Callback,
}

impl Fit<'_, '_> {
    fn with_teacher<M: TrainModel, Tc: Backend>(
        self,
        model: &mut M,
        teacher: &Tc,
    ) -> anyhow::Result<(TrainSummary, f64)> {
        let cfg = self.run.config;
        let objective = DistillObjective::new(
            teacher,
            model.config().vocab_size,
            self.options,
            self.train,
            self.eval,
            cfg.per_device_train_batch_size,
            self.pad,
            self.stop_ids,
            cfg.seed,
        )?;
        let summary = train(model, self.run, &objective, self.cb)?;
        if summary.cancelled {
            return Ok((summary, f64::NAN));
        }
        let loss = objective.loss_on(&*model, false);
        Ok((summary, loss))
    }
}

impl Job for Fit<'_, '_> {
    type Out = (TrainSummary, f64);

    fn run<M: TrainModel + RewardBase>(self, model: &mut M) -> anyhow::Result<Self::Out> {
        match self.teacher {
            Teacher::Host(t) => self.with_teacher(model, t.as_ref()),
            Teacher::Gpu(t) => self.with_teacher(model, t.as_ref()),
        }
    }
}

/// Runs `fedtune train distill`.
pub fn run(a: DistillArgs) -> anyhow::Result<()> {
    let (mut cfg, mut opts): (_, DistillOptions) = split_configs(
        a.run.config.as_ref(),
        DISTILL_KEYS,
        TrainConfig::default().learning_rate,
    )?;
    a.run.overrides.apply(&mut cfg);
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = a.$f { opts.$f = v; })* };
    }
    set!(beta, lmbda, temperature, max_new_tokens, max_length);
    opts.seq_kd |= a.seq_kd;
    if a.keep_dropout {
        opts.disable_dropout = false;
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("training options")?;
    opts.validate()
        .map_err(anyhow::Error::msg)
        .context("distillation options")?;
    anyhow::ensure!(
        cfg.is_lora() && !cfg.packing,
        "train distill trains a LoRA adapter of the student: --full, --train-last-layers and \
         --packing do not apply"
    );
    anyhow::ensure!(
        !(a.model.adapter.is_some() && a.sft_adapter.is_some()),
        "train distill: --adapter goes on training an adapter, --sft-adapter merges one and \
         trains a fresh one; give one of them"
    );
    a.model.check_precision(&cfg)?;
    let (mut model, tokenizer) = a.model.load_trainee(&cfg, a.sft_adapter.as_deref())?;
    let (teacher, teacher_tok) = a
        .model
        .load_teacher(&a.teacher, a.teacher_adapter.as_deref(), &cfg)
        .with_context(|| format!("loading teacher {}", a.teacher.display()))?;
    if let Some(d) = tokenizer.vocabulary_difference(&teacher_tok) {
        anyhow::bail!(
            "--teacher {}: its tokenizer is not the student's ({d}); distillation compares the \
             two models' next-token distributions token for token, so they must share one",
            a.teacher.display()
        );
    }
    let why = format!("the completion alone fills max_length {}", opts.max_length);
    let (train_set, eval_set) = a.run.examples(&cfg, "examples", &why, |d| {
        d.encode_completions(&tokenizer, opts.max_length)
    })?;
    if a.model.adapter.is_none() {
        model.attach_fresh(&cfg)?;
    }
    std::fs::create_dir_all(&a.run.output)
        .with_context(|| format!("creating {}", a.run.output.display()))?;
    let mut stop_ids = model.config().eos_token_ids.clone();
    stop_ids.extend(tokenizer.eos_id);
    let (n_train, n_eval) = (train_set.len(), eval_set.len());
    eprintln!(
        "{n_train} examples; teacher {}; beta {}, lmbda {}{}",
        a.teacher.display(),
        opts.beta,
        opts.lmbda,
        if opts.seq_kd { ", seq_kd" } else { "" }
    );
    let cancel = cancel_on_ctrl_c();
    let run = a.run.run_options(&cfg, &cancel);
    let (finish, mut b) = Finish::start(
        &a.run,
        &cfg,
        &a.model.model,
        a.sft_adapter.as_deref(),
        model.lora_weights()?,
    );
    let (summary, final_loss) = model.train(
        &cfg,
        Fit {
            run: &run,
            options: opts,
            teacher: &teacher,
            train: train_set,
            eval: eval_set,
            pad: tokenizer.pad_id,
            stop_ids,
            cb: &mut b,
        },
    )?;
    b.bar.finish_and_clear();
    let extra = serde_json::json!({
        "distill": opts,
        "teacher": a.teacher,
        "teacher_adapter": a.teacher_adapter,
        "train_examples": n_train,
        "eval_examples": n_eval,
        "final_train_divergence": final_loss,
    });
    let adapter = finish.adapter(model.lora_weights()?);
    if !finish.write(&summary, adapter, &tokenizer, model.config(), extra)? {
        return Ok(());
    }
    println!(
        "trained {} steps (distillation, beta {}): divergence to the teacher {:.4} per completion token{}; wrote {}",
        summary.steps,
        opts.beta,
        final_loss,
        summary
            .eval_loss
            .map(|l| format!(", eval_loss {l:.4}"))
            .unwrap_or_default(),
        a.run.output.display()
    );
    Ok(())
}

/// A client's teacher (on the host) and its prompts with completions for distillation
/// rounds (`client.toml`'s `teacher`, `teacher_adapter`): prompts with completions from `data`,
/// held out from `eval_data`.
#[allow(clippy::too_many_arguments)]
pub(super) fn client_data(
    file: &str,
    teacher: &Path,
    teacher_adapter: Option<&Path>,
    data: &Path,
    eval_data: Option<&Path>,
    max_length: usize,
    m: &fedtune_engine::LoadedModel,
    opts: LoadOptions,
) -> anyhow::Result<fedtune_client::trainer::DistillData> {
    let mut t = fedtune_engine::load_model(teacher, &BurnDevice::flex(), DType::F32)
        .with_context(|| format!("{file}: teacher: loading {}", teacher.display()))?;
    if let Some(d) = m.tokenizer.vocabulary_difference(&t.tokenizer) {
        anyhow::bail!(
            "{file}: teacher {}: its tokenizer is not the base model's ({d}); distillation \
             compares next-token distributions token for token",
            teacher.display()
        );
    }
    if let Some(a) = teacher_adapter {
        let adapter = fedtune_engine::PeftAdapter::load(a)
            .with_context(|| format!("{file}: teacher_adapter: loading {}", a.display()))?;
        t.model
            .attach_adapter(&adapter)
            .with_context(|| format!("{file}: teacher_adapter: applying {}", a.display()))?;
    }
    let encode = |p: &Path| -> anyhow::Result<_> {
        let (examples, dropped) =
            Dataset::load(p, opts)?.encode_completions(&m.tokenizer, max_length)?;
        if dropped > 0 {
            eprintln!(
                "{}: {dropped} examples dropped: the completion alone fills max_length {}",
                p.display(),
                max_length
            );
        }
        Ok(examples)
    };
    let mut stop_ids = m.model.config.eos_token_ids.clone();
    stop_ids.extend(m.tokenizer.eos_id);
    Ok(fedtune_client::trainer::DistillData {
        teacher: Some(Arc::new(t.model)),
        examples: encode(data)?,
        eval: eval_data.map(encode).transpose()?.unwrap_or_default(),
        stop_ids,
    })
}
