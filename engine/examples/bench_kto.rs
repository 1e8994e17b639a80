//! KTO steps (β 0.1, LoRA r=16 on all projections, reference = adapter disabled, the KL term
//! from mismatched pairs) through the real training loop on a file of preference pairs
//! (unpaired into desirable and undesirable examples, as TRL does); prints one JSON line with
//! the median over steps 2..N.
//!
//! `cargo run --release -p fedtune-engine --example bench_kto -- MODEL DATA.jsonl [BATCH] [STEPS]`
use burn::tensor::{DType, Device};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::load_model;
use fedtune_engine::train::kto::{KtoObjective, KtoOptions};
use fedtune_engine::train::sft::train;

mod bench_common;

use bench_common::{Timer, in_memory, lora_run, ms, peak_rss_mb};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, steps) = (arg(3, 4), arg(4, 4));
    let mut m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let opts = KtoOptions::default();
    let (examples, _) = Dataset::load(args[2].as_ref(), LoadOptions::default())?
        .encode_feedback(&m.tokenizer, opts.max_length)?;
    let tokens_per_example = examples
        .iter()
        .map(|e| e.prompt.len() + e.completion.len())
        .sum::<usize>() as f64
        / examples.len() as f64;
    let cfg = lora_run(&mut m.model, batch, steps, 1e-5)?;
    let objective = KtoObjective::new(opts, examples, Vec::new(), batch, m.tokenizer.pad_id);
    let run = in_memory(&cfg);
    let mut t = Timer::new();
    train(&mut m.model, &run, &objective, &mut t)?;
    let (secs, steps) = t.median_after_first();
    println!(
        "{}",
        serde_json::json!({
            "impl": "fedtune kto",
            "batch_examples": batch, "steps": steps,
            "seconds_per_step": ms(secs),
            "examples_per_s": ms(batch as f64 / secs),
            "tokens_per_example": tokens_per_example,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
