//! Checkpoints: trainable parameters, AdamW moments and step, and the trainer state (step,
//! epoch, position in the epoch's seeded order, log) — everything a resumed run needs to
//! continue the same loss curve. A checkpoint directory is written under a temporary name and
//! renamed, so a crash never leaves a half-written one.
//!
//! Layout: `params.safetensors` (by parameter name), `optimizer.safetensors` (`{name}.m`,
//! `{name}.v`; the step in the metadata), `trainer_state.json`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use super::optim::Moments;
use super::state::{LogEntry, TrainerState};
use crate::adapter::write_atomic;
use crate::error::{Error, Result};
use crate::weights::to_f32_vec;

fn to_bytes(t: &Tensor<2>) -> (Vec<usize>, Vec<u8>) {
    let [r, c] = t.dims();
    let v = to_f32_vec(t.to_data());
    (vec![r, c], v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn write_tensors(
    path: &Path,
    items: Vec<(String, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = items
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Invalid(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Saves a checkpoint into `dir`: host copies of the trained parameters, the optimiser's
/// step count and moments, and the trainer state.
pub fn save(
    dir: &Path,
    params: &[(String, Tensor<2>)],
    opt_step: u64,
    moments: &BTreeMap<String, Moments>,
    state: &TrainerState,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let params = params
        .iter()
        .map(|(n, t)| {
            let (s, b) = to_bytes(t);
            (n.clone(), s, b)
        })
        .collect();
    write_tensors(&tmp.join("params.safetensors"), params, HashMap::new())?;
    let mut tensors = Vec::new();
    for (n, m) in moments {
        let (s, b) = to_bytes(&m.m);
        tensors.push((format!("{n}.m"), s, b));
        let (s, b) = to_bytes(&m.v);
        tensors.push((format!("{n}.v"), s, b));
    }
    let meta = HashMap::from([("step".to_string(), opt_step.to_string())]);
    write_tensors(&tmp.join("optimizer.safetensors"), tensors, meta)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn tensor_of(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &str,
    device: &burn::tensor::Device,
) -> Result<Tensor<2>> {
    let view = st.tensor(name).map_err(|e| Error::tensor(path, name, e))?;
    let shape = view.shape();
    if shape.len() != 2 || view.dtype() != Dtype::F32 {
        return Err(Error::tensor(path, name, "expected a 2-D f32 tensor"));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::from_data(
        TensorData::new(values, [shape[0], shape[1]]),
        device,
    ))
}

/// What a checkpoint holds, as host tensors.
pub struct Restored {
    /// Trained parameters by name.
    pub params: Vec<(String, Tensor<2>)>,
    /// Optimiser steps taken.
    pub step: u64,
    /// AdamW moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
    /// Where the run stood.
    pub state: TrainerState,
}

/// Reads the checkpoint in `dir` for the parameters `names`, each checked against the shape
/// the model has for it (`shape`); errors name the file and the tensor.
pub fn restore(
    dir: &Path,
    names: &[String],
    shape: &dyn Fn(&str) -> Option<[usize; 2]>,
) -> Result<Restored> {
    let device = burn::tensor::Device::flex();
    let p_path = dir.join("params.safetensors");
    let bytes = read(&p_path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::parse(&p_path, e))?;
    let mut params = Vec::with_capacity(names.len());
    for n in names {
        let t = tensor_of(&p_path, &st, n, &device)?;
        let want =
            shape(n).ok_or_else(|| Error::tensor(&p_path, n, "the model has no such parameter"))?;
        if want != t.dims() {
            return Err(Error::tensor(
                &p_path,
                n,
                format!("shape {:?}, the model's is {:?}", t.dims(), want),
            ));
        }
        params.push((n.clone(), t));
    }
    let o_path = dir.join("optimizer.safetensors");
    let bytes = read(&o_path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::parse(&o_path, e))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::parse(&o_path, "metadata `step` missing"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::parse(&o_path, e))?;
    let mut moments = BTreeMap::new();
    for n in names {
        if st.tensor(&format!("{n}.m")).is_ok() {
            moments.insert(
                n.clone(),
                Moments {
                    m: tensor_of(&o_path, &st, &format!("{n}.m"), &device)?,
                    v: tensor_of(&o_path, &st, &format!("{n}.v"), &device)?,
                },
            );
        }
    }
    let s_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&s_path).map_err(|e| Error::io(&s_path, e))?;
    let state = serde_json::from_str(&text).map_err(|e| Error::parse(&s_path, e))?;
    Ok(Restored {
        params,
        step,
        moments,
        state,
    })
}

/// Rewrites the JSONL log with `entries` (on resume: entries after the checkpoint go).
pub fn rewrite_log(path: &Path, entries: &[LogEntry]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut text = String::new();
    for e in entries {
        text.push_str(&serde_json::to_string(e).map_err(|e| Error::Invalid(e.to_string()))?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Appends one entry to the JSONL log.
pub fn append_log(path: &Path, entry: &LogEntry) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(entry).map_err(|e| Error::Invalid(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}
