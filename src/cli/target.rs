//! Where a training run's model lives. On the CPU, the host model. On a GPU, LoRA and QLoRA
//! runs load the checkpoint straight onto the device (tensor by tensor; NF4 codes quantised
//! on the host one projection at a time), so the host never holds the weights: an 8B model
//! needs no 32 GB of host memory for its f32 copy. Full and partial fine-tuning, and DPO on a
//! merged SFT adapter (merged in f32 before quantising), load on the host, train a GPU copy
//! and copy the trained tensors back (their outputs are written from host tensors).

use anyhow::Context;
use fedtune_aggregation::Adapter;
use fedtune_engine::cuda::{CudaModel, Dt, Gpu};
use fedtune_engine::device::Device;
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::lora::{init_adapter_for, init_dora};
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::RewardBase;
use fedtune_engine::{LlamaModel, ModelConfig, PeftAdapter, Tokenizer};

use super::common::{ModelArgs, copy_back, gpu_copy};

/// The model a run trains.
pub enum Trainee {
    /// On the host (`--device cpu`).
    Host(Box<LlamaModel>),
    /// On the host, trained as a copy on GPU `usize` and copied back.
    HostThenGpu(Box<LlamaModel>, usize),
    /// Loaded straight onto a GPU.
    Gpu(Box<CudaModel>),
}

/// A training run's work on a model wherever it lives (generic over the device).
pub trait Job {
    /// What the run returns.
    type Out;
    /// Runs on `model`.
    fn run<M: TrainModel + RewardBase>(self, model: &mut M) -> anyhow::Result<Self::Out>;
}

impl ModelArgs {
    /// Loads what `cfg` trains on `--device`, with its tokenizer: `--adapter` attached (its
    /// dropout), `merge` (an SFT adapter for DPO) merged into the base first, the base in NF4
    /// with `--load-in-4bit`, in bf16 or f16 with `--dtype` on the CPU. LoRA on a GPU without
    /// `merge` loads straight onto the device, in the precision `cfg` asks (`bf16`, `fp16`,
    /// else f32).
    pub fn load_trainee(
        &self,
        cfg: &TrainConfig,
        merge: Option<&std::path::Path>,
    ) -> anyhow::Result<(Trainee, Tokenizer)> {
        let half = self.half_base(cfg)?;
        anyhow::ensure!(
            !cfg.load_in_4bit || cfg.is_lora(),
            "--load-in-4bit trains LoRA adapters on a frozen NF4 base; it excludes --full and --train-last-layers"
        );
        let device = self.engine_device()?;
        if let Device::Cuda(n) = device
            && cfg.is_lora()
            && merge.is_none()
        {
            let gpu = Gpu::open(n).with_context(|| format!("--device cuda:{n}"))?;
            gpu.set_tf32(cfg.tf32);
            let dt = if cfg.bf16 {
                Dt::BF16
            } else if cfg.fp16 {
                Dt::F16
            } else {
                Dt::F32
            };
            let nf4 = cfg.load_in_4bit.then_some(cfg.bnb_4bit_use_double_quant);
            let (mut model, mut tokenizer) =
                fedtune_engine::loader::load_model_cuda(&self.model, gpu, dt, nf4).with_context(
                    || format!("loading model {} onto cuda:{n}", self.model.display()),
                )?;
            self.apply_template(&mut tokenizer)?;
            if let Some(a) = &self.adapter {
                let adapter = PeftAdapter::load(a)
                    .with_context(|| format!("loading adapter {}", a.display()))?;
                self.warn_unchained_on_gpu(&adapter, a);
                model
                    .attach_adapter(&adapter)
                    .with_context(|| format!("applying adapter {}", a.display()))?;
                model.set_lora_dropout(adapter.config.lora_dropout);
            }
            return Ok((Trainee::Gpu(Box::new(model)), tokenizer));
        }
        // A 16-bit base is held so as it loads, unless an SFT adapter is merged into it first
        // (in f32; it is rounded after) or it becomes NF4.
        let at_load = half.filter(|_| merge.is_none() && !cfg.load_in_4bit);
        let f32_load = ModelArgs {
            dtype: "f32".into(),
            ..self.clone()
        };
        let mut m = f32_load.load_with(&burn::tensor::Device::flex(), at_load)?;
        if let Some(p) = merge {
            let sft = PeftAdapter::load(p)
                .with_context(|| format!("loading SFT adapter {}", p.display()))?;
            m.model
                .attach_adapter(&sft)
                .with_context(|| format!("applying SFT adapter {}", p.display()))?;
            m.model.merge_adapter()?;
        }
        if cfg.load_in_4bit {
            let (params, bytes) = m.model.quantize_nf4(cfg.bnb_4bit_use_double_quant);
            tracing::info!(
                "NF4 base: {params} parameters in {bytes} bytes ({:.3} bits each)",
                bytes as f64 * 8.0 / params as f64
            );
        } else if let Some(bf16) = half {
            // Already 16-bit when held so at load; rounds the merged f32 base otherwise.
            let (params, bytes) = m.model.store_half(bf16);
            tracing::info!(
                "{} base: {params} projection parameters in {bytes} bytes; {}",
                if bf16 { "bf16" } else { "f16" },
                fedtune_engine::kernels::blas::half_products(bf16)
            );
        }
        let host = Box::new(m.model);
        Ok((
            match device {
                Device::Cpu => Trainee::Host(host),
                Device::Cuda(n) => Trainee::HostThenGpu(host, n),
            },
            m.tokenizer,
        ))
    }
}

