//! What pins a federation: the base model's digest and the LoRA configuration every party
//! trains, hashed into the `plan_hash` each signed header carries.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::envelope::Digest;

/// The LoRA configuration of a federation (PEFT's names). The coordinator fixes it; every round
/// plan carries it, and its hash with the base model's digest ([`plan_hash`]) is signed into
/// every global adapter's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraPlan {
    /// LoRA rank `r`.
    pub rank: usize,
    /// LoRA α: updates decode with scale α/r.
    pub lora_alpha: f64,
    /// Modules carrying LoRA factors (`q_proj`, ..., `down_proj`).
    pub target_modules: Vec<String>,
}

impl LoraPlan {
    /// The scale `α/r` of a module of rank `r`.
    pub fn scale(&self, r: usize) -> f32 {
        (self.lora_alpha / r.max(1) as f64) as f32
    }
}

/// BLAKE3 over a base model's files: `config.json` and every `*.safetensors` of a model
/// directory (sorted, each preceded by its name), or the single file given (a GGUF).
pub fn model_digest(model: &Path) -> io::Result<Digest> {
    let mut h = blake3::Hasher::new();
    let mut files: Vec<PathBuf> = if model.is_dir() {
        std::fs::read_dir(model)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n == "config.json" || n.ends_with(".safetensors")
            })
            .collect()
    } else {
        vec![model.to_path_buf()]
    };
    files.sort();
    for f in files {
        h.update(
            f.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .as_bytes(),
        );
        h.update_reader(std::fs::File::open(&f)?)?;
    }
    Ok(*h.finalize().as_bytes())
}

/// The hash every party of a federation pins: the base model's digest ([`model_digest`]) and
/// the LoRA configuration.
pub fn plan_hash(model: &Digest, lora: &LoraPlan) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(model);
    h.update(
        format!(
            "r={};alpha={};targets={}",
            lora.rank,
            lora.lora_alpha,
            lora.target_modules.join(",")
        )
        .as_bytes(),
    );
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_changes_with_the_model_and_every_lora_setting() {
        let lora = LoraPlan {
            rank: 4,
            lora_alpha: 8.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        };
        let h = plan_hash(&[1; 32], &lora);
        assert_eq!(h, plan_hash(&[1; 32], &lora.clone()));
        assert_ne!(h, plan_hash(&[2; 32], &lora));
        for other in [
            LoraPlan {
                rank: 8,
                ..lora.clone()
            },
            LoraPlan {
                lora_alpha: 16.0,
                ..lora.clone()
            },
            LoraPlan {
                target_modules: vec!["q_proj".into()],
                ..lora.clone()
            },
        ] {
            assert_ne!(h, plan_hash(&[1; 32], &other));
        }
        assert_eq!(lora.scale(4), 2.0);
    }

    #[test]
    fn a_model_directory_is_hashed_by_its_config_and_weights_only() {
        let dir = std::env::temp_dir().join(format!("fedtune-model-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), b"weights").unwrap();
        let d = model_digest(&dir).unwrap();
        std::fs::write(dir.join("README.md"), b"notes").unwrap();
        assert_eq!(model_digest(&dir).unwrap(), d);
        std::fs::write(dir.join("model.safetensors"), b"other weights").unwrap();
        assert_ne!(model_digest(&dir).unwrap(), d);
        assert!(model_digest(&dir.join("missing.gguf")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
