//! fedtune's side of the training benchmark (`bench/gpu_step.sh`): LoRA / QLoRA SFT and DPO
//! steps through the real training loop (forward, backward, clipping, AdamW) on random ids,
//! r = 16, α = 32, all seven projections, no dropout; one JSON line per run.
//!
//! ```text
//! gpu_step sft DEVICE MODEL BATCH SEQ STEPS MODE   MODE: lora | qlora, with -gc for gradient
//!                                                  checkpointing; the second half of each row trained
//! gpu_step dpo DEVICE MODEL PAIRS SEQ STEPS        sigmoid loss, β 0.1, reference = adapter
//!                                                  disabled; prompts and completions SEQ/2 each
//! gpu_step peak [N]                                bf16 N×N×N products through cuBLASLt (TFLOP/s)
//! ```
//!
//! `DEVICE` is `cuda` (the base in bf16 — NF4 with double quantisation for `qlora` — loaded
//! straight onto GPU 0, f32 LoRA masters and optimiser state: what `--bf16 --device cuda`
//! trains) or `cpu` (f32 on the host; there to check the benchmark scripts on a machine
//! without a GPU). The figures are the median step over steps 2..STEPS; the peak memory is the
//! device allocator's high-water mark plus the cuBLASLt workspace (the process's peak RSS on
//! the CPU). `model_flops_per_step` counts 6 FLOPs per trained and 4 per frozen parameter that
//! takes part in a product, per token (and 2 more per frozen parameter for DPO's reference
//! pass), without attention's score products and without recomputation.
//! With `FEDTUNE_PROFILE=1` the JSON line also holds the device time per kernel over the
//! measured steps (CUDA events; the profiled steps themselves run slower).
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{DType, Device};
use fedtune_engine::cuda::{CudaModel, Dt, Gpu};
use fedtune_engine::tokenizer::EncodedPair;
use fedtune_engine::train::dpo::DpoObjective;
use fedtune_engine::train::dpo::DpoOptions;
use fedtune_engine::train::lora::init_adapter_for;
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::sft::{LogEntry, RunOptions, SftObjective, TrainerState, train};
use fedtune_engine::train::{Callback, TrainConfig};
use fedtune_engine::{Encoded, ModelConfig, load_model};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Step times, and the GPU whose profile starts after the first (warm-up) step.
struct Timer {
    last: Instant,
    steps: Vec<f64>,
    gpu: Option<Arc<Gpu>>,
}

impl Callback for Timer {
    fn on_log(&mut self, e: &LogEntry, _: &TrainerState) {
        if e.loss.is_none() {
            return;
        }
        self.steps.push(self.last.elapsed().as_secs_f64());
        if self.steps.len() == 1
            && let Some(g) = &self.gpu
            && std::env::var("FEDTUNE_PROFILE").is_ok_and(|v| v == "1")
        {
            g.set_profiling(true);
        }
        self.last = Instant::now();
    }
}

impl Timer {
    fn median_after_first(&self) -> (f64, usize) {
        let mut rest = self.steps[1.min(self.steps.len() - 1)..].to_vec();
        rest.sort_by(f64::total_cmp);
        (rest[rest.len() / 2], rest.len())
    }
}

