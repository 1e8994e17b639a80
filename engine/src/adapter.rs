//! LoRA adapters in PEFT's on-disk format: `adapter_config.json` plus
//! `adapter_model.safetensors` with keys
//! `base_model.model.{module}.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`.
//!
//! A [`PeftAdapter`] is host data (no device): its weights are the workspace's one adapter
//! type ([`fedtune_aggregation::Adapter`]), which the protocol sends and the coordinator
//! aggregates without touching the engine. The safetensors layout is
//! [`fedtune_peft`]'s.

use std::collections::BTreeMap;
use std::path::Path;

use fedtune_aggregation::Adapter;
use fedtune_peft as peft;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// The seven projections of a Llama block, PEFT's usual `target_modules`.
pub const ALL_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The fields of PEFT's `LoraConfig` that fedtune reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout on the LoRA input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (last path component) that carry adapters.
    pub target_modules: Vec<String>,
    /// Scale `α/√r` instead of `α/r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Per-module rank overrides (PEFT `rank_pattern`), keyed by a module-name suffix.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (PEFT `alpha_pattern`).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Weight-decomposed LoRA (DoRA): every module also has a magnitude vector.
    #[serde(default)]
    pub use_dora: bool,
}

impl LoraConfig {
    /// A config for all seven projections.
    pub fn new(r: usize, lora_alpha: f64) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: ALL_PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            base_model_name_or_path: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_dora: false,
        }
    }

    /// The scale of a module of rank `r`, honouring `alpha_pattern` and rsLoRA.
    pub fn scale_for(&self, module: &str, r: usize) -> f64 {
        let alpha = pattern_lookup(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The rank of a module, honouring `rank_pattern`.
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_lookup(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// Whether a module path (`model.layers.0.self_attn.q_proj`) is targeted.
    pub fn targets(&self, module: &str) -> bool {
        let last = module.rsplit('.').next().unwrap_or(module);
        self.target_modules
            .iter()
            .any(|t| t == last || t == "all-linear" || module.ends_with(&format!(".{t}")))
    }
}

/// PEFT matches pattern keys as module-path suffixes.
fn pattern_lookup<T: Copy>(map: &BTreeMap<String, T>, module: &str) -> Option<T> {
    map.iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, v)| *v)
}

/// A PEFT LoRA adapter: its config and its weights (host data shared with the aggregation
/// and protocol crates).
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    /// The PEFT config.
    pub config: LoraConfig,
    /// Modules by path (`model.layers.0.self_attn.q_proj`) with their scales.
    pub weights: Adapter,
    /// fedtune's own metadata (`quantization` of the training base, `merged_sft_adapter`),
    /// kept in [`METADATA_FILE`] beside the adapter: PEFT warns about every key of
    /// `adapter_config.json` that `LoraConfig` does not know.
    pub metadata: serde_json::Map<String, Value>,
}

pub use fedtune_peft::SCORE_KEY;

/// The file beside `adapter_config.json` that holds [`PeftAdapter::metadata`].
pub const METADATA_FILE: &str = "fedtune_adapter.json";

