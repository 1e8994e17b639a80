//! Opening a model from what users have: a Hugging Face model directory (`config.json`,
//! safetensors, `tokenizer.json`) or a GGUF file (with a `tokenizer.json` beside it, or the
//! vocabulary embedded in the file).

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufSource};
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;
use crate::weights::{SafetensorsSource, TensorSource};

/// A model and its tokenizer, ready to run.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: LlamaModel,
    /// Tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// The path it came from.
    pub path: PathBuf,
}

/// Where the weights of a model are.
pub enum ModelFiles {
    /// A Hugging Face directory.
    HfDir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

impl ModelFiles {
    /// Classifies `path`: a `.gguf` file, or a directory with `config.json`. A directory with
    /// exactly one `.gguf` file in it is taken as that file.
    pub fn locate(path: &Path) -> Result<Self> {
        if path.is_file() {
            return if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                Ok(ModelFiles::Gguf(path.to_path_buf()))
            } else {
                Err(Error::Invalid(format!(
                    "{}: not a model (expected a directory with config.json or a .gguf file)",
                    path.display()
                )))
            };
        }
        if path.join("config.json").exists() {
            return Ok(ModelFiles::HfDir(path.to_path_buf()));
        }
        if path.is_dir() {
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                })
                .collect();
            if let [one] = ggufs.as_slice() {
                return Ok(ModelFiles::Gguf(one.clone()));
            }
        }
        Err(Error::Invalid(format!(
            "{}: no config.json or single .gguf file found (Hugging Face hub ids must be \
             downloaded first, e.g. with `huggingface-cli download`)",
            path.display()
        )))
    }

    /// Opens the tensors and the configuration.
    pub fn open(&self) -> Result<(Box<dyn TensorSource>, ModelConfig)> {
        match self {
            ModelFiles::HfDir(dir) => {
                let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
                Ok((Box::new(SafetensorsSource::open_dir(dir)?), cfg))
            }
            ModelFiles::Gguf(file) => {
                let src = GgufSource::new(GgufFile::open(file)?)?;
                let cfg = src.file().model_config()?;
                Ok((Box::new(src), cfg))
            }
        }
    }

    /// Opens the tokenizer: `tokenizer.json` in the directory (or beside the GGUF file),
    /// else the vocabulary embedded in the GGUF file.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            ModelFiles::HfDir(dir) => Tokenizer::from_dir(dir),
            ModelFiles::Gguf(file) => {
                let dir = file.parent().unwrap_or(Path::new("."));
                if dir.join("tokenizer.json").exists() {
                    Tokenizer::from_dir(dir)
                } else {
                    GgufFile::open(file)?.tokenizer()
                }
            }
        }
    }
}

/// Loads a model and its tokenizer onto `device` in `dtype`.
pub fn load_model(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let files = ModelFiles::locate(path)?;
    let (source, config) = files.open()?;
    let model = LlamaModel::load(source.as_ref(), config, device, dtype)?;
    let tokenizer = files.tokenizer()?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// [`load_model`] in f32 with the projections' frozen weights held in bf16 (`bf16`) or f16 as
/// they are read, never all in f32 at once (training on the CPU with `--dtype bf16`).
pub fn load_model_half(path: &Path, device: &Device, bf16: bool) -> Result<LoadedModel> {
    let files = ModelFiles::locate(path)?;
    let (source, config) = files.open()?;
    let model = LlamaModel::load_with(source.as_ref(), config, device, DType::F32, Some(bf16))?;
    let tokenizer = files.tokenizer()?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// Loads a model straight onto GPU `gpu` in `dt` (NF4 projections with `nf4 = Some(double)`),
/// and its tokenizer.
pub fn load_model_cuda(
    path: &Path,
    gpu: std::sync::Arc<crate::cuda::Gpu>,
    dt: crate::cuda::Dt,
    nf4: Option<bool>,
) -> Result<(crate::cuda::CudaModel, Tokenizer)> {
    let files = ModelFiles::locate(path)?;
    let (source, config) = files.open()?;
    let model = crate::cuda::CudaModel::load(source.as_ref(), config, gpu, dt, nf4)?;
    Ok((model, files.tokenizer()?))
}
