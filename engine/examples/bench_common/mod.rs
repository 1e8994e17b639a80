//! What the training-step benchmarks share: a callback timing each logged step, the median
//! over steps 2..N, the process's peak RSS, and a run kept in memory.
#![allow(dead_code)]

use std::time::Instant;

use fedtune_engine::train::sft::{LogEntry, RunOptions, TrainerState};
use fedtune_engine::train::{Callback, TrainConfig};

/// Times each logged step (log every step), and keeps GRPO's completion lengths.
pub struct Timer {
    last: Instant,
    steps: Vec<f64>,
    /// `completions/mean_length` of each step that logged one.
    pub lengths: Vec<f64>,
}

impl Timer {
    /// Starts timing now.
    pub fn new() -> Self {
        Timer {
            last: Instant::now(),
            steps: Vec::new(),
            lengths: Vec::new(),
        }
    }

    /// The median step time over steps 2..N (the first warms caches up), and how many.
    pub fn median_after_first(&self) -> (f64, usize) {
        let mut rest = self.steps[1.min(self.steps.len() - 1)..].to_vec();
        rest.sort_by(f64::total_cmp);
        (rest[rest.len() / 2], rest.len())
    }
}

impl Callback for Timer {
    fn on_log(&mut self, e: &LogEntry, _: &TrainerState) {
        self.steps.push(self.last.elapsed().as_secs_f64());
        if let Some(l) = e.metrics.get("completions/mean_length") {
            self.lengths.push(*l);
        }
        self.last = Instant::now();
    }
}

/// The process's peak resident memory in MiB (`VmHWM`).
pub fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// The benchmarks' LoRA run: r=16, α 32 on all projections, `steps` steps of `batch`, logged
/// every step; a fresh adapter (PEFT's initialisation) is attached to `model`.
pub fn lora_run(
    model: &mut fedtune_engine::LlamaModel,
    batch: usize,
    steps: usize,
    learning_rate: f64,
) -> fedtune_engine::Result<TrainConfig> {
    let cfg = TrainConfig {
        lora_r: 16,
        lora_alpha: 32.0,
        learning_rate,
        max_steps: Some(steps as u64),
        per_device_train_batch_size: batch,
        logging_steps: 1,
        ..TrainConfig::default()
    };
    let a = fedtune_engine::train::lora::init_adapter(model, &cfg);
    model.attach_weights(&a, 0.0)?;
    Ok(cfg)
}

/// A run of `cfg` kept in memory (no output directory).
pub fn in_memory(cfg: &TrainConfig) -> RunOptions<'_> {
    RunOptions {
        config: cfg,
        output: None,
        resume: None,
        cancel: None,
    }
}

/// `x` rounded to milliseconds (or thousandths).
pub fn ms(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
