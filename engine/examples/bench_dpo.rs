//! DPO steps (sigmoid, β 0.1, LoRA r=16 on all projections, reference = adapter disabled)
//! through the real training loop on a preference JSONL file; prints one JSON line with the
//! median over steps 2..N.
//!
//! `cargo run --release -p fedtune-engine --example bench_dpo -- MODEL DATA.jsonl [BATCH] [STEPS]`
use burn::tensor::{DType, Device};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::load_model;
use fedtune_engine::train::dpo::{DpoObjective, DpoOptions};
use fedtune_engine::train::sft::train;

mod bench_common;

use bench_common::{Timer, in_memory, lora_run, ms, peak_rss_mb};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, steps) = (arg(3, 4), arg(4, 4));
    let mut m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let opts = DpoOptions::default();
    let (pairs, _) = Dataset::load(args[2].as_ref(), LoadOptions::default())?.encode_pairs(
        &m.tokenizer,
        Some(opts.max_prompt_length),
        Some(opts.max_length),
    )?;
    let tokens_per_pair = pairs
        .iter()
        .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
        .sum::<usize>() as f64
        / pairs.len() as f64;
    let cfg = lora_run(&mut m.model, batch, steps, 1e-5)?;
    let objective = DpoObjective::new(&m.model, opts, pairs, Vec::new(), batch, m.tokenizer.pad_id);
    let run = in_memory(&cfg);
    let mut t = Timer::new();
    train(&mut m.model, &run, &objective, &mut t)?;
    let (secs, steps) = t.median_after_first();
    println!(
        "{}",
        serde_json::json!({
            "impl": "fedtune dpo",
            "batch_pairs": batch, "steps": steps,
            "seconds_per_step": ms(secs),
            "pairs_per_s": ms(batch as f64 / secs),
            "tokens_per_pair": tokens_per_pair,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
