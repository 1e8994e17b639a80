//! mergekit's YAML configuration for `fedtune merge --config`: the keys a mergekit user writes
//! (`merge_method`, `base_model`, `models` with per-model `parameters`, or one `slices` entry
//! whose sources cover every layer, global `parameters`, `dtype`/`out_dtype`), read into a
//! [`Recipe`]. Keys fedtune does not implement are errors naming the key, never ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedtune_aggregation::merge::{MergeMethod, MergeParams};
use fedtune_aggregation::slerp::Setting;
use safetensors::Dtype;
use serde::Deserialize;

use crate::Recipe;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    merge_method: String,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    models: Option<Vec<Source>>,
    #[serde(default)]
    slices: Option<Vec<Slice>>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, serde_yaml_ng::Value>>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    out_dtype: Option<String>,
    /// The merged directory gets the base's tokenizer files (mergekit's `base`).
    #[serde(default)]
    tokenizer_source: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Slice {
    sources: Vec<Source>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    model: String,
    #[serde(default)]
    layer_range: Option<[usize; 2]>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, serde_yaml_ng::Value>>,
}

/// A local model path: as written, else relative to the YAML file's directory.
fn resolve(model: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(model);
    if p.exists() {
        return Ok(p);
    }
    let rel = dir.join(model);
    if rel.exists() {
        return Ok(rel);
    }
    bail!(
        "model `{model}`: not a local directory or file (fedtune reads local models only; \
         download it first)"
    )
}

fn dtype(name: &str) -> anyhow::Result<Dtype> {
    Ok(match name {
        "float32" | "fp32" => Dtype::F32,
        "bfloat16" | "bf16" => Dtype::BF16,
        "float16" | "fp16" => Dtype::F16,
        other => bail!("dtype `{other}`: float32, bfloat16 or float16"),
    })
}

/// A scalar parameter (`weight`, `density`, `lambda`, ...).
fn scalar(key: &str, v: &serde_yaml_ng::Value) -> anyhow::Result<f64> {
    v.as_f64().with_context(|| {
        format!("parameter `{key}`: a number (per-layer gradients and filters are supported for `t` only)")
    })
}

/// A boolean parameter (`normalize`, `filter_wise`).
fn boolean(key: &str, v: &serde_yaml_ng::Value) -> anyhow::Result<bool> {
    v.as_bool()
        .with_context(|| format!("parameter `{key}`: true or false"))
}

/// `rescale`: accepted where it says what fedtune does (DARE rescales the kept values, by
/// `1/(1 − p)` as the DARE paper does where mergekit matches the L1 norm; the other methods do
/// not rescale).
fn rescale(method: MergeMethod, v: &serde_yaml_ng::Value) -> anyhow::Result<()> {
    let dare = matches!(method, MergeMethod::DareTies | MergeMethod::DareLinear);
    if boolean("rescale", v)? != dare {
        bail!(
            "parameter `rescale: {}`: not supported for {} by fedtune merge",
            !dare,
            method.name()
        );
    }
    Ok(())
}

/// Reads a mergekit YAML file.
pub fn read(path: &Path) -> anyhow::Result<Recipe> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: Config =
        serde_yaml_ng::from_str(&text).with_context(|| format!("{}", path.display()))?;
    recipe(cfg, path.parent().unwrap_or(Path::new(".")))
        .with_context(|| format!("{}", path.display()))
}

