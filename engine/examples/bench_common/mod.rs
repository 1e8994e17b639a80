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
