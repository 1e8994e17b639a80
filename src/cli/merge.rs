//! `fedtune merge` (full-weight safetensors files, mergekit semantics) and
//! `fedtune merge-adapters` (PEFT adapters through an aggregation rule).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use fedtune_aggregation::merge::{MergeMethod, MergeParams, merge};
use fedtune_aggregation::model_stock::model_stock;
use fedtune_aggregation::slerp::{Condition, Setting, layer_fraction, slerp};
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

/// What `fedtune merge` does, from flags or a mergekit YAML file.
#[derive(Debug)]
pub(crate) struct Recipe {
    pub(crate) base: PathBuf,
    /// The other models (SLERP: exactly one).
    pub(crate) inputs: Vec<PathBuf>,
    pub(crate) weights: Vec<f64>,
    pub(crate) params: MergeParams,
    /// SLERP's t.
    pub(crate) t: Option<Setting>,
    /// Model Stock's angle per row.
    pub(crate) filter_wise: bool,
    /// The output dtype (default: the base's).
    pub(crate) dtype: Option<Dtype>,
}

/// Parses `--t [FILTER=]V[,V…]` values into mergekit's setting.
fn t_from_flags(flags: &[String]) -> anyhow::Result<Option<Setting>> {
    if flags.is_empty() {
        return Ok(None);
    }
    let mut conds = Vec::new();
    for f in flags {
        let (filter, values) = match f.split_once('=') {
            Some((k, v)) => (Some(k.to_string()), v),
            None => (None, f.as_str()),
        };
        let vals: Vec<f64> = values
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--t {f}: expected [FILTER=]V[,V...]"))?;
        let value = if vals.len() == 1 {
            Setting::Value(vals[0])
        } else {
            Setting::Gradient(vals)
        };
        conds.push(Condition { filter, value });
    }
    Ok(Some(Setting::Conditional(conds)))
}

impl Recipe {
    fn from_flags(a: &MergeArgs) -> anyhow::Result<Recipe> {
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
}

fn map(path: &Path) -> anyhow::Result<Mmap> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: read-only map of an input the user gave us.
    unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))
}

/// The safetensors files of a model: the file itself, or every `*.safetensors` file of a
/// directory (one file or shards), sorted.
fn weight_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .safetensors file in this directory", path.display());
    }
    Ok(files)
}

/// A model's tensors across its files.
struct Model<'a> {
    path: &'a Path,
    files: Vec<(PathBuf, SafeTensors<'a>)>,
}

impl<'a> Model<'a> {
    fn open(path: &'a Path, maps: &'a [(PathBuf, Mmap)]) -> anyhow::Result<Model<'a>> {
        let files = maps
            .iter()
            .map(|(p, m)| {
                Ok((
                    p.clone(),
                    SafeTensors::deserialize(m).with_context(|| format!("{}", p.display()))?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Model { path, files })
    }

    fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.files.iter().flat_map(|(_, st)| st.names()).collect();
        v.sort();
        v
    }

    fn tensor(&self, name: &str) -> Option<TensorView<'a>> {
        self.files.iter().find_map(|(_, st)| st.tensor(name).ok())
    }
}

fn map_all(path: &Path) -> anyhow::Result<Vec<(PathBuf, Mmap)>> {
    weight_files(path)?
        .into_iter()
        .map(|p| Ok((p.clone(), map(&p)?)))
        .collect()
}

fn floats(view: &TensorView<'_>) -> Option<Vec<f32>> {
    fedtune_protocol::peft::floats(view.dtype(), view.data())
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
    /// SLERP's t for this tensor.
    t: Option<f64>,
    /// Model Stock's angle per row of the last axis.
    filter_wise: bool,
    /// Output dtype.
    dtype: Dtype,
}

impl View for &Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
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
        let merged = match self.t {
            // mergekit interpolates each tensor as one vector.
            Some(t) => Ok(slerp(t, &base, refs[0], 1)),
            None if self.params.method == MergeMethod::ModelStock => {
                let row = match self.base.shape().last() {
                    Some(&last) if self.filter_wise && last > 0 => last,
                    _ => base.len().max(1),
                };
                model_stock(&base, &refs, row)
            }
            None => merge(Some(&base), &refs, self.weights, &self.params, self.index),
        };
        // Shapes, sizes and parameters were checked before writing began.
        let merged = merged.unwrap_or_else(|e| panic!("tensor {}: {e}", self.name));
        Cow::Owned(to_dtype(&merged, self.dtype))
    }
    fn data_len(&self) -> usize {
        let n: usize = self.base.shape().iter().product();
        match floats(&self.base) {
            Some(_) => n * self.dtype.bitsize() / 8,
            None => self.base.data_len(),
        }
    }
}

