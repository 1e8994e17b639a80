//! The adapter payload: PEFT's `adapter_model.safetensors` layout
//! (`base_model.model.{module}.lora_A.weight` `[r, in]`, `.lora_B.weight` `[out, r]`), which
//! is both the file users load in PEFT and the byte stream clients upload. Per-module scales,
//! which PEFT derives from `adapter_config.json`, travel in the safetensors metadata under
//! `fedtune.scales` (PEFT ignores it). Dense tensors use their own names; DoRA's magnitude
//! vectors are dense tensors named as PEFT names them ([`magnitude_key`]).
//!
//! Decoding is total: any byte string yields an adapter or an error, within [`Limits`].
//!
//! This crate has no network dependency: the engine reads and writes adapters through it, and
//! `fedtune-protocol` re-exports it as `fedtune_protocol::peft` for the wire.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Errors decoding an adapter: every variant says what was wrong with the input; decoding
/// never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeftError {
    /// The bytes are not a valid adapter.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A size limit was exceeded.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl PeftError {
    fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        PeftError::Malformed {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Result with [`PeftError`].
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

const PREFIX: &str = "base_model.model.";
const SCALES_KEY: &str = "fedtune.scales";

/// Bounds on what a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload in bytes.
    pub max_bytes: u64,
    /// Largest number of tensors.
    pub max_tensors: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 30,
            max_tensors: 100_000,
        }
    }
}

/// Splits a key into (module, `A` | `B`) when it is a LoRA factor.
pub fn parse_lora_key(key: &str) -> Option<(&str, char)> {
    let rest = key.strip_prefix(PREFIX)?;
    for (suffix, which) in [
        (".lora_A.weight", 'A'),
        (".lora_B.weight", 'B'),
        (".lora_A.default.weight", 'A'),
        (".lora_B.default.weight", 'B'),
    ] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return Some((m, which));
        }
    }
    None
}

/// The PEFT key of a module's factor.
pub fn lora_key(module: &str, which: char) -> String {
    format!("{PREFIX}{module}.lora_{which}.weight")
}

/// The PEFT key of a DoRA module's magnitude vector (`[out]`, PEFT's `lora_magnitude_vector`),
/// which an [`Adapter`] holds among its dense tensors as a `[1, out]` matrix.
pub fn magnitude_key(module: &str) -> String {
    format!("{PREFIX}{module}.lora_magnitude_vector")
}

/// The module of a DoRA magnitude key ([`magnitude_key`]; also PEFT's in-memory name with the
/// adapter name and `.weight`).
pub fn parse_magnitude_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    rest.strip_suffix(".lora_magnitude_vector")
        .or_else(|| rest.strip_suffix(".lora_magnitude_vector.default.weight"))
}

/// The key of a reward model's score head `[1, hidden]` (PEFT saves a module of
/// `modules_to_save` whole under the module's own name).
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// PEFT's `task_type` and `modules_to_save` of `adapter`: a sequence classifier's (`SEQ_CLS`,
/// the head among the modules saved whole, as PEFT writes it) when it has a score head, else a
/// causal LM's.
pub fn task_type(adapter: &Adapter) -> (&'static str, serde_json::Value) {
    if adapter.dense.contains_key(SCORE_KEY) {
        ("SEQ_CLS", serde_json::json!(["classifier", "score"]))
    } else {
        ("CAUSAL_LM", serde_json::Value::Null)
    }
}

/// Whether an adapter is weight-decomposed (DoRA): it holds magnitude vectors.
pub fn is_dora(adapter: &Adapter) -> bool {
    adapter
        .dense
        .keys()
        .any(|k| parse_magnitude_key(k).is_some())
}

fn to_matrix(key: &str, view: &TensorView<'_>) -> Result<Matrix> {
    let shape = view.shape();
    let (rows, cols) = match shape {
        [r, c] => (*r, *c),
        [n] => (1, *n),
        other => {
            return Err(PeftError::malformed(
                "adapter",
                format!("tensor `{key}` has shape {other:?}, expected 1-D or 2-D"),
            ));
        }
    };
    let bytes = view.data();
    let Some(data) = floats(view.dtype(), bytes) else {
        return Err(PeftError::malformed(
            "adapter",
            format!(
                "tensor `{key}` has dtype {:?} (F32, BF16, F16 accepted)",
                view.dtype()
            ),
        ));
    };
    if data.len() != rows * cols {
        return Err(PeftError::malformed(
            "adapter",
            format!("tensor `{key}`: data does not match its shape"),
        ));
    }
    Ok(Matrix::new(rows, cols, data))
}

