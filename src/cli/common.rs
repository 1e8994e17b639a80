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
    /// Device: `cpu`, or `cuda[:N]` (an NVIDIA GPU: training, `eval`, `generate`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (`eval`, `generate`). Training on the CPU: bf16 or f16
    /// holds the frozen base projections in 16 bits, bf16 ones multiplied in bf16 with f32
    /// accumulation where the BLAS can (oneMKL), else widened to f32; LoRA factors in f32.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Chat template when the model has none, or to override it: chatml, llama3, llama2,
    /// zephyr, or a Jinja file.
    #[arg(long)]
    pub chat_template: Option<String>,
}

/// QLoRA-style 4-bit loading for inference (`eval`, `generate`), as bitsandbytes'
/// `BitsAndBytesConfig` names it.
#[derive(Debug, Clone, Args)]
pub struct QuantArgs {
    /// Store the projections as NF4 (4-bit NormalFloat), dequantised on each use.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// With --load-in-4bit: quantise the block scales too (double quantisation).
    #[arg(long)]
    pub bnb_4bit_use_double_quant: bool,
}

impl QuantArgs {
    /// `Some(double)` when 4-bit loading is asked.
    pub fn nf4(&self) -> Option<bool> {
        self.load_in_4bit.then_some(self.bnb_4bit_use_double_quant)
    }
}