fn recipe(cfg: Config, dir: &Path) -> anyhow::Result<Recipe> {
    let _ = (&cfg.tokenizer_source, &cfg.name);
    let merge_method = cfg.merge_method.clone();
    let method: MergeMethod = cfg
        .merge_method
        .parse()
        .map_err(|e: String| anyhow::anyhow!("merge_method: {e}"))?;
    let sources: Vec<Source> = match (cfg.models, cfg.slices) {
        (Some(m), None) => m,
        (None, Some(mut s)) => {
            if s.len() != 1 {
                bail!("slices: fedtune merges whole models (one slice over every layer)");
            }
            let sources = s.remove(0).sources;
            let ranges: Vec<Option<[usize; 2]>> = sources.iter().map(|s| s.layer_range).collect();
            if ranges.iter().any(|r| r.is_none_or(|r| r[0] != 0))
                || ranges.windows(2).any(|w| w[0] != w[1])
            {
                bail!(
                    "slices: every source must cover the same layers from 0 (fedtune merges whole models)"
                );
            }
            sources
        }
        (Some(_), Some(_)) => bail!("give either models or slices, not both"),
        (None, None) => bail!("models (or slices): missing"),
    };
    // mergekit's linear merge needs no base (every listed model is averaged); the first model
    // then gives the shapes and the other files.
    let base_name = match (cfg.base_model, method) {
        (Some(b), _) => b,
        (None, MergeMethod::Linear) => sources.first().context("models: empty")?.model.clone(),
        (None, _) => bail!("base_model: missing (merge_method {merge_method})"),
    };
    let base = resolve(&base_name, dir)?;
    let mut global = cfg.parameters.unwrap_or_default();
    let mut params = MergeParams::new(method);
    params.normalize = method.normalizes_by_default();
    let (mut t, mut filter_wise) = (None, false);
    for (k, v) in std::mem::take(&mut global) {
        match k.as_str() {
            "t" => {
                t = Some(serde_yaml_ng::from_value::<Setting>(v).context(
                    "parameter `t`: a number, a list of numbers or filter/value conditions",
                )?)
            }
            "lambda" => params.lambda = scalar(&k, &v)?,
            "normalize" => params.normalize = boolean(&k, &v)?,
            "filter_wise" if method == MergeMethod::ModelStock => filter_wise = boolean(&k, &v)?,
            "rescale" => rescale(method, &v)?,
            // Per-model parameters may also be given once for all models.
            "weight" | "density" | "gamma" => {
                global.insert(k, v);
            }
            "int8_mask" => {}
            other => bail!("parameter `{other}`: not supported by fedtune merge"),
        }
    }
    let default = |key: &str| global.get(key).map(|v| scalar(key, v)).transpose();
    let (default_weight, default_density, default_gamma) =
        (default("weight")?, default("density")?, default("gamma")?);
    let (mut inputs, mut weights, mut densities, mut gammas) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in sources {
        let p = resolve(&s.model, dir)?;
        let is_base = s.model == base_name || p == base;
        let (mut w, mut density, mut gamma) = (
            default_weight.unwrap_or(1.0),
            default_density,
            default_gamma,
        );
        for (k, v) in s.parameters.unwrap_or_default() {
            match k.as_str() {
                "weight" => w = scalar(&k, &v)?,
                "density" => density = Some(scalar(&k, &v)?),
                "gamma" => gamma = Some(scalar(&k, &v)?),
                "t" if method == MergeMethod::Slerp => {
                    bail!("model `{}`: t is a global parameter for slerp", s.model)
                }
                other => bail!("model `{}`: parameter `{other}` is not supported", s.model),
            }
        }
        // The base takes part in SLERP as its start and in Model Stock as the anchor, and
        // mergekit leaves it out of task vectors; a linear merge averages every listed model.
        if is_base && method != MergeMethod::Linear {
            continue;
        }
        inputs.push(p);
        weights.push(w);
        densities.extend(density);
        gammas.extend(gamma);
    }
    for (name, values, field) in [
        ("density", &densities, &mut params.density),
        ("gamma", &gammas, &mut params.gamma),
    ] {
        if let Some(d) = values.first() {
            if values.iter().any(|x| x != d) {
                bail!("{name}: fedtune applies one {name} to every model (got {values:?})");
            }
            *field = *d;
        }
    }
    // mergekit's DARE keeps each element with probability `density`.
    if matches!(method, MergeMethod::DareTies | MergeMethod::DareLinear) {
        params.drop_rate = 1.0 - params.density;
        params.density = 1.0;
    }
    Ok(Recipe {
        base,
        inputs,
        weights,
        params,
        t,
        filter_wise,
        dtype: cfg.out_dtype.or(cfg.dtype).map(|d| dtype(&d)).transpose()?,
    })
}
