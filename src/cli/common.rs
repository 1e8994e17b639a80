//! Options shared by subcommands: model, adapter, device and dtype.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::{DType, Device};
use clap::Args;
use fedtune_engine::{LoadedModel, PeftAdapter, load_model};

/// Which model to load and where to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json + safetensors + tokenizer.json) or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Device: `cpu`, or `cuda[:N]` (builds with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Chat template when the model has none, or to override it: chatml, llama3, llama2,
    /// zephyr, or a Jinja file.
    #[arg(long)]
    pub chat_template: Option<String>,
}

/// Parses `--device`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        s if s.starts_with("cuda") => {
            let idx = s
                .strip_prefix("cuda")
                .and_then(|r| r.strip_prefix(':'))
                .map(|n| n.parse::<usize>())
                .transpose()
                .context("--device cuda:N needs a number")?
                .unwrap_or(0);
            Ok(Device::cuda(idx))
        }
        other => anyhow::bail!(
            "--device {other}: unknown device (cpu{})",
            if cfg!(feature = "cuda") {
                ", cuda[:N]"
            } else {
                "; cuda needs a build with --features cuda"
            }
        ),
    }
}

/// Parses `--dtype`.
pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
    })
}

impl ModelArgs {
    /// Loads the model for training: NF4-quantised projections with `load_in_4bit` (QLoRA).
    pub fn load_for_training(
        &self,
        cfg: &fedtune_engine::train::TrainConfig,
    ) -> anyhow::Result<LoadedModel> {
        let mut m = self.load()?;
        if cfg.load_in_4bit {
            anyhow::ensure!(
                cfg.is_lora(),
                "--load-in-4bit trains LoRA adapters on a frozen NF4 base; it excludes --full and --train-last-layers"
            );
            let (params, bytes) = m.model.quantize_nf4(cfg.bnb_4bit_use_double_quant);
            tracing::info!(
                "NF4 base: {params} parameters in {bytes} bytes ({:.3} bits each)",
                bytes as f64 * 8.0 / params as f64
            );
        }
        Ok(m)
    }

    /// Loads the model, its tokenizer and the adapter.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = parse_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype)?;
        let mut m = load_model(&self.model, &device, dtype)
            .with_context(|| format!("loading model {}", self.model.display()))?;
        if let Some(t) = &self.chat_template {
            let path = std::path::Path::new(t);
            let src = if path.is_file() {
                std::fs::read_to_string(path).with_context(|| format!("reading {t}"))?
            } else {
                t.clone()
            };
            m.tokenizer.set_template(&src)?;
        }
        if let Some(a) = &self.adapter {
            let adapter =
                PeftAdapter::load(a).with_context(|| format!("loading adapter {}", a.display()))?;
            m.model
                .attach_adapter(&adapter)
                .with_context(|| format!("applying adapter {}", a.display()))?;
        }
        Ok(m)
    }
}