/// Trained and frozen parameters that take part in a product, per token, for LoRA rank `r`
/// on all seven projections: `(trainable, frozen)`.
fn product_params(c: &ModelConfig, r: usize) -> (f64, f64) {
    let (mut lora, mut frozen) = (0usize, c.vocab_size * c.hidden_size);
    for (_, o, i) in c.projections() {
        lora += r * (o + i);
        frozen += o * i;
    }
    (lora as f64, frozen as f64)
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn gib(b: f64) -> f64 {
    (b / (1u64 << 30) as f64 * 1000.0).round() / 1000.0
}

/// The model to train on `device`, with a fresh adapter attached.
enum Loaded {
    Gpu(Box<CudaModel>, Arc<Gpu>),
    Host(Box<fedtune_engine::LlamaModel>),
}

fn load(device: &str, path: &str, cfg: &TrainConfig, qlora: bool) -> anyhow_like::Result<Loaded> {
    match device {
        "cuda" => {
            let gpu = Gpu::open(0)?;
            let (mut m, _) = fedtune_engine::loader::load_model_cuda(
                path.as_ref(),
                gpu.clone(),
                Dt::BF16,
                qlora.then_some(true),
            )?;
            m.attach_weights(&init_adapter_for(&m.config, cfg))?;
            m.set_lora_dropout(0.0);
            Ok(Loaded::Gpu(Box::new(m), gpu))
        }
        "cpu" => {
            let mut m = load_model(path.as_ref(), &Device::flex(), DType::F32)?.model;
            if qlora {
                m.quantize_nf4(true);
            }
            m.attach_weights(&init_adapter_for(&m.config, cfg), 0.0)?;
            Ok(Loaded::Host(Box::new(m)))
        }
        other => Err(format!("device `{other}`: cuda or cpu").into()),
    }
}

/// Error plumbing for an example: any error, displayed.
mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
}

/// What one benchmark trains.
enum Work {
    Sft(Vec<Encoded>),
    Dpo(Vec<EncodedPair>, DpoOptions),
}