/// Parses `--device` for the commands that run on the host engine only (training, merging,
/// export): `cuda` is refused with a clear message.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s.parse::<fedtune_engine::device::Device>()? {
        fedtune_engine::device::Device::Cpu => Ok(Device::flex()),
        fedtune_engine::device::Device::Cuda(_) => anyhow::bail!(
            "--device {s}: this command runs on the CPU; training, `fedtune eval` and `fedtune generate` run on cuda"
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
    /// What `--dtype` means for training: on the CPU, `bf16` or `f16` holds the frozen base
    /// projections in 16 bits (`Some(true)` for bf16) for LoRA, their products in bf16 where
    /// the BLAS has a bf16 product (bf16 only) and widened to f32 otherwise; the LoRA factors,
    /// gradients and optimiser state stay f32. `--bf16` on the CPU (TRL's flag) is
    /// `--dtype bf16`. On a GPU the precision is `--bf16`/`--fp16` and `--dtype` stays f32.
    pub fn half_base(
        &self,
        cfg: &fedtune_engine::train::TrainConfig,
    ) -> anyhow::Result<Option<bool>> {
        let cpu = self.engine_device()? == fedtune_engine::device::Device::Cpu;
        let half = match parse_dtype(&self.dtype)? {
            DType::BF16 => Some(true),
            DType::F16 => Some(false),
            _ => None,
        };
        let flag = if cpu && cfg.bf16 {
            anyhow::ensure!(
                half != Some(false),
                "--bf16 with --dtype f16: pick one 16-bit type for the frozen base"
            );
            "--bf16".to_string()
        } else {
            format!("--dtype {}", self.dtype)
        };
        let Some(bf16) = half.or((cpu && cfg.bf16).then_some(true)) else {
            return Ok(None);
        };
        anyhow::ensure!(
            cpu,
            "--dtype {}: on a GPU training's precision is --bf16 or --fp16 (mixed precision with \
             f32 masters of the LoRA factors); --dtype bf16|f16 is the CPU's",
            self.dtype
        );
        anyhow::ensure!(
            cfg.is_lora(),
            "{flag}: on the CPU the frozen base is held in 16 bits for LoRA training; --full \
             and --train-last-layers train the weights themselves, in f32"
        );
        Ok(Some(bf16))
    }

    /// `--fp16` (mixed precision) and `--tf32` need `--device cuda`; `--bf16` on the CPU is
    /// `--dtype bf16` ([`ModelArgs::half_base`]).
    pub fn check_precision(&self, cfg: &fedtune_engine::train::TrainConfig) -> anyhow::Result<()> {
        let cpu = self.engine_device()? == fedtune_engine::device::Device::Cpu;
        anyhow::ensure!(
            !(cpu && cfg.fp16),
            "--fp16: mixed precision trains on the GPU (--device cuda); the CPU trains in f32"
        );
        anyhow::ensure!(
            !(cpu && cfg.tf32),
            "--tf32: TF32 tensor cores are on NVIDIA GPUs (--device cuda); the CPU trains in f32"
        );
        Ok(())
    }

    /// The device asked for.
    pub fn engine_device(&self) -> anyhow::Result<fedtune_engine::device::Device> {
        Ok(self.device.parse()?)
    }

    /// Loads the model straight onto GPU `ordinal`, with its tokenizer (and chat template
    /// override) and the adapter.
    pub fn load_cuda(
        &self,
        ordinal: usize,
        nf4: Option<bool>,
    ) -> anyhow::Result<(fedtune_engine::cuda::CudaModel, fedtune_engine::Tokenizer)> {
        let gpu = fedtune_engine::cuda::Gpu::open(ordinal)?;
        let dt = fedtune_engine::cuda::Dt::from_burn(parse_dtype(&self.dtype)?)?;
        let (mut model, mut tokenizer) =
            fedtune_engine::loader::load_model_cuda(&self.model, gpu, dt, nf4).with_context(
                || format!("loading model {} onto cuda:{ordinal}", self.model.display()),
            )?;
        self.apply_template(&mut tokenizer)?;
        if let Some(a) = &self.adapter {
            let adapter =
                PeftAdapter::load(a).with_context(|| format!("loading adapter {}", a.display()))?;
            self.warn_unchained_on_gpu(&adapter, a);
            model
                .attach_adapter(&adapter)
                .with_context(|| format!("applying adapter {}", a.display()))?;
        }
        Ok((model, tokenizer))
    }

    pub(crate) fn apply_template(
        &self,
        tokenizer: &mut fedtune_engine::Tokenizer,
    ) -> anyhow::Result<()> {
        if let Some(t) = &self.chat_template {
            let path = std::path::Path::new(t);
            let src = if path.is_file() {
                std::fs::read_to_string(path).with_context(|| format!("reading {t}"))?
            } else {
                t.clone()
            };
            tokenizer.set_template(&src)?;
        }
        Ok(())
    }

    /// Loads the model on the host, NF4-quantised when `nf4` is `Some(double)`.
    pub fn load_quantized(&self, nf4: Option<bool>) -> anyhow::Result<LoadedModel> {
        let mut m = self.load()?;
        if let Some(double) = nf4 {
            m.model.quantize_nf4(double);
        }
        Ok(m)
    }

    /// Loads the model, its tokenizer and the adapter.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        self.load_on(&parse_device(&self.device)?)
    }

    /// [`ModelArgs::load`] on the host whatever `--device` says (training runs that need the
    /// host model, then train a GPU copy with `--device cuda`: [`gpu_copy`]).
    pub fn load_on(&self, device: &Device) -> anyhow::Result<LoadedModel> {
        self.load_with(device, None)
    }

    /// [`ModelArgs::load_on`]; with `half = Some(bf16)`, in f32 with the projections' frozen
    /// weights held in bf16 or f16 as they are read (`--dtype` is then not read).
    pub fn load_with(&self, device: &Device, half: Option<bool>) -> anyhow::Result<LoadedModel> {
        let mut m = match half {
            Some(bf16) => fedtune_engine::load_model_half(&self.model, device, bf16),
            None => load_model(&self.model, device, parse_dtype(&self.dtype)?),
        }
        .with_context(|| format!("loading model {}", self.model.display()))?;
        self.apply_template(&mut m.tokenizer)?;
        if let Some(a) = &self.adapter {
            let adapter =
                PeftAdapter::load(a).with_context(|| format!("loading adapter {}", a.display()))?;
            if let Some(sft) = self.sft_chain(&adapter, a) {
                // The adapter's own model is base + SFT: rebuild it before applying it.
                let s = PeftAdapter::load(&sft)
                    .with_context(|| format!("loading SFT adapter {}", sft.display()))?;
                m.model
                    .attach_adapter(&s)
                    .with_context(|| format!("applying SFT adapter {}", sft.display()))?;
                m.model.merge_adapter()?;
                eprintln!(
                    "{} was trained on {} with the SFT adapter {} merged (fedtune_adapter.json): \
                     merged it first",
                    a.display(),
                    self.model.display(),
                    sft.display()
                );
            }
            m.model
                .attach_adapter(&adapter)
                .with_context(|| format!("applying adapter {}", a.display()))?;
        }
        Ok(m)
    }

    /// On a GPU the recorded SFT adapter of `adapter` (loaded from `dir`) is not merged: a
    /// warning says so, with the export command that makes the right `--model`.
    pub(crate) fn warn_unchained_on_gpu(&self, adapter: &PeftAdapter, dir: &std::path::Path) {
        if let Some(sft) = self.sft_chain(adapter, dir) {
            eprintln!(
                "warning: {} was trained on {} with the SFT adapter {} merged; on cuda it is \
                 applied to the base alone, which is not the model it was trained on: export \
                 the SFT-merged model (fedtune export --model {} --adapter {} --output DIR) and \
                 pass it as --model",
                dir.display(),
                self.model.display(),
                sft.display(),
                self.model.display(),
                sft.display()
            );
        }
    }

    /// The SFT adapter to merge into `--model` before `adapter` (loaded from `dir`), when the
    /// adapter was trained on this very model with one merged (`train dpo|kto|grpo|distill
    /// --sft-adapter`, recorded as `merged_sft_adapter`): its path as recorded, or beside the
    /// adapter's directory. A model other than the recorded base (an SFT-merged export) takes
    /// the adapter as it is. A recorded adapter that cannot be found is warned about, and the
    /// adapter applies to the base alone.
    fn sft_chain(&self, adapter: &PeftAdapter, dir: &std::path::Path) -> Option<PathBuf> {
        let recorded = adapter.metadata.get("merged_sft_adapter")?.as_str()?;
        let same =
            |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(x), Ok(y)) => x == y,
                _ => a == b,
            };
        let base = adapter.config.base_model_name_or_path.as_deref()?;
        if !same(std::path::Path::new(base), &self.model) {
            return None;
        }
        let recorded = PathBuf::from(recorded);
        let beside = dir
            .parent()
            .zip(recorded.file_name())
            .map(|(p, n)| p.join(n));
        let found = std::iter::once(recorded.clone())
            .chain(beside)
            .find(|p| p.join("adapter_model.safetensors").is_file());
        if found.is_none() {
            eprintln!(
                "warning: {} was trained on {} with the SFT adapter {} merged, which is not \
                 found: it is applied to the base alone, which is not the model it was trained on",
                dir.display(),
                self.model.display(),
                recorded.display()
            );
        }
        found
    }
}

