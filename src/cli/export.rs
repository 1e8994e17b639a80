//! `fedtune export`: merges an adapter into its base (`merge_and_unload`) and writes a
//! safetensors model directory that transformers loads, with the tokenizer files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use safetensors::tensor::{Dtype, TensorView};

use super::common::ModelArgs;

/// Arguments of `fedtune export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory.
    #[arg(long)]
    output: PathBuf,
}

/// Runs `fedtune export`.
pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let mut m = a.model.load()?;
    m.model.merge_adapter()?;
    write_model_dir(&m.model, &m.tokenizer, &a.model.model, &a.output)?;
    println!("wrote {}", a.output.display());
    Ok(())
}

/// Writes `config.json`, `model.safetensors` (f32, Hugging Face keys) and the tokenizer files.
pub fn write_model_dir(
    model: &fedtune_engine::LlamaModel,
    tokenizer: &fedtune_engine::Tokenizer,
    source: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut names: Vec<String> = vec![
        "model.embed_tokens.weight".into(),
        "model.norm.weight".into(),
    ];
    if model.lm_head.is_some() {
        names.push("lm_head.weight".into());
    }
    for i in 0..model.layers.len() {
        names.push(format!("model.layers.{i}.input_layernorm.weight"));
        names.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    for (n, lin) in model.linears() {
        names.push(format!("{n}.weight"));
        if lin.bias.is_some() {
            names.push(format!("{n}.bias"));
        }
    }
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(names.len());
    for n in names {
        let t = model.param(&n).with_context(|| format!("parameter {n}"))?;
        let [r, c] = t.dims();
        let v = fedtune_engine::weights::to_f32_vec(t.into_data());
        let shape = if n.ends_with("norm.weight") || n.ends_with(".bias") {
            vec![c]
        } else {
            vec![r, c]
        };
        entries.push((n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent"),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &out.join("model.safetensors"))?;
    let cfg = model.config.to_hf_json();
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    copy_tokenizer(tokenizer, &model.config, source, out)
}

/// Copies the tokenizer files of a model directory, or writes them from the tokenizer built
/// out of a GGUF file.
pub fn copy_tokenizer(
    tok: &fedtune_engine::Tokenizer,
    config: &fedtune_engine::ModelConfig,
    source: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let dir = if source.is_dir() {
        source.to_path_buf()
    } else {
        source.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let mut copied = false;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::copy(&p, out.join(f)).with_context(|| format!("copying {}", p.display()))?;
            copied |= f == "tokenizer.json";
        }
    }
    if !copied {
        tok.inner()
            .save(out.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
        let cfg = serde_json::json!({
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.inner().id_to_token(tok.pad_id),
            "chat_template": tok.template_source(),
            "model_max_length": config.max_position_embeddings,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        std::fs::write(
            out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg)?,
        )?;
    }
    Ok(())
}
