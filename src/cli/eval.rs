//! `fedtune eval`: loss, perplexity and, for preference data with `--beta`, DPO metrics; with
//! `--generate --reward`, completions of held-out prompts scored by reward functions.
//! With `--json` the last line of stdout is one JSON object (a stable contract).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedtune_engine::Tokenizer;
use fedtune_engine::data::{Dataset, Format, LoadOptions};
use fedtune_engine::device::{Backend, Device};
use fedtune_engine::dpo::{DpoMetrics, PairLogps};
use fedtune_engine::eval::{TokenBatch, sequence_logprobs, sft_loss};
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use serde_json::json;

use super::common::{ModelArgs, QuantArgs};

/// Arguments of `fedtune eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    quant: QuantArgs,
    /// Dataset (JSONL, JSON or CSV).
    #[arg(long)]
    data: PathBuf,
    /// Force a dataset format instead of detecting it per record.
    #[arg(long)]
    format: Option<Format>,
    /// DPO temperature: with preference data, also report dpo_loss, reward_margin and
    /// reward_accuracy against the model with its adapter disabled.
    #[arg(long)]
    beta: Option<f64>,
    /// Reference model for `--beta` (TRL's `ref_model`) instead of the model with its adapter
    /// disabled.
    #[arg(long)]
    ref_model: Option<PathBuf>,
    /// The adapter is a reward model (`fedtune train reward`: a score head on the last
    /// token): score both sides of every preference pair and report loss, accuracy, margin
    /// and min/mean/max reward (TRL's RewardTrainer metrics). Pairs with a side longer than
    /// `--max-length` are left out, as TRL filters them.
    #[arg(long)]
    reward_model: bool,
    /// Generate a completion for every prompt of `--data` (JSON lines with a `prompt` and the
    /// fields rewards read, as `train grpo` takes them) and score it with `--reward`: the
    /// weighted reward, each function's mean, std and pass rate, and completion lengths.
    #[arg(long, requires = "rewards")]
    generate: bool,
    /// A reward function for `--generate`, repeatable: json_valid, json_schema:FILE,
    /// field_match[:FIELD], exact_match[:FIELD], regex:PATTERN, length:MIN:MAX,
    /// command:PROGRAM, reward_model:DIR.
    #[arg(long = "reward", requires = "generate")]
    rewards: Vec<String>,
    /// One weight per reward, comma-separated (TRL's `reward_weights`; default 1 each).
    #[arg(long, value_delimiter = ',', requires = "generate")]
    reward_weights: Vec<f64>,
    /// Longest completion in tokens with `--generate`.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature with `--generate` (0: greedy decoding).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// With `--generate`, write each prompt, its completion and its rewards here as JSON lines.
    #[arg(long, requires = "generate")]
    completions: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Truncate SFT sequences to this many tokens.
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// Truncate DPO prompts from the left to this many tokens.
    #[arg(long)]
    max_prompt_length: Option<usize>,
    /// Truncate DPO prompt + completion to this many tokens.
    #[arg(long)]
    max_length: Option<usize>,
    /// Report and skip invalid records instead of failing.
    #[arg(long)]
    skip_invalid: bool,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Runs `fedtune eval`.
pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if a.reward_model {
        a.model.adapter.as_ref().context(
            "--reward-model needs --adapter: a reward model trained with `fedtune train reward`",
        )?;
    }
    if a.generate {
        anyhow::ensure!(
            a.temperature.is_finite() && a.temperature >= 0.0 && a.max_new_tokens > 0,
            "--temperature must be 0 (greedy) or positive and --max-new-tokens positive"
        );
    }
    match a.model.engine_device()? {
        Device::Cpu => {
            let m = a.model.load_quantized(a.quant.nf4())?;
            if a.reward_model {
                return evaluate_reward_model(&a, &m.model, &m.tokenizer);
            }
            if a.generate {
                return evaluate_generations(&a, &m.model, m.tokenizer);
            }
            let reference = match &a.ref_model {
                Some(p) => Some(
                    fedtune_engine::load_model(
                        p,
                        &super::common::parse_device(&a.model.device)?,
                        super::common::parse_dtype(&a.model.dtype)?,
                    )
                    .with_context(|| format!("loading reference model {}", p.display()))?
                    .model,
                ),
                None => None,
            };
            evaluate(&a, &m.model, &m.tokenizer, reference)
        }
        Device::Cuda(i) => {
            let (model, tokenizer) = a.model.load_cuda(i, a.quant.nf4())?;
            if a.reward_model {
                return evaluate_reward_model(&a, &model, &tokenizer);
            }
            if a.generate {
                return evaluate_generations(&a, &model, tokenizer);
            }
            let reference = match &a.ref_model {
                Some(p) => Some(
                    fedtune_engine::loader::load_model_cuda(p, model.gpu.clone(), model.dt, None)
                        .with_context(|| format!("loading reference model {}", p.display()))?
                        .0,
                ),
                None => None,
            };
            evaluate(&a, &model, &tokenizer, reference)
        }
    }
}

