//! Time of LoRA training steps (forward + backward) on random ids:
//! `cargo run --release -p fedtune-engine --example bench_step -- MODEL [BATCH] [SEQ] [RANK] [TRAINED_FRACTION] [STEPS]`
//! (`FEDTUNE_GRADIENT_CHECKPOINTING=1`: recompute each block in backward; peak RSS is printed).
use std::time::Instant;

use burn::tensor::{DType, Device};
use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
use fedtune_engine::load_model;
use fedtune_engine::model::Positions;
use fedtune_engine::train::step::{StepBatch, StepOptions, Target, Trainable, backward, forward};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, rank, frac, steps) = (
        arg(2, 4.0) as usize,
        arg(3, 256.0) as usize,
        arg(4, 16.0) as usize,
        arg(5, 0.5),
        arg(6, 3.0) as usize,
    );
    let mut m = load_model(args[1].as_ref(), &Device::flex(), DType::F32)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut adapter = Adapter::default();
    for (name, lin) in m.model.linears() {
        let (out, inp) = (lin.out_features(), lin.in_features());
        let a = Matrix::new(
            rank,
            inp,
            (0..rank * inp)
                .map(|_| rng.random_range(-0.05f32..0.05))
                .collect(),
        );
        let b = Matrix::new(
            out,
            rank,
            (0..out * rank)
                .map(|_| rng.random_range(-0.01f32..0.01))
                .collect(),
        );
        adapter
            .modules
            .insert(name, LoraFactors { a, b, scale: 2.0 });
    }
    m.model.attach_weights(&adapter, 0.0)?;
    let vocab = m.model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let mut targets = Vec::new();
    for r in 0..batch {
        let start = ((1.0 - frac) * seq as f64) as usize;
        for t in start.max(1) - 1..seq - 1 {
            targets.push(Target {
                pos: r * seq + t,
                id: ids[r * seq + t + 1],
                seq: r,
            });
        }
    }
    let b = StepBatch {
        ids,
        batch,
        len: seq,
        positions: Positions::Range {
            start: 0,
            len: seq,
            batch,
        },
        segments: None,
        targets,
        real_tokens: batch * seq,
    };
    let g = vec![-1.0 / b.targets.len() as f32; b.targets.len()];
    let tr = Trainable::lora();
    let options = StepOptions {
        dropout_seed: None,
        gradient_checkpointing: std::env::var("FEDTUNE_GRADIENT_CHECKPOINTING")
            .is_ok_and(|v| v == "1"),
        ..StepOptions::default()
    };
    for i in 0..=steps {
        let t = Instant::now();
        let fwd = forward(&m.model, &b, &tr, &options);
        let tf = t.elapsed();
        let grads = backward(&m.model, fwd, &g, &tr);
        let _ = grads.values().next().map(|x| x.to_data());
        let total = t.elapsed().as_secs_f64();
        if i > 0 {
            println!(
                "step {i}: forward {:.2}s total {total:.2}s, {:.1} tokens/s ({} trained)",
                tf.as_secs_f64(),
                (batch * seq) as f64 / total,
                b.targets.len()
            );
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(l) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        println!(
            "peak RSS {} (gradient checkpointing: {})",
            l.trim_start_matches("VmHWM:").trim(),
            options.gradient_checkpointing
        );
    }
    Ok(())
}
