//! `fedtune merge` (full-weight safetensors files, mergekit semantics: the `fedtune-merge`
//! crate) and `fedtune merge-adapters` (PEFT adapters through an aggregation rule).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_aggregation::merge::{MergeMethod, MergeParams};
use fedtune_aggregation::{
    Adapter, ClientResult, FedStrategy, Plan, Rule, Strategy, StrategyConfig,
};
use fedtune_engine::{LoraConfig, PeftAdapter};
use fedtune_merge::{Recipe, t_from_flags};
/// Arguments of `fedtune merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// A mergekit YAML configuration (`merge_method`, `base_model`, `models` or one `slices`
    /// entry covering every layer, `parameters`, `dtype`): a mergekit user's file as it is.
    /// Replaces the method, base, inputs and parameter flags.
    #[arg(long, conflicts_with_all = ["method", "base", "inputs"])]
    config: Option<PathBuf>,
    /// linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
    /// slerp or model_stock.
    #[arg(long, required_unless_present = "config")]
    method: Option<MergeMethod>,
    /// The base model: a Hugging Face model directory (its safetensors files, sharded or not)
    /// or one safetensors file. Task vectors are taken against it; SLERP starts from it;
    /// Model Stock pulls the average towards it.
    #[arg(long, required_unless_present = "config")]
    base: Option<PathBuf>,
    /// One weight per input, comma-separated (default: equal).
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    /// Divide the weighted sum by the weights' sum (default: mergekit's for the method: true
    /// for linear and ties, false for task_arithmetic, DARE and breadcrumbs).
    #[arg(long)]
    normalize: Option<bool>,
    /// TIES and breadcrumbs density: fraction of each task vector kept.
    #[arg(long, default_value_t = 1.0)]
    density: f64,
    /// Breadcrumbs: fraction of each task vector's largest magnitudes dropped as outliers.
    #[arg(long, default_value_t = 0.01)]
    gamma: f64,
    /// Model Stock: measure the angle per row (mergekit's `filter_wise`) instead of over the
    /// whole tensor.
    #[arg(long)]
    filter_wise: bool,
    /// DARE drop rate.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Scale λ of the merged task vector.
    #[arg(long = "lambda", default_value_t = 1.0)]
    lambda: f64,
    /// Seed of DARE's masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SLERP's t (0: the base, 1: the other model), repeatable as `[FILTER=]V[,V…]`: a value,
    /// or a gradient over the layers, for the tensors whose name contains FILTER (the first
    /// match wins; one without a filter applies to the rest), as mergekit's `t` parameter.
    #[arg(long = "t")]
    t: Vec<String>,
    /// Input models (directories or safetensors files) with the same tensor names as the base.
    #[arg(required_unless_present = "config")]
    inputs: Vec<PathBuf>,
    /// Output: a model directory (`model.safetensors` with the base directory's config,
    /// tokenizer and other files, as mergekit writes), or a file when the name ends in
    /// `.safetensors`. `--out` is an alias.
    #[arg(long = "output", visible_alias = "out")]
    out: PathBuf,
}

/// The recipe of `fedtune merge`'s flags.
fn recipe_from_flags(a: &MergeArgs) -> anyhow::Result<Recipe> {
    let method = a.method.context("--method is required without --config")?;
    let base = a
        .base
        .clone()
        .context("--base is required without --config")?;
    let mut inputs = a.inputs.clone();
    if matches!(method, MergeMethod::Slerp | MergeMethod::ModelStock) {
        inputs.retain(|p| p != &base);
    }
    let weights = if a.weights.is_empty() {
        vec![1.0; inputs.len()]
    } else {
        a.weights.clone()
    };
    if weights.len() != inputs.len() {
        bail!(
            "--weights has {} values for {} inputs",
            weights.len(),
            inputs.len()
        );
    }
    Ok(Recipe {
        base,
        inputs,
        weights,
        params: MergeParams {
            density: a.density,
            gamma: a.gamma,
            drop_rate: a.drop_rate,
            lambda: a.lambda,
            seed: a.seed,
            normalize: a.normalize.unwrap_or(method.normalizes_by_default()),
            ..MergeParams::new(method)
        },
        t: t_from_flags(&a.t)?,
        filter_wise: a.filter_wise,
        dtype: None,
    })
}

/// Runs `fedtune merge`.
pub fn run_merge(a: MergeArgs) -> anyhow::Result<()> {
    let recipe = match &a.config {
        Some(p) => fedtune_merge::mergekit::read(p)?,
        None => recipe_from_flags(&a)?,
    };
    let n = fedtune_merge::merge_models(&recipe, &a.out)?;
    eprintln!("merged {n} tensors into {}", a.out.display());
    Ok(())
}