/// `--reward-model`: the rewards of both sides of every pair, under `model` (the reward
/// model's adapter attached) on its device.
fn evaluate_reward_model<M: TrainModel>(
    a: &EvalArgs,
    model: &M,
    tokenizer: &Tokenizer,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        model.param_shape("score.weight").is_some(),
        "--reward-model: {} has no score head (train one with `fedtune train reward`)",
        a.model
            .adapter
            .as_deref()
            .unwrap_or(a.model.model.as_path())
            .display()
    );
    let data = Dataset::load(
        &a.data,
        LoadOptions {
            format: a.format,
            skip_invalid: a.skip_invalid,
        },
    )?;
    for e in &data.skipped {
        eprintln!("skipped: {e}");
    }
    let options = fedtune_engine::train::reward::RewardOptions {
        max_length: a.max_length.or(Some(1024)),
        ..Default::default()
    };
    let (pairs, dropped) = data.encode_reward_pairs(tokenizer, options.max_length)?;
    anyhow::ensure!(!pairs.is_empty(), "{}: no pair to score", a.data.display());
    let rewards = fedtune_engine::train::reward::score_pairs(
        model,
        &pairs,
        (a.batch_size / 2).max(1),
        tokenizer.pad_id,
    )?;
    let (loss, metrics) = fedtune_engine::train::reward::reward_metrics(&rewards, &options);
    let mut out = json!({
        "loss": loss,
        "pairs": pairs.len(),
        "left_out": dropped,
        "skipped": data.skipped.len(),
    });
    if let Some(o) = out.as_object_mut() {
        o.extend(metrics.into_iter().map(|(k, v)| (k, json!(v))));
    }
    print_metrics(a, &out)
}

