//! Where model tensors come from: a [`TensorSource`] hands out host tensors by their Hugging Face
//! key (`model.layers.0.self_attn.q_proj.weight`, ...), whatever the file format behind it.
//!
//! [`SafetensorsSource`] reads `model.safetensors` or a sharded `model.safetensors.index.json`
//! through a memory map; the GGUF reader implements the same trait in [`crate::gguf`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A read-only set of named host tensors.
pub trait TensorSource {
    /// The file shown in error messages.
    fn path(&self) -> &Path;
    /// All tensor keys.
    fn names(&self) -> Vec<String>;
    /// Loads one tensor, or `None` when the key is absent.
    fn load(&self, name: &str) -> Result<Option<TensorData>>;

    /// Loads a tensor that must exist and have `shape`.
    fn require(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let data = self
            .load(name)?
            .ok_or_else(|| Error::tensor(self.path(), name, "missing from the checkpoint"))?;
        if data.shape().as_slice() != shape {
            return Err(Error::tensor(
                self.path(),
                name,
                format!("shape {:?}, expected {shape:?}", data.shape().as_slice()),
            ));
        }
        Ok(data)
    }
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Tensors of one safetensors file or of a sharded checkpoint.
pub struct SafetensorsSource {
    path: PathBuf,
    shards: Vec<Shard>,
    /// Key → index into `shards`.
    index: BTreeMap<String, usize>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified while it is loaded is the caller's
    // fault and at worst yields wrong numbers, which the shape and header checks bound.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn header_names(path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::parse(path, e))?;
    Ok(meta.tensors().keys().cloned().collect())
}

impl SafetensorsSource {
    /// Opens a single safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mmap = map_file(path)?;
        let names = header_names(path, &mmap)?;
        Ok(SafetensorsSource {
            path: path.to_path_buf(),
            shards: vec![Shard {
                path: path.to_path_buf(),
                mmap,
            }],
            index: names.into_iter().map(|n| (n, 0)).collect(),
        })
    }

    /// Opens the weights of a Hugging Face model directory: `model.safetensors`, or the shards
    /// listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_file(&single);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.exists() {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ));
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::parse(&index_path, e))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index_path, "weight_map", "missing or not an object"))?;
        let mut shards: Vec<Shard> = Vec::new();
        let mut index = BTreeMap::new();
        for (key, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::config(&index_path, format!("weight_map.{key}"), "not a string")
            })?;
            if file.contains("..") || file.contains('/') || file.contains('\\') {
                return Err(Error::config(
                    &index_path,
                    format!("weight_map.{key}"),
                    "shard names must be plain file names",
                ));
            }
            let shard_path = dir.join(file);
            let pos = match shards.iter().position(|s| s.path == shard_path) {
                Some(p) => p,
                None => {
                    let mmap = map_file(&shard_path)?;
                    shards.push(Shard {
                        path: shard_path,
                        mmap,
                    });
                    shards.len() - 1
                }
            };
            index.insert(key.clone(), pos);
        }
        Ok(SafetensorsSource {
            path: index_path,
            shards,
            index,
        })
    }
}

/// Converts one safetensors view to burn data, keeping its dtype when burn has it.
pub fn view_to_data(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<TensorData> {
    let shape = view.shape().to_vec();
    let bytes = view.data();
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::U8 => DType::U8,
        Dtype::I8 => DType::I8,
        other => {
            return Err(Error::tensor(
                path,
                name,
                format!("dtype {other:?} is not supported"),
            ));
        }
    };
    Ok(TensorData::from_bytes_vec(bytes.to_vec(), shape, dtype))
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn load(&self, name: &str) -> Result<Option<TensorData>> {
        let Some(&shard) = self.index.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[shard];
        let st = SafeTensors::deserialize(&shard.mmap).map_err(|e| Error::parse(&shard.path, e))?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::tensor(&shard.path, name, e))?;
        view_to_data(&shard.path, name, &view).map(Some)
    }
}

/// Reads f32 values out of host data of any float dtype.
pub fn to_f32_vec(data: TensorData) -> Vec<f32> {
    let data = if data.dtype() == DType::F32 {
        data
    } else {
        data.convert_dtype(DType::F32)
    };
    data.try_into_vec::<f32>()
        .expect("data was converted to f32 just above")
}
