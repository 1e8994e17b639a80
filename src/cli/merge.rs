//! `fedtune merge` (full-weight safetensors files, mergekit semantics) and
//! `fedtune merge-adapters` (PEFT adapters through an aggregation rule).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_aggregation::merge::{MergeMethod, MergeParams, merge};
use fedtune_aggregation::{
    Adapter, ClientResult, FedStrategy, Plan, Rule, Strategy, StrategyConfig,
};
use fedtune_engine::{LoraConfig, PeftAdapter};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView, View};

/// Arguments of `fedtune merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// linear, task_arithmetic, ties, dare_ties or dare_linear.
    #[arg(long)]
    method: MergeMethod,
    /// The base model's weights (task vectors are taken against it).
    #[arg(long)]
    base: PathBuf,
    /// One weight per input, comma-separated (default: equal). Normalised as mergekit's
    /// `normalize: true`.
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    /// TIES density: fraction of each task vector kept.
    #[arg(long, default_value_t = 1.0)]
    density: f64,
    /// DARE drop rate.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Scale λ of the merged task vector.
    #[arg(long = "lambda", default_value_t = 1.0)]
    lambda: f64,
    /// Seed of DARE's masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Input safetensors files with the same tensor names as the base.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output safetensors file (`--out` is an alias).
    #[arg(long = "output", visible_alias = "out")]
    out: PathBuf,
}

fn map(path: &PathBuf) -> anyhow::Result<Mmap> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: read-only map of an input the user gave us.
    unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))
}

fn floats(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let b = view.data();
    Some(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn to_dtype(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// One output tensor, merged when the serializer asks for its bytes.
struct Lazy<'a> {
    name: String,
    base: TensorView<'a>,
    inputs: Vec<TensorView<'a>>,
    weights: &'a [f64],
    params: MergeParams,
    index: u64,
}

impl View for &Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.base.dtype()
    }
    fn shape(&self) -> &[usize] {
        self.base.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let Some(base) = floats(&self.base) else {
            return Cow::Borrowed(self.base.data());
        };
        let inputs: Vec<Vec<f32>> = self
            .inputs
            .iter()
            .map(|v| floats(v).unwrap_or_default())
            .collect();
        let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        let merged = merge(Some(&base), &refs, self.weights, &self.params, self.index)
            .unwrap_or_else(|e| panic!("tensor {}: {e}", self.name));
        Cow::Owned(to_dtype(&merged, self.base.dtype()))
    }
    fn data_len(&self) -> usize {
        self.base.data_len()
    }
}

/// Runs `fedtune merge`.
pub fn run_merge(a: MergeArgs) -> anyhow::Result<()> {
    let weights = if a.weights.is_empty() {
        vec![1.0; a.inputs.len()]
    } else {
        a.weights.clone()
    };
    if weights.len() != a.inputs.len() {
        bail!(
            "--weights has {} values for {} inputs",
            weights.len(),
            a.inputs.len()
        );
    }
    let params = MergeParams {
        density: a.density,
        drop_rate: a.drop_rate,
        lambda: a.lambda,
        seed: a.seed,
        ..MergeParams::new(a.method)
    };
    let base_map = map(&a.base)?;
    let base =
        SafeTensors::deserialize(&base_map).with_context(|| format!("{}", a.base.display()))?;
    let maps: Vec<Mmap> = a.inputs.iter().map(map).collect::<anyhow::Result<_>>()?;
    let inputs: Vec<SafeTensors<'_>> = maps
        .iter()
        .zip(&a.inputs)
        .map(|(m, p)| SafeTensors::deserialize(m).with_context(|| format!("{}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    let mut names = base.names();
    names.sort();
    let mut lazies = Vec::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        let bv = base.tensor(name)?;
        let mut views = Vec::with_capacity(inputs.len());
        for (st, path) in inputs.iter().zip(&a.inputs) {
            let v = st
                .tensor(name)
                .with_context(|| format!("{}: tensor `{name}` missing", path.display()))?;
            if v.shape() != bv.shape() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, base has {:?}",
                    path.display(),
                    v.shape(),
                    bv.shape()
                );
            }
            if floats(&bv).is_some() && floats(&v).is_none() {
                bail!(
                    "{}: tensor `{name}` has dtype {:?}",
                    path.display(),
                    v.dtype()
                );
            }
            views.push(v);
        }
        params_check(&params, bv.shape().iter().product())
            .with_context(|| format!("tensor `{name}`"))?;
        lazies.push(Lazy {
            name: name.to_string(),
            base: bv,
            inputs: views,
            weights: &weights,
            params,
            index: index as u64,
        });
    }
    let tmp = a.out.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(lazies.iter().map(|l| (l.name.clone(), l)), None, &tmp)
        .with_context(|| format!("writing {}", a.out.display()))?;
    std::fs::rename(&tmp, &a.out)?;
    eprintln!("merged {} tensors into {}", names.len(), a.out.display());
    Ok(())
}

fn params_check(p: &MergeParams, n: usize) -> anyhow::Result<()> {
    if p.method == MergeMethod::Ties && (p.density * n as f64) < 1.0 {
        bail!("density {} keeps no element of {n}", p.density);
    }
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
    /// TIES density.
    #[arg(long, default_value_t = 0.5)]
    density: f64,
    /// DARE drop rate.
    #[arg(long, default_value_t = 0.5)]
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
        .map(|((p, w), path)| ClientResult {
            client: path.display().to_string(),
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
    for f in &outcome.failures {
        eprintln!("rejected {}: {}", f.client, f.reason);
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