/// `--generate --reward`: one completion per prompt under `model`, scored (reward models on
/// the model's device).
fn evaluate_generations<M: TrainModel + RewardBase>(
    a: &EvalArgs,
    model: &M,
    tokenizer: Tokenizer,
) -> anyhow::Result<()> {
    use fedtune_engine::generate::{BATCH_ROWS, GenerationConfig, generate_groups};
    use fedtune_engine::rewards::{RewardInput, Rewards, completion_metrics};
    let mut rewards = Rewards::parse(&a.rewards, &a.reward_weights)?;
    let prompts = fedtune_engine::train::grpo::load_prompts(&a.data, &tokenizer)
        .with_context(|| format!("reading prompts {}", a.data.display()))?;
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompt", a.data.display());
    let fields: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i + 1, &p.fields))
        .collect();
    for (f, _) in &rewards.fns {
        f.check_fields(&a.data, &fields)?;
    }
    let tokenizer = std::sync::Arc::new(tokenizer);
    rewards.load_models(model, &tokenizer)?;
    let mut stop_ids = model.config().eos_token_ids.clone();
    stop_ids.extend(tokenizer.eos_id);
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        stop_ids: stop_ids.clone(),
        ..GenerationConfig::default()
    };
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    let mut ids = Vec::with_capacity(prompts.len());
    let mut texts = Vec::with_capacity(prompts.len());
    // Batches of prompts decode together; prompt k samples from seed k.
    for (c, chunk) in prompts.chunks(BATCH_ROWS).enumerate() {
        let asked: Vec<&[u32]> = chunk.iter().map(|p| &p.ids[..]).collect();
        let seeds: Vec<u64> = (0..chunk.len())
            .map(|k| (c * BATCH_ROWS + k) as u64)
            .collect();
        for mut out in generate_groups(model, &asked, &seeds, 1, &cfg) {
            let out = out.pop().unwrap_or_default();
            texts.push(tokenizer.decode(&out, true)?);
            ids.push(out);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let inputs: Vec<RewardInput<'_>> = prompts
        .iter()
        .zip(&texts)
        .map(|(p, t)| RewardInput {
            prompt: &p.text,
            messages: p.messages.as_deref(),
            completion: t,
            fields: &p.fields,
        })
        .collect();
    let scored = rewards.score(&inputs)?;
    if let Some(path) = &a.completions {
        let lines: Vec<String> = inputs
            .iter()
            .enumerate()
            .map(|(k, i)| {
                let each: serde_json::Map<_, _> = rewards
                    .fns
                    .iter()
                    .zip(&scored.each)
                    .map(|((f, _), r)| (f.name().to_string(), json!(r[k])))
                    .collect();
                json!({"prompt": i.prompt, "completion": i.completion,
                       "reward": scored.total[k], "rewards": each})
                .to_string()
            })
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let refs: Vec<&Vec<u32>> = ids.iter().collect();
    let mut out = json!({"prompts": prompts.len()});
    if let Some(o) = out.as_object_mut() {
        let metrics = scored
            .metrics(&rewards)
            .into_iter()
            .chain(scored.pass_rates(&rewards))
            .chain(completion_metrics(&refs, &stop_ids));
        o.extend(metrics.map(|(k, v)| (k, json!(v))));
    }
    print_metrics(a, &out)
}

fn print_metrics(a: &EvalArgs, out: &serde_json::Value) -> anyhow::Result<()> {
    if a.json {
        println!("{}", serde_json::to_string(out)?);
    } else {
        println!("{:<24} value", "metric");
        if let Some(o) = out.as_object() {
            for (k, v) in o {
                println!("{k:<24} {v}");
            }
        }
    }
    Ok(())
}

/// The evaluation on any device; `reference` defaults to the model without its adapter.
fn evaluate<B: Backend>(
    a: &EvalArgs,
    model: &B,
    tokenizer: &Tokenizer,
    reference: Option<B>,
) -> anyhow::Result<()> {
    let data = Dataset::load(
        &a.data,
        LoadOptions {
            format: a.format,
            skip_invalid: a.skip_invalid,
        },
    )?;
    for e in &data.skipped {
        eprintln!("skipped: {e}");
    }
    let seqs = data.encode_sft(tokenizer, a.max_seq_length)?;
    let loss = sft_loss(model, &seqs, a.batch_size, tokenizer.pad_id);
    let mut out = json!({
        "loss": loss.mean(),
        "perplexity": loss.mean().exp(),
        "tokens": loss.tokens,
        "examples": seqs.len(),
        "skipped": data.skipped.len(),
    });
    if let Some(beta) = a.beta {
        anyhow::ensure!(
            data.is_preference(),
            "--beta needs preference data (prompt/chosen/rejected)"
        );
        let (pairs, trunc) = data.encode_pairs(tokenizer, a.max_prompt_length, a.max_length)?;
        let reference = reference.unwrap_or_else(|| model.without_adapter());
        let mut logps = Vec::with_capacity(pairs.len());
        let per_batch = a.batch_size.max(2) / 2;
        for chunk in pairs.chunks(per_batch) {
            let seqs: Vec<_> = chunk.iter().map(|p| p.sequences()).collect();
            let refs: Vec<_> = seqs.iter().flat_map(|(c, r)| [c, r]).collect();
            let batch = TokenBatch::pad(&refs, tokenizer.pad_id);
            let (pol, _) = sequence_logprobs(model, &batch);
            let (rf, _) = sequence_logprobs(&reference, &batch);
            for i in 0..chunk.len() {
                logps.push(PairLogps {
                    policy_chosen: pol[2 * i],
                    policy_rejected: pol[2 * i + 1],
                    reference_chosen: rf[2 * i],
                    reference_rejected: rf[2 * i + 1],
                });
            }
        }
        let metrics = DpoMetrics::sigmoid(&logps, beta);
        let n = logps.len().max(1) as f64;
        let logp_margin = logps
            .iter()
            .map(|p| p.policy_chosen - p.policy_rejected)
            .sum::<f64>()
            / n;
        let logp_accuracy = logps
            .iter()
            .filter(|p| p.policy_chosen > p.policy_rejected)
            .count() as f64
            / n;
        if let (Some(o), serde_json::Value::Object(d)) = (out.as_object_mut(), metrics.to_json()) {
            o.extend(d);
            o.insert("logps/margin".into(), json!(logp_margin));
            o.insert("logps/accuracy".into(), json!(logp_accuracy));
            o.insert("beta".into(), json!(beta));
            o.insert("truncated_prompts".into(), json!(trunc.prompts));
            o.insert("truncated_completions".into(), json!(trunc.completions));
        }
    }
    print_metrics(a, &out)
}