/// Arguments of `fedtune merge-adapters`.
#[derive(Debug, Args)]
pub struct MergeAdaptersArgs {
    /// fedavg-exact, fedavg-factors, ties, dare_ties, dare_linear, task_arithmetic, median,
    /// trimmed-mean or krum.
    #[arg(long)]
    method: String,
    /// One weight per adapter (default: equal).
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    /// Rank of the output (default: exact for fedavg-exact, the largest input rank otherwise).
    #[arg(long)]
    rank: Option<usize>,
    /// TIES density: fraction of each task vector kept (mergekit's default, 1, keeps all).
    #[arg(long, default_value_t = 1.0)]
    density: f64,
    /// DARE drop rate (mergekit's `1 − density`; default 0).
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// λ.
    #[arg(long = "lambda", default_value_t = 1.0)]
    lambda: f64,
    /// Trimmed-mean fraction cut at each end.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Krum's assumed number of Byzantine adapters.
    #[arg(long, default_value_t = 1)]
    f: usize,
    /// Seed (DARE masks, randomized SVD).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// PEFT adapter directories.
    #[arg(required = true)]
    adapters: Vec<PathBuf>,
    /// Output adapter directory.
    #[arg(long)]
    output: PathBuf,
    /// Merge the adapters that pass validation and skip the others (an adapter whose modules,
    /// shapes or values do not fit is otherwise an error).
    #[arg(long)]
    skip_invalid: bool,
}

/// Runs `fedtune merge-adapters`.
pub fn run_merge_adapters(a: MergeAdaptersArgs) -> anyhow::Result<()> {
    let inputs: Vec<PeftAdapter> = a
        .adapters
        .iter()
        .map(|p| PeftAdapter::load(p).with_context(|| format!("loading {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    let weights = if a.weights.is_empty() {
        vec![1.0; inputs.len()]
    } else {
        a.weights.clone()
    };
    if weights.len() != inputs.len() || weights.iter().any(|w| w.is_nan() || *w < 0.0) {
        bail!("--weights needs one non-negative value per adapter");
    }
    let rule = match a.method.replace('_', "-").as_str() {
        // `fed_avg_exact` is the TOML spelling (`kind` of a strategy).
        "fedavg-exact" | "fed-avg-exact" => Rule::FedAvgExact,
        "fedavg-factors" | "fed-avg-factors" | "fedit" => Rule::FedAvgFactors,
        "ties" => Rule::Ties {
            density: a.density,
            lambda: a.lambda,
        },
        "dare-ties" => Rule::DareTies {
            drop_rate: a.drop_rate,
            lambda: a.lambda,
        },
        "dare-linear" => Rule::DareLinear {
            drop_rate: a.drop_rate,
            lambda: a.lambda,
        },
        "task-arithmetic" => Rule::TaskArithmetic { lambda: a.lambda },
        "median" => Rule::Median,
        "trimmed-mean" => Rule::TrimmedMean { beta: a.beta },
        "krum" => Rule::Krum { f: a.f },
        other => bail!(
            "--method {other}: unknown (fedavg-exact, fedavg-factors, ties, dare_ties, dare_linear, task_arithmetic, median, trimmed-mean, krum)"
        ),
    };
    let max_rank = inputs
        .iter()
        .flat_map(|p| p.weights.modules.values().map(|m| m.rank()))
        .max()
        .unwrap_or(1);
    let mut cfg = StrategyConfig::new(rule);
    cfg.seed = a.seed;
    cfg.target_rank = a.rank.or(if rule == Rule::FedAvgExact {
        None
    } else {
        Some(max_rank)
    });
    let total: f64 = weights.iter().sum();
    let results: Vec<ClientResult> = inputs
        .iter()
        .zip(&weights)
        .zip(&a.adapters)
        .enumerate()
        .map(|(i, ((p, w), path))| ClientResult {
            // The same adapter given twice counts twice (it is not a replayed update).
            client: if a.adapters.iter().filter(|q| *q == path).count() > 1 {
                format!("{} #{}", path.display(), i + 1)
            } else {
                path.display().to_string()
            },
            adapter: p.weights.clone(),
            // Integer example counts proportional to the weights.
            num_examples: (w / total * 1e9).round() as u64,
            metrics: BTreeMap::new(),
        })
        .collect();
    let mut plan = Plan::from_adapter(&inputs[0].weights);
    plan.max_rank = max_rank;
    let mut strategy = FedStrategy::new(cfg, Adapter::default(), plan)?;
    let outcome = strategy.aggregate_fit(1, &results, &[])?;
    if !outcome.failures.is_empty() && !a.skip_invalid {
        let list: Vec<String> = outcome
            .failures
            .iter()
            .map(|f| format!("{}: {}", f.client, f.reason))
            .collect();
        bail!(
            "{} (checked against {}, the first adapter); nothing written. --skip-invalid merges \
             the others",
            list.join("; "),
            a.adapters[0].display()
        );
    }
    for f in &outcome.failures {
        eprintln!("skipped {}: {}", f.client, f.reason);
    }
    let global = outcome.global.context("no adapter survived validation")?;
    let first = &inputs[0].config;
    let rank = global
        .adapter
        .modules
        .values()
        .map(|m| m.rank())
        .max()
        .unwrap_or(first.r);
    let scale = global
        .adapter
        .modules
        .values()
        .next()
        .map_or(1.0, |m| m.scale as f64);
    let config = LoraConfig {
        r: rank,
        lora_alpha: if first.use_rslora {
            scale * (rank as f64).sqrt()
        } else {
            scale * rank as f64
        },
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        ..first.clone()
    };
    PeftAdapter {
        config,
        weights: global.adapter,
        metadata: Default::default(),
    }
    .save(&a.output)
    .with_context(|| format!("writing {}", a.output.display()))?;
    if let Some(e) = global.report.retained_energy {
        eprintln!("retained energy after re-factorisation: {e:.6}");
    }
    eprintln!(
        "wrote {} (rank {rank}, rule {})",
        a.output.display(),
        global.report.rule
    );
    Ok(())
}