/// Decodes PEFT safetensors bytes. `scale_of(module, rank)` gives the scale of modules whose
/// scale is not in the metadata (PEFT files: `α/r` from the config).
pub fn decode(
    bytes: &[u8],
    limits: &Limits,
    scale_of: impl Fn(&str, usize) -> f32,
) -> Result<Adapter> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(PeftError::TooLarge {
            what: "adapter payload",
            size: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| PeftError::malformed("adapter", e))?;
    if meta.tensors().len() > limits.max_tensors {
        return Err(PeftError::TooLarge {
            what: "adapter tensor count",
            size: meta.tensors().len() as u64,
            limit: limits.max_tensors as u64,
        });
    }
    let scales: HashMap<String, f32> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(SCALES_KEY))
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| PeftError::malformed("adapter", format!("{SCALES_KEY}: {e}")))?
        .unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| PeftError::malformed("adapter", e))?;
    let mut halves: BTreeMap<String, (Option<Matrix>, Option<Matrix>)> = BTreeMap::new();
    let mut dense = BTreeMap::new();
    for (key, view) in st.tensors() {
        let m = to_matrix(&key, &view)?;
        match parse_lora_key(&key) {
            Some((module, 'A')) => halves.entry(module.to_string()).or_default().0 = Some(m),
            Some((module, _)) => halves.entry(module.to_string()).or_default().1 = Some(m),
            None => match parse_magnitude_key(&key) {
                Some(module) => {
                    if m.rows != 1 {
                        return Err(PeftError::malformed(
                            "adapter",
                            format!("DoRA magnitude `{key}` is not a vector"),
                        ));
                    }
                    dense.insert(magnitude_key(module), m);
                }
                None => {
                    dense.insert(key.clone(), m);
                }
            },
        }
    }
    let mut modules = BTreeMap::new();
    for (module, (a, b)) in halves {
        let a = a.ok_or_else(|| {
            PeftError::malformed("adapter", format!("`{}` missing", lora_key(&module, 'A')))
        })?;
        let b = b.ok_or_else(|| {
            PeftError::malformed("adapter", format!("`{}` missing", lora_key(&module, 'B')))
        })?;
        if a.rows != b.cols {
            return Err(PeftError::malformed(
                "adapter",
                format!(
                    "module `{module}`: lora_A has rank {} but lora_B {}",
                    a.rows, b.cols
                ),
            ));
        }
        let scale = scales
            .get(&module)
            .copied()
            .unwrap_or_else(|| scale_of(&module, a.rows));
        modules.insert(module, LoraFactors { a, b, scale });
    }
    Ok(Adapter { modules, dense })
}

/// Encodes an adapter as PEFT safetensors bytes (f32), with scales in the metadata.
pub fn encode(adapter: &Adapter) -> Vec<u8> {
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes_of =
        |m: &Matrix| -> Vec<u8> { m.data.iter().flat_map(|v| v.to_le_bytes()).collect() };
    for (module, f) in &adapter.modules {
        entries.push((
            lora_key(module, 'A'),
            vec![f.a.rows, f.a.cols],
            bytes_of(&f.a),
        ));
        entries.push((
            lora_key(module, 'B'),
            vec![f.b.rows, f.b.cols],
            bytes_of(&f.b),
        ));
    }
    for (name, d) in &adapter.dense {
        // PEFT's magnitude vectors are 1-D; it refuses a `[1, out]` tensor for them.
        let shape = if d.rows == 1 && parse_magnitude_key(name).is_some() {
            vec![d.cols]
        } else {
            vec![d.rows, d.cols]
        };
        entries.push((name.clone(), shape, bytes_of(d)));
    }
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(k, shape, data)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).expect("shape matches data"),
            )
        })
        .collect();
    let scales: BTreeMap<&String, f32> =
        adapter.modules.iter().map(|(k, f)| (k, f.scale)).collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        SCALES_KEY.to_string(),
        serde_json::to_string(&scales).expect("scales serialise"),
    );
    let bytes = safetensors::tensor::serialize(views, Some(meta)).expect("views are consistent");
    canonical_header(bytes)
}

/// PEFT's `adapter_config.json` for `adapter`, so that the bytes of [`encode`] load with
/// `PeftModel.from_pretrained`: PEFT scales a module by `lora_alpha / r`, so each module's
/// alpha is `scale · rank`; modules whose rank or alpha differ from the most common ones go to
/// `rank_pattern` / `alpha_pattern`.
pub fn adapter_config(adapter: &Adapter, base_model: Option<&str>) -> serde_json::Value {
    let mut counts: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    let per: Vec<(&String, usize, f64)> = adapter
        .modules
        .iter()
        .map(|(k, f)| (k, f.a.rows, f.scale as f64 * f.a.rows as f64))
        .collect();
    for (_, r, a) in &per {
        *counts.entry((*r, a.to_bits())).or_insert(0) += 1;
    }
    let ((r, alpha_bits), _) = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, n)| (*k, *n))
        .unwrap_or(((0, 0f64.to_bits()), 0));
    let alpha = f64::from_bits(alpha_bits);
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut targets = BTreeSet::new();
    for (k, kr, ka) in &per {
        targets.insert(k.rsplit('.').next().unwrap_or(k).to_string());
        if *kr != r {
            rank_pattern.insert(k.to_string(), (*kr).into());
        }
        if ka.to_bits() != alpha_bits {
            alpha_pattern.insert(k.to_string(), (*ka).into());
        }
    }
    let (task_type, modules_to_save) = task_type(adapter);
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": is_dora(adapter),
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": modules_to_save,
        "base_model_name_or_path": base_model,
    })
}