/// Runs `fedtune merge`.
pub fn run_merge(a: MergeArgs) -> anyhow::Result<()> {
    let recipe = match &a.config {
        Some(p) => super::mergekit::read(p)?,
        None => Recipe::from_flags(&a)?,
    };
    let method = recipe.params.method;
    if method == MergeMethod::Slerp {
        if recipe.inputs.len() != 1 {
            bail!(
                "slerp interpolates the base and one other model ({} others given)",
                recipe.inputs.len()
            );
        }
        if recipe.t.is_none() {
            bail!("slerp needs t (--t, or `t` in the parameters)");
        }
    } else if method == MergeMethod::ModelStock && recipe.inputs.len() < 2 {
        bail!(
            "model_stock needs at least two models besides the base ({} given)",
            recipe.inputs.len()
        );
    } else if recipe.inputs.is_empty() {
        bail!("no model to merge into the base");
    }
    let base_maps = map_all(&recipe.base)?;
    let base = Model::open(&recipe.base, &base_maps)?;
    let maps: Vec<Vec<(PathBuf, Mmap)>> = recipe
        .inputs
        .iter()
        .map(|p| map_all(p))
        .collect::<anyhow::Result<_>>()?;
    let inputs: Vec<Model<'_>> = maps
        .iter()
        .zip(&recipe.inputs)
        .map(|(m, p)| Model::open(p, m))
        .collect::<anyhow::Result<_>>()?;
    let names = base.names();
    let layers = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let mut lazies = Vec::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        let bv = base
            .tensor(name)
            .with_context(|| format!("{}: tensor `{name}`", base.path.display()))?;
        let mut views = Vec::with_capacity(inputs.len());
        for input in &inputs {
            let path = input.path;
            let v = input
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
        params_check(&recipe.params, bv.shape().iter().product())
            .with_context(|| format!("tensor `{name}`"))?;
        let t = match &recipe.t {
            Some(s) if method == MergeMethod::Slerp => Some(
                s.at(name, layer_fraction(name, layers))
                    .with_context(|| format!("tensor `{name}`: no value of t applies"))?,
            ),
            _ => None,
        };
        let dtype = match recipe.dtype {
            Some(d) if floats(&bv).is_some() => d,
            _ => bv.dtype(),
        };
        lazies.push(Lazy {
            name: name.to_string(),
            base: bv,
            inputs: views,
            weights: &recipe.weights,
            params: recipe.params,
            index: index as u64,
            t,
            filter_wise: recipe.filter_wise,
            dtype,
        });
    }
    let as_file = a.out.extension().is_some_and(|x| x == "safetensors");
    let file = if as_file {
        a.out.clone()
    } else {
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        a.out.join("model.safetensors")
    };
    let tmp = file.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(lazies.iter().map(|l| (l.name.clone(), l)), None, &tmp)
        .with_context(|| format!("writing {}", file.display()))?;
    std::fs::rename(&tmp, &file)?;
    if !as_file && recipe.base.is_dir() {
        copy_model_files(&recipe.base, &a.out)?;
    }
    eprintln!("merged {} tensors into {}", names.len(), a.out.display());
    Ok(())
}

/// Copies a model directory's files other than its weights (config, tokenizer, generation
/// config, chat template, ...) into the merged model's directory.
fn copy_model_files(from: &Path, to: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else { continue };
        let weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if p.is_file() && !weights {
            std::fs::copy(&p, to.join(&name))
                .with_context(|| format!("copying {} into {}", p.display(), to.display()))?;
        }
    }
    Ok(())
}

fn params_check(p: &MergeParams, n: usize) -> anyhow::Result<()> {
    p.validate()?;
    let sparsifies = matches!(
        p.method,
        MergeMethod::Ties | MergeMethod::Breadcrumbs | MergeMethod::BreadcrumbsTies
    );
    if sparsifies && (p.density * n as f64) < 1.0 {
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