/// A copy of the host model (adapter attached, NF4 codes as quantised) on GPU `ordinal`, to
/// train there: in f32, or with `bf16` (`fp16`) the base in bf16 (f16) and f32 masters of the
/// LoRA factors;
/// with `tf32`, f32 products on TF32 tensor cores.
pub fn gpu_copy(
    model: &fedtune_engine::LlamaModel,
    ordinal: usize,
    cfg: &fedtune_engine::train::TrainConfig,
) -> anyhow::Result<fedtune_engine::cuda::CudaModel> {
    use fedtune_engine::cuda::Dt;
    let gpu = fedtune_engine::cuda::Gpu::open(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}"))?;
    gpu.set_tf32(cfg.tf32);
    let dt = if cfg.bf16 {
        Dt::BF16
    } else if cfg.fp16 {
        Dt::F16
    } else {
        Dt::F32
    };
    Ok(fedtune_engine::cuda::CudaModel::from_host(model, gpu, dt)?)
}

/// Copies the parameters `cfg` trains from the GPU model back into the host model (which the
/// adapter and model writers read).
pub fn copy_back(
    gpu: &fedtune_engine::cuda::CudaModel,
    host: &mut fedtune_engine::LlamaModel,
    cfg: &fedtune_engine::train::TrainConfig,
) -> anyhow::Result<()> {
    use fedtune_engine::train::params::TrainModel;
    let trainable = fedtune_engine::train::sft::trainable_for(cfg, host.layers.len());
    let names = gpu.trainable_names(&trainable);
    host.set_params(gpu.host_params(&names)?)?;
    Ok(())
}
