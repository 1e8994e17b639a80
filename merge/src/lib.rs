//! Merging full-weight models with mergekit's semantics (`fedtune merge`): linear,
//! task_arithmetic, TIES, DARE, breadcrumbs, SLERP and Model Stock over safetensors files
//! (sharded or not), from a [`Recipe`] built from flags or read from a mergekit YAML file
//! ([`mergekit::read`]). The per-tensor arithmetic is `fedtune_aggregation`'s; this crate maps
//! the inputs, checks them against the base and writes the merged tensors one at a time.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedtune_aggregation::merge::{MergeMethod, MergeParams, merge};
use fedtune_aggregation::model_stock::model_stock;
use fedtune_aggregation::slerp::{Condition, Setting, layer_fraction, slerp};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView, View};

pub mod mergekit;

/// What a merge does: from `fedtune merge`'s flags or a mergekit YAML file ([`mergekit::read`]).
#[derive(Debug)]
pub struct Recipe {
    /// The base model (directory or safetensors file).
    pub base: PathBuf,
    /// The other models (SLERP: exactly one).
    pub inputs: Vec<PathBuf>,
    /// One weight per input.
    pub weights: Vec<f64>,
    /// The method and its parameters.
    pub params: MergeParams,
    /// SLERP's t.
    pub t: Option<Setting>,
    /// Model Stock's angle per row.
    pub filter_wise: bool,
    /// The output dtype (default: the base's).
    pub dtype: Option<Dtype>,
}

/// Parses `--t [FILTER=]V[,V…]` values into mergekit's setting.
pub fn t_from_flags(flags: &[String]) -> anyhow::Result<Option<Setting>> {
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
    fedtune_peft::floats(view.dtype(), view.data())
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

/// Merges the models of `recipe` into `out`: a model directory (`model.safetensors` with the
/// base directory's config, tokenizer and other files, as mergekit writes), or a file when the
/// name ends in `.safetensors`. Every input is checked (names, shapes, dtypes, parameters)
/// before anything is written; tensors are merged one at a time as they are written. Returns
/// the number of tensors written.
pub fn merge_models(recipe: &Recipe, out: &Path) -> anyhow::Result<usize> {
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
    let as_file = out.extension().is_some_and(|x| x == "safetensors");
    let file = if as_file {
        out.to_path_buf()
    } else {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        out.join("model.safetensors")
    };
    let tmp = file.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(lazies.iter().map(|l| (l.name.clone(), l)), None, &tmp)
        .with_context(|| format!("writing {}", file.display()))?;
    std::fs::rename(&tmp, &file)?;
    if !as_file && recipe.base.is_dir() {
        copy_model_files(&recipe.base, out)?;
    }
    Ok(names.len())
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