impl PeftAdapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| Error::parse(&cfg_path, e))?;
        let config = parse_config(&raw, &cfg_path)?;
        let weights_path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let weights = peft::decode(&bytes, &peft::Limits::default(), |m, r| {
            config.scale_for(m, r) as f32
        })
        .map_err(|e| Error::parse(&weights_path, e))?;
        if let Some(name) = weights
            .dense
            .keys()
            .find(|k| k.as_str() != SCORE_KEY && peft::parse_magnitude_key(k).is_none())
        {
            return Err(Error::tensor(
                &weights_path,
                name,
                "not a LoRA factor (expected base_model.model.<module>.lora_A/lora_B.weight, \
                 a DoRA lora_magnitude_vector or a reward model's score head; other \
                 modules_to_save and embedding adapters are not supported)",
            ));
        }
        check_dora(&weights, config.use_dora)
            .map_err(|(key, why)| Error::tensor(&weights_path, key, why))?;
        if let Some(s) = weights.dense.get(SCORE_KEY)
            && (s.rows != 1 || s.data.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::tensor(
                &weights_path,
                SCORE_KEY,
                "a reward model's score head is [1, hidden] and finite",
            ));
        }
        for (module, m) in &weights.modules {
            if m.a.data.iter().chain(&m.b.data).any(|v| !v.is_finite()) {
                return Err(Error::tensor(
                    &weights_path,
                    peft::lora_key(module, 'A'),
                    "contains NaN or Inf",
                ));
            }
        }
        // Adapters from earlier fedtune builds kept the metadata in adapter_config.json as
        // `fedtune_<key>`; the file beside it wins.
        let mut metadata = serde_json::Map::new();
        if let Value::Object(obj) = &raw {
            for (k, v) in obj {
                if let Some(key) = k.strip_prefix("fedtune_") {
                    metadata.insert(key.to_string(), v.clone());
                }
            }
        }
        let meta_path = dir.join(METADATA_FILE);
        if meta_path.exists() {
            let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
            match serde_json::from_str(&text).map_err(|e| Error::parse(&meta_path, e))? {
                Value::Object(obj) => metadata.extend(obj),
                _ => {
                    return Err(Error::parse(
                        &meta_path,
                        "expected a JSON object of fedtune's adapter metadata",
                    ));
                }
            }
        }
        Ok(PeftAdapter {
            config,
            weights,
            metadata,
        })
    }

    /// A reward model's score head `[1, hidden]`, when the adapter has one.
    pub fn score(&self) -> Option<&fedtune_aggregation::Matrix> {
        self.weights.dense.get(SCORE_KEY)
    }

    /// The `adapter_config.json` document, in PEFT's schema. Modules whose rank or scale
    /// differ from `r`/`lora_alpha` get `rank_pattern`/`alpha_pattern` entries. An adapter
    /// with a score head is a sequence classifier's (`task_type` `SEQ_CLS`, the head among
    /// `modules_to_save`, as PEFT writes it).
    pub fn config_json(&self) -> Value {
        let c = &self.config;
        let mut targets = c.target_modules.clone();
        targets.sort();
        let mut rank_pattern = c.rank_pattern.clone();
        let mut alpha_pattern = c.alpha_pattern.clone();
        for (module, m) in &self.weights.modules {
            let r = m.rank();
            if r != c.rank_for(module) {
                rank_pattern.insert(module.clone(), r);
            }
            let expected = c.scale_for(module, r) as f32;
            if (expected - m.scale).abs() > 1e-6 * m.scale.abs().max(1.0) {
                let alpha = if c.use_rslora {
                    m.scale as f64 * (r as f64).sqrt()
                } else {
                    m.scale as f64 * r as f64
                };
                alpha_pattern.insert(module.clone(), alpha);
            }
        }
        let (task_type, modules_to_save) = fedtune_peft::task_type(&self.weights);
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "target_modules": targets,
            "use_rslora": c.use_rslora,
            "base_model_name_or_path": c.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": modules_to_save,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_dora": c.use_dora,
            "layers_to_transform": null,
            "layers_pattern": null,
            "revision": null,
        })
    }

    /// Writes `adapter_config.json`, `adapter_model.safetensors` and, when there is metadata,
    /// [`METADATA_FILE`] into `dir` (created when missing; a metadata file left there by an
    /// earlier adapter is removed when this one has none). Each file is written to a
    /// temporary name and renamed, so a crash never leaves a half-written adapter behind.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg = serde_json::to_string_pretty(&self.config_json())
            .map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&dir.join("adapter_config.json"), cfg.as_bytes())?;
        write_atomic(
            &dir.join("adapter_model.safetensors"),
            &peft::encode(&self.weights),
        )?;
        let meta_path = dir.join(METADATA_FILE);
        if self.metadata.is_empty() {
            match std::fs::remove_file(&meta_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&meta_path, e)),
                _ => Ok(()),
            }
        } else {
            let meta = serde_json::to_string_pretty(&self.metadata)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            write_atomic(&meta_path, meta.as_bytes())
        }
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.weights.num_parameters()
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads PEFT's `adapter_config.json` (the fields fedtune supports; unsupported features are
/// errors naming their field).
pub fn parse_config(raw: &Value, path: &Path) -> Result<LoraConfig> {
    let peft_type = raw
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(Error::config(
            path,
            "peft_type",
            format!("`{peft_type}` is not LORA"),
        ));
    }
    for (field, bad) in [
        (
            "fan_in_fan_out",
            raw.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true),
        ),
        (
            // A sequence classifier's head (PEFT lists both names for SEQ_CLS) is read; other
            // modules saved whole are not.
            "modules_to_save",
            raw.get("modules_to_save").is_some_and(|v| match v {
                Value::Null => false,
                Value::Array(a) => a
                    .iter()
                    .any(|m| !matches!(m.as_str(), Some("score" | "classifier"))),
                _ => true,
            }),
        ),
        (
            "bias",
            raw.get("bias")
                .and_then(Value::as_str)
                .is_some_and(|b| b != "none"),
        ),
    ] {
        if bad {
            return Err(Error::config(path, field, "is not supported by fedtune"));
        }
    }
    let r = raw
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| Error::config(path, "r", "missing or not a positive integer"))?
        as usize;
    let lora_alpha = raw
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::config(path, "lora_alpha", "missing or not a number"))?;
    let target_modules = match raw.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Error::config(path, "target_modules", "entries must be strings"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) if s == "all-linear" => {
            ALL_PROJECTIONS.iter().map(|s| s.to_string()).collect()
        }
        Some(Value::String(s)) => {
            // A regex in PEFT; fedtune accepts the projection names it mentions.
            let names: Vec<String> = ALL_PROJECTIONS
                .iter()
                .filter(|p| s.contains(*p))
                .map(|s| s.to_string())
                .collect();
            if names.is_empty() {
                return Err(Error::config(
                    path,
                    "target_modules",
                    format!("pattern `{s}` names none of {ALL_PROJECTIONS:?}"),
                ));
            }
            names
        }
        _ => return Err(Error::config(path, "target_modules", "missing")),
    };
    let map_usize = |field: &str| -> BTreeMap<String, usize> {
        raw.get(field)
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_u64().map(|v| (k.clone(), v as usize)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let alpha_pattern = raw
        .get("alpha_pattern")
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    Ok(LoraConfig {
        r,
        lora_alpha,
        lora_dropout: raw
            .get("lora_dropout")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        target_modules,
        use_rslora: raw
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        base_model_name_or_path: raw
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
        rank_pattern: map_usize("rank_pattern"),
        alpha_pattern,
        use_dora: raw
            .get("use_dora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// Checks DoRA's magnitude vectors against the factors: with `use_dora` every module has one,
/// `[1, out]` (`out` = its `lora_B` rows) and finite; without it there are none. An error is
/// `(tensor key, why)`.
pub fn check_dora(weights: &Adapter, use_dora: bool) -> std::result::Result<(), (String, String)> {
    for (key, m) in &weights.dense {
        let Some(module) = peft::parse_magnitude_key(key) else {
            continue;
        };
        if !use_dora {
            return Err((
                key.clone(),
                "a DoRA magnitude vector, but adapter_config.json does not set use_dora".into(),
            ));
        }
        let Some(f) = weights.modules.get(module) else {
            return Err((key.clone(), format!("no LoRA factors for `{module}`")));
        };
        if m.rows != 1 || m.cols != f.b.rows {
            return Err((
                key.clone(),
                format!(
                    "has {} values; the module has {} output features",
                    m.data.len(),
                    f.b.rows
                ),
            ));
        }
        if m.data.iter().any(|v| !v.is_finite()) {
            return Err((key.clone(), "contains NaN or Inf".into()));
        }
    }
    if use_dora
        && let Some(module) = weights
            .modules
            .keys()
            .find(|m| !weights.dense.contains_key(&peft::magnitude_key(m)))
    {
        return Err((
            peft::magnitude_key(module),
            "missing: use_dora adapters have a magnitude vector for every module".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_adapter() -> PeftAdapter {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama/adapter");
        PeftAdapter::load(&dir).expect("the test adapter loads")
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fedtune-adapter-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn metadata_lives_beside_the_peft_config_and_round_trips() {
        let mut a = tiny_adapter();
        a.metadata.insert(
            "quantization".into(),
            serde_json::json!({"load_in_4bit": true}),
        );
        let dir = scratch("meta");
        a.save(&dir).unwrap();
        let cfg = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        assert!(
            !cfg.contains("fedtune"),
            "PEFT's config holds only PEFT's keys: {cfg}"
        );
        let back = PeftAdapter::load(&dir).unwrap();
        assert_eq!(back.metadata, a.metadata);
        // Saving an adapter without metadata over it removes the stale file.
        a.metadata.clear();
        a.save(&dir).unwrap();
        assert!(!dir.join(METADATA_FILE).exists());
        assert!(PeftAdapter::load(&dir).unwrap().metadata.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn older_adapters_keep_their_metadata_and_a_broken_file_is_named() {
        let a = tiny_adapter();
        let dir = scratch("legacy");
        a.save(&dir).unwrap();
        // An adapter from an earlier build: `fedtune_<key>` inside adapter_config.json.
        let mut cfg = a.config_json();
        cfg["fedtune_merged_sft_adapter"] = serde_json::json!("runs/sft");
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let back = PeftAdapter::load(&dir).unwrap();
        assert_eq!(back.metadata["merged_sft_adapter"], "runs/sft");
        std::fs::write(dir.join(METADATA_FILE), "[1, 2]").unwrap();
        let err = PeftAdapter::load(&dir).unwrap_err().to_string();
        assert!(err.contains(METADATA_FILE), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