fn run<M: TrainModel>(
    m: &mut M,
    cfg: &TrainConfig,
    work: &Work,
    timer: &mut Timer,
) -> anyhow_like::Result<()> {
    let opts = RunOptions {
        config: cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    match work {
        Work::Sft(seqs) => {
            let objective = SftObjective::new(cfg, seqs, &[], 0);
            train(m, &opts, &objective, timer)?;
        }
        Work::Dpo(pairs, o) => {
            let objective = DpoObjective::new(
                m,
                *o,
                pairs.clone(),
                Vec::new(),
                cfg.per_device_train_batch_size,
                0,
            );
            train(m, &opts, &objective, timer)?;
        }
    }
    Ok(())
}

fn peak(n: usize) -> anyhow_like::Result<Value> {
    let gpu = Gpu::open(0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let v: Vec<f32> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let a = gpu.upload(&v, n, n, Dt::BF16)?;
    let b = gpu.upload(&v, n, n, Dt::BF16)?;
    let c = gpu.alloc(n, n, Dt::BF16);
    for _ in 0..3 {
        gpu.matmul_into(&c, 0, &[(&a, false, &b, true, 1.0)], false)?;
    }
    gpu.synchronize()?;
    let iters = 20;
    let t0 = Instant::now();
    for _ in 0..iters {
        gpu.matmul_into(&c, 0, &[(&a, false, &b, true, 1.0)], false)?;
    }
    gpu.synchronize()?;
    let secs = t0.elapsed().as_secs_f64() / iters as f64;
    Ok(json!({
        "impl": "fedtune", "bench": "peak", "gpu": gpu.name, "n": n,
        "tflops": (2.0 * (n as f64).powi(3) / secs / 1e12 * 10.0).round() / 10.0,
    }))
}

fn main() -> anyhow_like::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let usage = "gpu_step sft|dpo DEVICE MODEL BATCH SEQ STEPS [MODE] | gpu_step peak [N]";
    let kind = a.get(1).ok_or(usage)?.as_str();
    if kind == "peak" {
        let n = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(8192);
        println!("{}", peak(n)?);
        return Ok(());
    }
    if a.len() < 7 {
        return Err(usage.into());
    }
    let num = |i: usize| -> anyhow_like::Result<usize> {
        a[i].parse()
            .map_err(|_| format!("argument {i} (`{}`): a number", a[i]).into())
    };
    let (device, path) = (a[2].as_str(), a[3].as_str());
    let (batch, seq, steps) = (num(4)?, num(5)?, num(6)?);
    let mode = a.get(7).map_or("lora", String::as_str);
    let (qlora, gc) = (mode.starts_with("qlora"), mode.ends_with("-gc"));
    let cfg = TrainConfig {
        lora_r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        learning_rate: if kind == "dpo" { 1e-5 } else { 2e-4 },
        max_steps: Some(steps as u64),
        per_device_train_batch_size: batch,
        max_seq_length: seq,
        logging_steps: 1,
        load_in_4bit: qlora,
        bnb_4bit_use_double_quant: qlora,
        gradient_checkpointing: gc,
        bf16: device == "cuda",
        ..TrainConfig::default()
    };
    let t0 = Instant::now();
    let mut loaded = load(device, path, &cfg, qlora)?;
    let load_s = t0.elapsed().as_secs_f64();
    let config = match &loaded {
        Loaded::Gpu(m, _) => m.config.clone(),
        Loaded::Host(m) => m.config.clone(),
    };
    let vocab = config.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let work = match kind {
        "sft" => Work::Sft(
            (0..batch * steps)
                .map(|_| Encoded {
                    ids: ids(seq),
                    mask: (0..seq).map(|t| u8::from(t >= seq / 2)).collect(),
                })
                .collect(),
        ),
        "dpo" => {
            let half = seq / 2;
            let pairs = (0..batch * steps)
                .map(|_| EncodedPair {
                    prompt: ids(half),
                    chosen: ids(seq - half),
                    rejected: ids(seq - half),
                })
                .collect();
            let o = DpoOptions {
                max_prompt_length: half,
                max_length: seq,
                ..DpoOptions::default()
            };
            Work::Dpo(pairs, o)
        }
        other => return Err(format!("`{other}`: sft, dpo or peak\n{usage}").into()),
    };
    let mut timer = Timer {
        last: Instant::now(),
        steps: Vec::new(),
        gpu: None,
    };
    let (gpu_name, peak_bytes, profile) = match &mut loaded {
        Loaded::Gpu(m, gpu) => {
            timer.gpu = Some(gpu.clone());
            run(m.as_mut(), &cfg, &work, &mut timer)?;
            let profile = gpu.profile()?;
            let total: f64 = profile.iter().map(|k| k.ms).sum();
            let top: Vec<Value> = profile
                .iter()
                .take(25)
                .map(|k| {
                    json!({"name": k.name, "calls": k.calls, "ms": (k.ms * 100.0).round() / 100.0,
                           "share": (k.ms / total.max(1e-9) * 1000.0).round() / 1000.0})
                })
                .collect();
            let peak = gpu.peak_bytes()? as f64 + gpu.workspace_bytes() as f64;
            (gpu.name.clone(), peak, top)
        }
        Loaded::Host(m) => {
            run(m.as_mut(), &cfg, &work, &mut timer)?;
            ("cpu".to_string(), peak_rss_bytes() as f64, Vec::new())
        }
    };
    let (secs, measured) = timer.median_after_first();
    let (trainable, frozen) = product_params(&config, cfg.lora_r);
    let tokens = (batch * seq) as f64;
    let mut out = json!({
        "impl": "fedtune", "bench": kind, "mode": if kind == "dpo" { "lora" } else { mode },
        "device": gpu_name, "model": path, "batch": batch, "seq": seq, "steps": measured,
        "load_s": (load_s * 100.0).round() / 100.0,
        "seconds_per_step": (secs * 10000.0).round() / 10000.0,
        "peak_gib": gib(peak_bytes),
        "trainable_params": trainable,
    });
    if kind == "sft" {
        out["tokens_per_s"] = json!((tokens / secs * 10.0).round() / 10.0);
        out["model_flops_per_step"] = json!(tokens * (6.0 * trainable + 4.0 * frozen));
    } else {
        // Chosen and rejected rows: the policy's forward and backward, and the reference's
        // forward.
        out["pairs_per_s"] = json!((batch as f64 / secs * 1000.0).round() / 1000.0);
        out["tokens_per_s"] = json!((2.0 * tokens / secs * 10.0).round() / 10.0);
        out["model_flops_per_step"] =
            json!(2.0 * tokens * (6.0 * trainable + 4.0 * frozen + 2.0 * frozen));
    }
    if !profile.is_empty() {
        out["profile"] = Value::Array(profile);
    }
    println!("{out}");
    Ok(())
}
