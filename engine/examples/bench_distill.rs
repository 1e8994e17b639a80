//! Distillation steps (generalized JSD, β 0.5, LoRA r=16 on all projections) through the real
//! training loop: the student is the model with a fresh adapter, the teacher the same model
//! loaded again (the speed does not depend on the values); conversations from DATA.jsonl.
//! `lmbda` 0 (default) trains on the data's completions; above 0 the student samples its own
//! (up to 64 new tokens). Prints one JSON line with the median over steps 2..N.
//!
//! `cargo run --release -p fedtune-engine --example bench_distill -- MODEL DATA.jsonl [BATCH] [STEPS] [LMBDA]`
use std::time::Instant;

use burn::tensor::{DType, Device};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::load_model;
use fedtune_engine::train::distill::{DistillObjective, DistillOptions};
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::sft::{LogEntry, RunOptions, TrainerState, train};
use fedtune_engine::train::{Callback, TrainConfig};

struct Timer {
    last: Instant,
    steps: Vec<f64>,
}

impl Callback for Timer {
    fn on_log(&mut self, _: &LogEntry, _: &TrainerState) {
        self.steps.push(self.last.elapsed().as_secs_f64());
        self.last = Instant::now();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, steps) = (arg(3, 4), arg(4, 4));
    let lmbda: f64 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let mut m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let teacher = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?.model;
    let opts = DistillOptions {
        lmbda,
        max_new_tokens: 64,
        ..DistillOptions::default()
    };
    let (examples, _) = Dataset::load(args[2].as_ref(), LoadOptions::default())?
        .encode_completions(&m.tokenizer, opts.max_length)?;
    let tokens_per_example = examples
        .iter()
        .map(|e| e.prompt.len() + e.completion.len())
        .sum::<usize>() as f64
        / examples.len() as f64;
    let cfg = TrainConfig {
        lora_r: 16,
        lora_alpha: 32.0,
        learning_rate: 1e-5,
        max_steps: Some(steps as u64),
        per_device_train_batch_size: batch,
        logging_steps: 1,
        ..TrainConfig::default()
    };
    let a = init_adapter(&m.model, &cfg);
    m.model.attach_weights(&a, 0.0)?;
    let mut stop = m.model.config.eos_token_ids.clone();
    stop.extend(m.tokenizer.eos_id);
    let objective = DistillObjective::new(
        &teacher,
        m.model.config.vocab_size,
        opts,
        examples,
        Vec::new(),
        batch,
        m.tokenizer.pad_id,
        stop,
        cfg.seed,
    )?;
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    let mut t = Timer {
        last: Instant::now(),
        steps: Vec::new(),
    };
    train(&mut m.model, &run, &objective, &mut t)?;
    let mut rest = t.steps[1.min(t.steps.len() - 1)..].to_vec();
    rest.sort_by(f64::total_cmp);
    let secs = rest[rest.len() / 2];
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "impl": "fedtune distill",
            "lmbda": lmbda,
            "batch_examples": batch, "steps": rest.len(),
            "seconds_per_step": (secs * 1000.0).round() / 1000.0,
            "examples_per_s": (batch as f64 / secs * 1000.0).round() / 1000.0,
            "tokens_per_example": tokens_per_example,
            "peak_rss_mb": rss / 1024,
        })
    );
    Ok(())
}