impl Trainee {
    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        match self {
            Trainee::Host(m) | Trainee::HostThenGpu(m, _) => &m.config,
            Trainee::Gpu(m) => &m.config,
        }
    }

    /// Attaches a fresh adapter for `cfg` (PEFT's initialisation, `cfg.seed`), with
    /// `cfg.lora_dropout`.
    pub fn attach_fresh(&mut self, cfg: &TrainConfig) -> anyhow::Result<()> {
        let mut adapter = init_adapter_for(self.config(), cfg);
        if cfg.use_dora {
            match self {
                Trainee::Host(m) | Trainee::HostThenGpu(m, _) => init_dora(m, &mut adapter),
                Trainee::Gpu(m) => m.init_dora(&mut adapter)?,
            }
        }
        match self {
            Trainee::Host(m) | Trainee::HostThenGpu(m, _) => {
                m.attach_weights(&adapter, cfg.lora_dropout)?
            }
            Trainee::Gpu(m) => {
                m.attach_weights(&adapter)?;
                m.set_lora_dropout(cfg.lora_dropout);
            }
        }
        Ok(())
    }

    /// Gives the model a fresh reward-model score head drawn from `seed`, unless it has one
    /// (an adapter that continues a reward model brings its own).
    pub fn ensure_score(&mut self, seed: u64) -> anyhow::Result<()> {
        match self {
            Trainee::Host(m) | Trainee::HostThenGpu(m, _) if m.score.is_none() => {
                m.init_score(seed)
            }
            Trainee::Gpu(m) if !m.has_score() => m.init_score(seed)?,
            _ => {}
        }
        Ok(())
    }

    /// The attached LoRA factors (f32 masters on a GPU), with a reward model's score head.
    pub fn lora_weights(&self) -> anyhow::Result<Adapter> {
        Ok(match self {
            Trainee::Host(m) | Trainee::HostThenGpu(m, _) => m.lora_weights(),
            Trainee::Gpu(m) => m.lora_weights()?,
        })
    }

    /// The host model, where there is one (full and partial fine-tuning write it out).
    pub fn host(&self) -> Option<&LlamaModel> {
        match self {
            Trainee::Host(m) | Trainee::HostThenGpu(m, _) => Some(m),
            Trainee::Gpu(_) => None,
        }
    }

    /// Runs `job` where the model lives; a GPU copy of a host model is made for it and its
    /// trained tensors copied back.
    pub fn train<J: Job>(&mut self, cfg: &TrainConfig, job: J) -> anyhow::Result<J::Out> {
        match self {
            Trainee::Host(m) => job.run(m.as_mut()),
            Trainee::HostThenGpu(m, n) => {
                let mut gpu = gpu_copy(m, *n, cfg)?;
                let out = job.run(&mut gpu)?;
                copy_back(&gpu, m, cfg)?;
                Ok(out)
            }
            Trainee::Gpu(m) => job.run(m.as_mut()),
        }
    }
}
