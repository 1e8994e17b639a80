//! Distillation steps (generalized JSD, β 0.5, LoRA r=16 on all projections) through the real
//! training loop: the student is the model with a fresh adapter, the teacher the same model
//! loaded again (the speed does not depend on the values); conversations from DATA.jsonl.
//! `lmbda` 0 (default) trains on the data's completions; above 0 the student samples its own
//! (up to 64 new tokens). Prints one JSON line with the median over steps 2..N.
//!
//! `cargo run --release -p fedtune-engine --example bench_distill -- MODEL DATA.jsonl [BATCH] [STEPS] [LMBDA]`
use burn::tensor::{DType, Device};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::load_model;
use fedtune_engine::train::distill::{DistillObjective, DistillOptions};
use fedtune_engine::train::sft::train;

mod bench_common;

use bench_common::{Timer, in_memory, lora_run, ms, peak_rss_mb};

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
    let cfg = lora_run(&mut m.model, batch, steps, 1e-5)?;
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
    let run = in_memory(&cfg);
    let mut t = Timer::new();
    train(&mut m.model, &run, &objective, &mut t)?;
    let (secs, steps) = t.median_after_first();
    println!(
        "{}",
        serde_json::json!({
            "impl": "fedtune distill",
            "lmbda": lmbda,
            "batch_examples": batch, "steps": steps,
            "seconds_per_step": ms(secs),
            "examples_per_s": ms(batch as f64 / secs),
            "tokens_per_example": tokens_per_example,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
