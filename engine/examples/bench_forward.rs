//! Forward throughput (tokens/s) of a model on random ids, full logits, no gradients.
//! `cargo run --release -p fedtune-engine --example bench_forward -- MODEL [BATCH] [SEQ] [ITERS]`
//! Prints one JSON line. Used by `bench/forward.sh`.
use std::time::Instant;

use burn::tensor::{DType, Device};
use fedtune_engine::load_model;
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, iters) = (arg(2, 4), arg(3, 256), arg(4, 3));
    let m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = m.model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let run = || {
        let logits = m.model.forward(&ids, batch, seq);
        // Read one value back so that the whole forward has run.
        let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
    };
    run();
    let t = Instant::now();
    for _ in 0..iters {
        run();
    }
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    println!(
        "{{\"impl\": \"fedtune\", \"batch\": {batch}, \"seq\": {seq}, \"seconds\": {secs:.4}, \"tokens_per_s\": {:.1}}}",
        (batch * seq) as f64 / secs
    );
    Ok(())
}