/// Rewrites the JSON header of safetensors bytes with its keys in sorted order (safetensors
/// serialises metadata from a `HashMap`, so the same adapter would otherwise encode to
/// different bytes, and digests — which sign and pin adapters — would differ). The header is
/// padded with spaces to a multiple of 8 bytes, as safetensors does; data offsets are relative
/// to the end of the header and stay valid.
fn canonical_header(bytes: Vec<u8>) -> Vec<u8> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<(String, serde_json::Value)> = m.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                let mut out = serde_json::Map::new();
                for (k, v) in entries {
                    out.insert(k, sorted(v));
                }
                serde_json::Value::Object(out)
            }
            other => other,
        }
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte length")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors wrote valid JSON");
    let mut text = serde_json::to_vec(&sorted(header)).expect("JSON serialises");
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Little-endian f32, bf16 or f16 values as f32 (`None` for other dtypes).
pub fn floats(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_byte_identical_across_calls() {
        let a = sample();
        let first = encode(&a);
        for _ in 0..20 {
            assert_eq!(encode(&a), first);
        }
        assert_eq!(decode(&first, &Limits::default(), |_, _| 1.0).unwrap(), a);
    }

    fn sample() -> Adapter {
        let mut a = Adapter::default();
        a.modules.insert(
            "model.layers.0.self_attn.q_proj".into(),
            LoraFactors {
                a: Matrix::new(2, 3, vec![1., 2., 3., 4., 5., 6.]),
                b: Matrix::new(4, 2, vec![0.5; 8]),
                scale: 4.0,
            },
        );
        a
    }

    #[test]
    fn a_score_head_makes_the_config_a_sequence_classifiers() {
        let mut a = sample();
        assert_eq!(adapter_config(&a, None)["task_type"], "CAUSAL_LM");
        assert!(adapter_config(&a, None)["modules_to_save"].is_null());
        a.dense
            .insert(SCORE_KEY.into(), Matrix::new(1, 3, vec![0.1, 0.2, 0.3]));
        let c = adapter_config(&a, None);
        assert_eq!(c["task_type"], "SEQ_CLS");
        assert_eq!(
            c["modules_to_save"],
            serde_json::json!(["classifier", "score"])
        );
        assert_eq!(
            decode(&encode(&a), &Limits::default(), |_, _| 4.0).unwrap(),
            a
        );
    }

    #[test]
    fn encode_then_decode_is_the_identity() {
        let a = sample();
        let back = decode(&encode(&a), &Limits::default(), |_, _| 1.0).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn dora_magnitudes_are_written_one_dimensional_as_peft_does() {
        let mut a = sample();
        let key = magnitude_key("model.layers.0.self_attn.q_proj");
        a.dense
            .insert(key.clone(), Matrix::new(1, 4, vec![1., 2., 3., 4.]));
        let bytes = encode(&a);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor(&key).unwrap().shape(), &[4]);
        assert_eq!(decode(&bytes, &Limits::default(), |_, _| 1.0).unwrap(), a);
        assert!(is_dora(&a) && !is_dora(&sample()));
        assert_eq!(adapter_config(&a, None)["use_dora"], true);
        assert_eq!(
            parse_magnitude_key(
                "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector.default.weight"
            ),
            Some("model.layers.1.mlp.up_proj")
        );
    }

    #[test]
    fn limits_and_garbage_are_errors() {
        let bytes = encode(&sample());
        let tight = Limits {
            max_bytes: 10,
            max_tensors: 10,
        };
        assert!(matches!(
            decode(&bytes, &tight, |_, _| 1.0),
            Err(PeftError::TooLarge { .. })
        ));
        assert!(
            decode(
                b"\xff\xff\xff\xff\xff\xff\xff\x7f garbage",
                &Limits::default(),
                |_, _| 1.0
            )
            .is_err()
        );
        assert!(decode(&bytes[..bytes.len() - 3], &Limits::default(), |_, _| 1.0).is_err());
    }
}
