//! GRPO steps (G = 4 completions per prompt, up to 64 new tokens, 8 completions per step,
//! LoRA r=16 on all projections, β 0, `dapo` loss) through the real training loop with the
//! `length:20:200` reward, on prompts from PROMPTS.jsonl; prints one JSON line with the median
//! over steps 2..N, and the mean completion length.
//!
//! `cargo run --release -p fedtune-engine --example bench_grpo -- MODEL PROMPTS.jsonl [STEPS]`
use burn::tensor::{DType, Device};
use fedtune_engine::load_model;
use fedtune_engine::rewards::Rewards;
use fedtune_engine::train::grpo::{GrpoObjective, GrpoOptions, load_prompts};
use fedtune_engine::train::sft::train;
use std::sync::Arc;

mod bench_common;

use bench_common::{Timer, in_memory, lora_run, ms, peak_rss_mb};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4);
    let mut m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let prompts = load_prompts(args[2].as_ref(), &m.tokenizer)?;
    let opts = GrpoOptions {
        num_generations: 4,
        max_completion_length: 64,
        ..GrpoOptions::default()
    };
    let batch = 8;
    let cfg = lora_run(&mut m.model, batch, steps, 1e-6)?;
    let mut stop = m.model.config.eos_token_ids.clone();
    stop.extend(m.tokenizer.eos_id);
    let pad = m.tokenizer.pad_id;
    let objective = GrpoObjective::new(
        prompts,
        Rewards::parse(&["length:20:200".to_string()], &[])?,
        opts,
        batch,
        pad,
        stop,
        Arc::new(m.tokenizer),
        cfg.seed,
    );
    let run = in_memory(&cfg);
    let mut t = Timer::new();
    train(&mut m.model, &run, &objective, &mut t)?;
    let (secs, steps) = t.median_after_first();
    let mean_length = t.lengths.iter().sum::<f64>() / t.lengths.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "fedtune grpo",
            "completions_per_step": batch, "steps": steps,
            "seconds_per_step": ms(secs),
            "completions_per_s": ms(batch as f64 / secs),
            "mean_completion_length": mean_length,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
