//! Decoding throughput: the same prompts' continuations generated one prompt at a time and as
//! one batch ([`generate_groups`]), on the host; prints one JSON line per way with the seconds
//! and the new tokens per second.
//!
//! `cargo run --release -p fedtune-engine --example bench_generate -- MODEL PROMPTS.jsonl [PROMPTS] [N] [NEW]`
use burn::tensor::{DType, Device};
use fedtune_engine::generate::{GenerationConfig, generate_groups};
use fedtune_engine::load_model;
use fedtune_engine::train::grpo::load_prompts;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (count, n, new) = (arg(3, 2), arg(4, 4), arg(5, 64));
    let m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let prompts = load_prompts(args[2].as_ref(), &m.tokenizer)?;
    let ids: Vec<&[u32]> = prompts.iter().take(count).map(|p| &p.ids[..]).collect();
    let seeds: Vec<u64> = (0..ids.len() as u64).collect();
    // No stop ids: every row runs to the limit, so both ways decode the same number of tokens.
    let cfg = GenerationConfig {
        max_new_tokens: new,
        temperature: 1.0,
        ..GenerationConfig::default()
    };
    let tokens = (ids.len() * n * new) as f64;
    let t = Instant::now();
    for (p, s) in ids.iter().zip(&seeds) {
        generate_groups(&m.model, &[p], &[*s], n, &cfg);
    }
    let alone = t.elapsed().as_secs_f64();
    let t = Instant::now();
    generate_groups(&m.model, &ids, &seeds, n, &cfg);
    let together = t.elapsed().as_secs_f64();
    for (way, secs) in [("prompt by prompt", alone), ("one batch", together)] {
        println!(
            "{}",
            serde_json::json!({"way": way, "prompts": ids.len(), "rows_per_prompt": n,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "new_tokens_per_s": (tokens / secs * 10.0).round() / 10.0})
        );
    }
    Ok(())
}
